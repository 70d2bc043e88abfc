"""train.py on CPU: DDP with gloo against one process, exact resume, checkpoints and the errors.
Single-process runs execute train.py in this process (runpy) to skip a fresh torch import; DDP
runs under torchrun."""
import json
import os
import re
import runpy
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import PYTHIA_TOKENIZER
from data.prepare import build_default_corpus, prepare
from dijiang import GPT, GPTConfig, projection_matrix, rotary_cos_sin
from shards import write_shard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 8 windows of 32 tokens per step (the tiny model, which train() passes), a high lr so 6 steps visibly learn
SMALL = ['--model=tiny', '--block_size=32', '--batch_size=256', '--warmup=2', '--lr=1e-2', '--eval_iters=2', '--log_interval=1']


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('data')
    build_default_corpus(str(tmp / 'corpus.jsonl'), max_bytes=500_000)
    return prepare(input=str(tmp / 'corpus.jsonl'), tokenizer='bytes', out_dir=str(tmp / 'bytes'), num_workers=1)


def train(*args):
    """Run train.py with these settings in this process; returns its globals. The tiny model (the
    arguments can override it) and one thread: these models are so small that a second one only adds
    synchronization."""
    argv, threads = sys.argv, torch.get_num_threads()
    sys.argv = ['train.py', '--model=tiny', '--cpu_threads=1', *args]
    torch.set_num_threads(1)
    try:
        return runpy.run_path(os.path.join(ROOT, 'train.py'), run_name='__main__')
    finally:
        sys.argv = argv
        torch.set_num_threads(threads)


def read_log(out_dir):
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        return [json.loads(line) for line in f]


def weights(out_dir):
    return GPT.from_checkpoint(out_dir).state_dict()


def checksum(out_dir):
    """What train.py prints per rank: the float64 sum of every parameter."""
    return sum(p.detach().double().sum().item() for p in GPT.from_checkpoint(out_dir).parameters())


def test_ddp_matches_one_process(data_dir, tmp_path):
    ddp_dir, single_dir = str(tmp_path / 'ddp'), str(tmp_path / 'single')
    common = [f'--data_dir={data_dir}', '--max_iters=6', '--eval_interval=3', *SMALL]
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    result = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                             'train.py', f'--out_dir={ddp_dir}', '--micro_batch_size=2', *common],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    output = result.stdout
    assert '6 steps of 256 tokens = 2 ranks * 2 micro-steps * 2 * 32' in output

    # the ranks read different windows: rank r starts at r * micro_batch_size
    firsts = dict(re.findall(r'rank (\d)/2: first micro-batch = train windows (\d+\.\.\d+)', output))
    assert firsts == {'0': '0..1', '1': '2..3'}
    # the weights are the same on both ranks, and they are the ones rank 0 saved
    sums = dict(re.findall(r'rank (\d)/2: final weights checksum (\S+)', output))
    assert sums.keys() == {'0', '1'} and float(sums['0']) == float(sums['1']) == checksum(ddp_dir)

    # the loss goes down
    log = read_log(ddp_dir)
    assert [row['step'] for row in log] == [0, 1, 2, 3, 4, 5, 6]
    assert log[-1]['loss'] < log[1]['loss'] - 0.5 and log[-1]['val_loss'] < log[0]['val_loss'] - 0.5
    assert {'step', 'loss', 'val_loss', 'lr', 'tokens_per_s'} <= log[3].keys()

    # one process with the same global batch (2 micro-steps of 4 windows) lands in the same place
    train(f'--out_dir={single_dir}', '--micro_batch_size=4', *common)
    single_log = read_log(single_dir)
    for ddp_row, single_row in zip(log, single_log):
        for key in ('loss', 'val_loss', 'lr', 'grad_norm'):
            if key in ddp_row:
                assert ddp_row[key] == pytest.approx(single_row[key], rel=1e-4), (ddp_row, single_row)
    # the weights moved by about 0.05 and agree to 1e-4 (measured: 1.2e-5, from summation order)
    ddp_weights, single_weights = weights(ddp_dir), weights(single_dir)
    assert max((ddp_weights[name] - tensor).abs().max().item() for name, tensor in single_weights.items()) < 1e-4
    # ... which a run that saw only rank 0's share of each batch does not: the comparison can fail
    half_dir = str(tmp_path / 'half')
    train(f'--out_dir={half_dir}', *common, '--batch_size=128', '--micro_batch_size=2')
    assert max((ddp_weights[name] - tensor).abs().max().item() for name, tensor in weights(half_dir).items()) > 1e-2


