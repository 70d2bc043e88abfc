"""
Train a DiJiang (or softmax) language model on token shards.

    python train.py                                     # the demo: a small DiJiang model, byte-level, on the stdlib's sources
    python train.py config/train_finetune.py --init_from=out-pythia-410m --data_dir=data/00-pythia --out_dir=out-dijiang-410m
    python train.py --init_from=resume --out_dir=out    # continue the run in out, bit for bit
    torchrun --standalone --nproc_per_node=N train.py   # DDP on one node, any of the above
    torchrun --standalone --nproc_per_node=8 train.py --fsdp=True --activation_checkpointing=True ...  # the big sizes
    python train.py --dry_run=True --model=pythia-6.9b --gpus=8 --fsdp=True --gpu_memory=80  # memory per GPU, no training
    python train.py --help                              # every setting and its default, and the recipes

The settings are the defaults below (the demo's), then any recipes (config/train_*.py), then
--name=value. --init_from=DIR fine-tunes a model folder (convert.py's, transfer.py's or train.py's):
a softmax model trained as attention='dijiang' is linearized, every pretrained weight kept and the
DiJiang parts new (transfer.py can first fit those parts to the softmax attention).
config/train_finetune.py is the released DiJiang fine-tuning recipe. --init_from=resume continues the
run in out_dir with its own settings: those marked (r) below may change (each change is said), a change
of any other (the model, the data or its order) is refused with one line naming it. A run ends on a
line saying where the model is and the command that samples it.

Each optimizer step takes the next batch_size tokens of train windows (shards.py reads them in a fixed
scattered order): micro-step m of rank r reads from window position + (m * world_size + r) *
micro_batch_size on, so no two ranks read the same data and the result does not depend on how the
batch is split. The position is saved with each checkpoint.

out_dir belongs to one run (rundir.py): a second run there is refused while this one lives, and a new
run replaces an earlier one only with --overwrite=True, which puts it back if the new run stops before
its first checkpoint. A run that stops (a bad setting, Ctrl-C: exit 130, SIGTERM: 143, out of memory,
a full disk) ends with one line saying what it leaves; a checkpoint being written is finished first.
Under torchrun rank 0 alone speaks, also for another rank that failed (ranks.py); torchrun's own report
(ChildFailedError: each process's exit status, and torchrun's own traceback) may follow that line.
"""

import configurator
import signals

signals.stop_on_signals()  # before the heavy imports: Ctrl-C while torch loads is one line too

import math  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from contextlib import nullcontext  # noqa: E402

configurator.passive_openmp()  # before torch loads OpenMP

import torch  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

import checkpoints  # noqa: E402
import memory as memory_estimate  # noqa: E402
import ranks  # noqa: E402
import sharding  # noqa: E402
from atomic import atomic_write, atomic_write_text, interrupts_deferred  # noqa: E402
from dijiang import ATTENTIONS, CONFIGS, FEATURE_MAPS, FORMS, GPT, GPTConfig  # noqa: E402
from model_dir import build_model, load_checkpoint, pick_device  # noqa: E402
from rundir import RunDir, append_log, log_up_to  # noqa: E402
from shards import splits_of  # noqa: E402
from training import adamw, check_finite, cosine_lr, get_batch, split_batch  # noqa: E402

# -----------------------------------------------------------------------------
# settings: each can be overridden as --name=value, after any recipe files (config/train_*.py).
# On --init_from=resume the run's own settings apply; only those marked (r) may change, any other is refused.
# I/O
out_dir = 'out'  # this run's folder: ckpt.pt (model, optimizer, data position), config.json, log.jsonl, and
                 # tokenizer.json for data with a BPE vocabulary; sample.py and GPT.from_checkpoint read it
init_from = 'scratch'  # 'scratch', 'resume' (the run in out_dir), or a model folder to fine-tune (convert.py's,
                       # transfer.py's or train.py's)
overwrite = False  # True: a new run may replace the run in out_dir (moved aside, put back if this run stops
                   # before its first checkpoint, deleted at it)
