"""
Turn Pile-format text into the token shards that train.py reads.

    python data/prepare.py                       # the default corpus (below), byte-level tokens
    python data/prepare.py --input=00.jsonl.zst --tokenizer=path/to/tokenizer.json
    python data/prepare.py --help                # every setting and its default

Input: JSON lines with a "text" field, as the Pile ships them: .jsonl, .jsonl.zst (needs the
`zstandard` package) or .json, one file or a folder of them. With no input, it builds the default
corpus: a few MB of text that every Python installation carries (the pydoc help topics and stdlib
module sources with their docstrings), written as data/stdlib/stdlib.jsonl with a "meta" field on
each line saying where the text came from. That corpus is tokenized byte-level, so the whole demo
runs offline on a fresh machine; Pythia's tokenizer.json comes only with a Pythia download.

Output, in out_dir: train_000000.bin, train_000001.bin, ... and val_000000.bin, ... of shard_tokens
tokens each (the last one shorter), every document followed by <|endoftext|> (as Pythia's data);
every val_every-th document goes to val. Then prepare.json (what was made, from what) and, for
Pythia's tokenizer, a copy of tokenizer.json. The shard format is in shards.py. Files are written
whole to a temporary name and renamed, and prepare.json is written last, so an interrupted run
leaves no corrupt shard, and train.py refuses a folder that has no prepare.json. Memory stays flat on inputs of any size: lines are read as a stream, at most a
few batches are in flight to the worker processes, and tokens are held only until a shard is full.
"""

import glob
import io
import json
import multiprocessing
import os
import platform
import random
import sys
import sysconfig
import threading
import time

import numpy as np
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root, for dijiang
from atomic import atomic_write, atomic_write_text  # noqa: E402
from configurator import parse_settings, settings_help  # noqa: E402
from shards import token_dtype, write_shard  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

# -----------------------------------------------------------------------------
# settings: each can be overridden as --name=value
input = ''  # a .jsonl, .jsonl.zst or .json file, or a folder of them; '' builds the default corpus
tokenizer = ''  # Pythia's tokenizer.json, a convert.py output dir holding one, or 'bytes'; '' = 'bytes' for the default corpus
out_dir = ''  # '' means data/<input name>-<bytes|pythia>, e.g. data/stdlib-bytes
shard_tokens = 100_000_000  # tokens per shard file (200 MB in uint16)
val_every = 50  # every val_every-th document goes to the val split
num_workers = os.cpu_count()  # tokenizer processes
corpus_mb = 4.0  # size of the default corpus, in MB of text
# -----------------------------------------------------------------------------

BATCH_BYTES = 1 << 20  # about 1 MB of JSON lines per task sent to a worker
DEFAULT_CORPUS = os.path.join('data', 'stdlib', 'stdlib.jsonl')
INPUT_SUFFIXES = ('.jsonl', '.jsonl.zst', '.json')

# -----------------------------------------------------------------------------
# The default corpus


def build_default_corpus(path, max_bytes):
    """Write a Pile-format JSON lines file of text shipped with Python: all pydoc help topics, then
    stdlib modules (no tests) in a seeded random order until max_bytes. Documents are shuffled so the
    train split mixes prose and code from its first step. Returns the number of documents."""
    from pydoc_data.topics import topics  # the language reference, as `help('topic')` shows it
    label = dict(pile_set_name=f'Python {platform.python_version()} stdlib (dijiang default corpus)')
    docs = [dict(text=text, meta=dict(label, source=f'pydoc_data.topics[{name!r}]'))
            for name, text in sorted(topics.items())]
    stdlib = sysconfig.get_paths()['stdlib']
    skip = ('site-packages', 'test', 'tests', 'idle_test', 'pydoc_data', '__pycache__')
    modules = sorted(p for p in glob.glob(os.path.join(stdlib, '**', '*.py'), recursive=True)
                     if not set(os.path.relpath(p, stdlib).split(os.sep)[:-1]) & set(skip))
    random.Random(0).shuffle(modules)
    size = sum(len(doc['text']) for doc in docs)
    for module in modules:
        if size >= max_bytes:
            break
        with open(module, encoding='utf-8', errors='replace') as f:
            text = f.read()
        docs.append(dict(text=text, meta=dict(label, source=f'Lib/{os.path.relpath(module, stdlib)}')))
        size += len(text)
    random.Random(1).shuffle(docs)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write_text(path, ''.join(json.dumps(doc) + '\n' for doc in docs))
    return len(docs)


