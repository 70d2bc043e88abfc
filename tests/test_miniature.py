"""experiments/miniature.py: the smoke pipeline end to end on a CPU (every stage, the report's JSON and
plot, finished runs skipped), the verdict's rules on made-up numbers, a report with runs missing, the
refusal without a GPU and Ctrl-C."""
import importlib.util
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import run_script
from data.prepare import prepare
from data.stdlib.prepare import write_corpus

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MINIATURE = os.path.join(ROOT, 'experiments', 'miniature.py')
SMOKE = os.path.join(ROOT, 'config', 'miniature_smoke.py')
FEATURE_MAPS = ('qmc', 'mc', 'performer', 'identity')


def load_miniature():
    spec = importlib.util.spec_from_file_location('miniature', MINIATURE)
    module = sys.modules['miniature'] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def smoke(tmp_path_factory):
    """The whole smoke pipeline into a temporary folder: the teacher stage as fresh `python train.py`
    processes (as on a GPU), then --stage=all, which skips those two runs and forks the others."""
    tmp = tmp_path_factory.mktemp('miniature')
    write_corpus(str(tmp / 'corpus.jsonl'), max_bytes=100_000)
    (tmp / 'other.jsonl').write_text(''.join(json.dumps(dict(text=f"{i}: zebra quartz jig. " * 40)) + '\n' for i in range(10)))
    data_dir = prepare(input=str(tmp / 'corpus.jsonl'), ood_input=str(tmp / 'other.jsonl'), tokenizer='bytes',
                       out_dir=str(tmp / 'data'), num_workers=1, val_every=10)

    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    common = [sys.executable, MINIATURE, SMOKE, f'--data_dir={data_dir}', f'--out_dir={tmp / "out"}',
              f'--json_path={tmp / "report" / "miniature.json"}', '--parallel=2']

    def miniature(*args):
        result = subprocess.run([*common, *args], cwd=str(tmp), env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
        return result.stdout

    outputs = [miniature('--stage=teacher', '--preload=False'), miniature('--stage=all')]
    with open(tmp / 'report' / 'miniature.json') as f:
        return dict(tmp=tmp, summary=json.load(f), outputs=outputs, common=common, env=env)


def finite(x):
    return isinstance(x, float) and math.isfinite(x)


def test_smoke_pipeline_reports_every_run(smoke):
    summary, teacher = smoke['summary'], smoke['summary']['teacher']
    T = 20 * 16 * 32  # the smoke teacher: 20 steps of 16 sequences of 32 tokens
    assert teacher['tokens'] == T and teacher['steps'] == 20
    assert finite(teacher['val_loss']) and finite(teacher['val_loss_ood']) and teacher['val_loss_ood'] != teacher['val_loss']
    assert teacher['at_t16']['step'] == 1 and finite(teacher['at_t16']['val_loss']) and finite(teacher['at_t16']['val_loss_ood'])

    runs = summary['runs']
    seeds = lambda arm, fraction: sorted(r['seed'] for r in runs if r['arm'] == arm and r['fraction'] == fraction)  # noqa: E731
    for arm in (*FEATURE_MAPS, 'transfer'):
        assert seeds(arm, 1 / 16) == [1, 2, 3], arm
    for arm in ('teacher_continued', 'scratch_t16'):
        assert seeds(arm, 1 / 16) == [1], arm
    assert seeds('scratch_t', 1.0) == [1]
    for arm in ('qmc', 'identity'):  # the recovery curves
        for fraction in (1 / 64, 1 / 4):
            assert seeds(arm, fraction) == [1], (arm, fraction)
    assert len(runs) == 5 * 3 + 3 + 4

    lr = summary['lr_choice']['chosen']
    assert [c['lr'] for c in summary['lr_choice']['candidates']] == [3e-4, 1e-3] and lr in (3e-4, 1e-3)
    for r in runs:
        assert {'arm', 'seed', 'tokens', 'steps', 'lr', 'val_loss', 'val_loss_ood', 'fraction', 'wall_s', 'command'} <= r.keys()
        assert finite(r['val_loss']) and finite(r['val_loss_ood']) and r['wall_s'] > 0, r
        assert r['tokens'] == r['steps'] * r['batch_tokens']
        if not r['arm'].startswith('scratch'):  # fine-tunes: the chosen lr, the same steps at every fraction
            assert r['lr'] == lr and r['steps'] == 5 and r['tokens'] == round(r['fraction'] * T), r
            assert f'--seed={r["seed"]}' in r['command']
        if r['arm'] in FEATURE_MAPS:  # each seed draws its own P
            assert f'--feature_seed={r["seed"]}' in r['command'] and f'--feature_map={r["arm"]}' in r['command']
        # the transfer: T/160 = 64 tokens, one step of a fine-tune's batch at T/16 (4 x 32)
        assert r['transfer_tokens'] == (128 if r['arm'] == 'transfer' else 0)
    assert next(r for r in runs if r['arm'] == 'scratch_t')['tokens'] == T

    # each transfer arm's fine-tune starts from its seed's transfer.py model, once that is written
    teacher_stage, rest = smoke['outputs']
    out = smoke['tmp'] / 'out'
    for seed in (1, 2, 3):
        transfer = json.loads((out / f'transfer-s{seed}-lr0.001' / 'run.json').read_text())['command']
        assert transfer[1].endswith('transfer.py') and '--transfer_tokens=128' in transfer
        assert f'--seed={seed}' in transfer and f'--feature_seed={seed}' in transfer and '--feature_map=qmc' in transfer
        finetune = next(r for r in runs if r['arm'] == 'transfer' and r['seed'] == seed)['command']
        assert f"--init_from={out / f'transfer-s{seed}-lr0.001'}" in finetune
        assert rest.index(f'done transfer-s{seed}-lr0.001 in') < rest.index(f'start transfer-t16-s{seed}-lr0.001:')
    # the transfer moved the linearized model: before any fine-tuning it is not qmc's seed 1 any more
    first_val = lambda name: json.loads((out / name / 'log.jsonl').read_text().splitlines()[0])['val_loss']  # noqa: E731
    assert first_val('transfer-t16-s1-lr0.001') != first_val(f'qmc-t16-s1-lr{lr:g}')

    verdict = summary['verdict']
    assert verdict['outcome'] == 'meaningless' and verdict['rules_give'] in ('reproduced', 'partial', 'not reproduced')
    assert len(verdict['gaps']) == 3 and verdict['teacher_val_loss'] == teacher['val_loss'] and verdict['missing_runs'] == []
    assert len(summary['orderings']) == 2 * 10  # every pair of the 5 arms at T/16, on both val splits
    assert {o['metric'] for o in summary['orderings']} == {'val_loss', 'val_loss_ood'}
    assert {'gpu', 'torch', 'date'} <= summary['machine'].keys() and summary['commands']
    assert set(summary['stage_wall_s']) == {'teacher', 'scratch', 'lr', 'arms', 'controls', 'recovery'}
    assert (smoke['tmp'] / 'report' / 'miniature.png').stat().st_size > 10_000

    assert 'start teacher:' in teacher_stage and 'start scratch_t:' not in teacher_stage
    assert '1 of 1 runs already finished: skipped' in rest and 'start teacher:' not in rest
    assert '1 of 18 runs already finished: skipped' in rest  # the arms: qmc seed 1 is the lr stage's
    assert 'start scratch_t:' in rest
    assert '| run | fraction of T | seeds | val_loss | val_loss_ood | steps | tokens |' in rest
    assert '| transfer | 1/16 | 3 |' in rest and '| 5 | 640 + 128 |' in rest
    assert (f"\nverdict: meaningless\n  a smoke run: toy models trained for a few steps say nothing of the claim "
            f"(its rules give '{verdict['rules_give']}')\n") in rest


def test_finished_runs_are_skipped(smoke, capsys):
    status, output, _ = run_script(capsys, 'experiments/miniature.py', *smoke['common'][2:], '--stage=arms')
    assert status == 0
    assert '18 of 18 runs already finished: skipped' in output and 'start ' not in output


def test_a_changed_setting_trains_its_runs_again_and_the_report_names_them(smoke, capsys):
    """The transfer's lr changed: the transfers and the fine-tunes from them are not the runs on disk.
    The report says which runs are missing, and which stage trains them; the verdict stands on the others."""
    status, output, _ = run_script(capsys, 'experiments/miniature.py', *smoke['common'][2:], '--stage=report',
                                   '--transfer_lr=0.002', f"--json_path={smoke['tmp'] / 'changed.json'}")
    assert status == 0
    assert ('\n  not finished: ' + ', '.join(f'transfer-t16-s{seed}-lr0.001 (--stage=arms)' for seed in (1, 2, 3)) + '\n'
            in output)
    assert '| transfer | 1/16 | 3 | not finished | not finished | 5 | 640 + 128 |' in output
    verdict = json.loads((smoke['tmp'] / 'changed.json').read_text())['verdict']
    assert verdict['outcome'] == 'meaningless' and [run['name'] for run in verdict['missing_runs']] == [
        f'transfer-t16-s{seed}-lr0.001' for seed in (1, 2, 3)]


def test_a_report_with_runs_missing_names_them(capsys):
    """A report whose verdict runs have not all finished says which, and which stage trains them."""
    miniature = load_miniature()
    teacher = dict(tokens=1000, steps=10, val_loss=1.5, val_loss_ood=1.75,
                   at_t16=dict(step=1, tokens=100, val_loss=None, val_loss_ood=None))
    run = dict(arm='qmc', fraction=1 / 16, tokens=64, steps=5, transfer_tokens=0)
    summary = dict(teacher=teacher, lr_choice=dict(chosen=1e-3), orderings=[],
                   runs=[dict(run, seed=1, val_loss=2.0, val_loss_ood=2.5), dict(run, seed=2, val_loss=None, val_loss_ood=None)],
                   verdict=dict(outcome='incomplete', missing_runs=[dict(name='qmc-t16-s2-lr0.001', stage='arms'),
                                                                    dict(name='scratch_t', stage='scratch')]))
    miniature.print_table(summary)
    assert capsys.readouterr().out.splitlines()[-7:] == [
        '| teacher | 1 | 1 | 1.5000 | 1.7500 | 10 | 1,000 |',
        '| teacher at T/16 (mid-schedule) | 1/16 | 1 | not finished | not finished | 1 | 100 |',
        '| qmc | 1/16 | 2 | 2.0000 | 2.5000 | 5 | 64 |',
        '',
        'verdict: incomplete',
        '  not finished: qmc-t16-s2-lr0.001 (--stage=arms), scratch_t (--stage=scratch)',
        '  no ordering of the arms is claimed']


def test_verdict_rules():
    miniature = load_miniature()
    runs = lambda values, steps=600: [dict(seed=s, val_loss=v, steps=steps) for s, v in enumerate(values, 1)]  # noqa: E731
    assert miniature.verdict(1.0, runs([1.03, 1.04, 1.05]), 1.10, 500)['outcome'] == 'reproduced'
    assert miniature.verdict(1.0, runs([1.03, 1.04, 1.05]), 1.02, 500)['outcome'] == 'partial'  # worse than scratch_t
    assert miniature.verdict(1.0, runs([1.2, 1.3, 1.16]), 1.10, 500)['outcome'] == 'not reproduced'
    assert miniature.verdict(1.0, runs([1.2, 1.3, 1.16], steps=400), 1.10, 500)['outcome'] == 'partial'  # too few steps
    assert miniature.verdict(1.0, runs([1.2, 1.1, 1.3]), 1.10, 500)['outcome'] == 'partial'  # one seed within 0.15

    arms = dict(a=runs([1.00, 1.01, 1.02]), b=runs([1.10, 1.12, 1.09]), c=runs([1.00, 1.05, 0.98]))
    pairs = {(o['a'], o['b']): o for o in miniature.orderings(arms, 'val_loss')}
    assert pairs.keys() == {('a', 'b'), ('a', 'c'), ('b', 'c')}
    assert pairs['a', 'b']['claimed'] and pairs['a', 'b']['lower'] == 'a'
    assert not pairs['a', 'c']['claimed'] and not pairs['a', 'c']['same_sign_every_seed']  # a mixed sign
    assert pairs['b', 'c']['claimed'] and pairs['b', 'c']['lower'] == 'c'


@pytest.mark.skipif(torch.cuda.is_available(), reason='the refusal is for a machine without a CUDA GPU')
def test_without_a_gpu_it_refuses_with_the_time_it_would_take(smoke, capsys):
    """At the experiment's scale (here a tiny one, to keep the test short) a CPU gets one line: the
    tokens planned, the speed of one timed step, the hours that makes; nothing is written."""
    refused = smoke['tmp'] / 'refused'
    args = ['--model=tiny', '--block_size=32', '--teacher_batch=16', f"--data_dir={smoke['tmp'] / 'data'}", f'--out_dir={refused}']
    status, stdout, stderr = run_script(capsys, 'experiments/miniature.py', *args)
    assert status == 1 and not refused.exists()
    assert stdout == "no CUDA GPU: timing a training step of the tiny teacher on this CPU\n"
    match = re.fullmatch(r"error: no CUDA GPU: the experiment trains ([\d,]+) tokens, and this CPU \(\d+ cores\) trains "
                         r"the tiny teacher at ([\d,]+) tokens/s \(one step timed\), so it would take at least ([\d,.]+) "
                         r"hours here \([\d,.]+ days\): run it on a GPU, or test the pipeline at toy scale with python "
                         r"experiments/miniature.py config/miniature_smoke.py\n", stderr)
    assert match, stderr
    tokens, speed, hours = (float(group.replace(',', '')) for group in match.groups())
    miniature = load_miniature()
    vars(miniature).update(model='tiny', block_size=32, teacher_batch=16, data_dir=str(smoke['tmp'] / 'data'))
    plan = miniature.Plan(miniature.train_windows())
    assert tokens == sum(run.tokens for runs in plan.new_runs(1e-3).values() for run in runs)
    assert hours == pytest.approx(tokens / speed / 3600, abs=0.06, rel=1e-3)


@pytest.mark.parametrize('signum', [signal.SIGINT, signal.SIGTERM], ids=['ctrl-c', 'sigterm'])
def test_a_stop_is_one_line_and_stops_the_runs(smoke, tmp_path, signum):
    """Ctrl-C (SIGINT to the terminal's process group) or a SIGTERM to miniature.py alone: one line,
    its exit status, and the run it had started stopped too (its own line in its train.out)."""
    out = tmp_path / 'out'
    command = [*smoke['common'][:3], f"--data_dir={smoke['tmp'] / 'data'}", f'--out_dir={out}', '--stage=teacher',
               '--preload=False']
    process = subprocess.Popen(command, env=smoke['env'], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    for line in process.stdout:
        if line.startswith('start teacher:'):
            break
    time.sleep(1)
    if signum == signal.SIGINT:
        os.killpg(process.pid, signal.SIGINT)
    else:
        process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    word = 'interrupted' if signum == signal.SIGINT else 'terminated'
    assert process.returncode == 128 + signum and stderr == (
        f"error: {word}; {out}/ keeps every finished run, and a run stopped after a checkpoint resumes from it: "
        "run the same command again\n")
    lines = (out / 'teacher' / 'train.out').read_text().strip().splitlines()
    assert lines[-1].startswith('error: '), lines  # train.py's own one line: it stopped
    assert 'Traceback' not in stdout + ''.join(lines)


def test_the_identity_runs_give_the_fused_kernels_bf16(monkeypatch):
    """The fused kernels take the identity map with bf16 inputs only. train.py on a GPU computes in
    bfloat16 autocast (dtype='auto', every run's setting here): under it the q, k, v that reach the
    attention, where it picks its path, are bf16, so the recovery stage's identity runs are fused."""
    from dijiang import GPT, DiJiangAttention, GPTConfig
    miniature = load_miniature()
    assert miniature.dtype == 'auto'
    vars(miniature).update(out_dir='out', data_dir='data', model='tiny', block_size=32, finetune_batch=4, micro_batch=4)
    for run in miniature.Plan(train_windows=2560).stage('recovery', lr=1e-3):
        assert '--dtype=auto' in run.args and ('--feature_map=identity' in run.args) == (run.arm == 'identity')
    seen = []
    monkeypatch.setattr(DiJiangAttention, 'uses_triton', lambda self, q: seen.append(q.dtype) or False)
    gpt = GPT(GPTConfig.named('tiny', feature_map='identity', block_size=32, vocab_size=256))
    x = torch.zeros(2, 32, dtype=torch.long)
    with torch.autocast('cpu', dtype=torch.bfloat16):  # train.py's autocast, on the CPU here
        gpt(x, x)[1].backward()
    assert seen == [torch.bfloat16] * 2  # both layers