data_dir = 'data/stdlib-bytes'  # token shards from data/prepare.py; this one, the demo's, is built on first use
# model: `model` applies from scratch; feature_map and feature_seed to new DiJiang layers (also when linearizing)
model = 'small'  # a name in dijiang.CONFIGS: tiny, small (the demo's), pythia-70m ... pythia-12b, smollm2-135m, ...
attention = 'dijiang'  # 'dijiang' or 'softmax'; a softmax checkpoint trained as 'dijiang' is linearized (the paper)
feature_map = 'qmc'  # 'qmc' (the paper), 'mc' (the released code), 'performer' or 'identity'
feature_seed = 0  # layer i draws its P with seed feature_seed + i (seed draws the rest, W_G included)
form = 'chunk'  # (r) how DiJiang is computed: 'chunk' (O(T) memory), 'parallel' or 'recurrent'; the same function
# batch and schedule
block_size = 128  # tokens per sequence
batch_size = 2048  # tokens per optimizer step, all ranks together
micro_batch_size = 0  # (r) sequences per rank in one forward/backward; 0: the most, up to 16, that split the batch
                      # evenly over the ranks (micro-steps = batch_size / (micro_batch_size * block_size * ranks))
max_iters = 1200  # (r) optimizer steps; 0 means one epoch of the train split
lr_decay_iters = 0  # (r) length of the cosine decay in steps; 0 means max_iters
warmup = 50  # (r) steps of linear warmup
lr = 2e-3  # (r) peak learning rate (a small model from scratch takes a high one; config/train_finetune.py: 3e-4)
min_lr = 0.0  # (r) where the cosine ends (the released recipe's HF cosine ends at 0)
weight_decay = 0.1  # AdamW, on weight matrices and embeddings only: not on norms, biases or gains
betas = (0.9, 0.95)
grad_clip = 1.0  # (r) max global gradient norm; 0 disables clipping
# eval and logging
eval_interval = 200  # (r) val loss and a checkpoint every eval_interval steps, and at the end
eval_iters = 20  # (r) val micro-batches per rank
log_interval = 50  # (r) a log line every log_interval steps
eval_only = False  # (r) measure the val loss at block_size once and exit, writing nothing
peak_flops = 0.0  # (r) per device, dense bf16, for MFU; 0: known for A100, H100 and H200, else no MFU is shown
# system
device = 'auto'  # (r) 'auto' (cuda when available, else cpu), 'cpu' or 'cuda'; under torchrun, cuda:LOCAL_RANK
dtype = 'auto'  # (r) 'auto' (bfloat16 autocast on CUDA, float32 on CPU), 'bfloat16' or 'float32'
cpu_threads = 0  # (r) torch threads per process on a CPU; 0 shares the cores out among this machine's ranks
compile = False  # (r) torch.compile the model
fsdp = False  # (r) shard weights, gradients and AdamW states over the ranks (FSDP2; under torchrun, 1 rank too); every
              # rank writes its shards into out_dir/ckpt/: on several nodes out_dir must be one folder every node sees
cpu_offload = False  # (r) with fsdp: the shards and the optimizer step in CPU memory (slower; for what a GPU cannot hold)
activation_checkpointing = False  # (r) each block recomputes its activations in the backward pass: less memory
dry_run = False  # (r) print the memory estimate per GPU and exit, training nothing (on any machine; from scratch, the
                 # named model's vocabulary)
gpus = 0  # (r) GPUs the estimate is for; 0: this run's ranks
gpu_memory = 0.0  # (r) GiB per GPU the estimate is checked against; 0: the GPU's own (on a CPU: no check)
seed = 1337
join_timeout = 60  # (r) seconds the ranks wait for each other to start (torchrun); then one line says which is missing
# -----------------------------------------------------------------------------
BLOCK, NAMES = configurator.settings_block(__file__)
RESUMABLE = tuple(line.partition(' =')[0] for line in BLOCK.splitlines() if '  # (r)' in line)  # the settings marked (r)
PEAK_FLOPS = {'H100 PCIe': 756e12, 'H100': 989e12, 'H200': 989e12, 'A100': 312e12}  # dense bf16, by GPU name
LOSSES = dict(loss='loss', val_loss='val', val_loss_ood='val_ood')  # a log row's losses, as printed
DEMO_DATA = data_dir  # the default, built on first use
status = 'nothing was written'  # what a run that stops now leaves, for its one line; main() updates it
memory = ''  # what a run that runs out of memory should change, once the model and batch are known


