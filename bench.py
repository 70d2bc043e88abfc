"""
The speed comparison the paper makes, done properly: softmax attention (PyTorch SDPA, flash on the
GPU) against DiJiang at the same model size, with random weights.

    python bench.py                                           # every section, pythia-410m shape, on the GPU
    python bench.py --sections=attention --lengths=1024,8192,32768  # the Triton kernel against SDPA
    python bench.py --model=smollm2-135m                      # another model into the same JSON, beside the first
    python bench.py config/bench_decode.py --profile=True    # decoding compared, and where a step's time goes
    python bench.py config/bench_cpu.py                       # a smoke run of every section on the CPU, in seconds
    python bench.py --help                                    # every setting, its default, and the recipes

Sections (--sections picks some), each measured at every length, batch size or block size asked for:
  attention  The attention op alone, forward and forward+backward, B * N = tokens_per_batch: SDPA, the
             Triton kernel, the model's own dispatch, the released code's form and fla (attention_ops).
  prefill    The whole model reading B x N prompt tokens into a cache, tokens/s.
  decode     One new token per sequence against N tokens of context: latency, tokens/s, and the memory
             decoding holds (the KV cache, or DiJiang's state), eager and, on CUDA, as CUDA graphs (decoders).
  train      One optimizer step (AdamW, autocast to dtype, fp32 weights): tokens/s and
             MFU = model.flops_per_token(block) * tokens/s / peak_flops.

Each number is the median of repeats after a warmup (CUDA events on the GPU, perf_counter on the
CPU); running out of memory is recorded as 'OOM', a non-finite output as 'nan', any other failure as
'error: ...', and the run goes on. Softmax models get block_size raised to the longest context measured.
Results go to --out, {model: {section: {meta, rows, notes, error}}}, saved after every row; a run keeps
every section there that it does not measure again. bench_report.py shows and saves each row, prints the
tables and draws --plot; baselines.py holds the attentions DiJiang's is measured against.
"""

import configurator
import signals

signals.stop_on_signals()  # before the heavy imports: Ctrl-C while torch loads is one line too

import gc  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from contextlib import nullcontext  # noqa: E402
from dataclasses import asdict  # noqa: E402

import torch  # noqa: E402

import bench_report  # noqa: E402
from bench_report import SECTIONS, is_number  # noqa: E402
from baselines import fla_attention, released_attention, sdpa_attention  # noqa: E402
from dijiang import ATTENTIONS, CONFIGS, GPT, Cache, DiJiangAttention, GPTConfig  # noqa: E402
from model_dir import pick_device  # noqa: E402
from fast.cuda_graph_decode import CUDAGraphDecoder, why_not_fused  # noqa: E402

try:  # the 'kernel' row: Triton ships with PyTorch's CUDA builds, not with the CPU ones
    from fast.triton_attention import chunk_attention
except ImportError:
    chunk_attention = None

# -----------------------------------------------------------------------------
# settings: each can be overridden as --name=value
model = 'pythia-410m'  # a name in dijiang.CONFIGS, built with random weights
vocab_size = 0  # 0 keeps the model's (50304 for most Pythia sizes)
sections = 'attention,prefill,decode,train'  # which to run, comma-separated
models = 'softmax,dijiang'  # which attentions the prefill, decode and train sections build, comma-separated
lengths = '1024,2048,4096,8192,16384,32768,65536'  # sequence lengths (attention, prefill) and contexts (decode)
tokens_per_batch = 32768  # attention and prefill: batch size B = tokens_per_batch // N
decode_batches = '1,64'  # batch sizes for decoding
train_blocks = '2048,8192,32768'  # block sizes for the training step
train_tokens = 16384  # tokens per training step: B = train_tokens // block
dtype = 'bfloat16'  # of the attention inputs, the prefill and decode weights, and the training autocast:
                    # 'bfloat16', 'float16', 'float32', or 'auto' (bfloat16 on a GPU that has it, else float32)
peak_flops = 989e12  # per device, for MFU: H100 SXM dense bf16
compile = False  # torch.compile the training step's model and the CUDA-graph decoding step
profile = False  # decode, CUDA: also list the kernels of one CUDA-graph step and time each matrix product alone
warmup = 3  # untimed calls before timing
repeats = 20  # timed calls; the median is reported
max_seconds = 2.0  # a slow measurement stops after this many seconds of repeats (3 at least)
device = 'auto'  # 'auto' (cuda when available, else cpu), 'cpu', 'cuda', 'cuda:1', ...
out = 'out-bench/bench.json'  # the results, kept across runs; its folder is created, and git ignores out*/
plot = 'out-bench/bench.png'  # '' for none; drawn only if matplotlib is installed
# -----------------------------------------------------------------------------
rows_measured, sections_left = 0, []  # how far main() got: what the line of a run that stops says
cuda = False  # main() sets it: whether device is a GPU


