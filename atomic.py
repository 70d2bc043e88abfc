"""Atomic file writes: a reader, or a run that crashed mid-write, sees the old file or the new one,
never a part of one. Every file the project writes goes through atomic_write."""

import os
import shutil
import signal
import threading
from contextlib import contextmanager


def atomic_write(path, write):
    """Call write(tmp_path), then rename tmp_path over path. The temporary name is fixed (path + '.tmp'),
    so a write killed half-way leaves one stale file that the next write replaces, not one per crash.
    A full disk or a folder that cannot be written is one OSError naming path; the earlier file stays."""
    tmp_path = f"{path}.tmp"
    try:
        write(tmp_path)
        os.replace(tmp_path, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        if isinstance(e, RuntimeError) and 'write' not in str(e):
            raise
        reason = e.strerror if isinstance(e, OSError) and e.strerror else ' '.join(str(e).split())[:120]
        raise OSError(getattr(e, 'errno', None), f"cannot write it ({reason}): make room, or write elsewhere; "
                      "the earlier file, if any, is as it was", path) from None
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)


def atomic_write_text(path, text):
    def write(tmp_path):
        with open(tmp_path, 'w', encoding='utf-8') as f:
            f.write(text)
    atomic_write(path, write)


def remove_leftover_dir(folder, is_ours):
    """Remove a folder that a killed run left behind (a build folder, or the old output set aside),
    once every name in it passes is_ours: anything else there is not ours to delete (a ValueError)."""
    if not os.path.lexists(folder):
        return
    names = os.listdir(folder) if os.path.isdir(folder) and not os.path.islink(folder) else [os.path.basename(folder)]
    others = [name for name in names if not is_ours(name)]
    if others:
        raise ValueError(f"{folder}, where this script writes before renaming into place, holds {others[0]}, which "
                         "it did not write: move that away, or pick another --out_dir")
    shutil.rmtree(folder)


@contextmanager
def interrupts_deferred():
    """A Ctrl-C or SIGTERM inside the block takes effect when the block is done: for a few renames
    that must not be cut in half (swapping a finished output in for the old one)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending, signums = [], (signal.SIGINT, signal.SIGTERM)
    previous = {signum: signal.signal(signum, lambda signum, frame: pending.append(signum)) for signum in signums}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    for signum in pending[:1]:
        if callable(previous[signum]):
            previous[signum](signum, None)
        elif previous[signum] != signal.SIG_IGN:
            raise KeyboardInterrupt