@pytest.fixture(scope='module')
def halfway(data_dir, tmp_path_factory):
    """4 steps of an 8-step run: the cosine decays over 8 steps, the run stops at 4 with a checkpoint."""
    out_dir = str(tmp_path_factory.mktemp('runs') / 'halfway')
    train(f'--data_dir={data_dir}', f'--out_dir={out_dir}', '--max_iters=4', '--lr_decay_iters=8',
          '--eval_interval=4', '--micro_batch_size=4', *SMALL)
    return out_dir


def test_resume_is_exact(data_dir, halfway, tmp_path):
    straight = str(tmp_path / 'straight')
    train(f'--data_dir={data_dir}', f'--out_dir={straight}', '--max_iters=8', '--eval_interval=4',
          '--micro_batch_size=4', *SMALL)
    resumed = str(tmp_path / 'resumed')
    shutil.copytree(halfway, resumed)
    # the settings come back from the checkpoint; only the length changes
    run = train('--init_from=resume', f'--out_dir={resumed}', '--max_iters=8')
    assert run['start_step'] == 4 and run['micro_batch_size'] == 4 and run['lr_decay_iters'] == 8

    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)
    keys = ('step', 'loss', 'val_loss', 'lr', 'grad_norm')
    strip = lambda log: [{k: row[k] for k in keys if k in row} for row in log]  # noqa: E731
    assert strip(read_log(resumed)) == strip(read_log(straight))  # every logged number, bit for bit

    ckpt = torch.load(os.path.join(resumed, 'ckpt.pt'), weights_only=True)
    assert ckpt['step'] == 8 and ckpt['data_position'] == 8 * 8 and ckpt['tokenizer'] == 'bytes'
    assert {'optimizer', 'rng', 'settings', 'config', 'model'} <= ckpt.keys()
    straight_ckpt = torch.load(os.path.join(straight, 'ckpt.pt'), weights_only=True)
    for state_a, state_b in zip(ckpt['optimizer']['state'].values(), straight_ckpt['optimizer']['state'].values()):
        assert all(torch.equal(state_a[k], state_b[k]) for k in ('exp_avg', 'exp_avg_sq', 'step'))
    assert torch.equal(ckpt['rng']['torch'], straight_ckpt['rng']['torch'])


def test_non_finite_loss_stops_and_keeps_the_checkpoint(halfway, tmp_path):
    out_dir = str(tmp_path / 'nan')
    shutil.copytree(halfway, out_dir)
    before = open(os.path.join(out_dir, 'ckpt.pt'), 'rb').read()
    # an absurd learning rate blows the weights up in update 5, so the loss of step 6 is not finite
    with pytest.raises(SystemExit, match=r'non-finite loss \(nan\) at step 6: stopped; .*ckpt.pt \(step 4\) is the last good'):
        train('--init_from=resume', f'--out_dir={out_dir}', '--max_iters=8', '--lr=1e38')
    assert open(os.path.join(out_dir, 'ckpt.pt'), 'rb').read() == before
    assert [row['step'] for row in read_log(out_dir)][-1] == 5


