"""
Turn Pile-format text into the token shards that train.py reads.

    python data/prepare.py --input=00.jsonl.zst --tokenizer=data/pythia-tokenizer.json   # into data/00-pythia
    python data/prepare.py --input=my_docs/ --tokenizer=bytes --ood_input=other.jsonl
    python data/prepare.py --help                 # every setting and its default

The built-in corpora have their own scripts, which write a corpus and then tokenize it with this one:
data/stdlib/prepare.py (the demo's) and data/packages/prepare.py (installed packages' sources).

Input: JSON lines with a "text" field, as the Pile ships them: .jsonl, .jsonl.zst (needs the
`zstandard` package) or .json, one file or a folder of them. A second input, ood_input, is held out
whole as a third split, val_ood (out of distribution).

Output, in out_dir: train_000000.bin, train_000001.bin, ..., val_000000.bin, ... (and val_ood_*.bin)
of shard_tokens tokens each, the last one shorter (the format is in shards.py), every document
followed by <|endoftext|> (as Pythia's data), every val_every-th document in val; for Pythia's
tokenizer a copy of its tokenizer.json; and, last, prepare.json: what was made, from what, and so
which files are the dataset's.

Nothing is lost. A run builds the dataset in out_dir + '.tmp' and swaps it in only once it is whole,
prepare.json last: bad input found halfway, a full disk, a crash, Ctrl-C or SIGTERM leave the
dataset in out_dir as it was (and train.py refuses a folder without prepare.json). The swap deletes
only the files the old prepare.json lists. A folder that holds anything else is refused, unless
--overwrite=True: then those files stay as they are, beside the new dataset (but never one named as a
dataset's file, such as a shard, which train.py would read with it). A run killed outright leaves
out_dir + '.tmp', which the next run removes when it holds nothing but a dataset's files.

Memory stays flat on inputs of any size: lines are read as a stream, a few batches at most are in
flight to the worker processes, and tokens are held only until a shard is full. The workers die with
the run, quietly, however it ends.
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repo's, for its modules
sys.path.insert(0, ROOT)
import configurator  # noqa: E402
import signals  # noqa: E402

if __name__ == '__main__':  # imported, the signals are the importing script's
    signals.stop_on_signals()

import collections  # noqa: E402
import contextlib  # noqa: E402
import glob  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from atomic import atomic_write, atomic_write_text, interrupts_deferred, remove_leftover_dir  # noqa: E402
from shards import token_dtype, write_shard  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

# -----------------------------------------------------------------------------
# settings: each can be overridden as --name=value
input = ''  # a .jsonl, .jsonl.zst or .json file of JSON lines with a "text" field, or a folder of them
tokenizer = ''  # Pythia's tokenizer.json, a convert.py output dir holding one, or 'bytes' (byte-level)
out_dir = ''  # '' means data/<input name>-<bytes|pythia>, e.g. data/00-pythia
ood_input = ''  # a second input, held out whole as the val_ood split; '' for none
shard_tokens = 100_000_000  # tokens per shard file (200 MB in uint16)
val_every = 50  # every val_every-th document goes to the val split
num_workers = 0  # tokenizer processes; 0 means one per CPU core
overwrite = False  # True: write into an out_dir that holds files other than its dataset's; they stay as they are
# -----------------------------------------------------------------------------

BATCH_BYTES = 1 << 20  # about 1 MB of JSON lines per task sent to a worker
INPUT_SUFFIXES = ('.jsonl', '.jsonl.zst', '.json')
SPLITS = ('train', 'val', 'val_ood')
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}  # Ctrl-C and SIGTERM: they stop a run
DATASET_FILE = re.compile(r'(train|val|val_ood)_\d+\.bin|tokenizer\.json|prepare\.json')  # the names this script writes
status = 'the files written before this run are as they were'  # what a run stopped now keeps; prepare() updates it


def kept():
    """For configurator.run: what the one line of a run that stopped says is kept."""
    return status


def settings(script, changes):
    """The settings of a script (its globals, as its settings block names them) with changes (name=value,
    as --name=value gives them) applied, as a namespace: what prepare() and the builders' build() read."""
    names = configurator.settings_block(script['__file__'])[1]
    if unknown := changes.keys() - set(names):
        raise TypeError(f"{', '.join(sorted(unknown))}: not settings of {os.path.relpath(script['__file__'], ROOT)}")
    return types.SimpleNamespace(**{name: script[name] for name in names} | changes)


