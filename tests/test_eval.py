"""eval.py and lm_eval_model.py: lm-eval's accuracy on a local multiple-choice task equals an argmax over
log-likelihoods computed here from GPT.forward; each request type against the model's own arithmetic;
a shared context against the plain path; bad input as one error line. Tiny random models, offline."""

import json
import os
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import PYTHIA_TOKENIZER, REPO, assert_one_error_line, run_script
from dijiang import GPT, GPTConfig
from tokenizer import Tokenizer

lm_eval = pytest.importorskip('lm_eval', reason='pip install lm-eval==0.4.13')
import datasets  # noqa: E402  (lm-eval's dependencies)
import huggingface_hub  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402

from lm_eval_model import DiJiangLM, load_tasks  # noqa: E402

BYTES = Tokenizer.bytes()
WORDS = 'red green blue cat dog fish tree stone river cloud iron salt bread wind lamp door'.split()


def tiny_model(attention, tokenizer=BYTES, dtype=torch.float32, **config):
    """float64 where two ways of computing are compared: their difference is then rounding alone, far
    below the 1e-5 asked (fp32 sums of a few hundred log-probabilities already round at 1e-5)."""
    torch.manual_seed(0)
    # chunk_size 8: DiJiang contexts span several chunks, and a shared context ends inside one
    config = GPTConfig.named('tiny', attention=attention, vocab_size=tokenizer.vocab_size, chunk_size=8, **config)
    return GPT(config).to_dtype(dtype).eval()


@pytest.fixture(scope='module')
def quiz(tmp_path_factory):
    """A local lm-eval task, JSON lines and a YAML: 12 questions of 2-4 choices. Returns (yaml path, docs)."""
    folder = tmp_path_factory.mktemp('quiz')
    rng = random.Random(0)
    docs = []
    for _ in range(12):
        choices = rng.sample(WORDS, rng.randint(2, 4))
        docs.append(dict(question=' '.join(rng.choices(WORDS, k=rng.randint(2, 5))) + '?', choices=choices,
                         label=rng.randrange(len(choices))))
    (folder / 'quiz.jsonl').write_text(''.join(json.dumps(doc) + '\n' for doc in docs))
    (folder / 'quiz.yaml').write_text(task_yaml('quiz', folder / 'quiz.jsonl', folder / 'hf-cache'))
    return str(folder / 'quiz.yaml'), docs


def task_yaml(name, data_file, cache_dir):
    """lm-eval's local-dataset task; cache_dir keeps the datasets cache in the test's folder."""
    return f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data_file}
  cache_dir: {cache_dir}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def direct_logprob(model, context, continuation):
    """log p(continuation | context) and whether each token is the argmax, from one GPT.forward over the
    whole sequence: the test's own arithmetic, no cache, no batch."""
    tokens = torch.tensor([context + continuation])
    with torch.no_grad():
        logits = model(tokens[:, :-1])[0][0, len(context) - 1:]  # the positions that predict the continuation
    target = torch.tensor(continuation)
    return F.log_softmax(logits, -1).gather(-1, target[:, None]).sum().item(), bool((logits.argmax(-1) == target).all())


def request(kind, *arguments):
    return Instance(request_type=kind, doc={}, arguments=arguments, idx=0, metadata=('test', 0, 1))


def record_calls(model):
    """A list to which each forward call appends (its input rows, the cache's position before it or None)."""
    calls = []

    def record(module, args, kwargs):
        cache = kwargs.get('cache')
        calls.append((args[0].tolist(), None if cache is None else cache.pos))
    model.register_forward_pre_hook(record, with_kwargs=True)
    return calls


