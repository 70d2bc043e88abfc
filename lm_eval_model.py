"""
The lm-evaluation-harness model for this project's checkpoints, registered with lm-eval as 'dijiang':
any directory that model_dir.load reads (Pythia or SmolLM2, softmax or DiJiang). eval.py runs it; from
Python:

    import lm_eval, lm_eval_model
    lm_eval.simple_evaluate(model='dijiang', model_args='out_dir=out-pythia-410m,device=cuda', tasks=['piqa'])

lm-eval asks three kinds of question, each a list of requests:
  loglikelihood          log p(continuation | context), and whether greedy decoding would write the
                         continuation. A multiple-choice question sends its context once per choice:
                         the context is read once and each choice continues from a copy of the state
                         (DiJiang: a fixed (H, D, D) per layer) or of the KV cache (softmax). Contexts of
                         one length are read in one batch, and all their continuations in the next.
  loglikelihood_rolling  log p(document), for perplexity. DiJiang streams the document through its
                         recurrent state, every token conditioned on all the tokens before it, at any
                         length. A softmax model reads windows of block_size tokens, each re-reading
                         the last overlap * block_size tokens of the one before as context for its new
                         tokens (lm-eval's rolling windows; overlap=0 is its Hugging Face model's).
  generate_until         greedy text until a stop string, the end-of-text token or max_gen_toks tokens,
                         through GPT.generate_tokens (on CUDA with fast/cuda_graph_decode.py's decoder,
                         as sample.py).

Tokenization is lm-eval's TemplateLM's, as for its Hugging Face model: context and continuation are
encoded together and split where the context's own tokens end; an empty context is the end-of-text
token. Requests come back in the order they were given.
"""

import itertools
import os
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence
import yaml
from lm_eval import utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from model_dir import load
from fast.cuda_graph_decode import CUDAGraphDecoder, why_not_fused

DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's, for a task that does not say


def load_tasks(specs):
    """lm-eval's tasks for a list of task names and YAML files: (the TaskManager, the tasks and groups to
    hand to simple_evaluate). Each task's data is read here, so that a name lm-eval does not know, a
    file that is not a task, or data that cannot be fetched is one ValueError naming the task."""
    from lm_eval.tasks import TaskManager  # imported here: it brings in the datasets library
    files = [spec for spec in specs if spec.endswith(('.yaml', '.yml'))]
    for path in files:
        if not os.path.isfile(path):
            raise ValueError(f"--tasks: no task file {path}: pass an lm-eval task name or the path of a task YAML")
    names = [spec for spec in specs if spec not in files]
    manager = TaskManager(include_defaults=bool(names))  # indexing lm-eval's 14,000 tasks takes seconds: only for names
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        raise ValueError(f"--tasks: lm-eval has no task {', '.join(unknown)}: `lm-eval ls tasks` lists them; "
                         "a local task is a path ending in .yaml")
    loaded = []
    for spec in specs:
        try:
            found = manager.load([os.path.abspath(spec) if spec in files else spec])
        except (OSError, KeyError, yaml.YAMLError) as e:  # OSError: the data cannot be fetched or found
            detail = ' '.join(str(e).split())[:200]
            raise ValueError(f"task {spec}: cannot be loaded ({type(e).__name__}: {detail}); a named task's data is "
                             "downloaded once into the Hugging Face cache (offline it must be there already), and a "
                             "YAML's relative data_files are read from the working directory") from None
        # the top of what the spec named: groups and tasks that are no group's children
        children = {child for kids in found['group_map'].values() for child in kids}
        loaded += [item for name, item in (*found['groups'].items(), *found['tasks'].items()) if name not in children]
    return manager, loaded


def right_padded(rows, device):
    """Token lists as one (B, T_max) tensor, padded on the right: in a causal model the padding only
    follows a row's own tokens, so it changes nothing they compute."""
    width = max(map(len, rows))
    return torch.tensor([row + [0] * (width - len(row)) for row in rows], dtype=torch.long, device=device)


def score(predictions, continuations):
    """[(sum of log p(token), whether each token is the argmax)] for each continuation, from the logits
    that predict its tokens, (T_b, V) each: one pass over the batch and one copy to the host. GPT.forward
    gives fp32 logits from a bf16 model (float64 from a float64 one)."""
    logits = pad_sequence(predictions, batch_first=True)  # (B, T_max, V)
    target = right_padded(continuations, logits.device)  # (B, T_max)
    lengths = torch.tensor([len(c) for c in continuations], device=logits.device)
    real = torch.arange(target.shape[1], device=logits.device) < lengths[:, None]  # not padding
    logprobs = F.log_softmax(logits, dim=-1).gather(-1, target[..., None])[..., 0]
    greedy = ((logits.argmax(dim=-1) == target) | ~real).all(dim=-1)
    return list(zip(torch.where(real, logprobs, 0).sum(dim=-1).tolist(), greedy.tolist()))


