"""train.py and transfer.py on CPU: DDP with gloo against one process, exact resume, checkpoints, the
attention transfer, any number of ranks. Single-process runs execute the script in this process
(runpy, as `python train.py` would) to skip a fresh torch import; DDP runs under torchrun."""
import json
import os
import re
import runpy
import shutil
import subprocess
import sys
import sysconfig
import types

import numpy as np
import pytest
import torch

import ranks
import training
import transfer
from conftest import PYTHIA_TOKENIZER, REPO, assert_one_error_line, run_script
from dijiang import GPT, GPTConfig, projection_matrix, rotary_cos_sin
from shards import write_shard
from tokenizer import Tokenizer

ENV = {**os.environ, 'OMP_NUM_THREADS': '1'}  # tiny models: threads only add overhead
# 8 windows of 32 tokens per step (the tiny model, which train() passes), a high lr so 6 steps visibly learn
SMALL = ['--model=tiny', '--block_size=32', '--batch_size=256', '--warmup=2', '--lr=1e-2', '--eval_iters=2', '--log_interval=1']
MODULES = ('json/decoder.py', 'json/encoder.py', 'textwrap.py', 'shlex.py', 'fnmatch.py', 'glob.py', 'base64.py',
           'bisect.py', 'heapq.py', 'queue.py', 'string.py', 'colorsys.py')


def write_data(folder, docs, tokenizer=None, val_every=4):
    """Token shards of docs as data/prepare.py writes them: byte-level, or with a tokenizer.json (copied in).
    Every val_every-th document goes to val."""
    tok = Tokenizer.from_file(tokenizer) if tokenizer else Tokenizer.bytes()
    os.makedirs(folder)
    for split, part in (('train', [d for i, d in enumerate(docs) if i % val_every]), ('val', docs[::val_every])):
        tokens = np.array([t for doc in part for t in tok.encode(doc) + [tok.eot_token]], dtype=np.uint16)
        write_shard(os.path.join(folder, f'{split}_000000.bin'), tokens, tok.vocab_size, tok.identity)
    if tokenizer:
        shutil.copyfile(tokenizer, os.path.join(folder, 'tokenizer.json'))
    with open(os.path.join(folder, 'prepare.json'), 'w') as f:
        json.dump(dict(tokenizer=tok.identity), f)
    return str(folder)


def stdlib_docs():
    """A dozen of the stdlib's modules: code a tiny model learns from in a few steps."""
    stdlib = sysconfig.get_paths()['stdlib']
    return [open(os.path.join(stdlib, name), encoding='utf-8').read() for name in MODULES]


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp('data') / 'bytes', stdlib_docs())


def train(*args, script='train.py'):
    """Run train.py (or transfer.py) with these settings in this process, on one thread (these models
    are so small that a second one only adds synchronization); a run that fails fails the test."""
    argv, threads = sys.argv, torch.get_num_threads()
    sys.argv = [script, '--cpu_threads=1', *args]
    try:
        runpy.run_path(os.path.join(REPO, script), run_name='__main__')
    finally:
        sys.argv = argv
        torch.set_num_threads(threads)


def read_log(out_dir):
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        return [json.loads(line) for line in f]


def weights(out_dir):
    return GPT.from_checkpoint(str(out_dir)).state_dict()


def settings_of(out_dir):
    return torch.load(os.path.join(out_dir, 'ckpt.pt'), weights_only=True)['settings']


def max_difference(a, b):
    return max((a[name] - tensor).abs().max().item() for name, tensor in b.items())


def mean_difference(a, b):
    return sum((a[name] - tensor).abs().sum().item() for name, tensor in b.items()) / sum(t.numel() for t in b.values())


