"""The decoders of fast/ against the model's eager steps (GPT.forward with a growing cache), on the CPU:
the static-cache step of both attentions (what the CUDA graph captures) to 1e-5 in fp32, its KV
cache's bound, and the fused DiJiang step's Triton kernels, which run here under TRITON_INTERPRET=1
(skipped without Triton; on a GPU they run there): fp32 to 1e-5, bf16 to 2e-2, for a Pythia shape,
a LLaMA shape with grouped-query attention, GroupNorm groups that cross the heads, and the identity
feature map, at batch 1 (the CUDA-core products) and 3 (tl.dot)."""

import importlib.util
import os

import pytest
import torch

from conftest import rel_err
from dijiang import GPT, LLAMA, GPTConfig
from fast.cuda_graph_decode import CUDAGraphDecoder

DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'
SHAPES = {  # tiny models: 4 heads of 16 channels, GroupNorm groups of 4 channels inside a head
    'pythia': {},
    'llama-gqa': dict(LLAMA, n_kv_head=2, tie_embeddings=True),
    'groups-across-heads': dict(n_head=3, n_embd=48),  # groups of 3 channels: 16 is no multiple of 3
    'identity': dict(feature_map='identity', rotary_pct=0.5),
}


def tiny(shape, attention='dijiang', dtype=torch.float32, **overrides):
    torch.manual_seed(0)
    config = GPTConfig(**{**dict(vocab_size=97, n_layer=2, n_head=4, n_embd=64, attention=attention),
                          **SHAPES[shape], **overrides})
    return GPT(config).to(DEVICE).to_dtype(dtype).eval()


def decode_both(model, decoder, batch, prompt_length, steps):
    """The logits (B, 1 + steps, vocab) of the decoder and of the model's eager steps, and the caches."""
    prompt = torch.randint(0, model.config.vocab_size, (batch, prompt_length), device=DEVICE)
    tokens = torch.randint(0, model.config.vocab_size, (batch, steps), device=DEVICE)
    with torch.no_grad():
        ours = [decoder.prefill(prompt)[:, -1:]] + [decoder.step(tokens[:, t:t + 1]).clone() for t in range(steps)]
        cache = model.new_cache()
        eager = [model(prompt, cache=cache)[0][:, -1:]] + [model(tokens[:, t:t + 1], cache=cache)[0]
                                                           for t in range(steps)]
    return torch.cat(ours, 1), torch.cat(eager, 1), cache


@pytest.mark.parametrize('attention', ['softmax', 'dijiang'])
@pytest.mark.parametrize('shape', ['pythia', 'llama-gqa'])
def test_the_static_step_is_the_eager_step(attention, shape):
    model = tiny(shape, attention)
    decoder = CUDAGraphDecoder(model, batch_size=3, max_length=20, graph=False)
    ours, eager, cache = decode_both(model, decoder, batch=3, prompt_length=11, steps=6)
    assert ours.shape == eager.shape == (3, 7, 97) and ours.dtype == torch.float32
    assert rel_err(ours, eager) < 1e-5
    assert decoder.length == int(decoder.position) == cache.pos == 17
    if attention == 'softmax':  # the static cache holds the eager one's keys and values, zeros after them
        k_static, v_static = decoder.run.layers[1]
        assert rel_err(k_static[:, :, :17], cache.layers[1][0]) < 1e-6 and rel_err(v_static[:, :, :17],
                                                                                    cache.layers[1][1]) < 1e-6
        assert not k_static[:, :, 17:].any()
    else:
        assert rel_err(decoder.run.layers[1], cache.layers[1]) < 1e-5


def test_greedy_tokens_are_the_eager_ones_to_the_last_slot_of_the_cache():
    model = tiny('llama-gqa', 'softmax')
    prompt = torch.randint(0, 97, (2, 9), device=DEVICE)
    decoder = CUDAGraphDecoder(model, batch_size=2, max_length=9 + 12 - 1, graph=False)  # the last token is not fed
    ours = torch.cat(list(model.generate_tokens(prompt, 12, temperature=0, decoder=decoder)), 1)
    eager = torch.cat(list(model.generate_tokens(prompt, 12, temperature=0)), 1)
    assert ours.tolist() == eager.tolist() and decoder.length == 20


