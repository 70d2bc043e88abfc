"""data/prepare.py (Pile-format input to token shards, and the reader train.py uses), the built-in
corpora's builders data/stdlib/prepare.py and data/packages/prepare.py at toy scale, and what a run
into a folder that holds something may and may not do: the old dataset and every other file stay."""
import glob
import hashlib
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import sysconfig
import time

import numpy as np
import pytest

import data.packages.prepare as packages
import data.prepare as prep
import data.stdlib.prepare as stdlib
import shards
from conftest import PYTHIA_TOKENIZER, REPO
from tokenizer import Tokenizer


DOCS = ["Hello, world!", "def f(x):\n    return x  # two  spaces", "naïve café, 東京, 🙂",
        "", "The Pile is a dataset.\n\n\tTabs and newlines.", "x" * 300, "last one"] * 3


def write_jsonl(path, docs, compress=False):
    text = ''.join(json.dumps(dict(text=doc, meta=dict(pile_set_name='test'))) + '\n' for doc in docs)
    if compress:
        import zstandard
        with open(path, 'wb') as f:
            f.write(zstandard.ZstdCompressor().compress(text.encode()))
    else:
        with open(path, 'w', encoding='utf-8') as f:
            f.write(text)
    return str(path)


def expected_tokens(docs, encode, eot, val_every):
    """Each document then <|endoftext|>; documents i % val_every == 0 go to val."""
    splits = {'train': [], 'val': []}
    for i, doc in enumerate(docs):
        splits['val' if i % val_every == 0 else 'train'] += encode(doc) + [eot]
    return splits


def read_split(out_dir, split):
    tokens = []
    for path in sorted(glob.glob(os.path.join(out_dir, f'{split}_[0-9]*.bin'))):
        shard = np.fromfile(path, dtype=np.uint16, offset=shards.HEADER_BYTES)
        assert shards.read_header(path)['num_tokens'] == len(shard)
        tokens += shard.tolist()
    return tokens


