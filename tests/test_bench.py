"""bench.py: the CPU smoke run covers every section with finite numbers, and the pieces the GPU run
relies on (the released code's formula and its overflow, the cache memory formula, OOM recording)
are checked here on the CPU."""

import json
import math
import os
import runpy
import subprocess
import sys

import torch

import bench
from dijiang import GPT, GPTConfig, attention_chunk, attention_parallel, decay_schedule, feature_map, projection_matrix

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def numbers(value):
    """Every number inside a JSON value."""
    if isinstance(value, dict):
        return [n for v in value.values() for n in numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in numbers(v)]
    return [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


def test_cpu_smoke_run_fills_every_section(tmp_path, monkeypatch, capsys):
    out = tmp_path / 'bench.json'
    result = subprocess.run([sys.executable, 'bench.py', '--device=cpu', f'--out={out}', '--plot='],
                            cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, 'OMP_NUM_THREADS': '1'})  # tiny ops: threads only add overhead
    assert result.returncode == 0, result.stderr
    results = json.loads(out.read_text())
    assert list(results) == ['attention', 'prefill', 'decode', 'train']
    for name, section in results.items():
        assert section['error'] is None, (name, section['error'])
        assert section['meta']['model'] == 'tiny' and section['meta']['hardware'] == 'cpu'
        for row in section['rows']:  # no OOM, 'nan' or error strings in a smoke run: every value is a number
            assert all(isinstance(v, (int, float)) for k, v in row.items() if k not in ('impl', 'attention')), row
        assert all(math.isfinite(n) and n >= 0 for n in numbers(section['rows'])), name

    attention = {(r['impl'], r['N']): r for r in results['attention']['rows']}
    assert set(attention) == {(impl, N) for impl in ('sdpa', 'dijiang', 'released') for N in (64, 128)}
    assert attention['sdpa', 128]['B'] == 256 // 128  # tokens_per_batch fixed
    assert all(r['fwd_ms'] > 0 and r['fwd_bwd_ms'] > 0 for r in attention.values())

    prefill = {(r['attention'], r['N']): r for r in results['prefill']['rows']}
    assert set(prefill) == {(a, N) for a in ('softmax', 'dijiang') for N in (64, 128)}
    assert all(r['tokens_per_s'] == r['B'] * r['N'] / r['ms'] * 1000 for r in prefill.values())

    decode = {(r['attention'], r['B'], r['context']): r for r in results['decode']['rows']}
    assert set(decode) == {(a, B, N) for a in ('softmax', 'dijiang') for B in (1, 4) for N in (64, 128)}
    for B in (1, 4):  # the KV cache grows with the context, DiJiang's state does not
        assert decode['softmax', B, 128]['cache_bytes'] == 2 * decode['softmax', B, 64]['cache_bytes']
        assert decode['dijiang', B, 128]['cache_bytes'] == decode['dijiang', B, 64]['cache_bytes'] > 0
    assert decode['dijiang', 4, 64]['cache_bytes'] == 4 * decode['dijiang', 1, 64]['cache_bytes']

    train = {(r['attention'], r['block']): r for r in results['train']['rows']}
    assert set(train) == {(a, T) for a in ('softmax', 'dijiang') for T in (64, 128)}
    assert all(0 < r['mfu'] < 1 for r in train.values())
    for line in ('attention op', 'prefill, tokens/s', 'decode, one token', 'training step'):
        assert line in result.stdout

    # a second run of one section into the same file replaces that section and keeps the others
    monkeypatch.setattr(sys, 'argv', ['bench.py', '--device=cpu', '--sections=decode', '--decode_batches=2',
                                      f'--out={out}', '--plot='])
    runpy.run_path(os.path.join(REPO, 'bench.py'), run_name='__main__')
    rerun = json.loads(out.read_text())
    assert {name: rerun[name] for name in ('attention', 'prefill', 'train')} == \
           {name: results[name] for name in ('attention', 'prefill', 'train')}
    assert {r['B'] for r in rerun['decode']['rows']} == {2}
    assert 'decode, one token' in capsys.readouterr().out


def test_released_formula_matches_the_reference_then_overflows():
    torch.manual_seed(0)
    H, D = 2, 16
    proj, decay = projection_matrix(D), decay_schedule(H)
    q, k, v = (torch.randn(1, 200, H, D, dtype=torch.float64) for _ in range(3))
    released = bench.released_attention(q, k, v, proj, decay)
    reference, _ = attention_parallel(feature_map(q, proj), feature_map(k, proj), v, decay)
    torch.testing.assert_close(released, reference, rtol=1e-4, atol=1e-5)
    # gamma^-n of the first head (0.96875) passes float32's maximum at n ~ 2797; relative decays do not
    q, k, v = (torch.randn(1, 2900, 1, D) for _ in range(3))
    decay = decay_schedule(1)
    assert not torch.isfinite(bench.released_attention(q, k, v, proj, decay)).all()
    assert torch.isfinite(bench.released_attention(q[:, :2700], k[:, :2700], v[:, :2700], proj, decay)).all()
    o, _ = attention_chunk(feature_map(q, proj), feature_map(k, proj), v, decay)
    assert torch.isfinite(o).all()


def tensors(cache):
    return [t for layer in cache.layers for t in (layer if isinstance(layer, tuple) else (layer,))]


def test_cache_bytes_is_what_decoding_holds(monkeypatch):
    monkeypatch.setattr(bench, 'device', 'cpu')
    monkeypatch.setattr(bench, 'torch_dtype', torch.bfloat16, raising=False)  # set from --dtype when run
    torch.manual_seed(0)
    for attention in ('softmax', 'dijiang'):
        model = GPT(GPTConfig.named('tiny', attention=attention, vocab_size=64)).to_dtype(torch.bfloat16)
        cache = model.new_cache()
        model(torch.randint(0, 64, (3, 50)), cache=cache)
        assert bench.cache_bytes(model.config, 3, 50, torch.bfloat16) == sum(t.nbytes for t in tensors(cache))
        # the decode section's stand-in cache has the real one's shapes and dtypes
        fake = bench.random_cache(model.config, 3, 50)
        assert fake.pos == cache.pos == 50
        assert [(t.shape, t.dtype) for t in tensors(fake)] == [(t.shape, t.dtype) for t in tensors(cache)]


def test_attempt_records_failures_and_goes_on():
    def out_of_memory():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 40.00 GiB")

    def broken():
        raise RuntimeError("Triton: illegal memory access")

    assert bench.attempt(lambda: 1.5) == 1.5
    assert bench.attempt(out_of_memory) == 'OOM'
    assert bench.attempt(broken) == 'error: RuntimeError: Triton: illegal memory access'


def test_models_setting_picks_the_attentions_and_profile_needs_cuda(tmp_path):
    out = tmp_path / 'bench.json'
    run = [sys.executable, 'bench.py', '--device=cpu', '--sections=decode', f'--out={out}', '--plot=']
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    result = subprocess.run(run + ['--models=dijiang', '--profile=True'], cwd=REPO, capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    decode = json.loads(out.read_text())['decode']
    assert {r['attention'] for r in decode['rows']} == {'dijiang'} and len(decode['rows']) == 4
    assert decode['notes'] == ["profile needs CUDA: not run"] and 'profile' not in decode
    result = subprocess.run(run + ['--models=mamba'], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == "error: models='mamba': choose from softmax,dijiang"
