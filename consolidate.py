"""
Turn the sharded checkpoint of an FSDP run (out_dir/ckpt/, written by train.py --fsdp=True) into one
file, out_dir/ckpt.pt, the one a DDP run writes: sample.py, GPT.from_checkpoint and --init_from read
it, and train.py resumes from it without FSDP.

    python consolidate.py --out_dir=out

It runs in one process on the CPU and needs memory for the whole model and its optimizer (16 bytes a
parameter). ckpt.pt is written atomically; the shards stay.
"""

import configurator
import signals

signals.stop_on_signals()  # before the heavy imports: Ctrl-C while torch loads is one line too

import os  # noqa: E402

import torch  # noqa: E402

import checkpoints  # noqa: E402
from atomic import atomic_write  # noqa: E402

# -----------------------------------------------------------------------------
# settings: each can be overridden as --name=value
out_dir = 'out'  # the run folder that holds ckpt/
# -----------------------------------------------------------------------------


def main():
    folder = checkpoints.sharded_folder(out_dir)
    configurator.check(folder is not None, 'out_dir', out_dir, f"it holds no sharded checkpoint ({checkpoints.SHARDED}/ "
                       "with meta.pt): pass the folder of a train.py --fsdp=True run")
    ckpt = checkpoints.consolidated(folder)
    path = os.path.join(out_dir, 'ckpt.pt')
    atomic_write(path, lambda tmp: torch.save(ckpt, tmp))
    print(f"{path}: step {ckpt['step']}, {sum(t.numel() for t in ckpt['model'].values()) / 1e6:.2f}M weights; sample it "
          f"with: python sample.py --out_dir={out_dir}", flush=True)


if __name__ == '__main__':
    configurator.run(main)
