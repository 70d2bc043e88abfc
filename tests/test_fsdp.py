"""train.py --fsdp=True on CPU (2 gloo ranks under torchrun): the same losses as one process, a sharded
resume bit for bit, checkpoints that survive a killed write; activation checkpointing; the memory estimate."""
import os
import re
import shutil
import warnings

import pytest
import torch

import checkpoints
import memory
import sharding
from conftest import assert_one_error_line, run_script
from dijiang import GPT, GPTConfig
from test_errors import TRAIN, snapshot
from test_train import SMALL, read_log, stdlib_docs, torchrun, train, write_data

COMMON = [*SMALL, '--micro_batch_size=2', '--eval_interval=4', '--lr_decay_iters=8']


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp('fsdp_data') / 'bytes', stdlib_docs())


@pytest.fixture(scope='module')
def straight(data, tmp_path_factory):
    """8 FSDP steps in one run, consolidated into ckpt.pt."""
    tmp = tmp_path_factory.mktemp('fsdp')
    out_dir = str(tmp / 'straight')
    output = torchrun(tmp, 'train.py', f'--data_dir={data}', f'--out_dir={out_dir}', '--fsdp=True', '--max_iters=8', *COMMON)
    assert '8 steps of 256 tokens = 2 ranks * 2 micro-steps * 2 * 32' in output
    assert re.search(r'^memory per GPU \(estimate\): weights .* on each of 2 \(fp32, micro_batch_size=2, '
                     r'block_size=32, fsdp=True', output, re.M)
    return out_dir


def consolidate(out_dir, capsys, step=8):
    status, out, err = run_script(capsys, 'consolidate.py', f'--out_dir={out_dir}')
    assert status == 0 and out.startswith(f"{out_dir}/ckpt.pt: step {step}"), err
    return GPT.from_checkpoint(out_dir).state_dict()


def test_fsdp_matches_one_process(data, straight, tmp_path):
    single = str(tmp_path / 'single')
    train(f'--data_dir={data}', f'--out_dir={single}', '--max_iters=8', *COMMON, '--micro_batch_size=4')
    rows = read_log(straight)
    assert [row['step'] for row in rows] == list(range(9)) and rows[-1]['loss'] < rows[1]['loss'] - 0.5
    for fsdp_row, single_row in zip(rows, read_log(single)):
        for key in ('loss', 'val_loss'):
            if key in fsdp_row:
                assert fsdp_row[key] == pytest.approx(single_row[key], abs=1e-4), (fsdp_row, single_row)


def test_sharded_resume_is_exact_and_consolidates(data, straight, tmp_path, capsys):
    halfway = str(tmp_path / 'halfway')
    torchrun(tmp_path, 'train.py', f'--data_dir={data}', f'--out_dir={halfway}', '--fsdp=True', '--max_iters=4', *COMMON)
    assert checkpoints.read_meta(os.path.join(halfway, 'ckpt'))['step'] == 4
    # the same step consolidated into ckpt.pt, alone in a copy of the run: FSDP resumes from that file too
    consolidate(halfway, capsys, step=4)
    from_file = str(shutil.copytree(halfway, tmp_path / 'from_file', ignore=shutil.ignore_patterns('ckpt')))
    os.remove(os.path.join(halfway, 'ckpt.pt'))
    keys = ('step', 'loss', 'val_loss', 'lr', 'grad_norm')
    expected = [{k: r[k] for k in keys if k in r} for r in read_log(straight)]
    a = consolidate(straight, capsys)
    # resumed (from the shards with activation checkpointing on): the same numbers and weights, bit for bit
    for out_dir, more in ((halfway, ['--activation_checkpointing=True']), (from_file, [])):
        output = torchrun(tmp_path, 'train.py', '--init_from=resume', f'--out_dir={out_dir}', '--max_iters=8', *more)
        assert 'from step 4' in output
        assert [{k: r[k] for k in keys if k in r} for r in read_log(out_dir)] == expected, out_dir
        b = consolidate(out_dir, capsys)
        assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a), out_dir
    ckpt = torch.load(os.path.join(straight, 'ckpt.pt'), weights_only=True)
    assert ckpt['step'] == 8 and ckpt['data_position'] == 64 and sorted(ckpt['optimizer']['state'])[:2] == [0, 1]


def sharded_copy(straight, out_dir):
    """A copy of the straight run as train.py left it: sharded alone (another test may consolidate it)."""
    shutil.copytree(straight, out_dir, ignore=shutil.ignore_patterns('ckpt.pt'))
    return out_dir


