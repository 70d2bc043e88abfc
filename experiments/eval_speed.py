"""
How fast lm-eval's loglikelihood requests run through lm_eval_model.DiJiangLM, with and without
reading each shared context once, for a softmax model and its DiJiang shape.

    python experiments/eval_speed.py                                      # pythia-410m shapes, 1,000 four-choice items
    python experiments/eval_speed.py --model=out-smollm2-135m --device=cpu --items=100 --repeats=1
    python experiments/eval_speed.py --device=cpu --model=tiny --items=20  # a smoke run
    python experiments/eval_speed.py --help                               # every setting

--model is a name in dijiang.CONFIGS, built with random weights and read with Pythia's tokenizer, or a
directory that convert.py or train.py wrote, read with its own (its DiJiang row linearizes a softmax
checkpoint). It writes a local multiple-choice task, JSON lines and a YAML in out_dir, of questions
and choices made of random words (each one token), which eval.py can also run, and times
DiJiangLM.loglikelihood on its requests, built as lm-eval builds them for such a task (the context is
the question, each continuation ' ' + a choice; the datasets library is not needed): one untimed call
on a few items first, then the median of `repeats` calls. tokens/s counts the tokens of the requests
(context + continuation, every choice), the same work in both modes; model_tokens is what the model
was given (padding included). max_difference is the largest gap between the two modes'
log-likelihoods. The table goes to stdout and everything to out_dir/eval_speed.json.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
import configurator  # noqa: E402
import signals  # noqa: E402

signals.stop_on_signals()

import json  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

configurator.passive_openmp()  # before torch loads OpenMP

import torch  # noqa: E402

from atomic import atomic_write_text  # noqa: E402
from dijiang import GPT, GPTConfig  # noqa: E402
from model_dir import load, pick_device  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

# -----------------------------------------------------------------------------
# settings: each can be overridden as --name=value
model = 'pythia-410m'  # a name in dijiang.CONFIGS (random weights) or a model directory
attentions = 'softmax,dijiang'  # comma-separated
items = 1000  # questions in the task
choices = 4  # choices per question
context_words = 64  # words per question, drawn uniformly from [context_words / 2, 3 * context_words / 2]
choice_words = 8  # words per choice, drawn the same way
batch_size = 32  # DiJiangLM's batch_size: sequences per forward pass
repeats = 3  # timed calls per mode; the median is reported
seed = 0
device = 'auto'  # 'auto' (cuda when available, else cpu), 'cpu', 'cuda', 'cuda:1', ...
dtype = 'auto'  # 'auto' (bfloat16 on CUDA, float32 on CPU), 'bfloat16', 'float16' or 'float32'
out_dir = 'out-eval-speed'  # the task's files and eval_speed.json
# -----------------------------------------------------------------------------


def write_task(tokenizer):
    """The task's JSON lines and YAML in out_dir; returns its documents."""
    os.makedirs(out_dir, exist_ok=True)
    words = [w for w in map(tokenizer.decode, ([i] for i in range(1000, 20000))) if re.fullmatch(' [a-z]{3,}', w)]
    if not words:
        raise ValueError(f"model={model}: its tokenizer has no one-token words to write questions with: use a "
                         "Pythia or SmolLM2 model")
    rng = random.Random(seed)

    def text(n):
        return ''.join(rng.choices(words, k=rng.randint(max(1, n // 2), max(1, 3 * n // 2)))).strip()
    docs = [dict(question=text(context_words) + '?', choices=[text(choice_words) for _ in range(choices)],
                 label=rng.randrange(choices)) for _ in range(items)]
    data = os.path.join(os.path.abspath(out_dir), 'speed_task.jsonl')
    atomic_write_text(data, ''.join(json.dumps(doc) + '\n' for doc in docs))
    atomic_write_text(os.path.join(out_dir, 'speed_task.yaml'), '\n'.join([
        'task: speed_task', 'dataset_path: json', 'dataset_kwargs:', f'  data_files: {{test: {data}}}',
        f"  cache_dir: {os.path.join(os.path.abspath(out_dir), 'hf-cache')}", 'test_split: test',
        'output_type: multiple_choice', 'num_fewshot: 0', 'doc_to_text: "{{question}}"',
        'doc_to_choice: "{{choices}}"', 'doc_to_target: "{{label}}"', '']))
    return docs


def build_requests(docs):
    """lm-eval's requests for the task, as its multiple_choice output builds them: one per choice."""
    from lm_eval.api.instance import Instance
    return [Instance(request_type='loglikelihood', doc=doc, arguments=(doc['question'], ' ' + choice), idx=i,
                     metadata=('speed_task', n, 1))
            for n, doc in enumerate(docs) for i, choice in enumerate(doc['choices'])]


def build_model(attention):
    """(model, tokenizer): the directory's, or the named shape with random weights."""
    if os.path.isdir(model):
        return load(model, device, dtype, attention=attention)
    torch.manual_seed(seed)
    resolved_device, resolved_dtype = pick_device(device, dtype)
    net = GPT(GPTConfig.named(model, attention=attention)).to(resolved_device).to_dtype(resolved_dtype).eval()
    return net, Tokenizer.from_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'data',
                                                 'pythia-tokenizer.json'))


def measure(lm, requests):
    """(median seconds of lm.loglikelihood(requests), its results, the tokens each call gave the model)."""
    given = []
    hook = lm.model.register_forward_pre_hook(lambda module, args: given.append(args[0].numel()))
    lm.loglikelihood(requests[:8 * choices], disable_tqdm=True)  # warmup: kernels compiled, memory allocated
    seconds = []
    for _ in range(repeats):
        given.clear()
        if lm.device.type == 'cuda':
            torch.cuda.synchronize(lm.device)
        t0 = time.perf_counter()
        results = lm.loglikelihood(requests, disable_tqdm=True)  # each result's .item() waits for the GPU
        seconds.append(time.perf_counter() - t0)
    hook.remove()
    return statistics.median(seconds), results, sum(given)


def main():
    configurator.check(items >= 1 and choices >= 2, 'items, choices', (items, choices), "need 1+ items and 2+ choices")
    configurator.check(repeats >= 1 and batch_size >= 1, 'repeats, batch_size', (repeats, batch_size), "need 1 or more")
    try:
        import lm_eval
    except ImportError:
        raise ValueError("eval_speed.py needs lm-evaluation-harness: pip install lm-eval==0.4.13") from None
    from lm_eval_model import DiJiangLM

    rows, requests = [], None
    for attention in attentions.split(','):
        net, tokenizer = build_model(attention)
        weights = net.lm_head.weight
        run_device, run_dtype = weights.device, str(weights.dtype).removeprefix('torch.')
        if requests is None:
            requests = build_requests(write_task(tokenizer))
            request_tokens = sum(len(tokenizer.encode(context + continuation)) for context, continuation in
                                 (r.args for r in requests))
            print(f"{len(requests)} requests, {request_tokens} tokens; {model}, {run_device}, {run_dtype}, "
                  f"batch_size {batch_size}")
            print(f"{'attention':>9} {'shared':>6} {'seconds':>8} {'tokens/s':>9} {'model tokens':>12} "
                  f"{'max difference':>14}")
        baseline = None
        for share in (False, True):
            seconds, results, given = measure(DiJiangLM(net, tokenizer, batch_size, share), requests)
            baseline = baseline or results
            difference = max(abs(a[0] - b[0]) for a, b in zip(results, baseline))
            rows.append(dict(attention=attention, share_context=share, seconds=round(seconds, 3),
                             tokens_per_s=round(request_tokens / seconds), model_tokens=given,
                             max_difference=difference))
            print(f"{attention:>9} {str(share):>6} {seconds:8.2f} {request_tokens / seconds:9.0f} {given:12d} "
                  f"{difference:14.2e}", flush=True)
        del net, weights
    record = dict(model=model, items=items, choices=choices, requests=len(requests), request_tokens=request_tokens,
                  batch_size=batch_size, device=str(run_device), dtype=run_dtype,
                  gpu=torch.cuda.get_device_name(run_device) if run_device.type == 'cuda' else None,
                  torch=torch.__version__, lm_eval=lm_eval.__version__, rows=rows)
    path = os.path.join(out_dir, 'eval_speed.json')
    atomic_write_text(path, json.dumps(record, indent=2) + '\n')
    print(f"wrote {path}")


if __name__ == '__main__':
    configurator.run(main, kept=lambda: f'{out_dir}/eval_speed.json is written only at the end')
