"""
The speed comparison the paper makes, done properly: softmax attention (PyTorch SDPA, flash on the
GPU) against DiJiang at the same model size, with random weights.

    python bench.py                                           # every section, pythia-410m shape, on the GPU
    python bench.py --sections=attention --lengths=1024,8192,32768
    python bench.py --sections=decode --model=pythia-1b --out=bench-1b.json --plot=bench-1b.png
    python bench.py --sections=decode --compile=True --profile=True  # and where a decoding step's time goes
    python bench.py --device=cpu                              # a small smoke run of every section
    python bench.py --help                                    # every setting and its default

Sections (--sections picks some; runs that write the same --out keep the sections they did not run,
so a long benchmark can be split into several commands):
  attention  The attention op alone, forward and forward+backward, on (B, N, H, D) inputs with B * N =
             tokens_per_batch and H, D from the model:
               sdpa           causal F.scaled_dot_product_attention, as the softmax model calls it
               dijiang        DiJiangAttention.attend: the model's own dispatch (Triton on CUDA when
                              available), feature map included
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
on. Results: a table on stdout, JSON in --out, and a plot in --plot when matplotlib is installed.
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

import torch
import torch.nn.functional as F

from atomic import atomic_write, atomic_write_text
from configurator import parse_settings, settings_help
from dijiang import CONFIGS, GPT, Cache, DiJiangAttention, GPTConfig, feature_map
from fast.cuda_graph_decode import CUDAGraphDecoder

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
out = 'bench.json'
plot = 'bench.png'  # '' for none; drawn only if matplotlib is installed
# -----------------------------------------------------------------------------
SETTINGS = {name: value for name, value in globals().items()
            if not name.startswith('_') and isinstance(value, (bool, int, float, str))}
# --device=cpu is a smoke run of every code path: these replace the defaults the command line leaves alone
CPU_SMOKE = dict(model='tiny', vocab_size=512, lengths='64,128', tokens_per_batch=256, decode_batches='1,4', train_blocks='64,128',
                 train_tokens=256, dtype='float32', warmup=1, repeats=3)
SECTIONS = ('attention', 'prefill', 'decode', 'train')


def synchronize():
    if device.startswith('cuda'):
        torch.cuda.synchronize(device)


def median_ms(fn):
    """Milliseconds per call of fn: the median of up to `repeats` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    synchronize()
    times, deadline = [], time.perf_counter() + max_seconds
    for i in range(repeats):
        if device.startswith('cuda'):
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
    if device.startswith('cuda'):
        torch.cuda.empty_cache()  # the next measurement may need one large block
    return result


def peak_gib():
    return torch.cuda.max_memory_allocated(device) / 2 ** 30


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


def attention_ops(config):
    dijiang = DiJiangAttention(config, layer_idx=0).to(device)
    ops = {'sdpa': sdpa_attention, 'dijiang': lambda q, k, v: dijiang.attend(q, k, v, None)[0]}
    if device.startswith('cuda'):
        torch_form = DiJiangAttention(GPTConfig(**{**asdict(config), 'kernel': 'torch'}), layer_idx=0).to(device)
        ops['dijiang_torch'] = lambda q, k, v: torch_form.attend(q, k, v, None)[0]
    ops['released'] = lambda q, k, v: released_attention(q, k, v, dijiang.feature_proj, dijiang.decay)
    try:
        import fla  # noqa: F401  (a comparison when installed, never a dependency)
        ops['fla'] = lambda q, k, v: fla_attention(q, k, v, dijiang.feature_proj, dijiang.decay)
    except ImportError:
        pass
    return ops


def time_attention(op, B, N, H, D, backward):
    """(milliseconds per call, whether the output was finite)."""
    q, k, v = (torch.randn(B, N, H, D, device=device, dtype=torch_dtype, requires_grad=backward) for _ in range(3))
    with torch.no_grad():
        finite = bool(torch.isfinite(op(q, k, v)).all())
        if not backward:
            return median_ms(lambda: op(q, k, v)), finite
    grad_o = torch.randn_like(v)
    return median_ms(lambda: torch.autograd.grad(op(q, k, v), (q, k, v), grad_o)), finite