# Runs a script under torchrun as `python script ...` would, and then writes a checksum of the weights
# this rank trained (the module DDP wrapped) into CHECKSUMS/RANK: under DDP every rank must hold the same
# weights. A file, not stdout: a line a worker prints as it exits does not always reach torchrun's stdout.
RANK_WEIGHTS = '''
import os, runpy, sys
import torch
from torch.nn.parallel import DistributedDataParallel
models = []
class Recorded(DistributedDataParallel):
    def __init__(self, module, *args, **kwargs):
        super().__init__(module, *args, **kwargs)
        models.append(module)
torch.nn.parallel.DistributedDataParallel = Recorded
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
if models:
    checksum = sum(p.detach().double().sum().item() for p in models[0].parameters())
    with open(os.path.join(os.environ['CHECKSUMS'], os.environ['RANK']), 'w') as f:
        f.write(repr(checksum))
'''


def torchrun(tmp_path, *args, nproc=2):
    wrapper = tmp_path / 'rank_weights.py'
    wrapper.write_text(RANK_WEIGHTS)
    result = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}',
                             str(wrapper), *args], cwd=REPO, env={**ENV, 'PYTHONPATH': REPO, 'CHECKSUMS': str(tmp_path)},
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_ddp_matches_one_process(data_dir, tmp_path):
    ddp_dir, single_dir = str(tmp_path / 'ddp'), str(tmp_path / 'single')
    common = [f'--data_dir={data_dir}', '--max_iters=6', '--eval_interval=3', *SMALL]
    output = torchrun(tmp_path, 'train.py', f'--out_dir={ddp_dir}', '--micro_batch_size=2', *common)
    assert '6 steps of 256 tokens = 2 ranks * 2 micro-steps * 2 * 32' in output
    # the weights are the same on both ranks, and they are the ones rank 0 saved
    sums = [float((tmp_path / rank).read_text()) for rank in ('0', '1')]
    saved = sum(p.double().sum().item() for p in GPT.from_checkpoint(ddp_dir).parameters())
    assert sums[0] == sums[1] == saved
    assert output.splitlines()[-1] == (f'the model is in {ddp_dir}/ (ckpt.pt, step 6, val loss '
                                       f'{read_log(ddp_dir)[-1]["val_loss"]:.4f}); sample it with: python sample.py '
                                       f'--out_dir={ddp_dir}')  # rank 0's line alone

    # the loss goes down
    log = read_log(ddp_dir)
    assert [row['step'] for row in log] == [0, 1, 2, 3, 4, 5, 6]
    assert log[-1]['loss'] < log[1]['loss'] - 0.5 and log[-1]['val_loss'] < log[0]['val_loss'] - 0.5
    assert {'step', 'loss', 'val_loss', 'lr', 'tokens_per_s'} <= log[3].keys() and 'mfu' not in log[3]  # no peak on a CPU

    # one process with the same global batch (2 micro-steps of 4 windows) lands in the same place
    train(f'--out_dir={single_dir}', '--micro_batch_size=4', *common)
    # (losses measured within 3e-6; the gradient norm, which sums the squares of small differences, 1.5e-4)
    for ddp_row, single_row in zip(log, read_log(single_dir)):
        for key, tolerance in (('loss', 1e-4), ('val_loss', 1e-4), ('lr', 1e-12), ('grad_norm', 1e-3)):
            if key in ddp_row:
                assert ddp_row[key] == pytest.approx(single_row[key], rel=tolerance), (ddp_row, single_row)
    # the weights moved by about 0.05 and agree to 1e-6 on average (measured 3.5e-8) and 5e-3 at most (measured
    # 1.1e-4 to 6.6e-4 on two CPUs: an element whose tiny gradient Adam scales up, from the summation order)
    ddp_weights = weights(ddp_dir)
    assert mean_difference(ddp_weights, weights(single_dir)) < 1e-6
    assert max_difference(ddp_weights, weights(single_dir)) < 5e-3
    # ... which a run that saw only rank 0's share of each batch does not (measured 1.1e-2 and 7.3e-2)
    half_dir = str(tmp_path / 'half')
    train(f'--out_dir={half_dir}', *common, '--batch_size=128', '--micro_batch_size=2')
    assert mean_difference(ddp_weights, weights(half_dir)) > 1e-3 and max_difference(ddp_weights, weights(half_dir)) > 1e-2