def test_checkpoint_loads_and_errors_are_clear(data_dir, halfway, tmp_path):
    model = GPT.from_checkpoint(halfway)
    assert model.config.attention == 'dijiang' and model.config.vocab_size == 384  # 257 padded to 128s
    assert json.load(open(os.path.join(halfway, 'config.json')))['n_layer'] == 2

    # shards from another tokenizer
    other = tmp_path / 'other'
    other.mkdir()
    for split in ('train', 'val'):
        write_shard(str(other / f'{split}_000000.bin'), np.arange(100, dtype=np.uint16), 257, 'other-tokenizer')
    (other / 'prepare.json').write_text('{}')
    with pytest.raises(SystemExit, match='was tokenized with other-tokenizer, the model uses bytes'):
        train('--init_from=resume', f'--out_dir={halfway}', f'--data_dir={other}')

    # a model whose vocab is smaller than the data's
    small_vocab = str(tmp_path / 'small_vocab')
    GPT(GPTConfig.named('tiny', vocab_size=128)).save_checkpoint(small_vocab)
    with pytest.raises(SystemExit, match="token ids up to 256, the model's vocab_size is 128"):
        train(f'--init_from={small_vocab}', f'--data_dir={data_dir}', *SMALL, '--max_iters=1')

    # a softmax model asked for more context than it has
    softmax = str(tmp_path / 'softmax')
    GPT(GPTConfig.named('tiny', attention='softmax', vocab_size=384, block_size=16)).save_checkpoint(softmax)
    with pytest.raises(SystemExit, match=r"block_size=32 is longer than this softmax model's context \(16\)"):
        train(f'--init_from={softmax}', f'--data_dir={data_dir}', '--attention=softmax', *SMALL, '--max_iters=1')

    # a batch that does not split into micro-batches
    with pytest.raises(SystemExit, match='batch_size=1000 tokens is not a multiple of'):
        train(f'--data_dir={data_dir}', f'--out_dir={tmp_path / "x"}', '--batch_size=1000')
    with pytest.raises(SystemExit, match="unknown argument '--learning_rate=1'"):
        train('--learning_rate=1')
    with pytest.raises(SystemExit, match='no prepared data'):
        train(f'--data_dir={tmp_path / "nothing"}', f'--out_dir={tmp_path / "x"}')


def test_fine_tune_linearizes_a_softmax_checkpoint(data_dir, tmp_path):
    teacher = str(tmp_path / 'teacher')
    GPT(GPTConfig.named('tiny', attention='softmax', vocab_size=384)).save_checkpoint(teacher)
    out_dir = str(tmp_path / 'student')
    # the recipe's defaults apply (block 2048, 1000 warmup...) unless overridden; lr=0 keeps the weights
    run = train(f'--init_from={teacher}', f'--data_dir={data_dir}', f'--out_dir={out_dir}', '--block_size=32',
                '--batch_size=64', '--micro_batch_size=2', '--max_iters=1', '--eval_iters=1', '--lr=0')
    assert run['warmup'] == 1000 and run['eval_interval'] == 500
    student, source = weights(out_dir), weights(teacher)
    assert GPT.from_checkpoint(out_dir).config.attention == 'dijiang'
    assert all(torch.equal(student[name], tensor) for name, tensor in source.items())
    assert 'layers.0.attn.gate.weight' in student and 'layers.0.attn.gate.weight' not in source


