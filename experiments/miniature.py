"""
The paper's central claim, tested in miniature: a pretrained softmax model, linearized to DiJiang
and fine-tuned on 1/16 of its pretraining tokens (T/16), comes back close to the original.

    python experiments/miniature.py                            # every stage, on one GPU (about 20 minutes on an H200)
    python experiments/miniature.py --stage=teacher            # one stage: teacher, scratch, lr, arms, controls, recovery, report
    python experiments/miniature.py config/miniature_smoke.py  # the pipeline at toy scale, on a CPU; its verdict is meaningless
    python experiments/miniature.py --help                     # every setting, and the recipes

Every run is a train.py (or transfer.py) process writing out_dir/<run name>/, with train.out (its
output) and run.json (its command and wall time) beside its files; --parallel of them share the one
GPU, since a 70M model leaves most of it idle. A finished run is skipped and a run stopped after a
checkpoint resumes, so an interrupted stage picks up where it stopped. No result depends on how the
runs interleave: each has its own seed, data order and val windows. On a GPU they compute in bfloat16
autocast (train.py's dtype='auto'), the fused kernels' one input dtype for the identity map. Without a
GPU the experiment is refused, with the time it would take there; the smoke recipe runs anywhere.

Data: data/packages/prepare.py, built on first use: byte-level, the .py files of the installed
packages, whole files to the val split, and one held-out package as val_ood.

Stages, and what each trains (fractions are of T, the teacher's tokens):
  teacher   softmax, pythia-70m shape, block 1024, one pass over the train split (T tokens), evaluated
            every T/16, so that its val after T/16 tokens is a control too (mid-schedule: lr not decayed).
  scratch   DiJiang (qmc) from scratch: scratch_t on the teacher's schedule, scratch_t16 on T/16 tokens
            (the fine-tunes' schedule, the teacher's lr). They need no teacher: a second process
            (`--stage=scratch`) can run them beside the other stages.
  lr        the linearized teacher (qmc, seed 1) fine-tuned at T/16 with each lr in `lrs`; the lower
            final val_loss picks the lr of every fine-tune after it (both are recorded).
  arms      at T/16, seeds 1-3, each seed passing --seed=s --feature_seed=s (so P and the gate both vary):
            the feature maps qmc, mc, performer and identity; and transfer: transfer.py fits the qmc
            layers to the teacher's attention on T/160 tokens, and the same fine-tune starts from there.
  controls  teacher_continued: the softmax teacher trained T/16 more tokens on the fine-tunes' schedule.
  recovery  qmc and identity (seed 1) at T/64 and T/4; T/16 comes from the arms.
  report    json_path and its plot beside it (.png), a markdown table and the verdict.

Every fine-tune: init_from the teacher, the same number of optimizer steps at every fraction (about
600: its batch scales with its tokens, 16 x 1024 at T/16), warmup over 5% of them, cosine to 0. Every
run's val is over the same 320 windows of 1024 tokens of each split (val, val_ood). The lr is chosen
on the val split it is then reported on: with two candidates, a small bias. In all, about 590M tokens
(the budget per stage is printed at the start).

The verdict, decided before any number was seen; on val_loss, nats per byte:
  reproduced      at T/16 the qmc mean over seeds is within 0.05 of the teacher's final val_loss, and
                  no worse than DiJiang from scratch at T (scratch_t);
  not reproduced  the gap (qmc - teacher) is above 0.15 in every seed, at the chosen lr, with at least
                  min_steps optimizer steps;
  partial         anything between;
  meaningless     a smoke run's, whatever the rules give: toy runs say nothing of the claim.
An ordering of two arms at T/16 is claimed only where their mean difference exceeds twice the pooled
standard deviation over seeds (sqrt of the mean of the two sample variances) and the per-seed
differences (seed s against seed s) all have one sign; every pair is computed, on both val splits.
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the repo's modules
import configurator  # noqa: E402
import signals  # noqa: E402

if __name__ == '__main__':  # imported (by the tests), the signals are the importing process's
    signals.stop_on_signals()  # before the heavy imports: Ctrl-C while torch loads is one line too

import json  # noqa: E402
import math  # noqa: E402
import multiprocessing  # noqa: E402
import platform  # noqa: E402
import runpy  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import torch  # noqa: E402

from atomic import atomic_write, atomic_write_text  # noqa: E402
from shards import Shards  # noqa: E402

# -----------------------------------------------------------------------------
# settings: each can be overridden as --name=value, after any recipe files (config/miniature_*.py)
stage = 'all'  # 'teacher', 'scratch', 'lr', 'arms', 'controls', 'recovery', 'report', or 'all' of them in order
out_dir = 'out-miniature'  # run r writes out_dir/r/
data_dir = 'data/packages-bytes'  # built on first use by data/packages/prepare.py
corpus_mb = 160.0  # size of the packages corpus to build, MB of text
json_path = 'experiments/miniature.json'  # the report; its plot beside it as .png
parallel = 4  # runs at once on the one GPU
lrs = (3e-4, 1e-3)  # the fine-tune lrs tried on qmc seed 1 (stage lr); the better one serves every fine-tune
teacher_lr = 1e-3  # the teacher's, and the from-scratch runs'
transfer_lr = 1e-3  # the attention transfer's peak lr
dtype = 'auto'  # every run's: 'auto' (bfloat16 autocast on a GPU, float32 on a CPU), 'bfloat16' or 'float32'
# the scale: batches in sequences of block_size tokens; a fine-tune's scales with its fraction of T
model = 'pythia-70m'  # the teacher's shape, a name in dijiang.CONFIGS
block_size = 1024
teacher_batch = 64  # sequences per step of the teacher (and of scratch_t)
finetune_batch = 16  # sequences per step of a fine-tune at T/16 (and of the attention transfer)
micro_batch = 16  # sequences per forward/backward
eval_windows = 320  # val windows of each split, the same for every run
teacher_steps = 0  # the teacher's steps; 0 means one pass over the train split
min_steps = 500  # fewer fine-tune steps and the verdict cannot be 'not reproduced'
tokens_per_s = 7.5e5  # total throughput over the parallel runs, for the time estimates: one H200's over the experiment
smoke = False  # a test of the pipeline at toy scale (config/miniature_smoke.py): its verdict is 'meaningless'
preload = False  # start each run as a fork of this process, torch already imported: 3-6 s less per run on a CPU
                 # (the smoke recipe turns it on); off, each run is a fresh `python train.py ...`, as on a GPU
# -----------------------------------------------------------------------------
SETTINGS = configurator.settings_block(__file__)[1]
FEATURE_MAPS = ('qmc', 'mc', 'performer', 'identity')
SEEDS = (1, 2, 3)
T16, RECOVERY_FRACTIONS, TRANSFER_FRACTION = 1 / 16, (1 / 64, 1 / 4), 1 / 160
STAGES = ('teacher', 'scratch', 'lr', 'arms', 'controls', 'recovery', 'report')
COLORS = dict(qmc='C0', mc='C1', performer='C2', identity='C3', transfer='C4', teacher_continued='C5',
              scratch_t16='C7', scratch_t='C7')
STARTUP_S = 15  # a run's start on a GPU (imports, CUDA, first kernels), for the estimates
CLOSE, FAR = 0.05, 0.15  # the verdict's thresholds, nats per byte


@dataclass
class Run:
    name: str
    arm: str
    seed: int
    fraction: float  # of T: the tokens this run trains on (a linearized arm: its fine-tune's)
    steps: int
    batch: int  # sequences per step
    lr: float
    args: list = field(repr=False)  # the script's settings
    script: str = 'train.py'  # or 'transfer.py': an attention transfer, which a fine-tune starts from
    transfer: 'Run' = None  # the transfer this fine-tune starts from

    @property
    def tokens(self):
        return self.steps * self.batch * block_size

    @property
    def dir(self):
        return os.path.join(out_dir, self.name)

    def command(self):
        return [sys.executable, os.path.join(ROOT, self.script), *self.args]

# -----------------------------------------------------------------------------
# The plan: every run of every stage, from T and the chosen lr


class Plan:

    def __init__(self, train_windows):
        self.teacher_steps = min(train_windows // teacher_batch, teacher_steps or math.inf)
        self.T = self.teacher_steps * teacher_batch * block_size
        # every fine-tune (and run at a fraction of T below 1) takes this many steps
        self.finetune_steps = self.T // (16 * finetune_batch * block_size)
        configurator.check(self.finetune_steps >= 1, 'data_dir', data_dir, f"it holds too little train data for a "
                           f"fine-tune of T/16 tokens (T = {self.T} tokens): build more (--corpus_mb)")
        # the teacher's schedule, scratch_t's too: an eval at T/16, a control
        self.pretraining = dict(steps=self.teacher_steps, batch=teacher_batch, warmup=max(1, self.teacher_steps // 50),
                                eval_interval=max(1, self.teacher_steps // 16))

    def run(self, name, arm, seed, fraction, lr, *args, steps=0, batch=0, script='train.py', transfer=None, **changes):
        """A run of script with the settings every run shares, then changes and args."""
        batch = batch or round(finetune_batch * fraction * 16)
        steps = steps or self.finetune_steps
        micro = min(micro_batch, batch)
        settings = dict(out_dir=os.path.join(out_dir, name), data_dir=data_dir, block_size=block_size,
                        batch_size=batch * block_size, micro_batch_size=micro, lr=lr, seed=seed, dtype=dtype,
                        log_interval=max(1, steps // 10))
        if script == 'train.py':
            settings.update(eval_iters=eval_windows // micro, max_iters=steps, warmup=max(1, steps // 20),
                            eval_interval=steps)
        settings.update(changes)
        return Run(name, arm, seed, fraction, steps, batch, lr, [f'--{k}={v}' for k, v in settings.items()] + list(args),
                   script, transfer)

    def teacher(self):
        return self.run('teacher', 'teacher', 1, 1.0, teacher_lr, f'--model={model}', '--attention=softmax',
                        **self.pretraining)

    def scratch(self, fraction):
        """DiJiang (qmc) from scratch: on T tokens as the teacher, or on a fraction as the fine-tunes."""
        args = f'--model={model}', '--attention=dijiang', '--feature_map=qmc', '--feature_seed=1'
        if fraction == 1:
            return self.run('scratch_t', 'scratch_t', 1, 1.0, teacher_lr, *args, **self.pretraining)
        name = f'scratch_t{round(1 / fraction)}'
        return self.run(f'{name}-s1', name, 1, fraction, teacher_lr, *args)

    def transfer(self, seed):
        """transfer.py: the teacher linearized (qmc, seed), its DiJiang layers fitted to its attention on
        T/160 tokens, in whole steps of a fine-tune's batch at T/16."""
        steps = max(1, math.ceil(TRANSFER_FRACTION * self.T / (finetune_batch * block_size)))
        return self.run(f'transfer-s{seed}-lr{transfer_lr:g}', 'transfer', seed, TRANSFER_FRACTION, transfer_lr,
                        f"--init_from={os.path.join(out_dir, 'teacher')}", '--feature_map=qmc', f'--feature_seed={seed}',
                        f'--transfer_tokens={steps * finetune_batch * block_size}', steps=steps, batch=finetune_batch,
                        script='transfer.py')

    def finetune(self, arm, seed, fraction, lr):
        """The teacher linearized with feature map `arm` (transfer: qmc, from the attention transfer's
        model), or continued as softmax (teacher_continued), and trained on fraction * T tokens at lr."""
        name = f'{arm}-t{round(1 / fraction)}-s{seed}-lr{lr:g}'
        teacher = f"--init_from={os.path.join(out_dir, 'teacher')}"
        if arm == 'teacher_continued':
            return self.run(name, arm, seed, fraction, lr, teacher, '--attention=softmax')
        if arm == 'transfer':  # its DiJiang layers are the transfer's: it brings its feature map and seed
            transfer = self.transfer(seed)
            return self.run(name, arm, seed, fraction, lr, f'--init_from={transfer.dir}', '--attention=dijiang',
                            transfer=transfer)
        return self.run(name, arm, seed, fraction, lr, teacher, '--attention=dijiang', f'--feature_map={arm}',
                        f'--feature_seed={seed}')

    def stage(self, name, lr=None):
        """The runs of one stage, each after the transfer it starts from; lr is the chosen fine-tune lr."""
        runs = {'teacher': lambda: [self.teacher()],
                'scratch': lambda: [self.scratch(1.0), self.scratch(T16)],
                'lr': lambda: [self.finetune('qmc', 1, T16, candidate) for candidate in lrs],
                'arms': lambda: [self.finetune(arm, seed, T16, lr) for arm in (*FEATURE_MAPS, 'transfer') for seed in SEEDS],
                'controls': lambda: [self.finetune('teacher_continued', 1, T16, lr)],
                'recovery': lambda: [self.finetune(arm, 1, fraction, lr) for arm in ('qmc', 'identity')
                                     for fraction in RECOVERY_FRACTIONS],
                'report': lambda: []}[name]()
        return [run.transfer for run in runs if run.transfer] + runs

    def new_runs(self, lr):
        """Each stage's runs that no earlier stage trains (arms reuse lr's qmc seed 1): what each stage costs."""
        seen, stages = set(), {}
        for name in STAGES[:-1]:
            stages[name] = [run for run in self.stage(name, lr) if run.name not in seen]
            seen.update(run.name for run in stages[name])
        return stages