def test_torchrun_runs_the_demo_on_any_number_of_ranks(tmp_path):
    # the demo's settings, but tiny data: 2048-token batches of 16 sequences of 128, split 8 per rank
    data = write_data(tmp_path / 'data', stdlib_docs()[:8])
    out_dir = str(tmp_path / 'out')
    output = torchrun(tmp_path, 'train.py', f'--data_dir={data}', f'--out_dir={out_dir}', '--max_iters=20')
    assert '20 steps of 2,048 tokens = 2 ranks * 1 micro-steps * 8 * 128' in output
    assert [row['step'] for row in read_log(out_dir)] == [0, 20] and GPT.from_checkpoint(out_dir).config.n_layer == 4


def test_micro_batch_size_is_picked_for_the_ranks(monkeypatch):
    # 0 picks the most sequences, up to 16, that split the batch evenly over the ranks
    for world_size, expected in ((1, (16, 1)), (2, (8, 1)), (4, (4, 1)), (16, (1, 1))):
        monkeypatch.setattr(ranks, 'world_size', world_size)
        assert training.split_batch(2048, 128, 0) == expected
    monkeypatch.setattr(ranks, 'world_size', 3)  # 16 sequences do not split over 3 ranks: one line
    with pytest.raises(ValueError, match=r'batch_size=2048: split it evenly .* over 3 rank\(s\): make it a multiple of 384'):
        training.split_batch(2048, 128, 0)
    monkeypatch.setattr(ranks, 'world_size', 2)
    assert training.split_batch(2048, 128, 2) == (2, 4)  # one the user set is kept: more micro-steps
    with pytest.raises(ValueError, match=r'batch_size=2048 tokens is not a multiple of .* = 5 \* 128 \* 2'):
        training.split_batch(2048, 128, 5)


def test_a_non_finite_value_stops_with_what_the_caller_keeps():
    training.check_finite('loss', 2.5, 3, 'kept')  # a finite one passes
    for value in (float('nan'), float('inf')):  # train.py's and transfer.py's lines each name their own state
        with pytest.raises(ValueError, match=rf'^non-finite loss \({value}\) at step 3: stopped; out is as it was\. Lower --lr'):
            training.check_finite('loss', value, 3, 'out is as it was')


@pytest.fixture(scope='module')
def halfway(data_dir, tmp_path_factory):
    """4 steps of an 8-step run: the cosine decays over 8 steps, the run stops at 4 with a checkpoint."""
    out_dir = str(tmp_path_factory.mktemp('runs') / 'halfway')
    train(f'--data_dir={data_dir}', f'--out_dir={out_dir}', '--max_iters=4', '--lr_decay_iters=8',
          '--eval_interval=4', '--micro_batch_size=4', *SMALL)
    return out_dir