@pytest.mark.parametrize('attention, limit', [('dijiang', 0), ('softmax', 7)])
def test_accuracy_through_eval_py_is_the_argmax_of_direct_loglikelihoods(tmp_path, capsys, quiz, attention, limit):
    path, docs = quiz
    model = tiny_model(attention)
    model.save_checkpoint(tmp_path, tokenizer='bytes')
    status, out, err = run_script(capsys, 'eval.py', f'--out_dir={tmp_path}', f'--tasks={path}', '--device=cpu',
                                  '--batch_size=5', f'--limit={limit}')
    assert status == 0, err
    result_file = tmp_path / (f'eval-quiz-limit{limit}.json' if limit else 'eval-quiz.json')
    record = json.loads(result_file.read_text())
    assert out.splitlines()[-1] == f"wrote {result_file}"
    assert out.splitlines()[-2] == f"mean acc over 1 task(s): {record['mean_acc']:.4f}"
    assert '|quiz ' in out and '|acc     |' in out and '|acc_norm|' in out  # lm-eval's table

    docs = docs[:limit or None]
    correct = correct_norm = 0
    for doc in docs:  # the context is the question, each continuation ' ' + a choice (lm-eval's target_delimiter)
        context = list(doc['question'].encode())
        lls = [direct_logprob(model, context, list((' ' + c).encode()))[0] for c in doc['choices']]
        correct += max(range(len(lls)), key=lls.__getitem__) == doc['label']
        correct_norm += max(range(len(lls)), key=lambda i: lls[i] / len(doc['choices'][i])) == doc['label']
    assert record['results']['quiz']['acc,none'] == pytest.approx(correct / len(docs), abs=1e-12)
    assert record['mean_acc'] == record['results']['quiz']['acc,none']
    assert record['results']['quiz']['acc_norm,none'] == pytest.approx(correct_norm / len(docs), abs=1e-12)
    assert 0 < correct < len(docs)  # a random model: neither all wrong nor all right, so the argmax is tested
    assert record['n_samples']['quiz']['effective'] == len(docs)
    assert record['model_dir'] == str(tmp_path) and record['versions'] == {'quiz': 'Yaml'}
    assert record['lm_eval_version'] == lm_eval.__version__ and record['limit'] == limit
    head = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert record['commit'].removesuffix('-dirty') == head


def test_two_local_tasks_in_one_run(tmp_path, capsys, quiz):
    path, docs = quiz
    second = tmp_path / 'second.yaml'
    second.write_text(open(path).read().replace('task: quiz', 'task: second'))
    tiny_model('dijiang').save_checkpoint(tmp_path / 'model', tokenizer='bytes')
    status, out, err = run_script(capsys, 'eval.py', f"--out_dir={tmp_path / 'model'}", f'--tasks={path},{second}',
                                  '--device=cpu', '--limit=3', f"--out={tmp_path / 'both.json'}")
    assert status == 0, err
    record = json.loads((tmp_path / 'both.json').read_text())
    assert set(record['results']) == {'quiz', 'second'}  # the same data and model: the same accuracy
    assert record['results']['quiz']['acc,none'] == record['results']['second']['acc,none']
    assert record['mean_acc'] == pytest.approx(record['results']['quiz']['acc,none'], abs=1e-12)
    assert f"mean acc over 2 task(s): {record['mean_acc']:.4f}" in out


@pytest.mark.parametrize('attention', ['dijiang', 'softmax'])
def test_loglikelihood_is_the_summed_token_logprobs(attention):
    model = tiny_model(attention, block_size=40)
    lm = DiJiangLM(model, BYTES, batch_size=3, share_context=False)
    rng = random.Random(1)
    texts = [(' '.join(rng.choices(WORDS, k=rng.randint(1, 6))), ' ' + rng.choice(WORDS)) for _ in range(7)]
    results = lm.loglikelihood([request('loglikelihood', *text) for text in texts], disable_tqdm=True)
    for (context, continuation), (logprob, _) in zip(texts, results):
        expected = direct_logprob(model, list(context.encode()), list(continuation.encode()))[0]
        assert abs(logprob - expected) < 1e-5, (context, logprob, expected)
    # an empty context is the end-of-text token
    logprob, _ = lm.loglikelihood([request('loglikelihood', '', 'stone')], disable_tqdm=True)[0]
    assert abs(logprob - direct_logprob(model, [BYTES.eot_token], list(b'stone'))[0]) < 1e-5

    # is_greedy: the model's own greedy continuation is, one changed token is not
    context = list(b'the river?')
    greedy = model.generate(torch.tensor([context]), 3, temperature=0)[0, len(context):].tolist()
    changed = greedy[:2] + [(greedy[2] + 1) % BYTES.vocab_size]
    pairs = [(('', ''), context, greedy), (('', ''), context, changed)]
    (ll_greedy, is_greedy), (ll_changed, not_greedy) = lm._loglikelihood_tokens(pairs, disable_tqdm=True)
    assert (is_greedy, not_greedy) == (True, False)
    assert abs(ll_greedy - direct_logprob(model, context, greedy)[0]) < 1e-5

    if attention == 'softmax':  # past block_size, the last block_size tokens are read (lm-eval's HF model does too)
        context, continuation = list(b'a very long question about stones and rivers'), list(b' salt')
        (logprob, _), = lm._loglikelihood_tokens([(('', ''), context, continuation)], disable_tqdm=True)
        kept = (context + continuation)[-41:]
        assert abs(logprob - direct_logprob(model, kept[:-len(continuation)], continuation)[0]) < 1e-5