def test_a_killed_write_leaves_the_previous_checkpoint(straight, tmp_path):
    out_dir = sharded_copy(straight, str(tmp_path / 'killed'))
    # killed while the shards were written: a partial ckpt.tmp/ beside the whole ckpt/
    os.makedirs(os.path.join(out_dir, 'ckpt.tmp'))
    open(os.path.join(out_dir, 'ckpt.tmp', '__0_0.distcp'), 'wb').write(b'partial')
    assert checkpoints.latest(out_dir)['sharded'] == os.path.join(out_dir, 'ckpt')
    # killed between the renames: ckpt/ is ckpt.old/ for that instant
    os.replace(os.path.join(out_dir, 'ckpt'), os.path.join(out_dir, 'ckpt.old'))
    ckpt = checkpoints.latest(out_dir)
    assert ckpt['sharded'] == os.path.join(out_dir, 'ckpt.old') and ckpt['step'] == 8
    whole = checkpoints.consolidated(ckpt['sharded'])
    expected = checkpoints.consolidated(os.path.join(straight, 'ckpt'))['model']
    assert all(torch.equal(whole['model'][name], expected[name]) for name in expected)


def test_an_fsdp_run_is_refused_replaced_and_put_back_whole(data, straight, tmp_path, capfd):
    run_dir = sharded_copy(straight, tmp_path / 'run')
    os.makedirs(run_dir / 'ckpt.tmp')  # what a write of this run that was killed left
    (run_dir / 'ckpt.tmp' / '__0_0.distcp').write_bytes(b'partial')
    before = snapshot(run_dir)
    new_run = ['train.py', f'--data_dir={data}', f'--out_dir={run_dir}', *TRAIN]
    assert_one_error_line(*run_script(capfd, *new_run), f'error: {run_dir}/ckpt/ holds an earlier run')
    assert snapshot(run_dir) == before
    # an overwriting run that stops before its first checkpoint puts it all back, byte for byte
    assert_one_error_line(*run_script(capfd, *new_run, '--overwrite=True', '--lr=1e30', '--max_iters=10'),
                          'non-finite loss (nan) at step 2', f'{run_dir} holds the earlier run again')
    assert snapshot(run_dir) == before
    # one killed outright in its first sharded write (its own ckpt.tmp/ cut short, the old run aside): the next
    # run in out_dir puts the old run back first (here a new run, then refused)
    os.makedirs(run_dir / 'replaced-run')
    for name in ('ckpt', 'ckpt.tmp', 'config.json', 'log.jsonl'):
        os.replace(run_dir / name, run_dir / 'replaced-run' / name)
    os.makedirs(run_dir / 'ckpt.tmp')
    (run_dir / 'ckpt.tmp' / '__1_0.distcp').write_bytes(b'the new run, cut short')
    (run_dir / 'log.jsonl').write_text('{"step": 0, "val_loss": 5.0}\n')
    status, out, err = run_script(capfd, *new_run)
    assert status == 1 and 'put back into' in out and snapshot(run_dir) == before
    # once the overwriting run's first checkpoint is written, out_dir holds that run alone
    status, out, err = run_script(capfd, *new_run, '--overwrite=True', '--max_iters=1')
    assert status == 0 and sorted(os.listdir(run_dir)) == ['ckpt.pt', 'config.json', 'log.jsonl'], err
    assert checkpoints.latest(str(run_dir))['step'] == 1


def test_a_sharded_checkpoint_resumes_in_one_process(straight, tmp_path, capfd):
    run_dir = sharded_copy(straight, str(tmp_path / 'run'))
    # a learning rate of 1e30 from step 9 on: step 10's loss is not finite, and the line names the checkpoint the run
    # resumed from (the shards), not the kind --fsdp would write
    with warnings.catch_warnings(record=True) as caught:  # and DCP says nothing of loading in one process
        warnings.simplefilter('always')
        assert_one_error_line(*run_script(capfd, 'train.py', '--init_from=resume', f'--out_dir={run_dir}', '--fsdp=False',
                                          '--max_iters=11', '--lr=1e30', '--min_lr=1e30'),
                              'error: non-finite loss', f'at step 10: stopped; {run_dir}/ckpt (step 8) is the last checkpoint')
    assert not [w for w in caught if 'single process' in str(w.message)], caught


def test_activation_checkpointing_keeps_losses_and_gradients():
    torch.manual_seed(0)
    plain = GPT(GPTConfig.named('tiny', vocab_size=384))
    checkpointed = GPT(GPTConfig.named('tiny', vocab_size=384))
    checkpointed.load_state_dict(plain.state_dict())
    sharding.checkpoint_blocks(checkpointed)
    x = torch.randint(0, 384, (2, 96))  # longer than a chunk: the chunk form's state crosses chunks
    losses = []
    for model in (plain, checkpointed):
        loss = model(x, x)[1]
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        assert (p.grad - q.grad).abs().max().item() <= 1e-5, name


