"""
Turn Pile-format text into the token shards that train.py reads.

    python data/prepare.py                       # the stdlib corpus (below), byte-level tokens
    python data/prepare.py --corpus=packages     # every installed package's sources, ~160 MB, one package held out
    python data/prepare.py --input=00.jsonl.zst --tokenizer=path/to/tokenizer.json
    python data/prepare.py --help                # every setting and its default

Input: JSON lines with a "text" field, as the Pile ships them: .jsonl, .jsonl.zst (needs the
`zstandard` package) or .json, one file or a folder of them. With no input, it builds a built-in
corpus from text that every Python installation carries, with a "meta" field on each line saying
where the text came from, chosen by --corpus:

    stdlib    (the default) a few MB of the stdlib's module sources (code only), written as
              data/stdlib/stdlib.jsonl.
    packages  about 160 MB, enough to train on without repeating: the .py files of every installed
              package and of the stdlib (no tests), and the pydoc help topics, one document per file,
              each text once (duplicates by sha256 are left out), in a seeded random order, written as
              data/packages/packages.jsonl. One top-level package (ood_package, networkx by default)
              is held out whole, as an out-of-distribution split: data/packages/ood.jsonl.

A built-in corpus is tokenized byte-level unless --tokenizer says otherwise, so the whole demo runs
offline on a fresh machine; Pythia's tokenizer.json comes only with a Pythia download.

Output, in out_dir: train_000000.bin, train_000001.bin, ... and val_000000.bin, ... of shard_tokens
tokens each (the last one shorter), every document followed by <|endoftext|> (as Pythia's data);
every val_every-th document goes to val. The packages corpus adds val_ood_000000.bin, ...: the
held-out package. Then prepare.json (what was made, from what; for a built-in corpus also each split's
files and bytes, so anyone can check that no file is in two splits) and, for Pythia's tokenizer, a copy
of tokenizer.json. The shard format is in shards.py. A run writes everything into out_dir + '.tmp'
first and swaps it in, prepare.json last, only once the whole dataset is there: bad input found
halfway, a crash or a Ctrl-C leaves the dataset already in out_dir as it was (and train.py refuses a
folder that has no prepare.json). Memory stays flat on inputs of any size: lines are
read as a stream, at most a few batches are in flight to the worker processes, and tokens are held
only until a shard is full; the packages corpus is written as its files are read, with only their
paths held.
"""

import collections
import glob
import hashlib
import io
import json
import multiprocessing
import os
import platform
import random
import shutil
import signal
import site
import sys
import sysconfig
import threading
import time

import numpy as np
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root, for dijiang
from atomic import atomic_write, atomic_write_text, remove_leftover_dir  # noqa: E402
from configurator import interrupted, interrupts_deferred, parse_settings, settings_help  # noqa: E402
from shards import token_dtype, write_shard  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

# -----------------------------------------------------------------------------
# settings: each can be overridden as --name=value
input = ''  # a .jsonl, .jsonl.zst or .json file, or a folder of them; '' builds the built-in corpus named by corpus
tokenizer = ''  # Pythia's tokenizer.json, a convert.py output dir holding one, or 'bytes'; '' = 'bytes' for a built-in corpus
out_dir = ''  # '' means data/<input name>-<bytes|pythia>, e.g. data/stdlib-bytes, data/packages-bytes
shard_tokens = 100_000_000  # tokens per shard file (200 MB in uint16)
val_every = 0  # every val_every-th document goes to the val split; 0: every 10th for the stdlib corpus (a few hundred
               # documents, so that val holds ~400K tokens), every 50th otherwise (the packages corpus, --input)
num_workers = os.cpu_count()  # tokenizer processes
corpus = 'stdlib'  # the built-in corpus: 'stdlib' (stdlib sources) or 'packages' (every installed .py file, pydoc topics)
corpus_mb = 0.0  # size of the built-in corpus, in MB of text; 0 means the corpus's own: 4 for stdlib, 160 for packages
ood_package = 'networkx'  # packages: this top-level package is held out whole as the val_ood split, in neither train nor val;
                          # if it is not installed, the largest one that fits whole in ood_mb (else the largest one)
ood_mb = 4.0  # packages: the most text the val_ood split holds, in MB
# -----------------------------------------------------------------------------

