"""
The processes of a run, for train.py and transfer.py. torchrun starts one per GPU and sets RANK,
LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; without RANK and WORLD_SIZE a run is one process.

    device = ranks.start(device, cpu_threads, join_timeout)  # join the others; this rank's device
    with ranks.one_voice(kept):                               # a failure on any rank: rank 0's one line
        ... ranks.rank, ranks.world_size, ranks.mean(loss) ...
    ranks.finish()

When a run of several processes stops, rank 0 alone says why, in one line, as one process would:
- A failure every rank shares (a bad setting, a non-finite loss: losses are averaged over the ranks)
  is rank 0's own line.
- The first rank to fail writes its line into the process group's store (the rendezvous store, which
  every node reaches). Unless rank 0 fails by itself within a second, a thread on rank 0 that waits
  on that key prints 'error: rank R of N: ...' (out of memory on one GPU, a file another node lacks):
  the line comes even while rank 0's main thread is blocked in a collective the failed rank will
  never join (NCCL blocks in the GPU sync; gloo's collective fails at once). The other ranks then
  stop quietly, when their next collective fails or torchrun stops them.
- A rank that does not join within join_timeout seconds (a node that never started) is one line.
Collectives keep torch's own timeout (NCCL 10 minutes, gloo 30), which a long checkpoint write must fit in.
"""

import os
import sys
import threading
import time
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

from model_dir import pick_device

rank, local_rank, world_size = 0, 0, 1
ddp = False  # started by torchrun (or by hand, with its variables)
store = None  # the process group's key-value store
STOPPED = 'dijiang/stopped'  # set once, by the first rank that fails: 'rank\nits line'
said = threading.Lock()  # rank 0's watcher and main thread say another rank's line once


def start(device='auto', cpu_threads=0, join_timeout=60):
    """Join the other ranks, if torchrun started this process. Returns this rank's device: 'cuda:LOCAL_RANK'
    for 'auto' or 'cuda' on a GPU machine, else 'cpu', where the cores are shared out among this machine's ranks."""
    global rank, local_rank, world_size, ddp, store, said
    said = threading.Lock()
    ddp = 'RANK' in os.environ or 'WORLD_SIZE' in os.environ
    missing = [name for name in ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT') if name not in os.environ]
    if ddp and missing:
        raise ValueError(f"RANK or WORLD_SIZE is set but {missing[0]} is not: start the ranks with torchrun "
                         "(torchrun --standalone --nproc_per_node=N ...), or unset RANK and WORLD_SIZE to run one process")
    rank, local_rank = int(os.environ.get('RANK', 0)), int(os.environ.get('LOCAL_RANK', 0))
    world_size = int(os.environ.get('WORLD_SIZE', 1))
    device = pick_device(device)[0]
    if device == 'cuda':
        device = f'cuda:{local_rank}'  # an explicit index: set_device and DDP need one
    if device.startswith('cuda'):
        torch.cuda.set_device(device)
    else:  # torch's default, a thread per core in every process, oversubscribes the cores under torchrun
        torch.set_num_threads(cpu_threads or max(1, (os.cpu_count() or 1) // int(os.environ.get('LOCAL_WORLD_SIZE', 1))))
    if not ddp:
        return device
    address = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    try:  # the store's timeout is the wait for the others to join; collectives keep torch's own
        store = next(dist.rendezvous('env://', timeout=timedelta(seconds=join_timeout)))[0]
        cuda = device.startswith('cuda')  # NCCL's device_id: its communicator is made now, not at the first collective
        dist.init_process_group('nccl' if cuda else 'gloo', store=store, rank=rank, world_size=world_size,
                                device_id=torch.device(device) if cuda else None)
    except dist.DistError as e:  # a rank, or rank 0's store, did not come
        raise ValueError(f"rank {rank} of {world_size}: the ranks did not all join at {address} within "
                         f"join_timeout={join_timeout} s ({str(e).strip().splitlines()[0][:120]}): start every rank "
                         "(torchrun does), or raise --join_timeout") from None
    if rank == 0:  # the watcher waits on its own connection: a store client blocks every caller while one waits
        threading.Thread(target=say_other_failure, args=(store.clone(),), daemon=True).start()
    return device


def say_other_failure(watch):
    """Rank 0's watcher, on watch (a connection to the store of its own): print the line of the first other
    rank that fails, unless rank 0 fails by itself within a second (a failure every rank shares, as a bad
    setting: rank 0's own line says it)."""
    try:
        watch.wait([STOPPED], timedelta(days=365))
    except dist.DistError:  # the store is gone: the run is over
        return
    time.sleep(1)
    say(watch.get(STOPPED).decode())


def say(stopped):
    """On rank 0, the line of the rank that stopped first (stopped is 'rank\\nline'), if another's; once."""
    failed, _, line = stopped.partition('\n')
    if failed != '0' and failed != 'done' and said.acquire(blocking=False):
        print(f"error: rank {failed} of {world_size}: {line}", file=sys.stderr, flush=True)


def line_of(error, kept):
    """What configurator.run would say of error, for a rank whose own line is not printed."""
    if isinstance(error, ValueError):
        return str(error)
    if isinstance(error, OSError):
        return f"{error.filename or 'a file'}: {error.strerror or error}; {kept()}"
    text = (str(error) or type(error).__name__).strip().splitlines()[0][:120]
    if isinstance(error, MemoryError) or 'out of memory' in text or "can't allocate memory" in text:
        return f"out of memory ({text}); {kept()}"
    return f"{type(error).__name__}: {text} (its traceback is above)"


@contextmanager
def one_voice(kept):
    """Inside, a failure on any rank stops the run with one line from rank 0 (see the docstring). kept()
    says what the run leaves, as for configurator.run."""
    try:
        yield
    except BaseException as error:
        if not ddp or (isinstance(error, KeyboardInterrupt) and rank != 0):
            raise  # a signal reaches every rank (Ctrl-C goes to the group): rank 0 says it
        lost = isinstance(error, dist.DistError) or (type(error) is RuntimeError and '/gloo/' in str(error))
        if lost:
            error = ValueError(f"lost contact with another rank ({str(error).strip().splitlines()[0][:100]}): it was "
                               f"killed, or its machine went down; {kept()}")  # torchrun's report names it
        mine = f"{rank}\n{line_of(error, kept)}"
        first = store.compare_set(STOPPED, '', mine).decode()  # the first rank to fail sets it
        if rank == 0 and first != mine and (lost or isinstance(error, KeyboardInterrupt)):
            say(first)  # rank 0 stops because another rank did (torchrun's SIGTERM): that rank's line
            sys.exit(1)
        if rank == 0 and not said.acquire(blocking=False):  # the watcher has said another rank's line
            sys.exit(1)
        if error is sys.exception():
            raise
        raise error from None


def mean(value):
    """A tensor averaged over the ranks, as a number."""
    if ddp:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)  # gloo has no AVG
        value = value / world_size
    return value.item()


def average_gradients(params):
    """The same averaged gradients on every rank, for a loop that does not run through DDP's forward."""
    if ddp:
        for p in params:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= world_size


def barrier():
    if ddp:
        dist.barrier()


def finish():
    """The ranks leave together (one tearing its process group down while rank 0 still saves can abort),
    and rank 0's watcher is let go."""
    if ddp:
        dist.barrier()
        store.compare_set(STOPPED, '', 'done\n')
        dist.destroy_process_group()