def test_resume_is_exact(data_dir, halfway, tmp_path, capsys):
    straight = str(tmp_path / 'straight')
    train(f'--data_dir={data_dir}', f'--out_dir={straight}', '--max_iters=8', '--eval_interval=4',
          '--micro_batch_size=4', *SMALL)
    resumed = str(tmp_path / 'resumed')
    shutil.copytree(halfway, resumed)
    capsys.readouterr()
    # the settings come back from the checkpoint; only the length changes, and the run says so
    train('--init_from=resume', f'--out_dir={resumed}', '--max_iters=8')
    out = capsys.readouterr().out
    assert 'resuming with max_iters=8 (the run had 4)' in out and 'from step 4' in out
    assert {k: settings_of(resumed)[k] for k in ('micro_batch_size', 'lr_decay_iters', 'max_iters', 'init_from')} == \
        dict(micro_batch_size=4, lr_decay_iters=8, max_iters=8, init_from='scratch')

    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)
    keys = ('step', 'loss', 'val_loss', 'lr', 'grad_norm')
    strip = lambda log: [{k: row[k] for k in keys if k in row} for row in log]  # noqa: E731
    assert strip(read_log(resumed)) == strip(read_log(straight))  # every logged number, bit for bit

    ckpt = torch.load(os.path.join(resumed, 'ckpt.pt'), weights_only=True)
    assert ckpt['step'] == 8 and ckpt['data_position'] == 8 * 8 and ckpt['tokenizer'] == 'bytes'
    assert {'optimizer', 'rng', 'settings', 'config', 'model', 'train_tokens'} <= ckpt.keys()
    straight_ckpt = torch.load(os.path.join(straight, 'ckpt.pt'), weights_only=True)
    for state_a, state_b in zip(ckpt['optimizer']['state'].values(), straight_ckpt['optimizer']['state'].values()):
        assert all(torch.equal(state_a[k], state_b[k]) for k in ('exp_avg', 'exp_avg_sq', 'step'))
    assert torch.equal(ckpt['rng']['torch'], straight_ckpt['rng']['torch'])


def test_non_finite_loss_stops_and_keeps_the_checkpoint(halfway, tmp_path, capsys):
    out_dir = str(tmp_path / 'nan')
    shutil.copytree(halfway, out_dir)
    before = open(os.path.join(out_dir, 'ckpt.pt'), 'rb').read()
    # an absurd learning rate blows the weights up in update 5, so the loss of step 6 is not finite
    line = assert_one_error_line(*run_script(capsys, 'train.py', '--init_from=resume', f'--out_dir={out_dir}',
                                             '--max_iters=8', '--lr=1e38'),
                                 'non-finite loss (nan) at step 6: stopped', f'{out_dir}/ckpt.pt (step 4) is the last')
    assert 'Lower --lr' in line and open(os.path.join(out_dir, 'ckpt.pt'), 'rb').read() == before
    assert [row['step'] for row in read_log(out_dir)][-1] == 5


def test_checkpoint_loads_and_errors_are_clear(data_dir, halfway, tmp_path, capsys):
    model = GPT.from_checkpoint(halfway)
    assert model.config.attention == 'dijiang' and model.config.vocab_size == 384  # 257 padded to 128s
    assert json.load(open(os.path.join(halfway, 'config.json')))['n_layer'] == 2
    out = f'--out_dir={tmp_path / "x"}'

    def error(*args):
        return assert_one_error_line(*run_script(capsys, 'train.py', '--cpu_threads=1', *args))

    # shards from another tokenizer
    other = tmp_path / 'other'
    other.mkdir()
    for split in ('train', 'val'):
        write_shard(str(other / f'{split}_000000.bin'), np.arange(100, dtype=np.uint16), 257, 'other-tokenizer')
    (other / 'prepare.json').write_text('{}')
    run = str(tmp_path / 'run')
    shutil.copytree(halfway, run)
    assert 'was tokenized with other-tokenizer, the model uses bytes' in error(f'--init_from={run}', f'--data_dir={other}',
                                                                                  '--block_size=32', out)
    # a model whose vocab is smaller than the data's
    small_vocab = str(tmp_path / 'small_vocab')
    GPT(GPTConfig.named('tiny', vocab_size=128)).save_checkpoint(small_vocab)
    assert "token ids up to 256, the model's vocab_size is 128" in error(f'--init_from={small_vocab}',
                                                                           f'--data_dir={data_dir}', out)
    # a softmax model asked for more context than it has
    softmax = str(tmp_path / 'softmax')
    GPT(GPTConfig.named('tiny', attention='softmax', vocab_size=384, block_size=16)).save_checkpoint(softmax)
    assert "block_size=32 is longer than this softmax model's context (16)" in error(
        f'--init_from={softmax}', f'--data_dir={data_dir}', '--attention=softmax', '--block_size=32', out)
    # settings a model folder decides itself
    assert error(f'--init_from={softmax}', f'--data_dir={data_dir}', '--model=small', out).startswith(
        f"error: model='small': {softmax} holds its own model")
    assert 'feature_seed=3' in error(f'--init_from={run}', f'--data_dir={data_dir}', '--feature_seed=3', out)
    # a batch that does not split into micro-batches, an unknown setting, no data
    assert 'batch_size=1000 tokens is not a multiple of' in error(f'--data_dir={data_dir}', '--batch_size=1000',
                                                                  '--micro_batch_size=2', out)
    assert "unknown argument '--learning_rate=1'" in error('--learning_rate=1', out)
    assert 'no prepared data' in error(f'--data_dir={tmp_path / "nothing"}', out)
    assert not (tmp_path / 'x').exists()  # a run that stops before its first checkpoint leaves no folder