# -----------------------------------------------------------------------------
# Running the runs


def read_json(path):
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def write_json(path, value):
    atomic_write_text(path, json.dumps(value, indent=2) + '\n')


def val_at(run, step):
    """The log row of a train.py run's eval at step, or None."""
    path = os.path.join(run.dir, 'log.jsonl')
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    return next((row for row in rows if row['step'] == step and 'val_loss' in row), None)


def final_val(run):
    return val_at(run, run.steps)


def same_settings(run):
    """Whether run's folder was last started with run's settings (run.json holds its command), wherever
    out_dir is: its runs' folders are compared by name."""
    def settings(args):
        return [f"--init_from={os.path.basename(arg.partition('=')[2])}" if arg.startswith('--init_from=') else arg
                for arg in args if not arg.startswith('--out_dir=')]
    return settings(read_json(os.path.join(run.dir, 'run.json')).get('command', [])[2:]) == settings(run.args)


def finished(run):
    """A train.py run whose log holds its last eval, or a transfer that wrote its model (at its end),
    with this plan's settings: a changed setting (the transfer's lr, say) trains it again."""
    if run.script == 'transfer.py':
        return os.path.isfile(os.path.join(run.dir, 'ckpt.pt')) and same_settings(run)
    return final_val(run) is not None and same_settings(run)