# -----------------------------------------------------------------------------
# Reading the input as a stream of batches of JSON lines


def input_files(path):
    if os.path.isdir(path):
        files = sorted(p for p in glob.glob(os.path.join(path, '**', '*'), recursive=True)
                       if p.endswith(INPUT_SUFFIXES))
        if not files:
            raise ValueError(f"no {', '.join(INPUT_SUFFIXES)} files in {path}: point --input at Pile-format JSON lines")
        return files
    if not os.path.isfile(path):
        raise ValueError(f"no such file or folder: {path}")
    if not path.endswith(INPUT_SUFFIXES):
        raise ValueError(f"{path}: expected a {', '.join(INPUT_SUFFIXES)} file of JSON lines with a 'text' field")
    return [path]


def open_lines(path):
    """The file as binary lines; .zst is decompressed as a stream. Returns (lines, raw file) so the
    caller can see how far into the file on disk the reading is."""
    raw = open(path, 'rb')
    if not path.endswith('.zst'):
        return raw, raw
    try:
        import zstandard
    except ImportError:
        raw.close()
        raise ValueError(f"reading {path} needs the zstandard package: pip install zstandard") from None
    # the Pile's files were compressed with a long window; allow the largest one zstd supports
    stream = zstandard.ZstdDecompressor(max_window_size=2 ** 31).stream_reader(raw)
    return io.BufferedReader(stream, buffer_size=1 << 20), raw


def read_batches(files):
    """Yield (path, first line number, index of its first document, JSON lines, input bytes read so
    far) with about BATCH_BYTES of lines each. Blank lines are skipped; documents are numbered in order."""
    doc_index, bytes_done = 0, 0
    for path in files:
        lines, raw = open_lines(path)
        with raw:
            batch, batch_bytes, first_line = [], 0, 1
            try:  # the consumer's exceptions never reach a generator: this catches the file's alone
                for line_number, line in enumerate(lines, start=1):
                    if line.strip():
                        if not batch:
                            first_line = line_number
                        batch.append(line)
                        batch_bytes += len(line)
                    if batch_bytes >= BATCH_BYTES:
                        yield path, first_line, doc_index, batch, bytes_done + raw.tell()
                        doc_index, batch, batch_bytes = doc_index + len(batch), [], 0
            except Exception as e:  # OSError, or zstandard's ZstdError on a damaged .zst
                raise ValueError(f"{path}: cannot be read past line {first_line + len(batch)} ({e}): "
                                 "the file is damaged; fetch it again") from None
            if batch:
                yield path, first_line, doc_index, batch, bytes_done + raw.tell()
                doc_index += len(batch)
            bytes_done += os.path.getsize(path)

# -----------------------------------------------------------------------------
# Tokenizing, in worker processes


def tokenizer_json(spec):
    """The tokenizer.json that spec names (a file, or a folder holding one); None for 'bytes'."""
    if spec == 'bytes':
        return None
    path = os.path.join(spec, 'tokenizer.json') if os.path.isdir(spec) else spec
    configurator.check(os.path.isfile(path), 'tokenizer', spec, "no tokenizer there: pass Pythia's tokenizer.json "
                       "(data/pythia-tokenizer.json), a convert.py output dir holding one, or --tokenizer=bytes")
    return path


def load_tokenizer(spec):
    path = tokenizer_json(spec)
    return Tokenizer.from_file(path) if path else Tokenizer.bytes()


def tokenize_batch(tok, task):
    """A batch of JSON lines -> (train tokens, val tokens, documents, input bytes read so far).
    Each document is followed by <|endoftext|>; document i goes to val when i % val_every == 0."""
    (path, first_line, first_doc, lines, bytes_read), val_every = task
    texts = []
    for number, line in enumerate(lines, start=first_line):
        try:
            line = line.decode('utf-8-sig')
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}, line {number}: not UTF-8 (byte {e.start} of the line is 0x{line[e.start]:02x}): "
                             "JSON lines are UTF-8; convert the file, e.g. with iconv -t utf-8") from None
        try:
            text = json.loads(line)['text']
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{path}, line {number}: not a JSON object with a 'text' field "
                             "(Pile format is one such object per line)") from None
        if not isinstance(text, str):
            raise ValueError(f"{path}, line {number}: its 'text' is {json.dumps(text)[:40]}, not a "
                             'string: each line needs {"text": "..."}')
        texts.append(text)
    dtype = token_dtype(tok.vocab_size)
    splits = ([], [])
    for i, ids in enumerate(tok.encode_batch(texts)):
        is_val = (first_doc + i) % val_every == 0
        splits[is_val].append(np.array(ids + [tok.eot_token], dtype=dtype))
    train, val = (np.concatenate(parts) if parts else np.empty(0, dtype) for parts in splits)
    return train, val, len(texts), bytes_read