def test_fine_tune_recipe_and_linearizing(data_dir, tmp_path):
    teacher = str(tmp_path / 'teacher')
    GPT(GPTConfig.named('tiny', attention='softmax', vocab_size=384)).save_checkpoint(teacher)
    # the recipe's settings apply (block 2048, 1000 warmup...) where the command line does not override them;
    # lr=0 keeps the weights
    out_dir = str(tmp_path / 'student')
    train(os.path.join(REPO, 'config', 'train_finetune.py'), f'--init_from={teacher}', f'--data_dir={data_dir}',
          f'--out_dir={out_dir}', '--block_size=32', '--batch_size=64', '--micro_batch_size=2', '--max_iters=1',
          '--eval_iters=1', '--lr=0')
    settings = settings_of(out_dir)
    assert (settings['warmup'], settings['eval_interval'], settings['eval_iters'], settings['init_from']) == (1000, 500, 1, teacher)
    student, source = weights(out_dir), weights(teacher)
    assert GPT.from_checkpoint(out_dir).config.attention == 'dijiang'
    assert all(torch.equal(student[name], tensor) for name, tensor in source.items())
    assert 'layers.0.attn.gate.weight' in student and 'layers.0.attn.gate.weight' not in source
    # without the recipe, a fine-tune takes the settings given and the defaults, as any run
    train(f'--init_from={teacher}', f'--data_dir={data_dir}', f'--out_dir={tmp_path / "plain"}', '--block_size=32',
          '--batch_size=64', '--max_iters=1', '--eval_iters=1')
    assert (settings_of(tmp_path / 'plain')['warmup'], settings_of(tmp_path / 'plain')['lr']) == (50, 2e-3)


def test_val_ood_split_is_evaluated_beside_val(data_dir, tmp_path, capsys):
    # another corpus's val shard, named val_ood_000000.bin, is the out-of-distribution split
    other_dir = write_data(tmp_path / 'other', [f"{i}: zebra quartz jig. " * 40 for i in range(20)], val_every=2)
    with_ood = tmp_path / 'with_ood'
    shutil.copytree(data_dir, with_ood)
    shutil.copyfile(os.path.join(other_dir, 'val_000000.bin'), with_ood / 'val_ood_000000.bin')
    common = [*SMALL, '--micro_batch_size=8', '--max_iters=2', '--eval_interval=2']
    train(f'--data_dir={with_ood}', f'--out_dir={tmp_path / "ood"}', *common)
    assert 'val_ood ' in capsys.readouterr().out
    train(f'--data_dir={data_dir}', f'--out_dir={tmp_path / "plain"}', *common)

    ood, plain = read_log(tmp_path / 'ood'), read_log(tmp_path / 'plain')
    assert [row['step'] for row in ood if 'val_loss' in row] == [0, 2]
    assert not any('val_loss_ood' in row for row in plain)  # no val_ood shards: nothing changes
    for row, plain_row in zip(ood, plain):
        assert ('val_loss_ood' in row) == ('val_loss' in row)
        if 'val_loss' in row:
            assert row['val_loss'] == plain_row['val_loss']  # the val split is still val_000000.bin alone
    assert abs(ood[-1]['val_loss_ood'] - ood[-1]['val_loss']) > 0.1  # another text, another loss, once trained

    capsys.readouterr()
    train(f'--init_from={tmp_path / "ood"}', f'--data_dir={with_ood}', f'--out_dir={tmp_path / "unused"}',
          '--eval_only=True', '--block_size=32', '--batch_size=256', '--micro_batch_size=8', '--eval_iters=2')
    printed = capsys.readouterr().out  # eval_only reports both splits, and writes nothing
    assert re.search(r'^val loss [0-9.]+', printed, re.M) and re.search(r'^val_ood loss [0-9.]+', printed, re.M)
    assert not (tmp_path / 'unused').exists()