def launch(run, threads):
    """Start run's script; a train.py run stopped after a checkpoint, with the same settings, resumes
    from it. Returns a handle with poll(), terminate() and wait(), as subprocess.Popen's, and whether
    it resumed."""
    os.makedirs(run.dir, exist_ok=True)
    command = run.command()
    resume = run.script == 'train.py' and os.path.isfile(os.path.join(run.dir, 'ckpt.pt')) and same_settings(run)
    if not resume:
        write_json(os.path.join(run.dir, 'run.json'), dict(command=command))
    # a run started afresh replaces what a stopped run of another command left in its folder
    argv = command[:2] + ['--init_from=resume', f'--out_dir={run.dir}'] if resume else command + ['--overwrite=True']
    argv.append(f'--cpu_threads={threads}')  # how the cores are shared out is not part of the run
    out_path = os.path.join(run.dir, 'train.out')
    with open(out_path, 'a') as out:
        out.write(f"\n$ {' '.join(argv)}\n")
    if preload:
        return Forked(argv, out_path), resume
    with open(out_path, 'a') as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT), resume


class Forked:
    """`python script ...` run in a fork of this process, which has imported torch already."""

    def __init__(self, argv, out_path):
        # imported here once, not in every fork: train.py's modules (transfer.py's are train.py's), and
        # torch._dynamo, which train.py's first AdamW step imports
        import torch._dynamo  # noqa: F401
        import train  # noqa: F401
        sys.stdout.flush()  # or the child would write this process's buffered output again
        self.process = multiprocessing.get_context('fork').Process(target=self.main, args=(argv, out_path))
        self.process.start()

    @staticmethod
    def main(argv, out_path):
        out = os.open(out_path, os.O_WRONLY | os.O_APPEND)
        os.dup2(out, 1)
        os.dup2(out, 2)
        sys.argv = argv[1:]
        runpy.run_path(argv[1], run_name='__main__')

    def poll(self):
        return self.process.exitcode

    def terminate(self):
        self.process.terminate()

    def wait(self):
        self.process.join()


