"""
The attention transfer: before a softmax model is fine-tuned as DiJiang, each of its new DiJiang layers
learns to reproduce its softmax layer's attention output.

    python transfer.py --init_from=out-pythia-160m --data_dir=data/00-pythia --out_dir=out-transfer-160m --transfer_tokens=20_000_000
    python train.py config/train_finetune.py --init_from=out-transfer-160m --data_dir=data/00-pythia --out_dir=out-dijiang-160m

The teacher is the softmax model in init_from, frozen. The student is the same model linearized, as
train.py linearizes it (every pretrained weight kept; the gate, GroupNorm and P new, drawn with seed and
feature_seed). On each micro-batch the teacher runs once, and hooks on its attention modules read each
layer's input h_i = ln_attn(x_i) (x_i the residual stream entering block i) and output a_i; student
layer i is trained on MSE(attn_i(h_i), a_i). Every layer reads the teacher's own hidden states, so the
layers are independent: their losses add up, and one AdamW steps them all. Trained: each layer's qkv
(the feature map's input), gate and GroupNorm; proj stays the teacher's map from the heads to the
residual stream, so the transfer fits what replaces softmax and leaves proj to the fine-tune.

It writes out_dir/ckpt.pt (the linearized model and its tokenizer's name), config.json, tokenizer.json
(where init_from has one) and log.jsonl (the mean per-layer MSE of each step), once, at the end; out_dir
follows train.py's rules (rundir.py). The fine-tune reads the data from its start, the windows the
transfer read included: those fitted attention outputs, not next tokens. Batches, ranks (torchrun), the
optimizer and its schedule are train.py's; the gradients are averaged over the ranks by hand, since
the layers are called one by one, not through DDP's forward.
"""

import configurator
import signals

signals.stop_on_signals()  # before the heavy imports: Ctrl-C while torch loads is one line too

import math  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
from contextlib import nullcontext  # noqa: E402

import torch  # noqa: E402

import ranks  # noqa: E402
from atomic import atomic_write  # noqa: E402
from checkpoints import tokenizer_of  # noqa: E402
from dijiang import FEATURE_MAPS, FORMS  # noqa: E402
from model_dir import build_model, load_checkpoint, pick_device  # noqa: E402
from rundir import RunDir, append_log  # noqa: E402
from shards import Shards  # noqa: E402
from training import adamw, check_finite, cosine_lr, get_batch, split_batch  # noqa: E402

# -----------------------------------------------------------------------------
# settings: each can be overridden as --name=value
init_from = ''  # the softmax model to linearize, a folder of convert.py or train.py
out_dir = 'out-transfer'  # where the linearized model goes: ckpt.pt, config.json, log.jsonl, tokenizer.json
overwrite = False  # True: replace a run in out_dir (moved aside, put back if this one stops before it is done)
data_dir = ''  # token shards (data/prepare.py) in the teacher's vocabulary
transfer_tokens = 0  # train tokens to transfer on, rounded up to whole steps of batch_size; give it
feature_map = 'qmc'  # of the new DiJiang layers: 'qmc' (the paper), 'mc' (the released code), 'performer' or 'identity'
feature_seed = 0  # layer i draws its P with seed feature_seed + i (seed draws W_G)
form = 'chunk'  # how DiJiang is computed: 'chunk' (O(T) memory), 'parallel' or 'recurrent'
block_size = 0  # tokens per sequence; 0 means the teacher's context, the most it reads
batch_size = 524_288  # 2**19 tokens per optimizer step, all ranks together
micro_batch_size = 0  # sequences per rank in one forward/backward; 0: the most, up to 16, that split the batch evenly
lr = 1e-3  # peak lr of AdamW: linear warmup over a tenth of the steps, then cosine to min_lr
min_lr = 0.0
weight_decay = 0.1  # on weight matrices only
betas = (0.9, 0.95)
grad_clip = 1.0  # max global gradient norm; 0 disables clipping
log_interval = 10  # a line on stdout every log_interval steps (log.jsonl gets every step)
device = 'auto'  # 'auto' (cuda when available, else cpu), 'cpu' or 'cuda'; under torchrun, cuda:LOCAL_RANK
dtype = 'auto'  # 'auto' (bfloat16 autocast on CUDA, float32 on CPU), 'bfloat16' or 'float32'
cpu_threads = 0  # torch threads per process on a CPU; 0 shares the cores out among this machine's ranks
seed = 1337
join_timeout = 60  # seconds the ranks wait for each other to start (torchrun); then one line says which is missing
# -----------------------------------------------------------------------------
status = 'nothing was written'  # what a run that stops now leaves, for its one line; main() updates it


