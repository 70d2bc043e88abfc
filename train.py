"""
Train a DiJiang (or softmax Pythia) language model on token shards from data/prepare.py.

    python train.py                                    # the demo: a tiny DiJiang model, byte-level, default corpus
    python train.py --init_from=out-pythia-160m --data_dir=data/00-pythia   # fine-tune a convert.py dir
    torchrun --standalone --nproc_per_node=8 train.py  # DDP on one node (any of the above)
    python train.py --init_from=resume                 # continue the run in out_dir, bit for bit
    python train.py --help                             # every setting and its default

Settings resolve in this order: the defaults below (the demo's); then, for init_from=DIR, the
released fine-tuning recipe (FINETUNE_RECIPE), or, for init_from=resume, the settings the run in
out_dir was started with; then the command line. The demo builds its data (data/prepare.py's default
corpus) on first use.

Ranks read the train windows in order: each optimizer step takes the next batch_size tokens, which
micro-step m of rank r reads from window position + (m * world_size + r) * micro_batch_size on, so
no two ranks see the same data and the result does not depend on how the batch is split. The data
position is saved with each checkpoint.
"""

import json
import math
import os
import random
import resource
import shutil
import sys
import time
from contextlib import contextmanager, nullcontext

# OpenMP's worker threads spin while they wait for work: on a CPU that also runs anything else, that
# makes a small model's training ten times slower; waiting passively costs little on an idle one.
# OpenMP reads this when torch loads it, so it is set before the imports below.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

from atomic import atomic_write
from configurator import (check, check_device, check_floats, check_ints, exit_on_interrupt, interrupts_deferred,
                          is_number, parse_settings, settings_help)
from data.prepare import prepare
from dijiang import ATTENTIONS, CONFIGS, FEATURE_MAPS, FORMS, GPT, GPTConfig, load_checkpoint
from shards import Shards
from tokenizer import Tokenizer


def kept():
    """What a stopped run leaves, for its one line: the checkpoint to resume from."""
    if eval_only:
        return 'nothing was written'
    if last_saved is not None:
        return f"{os.path.join(out_dir, 'ckpt.pt')} (step {last_saved}) is the last checkpoint; resume with --init_from=resume"
    return 'no checkpoint of this run was written yet'


def stopped_line():
    return kept() if master else None  # rank 0 speaks for the run


exit_on_interrupt(stopped_line)  # until the run is set up, stopped_line raises NameError: a plainer line

# -----------------------------------------------------------------------------
# settings: each can be overridden as --name=value
# I/O
out_dir = 'out'  # checkpoints (ckpt.pt, config.json, tokenizer.json) and log.jsonl; GPT.from_checkpoint(out_dir) loads it
init_from = 'scratch'  # 'scratch', 'resume' (the run in out_dir) or a directory written by convert.py to fine-tune
overwrite = False  # a new run (not init_from=resume) into an out_dir that holds a ckpt.pt replaces that run only when True
data_dir = 'data/stdlib-bytes'  # shards from data/prepare.py; this default one is built on first use
# model: `model` applies from scratch; attention, form and feature_map also to init_from=DIR
model = 'small'  # a name in dijiang.CONFIGS: tiny, small (the demo's), pythia-70m ... pythia-12b
attention = 'dijiang'  # 'dijiang' or 'softmax'; a softmax checkpoint trained as 'dijiang' is linearized (the paper)
form = 'chunk'  # DiJiang's attention form for training: 'chunk' (O(T) memory), 'parallel' or 'recurrent'
feature_map = 'qmc'  # for new DiJiang layers: 'qmc' (the paper), 'mc' (the released code), 'performer' or 'identity'
feature_seed = 0  # for new DiJiang layers: layer i draws its P with seed feature_seed + i (seed draws the rest, W_G included)
# batch and schedule
block_size = 128  # tokens per sequence
batch_size = 2048  # tokens per optimizer step, all ranks together: accumulation = batch_size / (micro_batch_size * block_size * world_size)
micro_batch_size = 16  # sequences per rank in one forward/backward
max_iters = 1200  # optimizer steps; 0 means one epoch of the train split
lr_decay_iters = 0  # length of the cosine decay in steps; 0 means max_iters
warmup = 50  # steps of linear warmup
lr = 2e-3  # the peak learning rate (a small model from scratch takes a high one; fine-tunes use 3e-4)
min_lr = 0.0  # where the cosine ends (the released recipe's HF cosine ends at 0)
weight_decay = 0.1  # AdamW, on weight matrices and embeddings only: not on norms, biases or gains
betas = (0.9, 0.95)
grad_clip = 1.0  # max global gradient norm; 0 disables clipping
# attention transfer, when linearizing (init_from a softmax checkpoint, attention='dijiang')
transfer_tokens = 0  # before fine-tuning a linearized model: tokens (whole steps of batch_size) spent training each DiJiang
                     # layer's attention to reproduce its frozen softmax teacher's attention output (MSE); 0 skips it