@pytest.mark.parametrize('attention', ['dijiang', 'softmax'])
def test_shared_contexts_are_read_once_and_equal_the_plain_path(quiz, attention):
    _, docs = quiz
    model = tiny_model(attention, dtype=torch.float64, block_size=48)
    calls = record_calls(model)
    # each question's choices; two contexts of one length; one with more choices than a batch holds; one
    # past the softmax window
    texts = [(doc['question'], ' ' + choice) for doc in docs for choice in doc['choices']]
    texts += [(context, choice) for context in ('one red?', 'two red?') for choice in (' cat', ' dog')]
    texts += [('many choices:', f' {word} {n}') for n, word in enumerate(WORDS + WORDS[:9])]
    texts += [('a question longer than the softmax window, which holds 48 tokens', f' {word}') for word in WORDS[:3]]
    requests = [request('loglikelihood', *text) for text in texts]
    plain = DiJiangLM(model, BYTES, batch_size=4, share_context=False).loglikelihood(requests, disable_tqdm=True)
    assert all(pos is None for _, pos in calls)
    calls.clear()
    shared = DiJiangLM(model, BYTES, batch_size=4, share_context=True).loglikelihood(requests, disable_tqdm=True)
    for (ll_plain, greedy_plain), (ll_shared, greedy_shared) in zip(plain, shared):
        assert abs(ll_plain - ll_shared) < 1e-9 and greedy_plain == greedy_shared

    def text(row):  # an input row without its padding (the texts hold no NUL bytes)
        return bytes(row).rstrip(b'\0').decode()
    too_long = {context for context, word in texts if attention == 'softmax' and len(context) + len(word) - 1 > 48}
    read = [text(row) for rows, pos in calls if pos == 0 for row in rows]  # the context passes
    assert sorted(read) == sorted({context for context, _ in texts} - too_long)  # each context once
    plain_rows = [text(row) for rows, pos in calls if pos is None for row in rows]  # cut as lm-eval's HF model cuts
    assert sorted(plain_rows) == sorted((c + w)[:-1][-48:] for c, w in texts if c in too_long)
    assert len(plain_rows) == (3 if attention == 'softmax' else 0)
    assert max(len(rows) for rows, pos in calls if pos == 0) > 1  # contexts of one length are read together
    assert max(len(rows) for rows, pos in calls if pos) == 25  # and a context's continuations never split


