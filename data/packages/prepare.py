"""
The packages corpus, about 160 MB of text: enough to train on without repeating. The .py files of
every installed package and of the stdlib (no tests) and the pydoc help topics, one document per
file, each text once (duplicates by sha256 are left out), in a seeded random order, written as
Pile-format JSON lines to data/packages/packages.jsonl. One top-level package (ood_package) is held
out whole, as an out-of-distribution split: data/packages/ood.jsonl. data/prepare.py then tokenizes
both into data/packages-bytes, byte-level: every 50th document to val, the held-out package to
val_ood. prepare.json lists each split's files, so anyone can check that no file is in two.

    python data/packages/prepare.py
    python data/packages/prepare.py --corpus_mb=20 --ood_package=sympy

experiments/miniature.py builds it on first use, with build(). The output folder follows
data/prepare.py's rule: it is replaced only when the new dataset is whole, and only the files of the
old one are deleted; a folder holding anything else is refused unless --overwrite=True. Memory stays
flat: the files are written as they are read, with only their paths held.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repo root
import configurator  # noqa: E402
import signals  # noqa: E402

if __name__ == '__main__':  # imported (by experiments/miniature.py), the signals are the importing script's
    signals.stop_on_signals()

import collections  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import site  # noqa: E402
import sysconfig  # noqa: E402

from atomic import atomic_write  # noqa: E402
from data.prepare import kept, prepare, settings  # noqa: E402
from data.stdlib.prepare import SKIP_FOLDERS  # noqa: E402

# -----------------------------------------------------------------------------
# settings: each can be overridden as --name=value
tokenizer = 'bytes'  # 'bytes' (byte-level), or Pythia's tokenizer.json or a convert.py output dir holding one
out_dir = ''  # '' means data/packages-bytes (data/packages-pythia with Pythia's tokenizer)
corpus_mb = 160.0  # MB of text in train and val
ood_package = 'networkx'  # this top-level package is held out whole as the val_ood split, in neither train nor val;
                          # if it is not installed, the largest one that fits whole in ood_mb (else the largest one)
ood_mb = 4.0  # the most text the val_ood split holds, in MB
val_every = 50  # every val_every-th document goes to the val split
num_workers = 0  # tokenizer processes; 0 means one per CPU core
overwrite = False  # True: write into an out_dir that holds files other than its dataset's; they stay as they are
# -----------------------------------------------------------------------------

CORPUS = os.path.join('data', 'packages', 'packages.jsonl')
OOD_CORPUS = os.path.join('data', 'packages', 'ood.jsonl')  # the held-out package
TOPICS = 'pydoc_data.topics'  # the root name of the pydoc help topics
# the tokenizers turn this text into their end-of-document token (as HF does): inside a file (tokenizer
# code spells it) it would cut the document in two, so such files are left out
EOT_TEXT = '<|endoftext|>'


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
        raise ValueError(f"no package folders with .py files under {', '.join(roots.values())}: the packages "
                         "corpus needs some installed packages; the stdlib corpus does not (data/stdlib/prepare.py)")
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

    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    atomic_write(path, write)
    return written


def build(roots=None, **changes):
    """Write the corpus and tokenize it, with the settings above changed by changes (name=value, as
    --name=value does); roots (name -> folder) replaces the installed folders and the pydoc topics
    (tests use it). Returns the output folder."""
    s = settings(globals(), changes)
    configurator.check(s.corpus_mb > 0, 'corpus_mb', s.corpus_mb, 'give a size in MB above 0')
    configurator.check(s.ood_mb > 0, 'ood_mb', s.ood_mb, 'give a size in MB above 0')
    print(f"building the packages corpus (installed packages' and stdlib .py files, pydoc topics) in "
          f"{os.path.dirname(CORPUS)}")
    if roots is None:
        from pydoc_data.topics import topics
        roots = installed_roots()
        documents = python_files(roots) + [(TOPICS, name) for name in sorted(topics)]
    else:
        documents = python_files(roots)
    held_out = held_out_package(roots, documents, s.ood_package, int(s.ood_mb * 1e6))
    random.Random(0).shuffle(documents)  # so train mixes packages from its first step
    label = dict(pile_set_name=f'Python {platform.python_version()} packages (dijiang packages corpus)')
    # the held-out package first, so where one of its texts is also elsewhere (a vendored copy), the
    # copy is the duplicate left out, and train and val never see that text
    seen, left_out = set(), dict(duplicates=0, not_utf8=0, eot_text=0)
    ood = write_documents(OOD_CORPUS, [d for d in documents if top_level_package(d[1]) == held_out], roots,
                          int(s.ood_mb * 1e6), seen, left_out, label)
    main = write_documents(CORPUS, [d for d in documents if top_level_package(d[1]) != held_out], roots,
                           int(s.corpus_mb * 1e6), seen, left_out, label)
    print(f"{len(main)} documents, {sum(size for _, size in main) / 1e6:.1f} MB; {len(ood)} of {held_out} held out, "
          f"{sum(size for _, size in ood) / 1e6:.1f} MB; left out: {left_out['duplicates']} duplicates, "
          f"{left_out['not_utf8']} not UTF-8, {left_out['eot_text']} spelling {EOT_TEXT}")
    return prepare(record=dict(corpus='packages', roots=roots, held_out_package=held_out, left_out=left_out),
                   documents=main, ood_documents=ood, input=CORPUS, ood_input=OOD_CORPUS, tokenizer=s.tokenizer,
                   out_dir=s.out_dir, val_every=s.val_every, num_workers=s.num_workers, overwrite=s.overwrite)


def main():
    build()


if __name__ == '__main__':
    configurator.run(main, kept=kept)