BATCH_BYTES = 1 << 20  # about 1 MB of JSON lines per task sent to a worker
DEFAULT_CORPUS = os.path.join('data', 'stdlib', 'stdlib.jsonl')
PACKAGES_CORPUS = os.path.join('data', 'packages', 'packages.jsonl')
OOD_CORPUS = os.path.join('data', 'packages', 'ood.jsonl')  # the held-out package
CORPUS_MB = dict(stdlib=4.0, packages=160.0)  # the built-in corpora and their sizes when corpus_mb is 0
INPUT_SUFFIXES = ('.jsonl', '.jsonl.zst', '.json')

# -----------------------------------------------------------------------------
# The built-in corpora

# folders whose .py files are left out: tests, caches, the topics' module (the topics come as text), and
# installed packages inside the stdlib (the packages corpus reads those from their own root)
SKIP_FOLDERS = ('site-packages', 'dist-packages', 'test', 'tests', 'idle_test', 'pydoc_data', '__pycache__')
TOPICS = 'pydoc_data.topics'  # the root name of the pydoc help topics in the packages corpus
# the tokenizers turn this text into their end-of-document token (as HF does): inside a file (tokenizer
# code spells it) it would cut the document in two, so the packages corpus leaves such files out
EOT_TEXT = '<|endoftext|>'


def build_default_corpus(path, max_bytes):
    """Write a Pile-format JSON lines file of the stdlib's module sources (no tests), in a seeded random
    order, until max_bytes. Code only: a small model trained on a few MB of it writes recognizable
    Python, where prose mixed in leaves it between the two. Returns the documents as (source, bytes
    of text), in the order written."""
    label = dict(pile_set_name=f'Python {platform.python_version()} stdlib (dijiang default corpus)')
    docs = []
    stdlib = sysconfig.get_paths()['stdlib']
    modules = sorted(p for p in glob.glob(os.path.join(stdlib, '**', '*.py'), recursive=True)
                     if not set(os.path.relpath(p, stdlib).split(os.sep)[:-1]) & set(SKIP_FOLDERS))
    random.Random(0).shuffle(modules)
    size = 0
    for module in modules:
        if size >= max_bytes:
            break
        with open(module, encoding='utf-8', errors='replace') as f:
            text = f.read()
        docs.append(dict(text=text, meta=dict(label, source=f'Lib/{os.path.relpath(module, stdlib)}')))
        size += len(text)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write_text(path, ''.join(json.dumps(doc) + '\n' for doc in docs))
    return [(doc['meta']['source'], len(doc['text'].encode('utf-8'))) for doc in docs]


def installed_roots():
    """The folders installed Python code is read from, by name: the stdlib ('Lib', as in the stdlib
    corpus) and every site-packages folder that exists (named by its folder, numbered when repeated)."""
    sites = site.getsitepackages() + [site.getusersitepackages()]
    roots = {}
    for name, folder in [('Lib', sysconfig.get_paths()['stdlib'])] + [(os.path.basename(f), f) for f in sites]:
        if os.path.isdir(folder) and os.path.realpath(folder) not in map(os.path.realpath, roots.values()):
            roots[f'{name}-{len(roots)}' if name in roots else name] = folder
    return roots


def python_files(roots):
    """Every .py file under roots, outside SKIP_FOLDERS and not a broken link, as (root name, path under it
    with '/'), sorted."""
    files = []
    for name, root in roots.items():
        for folder, subfolders, filenames in os.walk(root):
            subfolders[:] = [sub for sub in subfolders if sub not in SKIP_FOLDERS]
            under = os.path.relpath(folder, root).replace(os.sep, '/')
            files += [(name, filename if under == '.' else f'{under}/{filename}') for filename in filenames
                      if filename.endswith('.py') and os.path.isfile(os.path.join(folder, filename))]
    return sorted(files)


def top_level_package(path):
    """The folder at the top of a root that path is in ('networkx' for networkx/algorithms/dag.py);
    None for a module at the top (six.py) or a pydoc topic."""
    top, slash, _ = path.partition('/')
    return top if slash else None