def exit_when_orphaned(parent):
    while os.getppid() == parent:
        time.sleep(0.2)
    os._exit(1)


def work(pipe, spec, parent):
    """A worker process: tokenize each batch that comes down pipe and send back its tokens, or the
    ValueError of a bad line, which the parent raises."""
    # Ctrl-C reaches every process of the terminal's group: only the parent answers it. It stops the
    # workers with SIGTERM, which must end one at once and quietly (the handler inherited from the
    # parent would raise in the middle of a batch, and the worker would print its traceback).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # A parent killed outright (kill -9) stops nothing. A worker sending its tokens then dies of
    # SIGPIPE (Python ignores SIGPIPE, and would print the BrokenPipeError); one that waits for its
    # next batch finds itself orphaned and exits.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    threading.Thread(target=exit_when_orphaned, args=(parent,), daemon=True).start()
    tok = load_tokenizer(spec)
    while True:
        try:
            task = pipe.recv()
        except EOFError:  # the parent is gone
            return
        try:
            pipe.send(tokenize_batch(tok, task))
        except ValueError as e:
            pipe.send(e)


@contextlib.contextmanager
def workers(spec, count):
    """count worker processes, as (process, pipe) pairs, stopped when the block ends, however it ends.
    Each has a pipe of its own: a worker killed (by the group's SIGTERM, or for memory) holds no lock
    that the others or the parent wait for, as those of multiprocessing.Pool can."""
    started = []
    try:
        # Ctrl-C and SIGTERM wait (blocked) while the workers are forked: one that came in the middle
        # of a fork would be taken inside a fork handler, where Python prints the exception and goes
        # on; and a new worker keeps them blocked, so that none is lost, till it has its own handlers
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            for _ in range(count):
                pipe, their_end = multiprocessing.Pipe()
                process = multiprocessing.Process(target=work, args=(their_end, spec, os.getpid()), daemon=True)
                process.start()
                their_end.close()
                started.append((process, pipe))
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        yield started
    finally:
        for process, _ in started:
            process.terminate()
        for process, _ in started:
            process.join()


def receive(worker):
    process, pipe = worker
    try:
        result = pipe.recv()
    except EOFError:  # it died
        process.join()
        if process.exitcode == -signal.SIGTERM:  # sent to the whole group, say, as Slurm does: the run stops too
            raise signals.Interrupted(signal.SIGTERM) from None
        raise ValueError(f"a tokenizer process died (exit status {process.exitcode}; -9 is what the system's "
                         "out-of-memory killer leaves): run again, with fewer --num_workers if memory is short") \
            from None
    if isinstance(result, ValueError):
        raise result
    return result


def tokenize_in_order(workers, tasks):
    """The workers' results for tasks, in order. Task i goes to worker i % len(workers), once that one
    has sent back the result of the task before: a batch is read from the input only when a worker is
    free for it, so memory stays flat."""
    sent = 0
    for task in tasks:
        worker = workers[sent % len(workers)]
        if sent >= len(workers):
            yield receive(worker)
        worker[1].send(task)
        sent += 1
    for i in range(max(0, sent - len(workers)), sent):
        yield receive(workers[i % len(workers)])

# -----------------------------------------------------------------------------
# Writing shards


class ShardWriter:
    """Collects tokens of one split and writes a shard each time shard_tokens are in hand."""

    def __init__(self, out_dir, split, shard_tokens, vocab_size, identity):
        self.out_dir, self.split, self.shard_tokens = out_dir, split, shard_tokens
        self.vocab_size, self.identity = vocab_size, identity
        self.pieces, self.held, self.shards, self.total = [], 0, [], 0

    def add(self, tokens):
        self.pieces.append(tokens)
        self.held += len(tokens)
        while self.held >= self.shard_tokens:
            held = np.concatenate(self.pieces)
            self.write(held[:self.shard_tokens])
            # a copy, so the full array is freed rather than kept alive by a view of its tail
            self.pieces, self.held = [held[self.shard_tokens:].copy()], len(held) - self.shard_tokens

    def close(self):
        if self.held:
            self.write(np.concatenate(self.pieces))
        self.pieces, self.held = [], 0

    def write(self, tokens):
        name = f"{self.split}_{len(self.shards):06d}.bin"
        write_shard(os.path.join(self.out_dir, name), tokens, self.vocab_size, self.identity)
        self.shards.append(dict(file=name, tokens=len(tokens)))
        self.total += len(tokens)


