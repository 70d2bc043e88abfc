"""
A run folder (train.py's or transfer.py's out_dir) belongs to one run at a time, and a new run never
loses an earlier one:

- While a run holds out_dir it holds a lock on out_dir/.lock (fcntl.flock), which names its process;
  a second run there is refused with one line naming it. The OS releases the lock when the process
  ends, however it ends; the file goes when the run ends.
- A new run (not --init_from=resume) starts only where no run is (no ckpt.pt, no sharded ckpt/, no
  log.jsonl), unless --overwrite=True. Then the old run's files and folders (an FSDP run's ckpt/, and
  a ckpt.tmp/ or ckpt.old/ its writes left) are moved aside whole, into out_dir/replaced-run/; they
  are deleted when the new run writes its first checkpoint, and put back, byte for byte, if it stops
  before (an error, Ctrl-C, SIGTERM). If it was killed outright (kill -9), the next run in out_dir
  puts them back first.
- A new run that stops before its first checkpoint leaves out_dir as it found it: the files it wrote
  go (its log was on stdout, its sharded checkpoint, whole or cut short, with them), and out_dir too
  if the run made it.
- Other files in out_dir (notes, a launcher's output) are never touched.

The log, log.jsonl, is one JSON object per line, strict JSON (nan and inf as null).
"""

import fcntl
import json
import math
import os
import shutil
import sys

from atomic import interrupts_deferred, remove_leftover_dir

FILES = ('ckpt.pt', 'config.json', 'log.jsonl', 'tokenizer.json')  # what a run writes into its out_dir
SHARDED, WRITING, PREVIOUS = 'ckpt', 'ckpt.tmp', 'ckpt.old'  # and an FSDP run's sharded checkpoint (checkpoints.py):
FOLDERS = (SHARDED, WRITING, PREVIOUS)                         # whole, being written, the one it replaces
ASIDE = 'replaced-run'  # where --overwrite=True keeps the old run until the new one's first checkpoint