@pytest.mark.parametrize('linearize', [False, True], ids=['scratch', 'linearize'])
def test_feature_seed_draws_only_the_projections(data_dir, tmp_path, linearize):
    source = []
    if linearize:
        teacher = str(tmp_path / 'teacher')
        GPT(GPTConfig.named('tiny', attention='softmax', vocab_size=384)).save_checkpoint(teacher)
        source = [f'--init_from={teacher}']
    else:
        source = ['--model=tiny']

    def initial(name, seed, feature_seed):
        """The model train.py starts from: lr=0 leaves the weights as they were built."""
        out_dir = str(tmp_path / name)
        train(*source, f'--data_dir={data_dir}', f'--out_dir={out_dir}', '--block_size=32', '--batch_size=64',
              '--micro_batch_size=2', '--max_iters=1', '--eval_iters=1', '--lr=0', f'--seed={seed}', f'--feature_seed={feature_seed}')
        return weights(out_dir)

    base, other_p, same_p, other_seed = initial('a', 3, 0), initial('b', 3, 5), initial('c', 3, 5), initial('d', 4, 5)
    projections = {name for name in base if name.endswith('attn.feature_proj')}
    assert projections == {'layers.0.attn.feature_proj', 'layers.1.attn.feature_proj'}
    for name in base:
        assert torch.equal(other_p[name], same_p[name]), name  # the same seeds give the same model
        assert torch.equal(base[name], other_p[name]) == (name not in projections), name  # feature_seed moves P alone
    assert torch.equal(other_p['layers.1.attn.feature_proj'], projection_matrix(16, 'qmc', seed=5 + 1))
    # seed keeps drawing the rest: the gate's W_G (and, from scratch, every weight) but not P
    assert all(torch.equal(other_p[name], other_seed[name]) for name in projections)
    assert not torch.equal(other_p['layers.0.attn.gate.weight'], other_seed['layers.0.attn.gate.weight'])


def test_eval_only_reproduces_the_logged_val_loss(data_dir, tmp_path, capsys):
    out_dir = str(tmp_path / 'run')
    train(f'--data_dir={data_dir}', f'--out_dir={out_dir}', *SMALL, '--micro_batch_size=8', '--max_iters=2', '--eval_interval=2')
    logged = read_log(out_dir)[-1]['val_loss']
    capsys.readouterr()
    train(f'--init_from={out_dir}', f'--data_dir={data_dir}', f'--out_dir={tmp_path / "unused"}', '--eval_only=True',
          '--block_size=32', '--batch_size=256', '--micro_batch_size=8', '--eval_iters=2')
    printed = float(re.search(r'val loss ([0-9.]+)', capsys.readouterr().out).group(1))
    assert printed == pytest.approx(logged, abs=1e-4)