# JSON lines files to tokenize, and where their documents go: document i (counted from the first file's
# first line) to split val when i % val_every == 0, else to split train
Stream = collections.namedtuple('Stream', 'files val_every train val')


def tokenize(streams, spec, tok, build_dir, shard_tokens, num_workers, out_dir):
    """Tokenize the streams into shards in build_dir. Returns (documents, the ShardWriters by split)."""
    splits = dict.fromkeys(split for stream in streams for split in (stream.train, stream.val))
    writers = {split: ShardWriter(build_dir, split, shard_tokens, tok.vocab_size, tok.identity) for split in splits}
    documents = 0
    total_bytes = sum(os.path.getsize(path) for stream in streams for path in stream.files)
    # the progress bar shows on a terminal only (not in a log), and a run that fails takes it away, so
    # that its error is the one line left on stderr
    with workers(spec, num_workers) as pool, tqdm(total=total_bytes, unit='B', unit_scale=True,
                                                 desc=f"tokenizing into {out_dir}", disable=None) as progress:
        try:
            for stream in streams:
                bytes_before = progress.n  # of the streams before this one
                tasks = ((batch, stream.val_every) for batch in read_batches(stream.files))
                for train, val, count, bytes_read in tokenize_in_order(pool, tasks):
                    writers[stream.train].add(train)
                    writers[stream.val].add(val)
                    documents += count
                    progress.update(bytes_before + bytes_read - progress.n)
        except BaseException:
            progress.leave = False
            raise
    for writer in writers.values():
        writer.close()
    return documents, writers

# -----------------------------------------------------------------------------
# The output folder: what is the dataset's, and swapping the new one in


def dataset_files(folder):
    """The files of the dataset in folder, as its prepare.json lists them (none without one)."""
    path = os.path.join(folder, 'prepare.json')
    if not os.path.isfile(path):
        return set()
    try:
        with open(path, encoding='utf-8') as f:
            summary = json.load(f)
        shards = {shard['file'] for split in SPLITS if split in summary for shard in summary[split]['shards']}
        return shards | {'prepare.json'} | ({'tokenizer.json'} if summary['tokenizer'] != 'bytes' else set())
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a prepare.json of data/prepare.py ({type(e).__name__}: {e}): this folder "
                         "holds something else; pick another --out_dir") from None


def files_to_replace(out_dir, overwrite):
    """The old dataset's files in out_dir, prepare.json first: what the new dataset replaces. Any other
    file there is refused (ValueError) unless overwrite, and even then one named as a dataset's file
    (train.py would read such a shard with the new dataset; a tokenizer.json would be replaced)."""
    if not os.path.lexists(out_dir):
        return []
    names = set(os.listdir(out_dir))  # a file where the folder should be: an OSError naming it
    ours = dataset_files(out_dir) & names
    others = sorted(name for name in names - ours if not overwrite or DATASET_FILE.fullmatch(name))
    if others:
        fix = 'move it away' if DATASET_FILE.fullmatch(others[0]) else \
            'move it away, or pass --overwrite=True to keep it there beside the new dataset'
        raise ValueError(f"{out_dir} holds {others[0]}, which data/prepare.py did not write (no prepare.json there "
                         f"lists it): {fix}, or pick another --out_dir")
    return sorted(ours, key=lambda name: name != 'prepare.json')


def swap_in(build_dir, out_dir, old_files):
    """Replace the old dataset's files in out_dir by the new ones in build_dir: the old prepare.json goes
    first (the folder reads as unfinished meanwhile), the new one comes last. A Ctrl-C waits till it is done."""
    os.makedirs(out_dir, exist_ok=True)
    with interrupts_deferred():
        for name in old_files:
            os.remove(os.path.join(out_dir, name))
        for name in sorted(os.listdir(build_dir), key=lambda name: name == 'prepare.json'):
            os.replace(os.path.join(build_dir, name), os.path.join(out_dir, name))


