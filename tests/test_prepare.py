"""data/prepare.py: Pile-format input to token shards, and the reader train.py uses."""
import glob
import hashlib
import json
import os
import sys

import numpy as np
import pytest

import data.prepare as prep
import shards
from conftest import PYTHIA_TOKENIZER
from configurator import parse_settings
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
    with pytest.raises(ValueError, match='no tokenizer at'):
        prep.prepare(input=str(tmp_path / 'd.jsonl'), tokenizer=str(tmp_path / 'missing.json'))
    with pytest.raises(ValueError, match='which tokenizer'):
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


def folder_bytes(folder):
    return {name: open(os.path.join(folder, name), 'rb').read() for name in sorted(os.listdir(folder))}


def test_failed_run_leaves_the_old_dataset_intact(tmp_path, monkeypatch):
    monkeypatch.setattr(prep, 'BATCH_BYTES', 100)
    good = write_jsonl(tmp_path / 'good.jsonl', DOCS)
    out_dir = prep.prepare(input=good, tokenizer='bytes', out_dir=str(tmp_path / 'out'), shard_tokens=50, num_workers=2)
    before = folder_bytes(out_dir)
    # a rerun that fails partway (a bad line after some shards were written) ...
    bad = tmp_path / 'bad.jsonl'
    bad.write_text(open(good).read() * 2 + '{"no text": 1}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl, line 43: not a JSON object with a 'text' field"):
        prep.prepare(input=str(bad), tokenizer='bytes', out_dir=out_dir, shard_tokens=50, num_workers=2)
    # ... leaves the earlier dataset as it was, byte for byte, and nothing of its own
    assert folder_bytes(out_dir) == before
    assert sorted(os.listdir(tmp_path)) == ['bad.jsonl', 'good.jsonl', 'out']
    assert shards.Shards(out_dir, 'train', 4).num_tokens == json.load(open(os.path.join(out_dir, 'prepare.json')))['train']['tokens']
    # a run killed outright leaves its build folder, out_dir + '.tmp': the next run removes it
    os.makedirs(out_dir + '.tmp')
    shards.write_shard(os.path.join(out_dir + '.tmp', 'train_000000.bin'), np.zeros(9, np.uint16), 257, 'bytes')
    open(os.path.join(out_dir + '.tmp', 'train_000001.bin.tmp'), 'wb').write(b'half a shard')
    # and a rerun replaces everything
    prep.prepare(input=good, tokenizer='bytes', out_dir=out_dir, shard_tokens=10_000, num_workers=1)
    assert sorted(os.listdir(out_dir)) == ['prepare.json', 'train_000000.bin', 'val_000000.bin']
    assert sorted(os.listdir(tmp_path)) == ['bad.jsonl', 'good.jsonl', 'out']
    # other files in out_dir stay; a build folder holding something else is not ours to delete
    (tmp_path / 'out' / 'NOTES.md').write_text('mine')
    (tmp_path / 'out.tmp').mkdir()
    (tmp_path / 'out.tmp' / 'precious.txt').write_text('mine too')
    with pytest.raises(ValueError, match=r'out.tmp, where this run builds its shards .* holds precious.txt'):
        prep.prepare(input=good, tokenizer='bytes', out_dir=out_dir, num_workers=1)
    os.remove(tmp_path / 'out.tmp' / 'precious.txt')
    prep.prepare(input=good, tokenizer='bytes', out_dir=out_dir, shard_tokens=10_000, num_workers=1, val_every=3)
    assert (tmp_path / 'out' / 'NOTES.md').read_text() == 'mine' and not (tmp_path / 'out.tmp').exists()


def test_zst_without_zstandard_names_the_package(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / 'd.jsonl.zst', DOCS, compress=True)
    monkeypatch.setitem(sys.modules, 'zstandard', None)  # import zstandard now raises ImportError
    with pytest.raises(SystemExit, match='needs the zstandard package: pip install zstandard'):
        list(prep.read_batches([path]))


def test_default_corpus_is_labelled_pile_format(tmp_path):
    path = str(tmp_path / 'stdlib.jsonl')
    documents = prep.build_default_corpus(path, max_bytes=600_000)
    lines = [json.loads(line) for line in open(path, encoding='utf-8')]
    assert len(lines) == len(documents) > 5
    assert documents == [(d['meta']['source'], len(d['text'].encode('utf-8'))) for d in lines]
    assert 600_000 <= sum(len(d['text']) for d in lines) < 600_000 + max(size for _, size in documents)  # then it stops
    sources = [d['meta']['source'] for d in lines]
    assert all(s.startswith('Lib/') and s.endswith('.py') for s in sources)  # stdlib module sources only
    assert sources != sorted(sources)  # a seeded shuffle: each batch mixes modules
    assert all('stdlib (dijiang default corpus)' in d['meta']['pile_set_name'] for d in lines)
    assert not any('/test/' in s or s.startswith('Lib/test') for s in sources)


def test_settings_parser():
    settings = dict(input='', shard_tokens=10, val_every=50, corpus_mb=4.0)
    assert parse_settings(['--input=a b.jsonl', '--shard_tokens=5', '--corpus_mb=1'], settings, '') == \
        dict(input='a b.jsonl', shard_tokens=5, corpus_mb=1.0)
    # a string setting keeps literal-looking text as written
    assert parse_settings(["--input=42", "--input='q'", '--input=1,2'], settings, '') == dict(input='1,2')
    assert parse_settings(['--input=42'], settings, '') == dict(input='42')
    assert parse_settings(["--input='q'"], settings, '') == dict(input="'q'")
    with pytest.raises(SystemExit, match="unknown argument '--nope=1'"):
        parse_settings(['--nope=1'], settings, '')
    with pytest.raises(SystemExit, match=r'expected a value like 10 \(int\)'):
        parse_settings(['--shard_tokens=many'], settings, '')
    help_text = prep.settings_help(prep.__file__)
    assert 'shard_tokens = 100_000_000' in help_text and 'val_every = 0' in help_text


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
        out_dir = prep.prepare(corpus='packages', corpus_mb=corpus_mb, ood_package='gamma', ood_mb=ood_mb,
                               roots=roots, out_dir=str(tmp_path / 'out'), val_every=5, num_workers=2)
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
        corpus = tmp_path / 'corpus'
        built = prep.build_packages_corpus(str(corpus / 'main.jsonl'), str(corpus / 'ood.jsonl'), 10 ** 6, wanted,
                                           int(ood_mb * 1e6), roots)
        return built['held_out_package']

    assert held_out('gamma', 0.001) == 'gamma'  # installed: held out even when bigger than ood_mb
    assert held_out('missing', 0.007) == 'alpha'  # the largest that fits whole (6 KB; beta is 8.5 KB)
    assert held_out('missing', 0.0001) == 'beta'  # none fits: the largest
    assert held_out('top', 0.007) == 'alpha'  # a module at the top is not a package


def test_corpus_setting_is_checked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="corpus='pile' is not a built-in corpus: use one of stdlib, packages"):
        prep.prepare(corpus='pile', out_dir=str(tmp_path / 'out'))
    with pytest.raises(ValueError, match='cannot be negative'):
        prep.prepare(corpus='packages', corpus_mb=-1.0, out_dir=str(tmp_path / 'out'))
    with pytest.raises(ValueError, match='no package folders with .py files'):
        prep.prepare(corpus='packages', roots=dict(empty=str(tmp_path)), out_dir=str(tmp_path / 'out'))
