"""
Sample from a model trained by train.py or converted by convert.py, printing text as it is generated.

    python sample.py --out_dir=out --start="def main():"
    python sample.py --out_dir=out-pythia-410m --start=FILE:prompt.txt --num_samples=3 --top_p=0.9
    python sample.py --out_dir=out --temperature=0 --max_new_tokens=100   # greedy
    python sample.py --help                                                 # every setting and its default

A DiJiang model reads the prompt in its chunk form, then decodes from the recurrent state: every new
token costs the same time and memory at any context length, and there is no context limit. A softmax
model decodes with a KV cache that grows with every token and ends at block_size tokens.

stdout gets the text only: each sample is the prompt followed by what the model wrote, and samples
are separated by a line of dashes. What was loaded and how fast it decoded go to stderr.
"""

import configurator
import signals

signals.stop_on_signals()  # before the heavy imports: Ctrl-C while torch loads is one line too

import os  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

configurator.passive_openmp()  # before torch loads OpenMP

import torch  # noqa: E402

from model_dir import load  # noqa: E402
from fast.cuda_graph_decode import CUDAGraphDecoder, why_not_fused  # noqa: E402

# -----------------------------------------------------------------------------
# settings: each can be overridden as --name=value
out_dir = 'out'  # a directory written by train.py or convert.py: ckpt.pt, plus tokenizer.json unless byte-level
start = '\n'  # the prompt, or FILE:path to read it from a file
num_samples = 1  # samples to draw, one after the other
max_new_tokens = 500  # tokens to generate per sample
temperature = 0.8  # < 1 sharpens the distribution, > 1 flattens it; 0 is greedy (always the most likely token)
top_k = 200  # sample only from the top_k most likely tokens; 0 means all
top_p = 1.0  # sample only from the smallest set of tokens whose probability reaches top_p; 1.0 means all
seed = 1337
device = 'auto'  # 'auto' (cuda when available, else cpu), 'cpu', 'cuda', 'cuda:1', ...
dtype = 'auto'  # 'auto' (bfloat16 on CUDA, float32 on CPU), 'bfloat16', 'float16' or 'float32'
compile = False  # torch.compile the model (on CUDA: the decoding step inside its CUDA graph, unless fused)
# -----------------------------------------------------------------------------


class TextStream:
    """Turns tokens into text as they arrive. A BPE token can end inside a multi-byte UTF-8 character
    (a byte-level model always emits characters a byte at a time), and decoding it alone would show
    U+FFFD. So the tokens since the last whole-character boundary are decoded together, and trailing
    replacement characters, which may be a character still being written, are held back until the
    next token finishes it. The printed text is then exactly tokenizer.decode of all the tokens, unless
    max_pending tokens pass without a whole character."""

    max_pending = 64  # that many tokens without a boundary are not text: print them, U+FFFD and all

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.pending = []  # tokens since the text last ended on a whole character
        self.printed = 0  # characters of decode(pending) already returned

    def push(self, token):
        """Add one token id; return the text that is now final ('' while a character is unfinished)."""
        self.pending.append(token)
        text = self.tokenizer.decode(self.pending)
        final = text if len(self.pending) > self.max_pending else text.rstrip('\ufffd')
        new = text[self.printed:len(final)]
        self.printed = len(final)
        if final == text:  # a character boundary: start afresh, so each decode stays short
            self.pending, self.printed = [], 0
        return new

    def flush(self):
        """The rest of the text at the end of a sample."""
        text = self.tokenizer.decode(self.pending)[self.printed:]
        self.pending, self.printed = [], 0
        return text


def read_prompt(start):
    if not start.startswith('FILE:'):
        return start
    path = start.removeprefix('FILE:')
    if not os.path.isfile(path):
        raise ValueError(f"--start=FILE:{path}: {'a folder, not a file' if os.path.isdir(path) else 'no such file'}")
    try:
        with open(path, encoding='utf-8') as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"--start=FILE:{path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
                         f"{e.start}): save the prompt as UTF-8") from None