def test_the_kv_cache_bound_is_one_clear_line():
    model = tiny('pythia', 'softmax', block_size=32)
    with pytest.raises(ValueError, match=r"^max_length=33: a softmax model's static KV cache holds from 1 to "
                                         r"block_size=32 tokens$"):
        CUDAGraphDecoder(model, batch_size=1, max_length=33, graph=False)
    decoder = CUDAGraphDecoder(model, batch_size=1, max_length=6, graph=False)
    assert decoder.max_length == 6 and CUDAGraphDecoder(model, 1, graph=False).max_length == 32  # 0: block_size
    with pytest.raises(ValueError, match=r"^a prompt of 7 tokens, but this decoder's KV cache holds max_length=6: "):
        decoder.prefill(torch.zeros(1, 7, dtype=torch.long, device=DEVICE))
    decoder.prefill(torch.zeros(1, 5, dtype=torch.long, device=DEVICE))
    decoder.step(torch.zeros(1, 1, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match=r"^token 7 of context, but this decoder's KV cache holds max_length=6: "
                                         r"build the decoder with a larger max_length$"):
        decoder.step(torch.zeros(1, 1, dtype=torch.long, device=DEVICE))
    assert decoder.length == 6  # the refused step changed nothing



def test_the_plot_draws_each_attention_at_its_fastest_decoder(tmp_path, monkeypatch):
    """bench_report's decode panel: one line per attention and batch size, through the fastest
    decoder's tokens/s at each context; failures leave no point."""
    axes = pytest.importorskip('matplotlib.axes')
    import bench_report
    lines = []
    plot = axes.Axes.plot
    monkeypatch.setattr(axes.Axes, 'plot', lambda ax, x, y, **kw: (lines.append((kw['label'], x, y)),
                                                                                plot(ax, x, y, **kw))[1])
    rows = [dict(attention=a, impl=impl, B=1, context=N, tokens_per_s=speed)
            for a, impl, N, speed in [('softmax', 'eager', 1024, 40.0), ('softmax', 'cuda_graph', 1024, 900.0),
                                      ('softmax', 'eager', 8192, 30.0), ('softmax', 'cuda_graph', 8192, 'OOM'),
                                      ('dijiang', 'eager', 1024, 35.0), ('dijiang', 'cuda_graph', 1024, 950.0),
                                      ('dijiang', 'fused', 1024, 2600.0), ('dijiang', 'fused', 8192, 2590.0)]]
    section = dict(meta=dict(hardware='a GPU'), rows=rows, notes=[], error=None)
    bench_report.draw_plot({'pythia-410m': {'decode': section}}, str(tmp_path / 'decode.png'))
    assert lines == [('softmax B=1', (1024, 8192), (900.0, 30.0)), ('dijiang B=1', (1024, 8192), (2600.0, 2590.0))]
    assert (tmp_path / 'decode.png').read_bytes().startswith(b'\x89PNG')

# -----------------------------------------------------------------------------
# The fused DiJiang step: Triton kernels, under the interpreter on the CPU

needs_triton = pytest.mark.skipif(
    importlib.util.find_spec('triton') is None or not (torch.cuda.is_available() or
                                                       os.environ.get('TRITON_INTERPRET') == '1'),
    reason='the fused step runs Triton kernels: needs Triton and a GPU, or TRITON_INTERPRET=1 on the CPU')


@needs_triton
@pytest.mark.parametrize('batch', [1, 3])
@pytest.mark.parametrize('shape', list(SHAPES))
def test_the_fused_step_is_the_eager_step_fp32(shape, batch):
    model = tiny(shape)
    decoder = CUDAGraphDecoder(model, batch_size=batch, fused=True, graph=False)
    assert decoder.run.fuse_group_norm == (shape != 'groups-across-heads')
    ours, eager, cache = decode_both(model, decoder, batch, prompt_length=5, steps=3)
    assert ours.shape == eager.shape == (batch, 4, 97)
    assert rel_err(ours, eager) < 1e-5
    for state, reference in zip(decoder.run.states, cache.layers):
        assert rel_err(state, reference) < 1e-5


@needs_triton
@pytest.mark.parametrize('batch', [1, 3])
@pytest.mark.parametrize('shape', ['pythia', 'llama-gqa'])
def test_the_fused_step_is_the_eager_step_bf16(shape, batch):
    model = tiny(shape, dtype=torch.bfloat16)
    decoder = CUDAGraphDecoder(model, batch_size=batch, fused=True, graph=False)
    ours, eager, _ = decode_both(model, decoder, batch, prompt_length=5, steps=3)
    assert rel_err(ours, eager) < 2e-2


@needs_triton
def test_the_fused_step_refuses_what_it_does_not_run():
    from fast.fused_decode import unsupported
    assert unsupported(tiny('pythia')) == ''
    with pytest.raises(ValueError, match=r"^attention='softmax': the fused step is DiJiang's recurrent one: decode "
                                         r"with fused=False$"):
        CUDAGraphDecoder(tiny('pythia', 'softmax'), batch_size=1, fused=True, graph=False)
    assert unsupported(tiny('pythia', n_embd=1024)) == "head_size=256: the fused step takes heads up to 128 wide"