@pytest.mark.parametrize('overlap', [0.0, 0.5])
def test_rolling_loglikelihood_dijiang_streams_softmax_uses_overlapping_windows(overlap):
    text = 'a document longer than the window: ' + ' '.join(random.Random(2).choices(WORDS, k=20))
    tokens = list(text.encode())
    full = [BYTES.eot_token] + tokens  # full[j] is the input that predicts tokens[j]
    window = 16
    assert len(tokens) > 5 * window

    # DiJiang: streamed in forward passes of block_size tokens, equal to one forward over the whole document
    dijiang = tiny_model('dijiang', dtype=torch.float64, block_size=window)
    lm = DiJiangLM(dijiang, BYTES, overlap=overlap)
    logprob, = lm.loglikelihood_rolling([request('loglikelihood_rolling', text)], disable_tqdm=True)
    assert abs(logprob - direct_logprob(dijiang, full[:1], tokens)[0]) < 1e-9

    # softmax: the first window predicts its 16 tokens, each later one the next 16 - 8 (overlap 0.5) or 16
    # (overlap 0), from the 16 tokens before them
    softmax = tiny_model('softmax', dtype=torch.float64, block_size=window)
    logprob, = DiJiangLM(softmax, BYTES, overlap=overlap).loglikelihood_rolling(
        [request('loglikelihood_rolling', text)], disable_tqdm=True)
    stride = window - int(overlap * window)
    expected, start, end, windows = 0.0, 0, window, 0
    while start < len(tokens):
        inputs = full[max(0, end - window):end]
        with torch.no_grad():
            logits = softmax(torch.tensor([inputs]))[0][0, -(end - start):]
        expected += F.log_softmax(logits, -1).gather(-1, torch.tensor(tokens[start:end])[:, None]).sum().item()
        start, end, windows = end, min(end + stride, len(tokens)), windows + 1
    assert abs(logprob - expected) < 1e-9
    assert windows == (1 + -(-(len(tokens) - window) // stride))
    # the windows cut the context: the same weights reading the whole document score it differently
    unlimited = tiny_model('softmax', dtype=torch.float64, block_size=256)
    assert abs(logprob - direct_logprob(unlimited, full[:1], tokens)[0]) > 1e-3


@pytest.mark.parametrize('attention', ['dijiang', 'softmax'])
def test_generate_until_is_greedy_generate_cut_at_the_stop_string(attention):
    tokenizer = Tokenizer.from_file(PYTHIA_TOKENIZER)
    model = tiny_model(attention, tokenizer=tokenizer, block_size=64)
    calls = record_calls(model)
    lm = DiJiangLM(model, tokenizer)
    prompt = 'The river runs'
    ids = tokenizer.encode(prompt)
    greedy = model.generate(torch.tensor([ids]), 20, temperature=0)[0, len(ids):].tolist()
    text = tokenizer.decode(greedy)
    stop = tokenizer.decode(greedy[6:8])  # text that greedy decoding writes after 8 tokens at the latest
    calls.clear()
    out, = lm.generate_until([request('generate_until', prompt, {'until': [stop, 'never'], 'max_gen_toks': 20})],
                             disable_tqdm=True)
    assert out == text.split(stop)[0] and len(out) < len(text)
    assert len(calls) <= 8  # the prompt, then one step per token until the stop string appeared: not 20
    out, = lm.generate_until([request('generate_until', prompt, {'until': 'never', 'max_gen_toks': 20})],
                             disable_tqdm=True)
    assert out == text  # no stop string: max_gen_toks tokens


def test_share_context_auto_shares_on_a_cpu_only():
    model = tiny_model('dijiang')
    assert DiJiangLM(model, BYTES).share_context is True  # 'auto' on a CPU
    assert DiJiangLM(model, BYTES, share_context=False).share_context is False
    with torch.device('meta'):  # any other device: whole pairs
        assert DiJiangLM(GPT(model.config), BYTES).share_context is False
    with pytest.raises(ValueError, match="share_context='yes': use True, False or 'auto'"):
        DiJiangLM(model, BYTES, share_context='yes')


def test_registered_model_loads_a_directory(tmp_path):
    model = tiny_model('dijiang')
    model.save_checkpoint(tmp_path, tokenizer='bytes')
    lm = get_model('dijiang').create_from_arg_string(f'out_dir={tmp_path},device=cpu,share_context=False',
                                                     {'batch_size': 4, 'max_batch_size': None})
    assert (lm.batch_size, lm.share_context) == (4, False)
    (logprob, _), = lm.loglikelihood([request('loglikelihood', 'red cat', ' dog')], disable_tqdm=True)
    assert abs(logprob - direct_logprob(model, list(b'red cat'), list(b' dog'))[0]) < 1e-5


def test_bad_input_is_one_error_line(tmp_path, capsys, quiz, monkeypatch):
    path, _ = quiz
    model_dir = tmp_path / 'model'
    tiny_model('dijiang').save_checkpoint(model_dir, tokenizer='bytes')

    def run(*args):
        return run_script(capsys, 'eval.py', '--device=cpu', *args)

    assert_one_error_line(*run(f'--out_dir={tmp_path / "nothing"}', f'--tasks={path}'), 'nothing', 'ckpt.pt')
    assert_one_error_line(*run(f'--out_dir={model_dir}', '--tasks='), 'tasks')
    assert_one_error_line(*run(f'--out_dir={model_dir}', f'--tasks={path}', '--share_context=yes'),
                          'share_context', 'auto, True or False')
    assert_one_error_line(*run(f'--out_dir={model_dir}', f'--tasks={tmp_path / "missing.yaml"}'), 'missing.yaml')
    # a local task whose data cannot be read, as a named task's data offline: the line names the task
    gone = tmp_path / 'gone.yaml'
    gone.write_text(open(path).read().replace('quiz.jsonl', 'gone.jsonl'))
    line = assert_one_error_line(*run(f'--out_dir={model_dir}', f'--tasks={gone}'), f'task {gone}', 'gone.jsonl')
    assert 'cannot be loaded' in line
    # a task whose data is on the Hugging Face Hub, as every named task's, offline and not in the cache
    hub = tmp_path / 'hub.yaml'
    hub.write_text(open(path).read().replace('dataset_path: json', 'dataset_path: nobody/no-such-dataset'))
    monkeypatch.setattr(datasets.config, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    line = assert_one_error_line(*run(f'--out_dir={model_dir}', f'--tasks={hub}'), f'task {hub}',
                                 "Couldn't reach 'nobody/no-such-dataset'", 'OfflineModeIsEnabled')
    # an unknown name among names and files (lm-eval indexes its built-in tasks for names: some seconds)
    assert_one_error_line(*run(f'--out_dir={model_dir}', f'--tasks={path},arc_easy,no_such_task'),
                          'no_such_task', '`lm-eval ls tasks`')
    assert not any(name.startswith('eval-') for name in os.listdir(model_dir))  # nothing written
    monkeypatch.setitem(sys.modules, 'lm_eval', None)  # as if lm-eval were not installed
    line = assert_one_error_line(*run(f'--out_dir={model_dir}', f'--tasks={path}'))
    assert line == 'error: eval.py needs lm-evaluation-harness: pip install lm-eval==0.4.13'


def test_eval_speed_smoke_run(tmp_path, capsys):
    status, out, err = run_script(capsys, 'experiments/eval_speed.py', '--device=cpu', '--model=tiny', '--items=6',
                                  '--choices=3', '--context_words=8', '--choice_words=2', '--batch_size=4',
                                  '--repeats=1', f'--out_dir={tmp_path}')
    assert status == 0, err
    record = json.loads((tmp_path / 'eval_speed.json').read_text())
    tokenizer = Tokenizer.from_file(PYTHIA_TOKENIZER)
    docs = [json.loads(line) for line in (tmp_path / 'speed_task.jsonl').read_text().splitlines()]
    assert len(docs) == 6 and all(len(doc['choices']) == 3 for doc in docs)
    # the requests it timed are those lm-eval builds from the task it wrote
    _, (task,) = load_tasks([str(tmp_path / 'speed_task.yaml')])
    task.build_all_requests(limit=None, rank=0, world_size=1)
    assert [r.args for r in task.instances] == [(doc['question'], ' ' + c) for doc in docs for c in doc['choices']]
    assert record['requests'] == 18
    assert record['request_tokens'] == sum(len(tokenizer.encode(context + continuation))
                                           for context, continuation in (r.args for r in task.instances))
    rows = {(row['attention'], row['share_context']): row for row in record['rows']}
    assert set(rows) == {(a, s) for a in ('softmax', 'dijiang') for s in (False, True)}
    for attention in ('softmax', 'dijiang'):
        plain, shared = rows[attention, False], rows[attention, True]
        assert plain['model_tokens'] >= record['request_tokens'] - record['requests']  # each whole, less its last token
        assert shared['model_tokens'] < plain['model_tokens']  # each context once
        assert shared['max_difference'] < 1e-4 and plain['max_difference'] == 0
    assert out.splitlines()[-1] == f"wrote {tmp_path / 'eval_speed.json'}"
