"""
Memory per GPU of a training run, estimated before the first step (train.py prints it; --dry_run=True
prints it alone, on any machine), and measured as it runs (peak_mib, in train.py's log).

Weights, gradients and AdamW's states are counted exactly, tensor by tensor as FSDP2 shards them (dim
0 split over the ranks, rank 0's piece the largest); activations are the tensors autograd saves for
the backward pass, from per-token coefficients fitted to the saved tensors measured on CPU over
several shapes (within 5% of them); working copies are what the wrapper adds (DDP's gradient buckets,
autocast's bf16 weights, or FSDP's gathered units).
"""

import math
import resource

import torch

from dijiang import GPT

GiB = 2 ** 30
# bytes per token per block: (n_embd + kv width, gelu MLP width, swiglu MLP width, DiJiang: n_embd, DiJiang: heads * chunk)
PER_TOKEN = {4: (16.5, 4.0, 21.5, 35.5, 3.0), 2: (9.5, 1.5, 13.5, 37.5, 3.25)}  # fp32, bf16 autocast


def size(n):
    """n bytes in GiB, or in MiB below 1 GiB (a small model's would read 0.00 GiB)."""
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2 ** 20:.1f} MiB"


def shard_numel(shape, world_size):
    """Elements of rank 0's shard of a tensor that FSDP2 splits along dim 0."""
    return math.ceil(shape[0] / world_size) * math.prod(shape[1:]) if shape else 1


def estimate(gpt, block_size, micro_batch_size, world_size=1, fsdp=False, cpu_offload=False,
             activation_checkpointing=False, bf16=True):
    """{weights, gradients, optimizer, activations, working, total}: bytes on each GPU."""
    cfg, shards = gpt.config, world_size if fsdp else 1
    params = list(gpt.parameters())  # a tied head is counted once
    sharded = sum(shard_numel(p.shape, shards) for p in params)
    on_gpu = 0 if cpu_offload else 1
    weights = 4 * sharded * on_gpu + sum(b.numel() * b.element_size() for b in gpt.buffers())
    memory = dict(weights=weights, gradients=4 * sharded * on_gpu,
                  optimizer=(8 * sharded + 4 * len(params)) * on_gpu)  # exp_avg, exp_avg_sq fp32, and a step each
    a = 2 if bf16 else 4
    c_kv, gelu, swiglu, dij, dij_chunk = PER_TOKEN[a]
    dijiang = cfg.attention == 'dijiang'
    per_block = (c_kv * (cfg.n_embd + 2 * cfg.n_kv_head * cfg.head_size) + (gelu if cfg.mlp == 'gelu' else swiglu) *
                 cfg.intermediate_size + dijiang * (dij * cfg.n_embd + dij_chunk * cfg.n_head * cfg.chunk_size))
    kept = 4 * cfg.n_embd if activation_checkpointing else per_block  # a checkpointed block keeps its input alone
    head = (a + 8) * cfg.vocab_size + (4 + a) * cfg.n_embd  # logits, their fp32 copy and log-softmax; ln_f
    tokens = micro_batch_size * block_size
    memory['activations'] = int(tokens * (cfg.n_layer * kept + (per_block if activation_checkpointing else 0) + head))
    block = sum(p.numel() for p in gpt.layers[0].parameters())
    root = sum(p.numel() for p in params) - cfg.n_layer * block
    if fsdp:  # two blocks gathered (one computing, the next prefetched) and one block's full gradients; the root whole
        memory['working'] = 2 * block * a + block * (a + 4) + root * 8
    else:  # DDP's buckets hold a second copy of the gradients; autocast keeps bf16 copies of the weights
        memory['working'] = 4 * sum(p.numel() for p in params) * (world_size > 1) + 2 * (block * cfg.n_layer + root) * bf16
    memory['total'] = sum(memory.values())
    return memory


def report(gpt, block_size, micro_batch_size, world_size, bf16, capacity, **options):
    """The estimate as one line, and where it exceeds capacity bytes (0: unknown, no check) a second, 'note: ',
    naming what would fit."""
    memory = estimate(gpt, block_size, micro_batch_size, world_size, bf16=bf16, **options)
    parts = ', '.join(f"{name} {size(memory[name])}" for name in ('weights', 'gradients', 'optimizer', 'activations',
                                                                  'working'))
    chosen = ', '.join(f"{name}={value}" for name, value in dict(micro_batch_size=micro_batch_size, block_size=block_size,
                                                                 **options).items())
    line = (f"memory per GPU (estimate): {parts}; total {size(memory['total'])} on each of {world_size} "
            f"({'bf16' if bf16 else 'fp32'}, {chosen})")
    if capacity and memory['total'] > capacity:
        line += '\nnote: ' + what_fits(gpt, block_size, micro_batch_size, world_size, bf16, capacity, **options)
    return line


def capacity(device):
    """Bytes of memory of a CUDA device; 0 (unknown) for a CPU."""
    return torch.cuda.get_device_properties(device).total_memory if device.startswith('cuda') else 0


def what_fits(gpt, block_size, micro_batch_size, world_size, bf16, capacity, **chosen):
    """The first of a few option sets, cheapest first, whose estimate fits in capacity bytes, as a line."""
    tries = [dict(activation_checkpointing=True), dict(fsdp=True), dict(fsdp=True, activation_checkpointing=True),
             dict(fsdp=True, activation_checkpointing=True, micro_batch_size=1),
             dict(fsdp=True, activation_checkpointing=True, cpu_offload=True),
             dict(fsdp=True, activation_checkpointing=True, cpu_offload=True, micro_batch_size=1)]
    for change in tries:
        options = {**chosen, 'micro_batch_size': micro_batch_size, **change}
        if options == {**chosen, 'micro_batch_size': micro_batch_size}:
            continue
        total = estimate(gpt, block_size, world_size=world_size, bf16=bf16, **options)['total']
        if total <= capacity:
            flags = ' '.join(f"--{name}={value}" for name, value in change.items())
            return f"it does not fit in this GPU's {capacity / GiB:.3g} GiB; with {flags} it would take {size(total)} per GPU"
    return (f"it does not fit in this GPU's {capacity / GiB:.3g} GiB even with --fsdp=True --activation_checkpointing=True "
            "--cpu_offload=True --micro_batch_size=1: spread it over more GPUs, or shorten --block_size")


def peak_mib(device):
    """The memory this process has used at its peak, measured, in MiB: on a GPU torch's allocations, else the peak RSS."""
    if device.startswith('cuda'):
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 10  # KiB on Linux


def shapes_only(config):
    """The model of config on the meta device: its shapes, without its memory."""
    with torch.device('meta'):
        return GPT(config)