def kept():
    if memory and isinstance(sys.exception(), (MemoryError, RuntimeError)):  # an out-of-memory line
        return f"{memory}; {status}"
    return status


def last_checkpoint(path, step):
    return f"{path} (step {step}) is the last checkpoint; resume with python train.py --init_from=resume --out_dir={out_dir}"


def print_row(row):
    parts = [f"step {row['step']:>5}/{max_iters}"]
    parts += [f"{label} {row[name]:.4f}" for name, label in LOSSES.items() if name in row]
    if 'lr' in row:
        parts += [f"lr {row['lr']:.2e}", f"grad norm {row['grad_norm']:.3f}", f"{row['tokens_per_s']:,.0f} tok/s"]
        parts += [f"MFU {100 * row['mfu']:.2f}%"] if 'mfu' in row else []
        parts += [f"peak mem {row['peak_mem_mib']:,.0f} MiB"]
    print(' | '.join(parts), flush=True)


def memory_line(gpt, world_size, device):
    """The memory estimate per GPU, and where it exceeds the GPU (--gpu_memory, else device's own), what would fit."""
    bf16 = dtype != 'float32' if dry_run else dtype == 'bfloat16'  # a dry run's 'auto' is a GPU's: bf16
    return memory_estimate.report(gpt, block_size, split_batch(batch_size, block_size, micro_batch_size, world_size)[0],
                                  world_size, bf16, gpu_memory * memory_estimate.GiB or memory_estimate.capacity(device),
                                  fsdp=fsdp, cpu_offload=cpu_offload, activation_checkpointing=activation_checkpointing)


def check_settings():
    """Every setting, before anything is read or written: the first bad one is one line."""
    for name, allowed in (('model', CONFIGS), ('attention', ATTENTIONS), ('form', FORMS), ('feature_map', FEATURE_MAPS),
                          ('dtype', ('auto', 'bfloat16', 'float32'))):
        configurator.check(globals()[name] in allowed, name, globals()[name], f"use one of {', '.join(allowed)}")
    for name, low in dict(block_size=1, batch_size=1, micro_batch_size=0, max_iters=0, lr_decay_iters=0, warmup=0,
                          eval_interval=1, eval_iters=1, log_interval=1, cpu_threads=0, feature_seed=0,
                          join_timeout=1, gpus=0).items():
        configurator.check(globals()[name] >= low, name, globals()[name], f"give an integer >= {low}")
    for name in ('lr', 'min_lr', 'weight_decay', 'grad_clip', 'peak_flops', 'gpu_memory'):
        configurator.check(math.isfinite(globals()[name]) and globals()[name] >= 0, name, globals()[name],
                           'give a finite number >= 0')
    configurator.check(0 <= seed < 2 ** 32, 'seed', seed, 'give a seed from 0 to 2**32 - 1')
    configurator.check(len(betas) == 2 and all(type(b) in (int, float) and 0 <= b < 1 for b in betas), 'betas', betas,
                       'give two numbers from 0 up to (not including) 1, e.g. (0.9, 0.95)')
    configurator.check(bool(out_dir), 'out_dir', out_dir, 'name the folder for the checkpoints and the log')
    configurator.check(init_from != 'resume' or not overwrite, 'overwrite', overwrite,
                       '--init_from=resume continues the run in out_dir; --overwrite=True is for a new run')
    configurator.check(fsdp or not cpu_offload, 'cpu_offload', cpu_offload, 'it offloads FSDP shards: add --fsdp=True')


