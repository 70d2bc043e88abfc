"""
The paper's central claim, tested in miniature: a pretrained softmax model, linearized to DiJiang
and fine-tuned on 1/16 of its pretraining tokens (T/16), comes back close to the original.

    python experiments/miniature.py                  # every stage: an estimated 8-15 minutes on one H100/H200
    python experiments/miniature.py --stage=teacher  # one stage; in order: teacher, lr, arms, controls, recovery, report
    python experiments/miniature.py --smoke=True     # the whole pipeline, tiny (block 32, 5-step fine-tunes), on a CPU
    python experiments/miniature.py --help           # every setting

Every run is a train.py process writing out_dir/<run name>/ (checkpoint, log.jsonl, train.out and
run.json: its command and wall time); --parallel of them share the one GPU, since a 70M model leaves
most of it idle. A run whose final val is in its log is skipped, and a run stopped after a checkpoint
resumes from it, so a stage that was interrupted picks up where it stopped. No result depends on how
the parallel runs interleave: each has its own seed, data order and val windows.

Data: python data/prepare.py --corpus=packages --corpus_mb=160, run on first use: byte-level, the .py
files of the installed packages, whole files to the val split, and one held-out package as val_ood.

Stages, and what each trains (fractions are of T, the teacher's tokens):
  teacher   teacher: pythia-70m shape, softmax, block 1024, one pass over the train split (T tokens),
            evaluated every T/16, so that its val after T/16 tokens is a control too (mid-schedule: its
            lr has not decayed yet).
  scratch   DiJiang (qmc) from scratch: scratch_t on the teacher's schedule (T tokens), scratch_t16 on
            T/16 tokens (the fine-tunes' schedule, the teacher's lr). They need no teacher, so this
            stage can run beside the others, from a second `--stage=scratch` process, which shortens
            the whole by the length of scratch_t.
  lr        the linearized teacher (qmc, seed 1) fine-tuned at T/16 with each lr in `lrs`; the lower
            final val_loss picks the lr of every fine-tune after it (both are recorded).
  arms      at T/16, seeds 1-3, each seed passing --seed=s --feature_seed=s (so P and the gate both vary):
            the feature maps qmc, mc, performer and identity; and transfer: qmc after an attention
            transfer of T/160 tokens (train.py --transfer_tokens), then the same fine-tune.
  controls  teacher_continued: the softmax teacher trained T/16 more tokens on the fine-tunes' schedule.
  recovery  qmc and identity (seed 1) at T/64 and T/4; T/16 comes from the arms.
  report    experiments/miniature.json and .png, a markdown table and the verdict.

Every fine-tune: init_from the teacher, the same number of optimizer steps at every fraction (about
600: its batch scales with its tokens, 16 x 1024 at T/16; the lr does not), warmup over 5% of them,
cosine to 0. Every run's val is taken over the same 320 windows of 1024 tokens of each split (val,
val_ood). The lr is chosen on the val split it is then reported on: with two candidates, a small bias.

Budget (printed at the start, per stage): the teacher 157M tokens, scratch 167M, lr 20M, arms 150M,
controls 10M, recovery 83M: about 590M tokens. On one H200, the stages in order beside a second
process for `--stage=scratch` (as `python experiments/miniature.py --parallel=5` and `python
experiments/miniature.py --stage=scratch` together) take about the times in experiments/miniature.json.

The verdict, decided before any number was seen; on val_loss, nats per byte:
  reproduced      at T/16 the qmc mean over seeds is within 0.05 of the teacher's final val_loss, and
                  no worse than DiJiang from scratch at T (scratch_t);
  not reproduced  the gap (qmc - teacher) is above 0.15 in every seed, at the chosen lr, with at least
                  500 optimizer steps;
  partial         anything between.
An ordering of two arms at T/16 is claimed only where their mean difference exceeds twice the pooled
standard deviation over seeds (sqrt of the mean of the two sample variances) and the per-seed
differences (seed s against seed s) all have one sign; every pair is computed, on both val splits.
"""

import json
import math
import multiprocessing
import os
import platform
import runpy
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the repo root: data.prepare, dijiang
from atomic import atomic_write, atomic_write_text  # noqa: E402
from configurator import parse_settings, settings_help  # noqa: E402
from shards import Shards  # noqa: E402