def names(text):
    return [name.strip() for name in text.split(',') if name.strip()]


def ints(text):
    """The comma-separated positive integers in text, or [] when it is anything else."""
    try:
        values = [int(n) for n in text.split(',')]
    except ValueError:
        return []
    return values if min(values) >= 1 else []


def check_settings():
    """Each setting on its own: the first bad one stops the run with one line that names it."""
    check, value = configurator.check, globals().get
    check(model in CONFIGS, 'model', model, f"use one of {', '.join(CONFIGS)}")
    for setting, choices in (('sections', SECTIONS), ('models', ATTENTIONS)):
        text = value(setting)
        check(names(text) and set(names(text)) <= set(choices), setting, text, f"choose from {','.join(choices)}")
    for setting, example in (('lengths', '1024,8192'), ('decode_batches', '1,64'), ('train_blocks', '2048,8192')):
        check(ints(value(setting)), setting, value(setting),
              f"give comma-separated positive integers, e.g. --{setting}={example}")
    for setting, least in (('tokens_per_batch', 1), ('train_tokens', 1), ('repeats', 1), ('warmup', 0),
                           ('vocab_size', 0), ('max_seconds', 0)):
        check(value(setting) >= least, setting, value(setting), f"give {least} or more")
    check(peak_flops > 0, 'peak_flops', peak_flops, "give the device's peak FLOP/s, e.g. --peak_flops=989e12")
    for setting, path in (('out', out), ('plot', plot)):
        check(not os.path.isdir(path) and (path or setting == 'plot'), setting, path,
              f"name a file, e.g. --{setting}=out-bench/bench.{'json' if setting == 'out' else 'png'}")


def synchronize():
    if cuda:
        torch.cuda.synchronize(device)