def test_val_ood_split_is_evaluated_beside_val(data_dir, tmp_path, capsys):
    # another corpus's val shard, named val_ood_000000.bin, is the out-of-distribution split
    other = tmp_path / 'other.jsonl'
    other.write_text(''.join(json.dumps(dict(text=f"{i}: zebra quartz jig. " * 40)) + '\n' for i in range(20)))
    other_dir = prepare(input=str(other), tokenizer='bytes', out_dir=str(tmp_path / 'other'), num_workers=1, val_every=2)
    with_ood = tmp_path / 'with_ood'
    shutil.copytree(data_dir, with_ood)
    shutil.copyfile(os.path.join(other_dir, 'val_000000.bin'), with_ood / 'val_ood_000000.bin')
    common = [*SMALL, '--micro_batch_size=8', '--max_iters=2', '--eval_interval=2']
    run = train(f'--data_dir={with_ood}', f'--out_dir={tmp_path / "ood"}', *common)
    assert 'val_ood ' in capsys.readouterr().out
    plain_run = train(f'--data_dir={data_dir}', f'--out_dir={tmp_path / "plain"}', *common)
    assert run['val_data'].num_tokens == plain_run['val_data'].num_tokens  # val_*.bin does not take in val_ood_*.bin
    assert run['val_ood_data'].num_tokens == json.load(open(os.path.join(other_dir, 'prepare.json')))['val']['tokens']

    ood, plain = read_log(tmp_path / 'ood'), read_log(tmp_path / 'plain')
    assert [row['step'] for row in ood if 'val_loss' in row] == [0, 2]
    assert not any('val_loss_ood' in row for row in plain)  # no val_ood shards: nothing changes
    for row, plain_row in zip(ood, plain):
        assert ('val_loss_ood' in row) == ('val_loss' in row)
        if 'val_loss' in row:
            assert row['val_loss'] == plain_row['val_loss']  # the val split is still val_000000.bin alone
    assert abs(ood[-1]['val_loss_ood'] - ood[-1]['val_loss']) > 0.1  # another text, another loss, once trained

    with pytest.raises(SystemExit):  # eval_only reports both splits
        train(f'--init_from={tmp_path / "ood"}', f'--data_dir={with_ood}', f'--out_dir={tmp_path / "unused"}',
              '--eval_only=True', *SMALL, '--micro_batch_size=8')
    printed = capsys.readouterr().out
    assert re.search(r'^val loss [0-9.]+', printed, re.M) and re.search(r'^val_ood loss [0-9.]+', printed, re.M)


@pytest.mark.parametrize('linearize', [False, True], ids=['scratch', 'linearize'])
def test_feature_seed_draws_only_the_projections(data_dir, tmp_path, linearize):
    source = []
    if linearize:
        teacher = str(tmp_path / 'teacher')
        GPT(GPTConfig.named('tiny', attention='softmax', vocab_size=384)).save_checkpoint(teacher)
        source = [f'--init_from={teacher}']

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


@pytest.fixture(scope='module')
def softmax_teacher(data_dir, tmp_path_factory):
    """A tiny softmax model trained 6 steps: attention with some structure for the transfer to copy."""
    out_dir = str(tmp_path_factory.mktemp('runs') / 'softmax_teacher')
    train(f'--data_dir={data_dir}', f'--out_dir={out_dir}', '--attention=softmax', '--max_iters=6', '--eval_interval=6',
          '--micro_batch_size=8', *SMALL)
    return out_dir


# the LM phase of a linearized model, short; lr=0 leaves the weights as the transfer left them
LINEARIZE = ['--attention=dijiang', '--block_size=32', '--batch_size=256', '--micro_batch_size=8', '--eval_iters=2',
             '--seed=3', '--transfer_lr=1e-2']


def test_attention_transfer_trains_the_attention_alone(data_dir, softmax_teacher, tmp_path):
    common = [f'--init_from={softmax_teacher}', f'--data_dir={data_dir}', *LINEARIZE, '--max_iters=1', '--lr=0']
    run = train(*common, f'--out_dir={tmp_path / "transfer"}', '--transfer_tokens=2048')
    train(*common, f'--out_dir={tmp_path / "none"}')

    # 8 steps of 256 tokens; the mean per-layer MSE to the teacher's attention output goes down
    rows = [row for row in read_log(tmp_path / 'transfer') if 'transfer_step' in row]
    assert [row['transfer_step'] for row in rows] == list(range(1, 9)) and all(row['step'] == 0 for row in rows)
    assert rows[-1]['transfer_mse'] < 0.5 * rows[0]['transfer_mse']
    assert rows[0]['lr'] == 1e-2 and rows[-1]['lr'] < 1e-3  # one warmup step (a tenth of 8, at least 1), then cosine

    # only the trained attention parameters moved; the LM phase then starts at the data after the transfer
    after, before = weights(tmp_path / 'transfer'), weights(tmp_path / 'none')
    trained = {name for name in after if re.fullmatch(r'layers\.\d\.attn\.(qkv|gate|group_norm)\.(weight|bias)', name)}
    assert len(trained) == 2 * 5
    for name in after:
        assert torch.equal(after[name], before[name]) == (name not in trained), name
    ckpt = torch.load(os.path.join(tmp_path, 'transfer', 'ckpt.pt'), weights_only=True)
    assert ckpt['data_position'] == (8 + 1) * 8

    # the helper's inputs and outputs are each attention's own in the teacher's forward
    teacher = GPT.from_checkpoint(softmax_teacher)
    idx = torch.randint(0, 257, (2, 32))
    with torch.no_grad():
        pairs, cos, sin = run['teacher_attention_io'](teacher, idx)
        # the residual stream written out by hand: block i's attention reads ln_attn(x_i)
        cfg = teacher.config
        ref_cos, ref_sin = rotary_cos_sin(torch.arange(32), int(cfg.head_size * cfg.rotary_pct), cfg.rotary_base)
        x = teacher.embed(idx)
        assert len(pairs) == cfg.n_layer == 2 and torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)
        for block, (h, a) in zip(teacher.layers, pairs):
            assert torch.equal(h, block.ln_attn(x)) and torch.equal(a, block.attn(h, cos, sin)[0])
            x = x + a + block.mlp(block.ln_mlp(x))  # GPT-NeoX's parallel residual


