"""sample.py: it streams the text model.generate would give, decodes multi-byte characters whole, and
turns bad input into one error line. Tiny random models, nothing trained."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

import sample
from conftest import PYTHIA_TOKENIZER, assert_one_error_line, run_script
from dijiang import GPT, GPTConfig
from tokenizer import Tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEPARATOR = '\n---------------\n'


def tiny_checkpoint(path, attention='dijiang', vocab_size=Tokenizer.bytes().vocab_size, **config):
    """A random tiny model saved as train.py would for the byte-level corpus. Returns the model."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.named('tiny', attention=attention, vocab_size=vocab_size, **config))
    model.save_checkpoint(path, tokenizer='bytes')
    return model


def run_sample(capsys, *args):
    """sample.py on the CPU in this process; returns (exit status, stdout, stderr)."""
    return run_script(capsys, 'sample.py', '--device=cpu', *args)


def test_greedy_subprocess_prints_what_generate_gives(tmp_path):
    model = tiny_checkpoint(tmp_path)
    tokenizer = Tokenizer.bytes()
    prompt = 'Hello, world'
    result = subprocess.run([sys.executable, 'sample.py', f'--out_dir={tmp_path}', f'--start={prompt}', '--device=cpu',
                             '--temperature=0', '--max_new_tokens=30', '--num_samples=2'],
                            cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, 'OMP_NUM_THREADS': '1'})  # a tiny model: threads only add overhead
    assert result.returncode == 0, result.stderr
    expected = model.generate(torch.tensor([tokenizer.encode(prompt)]), 30, temperature=0)[0].tolist()
    assert len(expected) == len(prompt) + 30
    assert result.stdout == 2 * (tokenizer.decode(expected) + SEPARATOR)  # greedy: both samples the same
    assert 'tokens/s' in result.stderr


def test_pythia_tokenizer_and_prompt_file(tmp_path, capsys):
    torch.manual_seed(0)
    model = GPT(GPTConfig.named('tiny', attention='softmax', block_size=64))  # vocab 50304, as Pythia's embedding
    model.save_checkpoint(tmp_path / 'model')
    shutil.copy(PYTHIA_TOKENIZER, tmp_path / 'model' / 'tokenizer.json')
    prompt = 'naïve café, 中文 😀'
    (tmp_path / 'prompt.txt').write_text(prompt, encoding='utf-8')
    status, out, err = run_sample(capsys, f"--out_dir={tmp_path / 'model'}", f"--start=FILE:{tmp_path / 'prompt.txt'}",
                                  '--temperature=0', '--max_new_tokens=12')
    assert status == 0, err
    tokenizer = Tokenizer.from_file(PYTHIA_TOKENIZER)
    expected = model.generate(torch.tensor([tokenizer.encode(prompt)]), 12, temperature=0)[0].tolist()
    assert out == tokenizer.decode(expected) + SEPARATOR
    assert out.startswith(prompt)
    assert 'softmax model' in err and 'KV cache' in err


@pytest.mark.parametrize('use_pythia', [False, True])
def test_stream_prints_multibyte_characters_whole(use_pythia):
    tokenizer = Tokenizer.from_file(PYTHIA_TOKENIZER) if use_pythia else Tokenizer.bytes()
    text = 'naïve café: 中文字符, emoji 😀🙂 and ∑ math — the end'
    ids = tokenizer.encode(text)
    # the byte-level ids split every non-ASCII character; check the test is about something
    assert any('\ufffd' in tokenizer.decode([i]) for i in ids)
    stream = sample.TextStream(tokenizer)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert ''.join(pieces) == text
    assert not any('\ufffd' in piece for piece in pieces)
    assert sum(1 for piece in pieces if piece) > len(pieces) // 3  # it streams, not all at the end


def test_stream_keeps_invalid_bytes_as_decode_does():
    tokenizer = Tokenizer.bytes()
    ids = [0xE4, 0xB8, 65, 0x80, 0xFF, 66, 0xE4, 0xB8, 0xAD, 0xF0]  # truncated char, stray bytes, a whole one, a lead byte
    stream = sample.TextStream(tokenizer)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert ''.join(pieces) == tokenizer.decode(ids) == '\ufffdA\ufffd\ufffdB中\ufffd'


def test_softmax_prompt_past_context_is_one_error_line(tmp_path, capsys):
    tiny_checkpoint(tmp_path, attention='softmax', block_size=32)
    status, out, err = run_sample(capsys, f'--out_dir={tmp_path}', f"--start={'x' * 40}", '--max_new_tokens=5')
    assert_one_error_line(status, out, err, '44 tokens of context', 'block_size=32')
    # a dijiang model has no context limit: the same request runs
    tiny_checkpoint(tmp_path / 'dijiang', block_size=32)
    status, out, _ = run_sample(capsys, f"--out_dir={tmp_path / 'dijiang'}", f"--start={'x' * 40}",
                                '--max_new_tokens=5', '--temperature=0')
    assert status == 0 and out.startswith('x' * 40) and out.endswith(SEPARATOR)


def test_bad_input_is_one_error_line(tmp_path, capsys):
    cases = [([f"--out_dir={tmp_path / 'missing'}"], 'no checkpoint at'),
             ([f'--out_dir={tmp_path}', f"--start=FILE:{tmp_path / 'missing.txt'}"], 'no such file'),
             ([f'--out_dir={tmp_path}', f"--start=FILE:{tmp_path}"], 'a folder, not a file'),
             ([f'--out_dir={tmp_path}', '--start='], 'prompt is empty'),
             ([f'--out_dir={tmp_path}', '--top_p=0.0'], 'top_p'),
             ([f'--out_dir={tmp_path}', '--temperature=1e-300'], 'temperature=1e-300')]
    tiny_checkpoint(tmp_path)
    for args, expected in cases:
        assert_one_error_line(*run_sample(capsys, *args), expected)
    # no ckpt entry for the tokenizer and no tokenizer.json: say what to copy where
    torch.manual_seed(0)
    GPT(GPTConfig.named('tiny')).save_checkpoint(tmp_path / 'bare')
    assert_one_error_line(*run_sample(capsys, f"--out_dir={tmp_path / 'bare'}"), 'tokenizer.json')
