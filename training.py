"""
What an optimizer step is made of, for train.py and transfer.py: the batch split into micro-steps over
the ranks, each micro-step's windows of tokens, AdamW, the learning-rate schedule, and the check that
stops a run whose loss or gradients are no longer finite.
"""

import math

import torch

import configurator
import ranks


def split_batch(batch_size, block_size, micro_batch_size, world_size=0):
    """(micro_batch_size, accumulation): micro_batch_size 0 resolved, and the micro-steps per step, on
    world_size ranks (0: this run's)."""
    world_size = world_size or ranks.world_size
    if micro_batch_size == 0:
        fits = [m for m in range(16, 0, -1) if batch_size % (m * block_size * world_size) == 0]
        configurator.check(fits, 'batch_size', batch_size, f"split it evenly into sequences of block_size={block_size} "
                           f"over {world_size} rank(s): make it a multiple of {block_size * world_size}")
        micro_batch_size = fits[0]
    accumulation, remainder = divmod(batch_size, micro_batch_size * block_size * world_size)
    if remainder or accumulation == 0:
        raise ValueError(f"batch_size={batch_size} tokens is not a multiple of micro_batch_size * block_size * "
                         f"world_size = {micro_batch_size} * {block_size} * {world_size}: change one of them")
    return micro_batch_size, accumulation


def get_batch(data, position, micro_step, micro_batch_size, device):
    """This rank's micro-step micro_step of the step that starts at window position: inputs and
    next-token targets, (B, T) each."""
    start = position + (micro_step * ranks.world_size + ranks.rank) * micro_batch_size
    windows = torch.from_numpy(data.windows(start, micro_batch_size))  # (B, T + 1)
    if device.startswith('cuda'):
        windows = windows.pin_memory().to(device, non_blocking=True)
    return windows[:, :-1], windows[:, 1:]


def adamw(params, peak_lr, weight_decay, betas, device):
    """AdamW with weight decay on matrices (linear weights, embeddings), not on norms, biases or gains."""
    params = list(params)
    return torch.optim.AdamW([dict(params=[p for p in params if p.dim() >= 2], weight_decay=weight_decay),
                              dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)],
                             lr=peak_lr, betas=betas, fused=device.startswith('cuda'))


def cosine_lr(step, peak, warmup, decay_iters, min_lr):
    """Learning rate of update step + 1: linear warmup to peak, then cosine to min_lr at decay_iters."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, decay_iters - warmup))
    return min_lr + 0.5 * (peak - min_lr) * (1 + math.cos(math.pi * progress))


def check_finite(what, value, step, kept):
    """Stop all ranks alike (the values are averaged over the ranks) before the update; kept: what the run
    leaves, for the one line."""
    if not math.isfinite(value):
        raise ValueError(f"non-finite {what} ({value}) at step {step}: stopped; {kept}. Lower --lr or check the data")
