"""bench.py and bench_report.py: the CPU smoke recipe covers every section with finite numbers; the JSON
is keyed by model, and a run keeps every section it does not measure again, byte for byte; a bad
setting, a foreign --out, a full disk and Ctrl-C each stop with one line and lose nothing; the plot has
a row of panels per model; and the pieces the GPU run relies on (the released code's formula and its
overflow (baselines.py), the stand-in caches, OOM recording) are checked here on the CPU."""

import errno
import json
import math
import os
import struct
import subprocess
import sys

import pytest
import torch

import bench
import bench_report
import configurator
from baselines import released_attention
from conftest import REPO, assert_one_error_line, run_script
from dijiang import GPT, GPTConfig, attention_chunk, attention_parallel, decay_schedule, feature_map, projection_matrix

RECIPE = os.path.join(REPO, 'config', 'bench_cpu.py')
SECTIONS = ['attention', 'prefill', 'decode', 'train']
# smollm2-135m's shape (30 layers, 9 query heads sharing 3 key/value heads) at the recipe's vocabulary:
# one length and one batch size keep it to seconds on a CPU
SMOLLM2 = ['--model=smollm2-135m', '--sections=attention,decode', '--lengths=64', '--decode_batches=1']


def numbers(value):
    """Every number inside a JSON value."""
    if isinstance(value, dict):
        return [n for v in value.values() for n in numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in numbers(v)]
    return [value] if bench_report.is_number(value) else []