def test_attention_transfer_under_ddp_matches_one_process(data_dir, softmax_teacher, tmp_path):
    ddp_dir, single_dir = str(tmp_path / 'ddp'), str(tmp_path / 'single')
    common = [f'--init_from={softmax_teacher}', f'--data_dir={data_dir}', *LINEARIZE, '--max_iters=1', '--lr=0',
              '--transfer_tokens=1024']
    result = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                             'train.py', f'--out_dir={ddp_dir}', *common, '--micro_batch_size=4'],
                            cwd=ROOT, env={**os.environ, 'OMP_NUM_THREADS': '1'}, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    sums = dict(re.findall(r'rank (\d)/2: final weights checksum (\S+)', result.stdout))
    assert sums.keys() == {'0', '1'} and float(sums['0']) == float(sums['1'])  # the ranks took the same steps
    train(f'--out_dir={single_dir}', *common)
    rows = [[row for row in read_log(out) if 'transfer_step' in row] for out in (ddp_dir, single_dir)]
    assert len(rows[0]) == len(rows[1]) == 4
    for ddp_row, single_row in zip(*rows):
        assert ddp_row['transfer_mse'] == pytest.approx(single_row['transfer_mse'], rel=1e-4)
    ddp_weights, single_weights = weights(ddp_dir), weights(single_dir)
    assert max((ddp_weights[name] - tensor).abs().max().item() for name, tensor in single_weights.items()) < 1e-4


def test_attention_transfer_then_fine_tune_resumes_exactly(data_dir, softmax_teacher, tmp_path):
    common = [f'--init_from={softmax_teacher}', f'--data_dir={data_dir}', *LINEARIZE, '--transfer_tokens=1024',
              '--lr=1e-2', '--warmup=2', '--eval_interval=4', '--log_interval=1']
    straight, halfway = str(tmp_path / 'straight'), str(tmp_path / 'halfway')
    train(*common, f'--out_dir={straight}', '--max_iters=8')
    train(*common, f'--out_dir={halfway}', '--max_iters=4', '--lr_decay_iters=8')
    run = train('--init_from=resume', f'--out_dir={halfway}', '--max_iters=8')
    assert run['start_step'] == 4 and run['transfer_iters'] == 4  # set, and skipped: the checkpoint is past it

    a, b = weights(straight), weights(halfway)
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)
    keys = ('step', 'transfer_step', 'transfer_mse', 'loss', 'val_loss', 'lr', 'grad_norm')
    strip = lambda log: [{k: row[k] for k in keys if k in row} for row in log]  # noqa: E731
    assert strip(read_log(halfway)) == strip(read_log(straight))  # every logged number, bit for bit
    assert len([row for row in read_log(halfway) if 'transfer_step' in row]) == 4
    ckpt = torch.load(os.path.join(halfway, 'ckpt.pt'), weights_only=True)
    assert ckpt['step'] == 8 and ckpt['data_position'] == (4 + 8) * 8