transfer_lr = 1e-3  # peak lr of the transfer's AdamW: warmup over a tenth of its steps, then cosine to min_lr
# eval and logging
eval_interval = 200  # val loss and a checkpoint every eval_interval steps, and at the end
eval_iters = 20  # val micro-batches per rank
log_interval = 50  # a log line every log_interval steps
eval_only = False  # measure the val loss at block_size once and exit: e.g. a checkpoint at a longer context
peak_flops = 989e12  # per device, for MFU: H100 SXM dense bf16
# system
device = 'auto'  # 'auto' (cuda when available, else cpu), 'cpu' or 'cuda'; under torchrun, cuda:LOCAL_RANK
dtype = 'auto'  # 'auto' (bfloat16 autocast on CUDA, float32 on CPU), 'bfloat16' or 'float32'
cpu_threads = 0  # torch threads per process on a CPU; 0 shares the cores out among this machine's ranks
compile = False  # torch.compile the model
seed = 1337
# -----------------------------------------------------------------------------
# Fine-tuning a convert.py directory follows the released DiJiang recipe (HF Trainer, AdamW as above,
# bf16, block 2048, 1000 warmup steps, cosine, one epoch). Its batch size is not published: this one
# is Pythia's own, 2M tokens.
FINETUNE_RECIPE = dict(lr=3e-4, block_size=2048, batch_size=2 ** 21, micro_batch_size=8, max_iters=0, warmup=1000,
                       eval_interval=500, eval_iters=50)
SETTINGS = {name: value for name, value in globals().items()
            if not name.startswith('_') and isinstance(value, (bool, int, float, str, tuple))}
DEFAULT_DATA_DIR = data_dir

# Resolve the settings: defaults, then the recipe or the resumed run's, then the command line
overrides = parse_settings(sys.argv[1:], SETTINGS, settings_help(__file__))
init_from, out_dir = overrides.get('init_from', init_from), overrides.get('out_dir', out_dir)
resumed = None  # the checkpoint being resumed
if init_from == 'resume':
    ckpt_path = os.path.join(out_dir, 'ckpt.pt')
    if not os.path.isfile(ckpt_path):
        raise SystemExit(f"error: init_from=resume but there is no {ckpt_path}: pass the run's --out_dir, or init_from=scratch")
    try:
        resumed = load_checkpoint(out_dir)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    if 'settings' not in resumed:
        raise SystemExit(f"error: {ckpt_path} is a converted model, with no training run to resume: fine-tune it with "
                         f"--init_from={out_dir} and a new --out_dir")
    missing = [key for key in ('optimizer', 'step', 'data_position', 'rng', 'tokenizer') if key not in resumed]
    if missing or not isinstance(resumed['settings'], dict):
        raise SystemExit(f"error: {ckpt_path} has no {(missing or ['settings'])[0]!r} entry: it was not written by "
                         "train.py, so it cannot be resumed; fine-tune it with --init_from=DIR instead")
    base = {**{k: v for k, v in resumed['settings'].items() if k in SETTINGS and k != 'overwrite'},
            'init_from': 'resume', 'out_dir': out_dir}
elif init_from != 'scratch':
    base = FINETUNE_RECIPE
else:
    base = {}
globals().update({**base, **overrides})
settings = {name: globals()[name] for name in SETTINGS}  # saved with each checkpoint
last_saved = resumed['step'] if resumed is not None else None  # the step of the checkpoint this run leaves in out_dir
origin = resumed['settings'].get('init_from', 'scratch') if resumed is not None else init_from  # where the model began