def bench_attention(section):
    config = GPTConfig.named(model)
    H, D = config.n_head, config.head_size
    section['notes'].append(f"{dtype}, H={H}, D={D}, B*N={tokens_per_batch}; fwd under no_grad, fwd_bwd = "
                            f"forward + autograd.grad of q, k, v")
    for name, op in attention_ops(config).items():
        for N in length_list:
            B = max(1, tokens_per_batch // N)
            row = dict(impl=name, N=N, B=B)
            for key, backward in (('fwd_ms', False), ('fwd_bwd_ms', True)):
                if device.startswith('cuda'):
                    torch.cuda.reset_peak_memory_stats(device)
                result = attempt(lambda: time_attention(op, B, N, H, D, backward))
                if isinstance(result, str):  # OOM or error
                    row[key] = result
                    continue
                ms, finite = result
                row[key] = ms if finite else 'nan'
                if not finite:  # the time it took to compute garbage, shown beside the 'nan'
                    row[f'{key}_of_nan'] = ms
                if device.startswith('cuda'):
                    row[key.replace('_ms', '_peak_gib')] = peak_gib()
            record(section, row)

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
    return GPT(config).to(device)


def bench_prefill(section):
    for attention in model_list:
        net = build_model(attention, max(length_list), section).to_dtype(torch_dtype).eval()
        vocab = net.config.vocab_size

        def prefill_ms(B, N):
            idx = torch.randint(vocab, (B, N), device=device)
            with torch.no_grad():
                return median_ms(lambda: net(idx, cache=net.new_cache()))

        for N in length_list:
            B = max(1, tokens_per_batch // N)
            ms = attempt(lambda: prefill_ms(B, N))
            row = dict(attention=attention, N=N, B=B, ms=ms, tokens_per_s=B * N / ms * 1000 if is_number(ms) else ms)
            record(section, row)
        del net


def cache_bytes(config, B, context, dtype):
    """Bytes that decoding holds for B sequences at `context` tokens: per layer, the softmax model's
    keys and values, 2 (B, H, context, D) in the model's dtype, or DiJiang's state (B, H, D, D) in fp32."""
    L, H, D = config.n_layer, config.n_head, config.head_size
    if config.attention == 'softmax':
        return 2 * L * B * H * context * D * dtype.itemsize
    return L * B * H * D * D * 4


def random_cache(config, B, context):
    """A Cache as if `context` tokens had been read: random tensors of the shapes decoding holds."""
    L, H, D = config.n_layer, config.n_head, config.head_size
    if config.attention == 'softmax':
        layers = [tuple(torch.randn(B, H, context, D, device=device, dtype=torch_dtype) for _ in range(2))
                  for _ in range(L)]
    else:
        layers = [torch.randn(B, H, D, D, device=device) for _ in range(L)]
    return Cache(pos=context, layers=layers)


def decode_ms(net, B, context, cuda_graph):
    """Milliseconds for one decoding step of B sequences at `context` tokens. Eager: the model's own
    step on a copy of the cache's layer list each call (the KV cache is concatenated, not grown in place,
    so every call sees the same context). CUDA graph: CUDAGraphDecoder with its states loaded."""
    cache = random_cache(net.config, B, context)
    token = torch.randint(net.config.vocab_size, (B, 1), device=device)
    with torch.no_grad():
        if cuda_graph:
            decoder = CUDAGraphDecoder(net, batch_size=B, compile=compile)
            for state, random_state in zip(decoder.states, cache.layers):
                state.copy_(random_state)
            decoder.position.fill_(context)
            return median_ms(lambda: decoder.step(token))
        return median_ms(lambda: net(token, cache=Cache(pos=context, layers=list(cache.layers))))


def profile_decode_step(net, B):
    """Where one CUDA-graph decoding step of B sequences spends its time: each kernel's calls and
    microseconds per step (torch.profiler over 20 replays; the step's shapes do not depend on the
    context), and each distinct matrix product timed alone, 50 calls in a CUDA graph. products_ms, their
    sum over the step, is what the weight reads cost before any other kernel runs."""
    from torch.profiler import ProfilerActivity
    decoder = CUDAGraphDecoder(net, batch_size=B, compile=compile)
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
                x = torch.randn(B, module.in_features, device=device, dtype=torch_dtype)
                module(x)  # cuBLAS creates its handle here, outside the capture
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    for _ in range(50):
                        module(x)
                products_us[name] = median_ms(graph.replay) * 1000 / 50
    layer_us = sum(us for name, us in products_us.items() if name != 'lm_head')
    return dict(B=B, kernels_per_step=sum(k[1] for k in kernels), kernel_ms=sum(k[2] for k in kernels) / 1000,
                products_us=products_us, products_ms=(layer_us * net.config.n_layer + products_us['lm_head']) / 1000,
                top_kernels=kernels[:15])


def bench_decode(section):
    batches = [int(b) for b in decode_batches.split(',')]
    if profile and not device.startswith('cuda'):
        section['notes'].append("profile needs CUDA: not run")
    for attention in model_list:
        net = build_model(attention, max(length_list) + 1, section).to_dtype(torch_dtype).eval()
        impls = ['eager', 'cuda_graph'] if attention == 'dijiang' and device.startswith('cuda') else ['eager']
        for impl in impls:
            for B in batches:
                for N in length_list:
                    ms = attempt(lambda: decode_ms(net, B, N, cuda_graph=impl == 'cuda_graph'))
                    row = dict(attention=attention, impl=impl, B=B, context=N, ms_per_token=ms,
                               tokens_per_s=B / ms * 1000 if is_number(ms) else ms,
                               cache_bytes=cache_bytes(net.config, B, N, torch_dtype))
                    record(section, row)
        if profile and 'cuda_graph' in impls:
            section['profile'] = [attempt(lambda: profile_decode_step(net, B)) for B in batches]
            save()
        del net


def train_step_ms(net, optimizer, block):
    B = max(1, train_tokens // block)
    x, y = (torch.randint(net.config.vocab_size, (B, block), device=device) for _ in range(2))
    autocast = torch.autocast(torch.device(device).type, dtype=torch_dtype) if torch_dtype != torch.float32 else nullcontext()

    forward = torch.compile(net, dynamic=False) if compile else net  # one graph per block size

    def step():
        with autocast:
            _, loss = forward(x, targets=y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    if not torch.isfinite(step()):
        return 'nan'
    return median_ms(step)


def bench_train(section):
    blocks = [int(b) for b in train_blocks.split(',')]
    for attention in model_list:
        net = build_model(attention, max(blocks), section).train()
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=device.startswith('cuda'))
        for block in blocks:
            if device.startswith('cuda'):
                torch.cuda.reset_peak_memory_stats(device)
            ms = attempt(lambda: train_step_ms(net, optimizer, block))
            B = max(1, train_tokens // block)
            tokens_per_s = B * block / ms * 1000 if is_number(ms) else ms
            row = dict(attention=attention, block=block, B=B, ms_per_step=ms, tokens_per_s=tokens_per_s,
                       mfu=net.flops_per_token(block) * tokens_per_s / peak_flops if is_number(ms) else ms)
            if device.startswith('cuda') and is_number(ms):
                row['peak_gib'] = peak_gib()
            record(section, row)
        del net, optimizer

# -----------------------------------------------------------------------------
# Output: tables, JSON, plot


def fmt(x):
    if isinstance(x, float):
        return f"{x:.4g}" if abs(x) < 1000 else f"{x:,.0f}"
    return str(x)


def record(section, row):
    """Keep a measurement, show it, and save the JSON: a run cut short keeps what it measured."""
    section['rows'].append(row)
    print('  ' + ' '.join(f"{k}={fmt(v)}" for k, v in row.items()), file=sys.stderr, flush=True)
    save()


def save():
    ordered = {name: results[name] for name in SECTIONS if name in results}
    atomic_write_text(out, json.dumps(ordered, indent=1) + '\n')


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
        print_table(f"training step, AdamW, {dtype}, MFU of {peak_flops:.3g} FLOP/s",
                    ['attention', 'block', 'B', 'ms/step', 'tokens/s', 'MFU'], lines)
    for name, section in results.items():
        for note in section['notes']:
            print(f"note ({name}): {note}")
        if section['error']:
            print(f"error ({name}): {section['error']}")


def draw_plot(results, path):
    """Throughput against length, as the paper's speed figure: one panel per section measured."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    panels = [name for name in ('attention', 'prefill', 'decode') if name in results]
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
        else:
            series = {}
            for r in rows:
                if is_number(r['tokens_per_s']):
                    series.setdefault(f"{r['attention']} {r['impl']} B={r['B']}", []).append((r['context'], r['tokens_per_s']))
            ax.set_title('decoding, whole model')
        for label, points in series.items():
            if points:
                ax.plot(*zip(*sorted(points)), marker='o', label=label)
        ax.set_xscale('log', base=2)
        ax.set_yscale('log')
        ax.set_xlabel('context length (tokens)')
        ax.set_ylabel('tokens/s')
        ax.grid(True, which='both', alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{results[panels[0]]['meta']['model']}, random weights, {results[panels[0]]['meta']['hardware']}", fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format='png', dpi=120))
    plt.close(fig)


def machine():
    name = torch.cuda.get_device_name(device) if device.startswith('cuda') else 'cpu'
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return dict(hardware=name, torch=torch.__version__, triton=triton_version, command=' '.join(sys.argv),
                date=time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime()))


if __name__ == '__main__':
    overrides = parse_settings(sys.argv[1:], SETTINGS, settings_help(__file__))
    globals().update(overrides)
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if device.startswith('cuda') and not torch.cuda.is_available():
        raise SystemExit(f"error: device={device!r} but torch sees no CUDA GPU: use --device=cpu for a smoke run")
    if device == 'cpu':
        globals().update({name: value for name, value in CPU_SMOKE.items() if name not in overrides})
    chosen = [name.strip() for name in sections.split(',') if name.strip()]
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        raise SystemExit(f"error: unknown section(s) {', '.join(unknown)}: choose from {','.join(SECTIONS)}")
    if model not in CONFIGS:
        raise SystemExit(f"error: model={model!r}: choose one of {', '.join(CONFIGS)}")
    if dtype not in ('bfloat16', 'float16', 'float32'):
        raise SystemExit(f"error: dtype={dtype!r}: use 'bfloat16', 'float16' or 'float32'")
    try:
        length_list = [int(n) for n in lengths.split(',')]
    except ValueError:
        raise SystemExit(f"error: lengths={lengths!r}: give comma-separated integers, e.g. --lengths=1024,8192")
    model_list = [name.strip() for name in models.split(',') if name.strip()]
    if not model_list or set(model_list) - {'softmax', 'dijiang'}:
        raise SystemExit(f"error: models={models!r}: choose from softmax,dijiang")
    torch_dtype = getattr(torch, dtype)
    torch.manual_seed(0)

    # keep the sections an earlier run wrote to the same file for the same model
    results = {}
    if os.path.isfile(out):
        try:
            with open(out) as f:
                previous = json.load(f)
            results = {name: s for name, s in previous.items() if name not in chosen and s['meta']['model'] == model}
        except (ValueError, TypeError, KeyError, AttributeError):
            raise SystemExit(f"error: {out} exists but was not written by bench.py: remove it or pass another --out")
        if results:
            print(f"keeping {', '.join(results)} from {out}", file=sys.stderr)
    runners = dict(attention=bench_attention, prefill=bench_prefill, decode=bench_decode, train=bench_train)
    settings = {name: globals()[name] for name in SETTINGS}
    for name in chosen:
        print(f"{name} ...", file=sys.stderr, flush=True)
        results[name] = section = dict(meta={**machine(), **settings}, rows=[], notes=[], error=None)
        try:
            runners[name](section)
        except Exception as e:  # keep what the section measured, and the other sections
            section['error'] = f"{type(e).__name__}: {e}"
        save()

    results = {name: results[name] for name in SECTIONS if name in results}
    print_tables(results)
    print(f"\nwrote {out}")
    if plot:
        try:
            draw_plot(results, plot)
            print(f"wrote {plot}")
        except ImportError:
            print("no plot: matplotlib is not installed")
