"""Atomic file writes: a reader, or a run that crashed mid-write, sees the old file or the new one,
never a part of one."""

import os


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
