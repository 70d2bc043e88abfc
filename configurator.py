"""
The --name=value command line of every script, nanoGPT style. A script lists its settings as plain
module-level assignments between a '# settings:' comment and a '# ----' line; that block, verbatim,
is its --help:

    # settings: each can be overridden as --name=value
    lr = 3e-4  # the peak learning rate
    # -----------------------------------------------------------------------------
    settings = parse_settings(sys.argv[1:], dict(lr=lr), settings_help(__file__))
"""

import ast
import math
import os
import signal
import sys
import threading
from contextlib import contextmanager


def parse_settings(argv, defaults, help_text):
    """The --name=value overrides in argv, as a dict, checked against defaults (name -> default).
    Values are Python literals (1e-3, True, (0.9, 0.95)) of the default's type; a string setting takes
    the text as written (--start=42 is the text '42'). --help prints help_text and exits."""
    overrides = {}
    for arg in argv:
        if arg in ('-h', '--help'):
            print(help_text)
            sys.exit(0)
        name, eq, text = arg.removeprefix('--').partition('=')
        if not arg.startswith('--') or not eq or name not in defaults:
            raise SystemExit(f"error: unknown argument {arg!r}: use --name=value with a name from --help")
        default = defaults[name]
        try:
            value = text if isinstance(default, str) else ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        if isinstance(default, float) and isinstance(value, (int, str)) and not isinstance(value, bool):
            try:
                value = float(value)  # also 'inf' and 'nan'
            except ValueError:
                pass
        if type(value) is not type(default):
            raise SystemExit(f"error: --{name}={text}: expected a value like {default!r} ({type(default).__name__})")
        overrides[name] = value
    return overrides


def settings_help(path):
    """The usage: the file's settings block, verbatim, defaults and comments included."""
    with open(path) as f:
        block = f.read().split('# settings:')[1].split('# ----')[0]
    return f"usage: python {os.path.relpath(path)} [--name=value ...]\n\n# settings:{block.rstrip()}"


# -----------------------------------------------------------------------------
# What every script does with bad input and with Ctrl-C: one line on stderr, 'error: ...', naming the
# setting or the file and what to do, and no traceback. The earlier outputs stay as they were: files
# are written whole under a temporary name and renamed (atomic.py).


def check(ok, setting, value, need):
    """Stop with 'error: setting=value: need' unless ok."""
    if not ok:
        raise SystemExit(f"error: {setting}={value!r}: {need}")


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_ints(settings, least):
    """Each named int setting is at least least[name]: {name: least}."""
    for name, low in least.items():
        check(settings[name] >= low, name, settings[name], f"give {low} or more")


def check_floats(settings, names, positive=False):
    """Each named float setting is finite and >= 0 (> 0 with positive=True)."""
    for name in names:
        value = settings[name]
        ok = is_number(value) and math.isfinite(value) and (value > 0 if positive else value >= 0)
        check(ok, name, value, f"give a finite number {'above' if positive else 'of at least'} 0")


def check_device(device, on_cpu=''):
    """'auto', 'cpu', 'cuda' or 'cuda:N' for a GPU that torch sees; on_cpu says what --device=cpu gives."""
    import torch
    if device in ('auto', 'cpu'):
        return
    if device != 'cuda' and not device.startswith('cuda:'):
        raise SystemExit(f"error: device={device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if not torch.cuda.is_available():
        raise SystemExit(f"error: device={device!r} but torch sees no CUDA GPU: use --device=cpu{on_cpu}")
    index = device.partition(':')[2]
    if device != 'cuda' and not (index.isdigit() and int(index) < torch.cuda.device_count()):
        raise SystemExit(f"error: device={device!r}: torch sees {torch.cuda.device_count()} GPU(s): use 'cuda' "
                         "or 'cuda:N' with N below that")


def interrupted(kept):
    """Ctrl-C's line, 'error: interrupted; ' + kept (what is kept, and how to go on), then exit status 130
    (128 + SIGINT, what a shell reports for a process Ctrl-C stopped). For a script's main(), in
    `except KeyboardInterrupt`: by then the run has unwound, its temporary files are gone and any
    progress bar has ended its line."""
    print(f"error: interrupted; {kept}", file=sys.stderr, flush=True)
    sys.exit(130)


def exit_on_interrupt(kept):
    """For a script that runs at module level, where no `try` wraps the run (train.py): from now on
    Ctrl-C (SIGINT) writes 'error: interrupted; ' + kept() as one line (none when kept() is None: the
    other ranks of a run, which its first one speaks for) and raises SystemExit(130),
    which unwinds the run as KeyboardInterrupt would (`finally` blocks and atomic writes clean up)
    and ends it with status 130. The line goes straight to file descriptor 2: a handler may run in
    the middle of a print, and Python's own stream objects must not be reentered. A second Ctrl-C
    during the unwinding stops it again, without another line."""
    def handler(signum, frame):
        signal.signal(signal.SIGINT, lambda *_: sys.exit(130))
        try:
            text = kept()
        except Exception:  # the run is half set up: say what is certain
            text = 'the files written before this run are as they were'
        if text is not None:
            os.write(2, f"error: interrupted; {text}\n".encode())
        sys.exit(130)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, handler)


@contextmanager
def interrupts_deferred():
    """A Ctrl-C inside the block takes effect when the block is done: for a few renames that must
    not be cut in half (swapping a finished output in for the old one)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pending and callable(previous):
        previous(signal.SIGINT, None)
    elif pending and previous != signal.SIG_IGN:
        raise KeyboardInterrupt