def prepare(record=None, documents=None, ood_documents=None, **changes):
    """Tokenize input into out_dir, with the settings above changed by changes (name=value). A corpus
    builder adds what prepare.json should say of the corpus (record) and, where it knows them, the
    documents of input and of ood_input, as (name, bytes) in input order: prepare.json then lists each
    split's files, so anyone can check that none is in two. Returns out_dir. Bad input or settings
    raise ValueError."""
    global status
    s = settings(globals(), changes)
    configurator.check(s.input, 'input', s.input, "give the JSON lines to tokenize, a file or a folder (the built-in "
                       "corpora: python data/stdlib/prepare.py or data/packages/prepare.py)")
    configurator.check(s.tokenizer, 'tokenizer', s.tokenizer, "give Pythia's tokenizer.json "
                       "(data/pythia-tokenizer.json), a convert.py output dir holding one, or bytes")
    configurator.check(s.val_every >= 2, 'val_every', s.val_every, 'give 2 or more (with 1, train would be empty)')
    configurator.check(s.shard_tokens >= 1, 'shard_tokens', s.shard_tokens, 'give 1 or more')
    configurator.check(s.num_workers >= 0, 'num_workers', s.num_workers, 'give 1 or more, or 0 for one per CPU core')
    streams = [Stream(input_files(s.input), s.val_every, 'train', 'val')]
    if s.ood_input:  # every document of it goes to val_ood: with val_every 1, each one is "the val_every-th"
        streams.append(Stream(input_files(s.ood_input), 1, 'val_ood', 'val_ood'))
    files = [path for stream in streams for path in stream.files]
    tok = load_tokenizer(s.tokenizer)
    out_dir = s.out_dir or os.path.join('data', f"{os.path.basename(os.path.normpath(s.input)).split('.')[0]}-"
                                                f"{tok.identity.split('-')[0]}")
    old_files = files_to_replace(out_dir, s.overwrite)
    build_dir = os.path.normpath(out_dir) + '.tmp'
    remove_leftover_dir(build_dir, lambda name: DATASET_FILE.fullmatch(name.removesuffix('.tmp')))
    os.makedirs(build_dir)
    status = (f"{out_dir} is as it was ({'its dataset kept' if old_files else 'no dataset written'}); "
              "run the same command again")
    start = time.time()
    try:
        count, writers = tokenize(streams, s.tokenizer, tok, build_dir, s.shard_tokens,
                                  s.num_workers or os.cpu_count(), out_dir)
        if count == 0:
            raise ValueError(f"{', '.join(files)}: no documents (the input is empty, or blank lines only): "
                             "point --input at JSON lines with a 'text' field")
        if writers['train'].total == 0:
            raise ValueError(f"{', '.join(files)}: all {count} document(s) went to val (every {s.val_every}th "
                             "does), so train would be empty: use more documents")
        if source := tokenizer_json(s.tokenizer):  # train.py copies it next to the checkpoints it writes
            atomic_write(os.path.join(build_dir, 'tokenizer.json'), lambda tmp: shutil.copyfile(source, tmp))
        splits = {split: dict(tokens=w.total, shards=w.shards) for split, w in writers.items()}
        if documents is not None:  # each split's files, by tokenize_batch's rule
            by_split = dict(train=[doc for i, doc in enumerate(documents) if i % s.val_every],
                            val=documents[::s.val_every], val_ood=ood_documents or [])
            for split in splits:
                docs = by_split[split]
                splits[split].update(bytes=sum(size for _, size in docs), files=[name for name, _ in docs])
        summary = dict(input=[os.path.abspath(path) for path in files], **(record or {}), tokenizer=tok.identity,
                       vocab_size=tok.vocab_size, eot_token=tok.eot_token, documents=count, val_every=s.val_every,
                       **splits, seconds=round(time.time() - start, 1), date=time.strftime('%Y-%m-%d %H:%M:%S'))
        atomic_write_text(os.path.join(build_dir, 'prepare.json'), json.dumps(summary, indent=2) + '\n')
        swap_in(build_dir, out_dir, old_files)
        status = f"{out_dir} holds the new dataset, finished just before"
    finally:
        shutil.rmtree(build_dir, ignore_errors=True)
    tokens = ' and '.join(f"{w.total:,} {split}" for split, w in writers.items())
    print(f"{count} documents -> {tokens} tokens ({tok.identity}) in {out_dir}, {time.time() - start:.1f}s")
    return out_dir


def main():
    prepare()


if __name__ == '__main__':
    configurator.run(main, kept=kept)