@pytest.fixture(scope='module')
def smoke(tmp_path_factory):
    """The smoke run as a user types it: (its JSON's text, its stdout)."""
    out = tmp_path_factory.mktemp('smoke') / 'bench.json'
    result = subprocess.run([sys.executable, 'bench.py', 'config/bench_cpu.py', f'--out={out}', '--plot='], cwd=REPO,
                            capture_output=True, text=True, timeout=300, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert result.returncode == 0, result.stderr
    return out.read_text(), result.stdout


def earlier_json(smoke, tmp_path):
    out = tmp_path / 'bench.json'
    out.write_text(smoke[0])
    return out


def test_the_cpu_recipe_fills_every_section(smoke):
    text, stdout = smoke
    results = json.loads(text)
    assert list(results) == ['tiny'] and list(results['tiny']) == SECTIONS
    for name, section in results['tiny'].items():
        assert section['error'] is None, (name, section['error'])
        meta = section['meta']
        assert (meta['model'], meta['hardware'], meta['device'], meta['dtype'], meta['repeats']) == \
               ('tiny', 'cpu', 'cpu', 'float32', 3)
        for row in section['rows']:  # no OOM, 'nan' or error strings in a smoke run: every value is a number
            assert all(bench_report.is_number(v) for k, v in row.items() if k not in ('impl', 'attention')), row
        assert all(math.isfinite(n) and n >= 0 for n in numbers(section['rows'])), name
    tiny = results['tiny']

    attention = {(r['impl'], r['N']): r for r in tiny['attention']['rows']}
    assert set(attention) == {(impl, N) for impl in ('sdpa', 'dijiang', 'released') for N in (64, 128)}
    assert attention['sdpa', 128]['B'] == 256 // 128  # tokens_per_batch fixed
    assert all(r['fwd_ms'] > 0 and r['fwd_bwd_ms'] > 0 for r in attention.values())

    prefill = {(r['attention'], r['N']): r for r in tiny['prefill']['rows']}
    assert set(prefill) == {(a, N) for a in ('softmax', 'dijiang') for N in (64, 128)}
    assert all(r['tokens_per_s'] == r['B'] * r['N'] / r['ms'] * 1000 for r in prefill.values())

    decode = {(r['attention'], r['B'], r['context']): r for r in tiny['decode']['rows']}
    assert set(decode) == {(a, B, N) for a in ('softmax', 'dijiang') for B in (1, 4) for N in (64, 128)}
    assert {r['impl'] for r in tiny['decode']['rows']} == {'eager'}  # the CUDA graph needs CUDA
    assert decode['softmax', 1, 64]['cache_bytes'] == 2 * 2 * 4 * 64 * 16 * 4  # 2 layers of k and v, fp32
    assert decode['dijiang', 1, 64]['cache_bytes'] == 2 * 4 * 16 * 16 * 4  # 2 layers of one (H, D, D) state
    for B in (1, 4):  # the KV cache grows with the context, DiJiang's state does not
        assert decode['softmax', B, 128]['cache_bytes'] == 2 * decode['softmax', B, 64]['cache_bytes']
        assert decode['dijiang', B, 128]['cache_bytes'] == decode['dijiang', B, 64]['cache_bytes']
    assert decode['dijiang', 4, 64]['cache_bytes'] == 4 * decode['dijiang', 1, 64]['cache_bytes']

    train = {(r['attention'], r['block']): r for r in tiny['train']['rows']}
    assert set(train) == {(a, T) for a in ('softmax', 'dijiang') for T in (64, 128)}
    assert all(0 < r['mfu'] < 1 for r in train.values())
    for line in ('tiny: attention op', 'tiny: prefill, tokens/s', 'tiny: decode, one token', 'tiny: training step'):
        assert line in stdout


def test_help_shows_the_values_and_the_recipe(capsys):
    status, out, _ = run_script(capsys, 'bench.py', '--help')
    assert status == 0 and "model = 'pythia-410m'  # a name in dijiang.CONFIGS" in out and 'repeats = 20' in out
    assert ("  config/bench_cpu.py: A smoke run of every section on the CPU, in seconds: the tiny model, short "
            "lengths, fp32.") in out.splitlines()
    # the recipe is all the smoke run changes: the defaults stay what the settings block says
    defaults = {name: getattr(bench, name) for name in configurator.settings_block(bench.__file__)[1]}
    assert configurator.read_recipe(RECIPE, defaults) == dict(
        device='cpu', model='tiny', vocab_size=512, lengths='64,128', tokens_per_batch=256, decode_batches='1,4',
        train_blocks='64,128', train_tokens=256, dtype='float32', warmup=1, repeats=3)


def test_a_second_model_keeps_the_first_byte_for_byte_then_a_rerun_replaces_one_section(smoke, tmp_path, capsys):
    out = earlier_json(smoke, tmp_path)
    status, stdout, stderr = run_script(capsys, 'bench.py', RECIPE, *SMOLLM2, f'--out={out}', '--plot=')
    assert status == 0, stderr
    assert f"{out}: keeping tiny attention, tiny prefill, tiny decode, tiny train\n" in stdout
    text = out.read_text()
    assert text.startswith(smoke[0].removesuffix('\n}\n') + ',\n "smollm2-135m": {')  # the first model's bytes
    results = json.loads(text)
    assert list(results) == ['tiny', 'smollm2-135m'] and list(results['smollm2-135m']) == ['attention', 'decode']
    smollm2 = results['smollm2-135m']
    assert all(math.isfinite(n) for n in numbers([s['rows'] for s in smollm2.values()]))
    assert smollm2['attention']['notes'][0].startswith('float32, H=9, H_kv=3, D=64, B*N=256;')
    assert {(r['impl'], r['B']) for r in smollm2['attention']['rows']} == {('sdpa', 4), ('dijiang', 4), ('released', 4)}
    decode = {r['attention']: r for r in smollm2['decode']['rows']}
    assert decode['softmax']['cache_bytes'] == 2 * 30 * 3 * 64 * 64 * 4  # k and v of the 3 shared heads
    assert decode['dijiang']['cache_bytes'] == 30 * 9 * 64 * 64 * 4  # a state per query head
    assert 'tiny: training step' in stdout and 'smollm2-135m: decode, one token' in stdout  # every model's tables

    # the same model again, one section: that section is replaced, every other one kept
    status, stdout, stderr = run_script(capsys, 'bench.py', RECIPE, '--sections=decode', '--decode_batches=2',
                                   f'--out={out}', '--plot=')
    assert status == 0, stderr
    assert "replacing tiny decode" in stdout
    rerun = json.loads(out.read_text())
    assert rerun['smollm2-135m'] == smollm2
    assert {name: s for name, s in rerun['tiny'].items() if name != 'decode'} == \
           {name: s for name, s in results['tiny'].items() if name != 'decode'}
    assert {r['B'] for r in rerun['tiny']['decode']['rows']} == {2}

    # the plot: a row of panels per model, a column per section (5.5 x 4.2 inches each at 120 dpi)
    plot = tmp_path / 'plots' / 'bench.png'
    plot.parent.mkdir()
    bench_report.draw_plot(rerun, str(plot))
    png = plot.read_bytes()
    assert png.startswith(b'\x89PNG') and struct.unpack('>II', png[16:24]) == (4 * 660, 2 * 504)
    assert capsys.readouterr().out == f"wrote {plot}\n"


def test_a_file_of_the_older_layout_is_read_as_its_model(smoke, tmp_path):
    old = tmp_path / 'old.json'
    old.write_text(json.dumps(json.loads(smoke[0])['tiny']))  # sections at the top, as bench.py wrote them before
    assert bench_report.read_results(str(old)) == json.loads(smoke[0])


@pytest.mark.parametrize('text', ['not json', '[1, 2]', '{"tiny": {"attention": 3}}', '{"tiny": {"nap": {}}}',
                                  '\udcff'])
def test_a_file_bench_did_not_write_is_refused(tmp_path, capsys, text):
    out = tmp_path / 'results.json'
    out.write_bytes(text.encode('utf-8', 'surrogateescape'))
    assert_one_error_line(*run_script(capsys, 'bench.py', RECIPE, f'--out={out}', '--plot='),
                          f"error: {out} exists but was not written by bench.py: move it away, or pass another --out")
    assert out.read_bytes() == text.encode('utf-8', 'surrogateescape')


def full_disk_for(suffix, monkeypatch):
    """From now on a file renamed into place under a name ending in suffix finds the disk full."""
    replace = os.replace

    def full_disk(src, dst, *args, **kwargs):
        if str(dst).endswith(suffix):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), dst)
        return replace(src, dst, *args, **kwargs)
    monkeypatch.setattr(os, 'replace', full_disk)


