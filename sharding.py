"""
How train.py spreads the model over its ranks: DDP (every rank holds the whole model, gradients are
averaged) or FSDP2 (each rank holds 1/N of every weight, gradient and AdamW state: a unit per Block,
then the root, each gathered just before it computes and freed after), and activation checkpointing
per Block under either.

Under FSDP the blocks compute from bf16 copies of their weights (with bf16 autocast) and reduce their
gradients in fp32; the root (embedding, final norm, head) gathers fp32 weights, so the residual stream
stays fp32 as under DDP. With cpu_offload the shards, their gradients and the optimizer step live in
CPU memory, and each unit is copied to the GPU for its forward and backward.
"""

import torch
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint

import ranks


def checkpoint_blocks(gpt):
    """Each Block keeps only its input for the backward pass and recomputes the rest there: one block's
    activations in memory instead of all of them, for a second forward of each block. The same numbers."""
    for block in gpt.layers:
        block.forward = lambda *args, forward=block.forward: checkpoint(forward, *args, use_reentrant=False)


def shard(gpt, bf16, cpu_offload):
    """FSDP2 over all ranks, in place: one unit per Block, then the root. Weights on the CPU move to
    this rank's GPU one unit at a time, so the whole model is never on one GPU."""
    offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    blocks = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32,
                                  cast_forward_inputs=False)  # the fp32 residual stream comes in as it is
    for block in gpt.layers:
        fully_shard(block, mp_policy=blocks, offload_policy=offload)
    fully_shard(gpt, mp_policy=MixedPrecisionPolicy(reduce_dtype=torch.float32), offload_policy=offload)
    return gpt


def place(gpt, device, fsdp, bf16, cpu_offload, activation_checkpointing, from_shards):
    """gpt on this rank's device in fp32 (a converted checkpoint may hold bf16; autocast computes in bf16), or
    sharded over the ranks (fsdp: from the CPU, FSDP moving it unit by unit), its blocks checkpointed or not.
    from_shards: gpt was built on the meta device, its weights to come from a sharded checkpoint: it gets
    memory, no values."""
    if activation_checkpointing:
        checkpoint_blocks(gpt)
    if not from_shards:
        gpt.to(device='cpu' if fsdp else device, dtype=torch.float32)
    if fsdp:
        shard(gpt, bf16, cpu_offload)
    if from_shards:
        materialize(gpt, device, cpu_offload)
    return gpt


def replicate(model, device):
    """DDP under torchrun; the model itself in one process."""
    return DDP(model, device_ids=[ranks.local_rank] if device.startswith('cuda') else None) if ranks.ddp else model


def clip_gradients(gpt, max_norm):
    """Clip the global gradient norm to max_norm; return it (before clipping) as a number, sharded or not."""
    norm = torch.nn.utils.clip_grad_norm_(gpt.parameters(), max_norm)
    return (norm.full_tensor() if hasattr(norm, 'full_tensor') else norm).item()  # FSDP: a DTensor, summed over ranks


def local_bytes(tensors):
    """Bytes this rank holds of tensors: a sharded one's own piece."""
    return sum(t.to_local().nbytes if hasattr(t, 'to_local') else t.nbytes for t in tensors)


def materialize(gpt, device, cpu_offload):
    """Memory for a model built on the meta device (its weights then come from a checkpoint): the shards
    on this rank's device, or on the CPU when offloaded, where the buffers stay on the device."""
    gpt.to_empty(device='cpu' if cpu_offload else device)
    for module in gpt.modules():
        for name, buffer in module.named_buffers(recurse=False):
            module.register_buffer(name, buffer.to(device))
