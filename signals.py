"""
Ctrl-C and SIGTERM (what torchrun, Slurm and docker send), for every script:

    signals.stop_on_signals()      # first thing, before the heavy imports
    with signals.interruptible():  # configurator.run, around main()
        main()

Before main() a signal exits at once with one line (nothing was written yet). Inside it the signal
is raised as Interrupted wherever the script is, so it unwinds like an exception: `finally` blocks and
atomic writes clean up, and configurator.run says what was kept (exit 130 for Ctrl-C, 143 for SIGTERM).
After main() has returned the work is done: a signal exits quietly. Only rank 0 speaks.
"""

import os
import signal
import threading
from contextlib import contextmanager

RANK_0 = os.environ.get('RANK', '0') == '0'
state = 'starting'  # then 'running' (inside main()), then 'done'


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM, raised wherever the script is, so that it unwinds."""

    def __init__(self, signum):
        super().__init__(signum)
        self.exit_status = 128 + signum  # what a shell reports for a process the signal stopped


def stop_on_signals():
    """From now on Ctrl-C and SIGTERM stop the script with one line. Called first thing, before the
    heavy imports: a signal before main() exits at once, one inside it raises Interrupted."""
    def handler(signum, frame):
        if state == 'running':
            raise Interrupted(signum)
        if state == 'starting' and RANK_0:  # after main() has returned the work is done: exit quietly
            os.write(2, b"error: interrupted while starting; nothing was written\n")
        os._exit(128 + signum)
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, handler)


@contextmanager
def interruptible():
    """Inside, a signal raises Interrupted; once it is left, the script's work is done."""
    global state
    stop_on_signals()
    state = 'running'
    try:
        yield
    finally:
        state = 'done'
