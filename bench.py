"""
The speed comparison the paper makes, done properly: softmax attention (PyTorch SDPA, flash on the
GPU) against DiJiang at the same model size, with random weights.

    python bench.py                                           # every section, pythia-410m shape, on the GPU
    python bench.py --sections=attention --lengths=1024,8192,32768  # the Triton kernel against SDPA
    python bench.py --sections=decode --model=pythia-1b --out=out-bench/1b.json --plot=out-bench/1b.png
    python bench.py --sections=decode --compile=True --profile=True  # and where a decoding step's time goes
    python bench.py --device=cpu                              # a small smoke run of every section
    python bench.py --help                                    # every setting and its default

Sections (--sections picks some; runs that write the same --out keep the sections they did not run,
so a long benchmark can be split into several commands):
  attention  The attention op alone, forward and forward+backward, on (B, N, H, D) inputs with B * N =
             tokens_per_batch and H, D from the model:
               sdpa           causal F.scaled_dot_product_attention, as the softmax model calls it
               kernel         the fused Triton op alone, fast.triton_attention.chunk_attention(q, k, v,
                              proj, decay), feature map included (CUDA with Triton only)
               dijiang        DiJiangAttention.attend: the model's own dispatch (that kernel on CUDA
                              when available, also returning the final state), feature map included
               dijiang_torch  the same with kernel='torch': the pure-PyTorch chunk form (CUDA only; on
                              the CPU it is what 'dijiang' runs)
               released       the released code's quadratic form (phi(Q) D1)(phi(K) D2)^T with
                              D1 = gamma^n, D2 = gamma^-n: gamma^-n overflows past ~2.8K tokens -> 'nan'
               fla            fla's chunk_simple_gla with our feature map, only if fla is installed
  prefill    The whole model reading B x N prompt tokens into a cache, tokens/s.
  decode     One new token per sequence against N tokens of context at each batch size: latency,
             tokens/s, and the memory decoding holds (softmax: the KV cache; dijiang: the recurrent
             state). dijiang is timed eager and, on CUDA, as one CUDA graph per step (CUDAGraphDecoder).
             The caches are random tensors of the right shapes: a step's cost depends on shapes only.
  train      One optimizer step (AdamW, bf16 autocast, fp32 weights) at each block size: tokens/s and
             MFU = model.flops_per_token(block) * tokens/s / peak_flops.

Softmax models are built with block_size raised to the longest context measured, when that is past
Pythia's 2048 (noted in the JSON). Each number is the median of repeats after a warmup, timed with CUDA
events on the GPU and perf_counter on the CPU. A measurement that runs out of memory is recorded as
'OOM', one whose output is not finite as 'nan', and any other failure as 'error: ...'; the rest goes
on. Results: a table on stdout, JSON in --out (out-bench/bench.json), and tokens/s against length in
--plot (out-bench/bench.png), one panel per section in the JSON, when matplotlib is installed. A bad
setting stops the run with one line, 'error: ...', before anything is measured.
"""

import gc
import inspect
import json
import os
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from atomic import atomic_write, atomic_write_text
from configurator import check_device, interrupted, parse_settings, settings_help
from dijiang import CONFIGS, GPT, Cache, DiJiangAttention, GPTConfig, feature_map
from fast.cuda_graph_decode import CUDAGraphDecoder

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
dtype = 'bfloat16'  # of the attention inputs, the prefill and decode weights, and the training autocast
peak_flops = 989e12  # per device, for MFU: H100 SXM dense bf16
compile = False  # torch.compile the training step's model and the CUDA-graph decoding step
profile = False  # decode, CUDA: also list the kernels of one CUDA-graph step and time each matrix product alone
warmup = 3  # untimed calls before timing
repeats = 20  # timed calls; the median is reported
max_seconds = 2.0  # a slow measurement stops after this many seconds of repeats (3 at least)
device = 'auto'  # 'auto' (cuda when available, else cpu), 'cpu', 'cuda', 'cuda:1', ...
out = 'out-bench/bench.json'  # the results; its folder is created, and git ignores out*/
plot = 'out-bench/bench.png'  # '' for none; drawn only if matplotlib is installed
# -----------------------------------------------------------------------------
SETTINGS = {name: value for name, value in globals().items()
            if not name.startswith('_') and isinstance(value, (bool, int, float, str))}
