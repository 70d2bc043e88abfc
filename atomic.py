"""Atomic file writes: a reader, or a run that crashed mid-write, sees the old file or the new one,
never a part of one."""

import os
import shutil


def atomic_write(path, write):
    """Call write(tmp_path), then rename tmp_path over path. The temporary name is fixed
    (path + '.tmp'), so a write killed half-way leaves one stale file that the next write replaces,
    not a new one per crash."""
    tmp_path = f"{path}.tmp"
    try:
        write(tmp_path)
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)


def atomic_write_text(path, text):
    def write(tmp_path):
        with open(tmp_path, 'w', encoding='utf-8') as f:
            f.write(text)
    atomic_write(path, write)


def remove_leftover_dir(folder, is_ours, where, writer):
    """Remove a folder that a killed run left behind (a build folder, or the old output set aside),
    once every name in it passes is_ours: anything else there is not this program's to delete, and is
    one ValueError ('{folder}, {where}, holds {name}, which {writer} did not write ...')."""
    if not os.path.lexists(folder):
        return
    names = os.listdir(folder) if os.path.isdir(folder) and not os.path.islink(folder) else [os.path.basename(folder)]
    others = [name for name in names if not is_ours(name)]
    if others:
        raise ValueError(f"{folder}, {where}, holds {others[0]}, which {writer} did not write: move it away, "
                         "or pick another --out_dir")
    shutil.rmtree(folder)