@register_model('dijiang')
class DiJiangLM(TemplateLM):
    """lm-eval's view of a dijiang.GPT and its Tokenizer. batch_size: sequences per forward pass (a
    context's continuations are never split between passes); share_context: read a context once for
    all its continuations (the results are the same either way), or 'auto': on a CPU only (on a GPU a
    pass costs about the same however few tokens it reads, and contexts are read together only when
    of one length, so there are more passes: on one H200 sharing was 2 to 3 times slower); overlap:
    the fraction of a softmax model's window that each rolling window re-reads from the one before."""

    def __init__(self, model, tokenizer, batch_size=16, share_context='auto', overlap=0.5):
        super().__init__()
        if not 0 <= float(overlap) < 1:
            raise ValueError(f"overlap={overlap}: use a fraction of the window in [0, 1)")
        if share_context not in (True, False, 'auto'):
            raise ValueError(f"share_context={share_context!r}: use True, False or 'auto'")
        self.model, self.tokenizer = model, tokenizer
        self._device = model.lm_head.weight.device
        self.share_context = self._device.type == 'cpu' if share_context == 'auto' else share_context
        self.batch_size, self.overlap = int(batch_size), float(overlap)
        self.softmax, self.block_size = model.config.attention == 'softmax', model.config.block_size
        self.decoder = None  # built by the first generate_until on CUDA

    @classmethod
    def create_from_arg_obj(cls, arg_dict, additional_config=None):
        """What lm-eval calls for model='dijiang': model_args out_dir=DIR and optionally device, dtype,
        batch_size, share_context and overlap."""
        args = {**arg_dict, **{k: v for k, v in (additional_config or {}).items() if v is not None}}
        args.pop('max_batch_size', None)  # lm-eval's automatic batch sizing: not supported
        if 'out_dir' not in args:
            raise ValueError("model_args needs out_dir=DIR, a directory written by convert.py or train.py")
        model, tokenizer = load(args.pop('out_dir'), args.pop('device', 'auto'), args.pop('dtype', 'auto'))
        return cls(model, tokenizer, **args)

    @classmethod
    def create_from_arg_string(cls, arg_string, additional_config=None):
        return cls.create_from_arg_obj(utils.simple_parse_args_string(arg_string), additional_config)

    @property
    def eot_token_id(self):
        return self.tokenizer.eot_token

    def tok_encode(self, string, add_special_tokens=None, **kwargs):
        return self.tokenizer.encode(string)

    def fits(self, context, continuation):
        """Whether a softmax model reads context + continuation whole (the last token predicts nothing)."""
        return not self.softmax or len(context) + len(continuation) - 1 <= self.block_size

    # -------------------------------------------------------------------------
    # loglikelihood

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm=False):
        """requests: ((context, continuation), context tokens, continuation tokens), as TemplateLM encodes
        them. Returns (log-likelihood, is_greedy) for each."""
        pairs = [(context, continuation) for _, context, continuation in requests]
        by_context = defaultdict(list)
        for i, (context, continuation) in enumerate(pairs):
            by_context[tuple(context)].append((i, continuation))
        shared = [(list(context), continuations) for context, continuations in by_context.items()
                  if self.share_context and len(continuations) > 1
                  and all(self.fits(context, c) for _, c in continuations)]
        in_shared = {i for _, continuations in shared for i, _ in continuations}
        results = [None] * len(pairs)
        with tqdm(total=len(pairs), desc='loglikelihood', disable=disable_tqdm) as bar:
            plain = [i for i in range(len(pairs)) if i not in in_shared]
            for i, result in itertools.chain(self.score_shared(shared), self.score_plain(pairs, plain)):
                results[i] = result
                bar.update()
        return results

    def score_plain(self, pairs, indices):
        """Each pair (context, continuation) in indices read whole, longest first, batch_size to a pass.
        A softmax model reads the last block_size tokens (lm-eval's Hugging Face model cuts the same).
        Yields (index, result)."""
        order = sorted(indices, key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            inputs = [(pairs[i][0] + pairs[i][1])[:-1] for i in batch]  # the last token predicts nothing
            if self.softmax:
                if max(len(pairs[i][1]) for i in batch) > self.block_size:
                    raise ValueError(f"a continuation is longer than this softmax model's block_size={self.block_size}"
                                     " tokens: it cannot be scored; use a DiJiang model or a shorter task")
                inputs = [tokens[-self.block_size:] for tokens in inputs]
            logits = self.model(right_padded(inputs, self.device))[0]  # (B, T, V)
            continuations = [pairs[i][1] for i in batch]
            ends = [len(tokens) for tokens in inputs]
            predictions = [logits[row, ends[row] - len(c):ends[row]] for row, c in enumerate(continuations)]
            yield from zip(batch, score(predictions, continuations))

    def score_shared(self, contexts):
        """contexts: [(context tokens, [(index, continuation tokens), ...]), ...]. Contexts of one length
        are read together, as many as keep their continuations within batch_size. Yields (index, result)."""
        by_length = sorted(contexts, key=lambda c: len(c[0]))
        for _, same_length in itertools.groupby(by_length, key=lambda c: len(c[0])):
            batch, rows = [], 0
            for context in same_length:
                if batch and rows + len(context[1]) > self.batch_size:
                    yield from self.continue_contexts(batch)
                    batch, rows = [], 0
                batch.append(context)
                rows += len(context[1])
            yield from self.continue_contexts(batch)

    def continue_contexts(self, contexts):
        """Read contexts of one length in one pass, then each continuation from a copy of its context's
        state: the context's last logits predict a continuation's first token, the rest it reads itself."""
        cache = self.model.new_cache()
        last = self.model(torch.tensor([c for c, _ in contexts], device=self.device), cache=cache)[0][:, -1:]  # (N, 1, V)
        rows = [(n, i, continuation) for n, (_, continuations) in enumerate(contexts)
                for i, continuation in continuations]
        cache = cache.select(torch.tensor([n for n, _, _ in rows], device=self.device))
        tails = [continuation[:-1] for _, _, continuation in rows]
        logits = self.model(right_padded(tails, self.device), cache=cache)[0] if max(map(len, tails)) else None
        predictions = [last[n] if logits is None else torch.cat((last[n], logits[row, :len(continuation) - 1]))
                       for row, (n, _, continuation) in enumerate(rows)]
        yield from zip([i for _, i, _ in rows], score(predictions, [continuation for _, _, continuation in rows]))

    # -------------------------------------------------------------------------
    # loglikelihood_rolling

    @torch.no_grad()
    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        """log p(document) for each request (document,), the first token conditioned on end-of-text."""
        results = []
        # lm-eval's windows: the first predicts its block_size tokens, each later one the
        # block_size - context_len + 1 after them, from the block_size tokens before each
        context_len = 1 + int(self.overlap * self.block_size)
        for (text,) in tqdm([request.args for request in requests], desc='loglikelihood_rolling', disable=disable_tqdm):
            tokens = self.tok_encode(text)
            if self.softmax:
                windows = [utils.make_disjoint_window(window) for window in utils.get_rolling_token_windows(
                    tokens, self.prefix_token_id, max_seq_len=self.block_size, context_len=context_len)]
                results.append(sum(logprob for _, (logprob, _) in self.score_plain(windows, range(len(windows)))))
            else:
                results.append(self.stream(tokens))
        return results

    def stream(self, tokens):
        """log p(tokens | end-of-text) through the recurrent state, block_size tokens to a forward pass."""
        inputs, cache, total = [self.prefix_token_id] + tokens[:-1], self.model.new_cache(), 0.0
        for start in range(0, len(tokens), self.block_size):
            segment = slice(start, start + self.block_size)
            logits = self.model(torch.tensor([inputs[segment]], device=self.device), cache=cache)[0][0]
            total += score([logits], [tokens[segment]])[0][0]
        return total

    # -------------------------------------------------------------------------
    # generate_until

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm=False):
        """Greedy text for each request (context, generation settings), cut before the first stop string."""
        results = []
        for request in tqdm(requests, desc='generate_until', disable=disable_tqdm):
            context, settings = request.args
            until = settings.get('until') or []
            until = [until] if isinstance(until, str) else list(until)
            max_new_tokens = settings.get('max_gen_toks', DEFAULT_MAX_GEN_TOKS)
            if settings.get('do_sample'):
                raise ValueError(f"task {request.task_name} asks for sampled text (do_sample=True): this model "
                                 "generates greedily only")
            prompt = self.tok_encode(context)
            if self.softmax:  # keep room for the new tokens, as lm-eval's Hugging Face model does
                if max_new_tokens >= self.block_size:
                    raise ValueError(f"task {request.task_name}: max_gen_toks={max_new_tokens} leaves no room for a "
                                     f"context in this softmax model's block_size={self.block_size}")
                prompt = prompt[-(self.block_size - max_new_tokens):]
            if self.decoder is None and self.device.type == 'cuda':  # one decoder for every request, as sample.py's
                fused = not self.softmax and not why_not_fused(self.model)
                self.decoder = CUDAGraphDecoder(self.model, batch_size=1, fused=fused)
            new = []
            tokens = self.model.generate_tokens(torch.tensor([prompt], device=self.device), max_new_tokens,
                                                temperature=0, decoder=self.decoder)
            for token in tokens:
                if token.item() == self.eot_token_id:
                    break
                new.append(token.item())
                if any(stop in self.tokenizer.decode(new) for stop in until):
                    break
            text = self.tokenizer.decode(new)
            for stop in until:
                text = text.split(stop)[0]
            results.append(text)
        return results