def execute(runs):
    """Train the runs not finished yet, `parallel` at a time, longest first (so the pool drains
    together), each once the transfer it starts from is done; returns how many it trained. Stops with
    one line naming the runs that failed, after the others are done. Stopped itself (Ctrl-C, SIGTERM),
    it stops its runs first."""
    todo = sorted((run for run in runs if not finished(run)), key=lambda run: -run.tokens)
    if len(todo) < len(runs):
        print(f"{len(runs) - len(todo)} of {len(runs)} runs already finished: skipped")
    if todo:  # the report names the machine the runs trained on, wherever it is written
        write_json(os.path.join(out_dir, 'machine.json'), machine())
    trained, threads = len(todo), max(1, (os.cpu_count() or 1) // parallel)
    active, failed = {}, []
    try:
        while todo or active:
            ready = [run for run in todo if run.transfer is None  # its transfer done, its process gone
                     or finished(run.transfer) and run.transfer.name not in active]
            if not ready and not active:  # what is left starts from transfers that failed
                failed += [(run, f'not started: {run.transfer.name} failed') for run in todo]
                break
            for run in ready[:parallel - len(active)]:
                todo.remove(run)
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
                info_path = os.path.join(run.dir, 'run.json')
                write_json(info_path, dict(read_json(info_path), wall_s=round(wall, 1), returncode=process.poll()))
                if process.poll() or not finished(run):
                    failed.append((run, last_line(run)))
                    print(f"FAILED {name} after {wall:.0f} s: {last_line(run)}", flush=True)
                else:
                    row = final_val(run) or {}
                    val = f": val {row['val_loss']:.4f}" if row else ''
                    val += f", val_ood {row['val_loss_ood']:.4f}" if 'val_loss_ood' in row else ''
                    print(f"done {name} in {wall:.0f} s{val}", flush=True)
    finally:  # a stop here (Ctrl-C, SIGTERM) stops the runs too, each finishing a checkpoint it is writing
        for run, process, _ in active.values():
            process.terminate()
            process.wait()
    if failed:
        raise ValueError(f"{len(failed)} run(s) failed: " + '; '.join(
            f"{run.name} ({os.path.join(run.dir, 'train.out')}: {why})" for run, why in failed))
    return trained


def last_line(run):
    with open(os.path.join(run.dir, 'train.out')) as f:
        lines = [line.strip() for line in f if line.strip()]
    return lines[-1] if lines else 'no output'

# -----------------------------------------------------------------------------
# Results and the verdict


def result(run):
    """What the report holds of a run: the plan, its final val on both splits, its wall time."""
    row = final_val(run) if finished(run) else {}
    info = read_json(os.path.join(run.dir, 'run.json'))
    transfer = dict(transfer_tokens=run.transfer.tokens if run.transfer else 0)
    if run.transfer:
        transfer['transfer_wall_s'] = read_json(os.path.join(run.transfer.dir, 'run.json')).get('wall_s')
    return dict(name=run.name, arm=run.arm, seed=run.seed, fraction=run.fraction, tokens=run.tokens, steps=run.steps,
                batch_tokens=run.tokens // run.steps, lr=run.lr, **transfer, val_loss=row.get('val_loss'),
                val_loss_ood=row.get('val_loss_ood'), wall_s=info.get('wall_s'), tokens_per_s=row.get('tokens_per_s'),
                command=' '.join(['python', run.script, *run.args]))


def choose_lr(plan):
    """The lr of the lower final val_loss of qmc seed 1 at T/16 (the smaller lr on a tie)."""
    runs = plan.stage('lr')
    missing = [run.name for run in runs if not finished(run)]
    if missing:
        raise ValueError(f"the lr stage has not finished ({', '.join(missing)}): run --stage=lr first")
    candidates = [dict(lr=run.lr, val_loss=final_val(run)['val_loss'], val_loss_ood=final_val(run).get('val_loss_ood'))
                  for run in runs]
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
        return 'not finished'
    mean, sd = mean_std(values)
    return f"{mean:.4f} ± {sd:.4f}" if len(values) > 1 else f"{mean:.4f}"


def report(plan, stage_walls):
    lr_choice = choose_lr(plan)
    lr = lr_choice['chosen']
    teacher_run = plan.teacher()
    stage_of = {run.name: name for name, runs in plan.new_runs(lr).items() for run in runs}
    runs = list({run.name: run for name in ('scratch', 'arms', 'controls', 'recovery') for run in plan.stage(name, lr)
                 if run.script == 'train.py'}.values())
    missing = [dict(name=run.name, stage=stage_of[run.name]) for run in [teacher_run, *runs] if not finished(run)]
    t16_step = max(1, plan.teacher_steps // 16)  # the teacher's eval_interval
    at_t16 = val_at(teacher_run, t16_step) or {}
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
    if set(needed) & {m['name'] for m in missing}:
        outcome = dict(outcome='incomplete')
    else:
        outcome = verdict(teacher['val_loss'], by_arm['qmc'], scratch_t['val_loss'], min_steps)
    if smoke and outcome['outcome'] != 'incomplete':
        outcome.update(outcome='meaningless', rules_give=outcome['outcome'],
                       note='a smoke run: toy models trained for a few steps say nothing of the claim')
    outcome['missing_runs'] = missing
    summary = dict(
        claim="a softmax model linearized to DiJiang and fine-tuned on T/16 tokens comes back close to the original",
        teacher=teacher, runs=results, lr_choice=lr_choice, verdict=outcome,
        orderings=orderings(by_arm, 'val_loss') + orderings(by_arm, 'val_loss_ood'),
        planned_tokens={name: sum(run.tokens for run in runs) for name, runs in plan.new_runs(lr).items()},
        stage_wall_s=stage_walls, machine=read_json(os.path.join(out_dir, 'machine.json')) or machine(), smoke=smoke,
        settings={name: globals()[name] for name in SETTINGS}, commands=stage_commands())
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    write_json(json_path, summary)
    print(f"\nwrote {json_path}")
    print_table(summary)
    plot_path = os.path.splitext(json_path)[0] + '.png'
    try:
        draw_plot(summary, plot_path)
        print(f"wrote {plot_path}")
    except ImportError:
        print("no plot: matplotlib is not installed (pip install matplotlib)")
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
        tokens = f"{rs[0]['tokens']:,}" + (f" + {rs[0]['transfer_tokens']:,}" if rs[0]['transfer_tokens'] else '')
        print(f"| {arm} | {label} | {len(rs)} | {fmt([r['val_loss'] for r in rs])} | "
              f"{fmt([r['val_loss_ood'] for r in rs])} | {rs[0]['steps']} | {tokens} |")
    v = summary['verdict']
    print(f"\nverdict: {v['outcome']}")
    if v['outcome'] == 'meaningless':
        print(f"  {v['note']} (its rules give '{v['rules_give']}')")
    if 'gaps' in v:
        print(f"  qmc at T/16: {v['qmc_mean_val_loss']:.4f} (gap to the teacher {v['gap_mean']:+.4f}; per seed "
              f"{', '.join(f'{g:+.4f}' for g in v['gaps'])}); scratch_t {v['scratch_t_val_loss']:.4f}")
    if v['missing_runs']:
        missing = [f"{run['name']} (--stage={run['stage']})" for run in v['missing_runs']]
        print(f"  not finished: {', '.join(missing)}")
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
    prepare = (f"python data/packages/prepare.py --corpus_mb={corpus_mb:g} --out_dir={data_dir}  "
               "# run by the first stage when missing")
    return [prepare] + [f"python experiments/miniature.py {given} --stage={name}".replace('  ', ' ') for name in STAGES]


def train_windows():
    """The train split's windows of block_size, building the data first when it is missing."""
    if not os.path.isfile(os.path.join(data_dir, 'prepare.json')):
        from data.packages.prepare import build
        build(corpus_mb=corpus_mb, out_dir=data_dir)
    return Shards(data_dir, 'train', block_size).num_windows


def refuse_without_gpu(plan):
    """One line: the experiment on this CPU, at the speed of one timed training step of the teacher's
    shape (a lower bound: no optimizer step, no evals)."""
    from dijiang import GPT, GPTConfig
    gpt = GPT(GPTConfig.named(model, attention='softmax', block_size=block_size, vocab_size=256))
    x = torch.zeros(1, block_size, dtype=torch.long)
    print(f"no CUDA GPU: timing a training step of the {model} teacher on this CPU", flush=True)
    for _ in range(2):  # the first step warms up
        t0 = time.time()
        gpt(x, x)[1].backward()
    speed = block_size / (time.time() - t0)
    tokens = sum(run.tokens for runs in plan.new_runs(lrs[-1]).values() for run in runs)
    hours = tokens / speed / 3600
    raise ValueError(f"no CUDA GPU: the experiment trains {tokens:,} tokens, and this CPU ({os.cpu_count()} cores) "
                     f"trains the {model} teacher at {speed:,.0f} tokens/s (one step timed), so it would take at least "
                     f"{hours:,.1f} hours here ({hours / 24:,.1f} days): run it on a GPU, or test the pipeline at toy "
                     "scale with python experiments/miniature.py config/miniature_smoke.py")


def print_budget(plan):
    print(f"T = {plan.T:,} tokens (teacher: {plan.teacher_steps} steps of {teacher_batch} x {block_size}); every "
          f"fine-tune {plan.finetune_steps} steps")
    if plan.finetune_steps < min_steps:
        print(f"warning: fine-tunes of {plan.finetune_steps} steps, fewer than min_steps={min_steps}: the verdict "
              "cannot be 'not reproduced'; build more data (--corpus_mb)")
    print("planned" + (" (a smoke run: no time estimates)" if smoke else
                       f", at an assumed {tokens_per_s / 1e6:.2f}M tokens/s over {parallel} parallel runs") + ':')
    total = 0
    for name, runs in plan.new_runs(lrs[-1]).items():  # the tokens do not depend on the lr
        tokens = sum(run.tokens for run in runs)
        estimate = tokens / tokens_per_s + math.ceil(len(runs) / parallel) * STARTUP_S
        total += estimate
        print(f"  {name:<9} {len(runs):>2} runs, {tokens:>13,} tokens" + ('' if smoke else f", about {estimate / 60:.1f} min"))
    if not smoke:
        print(f"  all        about {total / 60:.1f} min (runs already finished are skipped)")
    sys.stdout.flush()


def print_identity_path():
    """On a GPU: whether the identity map's runs take the fused kernels, which need bf16 inputs (train.py's
    bfloat16 autocast gives them), or the PyTorch chunk loop, several times slower."""
    from dijiang import DiJiangAttention, GPTConfig
    from model_dir import pick_device
    device, run_dtype = pick_device('auto', dtype)
    config = GPTConfig.named(model, feature_map='identity', block_size=block_size, vocab_size=256)
    q = torch.zeros(1, config.chunk_size, config.n_head, config.head_size, device=device, dtype=run_dtype)
    if DiJiangAttention(config, 0).to(device).uses_triton(q):
        print(f"the identity map's runs: the fused Triton kernels ({run_dtype})", flush=True)
    else:
        print(f"warning: the identity map's runs take the PyTorch chunk loop, not the fused kernels (head size "
              f"{config.head_size}, {run_dtype}: see fast/triton_attention.supports); they take several times longer",
              flush=True)


def main():
    configurator.check(stage in (*STAGES, 'all'), 'stage', stage, f"choose one of {', '.join(STAGES)} or all")
    configurator.check(parallel >= 1, 'parallel', parallel, 'give 1 or more')
    configurator.check(len(lrs) >= 1, 'lrs', lrs, 'give at least one lr')
    gpu = torch.cuda.is_available()
    if not gpu and not smoke and stage != 'report':
        have_data = os.path.isfile(os.path.join(data_dir, 'prepare.json'))  # else about a token per byte of text
        refuse_without_gpu(Plan(train_windows() if have_data else int(corpus_mb * 1e6) // block_size))
    # the report needs only what the runs saved: with the data gone, the plan's size comes from there
    saved_plan = read_json(os.path.join(out_dir, 'plan.json'))
    if stage == 'report' and saved_plan and not os.path.isfile(os.path.join(data_dir, 'prepare.json')):
        windows = saved_plan['train_windows']
    else:
        windows = train_windows()
        os.makedirs(out_dir, exist_ok=True)
        write_json(os.path.join(out_dir, 'plan.json'), dict(data_dir=data_dir, train_windows=windows))
    plan = Plan(windows)
    print_budget(plan)
    walls_path = os.path.join(out_dir, 'stages.json')  # each stage's wall time, for the report
    for name in STAGES if stage == 'all' else (stage,):
        if name not in ('teacher', 'scratch') and not finished(plan.teacher()):
            raise ValueError(f"the teacher ({plan.teacher().dir}) has not finished: run --stage=teacher first")
        if name == 'report':
            return report(plan, read_json(walls_path))
        lr = choose_lr(plan)['chosen'] if name not in ('teacher', 'scratch', 'lr') else None
        print(f"\n== stage {name}", flush=True)
        if gpu and name in ('arms', 'recovery'):
            print_identity_path()
        t0 = time.time()
        if execute(plan.stage(name, lr)):  # a stage whose runs had all finished keeps its wall time
            # re-read: a --stage=scratch process beside this one writes the same file
            write_json(walls_path, {**read_json(walls_path), name: round(time.time() - t0, 1)})


if __name__ == '__main__':
    configurator.run(main, kept=lambda: f"{out_dir}/ keeps every finished run, and a run stopped after a checkpoint "
                                        "resumes from it: run the same command again")
