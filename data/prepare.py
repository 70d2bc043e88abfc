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
Pythia's tokenizer, a copy of tokenizer.json. Each shard is a 1024-byte header and the tokens:

    offset  type       field
    0       int32      magic 240319928 (the paper's arXiv id 2403.19928)
    4       int32      version 1
    8       int32      vocab_size of the tokenizer (every id is below it)
    12      int32      bytes per token: 2 (uint16) when vocab_size <= 65536, else 4 (uint32)
    16      int64      number of tokens after the header
    24      char[64]   tokenizer identity, ASCII, NUL-padded ('bytes' or 'pythia-<hash of its vocab>')
    88..1023           zeros
    1024    uint16/32  the tokens

All little-endian. Files are written whole to a temporary name and renamed, and prepare.json is
written last, so an interrupted run leaves no corrupt shard, and train.py refuses a folder that
has no prepare.json. Memory stays flat on inputs of any size: lines are read as a stream, at most a
few batches are in flight to the worker processes, and tokens are held only until a shard is full.
"""

import ast
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
from dijiang import Tokenizer, atomic_write, write_text  # noqa: E402

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

MAGIC = 240319928
VERSION = 1
HEADER_BYTES = 1024
HEADER = np.dtype([('magic', '<i4'), ('version', '<i4'), ('vocab_size', '<i4'), ('token_bytes', '<i4'),
                   ('num_tokens', '<i8'), ('tokenizer', 'S64'), ('zeros', 'V', HEADER_BYTES - 88)])
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
    atomic_write(path, lambda tmp: write_text(tmp, ''.join(json.dumps(doc) + '\n' for doc in docs)))
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


def token_dtype(vocab_size):
    return np.uint16 if vocab_size <= 2 ** 16 else np.uint32


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


def shard_header(num_tokens, vocab_size, identity):
    if len(identity.encode('ascii')) > 64:
        raise ValueError(f"tokenizer identity {identity!r} is longer than the 64 bytes the header holds")
    header = np.zeros((), dtype=HEADER)
    header['magic'], header['version'], header['vocab_size'] = MAGIC, VERSION, vocab_size
    header['token_bytes'], header['num_tokens'] = np.dtype(token_dtype(vocab_size)).itemsize, num_tokens
    header['tokenizer'] = identity.encode('ascii')
    return header.tobytes()


def write_shard(path, tokens, vocab_size, identity):
    def write(tmp_path):
        with open(tmp_path, 'wb') as f:
            f.write(shard_header(len(tokens), vocab_size, identity))
            f.write(tokens.tobytes())
    atomic_write(path, write)


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
    atomic_write(os.path.join(out_dir, 'prepare.json'), lambda tmp: write_text(tmp, json.dumps(summary, indent=2) + '\n'))
    print(f"{documents} documents -> {writers['train'].total:,} train and {writers['val'].total:,} val tokens "
          f"({tok.identity}) in {out_dir}, {time.time() - start:.1f}s")
    return out_dir

# -----------------------------------------------------------------------------
# Reading shards back (used by train.py)


def read_header(path):
    """The header of a shard as a dict, checked against the file; ValueError names what is wrong."""
    with open(path, 'rb') as f:
        raw = f.read(HEADER_BYTES)
    if len(raw) < HEADER_BYTES or int(np.frombuffer(raw, '<i4', 1)[0]) != MAGIC:
        raise ValueError(f"{path} is not a token shard (wrong magic number): make it with data/prepare.py")
    header = np.frombuffer(raw, HEADER, 1)[0]
    if header['version'] != VERSION:
        raise ValueError(f"{path} is shard format version {header['version']}, this code reads version {VERSION}: "
                         "rerun data/prepare.py")
    info = dict(vocab_size=int(header['vocab_size']), token_bytes=int(header['token_bytes']),
                num_tokens=int(header['num_tokens']), tokenizer=header['tokenizer'].decode('ascii'))
    expected_size = HEADER_BYTES + info['num_tokens'] * info['token_bytes']
    if os.path.getsize(path) != expected_size:
        raise ValueError(f"{path} has {os.path.getsize(path)} bytes, its header says {expected_size}: "
                         "the file is damaged; rerun data/prepare.py")
    return info


class Shards:
    """The shards of one split, memory-mapped and read as one stream of windows of block_size + 1
    tokens (inputs and their next-token targets). Window j of a shard starts at token j * block_size;
    windows do not cross shards, so each shard's last partial window is left out. Window indices
    run over all shards in order and wrap around at the end (the next epoch)."""

    def __init__(self, data_dir, split, block_size):
        if not os.path.isfile(os.path.join(data_dir, 'prepare.json')):
            raise ValueError(f"no prepared data in {data_dir} (no prepare.json; an interrupted run leaves none): "
                             f"run python data/prepare.py --out_dir={data_dir} ...")
        paths = sorted(glob.glob(os.path.join(data_dir, f'{split}_[0-9]*.bin')))  # val_0*.bin, not val_ood_0*.bin
        if not paths:
            raise ValueError(f"no {split}_*.bin shards in {data_dir}: rerun data/prepare.py")
        headers = [read_header(path) for path in paths]
        for path, header in zip(paths, headers):
            if (header['tokenizer'], header['vocab_size']) != (headers[0]['tokenizer'], headers[0]['vocab_size']):
                raise ValueError(f"{path} was made with tokenizer {header['tokenizer']}, {paths[0]} with "
                                 f"{headers[0]['tokenizer']}: rerun data/prepare.py into an empty folder")
        self.data_dir, self.split, self.block_size = data_dir, split, block_size
        self.tokenizer, self.vocab_size = headers[0]['tokenizer'], headers[0]['vocab_size']
        self.num_tokens = sum(h['num_tokens'] for h in headers)
        dtype = token_dtype(self.vocab_size)
        self.tokens = [np.memmap(path, dtype=dtype, mode='r', offset=HEADER_BYTES, shape=(h['num_tokens'],))
                       for path, h in zip(paths, headers)]
        windows = [max(0, (len(t) - 1) // block_size) for t in self.tokens]
        self.first_window = np.cumsum([0] + windows)  # window index where each shard starts
        self.num_windows = int(self.first_window[-1])
        if self.num_windows == 0:
            raise ValueError(f"the {split} split of {data_dir} has {self.num_tokens} tokens, fewer than "
                             f"block_size + 1 = {block_size + 1}: use more data or a smaller block_size")

    def check_tokenizer(self, tokenizer, vocab_size, fix):
        """Refuse shards the model cannot read: another tokenizer (when known) or ids past its vocab."""
        if tokenizer is not None and tokenizer != self.tokenizer:
            raise ValueError(f"{self.data_dir} was tokenized with {self.tokenizer}, the model uses {tokenizer}: {fix}")
        if self.vocab_size > vocab_size:
            raise ValueError(f"{self.data_dir} holds token ids up to {self.vocab_size - 1}, the model's vocab_size "
                             f"is {vocab_size}: {fix}")

    def windows(self, start, count):
        """Windows start .. start + count - 1 (mod the number of windows) as int64 (count, block_size + 1)."""
        out = np.empty((count, self.block_size + 1), dtype=np.int64)
        for i in range(count):
            window = (start + i) % self.num_windows
            shard = int(np.searchsorted(self.first_window, window, side='right')) - 1
            offset = (window - int(self.first_window[shard])) * self.block_size
            out[i] = self.tokens[shard][offset:offset + self.block_size + 1]
        return out

# -----------------------------------------------------------------------------


def parse_settings(argv, settings, help_text):
    """The --name=value overrides in argv, as a dict, checked against settings (name -> default).
    Values are Python literals (1e-3, True, (0.9, 0.95)) of the default's type; a string setting takes
    the text as written.
    --help prints help_text and exits. train.py uses this parser too."""
    overrides = {}
    for arg in argv:
        if arg in ('-h', '--help'):
            print(help_text)
            sys.exit(0)
        name, eq, text = arg.removeprefix('--').partition('=')
        if not arg.startswith('--') or not eq or name not in settings:
            raise SystemExit(f"error: unknown argument {arg!r}: use --name=value with a name from --help")
        try:  # a string setting takes the text as written: --start=42 is the text '42'
            value = text if isinstance(settings[name], str) else ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        if isinstance(settings[name], float) and isinstance(value, (int, str)):
            try:
                value = float(value)  # also 'inf' and 'nan'
            except ValueError:
                pass
        if type(value) is not type(settings[name]):
            raise SystemExit(f"error: --{name}={text}: expected a value like {settings[name]!r} ({type(settings[name]).__name__})")
        overrides[name] = value
    return overrides


def settings_help(path):
    """The usage: this file's settings block, verbatim, defaults and comments included."""
    with open(path) as f:
        block = f.read().split('# settings:')[1].split('# ----')[0]
    return f"usage: python {os.path.relpath(path)} [--name=value ...]\n\n# settings:{block.rstrip()}"


if __name__ == '__main__':
    settings = dict(input=input, tokenizer=tokenizer, out_dir=out_dir, shard_tokens=shard_tokens,
                    val_every=val_every, num_workers=num_workers, corpus_mb=corpus_mb)
    try:
        prepare(**{**settings, **parse_settings(sys.argv[1:], settings, settings_help(__file__))})
    except ValueError as e:
        raise SystemExit(f"error: {e}")