@pytest.mark.parametrize('compress', [False, True], ids=['jsonl', 'jsonl.zst'])
def test_shards_hold_every_document_then_eot(tmp_path, monkeypatch, compress):
    monkeypatch.setattr(prep, 'BATCH_BYTES', 100)  # many small batches over 2 worker processes
    name = 'docs.jsonl.zst' if compress else 'docs.jsonl'
    path = write_jsonl(tmp_path / name, DOCS, compress)
    out_dir = prep.prepare(input=path, tokenizer='bytes', out_dir=str(tmp_path / 'out'), shard_tokens=50,
                           val_every=4, num_workers=2)
    expected = expected_tokens(DOCS, lambda s: list(s.encode('utf-8')), 256, val_every=4)
    assert read_split(out_dir, 'train') == expected['train']
    assert read_split(out_dir, 'val') == expected['val']

    # the header: magic, version, vocab, 2-byte tokens, count, identity; 1024 bytes, then the tokens
    first = os.path.join(out_dir, 'train_000000.bin')
    raw = open(first, 'rb').read()
    assert np.frombuffer(raw[:24], '<i4', 4).tolist() == [240319928, 1, 257, 2]
    assert np.frombuffer(raw[16:24], '<i8')[0] == 50 and raw[24:88].rstrip(b'\0') == b'bytes'
    assert raw[88:1024] == bytes(936) and len(raw) == 1024 + 2 * 50
    summary = json.load(open(os.path.join(out_dir, 'prepare.json')))
    assert summary['documents'] == len(DOCS) and summary['train']['tokens'] == len(expected['train'])
    assert len(summary['train']['shards']) == -(-len(expected['train']) // 50)

    # the reader: windows of block_size + 1 tokens that do not cross shards, every one read once per
    # epoch in a scattered order, wrapping around
    train = shards.Shards(out_dir, 'train', block_size=8)
    assert train.num_tokens == len(expected['train'])
    in_shard_order = [expected['train'][start + 8 * j:start + 8 * j + 9]
                      for start, shard in zip(range(0, 10 ** 9, 50), summary['train']['shards'])
                      for j in range((shard['tokens'] - 1) // 8)]
    assert train.num_windows == len(in_shard_order) > 4
    epoch = train.windows(0, train.num_windows)
    assert epoch.dtype == np.int64 and sorted(epoch.tolist()) == sorted(in_shard_order)
    assert epoch.tolist()[:2] != in_shard_order[:2]  # consecutive reads are not neighbours
    assert train.windows(train.num_windows + 1, 2).tolist() == epoch[1:3].tolist()


def test_folder_input_reads_files_in_order(tmp_path):
    folder = tmp_path / 'pile'
    folder.mkdir()
    write_jsonl(folder / '00.jsonl', DOCS[:5])
    write_jsonl(folder / '01.jsonl.zst', DOCS[5:], compress=True)
    (folder / 'notes.txt').write_text('not input')
    out_dir = prep.prepare(input=str(folder), tokenizer='bytes', out_dir=str(tmp_path / 'out'), val_every=3, num_workers=1)
    expected = expected_tokens(DOCS, lambda s: list(s.encode('utf-8')), 256, val_every=3)
    assert shards.Shards(out_dir, 'train', 4).tokens[0].tolist() == expected['train']
    assert shards.Shards(out_dir, 'val', 4).num_tokens == len(expected['val'])


def test_pythia_tokenizer(tmp_path):
    path = write_jsonl(tmp_path / 'docs.jsonl', DOCS)
    out_dir = prep.prepare(input=path, tokenizer=PYTHIA_TOKENIZER, out_dir=str(tmp_path / 'out'), val_every=5,
                           num_workers=2)
    tok = Tokenizer.from_file(PYTHIA_TOKENIZER)
    assert tok.eot_token == 0 and tok.identity.startswith('pythia-')
    expected = expected_tokens(DOCS, tok.encode, tok.eot_token, val_every=5)
    train = shards.Shards(out_dir, 'train', 4)
    assert train.tokenizer == tok.identity and train.vocab_size == tok.vocab_size == 50277
    assert train.tokens[0].tolist() == expected['train']
    assert open(os.path.join(out_dir, 'tokenizer.json'), 'rb').read() == open(PYTHIA_TOKENIZER, 'rb').read()


def test_wrong_tokenizer_is_refused(tmp_path):
    out_dir = prep.prepare(input=write_jsonl(tmp_path / 'd.jsonl', DOCS), tokenizer='bytes',
                           out_dir=str(tmp_path / 'out'), num_workers=1)
    train = shards.Shards(out_dir, 'train', 4)
    with pytest.raises(ValueError, match='tokenized with bytes, the model uses pythia-abc: rerun it'):
        train.check_tokenizer('pythia-abc', 50304, 'rerun it')
    with pytest.raises(ValueError, match="token ids up to 256, the model's vocab_size is 128"):
        train.check_tokenizer('bytes', 128, 'rerun it')
    train.check_tokenizer('bytes', 384, 'fine')
    train.check_tokenizer(None, 257, 'fine: identity unknown, the vocab fits')

    # a file that is not a GPT-NeoX tokenizer.json, and a missing one
    bogus = tmp_path / 'tokenizer.json'
    bogus.write_text(json.dumps(dict(model=dict(type='Unigram'))))
    with pytest.raises(ValueError, match='tokenizer.json'):
        prep.prepare(input=str(tmp_path / 'd.jsonl'), tokenizer=str(bogus), out_dir=str(tmp_path / 'o2'))
    with pytest.raises(ValueError, match=r"tokenizer='.*missing.json': no tokenizer there"):
        prep.prepare(input=str(tmp_path / 'd.jsonl'), tokenizer=str(tmp_path / 'missing.json'))
    with pytest.raises(ValueError, match="tokenizer='': give Pythia's tokenizer.json"):
        prep.prepare(input=str(tmp_path / 'd.jsonl'))


def test_damaged_or_foreign_shards_are_refused(tmp_path):
    out_dir = prep.prepare(input=write_jsonl(tmp_path / 'd.jsonl', DOCS), tokenizer='bytes',
                           out_dir=str(tmp_path / 'out'), num_workers=1)
    path = os.path.join(out_dir, 'train_000000.bin')
    raw = open(path, 'rb').read()
    open(path, 'wb').write(raw[:-2])
    with pytest.raises(ValueError, match='damaged'):
        shards.Shards(out_dir, 'train', 4)
    open(path, 'wb').write(b'\0' * 4 + raw[4:])
    with pytest.raises(ValueError, match='wrong magic'):
        shards.Shards(out_dir, 'train', 4)
    open(path, 'wb').write(raw[:4] + np.int32(7).tobytes() + raw[8:])
    with pytest.raises(ValueError, match='version 7'):
        shards.Shards(out_dir, 'train', 4)
    open(path, 'wb').write(raw[:1024 + 20] + b'\xff\xff' + raw[1024 + 22:])  # garbage inside, header intact
    with pytest.raises(ValueError, match=r"train_000000.bin holds token id 65535, but its header's vocab_size is 257"):
        shards.Shards(out_dir, 'train', 4)
    open(path, 'wb').write(raw)
    shards.write_shard(os.path.join(out_dir, 'train_000001.bin'), np.zeros(9, np.uint16), 300, 'other')
    with pytest.raises(ValueError, match='made with tokenizer other'):
        shards.Shards(out_dir, 'train', 4)
    with pytest.raises(ValueError, match='fewer than block_size'):
        shards.Shards(out_dir, 'val', 10_000)


def snapshot(folder):
    """Every file under folder, path -> bytes: also catches a file added or left behind."""
    return {os.path.join(parent, name): pathlib.Path(parent, name).read_bytes()
            for parent, _, names in os.walk(folder) for name in names}


def script_command(script, args, prelude=''):
    """`python script args`, after prelude: Python that patches something first."""
    code = f"{prelude}\nimport runpy, sys\nsys.argv = sys.argv[1:]\nrunpy.run_path(sys.argv[0], run_name='__main__')"
    return [sys.executable, '-c', code, os.path.join(REPO, script), *args]


def run_script(script, *args, cwd, prelude=''):
    """Run script as a real process in cwd. Returns (exit status, stdout, stderr)."""
    result = subprocess.run(script_command(script, args, prelude), cwd=cwd, capture_output=True, text=True, timeout=120)
    return result.returncode, result.stdout, result.stderr


def error_line(status, out, err, code=1):
    """The one line a run that exited with code printed on stderr, 'error: ...'; and no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == code and len(lines) == 1 and lines[0].startswith('error: '), (status, err)
    assert 'Traceback' not in out + err
    return lines[0]


def test_bad_input_halfway_leaves_the_old_dataset_intact(tmp_path, monkeypatch):
    monkeypatch.setattr(prep, 'BATCH_BYTES', 100)
    good = write_jsonl(tmp_path / 'good.jsonl', DOCS)
    out_dir = prep.prepare(input=good, tokenizer='bytes', out_dir=str(tmp_path / 'out'), shard_tokens=50, num_workers=2)
    before = snapshot(tmp_path)
    # a rerun that fails partway (a bad line after some shards were written) ...
    bad = tmp_path / 'bad.jsonl'
    bad.write_text(open(good).read() * 2 + '{"no text": 1}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl, line 43: not a JSON object with a 'text' field"):
        prep.prepare(input=str(bad), tokenizer='bytes', out_dir=out_dir, shard_tokens=50, num_workers=2)
    # ... leaves the earlier dataset as it was, byte for byte, and nothing of its own
    os.remove(bad)
    assert snapshot(tmp_path) == before
    summary = json.load(open(os.path.join(out_dir, 'prepare.json')))
    assert shards.Shards(out_dir, 'train', 4).num_tokens == summary['train']['tokens']
    # the folder a run builds in, out_dir + '.tmp', left by a run killed outright, is removed by the
    # next run; unless it holds something a run does not write there
    (tmp_path / 'out.tmp').mkdir()
    (tmp_path / 'out.tmp' / 'precious.txt').write_text('mine')
    with pytest.raises(ValueError, match=r'out.tmp, where this script writes before renaming into place, holds '
                                         r'precious.txt, which it did not write'):
        prep.prepare(input=good, tokenizer='bytes', out_dir=out_dir, num_workers=1)
    assert (tmp_path / 'out.tmp' / 'precious.txt').read_text() == 'mine'


def test_zst_without_zstandard_names_the_package(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / 'd.jsonl.zst', DOCS, compress=True)
    monkeypatch.setitem(sys.modules, 'zstandard', None)  # import zstandard now raises ImportError
    with pytest.raises(ValueError, match='d.jsonl.zst needs the zstandard package: pip install zstandard'):
        list(prep.read_batches([path]))


def test_at_most_one_batch_per_worker_is_in_flight():
    """Memory stays flat: a batch is drawn from the input only when a worker is free for it (Pool.imap
    would draw them all at once); the results come in order."""
    drawn = []

    def tasks():
        for i in range(20):
            drawn.append(i)
            yield ('d.jsonl', i + 1, i, [json.dumps(dict(text='x' * i)).encode()], i), 2

    with prep.workers('bytes', 3) as workers:
        for answered, (train, val, count, bytes_read) in enumerate(prep.tokenize_in_order(workers, tasks()), start=1):
            assert len(drawn) - answered <= 3  # the 3 workers' batches, and the next one, waiting for a worker
            i = answered - 1
            assert (train if i % 2 else val).tolist() == [ord('x')] * i + [256] and bytes_read == i and count == 1
    assert answered == len(drawn) == 20


def test_settings_are_checked_and_listed(tmp_path):
    status, out, err = run_script('data/prepare.py', '--help', cwd=tmp_path)
    assert status == 0 and 'num_workers = 0  # tokenizer processes; 0 means one per CPU core' in out
    assert 'val_every = 50' in out and "ood_input = ''" in out and 'overwrite = False' in out
    assert error_line(*run_script('data/prepare.py', '--input=nowhere.jsonl', '--tokenizer=bytes', '--val_every=1',
                                  cwd=tmp_path)) == \
        "error: val_every=1: give 2 or more (with 1, train would be empty)"
    assert os.listdir(tmp_path) == []
    path = write_jsonl(tmp_path / 'd.jsonl', DOCS)
    with pytest.raises(ValueError, match=r"input='': give the JSON lines to tokenize"):
        prep.prepare(tokenizer='bytes')
    with pytest.raises(ValueError, match=r"num_workers=-1: give 1 or more, or 0 for one per CPU core"):
        prep.prepare(input=path, tokenizer='bytes', num_workers=-1)
    with pytest.raises(TypeError, match=r'corpus: not settings of data/prepare.py'):
        prep.prepare(input=path, tokenizer='bytes', corpus='stdlib')
    assert sorted(os.listdir(tmp_path)) == ['d.jsonl']

# -----------------------------------------------------------------------------
# Nothing lost: what a run may do to the folder it writes into


@pytest.fixture
def dataset(tmp_path):
    """A dataset of DOCS in tmp_path/out, 5 train shards and 1 val shard; the input is tmp_path/docs.jsonl."""
    return prep.prepare(input=write_jsonl(tmp_path / 'docs.jsonl', DOCS), tokenizer='bytes',
                        out_dir=str(tmp_path / 'out'), shard_tokens=50, num_workers=1)


def test_other_files_in_the_output_folder_stay(dataset, tmp_path):
    out = pathlib.Path(dataset)
    (out / 'report.tmpl').write_text('{{ mine }}')
    (out / 'plan.tmp.txt').write_text('my plan')
    before = snapshot(tmp_path)
    rerun = ('data/prepare.py', f"--input={tmp_path / 'docs.jsonl'}", '--tokenizer=bytes', f'--out_dir={out}',
             '--val_every=3')
    line = error_line(*run_script(*rerun, cwd=tmp_path))
    assert line == (f"error: {out} holds plan.tmp.txt, which data/prepare.py did not write (no prepare.json there "
                    "lists it): move it away, or pass --overwrite=True to keep it there beside the new dataset, or "
                    "pick another --out_dir")
    assert snapshot(tmp_path) == before
    # told to, it replaces the old dataset's files (those its prepare.json lists) and leaves the others
    status, out_text, err = run_script(*rerun, '--overwrite=True', cwd=tmp_path)
    assert status == 0 and err == '' and f"in {out}" in out_text
    assert sorted(os.listdir(out)) == ['plan.tmp.txt', 'prepare.json', 'report.tmpl', 'train_000000.bin',
                                       'val_000000.bin']
    assert (out / 'report.tmpl').read_bytes() == b'{{ mine }}' and (out / 'plan.tmp.txt').read_bytes() == b'my plan'
    assert json.load(open(out / 'prepare.json'))['val_every'] == 3 and not os.path.exists(f'{out}.tmp')
    # a file named as a dataset's that no prepare.json lists is refused even so: the new dataset would
    # replace it, or train.py would read it with the new dataset
    for name in ('train_000007.bin', 'tokenizer.json'):
        (out / name).write_bytes(b'not from this dataset')
        before = snapshot(tmp_path)
        assert error_line(*run_script(*rerun, '--overwrite=True', cwd=tmp_path)) == (
            f"error: {out} holds {name}, which data/prepare.py did not write (no prepare.json there lists it): "
            "move it away, or pick another --out_dir")
        assert snapshot(tmp_path) == before
        os.remove(out / name)


def alive(pid):
    """Whether process pid runs (a zombie, dead but not yet reaped by its parent, does not)."""
    try:
        return pathlib.Path(f'/proc/{pid}/stat').read_text().rpartition(')')[2].split()[0] != 'Z'
    except FileNotFoundError:
        return False


# each process that loads the tokenizer (the run, then each worker) leaves a file named by its pid; a
# worker's first batch takes a minute
SLOW_TOKENIZER = '''
import os, pathlib, sys, time
sys.path.insert(0, {repo!r})
import tokenizer
bytes_tokenizer = tokenizer.Tokenizer.bytes
def load():
    pathlib.Path({pids!r}, f'loaded-{{os.getpid()}}').touch()
    return bytes_tokenizer()
def encode_batch(self, texts, **kwargs):
    pathlib.Path({pids!r}, f'busy-{{os.getpid()}}').touch()
    time.sleep(60)
tokenizer.Tokenizer.bytes, tokenizer.Tokenizer.encode_batch = staticmethod(load), encode_batch
'''


# how each case stops the run: which process gets which signal
STOPS = {'SIGTERM': ('run', signal.SIGTERM), 'SIGTERM to the group': ('group', signal.SIGTERM),
         'Ctrl-C': ('group', signal.SIGINT), 'kill -9': ('run', signal.SIGKILL),
         'a worker killed': ('busy worker', signal.SIGKILL)}


@pytest.mark.skipif(not os.path.isdir('/proc'), reason='reads the processes from /proc')
@pytest.mark.parametrize('stop', STOPS)
def test_a_stopped_run_takes_its_workers_with_it(dataset, tmp_path, stop):
    """SIGTERM (to the run, or to its whole process group, as Slurm sends it) or Ctrl-C (a terminal
    sends it to the group): one line, exit 143 or 130, the old dataset as it was, no worker left. A
    worker killed (as the out-of-memory killer does): one line too. kill -9: no worker left either,
    and none prints a word."""
    pids = tmp_path / 'pids'
    pids.mkdir()
    before = snapshot(dataset)
    args = (f"--input={tmp_path / 'docs.jsonl'}", '--tokenizer=bytes', f'--out_dir={dataset}', '--num_workers=2')
    command = script_command('data/prepare.py', args, SLOW_TOKENIZER.format(repo=REPO, pids=str(pids)))
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    workers = set()
    try:
        deadline = time.time() + 60
        while len(os.listdir(pids)) < 4:  # the run and two workers loaded, one worker busy
            assert process.poll() is None and time.time() < deadline, process.communicate()
            time.sleep(0.05)
        started = {name.split('-')[0]: int(name.split('-')[1]) for name in sorted(os.listdir(pids), reverse=True)}
        workers = {int(name.split('-')[1]) for name in os.listdir(pids) if name.startswith('loaded-')} - {process.pid}
        assert len(workers) == 2 and all(map(alive, workers)) and started['busy'] in workers
        target, signum = STOPS[stop]
        if target == 'group':
            os.killpg(process.pid, signum)
        else:
            os.kill(process.pid if target == 'run' else started['busy'], signum)
        out, err = process.communicate(timeout=30)  # till every process holding its stdout and stderr is gone
        deadline = time.time() + 10
        while any(map(alive, workers)) and time.time() < deadline:
            time.sleep(0.05)
        assert not any(map(alive, workers))
    finally:
        for pid in filter(alive, workers | {process.pid}):
            os.kill(pid, signal.SIGKILL)
    assert snapshot(dataset) == before
    if stop == 'kill -9':
        assert process.returncode == -signal.SIGKILL and out == err == ''
        assert os.path.isdir(f'{dataset}.tmp')  # its build folder: the next run removes it
        status, _, err = run_script('data/prepare.py', *args, cwd=tmp_path)
        assert status == 0 and err == '' and not os.path.exists(f'{dataset}.tmp')
        return
    if stop == 'a worker killed':
        line = error_line(process.returncode, out, err, 1)
        assert line == ("error: a tokenizer process died (exit status -9; -9 is what the system's out-of-memory "
                        "killer leaves): run again, with fewer --num_workers if memory is short")
    else:
        line = error_line(process.returncode, out, err, 130 if stop == 'Ctrl-C' else 143)
        assert line == (f"error: {'interrupted' if stop == 'Ctrl-C' else 'terminated'}; {dataset} is as it was "
                        "(its dataset kept); run the same command again")
    assert not os.path.exists(f'{dataset}.tmp')


# the disk fills up during the first shard's write
FULL_DISK = '''
import errno, os, sys
sys.path.insert(0, {repo!r})
import atomic, shards
def write_shard(path, tokens, vocab_size, identity):
    def write(tmp_path):
        with open(tmp_path, 'wb') as f:
            f.write(b'the first bytes')
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    atomic.atomic_write(path, write)
shards.write_shard = write_shard
'''


def test_a_full_disk_is_one_line_naming_the_file(dataset, tmp_path):
    before = snapshot(tmp_path)
    args = (f"--input={tmp_path / 'docs.jsonl'}", '--tokenizer=bytes', '--num_workers=1')
    line = error_line(*run_script('data/prepare.py', *args, f'--out_dir={dataset}', cwd=tmp_path,
                                  prelude=FULL_DISK.format(repo=REPO)))
    assert line == (f"error: {dataset}.tmp/train_000000.bin: cannot write it (No space left on device): make room, or "
                    f"write elsewhere; the earlier file, if any, is as it was; {dataset} is as it was (its dataset "
                    "kept); run the same command again")
    assert snapshot(tmp_path) == before  # and no build folder, no half a shard
    # a folder that cannot be made (a file stands where a folder should be) is one line naming it
    (tmp_path / 'file').write_text('not a folder')
    before = snapshot(tmp_path)
    line = error_line(*run_script('data/prepare.py', *args, f"--out_dir={tmp_path / 'file' / 'out'}", cwd=tmp_path))
    assert line == (f"error: {tmp_path / 'file' / 'out.tmp'}: Not a directory; the files written before this run "
                    "are as they were")
    assert snapshot(tmp_path) == before

# -----------------------------------------------------------------------------
# The stdlib corpus, the demo's


def test_stdlib_corpus_is_labelled_pile_format(tmp_path):
    path = str(tmp_path / 'stdlib.jsonl')
    documents = stdlib.write_corpus(path, max_bytes=600_000)
    lines = [json.loads(line) for line in open(path, encoding='utf-8')]
    assert len(lines) == len(documents) > 5
    assert documents == [(d['meta']['source'], len(d['text'].encode('utf-8'))) for d in lines]
    assert 600_000 <= sum(len(d['text']) for d in lines) < 600_000 + max(size for _, size in documents)  # then it stops
    assert all('stdlib (dijiang default corpus)' in d['meta']['pile_set_name'] for d in lines)
    # the demo's documents and their order, on which its numbers depend: the stdlib's modules outside
    # tests, caches, the pydoc topics and installed packages, sorted by path, shuffled by Random(0)
    root = sysconfig.get_paths()['stdlib']
    skip = {'site-packages', 'dist-packages', 'test', 'tests', 'idle_test', 'pydoc_data', '__pycache__'}
    modules = sorted(os.path.relpath(os.path.join(folder, name), root) for folder, _, names in os.walk(root)
                     if not skip & set(os.path.relpath(folder, root).split(os.sep)) for name in names
                     if name.endswith('.py'))
    random.Random(0).shuffle(modules)
    assert [d['meta']['source'] for d in lines] == [f'Lib/{module}' for module in modules[:len(lines)]]
    assert lines[0]['text'] == open(os.path.join(root, modules[0]), encoding='utf-8').read()


def test_stdlib_builder(tmp_path, monkeypatch):
    """python data/stdlib/prepare.py, at toy scale: the corpus in data/stdlib/stdlib.jsonl (under the
    working directory), tokenized into data/stdlib-bytes, every 10th document in val, each split's
    files in prepare.json."""
    status, out, err = run_script('data/stdlib/prepare.py', '--corpus_mb=0.3', '--num_workers=2', cwd=tmp_path)
    assert status == 0 and err == '', err
    assert sorted(os.listdir(tmp_path / 'data')) == ['stdlib', 'stdlib-bytes']
    lines = [json.loads(line) for line in open(tmp_path / 'data' / 'stdlib' / 'stdlib.jsonl', encoding='utf-8')]
    texts, sources = [d['text'] for d in lines], [d['meta']['source'] for d in lines]
    out_dir = tmp_path / 'data' / 'stdlib-bytes'
    expected = expected_tokens(texts, lambda s: list(s.encode('utf-8')), 256, val_every=10)
    assert read_split(out_dir, 'train') == expected['train'] and read_split(out_dir, 'val') == expected['val']
    summary = json.load(open(out_dir / 'prepare.json'))
    assert summary['corpus'] == 'stdlib' and summary['documents'] == len(lines) and summary['val_every'] == 10
    assert summary['val']['files'] == sources[::10]
    assert summary['train']['files'] == [source for i, source in enumerate(sources) if i % 10]
    assert summary['train']['bytes'] + summary['val']['bytes'] == sum(len(t.encode('utf-8')) for t in texts)
    assert f"{len(lines)} documents -> {len(expected['train']):,} train and {len(expected['val']):,} val tokens (bytes) " \
           f"in {os.path.join('data', 'stdlib-bytes')}" in out
    # what train.py calls on first use
    monkeypatch.chdir(tmp_path)
    assert stdlib.build(out_dir=str(tmp_path / 'again'), corpus_mb=0.3, num_workers=1) == str(tmp_path / 'again')
    assert snapshot(tmp_path / 'again')[str(tmp_path / 'again' / 'train_000000.bin')] == \
        (out_dir / 'train_000000.bin').read_bytes()

# -----------------------------------------------------------------------------
# The packages corpus, built from a fake installation in tmp_path


def source(name, size):
    """A distinct .py text of exactly size bytes."""
    text = f"# {name}\n"
    return (text + 'x = 1\n' * size)[:size].encode()


def make_installation(base):
    """Two roots: 'site' with packages alpha (6 KB), beta (8.5 KB) and gamma (3.35 KB), 'lib' with modules.
    Returns {root-relative name 'root/path': bytes} of every file written."""
    files = {f'site/alpha/m{i}.py': source(f'alpha {i}', 250) for i in range(24)}
    files.update({f'site/beta/b{i}.py': source(f'beta {i}', 250) for i in range(32)})
    files.update({f'site/gamma/g{i}.py': source(f'gamma {i}', 250) for i in range(12)})
    files.update({f'site/{package}/__init__.py': b'' for package in ('alpha', 'beta', 'gamma')})  # 2 duplicates
    files.update({f'lib/mod{i}.py': source(f'lib {i}', 300) for i in range(10)})
    files.update({
        'site/gamma/sub/deep.py': source('gamma deep', 100),
        'site/beta/copy.py': files['site/alpha/m3.py'],  # a duplicate
        'site/beta/shared.py': files['site/gamma/g0.py'],  # a duplicate of a held-out file: left out of train
        'site/gamma/again.py': files['site/gamma/g1.py'],  # a duplicate inside the held-out package
        'site/beta/latin1.py': '# café\n'.encode('latin-1'),  # not UTF-8: left out
        'site/beta/tokens.py': b"EOT = '<|endoftext|>'\n",  # would be a document boundary: left out
        'site/top.py': source('top', 80),  # a module, not a package
        'site/alpha/tests/test_m.py': source('alpha test', 50),  # tests: left out
        'site/alpha/__pycache__/m0.py': source('cache', 50),  # left out
        'site/NOTES.txt': b'not python',
        'lib/email_like/__init__.py': source('email', 200),
        'lib/site-packages/alpha/m0.py': source('nested site-packages', 90),  # read from its own root only
    })
    for name, data in files.items():
        path = base / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (base / 'site' / 'alpha' / 'broken.py').symlink_to(base / 'nowhere.py')  # a broken link: left out
    return files


def test_packages_corpus_splits(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the corpus is written to data/packages/, here
    monkeypatch.setattr(prep, 'BATCH_BYTES', 500)  # many small batches over 2 worker processes
    files = make_installation(tmp_path / 'installed')
    roots = dict(site=str(tmp_path / 'installed' / 'site'), lib=str(tmp_path / 'installed' / 'lib'))
    skipped = ('tests/', '__pycache__/', 'site-packages/', 'latin1.py', 'tokens.py', '.txt')
    eligible = {name: data for name, data in files.items() if not any(s in name for s in skipped)}
    digest = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    outside_gamma = sum(len(data) for name, data in eligible.items() if not name.startswith('site/gamma/'))

    for corpus_mb, ood_mb in [(1.0, 1.0), (outside_gamma / 2e6, 0.002)]:  # everything; then both caps biting
        out_dir = packages.build(corpus_mb=corpus_mb, ood_package='gamma', ood_mb=ood_mb, roots=roots,
                                 out_dir=str(tmp_path / 'out'), val_every=5, num_workers=2)
        summary = json.load(open(os.path.join(out_dir, 'prepare.json')))
        assert summary['corpus'] == 'packages' and summary['held_out_package'] == 'gamma'
        assert summary['roots'] == roots
        assert summary['left_out'] == dict(duplicates=5, not_utf8=1, eot_text=1)  # every file is read, so any cap
        split_files = {split: summary[split]['files'] for split in ('train', 'val', 'val_ood')}
        written = [name for names in split_files.values() for name in names]

        # each file and each text at most once, in one split; the held-out package in val_ood only
        assert len(written) == len(set(written)) and set(written) <= set(eligible)
        assert len({digest[name] for name in written}) == len(written)
        assert all(name.startswith('site/gamma/') for name in split_files['val_ood'])
        assert not any(name.startswith('site/gamma/') for name in split_files['train'] + split_files['val'])
        gamma_texts = {digest[name] for name in files if name.startswith('site/gamma/')}
        assert not gamma_texts & {digest[name] for name in split_files['train'] + split_files['val']}
        assert 'site/beta/shared.py' not in written  # a copy of a held-out text, even one past ood_mb

        # the caps
        assert summary['train']['bytes'] + summary['val']['bytes'] <= corpus_mb * 1e6
        assert summary['val_ood']['bytes'] <= ood_mb * 1e6
        if corpus_mb == 1.0:  # room for everything: every distinct text is in, each duplicate counted once
            assert {digest[name] for name in written} == {digest[name] for name in eligible}
            assert len(eligible) - len(written) == summary['left_out']['duplicates']
            assert {name for name in eligible if name.startswith('site/gamma/')} - set(split_files['val_ood']) <= \
                {'site/gamma/g1.py', 'site/gamma/again.py'}
        else:
            assert summary['train']['bytes'] + summary['val']['bytes'] > corpus_mb * 1e6 - 300  # filled
            assert 0 < summary['val_ood']['bytes'] and len(split_files['val_ood']) < 12

        # the document order: the JSON lines as written, every val_every-th one in val
        order = [f"{d['meta']['root']}/{d['meta']['path']}" for d in map(json.loads, open('data/packages/packages.jsonl'))]
        assert split_files['val'] == order[::5] and split_files['train'] == [n for i, n in enumerate(order) if i % 5]
        assert len(order) > 30 and order != sorted(order)  # shuffled

        # the shards hold exactly those files, in that order, each then <|endoftext|>
        for split, names in split_files.items():
            expected = [token for name in names for token in list(eligible[name]) + [256]]
            assert read_split(out_dir, split) == expected
            assert summary[split]['tokens'] == summary[split]['bytes'] + len(names) == len(expected)
        assert shards.Shards(out_dir, 'val', 4).num_tokens == summary['val']['tokens']  # val_ood shards are not val's
        assert shards.Shards(out_dir, 'val_ood', 4).num_tokens == summary['val_ood']['tokens']


def test_held_out_package_choice(tmp_path):
    make_installation(tmp_path)
    roots = dict(site=str(tmp_path / 'site'), lib=str(tmp_path / 'lib'))

    def held_out(wanted, ood_mb):
        return packages.held_out_package(roots, packages.python_files(roots), wanted, int(ood_mb * 1e6))

    assert held_out('gamma', 0.001) == 'gamma'  # installed: held out even when bigger than ood_mb
    assert held_out('missing', 0.007) == 'alpha'  # the largest that fits whole (6 KB; beta is 8.5 KB)
    assert held_out('missing', 0.0001) == 'beta'  # none fits: the largest
    assert held_out('top', 0.007) == 'alpha'  # a module at the top is not a package


def test_builder_settings_are_checked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r'corpus_mb=-1.0: give a size in MB above 0'):
        packages.build(corpus_mb=-1.0, out_dir=str(tmp_path / 'out'))
    with pytest.raises(ValueError, match=r'corpus_mb=0.0: give a size in MB above 0'):
        stdlib.build(corpus_mb=0.0, out_dir=str(tmp_path / 'out'))
    with pytest.raises(ValueError, match='no package folders with .py files'):
        packages.build(roots=dict(empty=str(tmp_path)), out_dir=str(tmp_path / 'out'))
    with pytest.raises(TypeError, match='corpus: not settings of data/stdlib/prepare.py'):
        stdlib.build(corpus='stdlib')
    assert os.listdir(tmp_path) == []
    status, out, err = run_script('data/packages/prepare.py', '--help', cwd=tmp_path)
    assert status == 0 and "ood_package = 'networkx'" in out and 'corpus_mb = 160.0' in out