# --device=cpu is a smoke run of every code path: these replace the defaults the command line leaves alone
CPU_SMOKE = dict(model='tiny', vocab_size=512, lengths='64,128', tokens_per_batch=256, decode_batches='1,4', train_blocks='64,128',
                 train_tokens=256, dtype='float32', warmup=1, repeats=3)
SECTIONS = ('attention', 'prefill', 'decode', 'train')


def build_settings(overrides):
    """The run's settings, what every function below reads: the defaults above, the command line's
    overrides and, on the CPU, CPU_SMOKE for what the command line leaves alone, checked, with the values
    derived from them (cuda, torch_dtype, and the comma-separated settings as lists). A bad setting stops
    here, with one line that names it, before anything is measured."""
    s = {**SETTINGS, **overrides}
    if s['device'] == 'auto':
        s['device'] = 'cuda' if torch.cuda.is_available() else 'cpu'
    check_device(s['device'], ' for a smoke run')
    if s['device'] == 'cpu':
        s.update({name: value for name, value in CPU_SMOKE.items() if name not in overrides})
    if s['model'] not in CONFIGS:
        raise SystemExit(f"error: model={s['model']!r}: choose one of {', '.join(CONFIGS)}")
    if s['dtype'] not in ('bfloat16', 'float16', 'float32'):
        raise SystemExit(f"error: dtype={s['dtype']!r}: use 'bfloat16', 'float16' or 'float32'")
    for name, least in (('tokens_per_batch', 1), ('train_tokens', 1), ('repeats', 1), ('warmup', 0), ('vocab_size', 0)):
        if s[name] < least:
            raise SystemExit(f"error: {name}={s[name]}: give {least} or more")
    if not s['peak_flops'] > 0:
        raise SystemExit(f"error: peak_flops={s['peak_flops']}: give the device's peak FLOP/s, "
                         f"e.g. --peak_flops=989e12")
    return SimpleNamespace(
        **s, cuda=s['device'].startswith('cuda'), torch_dtype=getattr(torch, s['dtype']),
        section_list=names('sections', s['sections'], SECTIONS),
        model_list=names('models', s['models'], ('softmax', 'dijiang')),
        length_list=positive_ints('lengths', s['lengths'], '1024,8192'),
        decode_batch_list=positive_ints('decode_batches', s['decode_batches'], '1,64'),
        train_block_list=positive_ints('train_blocks', s['train_blocks'], '2048,8192'))


def names(setting, text, choices):
    """The comma-separated names of a setting, each one of choices, in order, once each."""
    chosen = list(dict.fromkeys(name.strip() for name in text.split(',') if name.strip()))
    if not chosen or set(chosen) - set(choices):
        raise SystemExit(f"error: {setting}={text!r}: choose from {','.join(choices)}")
    return chosen


def positive_ints(setting, text, example):
    try:
        values = [int(n) for n in text.split(',')]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise SystemExit(f"error: {setting}={text!r}: give comma-separated positive integers, "
                         f"e.g. --{setting}={example}")
    return values


def synchronize(settings):
    if settings.cuda:
        torch.cuda.synchronize(settings.device)


def median_ms(settings, fn):
    """Milliseconds per call of fn: the median of up to `repeats` calls after `warmup` calls."""
    for _ in range(settings.warmup):
        fn()
    synchronize(settings)
    times, deadline = [], time.perf_counter() + settings.max_seconds
    for i in range(settings.repeats):
        if settings.cuda:
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