class RunDir:
    """with RunDir(out_dir, new, overwrite) as run: ... run.checkpointed() after each checkpoint.
    owner=False (the ranks other than 0, eval_only) makes it do nothing."""

    def __init__(self, out_dir, new, overwrite, owner=True):
        self.out_dir, self.new, self.overwrite, self.owner = out_dir, new, overwrite, owner
        self.aside = os.path.join(out_dir, ASIDE)
        self.made = not os.path.isdir(out_dir)
        self.saved = False  # this run wrote a checkpoint
        self.lock = None

    def path(self, name):
        return os.path.join(self.out_dir, name)

    def __enter__(self):
        if not self.owner:
            return self
        os.makedirs(self.out_dir, exist_ok=True)
        self.take_lock()
        try:
            self.settle()
        except BaseException:  # refused: the lock goes, out_dir stays as it was
            self.release()
            raise
        return self

    def ours(self, name):
        return name in FILES or name in FOLDERS

    def settle(self):
        """Put back what a killed run left aside; refuse an earlier run, or move it aside (overwrite)."""
        if os.path.isdir(self.aside):  # left by a replacing run that was killed
            # after its first checkpoint (ckpt/ and ckpt.old/ appear only by renaming a whole one): the old run was done with
            if any(os.path.exists(self.path(name)) for name in ('ckpt.pt', SHARDED, PREVIOUS)):
                remove_leftover_dir(self.aside, self.ours)
            else:
                print(f"note: {self.aside} holds the run that an --overwrite=True run, killed before its first "
                      f"checkpoint, was replacing: put back into {self.out_dir}")
                self.put_back()
        earlier = [name for name in ('ckpt.pt', SHARDED + '/', PREVIOUS + '/', 'log.jsonl')
                   if os.path.exists(self.path(name))]  # a name ending in / is found only as a folder
        if self.new and earlier and not self.overwrite:
            raise ValueError(f"{self.path(earlier[0])} holds an earlier run: continue it with --init_from=resume, "
                             "write this run to another --out_dir, or replace it with --overwrite=True (it is put "
                             "back if the new run stops before its first checkpoint)")
        if self.new and earlier:
            with interrupts_deferred():
                os.makedirs(self.aside)
                for name in FILES + FOLDERS:
                    if os.path.exists(self.path(name)):
                        os.replace(self.path(name), os.path.join(self.aside, name))

    def take_lock(self):
        while True:
            lock = open(self.path('.lock'), 'a+')
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.seek(0)
                holder = lock.read().strip() or 'another process'
                lock.close()
                raise ValueError(f"{self.out_dir} is in use by {holder}: wait for that run to end (or stop it), "
                                 "or pick another --out_dir") from None
            if os.fstat(lock.fileno()).st_ino == os.stat(self.path('.lock')).st_ino:
                break
            lock.close()  # the run that held it removed the file as we opened it: lock the new one
        # the lock is the open file, so the pid is written into it in place, not by a rename
        lock.truncate(0)
        lock.write(f"process {os.getpid()} ({' '.join(['python', *sys.argv])[:200]})\n")
        lock.flush()
        self.lock = lock

    def put_back(self):
        """out_dir as this new run found it: the files it wrote go (a sharded checkpoint too, whole or cut
        short: a folder the old one's would not replace), and the old run, if one was moved aside, comes back."""
        with interrupts_deferred():
            for name in FILES:
                if os.path.isfile(self.path(name)):
                    os.remove(self.path(name))
            for name in FOLDERS:
                if os.path.isdir(self.path(name)):
                    shutil.rmtree(self.path(name))
            if os.path.isdir(self.aside):
                for name in os.listdir(self.aside):
                    os.replace(os.path.join(self.aside, name), self.path(name))
                os.rmdir(self.aside)

    def checkpointed(self):
        """Called once a checkpoint of this run is whole: from now on out_dir is this run's."""
        self.saved = True
        if self.owner and os.path.isdir(self.aside):
            remove_leftover_dir(self.aside, self.ours)

    def __exit__(self, error_type, error, traceback):
        if not self.owner or self.lock is None:
            return
        if error_type is not None and self.new and not self.saved:
            self.put_back()
        self.release()

    def release(self):
        os.remove(self.path('.lock'))  # while it is held: no other run can have opened it since
        self.lock.close()
        if self.made and not os.listdir(self.out_dir):
            os.rmdir(self.out_dir)

    def status(self):
        """What out_dir holds while this new run has no checkpoint yet, for the line of a run that stops."""
        if os.path.isdir(self.aside):
            return f"no checkpoint of this run was written; {self.out_dir} holds the earlier run again"
        return f"no checkpoint of this run was written; {self.out_dir} is as it was before it"


def json_line(row):
    """A log row as one line of strict JSON: a value that is not finite (nan, inf) is written as null."""
    row = {key: None if isinstance(value, float) and not math.isfinite(value) else value for key, value in row.items()}
    return json.dumps(row, allow_nan=False) + '\n'


def append_log(path, row):
    """One row at the end of the log. A full disk is one OSError naming the log; a row cut short is
    dropped on resume (log_up_to)."""
    try:
        with open(path, 'a', encoding='utf-8') as f:
            f.write(json_line(row))
    except OSError as e:
        raise OSError(e.errno, f"cannot append to it ({e.strerror}): make room, or write elsewhere", path) from None


def log_up_to(path, last_step):
    """The lines of an earlier log for steps up to last_step, the ones the checkpoint holds. A torn
    last line (a crash while it was being written) is dropped; any other line that is not a log row
    is a ValueError, before anything is written."""
    if not os.path.isfile(path):
        return []
    with open(path, encoding='utf-8', errors='replace') as f:
        lines = f.readlines()
    kept = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            step = json.loads(line)['step']
        except (ValueError, KeyError, TypeError):
            step = None
        if type(step) is not int:
            if number == len(lines):
                print(f"note: {path}: its last line was cut short (a crash while it was written): dropped")
                break
            raise ValueError(f"{path}, line {number}: not a log row (a JSON object with a 'step'): "
                             "delete that line, or the whole log, and resume again")
        if step <= last_step:
            kept.append(line if line.endswith('\n') else line + '\n')
    return kept