def held_out_package(roots, files, wanted, max_bytes):
    """wanted if it is installed; else the largest top-level package (by .py bytes) that fits whole in
    max_bytes, so holding it out costs train no more than the ood split holds; else the largest one."""
    sizes = collections.Counter()
    for root, path in files:
        if package := top_level_package(path):
            sizes[package] += os.path.getsize(os.path.join(roots[root], path))
    if wanted in sizes:
        return wanted
    if not sizes:
        raise ValueError(f"no package folders with .py files under {', '.join(roots.values())}: "
                         "the packages corpus needs some installed packages; use --corpus=stdlib")
    fitting = [package for package in sizes if sizes[package] <= max_bytes] or list(sizes)
    return max(sorted(fitting), key=sizes.get)  # sorted first, so a tie goes to the first name


def write_documents(path, documents, roots, max_bytes, seen, left_out, label):
    """Stream the texts of documents ((root, path) pairs) to path as Pile-format JSON lines, in order,
    leaving out a text that would take those written past max_bytes (later, smaller ones may still fit),
    and counting in left_out: duplicates (the sha256 already in seen, which this adds to), files not
    UTF-8 (rare: a legacy coding cookie; decoded with errors='replace' they would teach the model
    replacement characters), and texts holding EOT_TEXT. Every file is read, one at a time, so the
    counts do not depend on max_bytes. Returns the documents written, as ('root/path', bytes)."""
    from pydoc_data.topics import topics
    written = []

    def write(tmp_path):
        size = 0
        with open(tmp_path, 'w', encoding='utf-8') as out:
            for root, name in documents:
                if root == TOPICS:
                    data = topics[name].encode('utf-8')
                else:
                    with open(os.path.join(roots[root], name), 'rb') as f:
                        data = f.read()
                digest = hashlib.sha256(data).digest()
                if digest in seen:
                    left_out['duplicates'] += 1
                    continue
                # seen even when left out below, so that no copy of it gets in either: the held-out
                # package's texts past ood_bytes stay out of train and val
                seen.add(digest)
                try:
                    text = data.decode('utf-8')
                except UnicodeDecodeError:
                    left_out['not_utf8'] += 1
                    continue
                if EOT_TEXT in text:
                    left_out['eot_text'] += 1
                    continue
                if size + len(data) > max_bytes:
                    continue
                out.write(json.dumps(dict(text=text, meta=dict(label, root=root, path=name))) + '\n')
                written.append((f'{root}/{name}', len(data)))
                size += len(data)

    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write(path, write)
    return written


def build_packages_corpus(path, ood_path, max_bytes, ood_package, ood_bytes, roots=None):
    """Write the packages corpus as Pile-format JSON lines: the .py files of the installed packages and
    the stdlib, and the pydoc help topics, one document per file, in a seeded random order (so train
    mixes packages from its first step), each text once, up to max_bytes, to path; the files of one
    top-level package (held_out_package's choice) go to ood_path instead, up to ood_bytes, and nowhere
    else. roots (name -> folder) replaces the installed folders and the topics (tests use it).
    Returns what prepare.json records: the roots, the held-out package, the documents of each file as
    ('root/path', bytes) in order, and how many files were left out, and why (write_documents)."""
    if roots is None:
        from pydoc_data.topics import topics
        roots = installed_roots()
        documents = python_files(roots) + [(TOPICS, name) for name in sorted(topics)]
    else:
        documents = python_files(roots)
    held_out = held_out_package(roots, documents, ood_package, ood_bytes)
    random.Random(0).shuffle(documents)
    label = dict(pile_set_name=f'Python {platform.python_version()} packages (dijiang packages corpus)')
    # the held-out package first, so where one of its texts is also elsewhere (a vendored copy), the
    # copy is the duplicate left out, and train and val never see that text
    seen, left_out = set(), dict(duplicates=0, not_utf8=0, eot_text=0)
    ood = write_documents(ood_path, [d for d in documents if top_level_package(d[1]) == held_out], roots, ood_bytes,
                          seen, left_out, label)
    main = write_documents(path, [d for d in documents if top_level_package(d[1]) != held_out], roots, max_bytes,
                           seen, left_out, label)
    return dict(roots=roots, held_out_package=held_out, left_out=left_out, documents=main, ood_documents=ood)


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
            numbered = enumerate(lines, start=1)
            while True:
                try:
                    line_number, line = next(numbered)
                except StopIteration:
                    break
                except Exception as e:  # OSError, or zstandard's ZstdError on a damaged .zst
                    raise ValueError(f"{path}: cannot be read past line {first_line + len(batch)} ({e}): "
                                     "the file is damaged; fetch it again") from None
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
    # Ctrl-C reaches every process of the terminal's group: the parent stops the pool, and a worker
    # that took it as KeyboardInterrupt would print a traceback of its own
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    worker_tokenizer = load_tokenizer(spec)