ONE_ROW = ['--sections=decode,train', '--models=dijiang', '--lengths=64', '--decode_batches=1', '--train_blocks=64']


def test_a_full_disk_at_the_json_is_one_line_and_keeps_the_earlier_file(smoke, tmp_path, monkeypatch, capsys):
    out = earlier_json(smoke, tmp_path)
    full_disk_for('.json', monkeypatch)
    _, stdout, _ = line = run_script(capsys, 'bench.py', RECIPE, *ONE_ROW, f'--out={out}', '--plot=')
    assert_one_error_line(*line, f"error: {out}: cannot write it (No space left on device): make room, or write "
                          "elsewhere; the earlier file, if any, is as it was; stdout's tables show what this run "
                          f"measured (1 rows), and {out} each row saved; measure what is missing with "
                          "--sections=decode,train")
    assert out.read_text() == smoke[0] and os.listdir(tmp_path) == ['bench.json']
    decode = stdout.split('tiny: decode, one token per sequence\n')[-1].splitlines()
    assert decode[1].split()[:4] == ['dijiang', 'eager', '1', '64']  # the row measured, shown though not saved


def test_a_full_disk_at_the_plot_is_one_line_and_keeps_the_json(smoke, tmp_path, monkeypatch, capsys):
    out, plot = earlier_json(smoke, tmp_path), tmp_path / 'bench.png'
    plot.write_bytes(b'an earlier plot')
    full_disk_for('.png', monkeypatch)
    line = run_script(capsys, 'bench.py', RECIPE, *ONE_ROW, f'--out={out}', f'--plot={plot}')
    assert_one_error_line(*line, f"error: {plot}: cannot write it (No space left on device)",
                          f"(2 rows), and {out} each row saved")
    assert not line[2].rstrip().endswith('--sections=decode,train')  # nothing is missing
    results = json.loads(out.read_text())
    assert [len(results['tiny'][name]['rows']) for name in ('decode', 'train')] == [1, 1]
    assert plot.read_bytes() == b'an earlier plot' and sorted(os.listdir(tmp_path)) == ['bench.json', 'bench.png']