def test_pythia_data_puts_the_tokenizer_beside_the_checkpoint(tmp_path):
    docs = [f"Document {i}: the quick brown fox. " * 20 for i in range(40)]
    data = write_data(tmp_path / 'data', docs, tokenizer=PYTHIA_TOKENIZER)
    out_dir = str(tmp_path / 'out')
    train(f'--data_dir={data}', f'--out_dir={out_dir}', '--model=tiny', '--block_size=32', '--batch_size=64',
          '--micro_batch_size=2', '--max_iters=1', '--eval_iters=1')
    assert open(os.path.join(out_dir, 'tokenizer.json'), 'rb').read() == open(PYTHIA_TOKENIZER, 'rb').read()
    assert GPT.from_checkpoint(out_dir).config.vocab_size == 50304
    assert torch.load(os.path.join(out_dir, 'ckpt.pt'), weights_only=True)['tokenizer'].startswith('pythia-')


def test_the_demo_builds_its_data_on_first_use(tmp_path, monkeypatch, capsys):
    # data/stdlib/prepare.py's build(), stood in for by one that writes a small corpus where it is told
    built = []

    def build(out_dir):
        built.append(out_dir)
        return write_data(out_dir, stdlib_docs()[:8])
    monkeypatch.setitem(sys.modules, 'data.stdlib.prepare', types.SimpleNamespace(build=build))
    monkeypatch.chdir(tmp_path)  # the default data_dir, data/stdlib-bytes, is relative to the working directory
    train('--max_iters=2', '--eval_iters=1', f'--out_dir={tmp_path / "out"}')
    assert built == [os.path.join('data', 'stdlib-bytes')] and (tmp_path / 'data' / 'stdlib-bytes' / 'prepare.json').is_file()
    assert [row['step'] for row in read_log(tmp_path / 'out')] == [0, 2]  # step 0 and the end: log_interval is longer
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        f"the model is in {tmp_path / 'out'}/ (ckpt.pt, step 2, val loss {read_log(tmp_path / 'out')[-1]['val_loss']:.4f}); "
        f"sample it with: python sample.py --out_dir={tmp_path / 'out'}")
    train('--max_iters=2', '--eval_iters=1', f'--out_dir={tmp_path / "again"}')
    assert len(built) == 1  # built once

# -----------------------------------------------------------------------------
# The attention transfer (transfer.py), then the fine-tune of its model


@pytest.fixture(scope='module')
def softmax_teacher(data_dir, tmp_path_factory):
    """A tiny softmax model trained 6 steps: attention with some structure for the transfer to copy."""
    out_dir = str(tmp_path_factory.mktemp('runs') / 'softmax_teacher')
    train(f'--data_dir={data_dir}', f'--out_dir={out_dir}', '--attention=softmax', '--max_iters=6', '--eval_interval=6',
          '--micro_batch_size=8', *SMALL)
    return out_dir


def transfer_args(teacher, data_dir, out_dir, *more):
    return [f'--init_from={teacher}', f'--data_dir={data_dir}', f'--out_dir={out_dir}', '--batch_size=256',
            '--lr=1e-2', '--seed=3', *more]