def teacher_attention_io(teacher, idx):
    """The teacher on tokens idx (B, T): per layer i, its attention's input h_i = ln_attn(x_i) and output
    a_i, as [(h_i, a_i)]; and the rotary cos, sin. Read off the teacher's own forward pass by hooks, so
    they are exactly what its blocks compute."""
    pairs, rotary = [], []

    def record(attn, args, output):  # attn(h, cos, sin, past) -> (a, cache)
        pairs.append((args[0], output[0]))
        rotary[:] = args[1:3]
    hooks = [block.attn.register_forward_hook(record) for block in teacher.layers]
    try:
        teacher(idx)
    finally:
        for hook in hooks:
            hook.remove()
    return pairs, *rotary


def transfer_parameters(model):
    """What the transfer trains in each DiJiang layer: qkv, the gate and the GroupNorm."""
    return [p for block in model.layers for part in (block.attn.qkv, block.attn.gate, block.attn.group_norm)
            for p in part.parameters()]


def main():
    global status, block_size, device
    configurator.check(bool(init_from), 'init_from', init_from, 'name the softmax model to linearize (a convert.py folder)')
    configurator.check(bool(data_dir), 'data_dir', data_dir, "name the token shards, in the teacher's vocabulary")
    configurator.check(transfer_tokens > 0, 'transfer_tokens', transfer_tokens, 'give the number of train tokens to transfer on')
    for name, allowed in (('feature_map', FEATURE_MAPS), ('form', FORMS), ('dtype', ('auto', 'bfloat16', 'float32'))):
        configurator.check(globals()[name] in allowed, name, globals()[name], f"use one of {', '.join(allowed)}")
    for name, low in dict(block_size=0, batch_size=1, micro_batch_size=0, log_interval=1, cpu_threads=0,
                          feature_seed=0, join_timeout=1).items():
        configurator.check(globals()[name] >= low, name, globals()[name], f"give an integer >= {low}")
    for name in ('lr', 'min_lr', 'weight_decay', 'grad_clip'):
        configurator.check(math.isfinite(globals()[name]) and globals()[name] >= 0, name, globals()[name],
                           'give a finite number >= 0')
    configurator.check(len(betas) == 2 and all(type(b) in (int, float) and 0 <= b < 1 for b in betas), 'betas', betas,
                       'give two numbers from 0 up to (not including) 1, e.g. (0.9, 0.95)')
    configurator.check(0 <= seed < 2 ** 32, 'seed', seed, 'give a seed from 0 to 2**32 - 1')
    ckpt = load_checkpoint(init_from)  # read once: the teacher and the student are both made from it
    context = ckpt['config'].get('block_size', 0)
    configurator.check(ckpt['config'].get('attention') == 'softmax', 'init_from', init_from,
                       'the transfer needs a softmax model to learn from; this one is DiJiang already')
    block_size = block_size or context
    configurator.check(block_size <= context, 'block_size', block_size,
                       f"the softmax teacher's context is {context}: lower --block_size")
    device = ranks.start(device, cpu_threads, join_timeout)
    autocast = torch.autocast(device.partition(':')[0], dtype=torch.bfloat16) if pick_device(device, dtype)[1] == torch.bfloat16 else nullcontext()
    with ranks.one_voice(lambda: status), RunDir(out_dir, True, overwrite, owner=ranks.rank == 0) as run:
        status = run.status()
        torch.manual_seed(seed)  # the student first: W_G is drawn as train.py draws it when it linearizes
        student = build_model(ckpt, init_from, form, attention='dijiang', feature_map=feature_map,
                              feature_seed=feature_seed).to(device=device, dtype=torch.float32)
        for p in student.parameters():  # its own copy: the teacher shares the checkpoint's tensors
            p.data = p.data.clone()
        teacher = build_model(ckpt, init_from).to(device=device, dtype=torch.float32).eval().requires_grad_(False)
        data = Shards(data_dir, 'train', block_size)
        identity = tokenizer_of(ckpt, init_from)
        data.check_tokenizer(identity, teacher.config.vocab_size,
                             f"tokenize with python data/prepare.py --tokenizer={init_from} ...")
        micro_batch, accumulation = split_batch(batch_size, block_size, micro_batch_size)
        iters = -(-transfer_tokens // batch_size)
        params = transfer_parameters(student)
        optimizer = adamw(params, lr, weight_decay, betas, device)
        if ranks.rank == 0:
            print(f"{iters} steps of attention transfer from {init_from}, {iters * batch_size:,} tokens of {data_dir} = "
                  f"{ranks.world_size} ranks * {accumulation} micro-steps * {micro_batch} * {block_size}; {device}", flush=True)
        for step in range(1, iters + 1):
            t0 = time.time()
            mse_sum = torch.zeros((), device=device)
            for micro_step in range(accumulation):
                x, _ = get_batch(data, (step - 1) * (batch_size // block_size), micro_step, micro_batch, device)
                with torch.no_grad(), autocast:
                    pairs, cos, sin = teacher_attention_io(teacher, x)
                for block, (h, a) in zip(student.layers, pairs):
                    with autocast:
                        y = block.attn(h, cos, sin)[0]
                    mse = (y.float() - a.float()).pow(2).mean()
                    (mse / accumulation).backward()  # layer by layer: one layer's graph in memory at a time
                    mse_sum += mse.detach()
            ranks.average_gradients(params)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf).item()
            mse = ranks.mean(mse_sum / (accumulation * len(pairs)))
            check_finite('transfer MSE', mse, step, status)
            check_finite('gradient norm', grad_norm, step, status)
            step_lr = cosine_lr(step - 1, lr, max(1, iters // 10), iters, min_lr)
            for group in optimizer.param_groups:
                group['lr'] = step_lr
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            row = dict(step=step, transfer_mse=mse, lr=step_lr, grad_norm=grad_norm,
                       tokens_per_s=batch_size / max(time.time() - t0, 1e-9))
            if ranks.rank == 0:
                append_log(os.path.join(out_dir, 'log.jsonl'), row)
                if step % log_interval == 0 or step == iters:
                    print(f"step {step:>4}/{iters} | mse {mse:.6f} | lr {step_lr:.2e} | grad norm {grad_norm:.3f} | "
                          f"{row['tokens_per_s']:,.0f} tok/s", flush=True)
        if ranks.rank == 0:
            student.save_checkpoint(out_dir, tokenizer=identity,
                                    transfer=dict(teacher=init_from, tokens=iters * batch_size, mse=mse))
            if os.path.isfile(os.path.join(init_from, 'tokenizer.json')):
                atomic_write(os.path.join(out_dir, 'tokenizer.json'),
                             lambda tmp: shutil.copyfile(os.path.join(init_from, 'tokenizer.json'), tmp))
        run.checkpointed()
    if ranks.rank == 0:
        print(f"the linearized model is in {out_dir}/ (transfer MSE {mse:.6f}); fine-tune it with: python train.py "
              f"config/train_finetune.py --init_from={out_dir} --data_dir={data_dir} --out_dir=...", flush=True)
    ranks.finish()


if __name__ == '__main__':
    configurator.run(main, kept=lambda: status)