def tokenize_batch(task):
    """A batch of JSON lines -> (train tokens, val tokens, documents, input bytes read so far).
    Each document is followed by <|endoftext|>; document i goes to val when i % val_every == 0."""
    path, first_line, first_doc, lines, bytes_read, every = task
    texts = []
    for offset, line in enumerate(lines):
        try:
            text = json.loads(line)['text']
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{path}, line {first_line + offset}: not a JSON object with a 'text' field "
                             "(Pile format is one such object per line)") from None
        if not isinstance(text, str):
            raise ValueError(f"{path}, line {first_line + offset}: its 'text' is {json.dumps(text)[:40]}, not a "
                             'string: each line needs {"text": "..."}')
        texts.append(text)
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


def dataset_files(folder):
    """The files of a dataset in folder, prepare.json first (the folder reads as unfinished without it),
    and any temporary files a crashed write left."""
    files = [os.path.join(folder, 'prepare.json'), os.path.join(folder, 'tokenizer.json')]
    files += [path for split in ('train', 'val', 'val_ood') for path in sorted(glob.glob(os.path.join(folder, f'{split}_*.bin')))]
    files += sorted(glob.glob(os.path.join(folder, '*.tmp*')))
    return [path for path in dict.fromkeys(files) if os.path.isfile(path)]  # val_*.bin also matches val_ood_*.bin


def remove_unfinished(build_dir):
    """Remove what a run that was stopped (killed, or the machine went down) left in build_dir, the
    folder a run writes into before its dataset is swapped in: a dataset's files alone."""
    ours = {os.path.basename(path) for path in dataset_files(build_dir)} if os.path.isdir(build_dir) else set()
    remove_leftover_dir(build_dir, ours.__contains__, 'where this run builds its shards before they replace the old ones',
                        'data/prepare.py')


def swap_in(build_dir, out_dir):
    """Replace the dataset in out_dir by the finished one in build_dir: the old prepare.json goes first
    (the folder reads as unfinished meanwhile), then the old shards and tokenizer.json; the new files are
    renamed in with prepare.json last. Other files in out_dir stay; a Ctrl-C waits till this is done."""
    os.makedirs(out_dir, exist_ok=True)
    with interrupts_deferred():
        for path in dataset_files(out_dir):
            os.remove(path)
        for name in sorted(os.listdir(build_dir), key=lambda name: name == 'prepare.json'):
            os.replace(os.path.join(build_dir, name), os.path.join(out_dir, name))


def tokenize(streams, tok, tokenizer, build_dir, shard_tokens, num_workers, out_dir):
    """Tokenize the streams into shards in build_dir. Returns (documents, the ShardWriters by split, start time)."""
    splits = dict.fromkeys(split for stream in streams for split in (stream.train, stream.val))
    writers = {split: ShardWriter(build_dir, split, shard_tokens, tok.vocab_size, tok.identity) for split in splits}
    # Pool.imap would read the whole input ahead into its task queue; a semaphore keeps at most a few
    # batches in flight, taken when a batch is handed out and given back when its tokens are written.
    in_flight = threading.Semaphore(2 * num_workers)

    def tasks(stream):
        for batch in read_batches(stream.files):
            in_flight.acquire()
            yield *batch, stream.val_every

    start, documents = time.time(), 0
    files = [path for stream in streams for path in stream.files]
    total_bytes = sum(os.path.getsize(path) for path in files)
    # the progress bar shows on a terminal only (not in a log), and a run that fails takes it away, so
    # that its error is the one line left on stderr
    with multiprocessing.Pool(num_workers, initializer=init_worker, initargs=(tokenizer,)) as pool, \
            tqdm(total=total_bytes, unit='B', unit_scale=True, desc=f"tokenizing into {out_dir}", disable=None) as progress:
        try:
            for stream in streams:
                bytes_before = progress.n  # of the streams before this one
                for train_tokens, val_tokens, batch_documents, bytes_read in pool.imap(tokenize_batch, tasks(stream)):
                    writers[stream.train].add(train_tokens)
                    writers[stream.val].add(val_tokens)
                    documents += batch_documents
                    progress.update(bytes_before + bytes_read - progress.n)
                    in_flight.release()
        except BaseException:
            progress.leave = False
            raise
    for writer in writers.values():
        writer.close()
    return documents, writers, start


