"""bench.py: the CPU smoke run covers every section with finite numbers, any subset of sections
writes its JSON and plot, a bad setting stops with one line, and the pieces the GPU run relies on (the
released code's formula and its overflow, the cache memory formula, OOM recording) are checked here on
the CPU."""

import json
import math
import os
import runpy
import subprocess
import sys

import pytest
import torch

import bench
from configurator import parse_settings
from dijiang import GPT, GPTConfig, attention_chunk, attention_parallel, decay_schedule, feature_map, projection_matrix

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, 'OMP_NUM_THREADS': '1'}  # tiny ops: threads only add overhead


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
                            cwd=REPO, capture_output=True, text=True, timeout=300, env=ENV)
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


def test_cache_bytes_is_what_decoding_holds():
    settings = bench.build_settings(dict(device='cpu', dtype='bfloat16'))
    torch.manual_seed(0)
    for attention in ('softmax', 'dijiang'):
        model = GPT(GPTConfig.named('tiny', attention=attention, vocab_size=64)).to_dtype(torch.bfloat16)
        cache = model.new_cache()
        model(torch.randint(0, 64, (3, 50)), cache=cache)
        assert bench.cache_bytes(model.config, 3, 50, torch.bfloat16) == sum(t.nbytes for t in tensors(cache))
        # the decode section's stand-in cache has the real one's shapes and dtypes
        fake = bench.random_cache(settings, model.config, 3, 50)
        assert fake.pos == cache.pos == 50
        assert [(t.shape, t.dtype) for t in tensors(fake)] == [(t.shape, t.dtype) for t in tensors(cache)]


def test_attempt_records_failures_and_goes_on():
    def out_of_memory():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 40.00 GiB")

    def broken():
        raise RuntimeError("Triton: illegal memory access")

    settings = bench.build_settings(dict(device='cpu'))
    assert bench.attempt(settings, lambda: 1.5) == 1.5
    assert bench.attempt(settings, out_of_memory) == 'OOM'
    assert bench.attempt(settings, broken) == 'error: RuntimeError: Triton: illegal memory access'


def test_models_setting_picks_the_attentions_and_profile_needs_cuda(tmp_path):
    out = tmp_path / 'bench.json'
    result = subprocess.run([sys.executable, 'bench.py', '--device=cpu', '--sections=decode', f'--out={out}', '--plot=',
                             '--models=dijiang', '--profile=True'], cwd=REPO, capture_output=True, text=True,
                            timeout=300, env=ENV)
    assert result.returncode == 0, result.stderr
    decode = json.loads(out.read_text())['decode']
    assert {r['attention'] for r in decode['rows']} == {'dijiang'} and len(decode['rows']) == 4
    assert decode['notes'] == ["profile needs CUDA: not run"] and 'profile' not in decode


def test_one_section_alone_writes_its_json_and_plot(tmp_path):
    out, plot = tmp_path / 'new' / 'bench.json', tmp_path / 'new' / 'bench.png'  # the folder is created
    result = subprocess.run([sys.executable, 'bench.py', '--device=cpu', '--sections=train', '--train_blocks=64',
                             f'--out={out}', f'--plot={plot}'], cwd=REPO, capture_output=True, text=True,
                            timeout=300, env=ENV)
    assert result.returncode == 0, result.stderr
    assert list(json.loads(out.read_text())) == ['train']
    assert 'training step' in result.stdout
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "no plot: matplotlib is not installed" in result.stdout
        return
    assert f"wrote {plot}" in result.stdout
    assert plot.read_bytes().startswith(b'\x89PNG')


def test_no_section_no_plot(tmp_path, capsys):
    bench.draw_plot({}, str(tmp_path / 'bench.png'))
    assert capsys.readouterr().out == "no plot: no section measured\n"
    assert not (tmp_path / 'bench.png').exists()


# a bad setting and the one line it stops with, before anything is measured
BAD_SETTINGS = {
    '--sections=attention,trian': "error: sections='attention,trian': choose from attention,prefill,decode,train",
    '--models=mamba': "error: models='mamba': choose from softmax,dijiang",
    '--lengths=64,0': "error: lengths='64,0': give comma-separated positive integers, e.g. --lengths=1024,8192",
    '--decode_batches=1,x': "error: decode_batches='1,x': give comma-separated positive integers, "
                            "e.g. --decode_batches=1,64",
    '--train_blocks=-64': "error: train_blocks='-64': give comma-separated positive integers, "
                          "e.g. --train_blocks=2048,8192",
    '--repeats=0': "error: repeats=0: give 1 or more",
    '--device=cuda': "error: device='cuda' but torch sees no CUDA GPU: use --device=cpu for a smoke run",
}


def test_bad_settings_stop_with_one_line(tmp_path):
    bad = {arg: line for arg, line in BAD_SETTINGS.items() if arg != '--device=cuda' or not torch.cuda.is_available()}
    for arg, line in bad.items():  # the message of each, in this process
        with pytest.raises(SystemExit) as stop:
            bench.build_settings(parse_settings(['--device=cpu', arg], bench.SETTINGS, 'help'))
        assert str(stop.value) == line
    # and as a command: one line on stderr, a failing exit status, nothing written. Only two, at once: each
    # process spends seconds importing torch. The later --device wins over --device=cpu.
    commands = [arg for arg in ('--sections=attention,trian', '--device=cuda') if arg in bad]
    runs = {arg: subprocess.Popen([sys.executable, 'bench.py', '--device=cpu', arg, f'--out={tmp_path / "bench.json"}'],
                                  cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
            for arg in commands}
    for arg, run in runs.items():
        _, stderr = run.communicate(timeout=300)
        assert run.returncode != 0, arg
        assert stderr.strip() == bad[arg] and 'Traceback' not in stderr, (arg, stderr)
    assert not (tmp_path / 'bench.json').exists()