def test_attention_transfer_needs_a_linearized_softmax_checkpoint(data_dir, softmax_teacher, tmp_path):
    message = r'transfer_tokens=1024: the attention transfer trains linearized DiJiang layers'
    with pytest.raises(SystemExit, match=message):
        train(f'--data_dir={data_dir}', f'--out_dir={tmp_path / "x"}', *SMALL, '--micro_batch_size=8', '--transfer_tokens=1024')
    with pytest.raises(SystemExit, match=message):
        train(f'--init_from={softmax_teacher}', f'--data_dir={data_dir}', f'--out_dir={tmp_path / "x"}', *SMALL,
              '--micro_batch_size=8', '--attention=softmax', '--transfer_tokens=1024')
    with pytest.raises(SystemExit, match=r"block_size=64 is longer than the softmax teacher's context \(32\)"):
        train(f'--init_from={softmax_teacher}', f'--data_dir={data_dir}', f'--out_dir={tmp_path / "x"}', *SMALL,
              '--micro_batch_size=4', '--block_size=64', '--transfer_tokens=1024')


def test_eval_only_reproduces_the_logged_val_loss(data_dir, tmp_path, capsys):
    out_dir = str(tmp_path / 'run')
    train(f'--data_dir={data_dir}', f'--out_dir={out_dir}', *SMALL, '--micro_batch_size=8', '--max_iters=2', '--eval_interval=2')
    logged = read_log(out_dir)[-1]['val_loss']
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        train(f'--init_from={out_dir}', f'--data_dir={data_dir}', f'--out_dir={tmp_path / "unused"}', '--eval_only=True',
              '--block_size=32', '--batch_size=256', '--micro_batch_size=8', '--eval_iters=2')
    assert stop.value.code == 0
    printed = float(re.search(r'val loss ([0-9.]+)', capsys.readouterr().out).group(1))
    assert printed == pytest.approx(logged, abs=1e-4)


def test_pythia_data_puts_the_tokenizer_beside_the_checkpoint(tmp_path):
    corpus = tmp_path / 'docs.jsonl'
    corpus.write_text(''.join(json.dumps(dict(text=f"Document {i}: the quick brown fox. " * 20)) + '\n' for i in range(40)))
    data = prepare(input=str(corpus), tokenizer=PYTHIA_TOKENIZER, out_dir=str(tmp_path / 'data'), num_workers=1, val_every=4)
    out_dir = str(tmp_path / 'out')
    train(f'--data_dir={data}', f'--out_dir={out_dir}', '--block_size=32', '--batch_size=64', '--micro_batch_size=2',
          '--max_iters=1', '--eval_iters=1')
    assert open(os.path.join(out_dir, 'tokenizer.json'), 'rb').read() == open(PYTHIA_TOKENIZER, 'rb').read()
    assert GPT.from_checkpoint(out_dir).config.vocab_size == 50304
    assert torch.load(os.path.join(out_dir, 'ckpt.pt'), weights_only=True)['tokenizer'].startswith('pythia-')


def test_the_demo_builds_its_data_on_first_use(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default data_dir, data/stdlib-bytes, is relative to the working directory
    run = train('--max_iters=2', '--batch_size=512', '--micro_batch_size=2', '--eval_iters=1', f'--out_dir={tmp_path / "out"}')
    assert run['data_dir'] == os.path.join('data', 'stdlib-bytes')
    summary = json.load(open(tmp_path / 'data' / 'stdlib-bytes' / 'prepare.json'))
    assert summary['tokenizer'] == 'bytes' and summary['train']['tokens'] > 3_000_000
    assert (tmp_path / 'data' / 'stdlib' / 'stdlib.jsonl').is_file()
    assert [row['step'] for row in read_log(tmp_path / 'out')] == [0, 2]  # step 0 and the end: log_interval is longer