# JSON lines files to tokenize, and where their documents go: document i (counted from the first file's
# first line) to split val when i % val_every == 0, else to split train
Stream = collections.namedtuple('Stream', 'files val_every train val')


def build_corpus(corpus, corpus_mb, val_every, ood_package, ood_mb, roots):
    """Build the built-in corpus named corpus. Returns (the streams to tokenize, what prepare.json says
    about the corpus, each split's files as ('root/path', bytes) in order)."""
    if corpus not in CORPUS_MB:
        raise ValueError(f"corpus={corpus!r} is not a built-in corpus: use one of {', '.join(CORPUS_MB)}, or --input=...")
    if corpus_mb < 0 or ood_mb < 0:
        raise ValueError(f"corpus_mb={corpus_mb}, ood_mb={ood_mb}: sizes in MB cannot be negative (corpus_mb=0 "
                         "means the corpus's own size)")
    max_bytes = int((corpus_mb or CORPUS_MB[corpus]) * 1e6)
    if corpus == 'stdlib':
        print(f"building the stdlib corpus (the stdlib's module sources) in {DEFAULT_CORPUS}")
        documents = build_default_corpus(DEFAULT_CORPUS, max_bytes)
        print(f"{len(documents)} documents, {os.path.getsize(DEFAULT_CORPUS) / 1e6:.1f} MB")
        record, held_out = dict(corpus=corpus), {}
        streams = [Stream([DEFAULT_CORPUS], val_every, 'train', 'val')]
    else:
        print(f"building the packages corpus (installed packages' and stdlib .py files, pydoc topics) in "
              f"{os.path.dirname(PACKAGES_CORPUS)}")
        built = build_packages_corpus(PACKAGES_CORPUS, OOD_CORPUS, max_bytes, ood_package, int(ood_mb * 1e6), roots)
        documents, held_out, left_out = built.pop('documents'), dict(val_ood=built.pop('ood_documents')), built['left_out']
        print(f"{len(documents)} documents, {sum(size for _, size in documents) / 1e6:.1f} MB; {len(held_out['val_ood'])} "
              f"of {built['held_out_package']} held out, {sum(size for _, size in held_out['val_ood']) / 1e6:.1f} MB; "
              f"left out: {left_out['duplicates']} duplicates, {left_out['not_utf8']} not UTF-8, "
              f"{left_out['eot_text']} spelling {EOT_TEXT}")
        record = dict(corpus=corpus, **built)
        # every document of the held-out package goes to val_ood (with val_every 1, each one is "the val_every-th")
        streams = [Stream([PACKAGES_CORPUS], val_every, 'train', 'val'), Stream([OOD_CORPUS], 1, 'val_ood', 'val_ood')]
    split_files = dict(train=[doc for i, doc in enumerate(documents) if i % val_every], val=documents[::val_every],
                       **held_out)
    return streams, record, split_files