def median_ms(fn):
    """Milliseconds per call of fn: the median of up to `repeats` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    synchronize()
    times, deadline = [], time.perf_counter() + max_seconds
    for i in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1000)
        if i >= 2 and time.perf_counter() > deadline:
            break
    return statistics.median(times)


def attempt(measure):
    """measure() or, if it fails, what to record instead. Memory is freed here, once the exception
    (whose traceback holds the tensors) is gone."""
    try:
        result = measure()
    except torch.OutOfMemoryError:
        result = 'OOM'
    except Exception as e:  # record it and go on: one failure must not lose the other measurements
        result = 'OOM' if 'out of memory' in str(e) else f"error: {type(e).__name__}: {str(e)[:300]}"
    if isinstance(result, str):
        gc.collect()  # slow with torch loaded, so only after a failure, which may leave cycles
    torch.cuda.empty_cache()  # the next measurement may need one large block (a no-op without CUDA)
    return result


def per_second(count, ms):
    """count per second at ms milliseconds each, or the failure that ms records."""
    return count / ms * 1000 if is_number(ms) else ms


def reset_peak_memory():
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib():
    return torch.cuda.max_memory_allocated(device) / 2 ** 30

# -----------------------------------------------------------------------------
# 1. The attention op. Every op takes q (B, N, H, D), k and v (B, N, H_kv, D), and returns o (B, N, H, D).


def attention_ops(config):
    """The rows of the attention section, name -> op(q, k, v): sdpa (causal SDPA, as the softmax model
    calls it), kernel (the fused Triton op alone, CUDA only), dijiang (DiJiangAttention.attend, the
    model's own dispatch: that kernel on CUDA), dijiang_torch (the same with kernel='torch', CUDA
    only), released (the released code's quadratic form, whose gamma^-n overflows past ~2.8K tokens
    -> 'nan'), and fla (chunk_simple_gla, if installed)."""
    dijiang = DiJiangAttention(config, layer_idx=0).to(device)
    proj, decay, group = dijiang.feature_proj, dijiang.decay, config.n_head // config.n_kv_head

    def every_head(k, v):  # grouped-query attention: each query head its own copy, as attend() makes
        return (k, v) if group == 1 else (k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2))

    ops = {'sdpa': sdpa_attention}
    if cuda and chunk_attention is not None:  # the kernel without the model's dispatch and final state
        ops['kernel'] = lambda q, k, v: chunk_attention(q, *every_head(k, v), proj, decay)[0]
    ops['dijiang'] = lambda q, k, v: dijiang.attend(q, k, v, None)[0]
    if cuda:
        torch_form = DiJiangAttention(config, layer_idx=0).to(device)
        torch_form.kernel = 'torch'  # what GPT.set_form(kernel='torch') sets in every layer
        ops['dijiang_torch'] = lambda q, k, v: torch_form.attend(q, k, v, None)[0]
    ops['released'] = lambda q, k, v: released_attention(q, *every_head(k, v), proj, decay)
    try:
        import fla  # noqa: F401  (a comparison when installed, never a dependency)
        ops['fla'] = lambda q, k, v: fla_attention(q, *every_head(k, v), proj, decay)
    except ImportError:
        pass
    return ops


def time_attention(op, B, N, config, backward):
    """(milliseconds per call, whether the output was finite)."""
    q, k, v = (torch.randn(B, N, heads, config.head_size, device=device, dtype=getattr(torch, dtype),
                           requires_grad=backward) for heads in (config.n_head, config.n_kv_head, config.n_kv_head))
    with torch.no_grad():
        finite = bool(torch.isfinite(op(q, k, v)).all())
        if not backward:
            return median_ms(lambda: op(q, k, v)), finite
    grad_o = torch.randn_like(q)
    return median_ms(lambda: torch.autograd.grad(op(q, k, v), (q, k, v), grad_o)), finite


def bench_attention(section):
    """Yields the section's rows, one per op and length."""
    config = GPTConfig.named(model)
    section['notes'].append(f"{dtype}, H={config.n_head}, H_kv={config.n_kv_head}, D={config.head_size}, "
                            f"B*N={tokens_per_batch}; fwd under no_grad, fwd_bwd = forward + autograd.grad of q, k, v")
    ops = attention_ops(config)
    if cuda and 'kernel' not in ops:
        section['notes'].append("kernel needs Triton, which is not installed: not run")
    for name, op in ops.items():
        for N in ints(lengths):
            B = max(1, tokens_per_batch // N)
            row = dict(impl=name, N=N, B=B)
            for key, backward in (('fwd_ms', False), ('fwd_bwd_ms', True)):
                reset_peak_memory()
                result = attempt(lambda: time_attention(op, B, N, config, backward))
                ms, finite = (result, True) if isinstance(result, str) else result  # a failure: 'OOM' or 'error: ...'
                row[key] = ms if finite else 'nan'
                if not finite:  # the time it took to compute garbage, shown beside the 'nan'
                    row[f'{key}_of_nan'] = ms
                if cuda and is_number(ms):
                    row[key.replace('_ms', '_peak_gib')] = peak_gib()
            yield row

# -----------------------------------------------------------------------------
# 2-4. The whole model


def build_model(attention, longest, section):
    """A model of the benchmark's shape with random weights, on the device, in fp32. A softmax model
    gets block_size raised to `longest` when that is past its own limit."""
    config = GPTConfig.named(model, attention=attention, **({'vocab_size': vocab_size} if vocab_size else {}))
    if attention == 'softmax' and longest > config.block_size:
        section['notes'].append(f"softmax built with block_size={longest} (the model's own is {config.block_size}) "
                                f"to measure past its context")
        config = GPTConfig(**{**asdict(config), 'block_size': longest})
    with torch.device(device):  # initialized where it runs: a 7B model never passes through host memory
        return GPT(config).to(device)  # (DiJiang's fixed buffers are computed on the CPU)


def bench_prefill(section):
    """Yields the section's rows, one per model and length."""
    for attention in names(models):
        net = build_model(attention, max(ints(lengths)), section).to_dtype(getattr(torch, dtype)).eval()

        def prefill_ms(B, N):
            idx = torch.randint(net.config.vocab_size, (B, N), device=device)
            with torch.no_grad():
                return median_ms(lambda: net(idx, cache=net.new_cache()))

        for N in ints(lengths):
            B = max(1, tokens_per_batch // N)
            ms = attempt(lambda: prefill_ms(B, N))
            yield dict(attention=attention, N=N, B=B, ms=ms, tokens_per_s=per_second(B * N, ms))
        del net


def random_cache(net, B, context):
    """A Cache as if `context` tokens had been read: random tensors of the shapes decoding holds, per
    layer the softmax model's keys and values (B, H_kv, context, D) in the weights' dtype, or DiJiang's
    state (B, H, D, D) in fp32."""
    cfg, weight = net.config, net.lm_head.weight
    if cfg.attention == 'softmax':
        layers = [tuple(torch.randn(B, cfg.n_kv_head, context, cfg.head_size, device=weight.device, dtype=weight.dtype)
                        for _ in range(2)) for _ in range(cfg.n_layer)]
    else:
        layers = [torch.randn(B, cfg.n_head, cfg.head_size, cfg.head_size, device=weight.device)
                  for _ in range(cfg.n_layer)]
    return Cache(pos=context, layers=layers)


def decoders(net, section):
    """How a decoding step of this model is run, name -> make_step(cache, token) -> step(): each is one
    more row per batch size and context. eager: the model's own step, on a copy of the cache's layer
    list each call (the KV cache is concatenated, not grown in place, so every call sees the same
    context); cuda_graph: CUDAGraphDecoder's static-cache step of either attention as one CUDA graph,
    compiled with --compile=True; fused: DiJiang's fused Triton step as one CUDA graph."""
    def graph_step(fused):
        # Each timed call advances the context by one: a softmax decoder's static KV cache holds the
        # context measured plus those calls, and is built for each context; a DiJiang decoder's shapes
        # do not depend on the context, so one per batch size serves them all.
        built = {}

        def make_step(cache, token):
            key = (token.shape[0], cache.pos if net.config.attention == 'softmax' else 0)
            if key not in built:
                built.clear()  # one decoder at a time: a KV cache may fill most of the GPU
                if compile:
                    torch._dynamo.reset()  # each decoder compiled afresh, never past dynamo's recompilation limit
                built[key] = CUDAGraphDecoder(net, token.shape[0], compile=compile, fused=fused,
                                              max_length=cache.pos + warmup + repeats + 1)
            decoder = built[key]
            decoder.load(cache)
            return lambda: decoder.step(token)
        return make_step

    found = {'eager': lambda cache, token: lambda: net(token, cache=Cache(pos=cache.pos, layers=list(cache.layers)))}
    if cuda:
        found['cuda_graph'] = graph_step(fused=False)
        why_not = why_not_fused(net)
        if not why_not:
            found['fused'] = graph_step(fused=True)
        elif net.config.attention == 'dijiang':
            section['notes'].append(f"no fused row: {why_not}")
    return found


def profile_decode_step(net, B):
    """Where one CUDA-graph decoding step of B sequences spends its time (the fused step where it
    runs): each kernel's calls and microseconds per step (torch.profiler over 20 replays; the step's
    shapes do not depend on the context), and each distinct matrix product of the model timed alone,
    50 calls in a CUDA graph. products_ms, their sum over the step, is what the weight reads cost as
    the model's own modules make them."""
    from torch.profiler import ProfilerActivity
    fused = not why_not_fused(net)
    decoder = CUDAGraphDecoder(net, batch_size=B, compile=compile, fused=fused)
    with torch.profiler.profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            decoder.graph.replay()
        synchronize()
    kernels = sorted(([e.key, e.count / 20, e.device_time_total / 20] for e in prof.key_averages()
                      if e.device_time_total > 0), key=lambda kernel: -kernel[2])
    products_us = {}
    with torch.no_grad():
        for name, module in net.named_modules():
            if isinstance(module, torch.nn.Linear) and (name.startswith('layers.0.') or name == 'lm_head'):
                x = torch.randn(B, module.in_features, device=device, dtype=module.weight.dtype)
                module(x)  # cuBLAS creates its handle here, outside the capture
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    for _ in range(50):
                        module(x)
                products_us[name] = median_ms(graph.replay) * 1000 / 50
    layer_us = sum(us for name, us in products_us.items() if name != 'lm_head')
    return dict(B=B, decoder='fused' if fused else 'cuda_graph', kernels_per_step=sum(k[1] for k in kernels),
                kernel_ms=sum(k[2] for k in kernels) / 1000, products_us=products_us,
                products_ms=(layer_us * net.config.n_layer + products_us['lm_head']) / 1000, top_kernels=kernels[:15])


def bench_decode(section):
    """Yields the section's rows, one per model, decoder, batch size and context; the profile of
    DiJiang's step goes into section['profile'] (saved with the section)."""
    if profile and not cuda:
        section['notes'].append("profile needs CUDA: not run")
    for attention in names(models):
        # a softmax model's block_size must hold the longest context and the steps timed after it
        net = build_model(attention, max(ints(lengths)) + warmup + repeats + 1, section)
        net = net.to_dtype(getattr(torch, dtype)).eval()

        def step_ms(make_step, B, context):  # one decoding step of B sequences at `context` tokens
            token = torch.randint(net.config.vocab_size, (B, 1), device=device)
            with torch.no_grad():
                return median_ms(make_step(random_cache(net, B, context), token))

        for impl, make_step in decoders(net, section).items():
            for B in ints(decode_batches):
                for N in ints(lengths):
                    ms = attempt(lambda: step_ms(make_step, B, N))
                    yield dict(attention=attention, impl=impl, B=B, context=N, ms_per_token=ms,
                               tokens_per_s=per_second(B, ms),
                               cache_bytes=net.cache_bytes(B, N, net.lm_head.weight.dtype))
        if profile and cuda and attention == 'dijiang':
            section['profile'] = [attempt(lambda: profile_decode_step(net, B)) for B in ints(decode_batches)]
        del net


def train_step_ms(net, optimizer, B, block):
    x, y = (torch.randint(net.config.vocab_size, (B, block), device=device) for _ in range(2))
    autocast = (torch.autocast(torch.device(device).type, dtype=getattr(torch, dtype))
                if dtype != 'float32' else nullcontext())
    forward = torch.compile(net, dynamic=False) if compile else net  # one graph per block size

    def step():
        with autocast:
            _, loss = forward(x, targets=y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return median_ms(step) if torch.isfinite(step()) else 'nan'


def bench_train(section):
    """Yields the section's rows, one per model and block size."""
    for attention in names(models):
        net = build_model(attention, max(ints(train_blocks)), section).train()
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=cuda)
        for block in ints(train_blocks):
            B = max(1, train_tokens // block)
            reset_peak_memory()
            ms = attempt(lambda: train_step_ms(net, optimizer, B, block))
            tokens_per_s = per_second(B * block, ms)
            row = dict(attention=attention, block=block, B=B, ms_per_step=ms, tokens_per_s=tokens_per_s,
                       mfu=net.flops_per_token(block) * tokens_per_s / peak_flops if is_number(ms) else ms)
            if cuda and is_number(ms):
                row['peak_gib'] = peak_gib()
            yield row
        del net, optimizer

# -----------------------------------------------------------------------------
# The run


RUNNERS = dict(attention=bench_attention, prefill=bench_prefill, decode=bench_decode, train=bench_train)


def measured_rows(name, section):
    """The section's rows as they are measured. A failure outside attempt() (building a model too
    large for the device, say) ends the section, recorded in section['error'], and the run goes on."""
    try:
        yield from RUNNERS[name](section)
    except Exception as e:
        section['error'] = f"{type(e).__name__}: {e}"


def machine():
    return dict(hardware=torch.cuda.get_device_name(device) if cuda else 'cpu', torch=torch.__version__,
                triton=getattr(sys.modules.get('triton'), '__version__', None),  # imported with fast/, if installed
                command=' '.join(sys.argv), date=time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime()))


def kept():
    """The end of the one line a run that stops prints: where what it measured is, and how to go on."""
    if not rows_measured:
        return 'nothing was measured yet; run the same command again'
    missing = f"; measure what is missing with --sections={','.join(sections_left)}" if sections_left else ''
    return f"stdout's tables show what this run measured ({rows_measured} rows), and {out} each row saved{missing}"


def main():
    global device, dtype, cuda, rows_measured, sections_left
    check_settings()
    device, torch_dtype = pick_device(device, dtype)
    cuda = device.startswith('cuda')
    dtype = str(torch_dtype).removeprefix('torch.')  # 'auto' resolved: the JSON records what ran
    results = bench_report.Results(out, model, names(sections))  # an earlier run's, but for the sections redone
    for path in (out, plot):
        os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    meta = {**machine(), **{name: globals()[name] for name in configurator.settings_block(__file__)[1]}}
    torch.manual_seed(0)

    sections_left = list(dict.fromkeys(names(sections)))
    try:
        while sections_left:
            name = sections_left[0]
            section = results.new_section(name, meta)
            for row in measured_rows(name, section):
                rows_measured += 1
                results.add_row(section, row)  # shown and saved: a run cut short keeps what it measured
            results.save()  # the section's notes, error and profile
            sections_left.pop(0)
    finally:  # also when cut short or the disk is full: what was measured is on the screen
        bench_report.print_tables(results.all)
    print(f"\nwrote {out}")
    if plot:
        bench_report.draw_plot(results.all, plot)


if __name__ == '__main__':
    configurator.run(main, kept=kept)