# Every setting is checked before anything is read or written: the first bad one stops the run with one line
check(init_from != 'scratch' or model in CONFIGS, 'model', model, f"use one of {', '.join(CONFIGS)}")
for name, allowed in (('attention', ATTENTIONS), ('form', FORMS), ('feature_map', FEATURE_MAPS)):
    check(settings[name] in allowed, name, settings[name], f"use one of {', '.join(allowed)}")
check_ints(settings, dict(block_size=1, batch_size=1, micro_batch_size=1, max_iters=0, lr_decay_iters=0, warmup=0,
                          eval_interval=1, eval_iters=1, log_interval=1, transfer_tokens=0, cpu_threads=0, feature_seed=0))
check(0 <= seed < 2 ** 32, 'seed', seed, 'give a seed from 0 to 2**32 - 1')
check_floats(settings, ('lr', 'min_lr', 'weight_decay', 'grad_clip', 'transfer_lr'))
check_floats(settings, ('peak_flops',), positive=True)
check(len(betas) == 2 and all(is_number(b) and 0 <= b < 1 for b in betas), 'betas', betas,
      'give two numbers from 0 up to (not including) 1, e.g. (0.9, 0.95)')
check(dtype in ('auto', 'bfloat16', 'float32'), 'dtype', dtype, "use 'auto', 'bfloat16' (autocast, fp32 weights) or 'float32'")
check(bool(out_dir), 'out_dir', out_dir, 'name the folder for the checkpoints and the log')
check_device(device)
# a new run never replaces an earlier one unasked (eval_only writes nothing)
if init_from != 'resume' and not eval_only and not overwrite and os.path.isfile(os.path.join(out_dir, 'ckpt.pt')):
    raise SystemExit(f"error: {os.path.join(out_dir, 'ckpt.pt')} holds an earlier run: continue it with --init_from=resume, "
                     "write this run to another --out_dir, or replace it with --overwrite=True")

# -----------------------------------------------------------------------------
# Processes and devices: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE

ddp = 'RANK' in os.environ and 'WORLD_SIZE' in os.environ
rank, local_rank = int(os.environ.get('RANK', 0)), int(os.environ.get('LOCAL_RANK', 0))
world_size = int(os.environ.get('WORLD_SIZE', 1))
master = rank == 0  # logs and writes checkpoints
if device == 'auto':
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
if device == 'cuda':
    device = f'cuda:{local_rank}'  # an explicit index: set_device and DDP need one
device_type = 'cuda' if device.startswith('cuda') else 'cpu'
if device_type == 'cuda':
    torch.cuda.set_device(device)