# -----------------------------------------------------------------------------
# Reading the input as a stream of batches of JSON lines


def input_files(path):
    if os.path.isdir(path):
        files = sorted(p for p in glob.glob(os.path.join(path, '**', '*'), recursive=True) if p.endswith(INPUT_SUFFIXES))
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
        raise SystemExit(f"error: reading {path} needs the zstandard package: pip install zstandard") from None
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
            for line_number, line in enumerate(lines, start=1):
                if line.strip():
                    if not batch:
                        first_line = line_number
                    batch.append(line)
                    batch_bytes += len(line)
                if batch_bytes >= BATCH_BYTES:
                    yield path, first_line, doc_index, batch, bytes_done + raw.tell()
                    doc_index, batch, batch_bytes = doc_index + len(batch), [], 0
            if batch:
                yield path, first_line, doc_index, batch, bytes_done + raw.tell()
                doc_index += len(batch)
            bytes_done += os.path.getsize(path)

# -----------------------------------------------------------------------------
# Tokenizing, in worker processes


def load_tokenizer(spec):
    """'bytes', a tokenizer.json path, or a folder holding tokenizer.json (a convert.py output)."""
    if spec == 'bytes':
        return Tokenizer.bytes()
    path = os.path.join(spec, 'tokenizer.json') if os.path.isdir(spec) else spec
    if not os.path.isfile(path):
        raise ValueError(f"no tokenizer at {path}: pass --tokenizer=path/to/tokenizer.json (from a Pythia "
                         "download or a convert.py output dir) or --tokenizer=bytes")
    try:
        return Tokenizer.from_file(path)
    except (KeyError, TypeError) as e:  # JSON of another shape
        raise ValueError(f"{path} is not a tokenizer.json of a GPT-NeoX byte-level BPE (Pythia's): {e!r}") from None


worker_tokenizer = None


def init_worker(spec):
    global worker_tokenizer
    worker_tokenizer = load_tokenizer(spec)


def tokenize_batch(task):
    """A batch of JSON lines -> (train tokens, val tokens, documents, input bytes read so far).
    Each document is followed by <|endoftext|>; document i goes to val when i % val_every == 0."""
    path, first_line, first_doc, lines, bytes_read, every = task
    texts = []
    for offset, line in enumerate(lines):
        try:
            texts.append(json.loads(line)['text'])
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{path}, line {first_line + offset}: not a JSON object with a 'text' field "
                             "(Pile format is one such object per line)") from None
    tok = worker_tokenizer
    dtype = token_dtype(tok.vocab_size)
    splits = ([], [])
    for i, ids in enumerate(tok.encode_batch(texts)):
        is_val = (first_doc + i) % every == 0
        splits[is_val].append(np.array(ids + [tok.eot_token], dtype=dtype))
    train, val = (np.concatenate(parts) if parts else np.empty(0, dtype) for parts in splits)
    return train, val, len(texts), bytes_read

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


def remove_old_output(out_dir):
    """A new run replaces everything an earlier run (finished or not) left here."""
    old = [os.path.join(out_dir, 'prepare.json'), os.path.join(out_dir, 'tokenizer.json')]
    old += glob.glob(os.path.join(out_dir, 'train_*.bin')) + glob.glob(os.path.join(out_dir, 'val_*.bin'))
    old += glob.glob(os.path.join(out_dir, '*.tmp*'))
    for path in old:
        if os.path.exists(path):
            os.remove(path)