def attempt(settings, measure):
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
    if settings.cuda:
        torch.cuda.empty_cache()  # the next measurement may need one large block
    return result


def peak_gib(settings):
    return torch.cuda.max_memory_allocated(settings.device) / 2 ** 30


def is_number(x):
    return isinstance(x, (int, float))

# -----------------------------------------------------------------------------
# 1. The attention op. Every op takes q, k, v (B, N, H, D) and returns o (B, N, H, D).


def sdpa_attention(q, k, v):
    """What SoftmaxAttention runs: SDPA on (B, H, N, D) views of the (B, N, H, D) projections."""
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    return o.transpose(1, 2)


def released_attention(q, k, v, proj, decay):
    """The released code's quadratic form: (phi(Q) D1)(phi(K) D2)^T, causally masked, times V, with
    D1 = gamma^n and D2 = gamma^-n in fp32 and the products in the input dtype, as under bf16 autocast.
    gamma^-n passes fp32's maximum at n ~ 2797 for gamma = 0.96875 (the first head), and the output
    turns inf or NaN from there on."""
    B, N, H, D = q.shape
    n = torch.arange(N, device=q.device, dtype=torch.float32)
    gamma = decay.float().view(1, 1, H, 1)
    D1, D2 = gamma ** n.view(1, N, 1, 1), gamma ** -n.view(1, N, 1, 1)  # (1, N, H, 1)
    q_scaled = (feature_map(q, proj) * D1).to(v.dtype)
    k_scaled = (feature_map(k, proj) * D2).to(v.dtype)
    scores = torch.einsum('bnhd,bmhd->bhnm', q_scaled, k_scaled)  # (B, H, N, N)
    causal = torch.ones(N, N, dtype=torch.bool, device=q.device).tril()
    scores = scores * causal  # multiplied, as released: inf * 0 is NaN
    return torch.einsum('bhnm,bmhd->bnhd', scores, v)


def fla_attention(q, k, v, proj, decay):
    """fla's chunk_simple_gla (fla-core on PyPI, Triton), in its (B, N, H, D) layout, fed our feature
    map; the decay goes in as the log gate per token, and no 1/sqrt(D) scale, as DiJiang."""
    from fla.ops.simple_gla import chunk_simple_gla
    B, N, H, D = q.shape
    phi_q, phi_k = feature_map(q, proj).to(v.dtype), feature_map(k, proj).to(v.dtype)
    log_gate = decay.float().log().view(1, 1, H).expand(B, N, H).contiguous()  # (B, N, H)
    layout = {'head_first': False} if 'head_first' in inspect.signature(chunk_simple_gla).parameters else {}
    o, _ = chunk_simple_gla(phi_q, phi_k, v, g=log_gate, scale=1.0, **layout)
    return o


def attention_ops(settings, config):
    dijiang = DiJiangAttention(config, layer_idx=0).to(settings.device)
    ops = {'sdpa': sdpa_attention}
    if settings.cuda and chunk_attention is not None:  # the kernel without the model's dispatch and final state
        ops['kernel'] = lambda q, k, v: chunk_attention(q, k, v, dijiang.feature_proj, dijiang.decay)[0]
    ops['dijiang'] = lambda q, k, v: dijiang.attend(q, k, v, None)[0]
    if settings.cuda:
        torch_config = GPTConfig(**{**asdict(config), 'kernel': 'torch'})
        torch_form = DiJiangAttention(torch_config, layer_idx=0).to(settings.device)
        ops['dijiang_torch'] = lambda q, k, v: torch_form.attend(q, k, v, None)[0]
    ops['released'] = lambda q, k, v: released_attention(q, k, v, dijiang.feature_proj, dijiang.decay)
    try:
        import fla  # noqa: F401  (a comparison when installed, never a dependency)
        ops['fla'] = lambda q, k, v: fla_attention(q, k, v, dijiang.feature_proj, dijiang.decay)
    except ImportError:
        pass
    return ops