else:  # torch's default, a thread per core in every process, oversubscribes the cores under torchrun
    local_world_size = int(os.environ.get('LOCAL_WORLD_SIZE', 1))
    torch.set_num_threads(cpu_threads or max(1, (os.cpu_count() or 1) // local_world_size))
if dtype == 'auto':
    dtype = 'bfloat16' if device_type == 'cuda' and torch.cuda.is_bf16_supported() else 'float32'
autocast = torch.autocast(device_type, dtype=torch.bfloat16) if dtype == 'bfloat16' else nullcontext()

# The demo's data is built on first use, by rank 0 before the others can join the process group
if master and data_dir == DEFAULT_DATA_DIR and not os.path.isfile(os.path.join(data_dir, 'prepare.json')):
    try:
        prepare(out_dir=data_dir)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
if ddp:
    dist.init_process_group(backend='nccl' if device_type == 'cuda' else 'gloo')
torch.manual_seed(seed)
np.random.seed(seed)
random.seed(seed)

# -----------------------------------------------------------------------------
# Data

try:
    train_data = Shards(data_dir, 'train', block_size)
    val_data = Shards(data_dir, 'val', block_size)
    val_data.check_tokenizer(train_data.tokenizer, train_data.vocab_size, "rerun data/prepare.py into an empty folder")
    # a second, out-of-distribution val split (val_ood_*.bin), where data/prepare.py wrote one: evaluated beside val
    val_ood_data = None
    if any(name.startswith('val_ood_') and name.endswith('.bin') for name in os.listdir(data_dir)):
        val_ood_data = Shards(data_dir, 'val_ood', block_size)
        val_ood_data.check_tokenizer(train_data.tokenizer, train_data.vocab_size, "rerun data/prepare.py into an empty folder")
except ValueError as e:
    raise SystemExit(f"error: {e}")

micro_tokens = micro_batch_size * block_size
accumulation, remainder = divmod(batch_size, micro_tokens * world_size)
if remainder or accumulation == 0:
    raise SystemExit(f"error: batch_size={batch_size} tokens is not a multiple of micro_batch_size * block_size * "
                     f"world_size = {micro_batch_size} * {block_size} * {world_size}: change one of them")
windows_per_step = batch_size // block_size
if max_iters == 0:  # one epoch
    max_iters = train_data.num_windows // windows_per_step
    if max_iters == 0:
        raise SystemExit(f"error: {data_dir} holds {train_data.num_tokens} train tokens, less than one batch of {batch_size}")
lr_decay_iters = lr_decay_iters or max_iters
transfer_iters = -(-transfer_tokens // batch_size)  # steps of the attention transfer, before step 1


def window_start(position, micro_step):
    """The first window this rank reads in micro-step micro_step of the step that starts at position."""
    return position + (micro_step * world_size + rank) * micro_batch_size


def get_batch(data, start):
    windows = torch.from_numpy(data.windows(start, micro_batch_size))  # (B, T + 1)
    if device_type == 'cuda':
        windows = windows.pin_memory().to(device, non_blocking=True)
    return windows[:, :-1], windows[:, 1:]  # inputs and next-token targets, (B, T) each

# -----------------------------------------------------------------------------
# Model and optimizer


@contextmanager
def out_of_memory_is_one_line(doing):
    """Running out of memory while `doing` stops the run with one line: what ran, and what to change."""
    try:
        yield
    except RuntimeError as e:  # torch.OutOfMemoryError is one; the CPU allocator raises a plain RuntimeError
        if not (isinstance(e, torch.OutOfMemoryError) or 'out of memory' in str(e) or "can't allocate memory" in str(e)):
            raise
        what = f"model={model}" if origin == 'scratch' else f"the model from {origin}"
        ranks = f" on each of {world_size} ranks" if ddp else ''
        raise SystemExit(f"error: out of memory on {device} {doing} ({what}, micro_batch_size={micro_batch_size}, "
                         f"block_size={block_size}{ranks}): lower --micro_batch_size (batch_size={batch_size} stays: more "
                         "micro-steps add up to it), shorten --block_size, or spread the batch over more ranks "
                         f"(torchrun --nproc_per_node=N); {kept()}") from None


start_step, position = 0, 0  # optimizer steps done and windows consumed
linearize = False  # a softmax checkpoint becoming DiJiang
if init_from == 'scratch':
    # pad the vocab to a multiple of 128, as GPT-NeoX does (Pythia's 50277 tokens -> 50304)
    vocab_size = -(-train_data.vocab_size // 128) * 128
    try:
        config = GPTConfig.named(model, attention=attention, form=form, feature_map=feature_map, feature_seed=feature_seed,
                                 block_size=block_size, vocab_size=vocab_size)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    with out_of_memory_is_one_line('building the model'):
        gpt = GPT(config)
    model_tokenizer, fix = train_data.tokenizer, ''
elif init_from == 'resume':
    try:
        gpt = GPT.from_checkpoint(out_dir)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    start_step, position = resumed['step'], resumed['data_position']
    model_tokenizer = resumed['tokenizer']
    fix = f"resume on the data the run used ({resumed['settings']['data_dir']}), or start a new out_dir"
else:
    ckpt_path = os.path.join(init_from, 'ckpt.pt')
    if not os.path.isfile(ckpt_path):
        raise SystemExit(f"error: init_from={init_from}: no ckpt.pt there; pass 'scratch', 'resume' or a convert.py directory")
    try:
        pretrained = load_checkpoint(init_from)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    # attention='dijiang' on a softmax checkpoint linearizes it (the paper's Algorithm 1): every
    # pretrained weight is kept, and the new gate, GroupNorm and P start from the released code's init
    linearize = pretrained['config'].get('attention') == 'softmax' and attention == 'dijiang'
    if linearize and transfer_tokens > 0 and block_size > pretrained['config']['block_size']:
        raise SystemExit(f"error: block_size={block_size} is longer than the softmax teacher's context "
                         f"({pretrained['config']['block_size']}) that the attention transfer reads: lower --block_size")
    try:
        new_layers = dict(feature_map=feature_map, feature_seed=feature_seed) if linearize else {}
        gpt = GPT.from_checkpoint(init_from, attention=attention, form=form, **new_layers)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    # the model's tokenizer: named in a train.py checkpoint, or the tokenizer.json beside a convert.py one
    model_tokenizer = pretrained.get('tokenizer')
    if model_tokenizer is None and os.path.isfile(os.path.join(init_from, 'tokenizer.json')):
        try:
            model_tokenizer = Tokenizer.from_dir(init_from).identity
        except ValueError as e:
            raise SystemExit(f"error: {e}")
    fix = f"tokenize with python data/prepare.py --tokenizer={init_from} ..."
    del pretrained
if transfer_tokens < 0 or (transfer_tokens > 0 and init_from != 'resume' and not linearize):
    raise SystemExit(f"error: transfer_tokens={transfer_tokens}: the attention transfer trains linearized DiJiang layers "
                     "to match their softmax teacher; it needs --init_from=<a softmax checkpoint dir> and "
                     "--attention=dijiang, and transfer_tokens >= 0")
config = gpt.config
try:
    train_data.check_tokenizer(model_tokenizer, config.vocab_size, fix)
except ValueError as e:
    raise SystemExit(f"error: {e}")
tokenizer_json = os.path.join(data_dir, 'tokenizer.json')
if train_data.tokenizer != 'bytes' and not os.path.isfile(tokenizer_json):
    raise SystemExit(f"error: {data_dir} was made with {train_data.tokenizer} but holds no tokenizer.json: rerun data/prepare.py")
if config.attention == 'softmax' and block_size > config.block_size:
    raise SystemExit(f"error: block_size={block_size} is longer than this softmax model's context "
                     f"({config.block_size}): lower --block_size, or train it as --attention=dijiang")
with out_of_memory_is_one_line('placing the model'):
    gpt.to(device=device, dtype=torch.float32)  # fp32 weights (a converted checkpoint may hold bf16); autocast computes in bf16



def adamw(params, peak_lr):
    """AdamW with weight decay on matrices (linear weights, embeddings), not on norms, biases or gains."""
    params = list(params)
    return torch.optim.AdamW([dict(params=[p for p in params if p.dim() >= 2], weight_decay=weight_decay),
                              dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)],
                             lr=peak_lr, betas=betas, fused=device_type == 'cuda')


optimizer = adamw(gpt.parameters(), lr)
if resumed is not None:
    try:
        optimizer.load_state_dict(resumed['optimizer'])
        rng = resumed['rng']
        torch.set_rng_state(rng['torch'])
        if device_type == 'cuda' and len(rng['cuda']) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(rng['cuda'])
        np.random.set_state((rng['numpy'][0], rng['numpy'][1].numpy().astype(np.uint32), *rng['numpy'][2:]))
        random.setstate(rng['python'])
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as e:
        raise SystemExit(f"error: {os.path.join(out_dir, 'ckpt.pt')}: its optimizer or random state does not fit the "
                         f"model ({type(e).__name__}): the file is damaged; restore it, or start again with "
                         "--init_from=scratch --overwrite=True") from None
    del resumed

eval_model = torch.compile(gpt) if compile else gpt
train_model = DDP(eval_model, device_ids=[local_rank] if device_type == 'cuda' else None,
                  broadcast_buffers=False) if ddp else eval_model  # the buffers (P, decay) are fixed


def cosine_lr(step, peak, warmup, decay_iters):
    """Learning rate of update step + 1: linear warmup to peak, then cosine to min_lr at decay_iters."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, decay_iters - warmup))
    return min_lr + 0.5 * (peak - min_lr) * (1 + math.cos(math.pi * progress))


def lr_at(step):
    return cosine_lr(step, lr, warmup, lr_decay_iters)


def mean_over_ranks(value):
    if ddp:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)  # gloo has no AVG
        value = value / world_size
    return value.item()


@out_of_memory_is_one_line('in a training step')
def train_step(position):
    """One optimizer step on the batch_size tokens starting at window `position`. Returns the loss
    and the gradient norm (before clipping), both averaged over the ranks."""
    loss_sum = torch.zeros((), device=device)
    for micro_step in range(accumulation):
        x, y = get_batch(train_data, window_start(position, micro_step))
        last = micro_step == accumulation - 1
        with (nullcontext() if last or not ddp else train_model.no_sync()):  # all-reduce grads once, at the last
            with autocast:
                _, loss = train_model(x, y)
            (loss / accumulation).backward()
        loss_sum += loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(gpt.parameters(), grad_clip if grad_clip > 0 else math.inf)
    return mean_over_ranks(loss_sum / accumulation), grad_norm.item()


@torch.no_grad()
@out_of_memory_is_one_line('evaluating')
def evaluate(data):
    """Mean loss over the first eval_iters * world_size micro-batches of a val split: the same tokens every time."""
    eval_model.eval()
    loss_sum = torch.zeros((), device=device)
    for i in range(eval_iters):
        x, y = get_batch(data, (i * world_size + rank) * micro_batch_size)
        with autocast:
            loss_sum += eval_model(x, y)[1]
    eval_model.train()
    return mean_over_ranks(loss_sum / eval_iters)


def evaluate_splits():
    """{'val_loss': ...} and, where the data has the split, 'val_loss_ood'."""
    losses = dict(val_loss=evaluate(val_data))
    if val_ood_data is not None:
        losses['val_loss_ood'] = evaluate(val_ood_data)
    return losses


def rng_state():
    numpy_state = np.random.get_state()  # ('MT19937', keys uint32 (624,), pos, has_gauss, gauss)
    return dict(torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state_all() if device_type == 'cuda' else [],
                numpy=[numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]],
                python=random.getstate())


def save_checkpoint(step, position):
    try:  # written whole or not at all (atomic.py): a full disk leaves the last checkpoint as it was
        gpt.save_checkpoint(out_dir, optimizer=optimizer.state_dict(), step=step, data_position=position,
                            tokenizer=model_tokenizer or train_data.tokenizer, settings=settings, rng=rng_state())
    except OSError as e:
        raise SystemExit(f"error: cannot write the checkpoint of step {step} into {out_dir} ({e.strerror}): make room "
                         f"or pass another --out_dir; {kept()}") from None


def peak_memory_mib():
    if device_type == 'cuda':
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 10  # the process's peak RSS (KiB on Linux)


def stop_non_finite(what, value, step):
    """Stop all ranks alike (the values are averaged over the ranks) before the update; the last
    checkpoint stays as it was."""
    if ddp:
        dist.destroy_process_group()
    kept = (f"{out_dir}/ckpt.pt (step {last_saved}) is the last good checkpoint" if last_saved is not None
            else "no checkpoint was written yet")
    raise SystemExit(f"error: non-finite {what} ({value}) at step {step}: stopped; {kept}. "
                     "Lower lr or check the data, then --init_from=resume")

# -----------------------------------------------------------------------------
# Attention transfer: before the LM fine-tune of a linearized model, each DiJiang layer's attention
# learns to reproduce its softmax teacher's output (MSE), reading the teacher's own hidden states.
# So the layers are independent: their losses add up, and one AdamW steps them all.


def teacher_attention_io(teacher, idx):
    """The teacher on tokens idx (B, T): per layer i, its attention's input h_i = ln_attn(x_i), x_i the
    residual stream entering block i, and its output a_i, as [(h_i, a_i)]; and the rotary cos, sin.
    Read off the teacher's own forward pass by hooks, so they are exactly what its blocks compute."""
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
    """What the transfer trains in each DiJiang layer: qkv (the input of the feature map), the gate and
    the GroupNorm. The output projection proj stays as pretrained: it is the teacher's own map from
    the heads to the residual stream, so with it fixed the transfer fits what replaces softmax (the
    heads' output, gated and normalized) and leaves proj to the LM fine-tune."""
    return [p for block in model.layers for part in (block.attn.qkv, block.attn.gate, block.attn.group_norm)
            for p in part.parameters()]


@out_of_memory_is_one_line('in the attention transfer')
def transfer_attention(position):
    """transfer_iters steps of batch_size train tokens from window `position` on, read as the main loop
    reads them (rank-strided micro-steps); logs the mean per-layer MSE. Returns the new position."""
    teacher = GPT.from_checkpoint(init_from).to(device=device, dtype=torch.float32).eval().requires_grad_(False)
    params = transfer_parameters(gpt)
    transfer_optimizer = adamw(params, transfer_lr)
    transfer_warmup = max(1, transfer_iters // 10)
    for t in range(transfer_iters):
        t0 = time.time()
        mse_sum = torch.zeros((), device=device)
        for micro_step in range(accumulation):
            x, _ = get_batch(train_data, window_start(position, micro_step))
            with torch.no_grad(), autocast:
                pairs, cos, sin = teacher_attention_io(teacher, x)
            for block, (h, a) in zip(gpt.layers, pairs):
                with autocast:
                    y = block.attn(h, cos, sin)[0]
                mse = (y.float() - a.float()).pow(2).mean()
                (mse / accumulation).backward()  # layer by layer: one layer's graph in memory at a time
                mse_sum += mse.detach()
        if ddp:  # the same averaged gradients on every rank (DDP's own hooks serve only its forward)
            for p in params:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                p.grad /= world_size
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf).item()
        mse = mean_over_ranks(mse_sum / (accumulation * len(pairs)))
        for what, value in (('transfer MSE', mse), ('transfer gradient norm', grad_norm)):
            if not math.isfinite(value):
                stop_non_finite(what, value, f"{t + 1} of the attention transfer")
        step_lr = cosine_lr(t, transfer_lr, transfer_warmup, transfer_iters)
        for group in transfer_optimizer.param_groups:
            group['lr'] = step_lr
        transfer_optimizer.step()
        transfer_optimizer.zero_grad(set_to_none=True)
        position += windows_per_step
        if master:
            log(dict(step=0, transfer_step=t + 1, transfer_mse=mse, lr=step_lr, grad_norm=grad_norm,
                     tokens_per_s=batch_size / max(time.time() - t0, 1e-9)))
    return position

# -----------------------------------------------------------------------------
# Training loop


log_path = os.path.join(out_dir, 'log.jsonl')


def log_lines_up_to(path, last_step):
    """The lines of an earlier log for steps up to last_step, the ones the checkpoint holds. A torn
    last line (a crash while it was being written) is dropped; any other line that is not a log row
    stops the run, before anything is written."""
    with open(path, encoding='utf-8', errors='replace') as f:
        lines = f.readlines()
    kept_lines = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            step = json.loads(line)['step']
        except (ValueError, KeyError, TypeError):
            step = None
        if not is_number(step):
            if number == len(lines):
                print(f"note: {path}: its last line was cut short (a crash while it was written): dropped")
                break
            raise SystemExit(f"error: {path}, line {number}: not a log row (a JSON object with a 'step'): "
                             "delete that line, or the whole log, and resume again")
        if step <= last_step:
            kept_lines.append(line if line.endswith('\n') else line + '\n')
    return kept_lines


def json_line(row):
    """A log row as one line of strict JSON: a value that is not finite (nan, inf) is written as null."""
    row = {key: None if isinstance(value, float) and not math.isfinite(value) else value for key, value in row.items()}
    return json.dumps(row, allow_nan=False) + '\n'


if master and not eval_only:  # eval_only writes nothing
    # keep the log of the steps the checkpoint holds, drop any logged after it
    rows = log_lines_up_to(log_path, start_step) if start_step > 0 and os.path.isfile(log_path) else []

    def write_rows(tmp):
        with open(tmp, 'w') as f:
            f.writelines(rows)
    try:
        os.makedirs(out_dir, exist_ok=True)
        if train_data.tokenizer != 'bytes':  # the model's tokenizer goes with its checkpoints
            atomic_write(os.path.join(out_dir, 'tokenizer.json'), lambda tmp: shutil.copyfile(tokenizer_json, tmp))
        atomic_write(log_path, write_rows)  # a crash leaves the old log whole, or the kept rows
    except OSError as e:
        raise SystemExit(f"error: out_dir={out_dir}: cannot write there ({e.strerror}): pass another --out_dir") from None
if master:
    print(f"{gpt.num_params() / 1e6:.2f}M parameters, {config.attention} attention ({config.form}), "
          f"{init_from}; {data_dir}: {train_data.num_tokens:,} train tokens ({train_data.tokenizer})")
    print(f"{max_iters} steps of {batch_size:,} tokens = {world_size} ranks * {accumulation} micro-steps * "
          f"{micro_batch_size} * {block_size}; {device}, {dtype}, from step {start_step}")
    if transfer_iters and start_step == 0:
        print(f"first, {transfer_iters} steps of attention transfer from {init_from} ({transfer_iters * batch_size:,} tokens)")
# the ranks share stdout: each rank's line goes out in one write, its newline included (print would write
# the newline separately when Python's output is unbuffered, and another rank's line could come between)
print(f"rank {rank}/{world_size}: first micro-batch = train windows {window_start(position, 0)}.."
      f"{window_start(position, 0) + micro_batch_size - 1}\n", end='', flush=True)


def log(row):
    if 'transfer_step' in row:  # rows of the attention transfer, before step 1
        parts = [f"transfer {row['transfer_step']:>4}/{transfer_iters}", f"mse {row['transfer_mse']:.6f}",
                 f"lr {row['lr']:.2e}", f"grad norm {row['grad_norm']:.3f}", f"{row['tokens_per_s']:,.0f} tok/s"]
        print(' | '.join(parts), flush=True)
        with open(log_path, 'a') as f:
            f.write(json_line(row))
        return
    parts = [f"step {row['step']:>5}/{max_iters}"]
    if 'loss' in row:
        parts += [f"loss {row['loss']:.4f}"]
    if 'val_loss' in row:
        parts += [f"val {row['val_loss']:.4f}"]
    if 'val_loss_ood' in row:
        parts += [f"val_ood {row['val_loss_ood']:.4f}"]
    if 'loss' in row:
        parts += [f"lr {row['lr']:.2e}", f"grad norm {row['grad_norm']:.3f}", f"{row['tokens_per_s']:,.0f} tok/s",
                  f"MFU {100 * row['mfu']:.2f}%", f"peak mem {row['peak_mem_mib']:,.0f} MiB"]
    print(' | '.join(parts), flush=True)
    with open(log_path, 'a') as f:
        f.write(json_line(row))


flops_per_token = gpt.flops_per_token(block_size)
if eval_only:
    losses = evaluate_splits()
    if master:
        for name, loss in losses.items():
            print(f"{name.replace('_loss', '')} loss {loss:.4f}, perplexity {math.exp(loss):.3f}, at block_size {block_size} "
                  f"({eval_iters * micro_batch_size * world_size} windows)", flush=True)
    if ddp:
        dist.destroy_process_group()
    sys.exit(0)
if transfer_iters and start_step == 0:  # a resumed run did its transfer already
    position = transfer_attention(position)
if start_step == 0:
    losses = evaluate_splits()
    if master:
        log(dict(step=0, **losses))
step_seconds, steps_timed = 0.0, 0
for step in range(start_step + 1, max_iters + 1):
    t0 = time.time()
    step_lr = lr_at(step - 1)
    loss, grad_norm = train_step(position)
    if not math.isfinite(loss):
        stop_non_finite('loss', loss, step)
    if not math.isfinite(grad_norm):
        stop_non_finite('gradient norm', grad_norm, step)
    for group in optimizer.param_groups:
        group['lr'] = step_lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    position += windows_per_step
    step_seconds, steps_timed = step_seconds + time.time() - t0, steps_timed + 1

    row = dict(step=step, loss=loss, lr=step_lr, grad_norm=grad_norm)
    if step % eval_interval == 0 or step == max_iters:
        row.update(evaluate_splits())
        if not math.isfinite(row['val_loss']):
            stop_non_finite('val loss', row['val_loss'], step)
        with interrupts_deferred():  # a Ctrl-C now stops the run once the checkpoint is whole and counted
            if master:
                save_checkpoint(step, position)
            last_saved = step
    if master and (step % log_interval == 0 or 'val_loss' in row):
        tokens_per_s = batch_size * steps_timed / max(step_seconds, 1e-9)
        row.update(tokens_per_s=tokens_per_s, mfu=flops_per_token * tokens_per_s / (peak_flops * world_size),
                   peak_mem_mib=peak_memory_mib())
        log(row)
        step_seconds, steps_timed = 0.0, 0

# every rank reports a checksum of its final weights: under DDP they must all be the same
checksum = sum(p.detach().double().sum().item() for p in gpt.parameters())
print(f"rank {rank}/{world_size}: final weights checksum {checksum!r}\n", end='', flush=True)  # one write, as above
if ddp:
    dist.barrier()  # the ranks leave together: one tearing its process group down while rank 0 still saves can abort
    dist.destroy_process_group()