def test_ctrl_c_after_a_row_keeps_it(tmp_path, monkeypatch, capsys):
    out, save = tmp_path / 'bench.json', bench_report.save_results
    saves = []

    def save_then_interrupt(results, path):
        save(results, path)
        saves.append(path)
        if len(saves) == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(bench_report, 'save_results', save_then_interrupt)
    assert_one_error_line(*run_script(capsys, 'bench.py', RECIPE, '--sections=decode,train', '--models=dijiang',
                                      f'--out={out}', '--plot='),
                          "error: interrupted; stdout's tables show what this run measured (2 rows), and "
                          f"{out} each row saved; measure what is missing with --sections=decode,train", code=130)
    assert [len(s['rows']) for s in json.loads(out.read_text())['tiny'].values()] == [2]


def test_released_formula_matches_the_reference_then_overflows():
    torch.manual_seed(0)
    H, D = 2, 16
    proj, decay = projection_matrix(D), decay_schedule(H)
    q, k, v = (torch.randn(1, 200, H, D, dtype=torch.float64) for _ in range(3))
    released = released_attention(q, k, v, proj, decay)
    reference, _ = attention_parallel(feature_map(q, proj), feature_map(k, proj), v, decay)
    torch.testing.assert_close(released, reference, rtol=1e-4, atol=1e-5)
    # gamma^-n of the first head (0.96875) passes float32's maximum at n ~ 2797; relative decays do not
    q, k, v = (torch.randn(1, 2900, 1, D) for _ in range(3))
    decay = decay_schedule(1)
    assert not torch.isfinite(released_attention(q, k, v, proj, decay)).all()
    assert torch.isfinite(released_attention(q[:, :2700], k[:, :2700], v[:, :2700], proj, decay)).all()
    o, _ = attention_chunk(feature_map(q, proj), feature_map(k, proj), v, decay)
    assert torch.isfinite(o).all()


def tensors(cache):
    return [t for layer in cache.layers for t in (layer if isinstance(layer, tuple) else (layer,))]


@pytest.mark.parametrize('n_kv_head', [0, 2])
def test_the_stand_in_cache_is_what_decoding_holds(n_kv_head):
    torch.manual_seed(0)
    for attention in ('softmax', 'dijiang'):
        model = GPT(GPTConfig.named('tiny', attention=attention, vocab_size=64, n_kv_head=n_kv_head))
        model.to_dtype(torch.bfloat16)
        cache = model.new_cache()
        model(torch.randint(0, 64, (3, 50)), cache=cache)
        fake = bench.random_cache(model, 3, 50)
        assert fake.pos == cache.pos == 50
        assert [(t.shape, t.dtype) for t in tensors(fake)] == [(t.shape, t.dtype) for t in tensors(cache)]
        assert model.cache_bytes(3, 50, torch.bfloat16) == sum(t.nbytes for t in tensors(cache))  # the row's number


def test_attempt_records_failures_and_goes_on():
    def out_of_memory():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 40.00 GiB")

    def broken():
        raise RuntimeError("Triton: illegal memory access")

    assert bench.attempt(lambda: 1.5) == 1.5
    assert bench.attempt(out_of_memory) == 'OOM'
    assert bench.attempt(broken) == 'error: RuntimeError: Triton: illegal memory access'


def test_models_setting_picks_the_attentions_and_profile_needs_cuda(tmp_path, capsys):
    out = tmp_path / 'bench.json'
    status, _, stderr = run_script(capsys, 'bench.py', RECIPE, '--sections=decode', f'--out={out}', '--plot=',
                                   '--models=dijiang', '--profile=True')
    assert status == 0, stderr
    decode = json.loads(out.read_text())['tiny']['decode']
    assert {r['attention'] for r in decode['rows']} == {'dijiang'} and len(decode['rows']) == 4
    assert decode['notes'] == ["profile needs CUDA: not run"] and 'profile' not in decode