def prepare(input='', tokenizer='', out_dir='', shard_tokens=shard_tokens, val_every=val_every,
            num_workers=num_workers, corpus_mb=corpus_mb):
    """Tokenize input (or the default corpus) into out_dir. Returns out_dir. Bad input raises ValueError."""
    if val_every < 2 or shard_tokens < 1 or num_workers < 1:
        raise ValueError(f"val_every={val_every}, shard_tokens={shard_tokens}, num_workers={num_workers}: "
                         "need val_every >= 2 and the others >= 1")
    if not input:
        print(f"building the default corpus (Python's pydoc topics and stdlib sources) in {DEFAULT_CORPUS}")
        documents = build_default_corpus(DEFAULT_CORPUS, int(corpus_mb * 1e6))
        print(f"{documents} documents, {os.path.getsize(DEFAULT_CORPUS) / 1e6:.1f} MB")
        input, tokenizer = DEFAULT_CORPUS, tokenizer or 'bytes'
    elif not tokenizer:
        raise ValueError("which tokenizer? pass --tokenizer=path/to/tokenizer.json (Pythia's, from a Pythia download "
                         "or a convert.py output dir) or --tokenizer=bytes")
    files = input_files(input)
    tok = load_tokenizer(tokenizer)
    if not out_dir:
        name = os.path.basename(os.path.normpath(input)).split('.')[0]
        out_dir = os.path.join('data', f"{name}-{tok.identity.split('-')[0]}")
    os.makedirs(out_dir, exist_ok=True)
    remove_old_output(out_dir)

    writers = {split: ShardWriter(out_dir, split, shard_tokens, tok.vocab_size, tok.identity) for split in ('train', 'val')}
    # Pool.imap would read the whole input ahead into its task queue; a semaphore keeps at most a few
    # batches in flight, taken when a batch is handed out and given back when its tokens are written.
    in_flight = threading.Semaphore(2 * num_workers)

    def tasks():
        for batch in read_batches(files):
            in_flight.acquire()
            yield *batch, val_every

    start, documents = time.time(), 0
    total_bytes = sum(os.path.getsize(path) for path in files)
    with multiprocessing.Pool(num_workers, initializer=init_worker, initargs=(tokenizer,)) as pool, \
            tqdm(total=total_bytes, unit='B', unit_scale=True, desc=f"tokenizing into {out_dir}") as progress:
        for train_tokens, val_tokens, batch_documents, bytes_read in pool.imap(tokenize_batch, tasks()):
            writers['train'].add(train_tokens)
            writers['val'].add(val_tokens)
            documents += batch_documents
            progress.update(bytes_read - progress.n)
            in_flight.release()
    for writer in writers.values():
        writer.close()

    if tokenizer != 'bytes':  # train.py copies it next to the checkpoints it writes
        tokenizer_json = os.path.join(tokenizer, 'tokenizer.json') if os.path.isdir(tokenizer) else tokenizer
        with open(tokenizer_json, 'rb') as f:
            content = f.read()
        atomic_write(os.path.join(out_dir, 'tokenizer.json'), lambda tmp: open(tmp, 'wb').write(content))
    summary = dict(input=[os.path.abspath(p) for p in files], tokenizer=tok.identity, vocab_size=tok.vocab_size,
                   eot_token=tok.eot_token, documents=documents, val_every=val_every,
                   **{split: dict(tokens=w.total, shards=w.shards) for split, w in writers.items()},
                   seconds=round(time.time() - start, 1), date=time.strftime('%Y-%m-%d %H:%M:%S'))
    atomic_write_text(os.path.join(out_dir, 'prepare.json'), json.dumps(summary, indent=2) + '\n')
    print(f"{documents} documents -> {writers['train'].total:,} train and {writers['val'].total:,} val tokens "
          f"({tok.identity}) in {out_dir}, {time.time() - start:.1f}s")
    return out_dir


if __name__ == '__main__':
    settings = dict(input=input, tokenizer=tokenizer, out_dir=out_dir, shard_tokens=shard_tokens,
                    val_every=val_every, num_workers=num_workers, corpus_mb=corpus_mb)
    try:
        prepare(**{**settings, **parse_settings(sys.argv[1:], settings, settings_help(__file__))})
    except ValueError as e:
        raise SystemExit(f"error: {e}")
