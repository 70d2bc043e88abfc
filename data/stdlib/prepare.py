"""
The demo's corpus: the stdlib's module sources (code only, no tests) in a seeded random order, up to
corpus_mb MB of text, written as Pile-format JSON lines to data/stdlib/stdlib.jsonl (each line's
"meta" says which module it is), then tokenized by data/prepare.py into data/stdlib-bytes, byte-level,
every 10th document to val. Code only: a small model trained on a few MB of it writes recognizable
Python, where prose mixed in leaves it between the two. Every Python installation carries this text,
so the demo runs offline.

    python data/stdlib/prepare.py                                         # data/stdlib-bytes
    python data/stdlib/prepare.py --tokenizer=data/pythia-tokenizer.json  # data/stdlib-pythia, Pythia's vocab

train.py builds it on first use, with build(). The output folder follows data/prepare.py's rule: it
is replaced only when the new dataset is whole, and only the files of the old one are deleted; a
folder holding anything else is refused unless --overwrite=True.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repo root
import configurator  # noqa: E402
import signals  # noqa: E402

if __name__ == '__main__':  # imported (by train.py), the signals are the importing script's
    signals.stop_on_signals()

import glob  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import sysconfig  # noqa: E402

from atomic import atomic_write_text  # noqa: E402
from data.prepare import kept, prepare, settings  # noqa: E402

# -----------------------------------------------------------------------------
# settings: each can be overridden as --name=value
tokenizer = 'bytes'  # 'bytes' (byte-level), or Pythia's tokenizer.json or a convert.py output dir holding one
out_dir = ''  # '' means data/stdlib-bytes (data/stdlib-pythia with Pythia's tokenizer)
corpus_mb = 4.0  # MB of text
val_every = 10  # every val_every-th document goes to val: of a few hundred, so that val holds about 400K tokens
num_workers = 0  # tokenizer processes; 0 means one per CPU core
overwrite = False  # True: write into an out_dir that holds files other than its dataset's; they stay as they are
# -----------------------------------------------------------------------------

CORPUS = os.path.join('data', 'stdlib', 'stdlib.jsonl')
# folders whose .py files are left out: tests, caches, the pydoc topics (prose spelled as Python), and
# installed packages inside the stdlib folder
SKIP_FOLDERS = ('site-packages', 'dist-packages', 'test', 'tests', 'idle_test', 'pydoc_data', '__pycache__')


def write_corpus(path, max_bytes):
    """Write the stdlib's module sources to path as Pile-format JSON lines, in a seeded random order (so
    each batch mixes modules), until max_bytes of text. Returns the documents as (source, bytes of text),
    in the order written."""
    label = dict(pile_set_name=f'Python {platform.python_version()} stdlib (dijiang default corpus)')
    stdlib = sysconfig.get_paths()['stdlib']
    modules = sorted(p for p in glob.glob(os.path.join(stdlib, '**', '*.py'), recursive=True)
                     if not set(os.path.relpath(p, stdlib).split(os.sep)[:-1]) & set(SKIP_FOLDERS))
    random.Random(0).shuffle(modules)
    docs, size = [], 0
    for module in modules:
        if size >= max_bytes:
            break
        with open(module, encoding='utf-8', errors='replace') as f:
            text = f.read()
        docs.append(dict(text=text, meta=dict(label, source=f'Lib/{os.path.relpath(module, stdlib)}')))
        size += len(text)
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    atomic_write_text(path, ''.join(json.dumps(doc) + '\n' for doc in docs))
    return [(doc['meta']['source'], len(doc['text'].encode('utf-8'))) for doc in docs]


def build(**changes):
    """Write the corpus and tokenize it, with the settings above changed by changes (name=value, as
    --name=value does). Returns the output folder."""
    s = settings(globals(), changes)
    configurator.check(s.corpus_mb > 0, 'corpus_mb', s.corpus_mb, 'give a size in MB above 0')
    print(f"building the stdlib corpus (the stdlib's module sources) in {CORPUS}")
    documents = write_corpus(CORPUS, int(s.corpus_mb * 1e6))
    print(f"{len(documents)} documents, {os.path.getsize(CORPUS) / 1e6:.1f} MB")
    return prepare(record=dict(corpus='stdlib'), documents=documents, input=CORPUS, tokenizer=s.tokenizer,
                   out_dir=s.out_dir, val_every=s.val_every, num_workers=s.num_workers, overwrite=s.overwrite)


def main():
    build()


if __name__ == '__main__':
    configurator.run(main, kept=kept)