def test_attention_transfer_trains_the_attention_alone(data_dir, softmax_teacher, tmp_path, capsys):
    out_dir = tmp_path / 'transfer'
    train(*transfer_args(softmax_teacher, data_dir, out_dir, '--transfer_tokens=2048'), script='transfer.py')
    # block_size is the teacher's context: 32; 8 steps of 256 tokens; the mean per-layer MSE to the
    # teacher's attention output goes down
    rows = read_log(out_dir)
    assert [row['step'] for row in rows] == list(range(1, 9))
    assert rows[-1]['transfer_mse'] < 0.5 * rows[0]['transfer_mse']
    assert rows[0]['lr'] == 1e-2 and rows[-1]['lr'] < 1e-3  # one warmup step (a tenth of 8, at least 1), then cosine
    assert capsys.readouterr().out.strip().endswith(
        f"fine-tune it with: python train.py config/train_finetune.py --init_from={out_dir} --data_dir={data_dir} --out_dir=...")

    # only the trained attention parameters moved from the model train.py makes when it linearizes
    torch.manual_seed(3)
    before = GPT.from_checkpoint(softmax_teacher, attention='dijiang').state_dict()
    after = weights(out_dir)
    trained = {name for name in after if re.fullmatch(r'layers\.\d\.attn\.(qkv|gate|group_norm)\.(weight|bias)', name)}
    assert len(trained) == 2 * 5 and after.keys() == before.keys()
    for name in after:
        assert torch.equal(after[name], before[name]) == (name not in trained), name
    assert torch.load(out_dir / 'ckpt.pt', weights_only=True)['tokenizer'] == 'bytes'

    # train.py fine-tunes exactly that model: lr=0 leaves every weight as the transfer left it
    train(f'--init_from={out_dir}', f'--data_dir={data_dir}', f'--out_dir={tmp_path / "finetune"}', '--block_size=32',
          '--batch_size=256', '--max_iters=1', '--eval_iters=1', '--lr=0')
    fine_tuned = weights(tmp_path / 'finetune')
    assert all(torch.equal(fine_tuned[name], tensor) for name, tensor in after.items())

    # the helper's inputs and outputs are each attention's own in the teacher's forward
    teacher = GPT.from_checkpoint(softmax_teacher)
    idx = torch.randint(0, 257, (2, 32))
    with torch.no_grad():
        pairs, cos, sin = transfer.teacher_attention_io(teacher, idx)
        # the residual stream written out by hand: block i's attention reads ln_attn(x_i)
        cfg = teacher.config
        ref_cos, ref_sin = rotary_cos_sin(torch.arange(32), int(cfg.head_size * cfg.rotary_pct), cfg.rotary_base)
        x = teacher.embed(idx)
        assert len(pairs) == cfg.n_layer == 2 and torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)
        for block, (h, a) in zip(teacher.layers, pairs):
            assert torch.equal(h, block.ln_attn(x)) and torch.equal(a, block.attn(h, cos, sin)[0])
            x = x + a + block.mlp(block.ln_mlp(x))  # GPT-NeoX's parallel residual


def test_attention_transfer_under_ddp_matches_one_process(data_dir, softmax_teacher, tmp_path):
    ddp_dir, single_dir = tmp_path / 'ddp', tmp_path / 'single'
    output = torchrun(tmp_path, 'transfer.py', *transfer_args(softmax_teacher, data_dir, ddp_dir, '--transfer_tokens=1024',
                                                              '--micro_batch_size=4'))
    assert '4 steps of attention transfer' in output and '= 2 ranks * 1 micro-steps * 4 * 32' in output
    train(*transfer_args(softmax_teacher, data_dir, single_dir, '--transfer_tokens=1024'), script='transfer.py')
    rows = [read_log(out) for out in (ddp_dir, single_dir)]
    assert len(rows[0]) == len(rows[1]) == 4
    for ddp_row, single_row in zip(*rows):
        assert ddp_row['transfer_mse'] == pytest.approx(single_row['transfer_mse'], rel=1e-4)
    assert max_difference(weights(ddp_dir), weights(single_dir)) < 1e-4


def test_attention_transfer_needs_a_softmax_teacher(data_dir, softmax_teacher, halfway, tmp_path, capsys):
    out = tmp_path / 'x'
    for args, expected in ((transfer_args(halfway, data_dir, out, '--transfer_tokens=1024'),
                            f'init_from={halfway!r}: the transfer needs a softmax model'),
                           (transfer_args(softmax_teacher, data_dir, out, '--transfer_tokens=1024', '--block_size=64'),
                            "block_size=64: the softmax teacher's context is 32"),
                           (transfer_args(softmax_teacher, data_dir, out), 'transfer_tokens=0: give the number')):
        assert_one_error_line(*run_script(capsys, 'transfer.py', *args), expected)
    assert not out.exists()