def test_one_section_alone_writes_its_json_and_plot(tmp_path, capsys):
    out, plot = tmp_path / 'new' / 'bench.json', tmp_path / 'new' / 'bench.png'  # the folder is created
    status, stdout, stderr = run_script(capsys, 'bench.py', RECIPE, '--sections=train', '--train_blocks=64',
                                        f'--out={out}', f'--plot={plot}')
    assert status == 0, stderr
    assert list(json.loads(out.read_text())['tiny']) == ['train']
    assert 'tiny: training step' in stdout and stdout.endswith(f"wrote {out}\nwrote {plot}\n")
    png = plot.read_bytes()
    assert png.startswith(b'\x89PNG') and struct.unpack('>II', png[16:24]) == (660, 504)  # one panel


def test_no_section_no_plot(tmp_path, capsys):
    bench_report.draw_plot({}, str(tmp_path / 'bench.png'))
    assert capsys.readouterr().out == "no plot: no section measured\n"
    assert not (tmp_path / 'bench.png').exists()


# a bad setting and the one line it stops with, before anything is measured or written
BAD_SETTINGS = {
    '--sections=attention,trian': "error: sections='attention,trian': choose from attention,prefill,decode,train",
    '--models=mamba': "error: models='mamba': choose from softmax,dijiang",
    '--model=gpt-5': "error: model='gpt-5': use one of tiny, small, pythia-70m,",
    '--lengths=64,0': "error: lengths='64,0': give comma-separated positive integers, e.g. --lengths=1024,8192",
    '--decode_batches=1,x': "error: decode_batches='1,x': give comma-separated positive integers, "
                            "e.g. --decode_batches=1,64",
    '--train_blocks=-64': "error: train_blocks='-64': give comma-separated positive integers, "
                          "e.g. --train_blocks=2048,8192",
    '--repeats=0': "error: repeats=0: give 1 or more",
    '--max_seconds=nan': "error: max_seconds=nan: give 0 or more",
    '--peak_flops=0': "error: peak_flops=0.0: give the device's peak FLOP/s, e.g. --peak_flops=989e12",
    '--dtype=int8': "error: dtype='int8': use 'auto', 'float32', 'bfloat16' or 'float16'",
    '--out=': "error: out='': name a file, e.g. --out=out-bench/bench.json",
    '--plot=PLOTS': "error: plot='PLOTS': name a file, e.g. --plot=out-bench/bench.png",
    '--device=cuda': "error: device='cuda', but torch sees 0 CUDA GPU(s): use --device=cpu, or a GPU it sees",
    '--warmup=2.5': "error: --warmup=2.5: expected a value like 3 (int)",
}


def test_bad_settings_stop_with_one_line(tmp_path, capsys, monkeypatch):
    (tmp_path / 'PLOTS').mkdir()
    monkeypatch.chdir(tmp_path)
    for arg, line in BAD_SETTINGS.items():
        if arg == '--device=cuda' and torch.cuda.is_available():
            continue
        out = [] if arg.startswith('--out=') else [f'--out={tmp_path / "b.json"}']
        found = assert_one_error_line(*run_script(capsys, 'bench.py', RECIPE, arg, *out))
        assert found.startswith(line) and (found == line or line.endswith(',')), (arg, found)
    assert os.listdir(tmp_path) == ['PLOTS']  # no out-bench/ either


def test_a_folder_that_cannot_be_made_is_one_line(tmp_path, capsys):
    (tmp_path / 'file').write_text('a file where a folder would go')
    out = tmp_path / 'file' / 'bench.json'
    assert_one_error_line(*run_script(capsys, 'bench.py', RECIPE, f'--out={out}', '--plot='),
                          f"error: {tmp_path / 'file'}: File exists; nothing was measured yet")
    assert os.listdir(tmp_path) == ['file']