# -----------------------------------------------------------------------------
# settings: each can be overridden as --name=value
stage = 'all'  # 'teacher', 'scratch', 'lr', 'arms', 'controls', 'recovery', 'report', or 'all' of them in order
out_dir = ''  # '' means out-miniature (out-miniature-smoke with --smoke=True): run r writes out_dir/r/
data_dir = ''  # '' means data/packages-bytes (data/packages-bytes-smoke); built on first use by data/prepare.py
corpus_mb = 0.0  # size of the packages corpus to build, MB of text; 0 means 160 (1 with --smoke=True)
json_path = ''  # the report; '' means experiments/miniature.json (out_dir/miniature.json with --smoke=True); its plot beside it as .png
parallel = 4  # train.py processes at once on the one GPU
lrs = (3e-4, 1e-3)  # the fine-tune lrs tried on qmc seed 1 (stage lr); the better one serves every fine-tune
teacher_lr = 1e-3  # the teacher's, and the from-scratch runs'
transfer_lr = 1e-3  # the attention transfer's peak lr
tokens_per_s = 1.5e6  # assumed total training throughput of the GPU over the parallel runs: only for the time estimates printed
smoke = False  # shrink everything (tiny model, block 32, a few steps per run) so the pipeline runs on a CPU
preload = False  # start each train.py as a fork of this process, torch already imported: 3-6 s less per run on a
                 # CPU (--smoke=True turns it on); off, each run is a fresh `python train.py ...`, as the GPU runs are
# -----------------------------------------------------------------------------
SETTINGS = {name: value for name, value in globals().items()
            if not name.startswith('_') and isinstance(value, (bool, int, float, str, tuple))}

# The scale. Batches are in sequences of block_size tokens: the teacher's, and a fine-tune's at T/16
# (it scales with the fraction, so every fine-tune takes the same number of steps). Val: eval_windows
# windows of each split, the same for every run. teacher_steps caps the teacher (None: one epoch).
FULL = dict(model='pythia-70m', block_size=1024, teacher_batch=64, finetune_batch=16, micro_batch=16,
            eval_windows=320, min_steps=500, teacher_steps=None)
SMOKE = dict(model='tiny', block_size=32, teacher_batch=16, finetune_batch=4, micro_batch=4,
             eval_windows=8, min_steps=1, teacher_steps=20)
FEATURE_MAPS = ('qmc', 'mc', 'performer', 'identity')
SEEDS = (1, 2, 3)
T16, RECOVERY_FRACTIONS, TRANSFER_FRACTION = 1 / 16, (1 / 64, 1 / 4), 1 / 160
STAGES = ('teacher', 'scratch', 'lr', 'arms', 'controls', 'recovery', 'report')
COLORS = dict(qmc='C0', mc='C1', performer='C2', identity='C3', transfer='C4', teacher_continued='C5',
              scratch_t16='C7', scratch_t='C7')
STARTUP_S = 15  # a train.py process's start on a GPU (imports, CUDA, first kernels), for the estimates
# the verdict's thresholds, nats per byte
CLOSE, FAR = 0.05, 0.15


@dataclass
class Run:
    name: str
    arm: str
    seed: int
    fraction: float  # of T: the tokens this run trains on (a linearized arm: its fine-tune's)
    steps: int
    batch: int  # sequences per step
    lr: float
    tokens: int
    args: list = field(repr=False)  # train.py's settings
    transfer_tokens: int = 0

    @property
    def dir(self):
        return os.path.join(out_dir, self.name)

    def command(self):
        return [sys.executable, os.path.join(ROOT, 'train.py'), *self.args]

# -----------------------------------------------------------------------------
# The plan: every run of every stage, from T and the chosen lr