def test_estimate_counts_weights_gradients_and_optimizer_exactly():
    gpt = GPT(GPTConfig.named('tiny', vocab_size=384))
    optimizer = torch.optim.AdamW(gpt.parameters())
    gpt(torch.randint(0, 384, (2, 32)), torch.randint(0, 384, (2, 32)))[1].backward()
    optimizer.step()
    measured = dict(weights=sharding.local_bytes([*gpt.parameters(), *gpt.buffers()]),
                    gradients=sharding.local_bytes(p.grad for p in gpt.parameters()),
                    optimizer=sum(sharding.local_bytes(s.values()) for s in optimizer.state.values()))
    estimate = memory.estimate(gpt, 32, 2, bf16=False)
    assert {name: estimate[name] for name in measured} == measured
    # FSDP2 on 2 ranks: rank 0 holds the first of torch.chunk's two pieces of every parameter, along dim 0
    sharded = memory.estimate(gpt, 32, 2, world_size=2, fsdp=True, bf16=False)
    rank_0 = sum(torch.chunk(p, 2)[0].nbytes for p in gpt.parameters())
    assert sharded['gradients'] == rank_0 and sharded['weights'] == rank_0 + sharding.local_bytes(gpt.buffers())
    assert sharded['optimizer'] == 2 * rank_0 + 4 * len(list(gpt.parameters()))


def test_estimate_activations_within_10_percent_of_the_saved_tensors():
    gpt = GPT(GPTConfig.named('small', vocab_size=384))
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    params = {p.untyped_storage().data_ptr() for p in gpt.parameters()}
    x = torch.randint(0, 384, (4, 128))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        gpt(x, x)
    measured = sum(size for ptr, size in saved.items() if ptr not in params)
    assert memory.estimate(gpt, 128, 4, bf16=False)['activations'] == pytest.approx(measured, rel=0.1)


def test_dry_run_prints_the_estimate_and_what_would_fit(capsys):
    status, out, err = run_script(capsys, 'train.py', '--dry_run=True', '--model=pythia-6.9b', '--gpus=8', '--fsdp=True',
                                  '--gpu_memory=80', '--block_size=2048', '--batch_size=524288')
    lines = out.strip().splitlines()
    assert status == 0 and len(lines) == 2, (out, err)
    assert re.fullmatch(r'memory per GPU \(estimate\): weights 3\.45 GiB, gradients 3\.44 GiB, optimizer 6\.89 GiB, '
                        r'activations [0-9.]+ GiB, working [0-9.]+ GiB; total [0-9.]+ GiB on each of 8 \(bf16, '
                        r'micro_batch_size=16, block_size=2048, fsdp=True, cpu_offload=False, activation_checkpointing=False\)',
                        lines[0])
    assert re.fullmatch(r"note: it does not fit in this GPU's 80 GiB; with --activation_checkpointing=True it would take "
                        r"[0-9.]+ GiB per GPU", lines[1])
    # a model below 1 GiB in MiB (the tiny model's weights would read 0.02 GiB)
    status, out, err = run_script(capsys, 'train.py', '--dry_run=True', '--model=tiny', '--dtype=float32',
                                  '--micro_batch_size=1', '--gpu_memory=0.15')
    tiny = memory.estimate(memory.shapes_only(GPTConfig.named('tiny', block_size=128)), 128, 1, bf16=False)
    mib = {name: f"{tiny[name] / 2 ** 20:.1f} MiB" for name in tiny}
    assert status == 0 and out.splitlines()[0] == (
        f"memory per GPU (estimate): weights {mib['weights']}, gradients {mib['gradients']}, optimizer {mib['optimizer']}, "
        f"activations {mib['activations']}, working {mib['working']}; total {mib['total']} on each of 1 (fp32, "
        "micro_batch_size=1, block_size=128, fsdp=False, cpu_offload=False, activation_checkpointing=False)"), (out, err)
    assert 2 ** 20 < tiny['weights'] < tiny['total'] < 2 ** 30
    offloaded = memory.estimate(memory.shapes_only(GPTConfig.named('tiny', block_size=128)), 128, 1, fsdp=True,
                                cpu_offload=True, activation_checkpointing=True, bf16=False)['total']
    assert out.splitlines()[1] == ("note: it does not fit in this GPU's 0.15 GiB; with --fsdp=True --activation_checkpointing="
                                   f"True --cpu_offload=True it would take {offloaded / 2 ** 20:.1f} MiB per GPU")


def test_help_says_several_nodes_need_one_out_dir(capsys):
    status, out, err = run_script(capsys, 'train.py', '--help')
    fsdp = out[out.index('\nfsdp = False'):out.index('\ncpu_offload = ')]
    assert status == 0 and "on several nodes out_dir must be one folder every node sees" in fsdp, fsdp