def check_settings():
    """Each setting on its own: the first bad one stops the run with one line that names it."""
    check = configurator.check
    # below 0.001 the scaled logits overflow fp32 and sampling has no distribution left: that is greedy
    check(temperature == 0 or 1e-3 <= temperature < float('inf'), 'temperature', temperature,
          'give 0 (greedy) or from 0.001 up: below 1 sharpens the distribution, above 1 flattens it')
    check(top_k >= 0, 'top_k', top_k, 'give 0 (all tokens) or more')
    check(0 < top_p <= 1, 'top_p', top_p, 'give a number above 0, at most 1 (1 means all tokens)')
    check(num_samples >= 1, 'num_samples', num_samples, 'give 1 or more')
    check(max_new_tokens >= 1, 'max_new_tokens', max_new_tokens, 'give 1 or more')
    check(0 <= seed < 2 ** 32, 'seed', seed, 'give a seed from 0 to 2**32 - 1')


def main():
    check_settings()
    torch.manual_seed(seed)
    text = read_prompt(start)
    model, tokenizer = load(out_dir, device, dtype)
    config, run_device = model.config, model.lm_head.weight.device

    prompt = tokenizer.encode(text)
    if not prompt:
        raise ValueError("the prompt is empty: pass --start=TEXT or --start=FILE:path")
    if max(prompt) >= config.vocab_size:
        raise ValueError(f"the prompt has token id {max(prompt)} but the model's vocab_size is {config.vocab_size}: "
                         f"{out_dir}/tokenizer.json is not this model's tokenizer")
    context = len(prompt) + max_new_tokens - 1  # the last new token is printed, never fed back
    if config.attention == 'softmax' and context > config.block_size:
        raise ValueError(f"the prompt ({len(prompt)} tokens) and max_new_tokens={max_new_tokens} need {context} "
                         f"tokens of context, but this softmax model has block_size={config.block_size}: shorten "
                         f"--start or lower --max_new_tokens (a dijiang model has no context limit)")
    idx = torch.tensor([prompt], dtype=torch.long, device=run_device)  # (1, T)

    # On CUDA each token is one replay of a CUDA graph: DiJiang's fused Triton step where it runs, else the
    # model's step against a static cache (compiled with --compile=True), a softmax model's holding exactly
    # `context` tokens. Elsewhere the model's own eager steps run.
    cuda_graph = run_device.type == 'cuda'
    fused = cuda_graph and config.attention == 'dijiang' and not why_not_fused(model)
    decoder = (CUDAGraphDecoder(model, batch_size=1, compile=compile, fused=fused, max_length=context)
               if cuda_graph else None)
    if compile and not cuda_graph:
        model.compile(dynamic=True)  # a KV cache grows every step: let one compiled graph take any length
    weights = model.lm_head.weight.dtype
    memory = (f"decoding state {model.cache_bytes(1, 1) / 2 ** 20:.3g} MiB, the same at any context length"
              if config.attention == 'dijiang' else f"KV cache {model.cache_bytes(1, 1, weights) / 2 ** 10:.3g} KiB "
              f"per token, {model.cache_bytes(1, config.block_size, weights) / 2 ** 20:.4g} MiB at {config.block_size}")
    graph = f", each token one {'fused ' if fused else ''}CUDA graph" if cuda_graph else ''
    print(f"{out_dir}: {config.attention} model, {model.num_params() / 1e6:.1f}M parameters, {run_device} "
          f"{str(weights).removeprefix('torch.')}, {memory}{graph}", file=sys.stderr)

    for _ in range(num_samples):
        stream = TextStream(tokenizer)
        print(tokenizer.decode(prompt), end='', flush=True)
        t0 = time.perf_counter()
        tokens = model.generate_tokens(idx, max_new_tokens, temperature, top_k or None, top_p if top_p < 1 else None,
                                       decoder=decoder)
        for i, token in enumerate(tokens):
            print(stream.push(token.item()), end='', flush=True)  # .item() waits for the GPU: the time is real
            if i == 0:
                t_first = time.perf_counter()  # after the prompt is read: the rest is decoding alone
        print(stream.flush() + '\n---------------', flush=True)
        t_end = time.perf_counter()
        decode_rate = (max_new_tokens - 1) / (t_end - t_first) if max_new_tokens > 1 else float('nan')
        print(f"prompt {len(prompt)} tokens: {(t_first - t0) * 1000:.0f} ms to the first new token; then "
              f"{decode_rate:.1f} tokens/s over {max_new_tokens - 1} tokens", file=sys.stderr)


if __name__ == '__main__':
    configurator.run(main, kept=lambda: 'sample.py writes no files: the text so far is on stdout')