class Plan:

    def __init__(self, scale, train_windows):
        self.scale = scale
        self.teacher_steps = train_windows // scale['teacher_batch']
        if scale['teacher_steps']:
            self.teacher_steps = min(self.teacher_steps, scale['teacher_steps'])
        self.T = self.teacher_steps * scale['teacher_batch'] * scale['block_size']
        # every fine-tune (and run at a fraction of T below 1) takes this many steps
        self.finetune_steps = self.T // (16 * scale['finetune_batch'] * scale['block_size'])
        if self.finetune_steps < 1:
            raise SystemExit(f"error: {data_dir} holds too little train data for a fine-tune of T/64 tokens: "
                             f"T = {self.T} tokens; build more data (--corpus_mb)")

    def run(self, name, arm, seed, fraction, lr, *args, steps=None, batch=None, warmup=None, eval_interval=None,
            transfer_tokens=0):
        s = self.scale
        batch = batch or round(s['finetune_batch'] * fraction * 16)
        steps = steps or self.finetune_steps
        micro = min(s['micro_batch'], batch)
        settings = dict(out_dir=os.path.join(out_dir, name), data_dir=data_dir, block_size=s['block_size'],
                        batch_size=batch * s['block_size'], micro_batch_size=micro, eval_iters=s['eval_windows'] // micro,
                        max_iters=steps, warmup=warmup or max(1, steps // 20), lr=lr, seed=seed, feature_seed=seed,
                        eval_interval=eval_interval or steps, log_interval=max(1, steps // 10))
        if transfer_tokens:
            settings.update(transfer_tokens=transfer_tokens, transfer_lr=transfer_lr)
        return Run(name, arm, seed, fraction, steps, batch, lr, steps * batch * s['block_size'],
                   [f'--{k}={v}' for k, v in settings.items()] + list(args), transfer_tokens)

    def teacher(self):
        s = self.scale
        return self.run('teacher', 'teacher', 1, 1.0, teacher_lr, f"--model={s['model']}", '--attention=softmax',
                        steps=self.teacher_steps, batch=s['teacher_batch'], warmup=max(1, self.teacher_steps // 50),
                        eval_interval=max(1, self.teacher_steps // 16))  # an eval at T/16: a control

    def scratch(self, fraction):
        """DiJiang (qmc) from scratch: on T tokens as the teacher, or on a fraction as the fine-tunes."""
        name = 'scratch_t' if fraction == 1 else f'scratch_t{round(1 / fraction)}'
        args = [f"--model={self.scale['model']}", '--attention=dijiang', '--feature_map=qmc']
        if fraction == 1:
            teacher = self.teacher()
            return self.run(name, name, 1, 1.0, teacher_lr, *args, steps=teacher.steps, batch=teacher.batch,
                            warmup=max(1, teacher.steps // 50), eval_interval=max(1, teacher.steps // 16))
        return self.run(f'{name}-s1', name, 1, fraction, teacher_lr, *args)

    def finetune(self, arm, seed, fraction, lr):
        """The teacher linearized with feature map `arm` (transfer: qmc after an attention transfer), or
        continued as softmax (teacher_continued), and trained on fraction * T tokens at lr."""
        name = f'{arm}-t{round(1 / fraction)}-s{seed}-lr{lr:g}'
        source = f"--init_from={os.path.join(out_dir, 'teacher')}"
        if arm == 'teacher_continued':
            return self.run(name, arm, seed, fraction, lr, source, '--attention=softmax')
        feature_map = 'qmc' if arm == 'transfer' else arm
        transfer_tokens = round(TRANSFER_FRACTION * self.T) if arm == 'transfer' else 0
        return self.run(name, arm, seed, fraction, lr, source, '--attention=dijiang', f'--feature_map={feature_map}',
                        transfer_tokens=transfer_tokens)

    def stage(self, name, lr=None):
        """The runs of one stage; lr is the chosen fine-tune lr (the stages after 'lr')."""
        if name == 'teacher':
            return [self.teacher()]
        if name == 'scratch':
            return [self.scratch(1.0), self.scratch(T16)]
        if name == 'lr':
            return [self.finetune('qmc', 1, T16, candidate) for candidate in lrs]
        if name == 'arms':
            return [self.finetune(arm, seed, T16, lr) for arm in (*FEATURE_MAPS, 'transfer') for seed in SEEDS]
        if name == 'controls':
            return [self.finetune('teacher_continued', 1, T16, lr)]
        if name == 'recovery':
            return [self.finetune(arm, 1, fraction, lr) for arm in ('qmc', 'identity') for fraction in RECOVERY_FRACTIONS]
        return []

    def new_runs(self, lr):
        """Each stage's runs that no earlier stage trains (arms reuse lr's qmc seed 1): what each
        stage costs."""
        seen, stages = set(), {}
        for name in STAGES[:-1]:
            stages[name] = [run for run in self.stage(name, lr) if run.name not in seen]
            seen.update(run.name for run in stages[name])
        return stages

# -----------------------------------------------------------------------------
# Running train.py processes


def read_log(run):
    path = os.path.join(run.dir, 'log.jsonl')
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f]


def val_row(run, step):
    """The log row of run's eval at step, or None."""
    return next((row for row in read_log(run) if row['step'] == step and 'val_loss' in row), None)


def finished(run):
    return val_row(run, run.steps) is not None


def run_info(run):
    return read_json(os.path.join(run.dir, 'run.json'))


def launch(run, threads):
    """Start run's train.py; a run stopped after a checkpoint, with the same command, resumes from it.
    Returns a handle with poll() and returncode, as subprocess.Popen's."""
    os.makedirs(run.dir, exist_ok=True)
    command = run.command()
    resume = os.path.isfile(os.path.join(run.dir, 'ckpt.pt')) and run_info(run).get('command') == command
    if not resume:
        write_json(os.path.join(run.dir, 'run.json'), dict(command=command))
    # a run started afresh replaces what an earlier command of another shape left in its folder
    argv = command[:2] + ['--init_from=resume', f'--out_dir={run.dir}'] if resume else command + ['--overwrite=True']
    out_path = os.path.join(run.dir, 'train.out')
    with open(out_path, 'a') as out:
        out.write(f"\n$ {' '.join(argv)}\n")
    if preload:
        return Forked(argv, out_path, threads), resume
    env = {**os.environ, 'OMP_NUM_THREADS': os.environ.get('OMP_NUM_THREADS', str(threads))}
    with open(out_path, 'a') as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env), resume


class Forked:
    """`python train.py ...` run in a fork of this process, which has imported torch already."""

    def __init__(self, argv, out_path, threads):
        import torch._dynamo  # noqa: F401  (train.py's first AdamW imports it: seconds a fork need not spend)
        sys.stdout.flush()  # or the child would write this process's buffered output again
        self.process = multiprocessing.get_context('fork').Process(target=self.main, args=(argv, out_path, threads))
        self.process.start()

    @staticmethod
    def main(argv, out_path, threads):
        out = os.open(out_path, os.O_WRONLY | os.O_APPEND)
        os.dup2(out, 1)
        os.dup2(out, 2)
        import torch
        torch.set_num_threads(threads)
        sys.argv = argv[1:]
        runpy.run_path(argv[1], run_name='__main__')  # a SystemExit's message goes to stderr, as from python

    def poll(self):
        return self.process.exitcode

    @property
    def returncode(self):
        return self.process.exitcode


def execute(runs):
    """Train the runs not finished yet, `parallel` at a time, longest first (so the pool drains
    together); returns how many it trained. Stops with one line naming the runs that failed, after
    the others are done."""
    todo = sorted((run for run in runs if not finished(run)), key=lambda run: -run.tokens)
    done = len(runs) - len(todo)
    if done:
        print(f"{done} of {len(runs)} runs already finished: skipped")
    trained = len(todo)
    if todo:  # the report names the machine the runs trained on, wherever it is written
        write_json(os.path.join(out_dir, 'machine.json'), machine())
    threads = max(1, (os.cpu_count() or 1) // parallel)
    active, failed = {}, []
    while todo or active:
        while todo and len(active) < parallel:
            run = todo.pop(0)
            process, resumed = launch(run, threads)
            active[run.name] = (run, process, time.time())
            print(f"start {run.name}: {run.steps} steps, {run.tokens:,} tokens{' (resumed)' if resumed else ''}",
                  flush=True)
        time.sleep(0.2)
        for name, (run, process, t0) in list(active.items()):
            if process.poll() is None:
                continue
            del active[name]
            wall = time.time() - t0
            write_json(os.path.join(run.dir, 'run.json'), dict(run_info(run), wall_s=round(wall, 1),
                                                                returncode=process.returncode))
            row = val_row(run, run.steps)
            if process.returncode or row is None:
                failed.append(run)
                print(f"FAILED {name} after {wall:.0f} s: {last_line(run)}", flush=True)
            else:
                ood = f", val_ood {row['val_loss_ood']:.4f}" if 'val_loss_ood' in row else ''
                print(f"done {name} in {wall:.0f} s: val {row['val_loss']:.4f}{ood}", flush=True)
    if failed:
        raise SystemExit(f"error: {len(failed)} run(s) failed: " + '; '.join(
            f"{run.name} ({os.path.join(run.dir, 'train.out')}: {last_line(run)})" for run in failed))
    return trained


def last_line(run):
    with open(os.path.join(run.dir, 'train.out')) as f:
        lines = [line.strip() for line in f if line.strip()]
    return lines[-1] if lines else 'no output'


def write_json(path, value):
    atomic_write_text(path, json.dumps(value, indent=2) + '\n')

# -----------------------------------------------------------------------------
# Results and the verdict


def result(run):
    """What the report holds of a run: the plan, its final val on both splits, its wall time."""
    row = val_row(run, run.steps) or {}
    info = run_info(run)
    return dict(name=run.name, arm=run.arm, seed=run.seed, fraction=run.fraction, tokens=run.tokens, steps=run.steps,
                batch_tokens=run.tokens // run.steps, lr=run.lr,
                transfer_tokens=run.transfer_tokens, val_loss=row.get('val_loss'), val_loss_ood=row.get('val_loss_ood'),
                wall_s=info.get('wall_s'), tokens_per_s=row.get('tokens_per_s'), command=' '.join(['python train.py', *run.args]))


def choose_lr(plan):
    """The lr of the lower final val_loss of qmc seed 1 at T/16 (the smaller lr on a tie)."""
    runs = plan.stage('lr')
    missing = [run.name for run in runs if not finished(run)]
    if missing:
        raise SystemExit(f"error: the lr stage has not finished ({', '.join(missing)}): run --stage=lr first")
    candidates = [dict(lr=run.lr, val_loss=val_row(run, run.steps)['val_loss'],
                       val_loss_ood=val_row(run, run.steps).get('val_loss_ood')) for run in runs]
    chosen = min(candidates, key=lambda c: (c['val_loss'], c['lr']))['lr']
    return dict(candidates=candidates, chosen=chosen,
                rule='the lower final val_loss of qmc, seed 1, at T/16; kept for every fine-tune')


def mean_std(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def verdict(teacher_val, qmc_runs, scratch_t_val, min_steps):
    """The rules of the docstring, applied to the qmc runs at T/16 (one per seed)."""
    gaps = [run['val_loss'] - teacher_val for run in qmc_runs]
    qmc_mean = statistics.mean(run['val_loss'] for run in qmc_runs)
    long_enough = all(run['steps'] >= min_steps for run in qmc_runs)
    if qmc_mean - teacher_val <= CLOSE and qmc_mean <= scratch_t_val:
        outcome = 'reproduced'
    elif all(gap > FAR for gap in gaps) and long_enough:
        outcome = 'not reproduced'
    else:
        outcome = 'partial'
    return dict(outcome=outcome, teacher_val_loss=teacher_val, qmc_mean_val_loss=qmc_mean,
                gap_mean=qmc_mean - teacher_val, gaps=gaps, scratch_t_val_loss=scratch_t_val,
                qmc_no_worse_than_scratch_t=qmc_mean <= scratch_t_val, min_steps=min_steps,
                steps=[run['steps'] for run in qmc_runs],
                rules=[f"reproduced: mean over seeds of qmc val_loss at T/16 - teacher val_loss <= {CLOSE}, and qmc mean "
                       "<= scratch_t val_loss",
                       f"not reproduced: qmc - teacher > {FAR} in every seed, at the chosen lr, with >= {min_steps} steps",
                       "partial: anything between"])


def orderings(runs_by_arm, metric):
    """Every pair of arms with runs at every seed: claimed where |mean difference| > 2 x the pooled
    standard deviation over seeds and the per-seed differences all have one sign."""
    pairs = []
    arms = list(runs_by_arm)
    for i, a in enumerate(arms):
        for b in arms[i + 1:]:
            va = {run['seed']: run[metric] for run in runs_by_arm[a]}
            vb = {run['seed']: run[metric] for run in runs_by_arm[b]}
            seeds = sorted(set(va) & set(vb))
            if len(seeds) < 2 or any(va[s] is None or vb[s] is None for s in seeds):
                continue
            (mean_a, sd_a), (mean_b, sd_b) = mean_std([va[s] for s in seeds]), mean_std([vb[s] for s in seeds])
            pooled = math.sqrt((sd_a ** 2 + sd_b ** 2) / 2)
            differences = [va[s] - vb[s] for s in seeds]
            same_sign = all(d > 0 for d in differences) or all(d < 0 for d in differences)
            claimed = abs(mean_a - mean_b) > 2 * pooled and same_sign
            pairs.append(dict(metric=metric, a=a, b=b, mean_a=mean_a, mean_b=mean_b, difference=mean_a - mean_b,
                              pooled_std=pooled, same_sign_every_seed=same_sign, claimed=claimed,
                              lower=(a if mean_a < mean_b else b) if claimed else None))
    return pairs


def machine():
    import torch
    try:
        commit = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = None
    return dict(gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none (CPU)',
                torch=torch.__version__, python=platform.python_version(), cpus=os.cpu_count(), git_commit=commit,
                date=time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime()))


def fmt(values):
    values = [v for v in values if v is not None]
    if not values:
        return 'n/a'
    mean, sd = mean_std(values)
    return f"{mean:.4f} ± {sd:.4f}" if len(values) > 1 else f"{mean:.4f}"


def report(plan, stage_walls):
    lr_choice = choose_lr(plan)
    lr = lr_choice['chosen']
    teacher_run = plan.teacher()
    runs = list({run.name: run for name in ('scratch', 'arms', 'controls', 'recovery') for run in plan.stage(name, lr)}.values())
    missing = [run.name for run in [teacher_run, *runs] if not finished(run)]
    t16_step = max(1, plan.teacher_steps // 16)  # the teacher's eval_interval
    at_t16 = val_row(teacher_run, t16_step) or {}
    teacher = dict(result(teacher_run), at_t16=dict(step=t16_step, tokens=t16_step * teacher_run.tokens // teacher_run.steps,
                                                     val_loss=at_t16.get('val_loss'), val_loss_ood=at_t16.get('val_loss_ood'),
                                                     note="the teacher's eval after ~T/16 tokens, mid-schedule (lr not decayed)"))
    results = [result(run) for run in runs]
    by_arm = {}
    for r in results:
        if r['fraction'] == T16 and r['arm'] in (*FEATURE_MAPS, 'transfer') and r['val_loss'] is not None:
            by_arm.setdefault(r['arm'], []).append(r)
    scratch_t = next(r for r in results if r['arm'] == 'scratch_t')
    # the verdict rests on the teacher, the qmc arm and scratch_t alone; other missing runs are listed
    needed = [teacher_run.name, plan.scratch(1.0).name] + [plan.finetune('qmc', seed, T16, lr).name for seed in SEEDS]
    if set(needed) & set(missing):
        outcome = dict(outcome='incomplete')
    else:
        outcome = verdict(teacher['val_loss'], by_arm['qmc'], scratch_t['val_loss'], plan.scale['min_steps'])
    outcome['missing_runs'] = missing
    summary = dict(
        claim="a softmax model linearized to DiJiang and fine-tuned on T/16 tokens comes back close to the original",
        teacher=teacher, runs=results, lr_choice=lr_choice, verdict=outcome,
        orderings=orderings(by_arm, 'val_loss') + orderings(by_arm, 'val_loss_ood'),
        planned_tokens={name: sum(run.tokens + run.transfer_tokens for run in runs) for name, runs in plan.new_runs(lr).items()},
        stage_wall_s=stage_walls, machine=read_json(os.path.join(out_dir, 'machine.json')) or machine(), scale=plan.scale, smoke=smoke,
        settings={name: globals()[name] for name in SETTINGS},
        commands=stage_commands())
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    write_json(json_path, summary)
    print(f"\nwrote {json_path}")
    print_table(summary)
    plot_path = os.path.splitext(json_path)[0] + '.png'
    try:
        draw_plot(summary, plot_path)
        print(f"wrote {plot_path}")
    except ImportError:
        print("no plot: matplotlib is not installed")
    return summary


def print_table(summary):
    """A markdown table, one row per arm and fraction: mean ± std over seeds."""
    teacher = summary['teacher']
    print(f"\nval loss in nats per byte; T = {teacher['tokens']:,} tokens; fine-tune lr {summary['lr_choice']['chosen']:g}\n")
    print('| run | fraction of T | seeds | val_loss | val_loss_ood | steps | tokens |')
    print('|---|---|---|---|---|---|---|')
    print(f"| teacher | 1 | 1 | {fmt([teacher['val_loss']])} | {fmt([teacher['val_loss_ood']])} | {teacher['steps']} | "
          f"{teacher['tokens']:,} |")
    t16 = teacher['at_t16']
    print(f"| teacher at T/16 (mid-schedule) | 1/16 | 1 | {fmt([t16['val_loss']])} | {fmt([t16['val_loss_ood']])} | "
          f"{t16['step']} | {t16['tokens']:,} |")
    groups = {}
    for r in summary['runs']:
        groups.setdefault((r['arm'], r['fraction']), []).append(r)
    for (arm, fraction), rs in groups.items():
        label = f"1/{round(1 / fraction)}" if fraction < 1 else '1'
        print(f"| {arm} | {label} | {len(rs)} | {fmt([r['val_loss'] for r in rs])} | "
              f"{fmt([r['val_loss_ood'] for r in rs])} | {rs[0]['steps']} | {rs[0]['tokens']:,} |")
    v = summary['verdict']
    print(f"\nverdict: {v['outcome']}")
    if v['outcome'] != 'incomplete':
        print(f"  qmc at T/16: {v['qmc_mean_val_loss']:.4f} (gap to the teacher {v['gap_mean']:+.4f}; per seed "
              f"{', '.join(f'{g:+.4f}' for g in v['gaps'])}); scratch_t {v['scratch_t_val_loss']:.4f}")
    else:
        print(f"  missing runs: {', '.join(v['missing'])}")
    for o in summary['orderings']:
        if o['claimed']:
            other = o['b'] if o['lower'] == o['a'] else o['a']
            print(f"  ordering ({o['metric']}): {o['lower']} < {other} by {abs(o['difference']):.4f} "
                  f"(pooled std {o['pooled_std']:.4f})")
    if not any(o['claimed'] for o in summary['orderings']):
        print("  no ordering of the arms is claimed")


def draw_plot(summary, path):
    """Val loss against training tokens, one panel per val split."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    teacher, runs = summary['teacher'], summary['runs']
    metrics = [m for m in ('val_loss', 'val_loss_ood') if teacher[m] is not None]
    if not metrics:
        print("no plot: the teacher has not finished")
        return
    fig, axes = plt.subplots(1, len(metrics), figsize=(6.5 * len(metrics), 4.8), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        ax.axhline(teacher[metric], color='black', lw=1, label=f"teacher (softmax, T = {teacher['tokens']:,} tokens)")
        if teacher['at_t16'][metric] is not None:
            ax.plot(teacher['at_t16']['tokens'], teacher['at_t16'][metric], 'k+', ms=10, label='teacher after T/16 (mid-schedule)')
        for arm in ('qmc', 'identity'):
            curve = sorted((r['tokens'], r[metric]) for r in runs if r['arm'] == arm and r['seed'] == 1 and r[metric] is not None)
            if curve:
                ax.plot(*zip(*curve), '-o', color=COLORS[arm], label=f'{arm}: linearized + fine-tuned, seed 1')
        for k, arm in enumerate((*FEATURE_MAPS, 'transfer')):
            values = [r[metric] for r in runs if r['arm'] == arm and r['fraction'] == T16 and r[metric] is not None]
            if values:
                tokens = next(r['tokens'] for r in runs if r['arm'] == arm and r['fraction'] == T16)
                mean, sd = mean_std(values)
                ax.errorbar(tokens * 1.06 ** (k + 1), mean, yerr=sd, fmt='s', ms=4, capsize=3, color=COLORS[arm],
                            label=f'{arm} at T/16, mean ± std over {len(values)} seeds')
        for arm, marker in (('scratch_t16', 'v'), ('scratch_t', '^'), ('teacher_continued', 'D')):
            points = [(r['tokens'], r[metric]) for r in runs if r['arm'] == arm and r[metric] is not None]
            if points:
                ax.plot(*zip(*points), marker, color=COLORS[arm], label={'scratch_t16': 'DiJiang from scratch, T/16',
                                                                    'scratch_t': 'DiJiang from scratch, T',
                                                                    'teacher_continued': 'teacher + T/16 more'}[arm])
        ax.set_xscale('log')
        ax.set_xlabel('tokens trained (a linearized model: its fine-tune)')
        ax.set_ylabel(f"{metric} (nats per byte)")
        ax.grid(True, which='both', alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"the paper in miniature: verdict {summary['verdict']['outcome']} ({summary['machine']['gpu']})", fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format='png', dpi=120))
    plt.close(fig)

# -----------------------------------------------------------------------------


def stage_commands():
    given = ' '.join(arg for arg in sys.argv[1:] if not arg.startswith('--stage='))
    prepare = (f"python data/prepare.py --corpus=packages --corpus_mb={corpus_mb:g} --out_dir={data_dir}  "
               "# run by --stage=teacher when missing")
    return [prepare] + [f"python experiments/miniature.py --stage={name} {given}".rstrip() for name in STAGES]


def read_json(path):
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def ensure_data():
    if os.path.isfile(os.path.join(data_dir, 'prepare.json')):
        return
    command = [sys.executable, os.path.join(ROOT, 'data', 'prepare.py'), '--corpus=packages', f'--corpus_mb={corpus_mb:g}',
               f'--out_dir={data_dir}']
    print(f"building the data: {' '.join(command[1:])}", flush=True)
    if subprocess.run(command).returncode:
        raise SystemExit(f"error: data/prepare.py failed building {data_dir} (its message is above)")


def print_budget(plan):
    print(f"T = {plan.T:,} tokens (teacher: {plan.teacher_steps} steps of {plan.scale['teacher_batch']} x "
          f"{plan.scale['block_size']}); every fine-tune {plan.finetune_steps} steps")
    if plan.finetune_steps < plan.scale['min_steps']:
        print(f"warning: fine-tunes of {plan.finetune_steps} steps, fewer than {plan.scale['min_steps']}: the verdict "
              "cannot be 'not reproduced'; build more data (--corpus_mb)")
    print(f"planned, at an assumed {tokens_per_s / 1e6:.1f}M tokens/s over {parallel} parallel runs:")
    total = 0
    for name, runs in plan.new_runs(lrs[-1]).items():  # the tokens do not depend on the lr
        tokens = sum(run.tokens + run.transfer_tokens for run in runs)
        estimate = tokens / tokens_per_s + math.ceil(len(runs) / parallel) * STARTUP_S
        total += estimate
        print(f"  {name:<9} {len(runs):>2} runs, {tokens:>13,} tokens, about {estimate / 60:.1f} min")
    print(f"  all        about {total / 60:.1f} min (runs already finished are skipped)", flush=True)


def main():
    if stage not in (*STAGES, 'all'):
        raise SystemExit(f"error: stage={stage!r}: choose one of {', '.join(STAGES)} or all")
    if parallel < 1 or not lrs:
        raise SystemExit(f"error: parallel={parallel}, lrs={lrs}: need parallel >= 1 and at least one lr")
    scale = SMOKE if smoke else FULL
    # the report needs only what the runs saved: with the data gone, the plan's size comes from there
    saved_plan = read_json(os.path.join(out_dir, 'plan.json'))
    if stage == 'report' and saved_plan and not os.path.isfile(os.path.join(data_dir, 'prepare.json')):
        train_windows = saved_plan['train_windows']
    else:
        ensure_data()
        try:
            train_windows = Shards(data_dir, 'train', scale['block_size']).num_windows
        except ValueError as e:
            raise SystemExit(f"error: {e}")
        os.makedirs(out_dir, exist_ok=True)
        write_json(os.path.join(out_dir, 'plan.json'), dict(data_dir=data_dir, train_windows=train_windows))
    plan = Plan(scale, train_windows)
    print_budget(plan)
    walls_path = os.path.join(out_dir, 'stages.json')  # each stage's wall time, for the report
    for name in STAGES if stage == 'all' else (stage,):
        if name not in ('teacher', 'scratch') and not finished(plan.teacher()):
            raise SystemExit(f"error: the teacher ({plan.teacher().dir}) has not finished: run --stage=teacher first")
        if name == 'report':
            return report(plan, read_json(walls_path))
        lr = choose_lr(plan)['chosen'] if name not in ('teacher', 'scratch', 'lr') else None
        print(f"\n== stage {name}", flush=True)
        t0 = time.time()
        os.makedirs(out_dir, exist_ok=True)
        if execute(plan.stage(name, lr)):  # a stage whose runs had all finished keeps its wall time
            # re-read: a --stage=scratch process beside this one writes the same file
            write_json(walls_path, {**read_json(walls_path), name: round(time.time() - t0, 1)})


if __name__ == '__main__':
    overrides = parse_settings(sys.argv[1:], SETTINGS, settings_help(__file__))
    globals().update(overrides)
    suffix = '-smoke' if smoke else ''
    out_dir = out_dir or f'out-miniature{suffix}'
    data_dir = data_dir or f'data/packages-bytes{suffix}'
    corpus_mb = corpus_mb or (1.0 if smoke else 160.0)
    json_path = json_path or (os.path.join(out_dir, 'miniature.json') if smoke else os.path.join('experiments', 'miniature.json'))
    preload = overrides.get('preload', smoke)
    main()