def time_attention(settings, op, B, N, H, D, backward):
    """(milliseconds per call, whether the output was finite)."""
    q, k, v = (torch.randn(B, N, H, D, device=settings.device, dtype=settings.torch_dtype, requires_grad=backward)
               for _ in range(3))
    with torch.no_grad():
        finite = bool(torch.isfinite(op(q, k, v)).all())
        if not backward:
            return median_ms(settings, lambda: op(q, k, v)), finite
    grad_o = torch.randn_like(v)
    return median_ms(settings, lambda: torch.autograd.grad(op(q, k, v), (q, k, v), grad_o)), finite


def bench_attention(settings, section):
    """Yields the section's rows, one per op and length."""
    config = GPTConfig.named(settings.model)
    H, D = config.n_head, config.head_size
    section['notes'].append(f"{settings.dtype}, H={H}, D={D}, B*N={settings.tokens_per_batch}; fwd under no_grad, "
                            f"fwd_bwd = forward + autograd.grad of q, k, v")
    ops = attention_ops(settings, config)
    if settings.cuda and 'kernel' not in ops:
        section['notes'].append("kernel needs Triton, which is not installed: not run")
    for name, op in ops.items():
        for N in settings.length_list:
            B = max(1, settings.tokens_per_batch // N)
            row = dict(impl=name, N=N, B=B)
            for key, backward in (('fwd_ms', False), ('fwd_bwd_ms', True)):
                if settings.cuda:
                    torch.cuda.reset_peak_memory_stats(settings.device)
                result = attempt(settings, lambda: time_attention(settings, op, B, N, H, D, backward))
                if isinstance(result, str):  # OOM or error
                    row[key] = result
                    continue
                ms, finite = result
                row[key] = ms if finite else 'nan'
                if not finite:  # the time it took to compute garbage, shown beside the 'nan'
                    row[f'{key}_of_nan'] = ms
                if settings.cuda:
                    row[key.replace('_ms', '_peak_gib')] = peak_gib(settings)
            yield row

# -----------------------------------------------------------------------------
# 2-4. The whole model


def build_model(settings, attention, longest, section):
    """A model of the benchmark's shape with random weights, on the device, in fp32. A softmax model
    gets block_size raised to `longest` when that is past its own limit."""
    config = GPTConfig.named(settings.model, attention=attention,
                             **({'vocab_size': settings.vocab_size} if settings.vocab_size else {}))
    if attention == 'softmax' and longest > config.block_size:
        section['notes'].append(f"softmax built with block_size={longest} (the model's own is {config.block_size}) "
                                f"to measure past its context")
        config = GPTConfig(**{**asdict(config), 'block_size': longest})
    return GPT(config).to(settings.device)


def bench_prefill(settings, section):
    """Yields the section's rows, one per model and length."""
    for attention in settings.model_list:
        net = build_model(settings, attention, max(settings.length_list), section).to_dtype(settings.torch_dtype).eval()
        vocab = net.config.vocab_size

        def prefill_ms(B, N):
            idx = torch.randint(vocab, (B, N), device=settings.device)
            with torch.no_grad():
                return median_ms(settings, lambda: net(idx, cache=net.new_cache()))

        for N in settings.length_list:
            B = max(1, settings.tokens_per_batch // N)
            ms = attempt(settings, lambda: prefill_ms(B, N))
            yield dict(attention=attention, N=N, B=B, ms=ms, tokens_per_s=B * N / ms * 1000 if is_number(ms) else ms)
        del net


def cache_bytes(config, B, context, dtype):
    """Bytes that decoding holds for B sequences at `context` tokens: per layer, the softmax model's
    keys and values, 2 (B, H, context, D) in the model's dtype, or DiJiang's state (B, H, D, D) in fp32."""
    L, H, D = config.n_layer, config.n_head, config.head_size
    if config.attention == 'softmax':
        return 2 * L * B * H * context * D * dtype.itemsize
    return L * B * H * D * D * 4


def random_cache(settings, config, B, context):
    """A Cache as if `context` tokens had been read: random tensors of the shapes decoding holds."""
    L, H, D = config.n_layer, config.n_head, config.head_size
    if config.attention == 'softmax':
        layers = [tuple(torch.randn(B, H, context, D, device=settings.device, dtype=settings.torch_dtype)
                        for _ in range(2)) for _ in range(L)]
    else:
        layers = [torch.randn(B, H, D, D, device=settings.device) for _ in range(L)]
    return Cache(pos=context, layers=layers)


def decode_ms(settings, net, B, context, cuda_graph):
    """Milliseconds for one decoding step of B sequences at `context` tokens. Eager: the model's own
    step on a copy of the cache's layer list each call (the KV cache is concatenated, not grown in place,
    so every call sees the same context). CUDA graph: CUDAGraphDecoder with its states loaded."""
    cache = random_cache(settings, net.config, B, context)
    token = torch.randint(net.config.vocab_size, (B, 1), device=settings.device)
    with torch.no_grad():
        if cuda_graph:
            decoder = CUDAGraphDecoder(net, batch_size=B, compile=settings.compile)
            for state, random_state in zip(decoder.states, cache.layers):
                state.copy_(random_state)
            decoder.position.fill_(context)
            return median_ms(settings, lambda: decoder.step(token))
        return median_ms(settings, lambda: net(token, cache=Cache(pos=context, layers=list(cache.layers))))


def profile_decode_step(settings, net, B):
    """Where one CUDA-graph decoding step of B sequences spends its time: each kernel's calls and
    microseconds per step (torch.profiler over 20 replays; the step's shapes do not depend on the
    context), and each distinct matrix product timed alone, 50 calls in a CUDA graph. products_ms, their
    sum over the step, is what the weight reads cost before any other kernel runs."""
    from torch.profiler import ProfilerActivity
    decoder = CUDAGraphDecoder(net, batch_size=B, compile=settings.compile)
    with torch.profiler.profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            decoder.graph.replay()
        synchronize(settings)
    kernels = sorted(([e.key, e.count / 20, e.device_time_total / 20] for e in prof.key_averages()
                      if e.device_time_total > 0), key=lambda kernel: -kernel[2])
    products_us = {}
    with torch.no_grad():
        for name, module in net.named_modules():
            if isinstance(module, torch.nn.Linear) and (name.startswith('layers.0.') or name == 'lm_head'):
                x = torch.randn(B, module.in_features, device=settings.device, dtype=settings.torch_dtype)
                module(x)  # cuBLAS creates its handle here, outside the capture
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    for _ in range(50):
                        module(x)
                products_us[name] = median_ms(settings, graph.replay) * 1000 / 50
    layer_us = sum(us for name, us in products_us.items() if name != 'lm_head')
    return dict(B=B, kernels_per_step=sum(k[1] for k in kernels), kernel_ms=sum(k[2] for k in kernels) / 1000,
                products_us=products_us, products_ms=(layer_us * net.config.n_layer + products_us['lm_head']) / 1000,
                top_kernels=kernels[:15])


def bench_decode(settings, section):
    """Yields the section's rows, one per model, implementation, batch size and context; the profile
    goes into section['profile'] (saved with the next row or the section)."""
    if settings.profile and not settings.cuda:
        section['notes'].append("profile needs CUDA: not run")
    for attention in settings.model_list:
        net = build_model(settings, attention, max(settings.length_list) + 1, section)
        net = net.to_dtype(settings.torch_dtype).eval()
        impls = ['eager', 'cuda_graph'] if attention == 'dijiang' and settings.cuda else ['eager']
        for impl in impls:
            for B in settings.decode_batch_list:
                for N in settings.length_list:
                    ms = attempt(settings, lambda: decode_ms(settings, net, B, N, cuda_graph=impl == 'cuda_graph'))
                    yield dict(attention=attention, impl=impl, B=B, context=N, ms_per_token=ms,
                               tokens_per_s=B / ms * 1000 if is_number(ms) else ms,
                               cache_bytes=cache_bytes(net.config, B, N, settings.torch_dtype))
        if settings.profile and 'cuda_graph' in impls:
            section['profile'] = [attempt(settings, lambda: profile_decode_step(settings, net, B))
                                  for B in settings.decode_batch_list]
        del net


def train_step_ms(settings, net, optimizer, block):
    B = max(1, settings.train_tokens // block)
    x, y = (torch.randint(net.config.vocab_size, (B, block), device=settings.device) for _ in range(2))
    autocast = (torch.autocast(torch.device(settings.device).type, dtype=settings.torch_dtype)
                if settings.torch_dtype != torch.float32 else nullcontext())

    forward = torch.compile(net, dynamic=False) if settings.compile else net  # one graph per block size

    def step():
        with autocast:
            _, loss = forward(x, targets=y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    if not torch.isfinite(step()):
        return 'nan'
    return median_ms(settings, step)


def bench_train(settings, section):
    """Yields the section's rows, one per model and block size."""
    for attention in settings.model_list:
        net = build_model(settings, attention, max(settings.train_block_list), section).train()
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=settings.cuda)
        for block in settings.train_block_list:
            if settings.cuda:
                torch.cuda.reset_peak_memory_stats(settings.device)
            ms = attempt(settings, lambda: train_step_ms(settings, net, optimizer, block))
            B = max(1, settings.train_tokens // block)
            tokens_per_s = B * block / ms * 1000 if is_number(ms) else ms
            row = dict(attention=attention, block=block, B=B, ms_per_step=ms, tokens_per_s=tokens_per_s,
                       mfu=net.flops_per_token(block) * tokens_per_s / settings.peak_flops if is_number(ms) else ms)
            if settings.cuda and is_number(ms):
                row['peak_gib'] = peak_gib(settings)
            yield row
        del net, optimizer

# -----------------------------------------------------------------------------
# Output: tables, JSON, plot


def fmt(x):
    if isinstance(x, float):
        return f"{x:.4g}" if abs(x) < 1000 else f"{x:,.0f}"
    return str(x)


def save(results, path):
    ordered = {name: results[name] for name in SECTIONS if name in results}
    atomic_write_text(path, json.dumps(ordered, indent=1) + '\n')


def print_table(title, header, lines):
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *lines)]
    print(f"\n{title}")
    for line in [header, *lines]:
        print('  '.join(str(cell).rjust(width) for cell, width in zip(line, widths)))


def fmt_bytes(n):
    unit = max((u for u in range(4) if n >= 1024 ** u), default=0)
    return f"{n / 1024 ** unit:.4g} {['B', 'KiB', 'MiB', 'GiB'][unit]}"


def attention_cell(row):
    """'fwd / fwd+bwd', with the time of a non-finite result in brackets."""
    return ' / '.join(fmt(row[key]) + (f" ({fmt(row[key + '_of_nan'])})" if key + '_of_nan' in row else '')
                      for key in ('fwd_ms', 'fwd_bwd_ms'))


def print_tables(results):
    if 'attention' in results:
        rows = results['attention']['rows']
        impls = list(dict.fromkeys(r['impl'] for r in rows))
        by_key = {(r['impl'], r['N']): r for r in rows}
        Ns = sorted({r['N'] for r in rows})
        lines = [[N, max(1, results['attention']['meta']['tokens_per_batch'] // N),
                  *(attention_cell(by_key[i, N]) if (i, N) in by_key else '' for i in impls)] for N in Ns]
        print_table("attention op, ms: forward / forward+backward", ['N', 'B', *impls], lines)
    if 'prefill' in results:
        rows = {(r['attention'], r['N']): r for r in results['prefill']['rows']}
        Ns = sorted({N for _, N in rows})
        lines = []
        for N in Ns:
            s, d = rows.get(('softmax', N), {}), rows.get(('dijiang', N), {})
            ratio = d['tokens_per_s'] / s['tokens_per_s'] if is_number(d.get('tokens_per_s')) and is_number(s.get('tokens_per_s')) else ''
            lines.append([N, s.get('B', d.get('B')), fmt(s.get('tokens_per_s', '')), fmt(d.get('tokens_per_s', '')),
                          fmt(ratio) + 'x' if ratio else ''])
        print_table("prefill, tokens/s", ['N', 'B', 'softmax', 'dijiang', 'dijiang/softmax'], lines)
    if 'decode' in results:
        lines = [[r['attention'], r['impl'], r['B'], r['context'], fmt(r['ms_per_token']), fmt(r['tokens_per_s']),
                  fmt_bytes(r['cache_bytes'])] for r in results['decode']['rows']]
        print_table("decode, one token per sequence", ['attention', 'impl', 'B', 'context', 'ms/token', 'tokens/s',
                                                       'KV cache / state'], lines)
        for p in results['decode'].get('profile', []):
            if isinstance(p, str):
                print(f"\nprofile: {p}")
                continue
            print(f"\ndijiang CUDA-graph step at B={p['B']}: {p['kernels_per_step']:.0f} kernels, {p['kernel_ms']:.3f} ms "
                  f"of kernel time; its matrix products alone: {p['products_ms']:.3f} ms")
            print_table("kernels, per step", ['us', 'calls', 'kernel'],
                        [[f"{us:.1f}", f"{calls:.0f}", name[:100]] for name, calls, us in p['top_kernels']])
    if 'train' in results:
        lines = [[r['attention'], r['block'], r['B'], fmt(r['ms_per_step']), fmt(r['tokens_per_s']),
                  f"{r['mfu']:.1%}" if is_number(r['mfu']) else r['mfu']] for r in results['train']['rows']]
        meta = results['train']['meta']  # of the run that measured it, which may be an earlier one
        print_table(f"training step, AdamW, {meta['dtype']}, MFU of {meta['peak_flops']:.3g} FLOP/s",
                    ['attention', 'block', 'B', 'ms/step', 'tokens/s', 'MFU'], lines)
    for name, section in results.items():
        for note in section['notes']:
            print(f"note ({name}): {note}")
        if section['error']:
            print(f"error ({name}): {section['error']}")


def draw_plot(results, path):
    """Throughput against length, as the paper's speed figure: one panel per section measured, saved
    to `path` when matplotlib is installed."""
    if not results:
        print("no plot: no section measured")
        return
    try:
        import matplotlib
    except ImportError:
        print("no plot: matplotlib is not installed")
        return
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    panels = [name for name in SECTIONS if name in results]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, name in zip(axes[0], panels):
        rows = results[name]['rows']
        if name == 'attention':
            series = {r['impl']: [] for r in rows}
            for r in rows:
                if is_number(r['fwd_bwd_ms']):
                    series[r['impl']].append((r['N'], r['B'] * r['N'] / r['fwd_bwd_ms'] * 1000))
            ax.set_title('attention op, forward + backward')
        elif name == 'prefill':
            series = {r['attention']: [] for r in rows}
            for r in rows:
                if is_number(r['tokens_per_s']):
                    series[r['attention']].append((r['N'], r['tokens_per_s']))
            ax.set_title('prefill, whole model')
        elif name == 'decode':
            series = {}
            for r in rows:
                if is_number(r['tokens_per_s']):
                    series.setdefault(f"{r['attention']} {r['impl']} B={r['B']}", []).append((r['context'], r['tokens_per_s']))
            ax.set_title('decoding, whole model')
        else:
            series = {r['attention']: [] for r in rows}
            for r in rows:
                if is_number(r['tokens_per_s']):
                    series[r['attention']].append((r['block'], r['tokens_per_s']))
            ax.set_title('training step, whole model')
        for label, points in series.items():
            if points:
                ax.plot(*zip(*sorted(points)), marker='o', label=label)
        ax.set_xscale('log', base=2)
        ax.set_yscale('log')
        ax.set_xlabel('block size (tokens)' if name == 'train' else 'context length (tokens)')
        ax.set_ylabel('tokens/s')
        ax.grid(True, which='both', alpha=0.3)
        if any(series.values()):  # a panel of failures only (OOM, nan) has nothing to label
            ax.legend(fontsize=7)
    meta = results[panels[0]]['meta']
    fig.suptitle(f"{meta['model']}, random weights, {meta['hardware']}", fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format='png', dpi=120))
    plt.close(fig)
    print(f"wrote {path}")


def machine(settings):
    name = torch.cuda.get_device_name(settings.device) if settings.cuda else 'cpu'
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return dict(hardware=name, torch=torch.__version__, triton=triton_version, command=' '.join(sys.argv),
                date=time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime()))


def previous_results(settings):
    """The sections an earlier run wrote to the same --out for the same model, except those this run measures."""
    if not os.path.isfile(settings.out):
        return {}
    try:
        with open(settings.out) as f:
            previous = json.load(f)
        return {name: s for name, s in previous.items()
                if name not in settings.section_list and s['meta']['model'] == settings.model}
    except (ValueError, TypeError, KeyError, AttributeError):
        raise SystemExit(f"error: out={settings.out!r} exists but was not written by bench.py: remove it or "
                         f"pass another --out")


def make_folders(settings):
    """Create the folders of --out and --plot, which must name files (--plot='' draws none)."""
    for name, path in (('out', settings.out), ('plot', settings.plot)):
        if os.path.isdir(path) or (name == 'out' and not path):
            raise SystemExit(f"error: {name}={path!r}: name a file, e.g. --{name}={SETTINGS[name]}")
        try:
            os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
        except OSError as e:
            raise SystemExit(f"error: {name}={path!r}: cannot create its folder ({e.strerror}): pass another --{name}")


def main(settings):
    make_folders(settings)
    results = previous_results(settings)
    if results:
        print(f"keeping {', '.join(results)} from {settings.out}", file=sys.stderr)
    torch.manual_seed(0)

    runners = dict(attention=bench_attention, prefill=bench_prefill, decode=bench_decode, train=bench_train)
    values = {name: getattr(settings, name) for name in SETTINGS}  # as run, CPU_SMOKE and 'auto' resolved
    for name in settings.section_list:
        print(f"{name} ...", file=sys.stderr, flush=True)
        results[name] = section = dict(meta={**machine(settings), **values}, rows=[], notes=[], error=None)
        try:
            for row in runners[name](settings, section):
                section['rows'].append(row)
                print('  ' + ' '.join(f"{k}={fmt(v)}" for k, v in row.items()), file=sys.stderr, flush=True)
                save(results, settings.out)  # after every row: a run cut short keeps what it measured
        except Exception as e:  # keep what the section measured, and the other sections
            section['error'] = f"{type(e).__name__}: {e}"
        save(results, settings.out)

    results = {name: results[name] for name in SECTIONS if name in results}
    print_tables(results)
    print(f"\nwrote {settings.out}")
    if settings.plot:
        draw_plot(results, settings.plot)


if __name__ == '__main__':
    settings = build_settings(parse_settings(sys.argv[1:], SETTINGS, settings_help(__file__)))
    try:
        main(settings)
    except KeyboardInterrupt:
        interrupted(f"{settings.out} holds the rows measured so far (it is saved after each one); run the sections "
                    "still missing with --sections=..." if os.path.isfile(settings.out) else
                    'nothing was measured yet; run the same command again')