def prepare(input='', tokenizer='', out_dir='', shard_tokens=shard_tokens, val_every=val_every,
            num_workers=num_workers, corpus=corpus, corpus_mb=corpus_mb, ood_package=ood_package, ood_mb=ood_mb,
            roots=None):
    """Tokenize input (or a built-in corpus) into out_dir. Returns out_dir. Bad input raises ValueError.
    roots (name -> folder) builds the packages corpus from those folders instead of the installed ones."""
    val_every = val_every or (10 if not input and corpus == 'stdlib' else 50)
    for name, value, least in (('val_every', val_every, 2), ('shard_tokens', shard_tokens, 1),
                               ('num_workers', num_workers, 1)):
        if value < least:
            raise ValueError(f"{name}={value}: give {least} or more" + (" (0 picks the corpus's own)" if name == 'val_every' else ''))
    corpus_record, split_files = {}, {}  # of a built-in corpus
    if not input:
        streams, corpus_record, split_files = build_corpus(corpus, corpus_mb, val_every, ood_package, ood_mb, roots)
        input, tokenizer = streams[0].files[0], tokenizer or 'bytes'
    elif not tokenizer:
        raise ValueError("which tokenizer? pass --tokenizer=path/to/tokenizer.json (Pythia's, from a Pythia download "
                         "or a convert.py output dir) or --tokenizer=bytes")
    else:
        streams = [Stream(input_files(input), val_every, 'train', 'val')]
    tok = load_tokenizer(tokenizer)
    if not out_dir:
        name = os.path.basename(os.path.normpath(input)).split('.')[0]
        out_dir = os.path.join('data', f"{name}-{tok.identity.split('-')[0]}")
    # Everything is written to build_dir first and swapped in when whole: bad input found halfway, a
    # crash or a Ctrl-C leaves the dataset already in out_dir as it was (a crash also leaves build_dir,
    # which the next run removes)
    build_dir = os.path.normpath(out_dir) + '.tmp'
    remove_unfinished(build_dir)
    os.makedirs(build_dir)
    had_data, swapped = os.path.isfile(os.path.join(out_dir, 'prepare.json')), False
    try:
        documents, writers, start = tokenize(streams, tok, tokenizer, build_dir, shard_tokens, num_workers, out_dir)
        files = [path for stream in streams for path in stream.files]
        if documents == 0:
            raise ValueError(f"{', '.join(files)}: no documents (the input is empty, or blank lines only): "
                             "point --input at JSON lines with a 'text' field")
        if writers['train'].total == 0:
            raise ValueError(f"{', '.join(files)}: all {documents} document(s) went to val (every {val_every}th "
                             "does), so train would be empty: use more documents")
        if tokenizer != 'bytes':  # train.py copies it next to the checkpoints it writes
            tokenizer_json = os.path.join(tokenizer, 'tokenizer.json') if os.path.isdir(tokenizer) else tokenizer
            shutil.copyfile(tokenizer_json, os.path.join(build_dir, 'tokenizer.json'))
        split_summaries = {split: dict(tokens=w.total, shards=w.shards) for split, w in writers.items()}
        for split, docs in split_files.items():  # every file by split, so anyone can check that none is in two
            split_summaries[split].update(bytes=sum(size for _, size in docs), files=[name for name, _ in docs])
        summary = dict(input=[os.path.abspath(p) for p in files], **corpus_record, tokenizer=tok.identity,
                       vocab_size=tok.vocab_size, eot_token=tok.eot_token, documents=documents, val_every=val_every,
                       **split_summaries, seconds=round(time.time() - start, 1), date=time.strftime('%Y-%m-%d %H:%M:%S'))
        atomic_write_text(os.path.join(build_dir, 'prepare.json'), json.dumps(summary, indent=2) + '\n')
        swap_in(build_dir, out_dir)
        swapped = True
    except KeyboardInterrupt:  # the line data/prepare.py prints
        raise KeyboardInterrupt(f"{out_dir} holds the new dataset, finished just before" if swapped else
                                f"{out_dir} is as it was ({'its dataset kept' if had_data else 'no dataset written'}); "
                                "run the same command again") from None
    finally:
        shutil.rmtree(build_dir, ignore_errors=True)
    tokens = ' and '.join(f"{w.total:,} {split}" for split, w in writers.items())
    print(f"{documents} documents -> {tokens} tokens ({tok.identity}) in {out_dir}, {time.time() - start:.1f}s")
    return out_dir


if __name__ == '__main__':
    settings = dict(input=input, tokenizer=tokenizer, out_dir=out_dir, shard_tokens=shard_tokens, val_every=val_every,
                    num_workers=num_workers, corpus=corpus, corpus_mb=corpus_mb, ood_package=ood_package, ood_mb=ood_mb)
    overrides = parse_settings(sys.argv[1:], settings, settings_help(__file__))
    try:
        prepare(**{**settings, **overrides})
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    except OSError as e:  # a folder that cannot be written, a full disk: the old dataset stays as it was
        raise SystemExit(f"error: {e.filename or 'data/prepare.py'}: {e.strerror or e}: check the path and the free space")
    except KeyboardInterrupt as e:
        interrupted(str(e) or 'nothing was changed; run the same command again')