def main():
    global status, memory, device, dtype, micro_batch_size, max_iters, lr_decay_iters
    given = configurator.parse_settings(sys.argv[1:], {name: globals()[name] for name in NAMES})  # recipes, --name=value
    check_settings()
    resume = init_from == 'resume'
    rank_0 = os.environ.get('RANK', '0') == '0'  # (ranks.start tells the ranks apart; the folder is rank 0's before that)
    with RunDir(out_dir, not resume, overwrite, owner=rank_0 and not eval_only and not dry_run) as run:
        ckpt = None  # the checkpoint, read once: the run to resume, or the model to fine-tune
        if resume:
            ckpt = checkpoints.latest(out_dir)
            configurator.check(ckpt is not None, 'init_from', init_from, f"there is no {out_dir}/ckpt.pt or "
                               f"{out_dir}/{checkpoints.SHARDED}/ to continue: pass the run's --out_dir, or start a new run")
            globals().update(checkpoints.resumed_settings(ckpt, given, NAMES, RESUMABLE, out_dir))
            status = last_checkpoint(ckpt.get('sharded') or os.path.join(out_dir, 'ckpt.pt'), ckpt['step'])
        elif init_from != 'scratch':
            ckpt = load_checkpoint(init_from)
        if not resume and not eval_only:
            status = run.status()
        settings = {name: globals()[name] for name in NAMES}  # saved with each checkpoint, with where the model began:
        settings['init_from'] = ckpt['settings'].get('init_from', 'scratch') if resume else init_from
        if dry_run:  # the model this run would train, built on the meta device: any machine can
            config = GPTConfig(**{**ckpt['config'], **({} if resume else dict(attention=attention))}) if ckpt else \
                GPTConfig.named(model, attention=attention, feature_map=feature_map, feature_seed=feature_seed,
                                block_size=block_size)
            return print(memory_line(memory_estimate.shapes_only(config), gpus or int(os.environ.get('WORLD_SIZE', 1)),
                                     'cuda' if gpu_memory == 0 and torch.cuda.is_available() else 'cpu'), flush=True)
        configurator.check(not fsdp or 'RANK' in os.environ, 'fsdp', fsdp, "FSDP runs under torchrun: torchrun "
                           "--standalone --nproc_per_node=N train.py ... (N=1 on one GPU)")
        device = ranks.start(device, cpu_threads, join_timeout)
        dtype = 'bfloat16' if pick_device(device, dtype)[1] == torch.bfloat16 else 'float32'
        with ranks.one_voice(kept):
            train(run, ckpt, settings, given)
    ranks.finish()


