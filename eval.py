"""
Zero-shot accuracy of a model on lm-evaluation-harness tasks: the metric of the paper's Table 1.

    python eval.py --out_dir=out-pythia-410m --tasks=piqa,winogrande,wsc,arc_easy,arc_challenge,logiqa
    python eval.py --out_dir=out-dijiang-410m --tasks=my_tasks/quiz.yaml,piqa --limit=100
    python eval.py --help                                   # every setting and its default

Any directory that convert.py or train.py wrote: Pythia or SmolLM2, softmax or DiJiang
(lm_eval_model.py is the model lm-eval sees). --tasks takes lm-eval's task names and paths of task
YAML files: a local data set is `dataset_path: json` with `dataset_kwargs: {data_files: ...}`, JSON
lines, and relative data_files are read from the working directory, as lm-eval reads them. A named
task downloads its data once into the Hugging Face cache; offline (HF_DATASETS_OFFLINE=1) a task whose
data is not there is one line naming it.

stdout gets lm-eval's table and the mean accuracy (acc) over the tasks that have one, the paper's
Table 1 metric. The results, with the model directory, the commit of this code, lm-eval's version and
each task's version, go to out_dir/eval-<tasks>.json (a run with --limit to
eval-<tasks>-limitN.json, so that a quick look never replaces a whole result).

Needs lm-eval: pip install lm-eval==0.4.13
"""

import configurator
import signals

signals.stop_on_signals()  # before the heavy imports: Ctrl-C while torch loads is one line too

import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

configurator.passive_openmp()  # before torch loads OpenMP

from atomic import atomic_write_text  # noqa: E402
from model_dir import load  # noqa: E402

# -----------------------------------------------------------------------------
# settings: each can be overridden as --name=value
out_dir = 'out'  # the model: a directory written by convert.py or train.py
tasks = ''  # comma-separated lm-eval task names and task YAML files, e.g. piqa,arc_easy,my_tasks/quiz.yaml
limit = 0  # score only the first limit documents of each task (a quick look, not a result); 0 means all
batch_size = 16  # sequences per forward pass (a context's continuations always share one)
share_context = 'auto'  # 'True': read each context once and score its continuations from copies of the state or
                        # KV cache; 'False': read each pair whole; 'auto': True on a CPU, False on a GPU (faster there)
overlap = 0.5  # perplexity tasks on a softmax model: the fraction of its window each window re-reads as context
device = 'auto'  # 'auto' (cuda when available, else cpu), 'cpu', 'cuda', 'cuda:1', ...
dtype = 'auto'  # 'auto' (bfloat16 on CUDA, float32 on CPU), 'bfloat16', 'float16' or 'float32'
out = ''  # the results JSON; '' means out_dir/eval-<tasks>.json, as above
# -----------------------------------------------------------------------------


def git_commit():
    """The commit of this code ('-dirty' when tracked files differ from it), or None outside a git checkout."""
    def git(*args):
        return subprocess.run(['git', *args], cwd=os.path.dirname(os.path.abspath(__file__)),
                              capture_output=True, text=True).stdout.strip()
    try:
        commit = git('rev-parse', 'HEAD')
        return commit + ('-dirty' if git('status', '--porcelain', '--untracked-files=no') else '') if commit else None
    except OSError:  # no git
        return None


def main():
    specs = [spec for spec in tasks.split(',') if spec]
    configurator.check(specs, 'tasks', tasks, "name lm-eval tasks (piqa,arc_easy) or task YAML files")
    configurator.check(limit >= 0, 'limit', limit, "use 0 for every document, or a positive count")
    configurator.check(batch_size >= 1, 'batch_size', batch_size, "use 1 or more")
    configurator.check(0 <= overlap < 1, 'overlap', overlap, "use a fraction of the window in [0, 1)")
    configurator.check(share_context in ('auto', 'True', 'False'), 'share_context', share_context, "use auto, True or False")
    try:
        import lm_eval
    except ImportError:
        raise ValueError("eval.py needs lm-evaluation-harness: pip install lm-eval==0.4.13") from None
    from lm_eval.utils import make_table
    from lm_eval_model import DiJiangLM, load_tasks

    names = [os.path.splitext(os.path.basename(spec))[0] for spec in specs]  # a YAML file by its own name
    path = out or os.path.join(out_dir, f"eval-{'+'.join(names)}{f'-limit{limit}' if limit else ''}.json")
    model, tokenizer = load(out_dir, device, dtype)  # first: a wrong directory is one line, before any task is read
    manager, task_objects = load_tasks(specs)
    lm = DiJiangLM(model, tokenizer, batch_size, {'True': True, 'False': False}.get(share_context, 'auto'), overlap)
    t0 = time.perf_counter()
    results = lm_eval.simple_evaluate(model=lm, tasks=task_objects, task_manager=manager, limit=limit or None)
    seconds = time.perf_counter() - t0
    print(make_table(results))
    if results.get('groups'):
        print(make_table(results, 'groups'))
    accuracies = [r['acc,none'] for name, r in results['results'].items()
                  if 'acc,none' in r and name not in results.get('groups', {})]
    mean_acc = sum(accuracies) / len(accuracies) if accuracies else None
    if accuracies:
        print(f"mean acc over {len(accuracies)} task(s): {mean_acc:.4f}")
    weights = model.lm_head.weight
    record = dict(model_dir=os.path.abspath(out_dir), commit=git_commit(), lm_eval_version=lm_eval.__version__,
                  tasks=specs, limit=limit, batch_size=batch_size, share_context=lm.share_context, overlap=overlap,
                  device=str(weights.device), dtype=str(weights.dtype).removeprefix('torch.'),
                  seconds=round(seconds, 1), mean_acc=mean_acc,
                  versions=results['versions'], results=results['results'], groups=results.get('groups', {}),
                  n_shot=results['n-shot'], n_samples=results['n-samples'])
    replaces = os.path.exists(path)
    atomic_write_text(path, json.dumps(record, indent=2) + '\n')
    print(f"wrote {path}{' (replacing the earlier one)' if replaces else ''}")


if __name__ == '__main__':
    configurator.run(main, kept=lambda: 'eval.py writes its results only at the end: nothing was written')