def train(run, ckpt, settings, given):
    global status, memory, micro_batch_size, max_iters, lr_decay_iters
    master = ranks.rank == 0  # logs and writes checkpoints
    resume = init_from == 'resume'
    checkpoints.seed_all(seed)
    autocast = torch.autocast(device.partition(':')[0], dtype=torch.bfloat16) if dtype == 'bfloat16' else nullcontext()

    # Data: the demo's is built on first use, by rank 0 while the others wait
    if master and data_dir == DEMO_DATA and not os.path.isfile(os.path.join(data_dir, 'prepare.json')):
        from data.stdlib.prepare import build  # here: only the demo needs it
        build(out_dir=data_dir)
    ranks.barrier()
    train_data, splits = splits_of(data_dir, block_size)
    micro_batch_size, accumulation = split_batch(batch_size, block_size, micro_batch_size)
    windows_per_step = batch_size // block_size
    max_iters = max_iters or train_data.num_windows // windows_per_step  # 0: one epoch
    configurator.check(max_iters > 0, 'max_iters', 0, f"{data_dir} holds {train_data.num_tokens} train tokens, less "
                       f"than one batch of {batch_size}: give a number of steps")
    lr_decay_iters = lr_decay_iters or max_iters

    # Model: from scratch, the run to resume, or a model folder (linearized when a softmax one is trained as dijiang)
    source = out_dir if resume else init_from
    if init_from == 'scratch':
        vocab_size = -(-train_data.vocab_size // 128) * 128  # padded to a multiple of 128, as GPT-NeoX does
        with torch.device('cpu' if fsdp else device):  # initialized where it trains (a 2.8B model's init takes minutes
            # on a CPU); under FSDP on the CPU, so that the whole model is never on one GPU
            gpt = GPT(GPTConfig.named(model, attention=attention, feature_map=feature_map, feature_seed=feature_seed,
                                      block_size=block_size, vocab_size=vocab_size), form)
        identity = train_data.tokenizer
    else:
        linearize = not resume and ckpt['config'].get('attention') == 'softmax' and attention == 'dijiang'
        if not resume:  # a model folder brings its shape, and its DiJiang layers unless it is linearized
            for name in ('model',) if linearize else ('model', 'feature_map', 'feature_seed'):
                configurator.check(name not in given, name, given.get(name), f"{init_from} holds "
                                   "its own model; this applies to a model from scratch, or feature_* to new layers")
        new_layers = dict(feature_map=feature_map, feature_seed=feature_seed) if linearize else {}
        if 'sharded' in ckpt:  # its weights come from the shards, once it is sharded
            gpt = memory_estimate.shapes_only(GPTConfig(**ckpt['config'])).set_form(form)
        else:
            gpt = build_model(ckpt, source, form, **({} if resume else dict(attention=attention)), **new_layers)
        identity = checkpoints.tokenizer_of(ckpt, source)
        fix = ("resume on the data the run used, or start a new run" if resume else
               f"tokenize with python data/prepare.py --tokenizer={init_from} ...")
        train_data.check_tokenizer(identity, gpt.config.vocab_size, fix)
        if resume and ckpt.get('train_tokens', train_data.num_tokens) != train_data.num_tokens:
            raise ValueError(f"{data_dir} holds {train_data.num_tokens:,} train tokens, the run read "
                             f"{ckpt['train_tokens']:,}: it was rebuilt, so the saved position would read other data; {fix}")
    config = gpt.config
    tokenizer_json = os.path.join(data_dir, 'tokenizer.json')
    if train_data.tokenizer != 'bytes' and not os.path.isfile(tokenizer_json):
        raise ValueError(f"{data_dir} was made with {train_data.tokenizer} but holds no tokenizer.json: rerun data/prepare.py")
    if config.attention == 'softmax' and block_size > config.block_size:
        raise ValueError(f"block_size={block_size} is longer than this softmax model's context ({config.block_size}): "
                         "lower --block_size, or train it as --attention=dijiang")
    origin = settings['init_from']
    each_rank = f" on each of {ranks.world_size} ranks" if ranks.ddp else ''
    memory = (f"{'model=' + model if origin == 'scratch' else 'the model from ' + origin}, micro_batch_size="
              f"{micro_batch_size}, block_size={block_size}{each_rank}: lower --micro_batch_size "
              f"(batch_size={batch_size} stays: more micro-steps add up to it), shorten --block_size, or spread the "
              "batch over more ranks (torchrun --nproc_per_node=N)")
    sharded = resume and 'sharded' in ckpt
    sharding.place(gpt, device, fsdp=fsdp, bf16=dtype == 'bfloat16', cpu_offload=cpu_offload,
                   activation_checkpointing=activation_checkpointing, from_shards=sharded)
    optimizer = adamw(gpt.parameters(), lr, weight_decay, betas, device)
    if master:
        print(memory_line(gpt, ranks.world_size, device), flush=True)
    start_step, position = checkpoints.resume(ckpt, gpt, optimizer, out_dir) if resume else (0, 0)  # steps, windows read
    eval_model = torch.compile(gpt) if compile else gpt
    train_model = eval_model if fsdp else sharding.replicate(eval_model, device)

    @torch.no_grad()
    def evaluate():
        """Mean loss over the first eval_iters * world_size micro-batches of each val split: the same tokens every time."""
        eval_model.eval()
        losses = {}
        for name, data in splits.items():
            loss_sum = torch.zeros((), device=device)
            for i in range(eval_iters):
                x, y = get_batch(data, 0, i, micro_batch_size, device)
                with autocast:
                    loss_sum += eval_model(x, y)[1]
            losses[name] = ranks.mean(loss_sum / eval_iters)
        eval_model.train()
        return losses

    def train_step(position):
        """One optimizer step's gradients on the batch_size tokens from window position on. Returns the loss
        and the gradient norm (before clipping), both averaged over the ranks."""
        loss_sum = torch.zeros((), device=device)
        for micro_step in range(accumulation):
            x, y = get_batch(train_data, position, micro_step, micro_batch_size, device)
            last = micro_step == accumulation - 1
            # DDP all-reduces the gradients once, at the last; FSDP reduce-scatters each micro-step's into the shards
            with (train_model.no_sync() if isinstance(train_model, DDP) and not last else nullcontext()):
                with autocast:
                    _, loss = train_model(x, y)
                (loss / accumulation).backward()
            loss_sum += loss.detach()
        grad_norm = sharding.clip_gradients(gpt, grad_clip if grad_clip > 0 else math.inf)
        return ranks.mean(loss_sum / accumulation), grad_norm

    log_path = os.path.join(out_dir, 'log.jsonl')
    if master and not eval_only:
        if resume:  # keep the log of the steps the checkpoint holds, drop any logged after it
            atomic_write_text(log_path, ''.join(log_up_to(log_path, start_step)))
        if train_data.tokenizer != 'bytes':  # the model's tokenizer goes with its checkpoints
            atomic_write(os.path.join(out_dir, 'tokenizer.json'), lambda tmp: shutil.copyfile(tokenizer_json, tmp))
    if master:
        print(f"{gpt.num_params() / 1e6:.2f}M parameters, {config.attention} attention, {init_from}; {data_dir}: "
              f"{train_data.num_tokens:,} train tokens ({train_data.tokenizer})")
        print(f"{max_iters} steps of {batch_size:,} tokens = {ranks.world_size} ranks * {accumulation} micro-steps * "
              f"{micro_batch_size} * {block_size}; {device}, {dtype}, from step {start_step}", flush=True)

    def log(row):
        if master:
            print_row(row)
            append_log(log_path, row)

    if eval_only:
        for name, loss in evaluate().items():
            if master:
                print(f"{name.replace('_loss', '')} loss {loss:.4f}, perplexity {math.exp(loss):.3f}, at block_size "
                      f"{block_size} ({eval_iters * micro_batch_size * ranks.world_size} windows)", flush=True)
        return
    if start_step == 0:
        log(dict(step=0, **evaluate()))
    flops_per_token = gpt.flops_per_token(block_size)
    peak = peak_flops or (next((flops for name, flops in PEAK_FLOPS.items() if name in torch.cuda.get_device_name()), 0.0)
                          if device.startswith('cuda') else 0.0)
    step_seconds, steps_timed, row = 0.0, 0, {}
    for step in range(start_step + 1, max_iters + 1):
        t0 = time.time()
        step_lr = cosine_lr(step - 1, lr, warmup, lr_decay_iters, min_lr)
        loss, grad_norm = train_step(position)
        check_finite('loss', loss, step, status)
        check_finite('gradient norm', grad_norm, step, status)
        for group in optimizer.param_groups:
            group['lr'] = step_lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        position += windows_per_step
        step_seconds, steps_timed = step_seconds + time.time() - t0, steps_timed + 1

        row = dict(step=step, loss=loss, lr=step_lr, grad_norm=grad_norm)
        if step % eval_interval == 0 or step == max_iters:
            row.update(evaluate())
            check_finite('val loss', row['val_loss'], step, status)
            with interrupts_deferred():  # a Ctrl-C or SIGTERM now stops the run once the checkpoint is whole
                checkpoints.save(out_dir, gpt, optimizer, fsdp, step=step, data_position=position, tokenizer=identity,
                                 settings=settings, train_tokens=train_data.num_tokens)
                run.checkpointed()
                status = last_checkpoint(os.path.join(out_dir, checkpoints.SHARDED if fsdp else 'ckpt.pt'), step)
        if step % log_interval == 0 or 'val_loss' in row:
            tokens_per_s = batch_size * steps_timed / max(step_seconds, 1e-9)
            row.update(tokens_per_s=tokens_per_s, peak_mem_mib=memory_estimate.peak_mib(device))
            if peak:
                row['mfu'] = flops_per_token * tokens_per_s / (peak * ranks.world_size)
            log(row)
            step_seconds, steps_timed = 0.0, 0
    if master:
        val = f", val loss {row['val_loss']:.4f}" if 'val_loss' in row else ''
        how = f"python consolidate.py --out_dir={out_dir}, then " if fsdp else ''
        print(f"the model is in {out_dir}/ ({checkpoints.SHARDED + '/' if fsdp else 'ckpt.pt'}, step {max_iters}{val}); "
              f"sample it with: {how}python sample.py --out_dir={out_dir}", flush=True)


if __name__ == '__main__':
    configurator.run(main, kept=kept)
