"""The model: three attention forms against a float64 reference, long context, decoding, checkpoints.

Tolerances are relative errors ||x - ref|| / ||ref||: 1e-5 for fp32 against float64 (fp32 rounding
over a few thousand terms lands near 1e-7), 1e-2 for bf16 inputs.
"""
import json
import math

import pytest
import torch

import dijiang
from conftest import reference_attention, rel_err
from dijiang import (GPT, GPTConfig, attention_chunk, attention_parallel, attention_recurrent, decay_schedule,
                     feature_map, projection_matrix)


def random_qkv(B, T, H, D, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, T, H, D, generator=g).to(dtype) for _ in range(3)]


FORMS = [('parallel', {}), ('chunk', dict(chunk_size=16)), ('chunk', dict(chunk_size=64)),
         ('chunk', dict(chunk_size=100)), ('recurrent', {})]
ATTENTION = {'parallel': attention_parallel, 'chunk': attention_chunk, 'recurrent': attention_recurrent}


def check_form_against_formula(form, kwargs, T, proj, seed):
    """Output, final state and the gradients of q, k, v of one form against the float64 formula."""
    B, H, D = 2, 3, proj.shape[0]
    q, k, v = (x.requires_grad_() for x in random_qkv(B, T, H, D, seed=seed))
    decay = decay_schedule(H)
    o, final_state = ATTENTION[form](feature_map(q, proj), feature_map(k, proj), v, decay, **kwargs)

    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref, ref_state = reference_attention(q64, k64, v64, proj, decay)
    assert o.dtype == torch.float32
    assert rel_err(o, ref) < 1e-5
    assert rel_err(final_state, ref_state) < 1e-5

    cotangent = torch.randn_like(ref)
    (o.double() * cotangent).sum().backward()
    (ref * cotangent).sum().backward()
    for name, x, x64 in (('q', q, q64), ('k', k, k64), ('v', v, v64)):
        assert rel_err(x.grad, x64.grad) < 1e-5, name


FORM_IDS = [f"{f}{k.get('chunk_size', '')}" for f, k in FORMS]


@pytest.mark.parametrize('T', [1, 63, 64, 65, 500, 1000])
@pytest.mark.parametrize('form,kwargs', FORMS, ids=FORM_IDS)
def test_attention_forms_match_float64_formula(T, form, kwargs):
    check_form_against_formula(form, kwargs, T, projection_matrix(16, 'qmc', seed=1), seed=T)


@pytest.mark.parametrize('feature_map_name', ['mc', 'performer'])
@pytest.mark.parametrize('T', [1, 65, 333])
@pytest.mark.parametrize('form,kwargs', FORMS, ids=FORM_IDS)
def test_every_feature_map_in_every_form_matches_float64_formula(T, form, kwargs, feature_map_name):
    check_form_against_formula(form, kwargs, T, projection_matrix(16, feature_map_name, seed=2), seed=T + 1)


def test_performer_projection_is_scaled_orthogonal_gaussian():
    """P = G / D^(1/4): orthogonal columns, lengths of Gaussian vectors (chi, mean ~ sqrt(D)), seeded."""
    D = 64
    P = projection_matrix(D, 'performer', seed=3).double()
    G = P * D ** 0.25
    gram = G.T @ G
    assert torch.allclose(gram - torch.diag(gram.diag()), torch.zeros(D, D, dtype=torch.float64), atol=1e-4)
    lengths = gram.diag().sqrt()
    assert abs(lengths.mean().item() - math.sqrt(D)) < 0.5 and lengths.std().item() > 0.3
    assert torch.equal(projection_matrix(D, 'performer', seed=3), projection_matrix(D, 'performer', seed=3))
    assert not torch.equal(projection_matrix(D, 'performer', seed=3), projection_matrix(D, 'performer', seed=4))


@pytest.mark.parametrize('form', ['parallel', 'chunk', 'recurrent'])
def test_final_state_is_the_recurrent_state(form):
    """Every form returns the state the recurrence holds after the last token, and continuing from a
    state equals processing the whole sequence at once."""
    B, T, H, D = 2, 77, 2, 8
    q, k, v = random_qkv(B, T, H, D, seed=3, dtype=torch.float64)
    proj, decay = projection_matrix(D, 'mc', seed=2), decay_schedule(H)
    phi_q, phi_k = feature_map(q, proj), feature_map(k, proj)
    kwargs = dict(chunk_size=16) if form == 'chunk' else {}
    o_full, state_full = attention_recurrent(phi_q, phi_k, v, decay)
    split = 30
    o1, state1 = ATTENTION[form](phi_q[:, :split], phi_k[:, :split], v[:, :split], decay, **kwargs)
    o2, state2 = ATTENTION[form](phi_q[:, split:], phi_k[:, split:], v[:, split:], decay, state1, **kwargs)
    assert rel_err(torch.cat((o1, o2), dim=1), o_full) < 1e-12
    assert rel_err(state2, state_full) < 1e-12


def test_long_context_65536_tokens_chunk_form():
    """65,536 tokens in fp32 and bf16: finite, and equal to the same chunkwise form in float64. The
    released formulation needs gamma^-n, which is already inf in fp32 at this length."""
    B, T, H, D = 1, 65536, 2, 64
    decay = decay_schedule(8)[[0, -1]]  # the fastest and the slowest decay of an 8-head model
    assert torch.isinf(decay[-1] ** -torch.tensor(float(T))), "the released D2 = gamma^-n overflows fp32"
    q, k, v = random_qkv(B, T, H, D, seed=7)
    proj = projection_matrix(D)
    # chunks of 1024 in float64 against chunks of 256 below: two chunkings of one function
    ref, ref_state = attention_chunk(feature_map(q.double(), proj), feature_map(k.double(), proj), v.double(), decay,
                                     chunk_size=1024)
    o, state = attention_chunk(feature_map(q, proj), feature_map(k, proj), v, decay, chunk_size=256)
    assert torch.isfinite(o).all() and torch.isfinite(state).all()
    assert rel_err(o, ref) < 1e-5 and rel_err(state, ref_state) < 1e-5
    # the tokens at the end see the whole history through the slow head: not a vanishing signal
    assert o[0, -1, 1].norm() > 1
    qb, kb, vb = (x.bfloat16() for x in (q, k, v))
    o_bf16, state_bf16 = attention_chunk(feature_map(qb, proj), feature_map(kb, proj), vb, decay, chunk_size=256)
    assert o_bf16.dtype == torch.bfloat16 and torch.isfinite(o_bf16).all() and torch.isfinite(state_bf16).all()
    assert rel_err(o_bf16, ref) < 1e-2


def test_parallel_form_at_4096_tokens_matches_float64():
    B, T, H, D = 1, 4096, 2, 16
    q, k, v = random_qkv(B, T, H, D, seed=11)
    proj, decay = projection_matrix(D), decay_schedule(2)
    o, _ = attention_parallel(feature_map(q, proj), feature_map(k, proj), v, decay)
    assert rel_err(o, reference_attention(q, k, v, proj, decay)[0]) < 1e-5


def test_projection_and_decay_follow_the_released_definitions():
    D = 64
    C = torch.from_numpy(__import__('scipy.fft').fft.dct(torch.eye(D).double().numpy(), axis=0, norm='ortho'))
    assert torch.allclose(C @ C.T, torch.eye(D, dtype=torch.float64), atol=1e-12)  # orthonormal DCT
    for kind in ('mc', 'qmc'):
        P = projection_matrix(D, kind, seed=5).double()
        t = torch.linalg.solve(C, P).diagonal()  # P = C @ diag(t)
        assert torch.allclose(C * t, P, atol=1e-6)
        u = torch.special.ndtr(t)
        if kind == 'qmc':  # one point in each of the D strata of (0, 1): quasi-Monte Carlo coverage
            strata = (u.sort().values * D).floor()
            assert torch.equal(strata, torch.arange(D, dtype=strata.dtype))
    # the released code: P = C @ diag(icdf(u)) with u = torch.rand(D) in fp32
    u = torch.rand(D, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    t = torch.distributions.Normal(0, 1).icdf(u)
    assert torch.allclose(projection_matrix(D, 'mc', seed=5).double(), C * t, atol=1e-6)
    gamma = decay_schedule(16)
    assert gamma[0].item() == pytest.approx(1 - 1 / 32) and gamma[-1].item() == pytest.approx(1 - 1 / 512)
    assert torch.all(gamma[1:] > gamma[:-1])


def tiny_config(**overrides):
    return GPTConfig(**{**dict(vocab_size=97, n_layer=2, n_head=4, n_embd=32, intermediate_size=48), **overrides})


@pytest.mark.parametrize('parallel_residual', [True, False])
def test_model_forms_agree_on_logits_and_every_gradient(parallel_residual):
    torch.manual_seed(0)
    ref_model = GPT(tiny_config(parallel_residual=parallel_residual), form='parallel').double()
    idx = torch.randint(0, 97, (2, 65))
    targets = torch.randint(0, 97, (2, 65))
    ref_logits, ref_loss = ref_model(idx, targets)
    ref_loss.backward()
    for form, chunk_size in (('parallel', 64), ('chunk', 64), ('chunk', 13), ('recurrent', 64)):
        model = GPT(tiny_config(chunk_size=chunk_size, parallel_residual=parallel_residual), form=form)
        model.load_state_dict(ref_model.state_dict())
        logits, loss = model(idx, targets)
        loss.backward()
        assert rel_err(logits, ref_logits) < 1e-5, form
        ref_params = dict(ref_model.named_parameters())
        for name, p in model.named_parameters():
            assert rel_err(p.grad, ref_params[name].grad) < 1e-5, (form, chunk_size, name)


def test_identity_feature_map_is_decayed_linear_attention():
    """The ablation switch: phi(x) = x, so the chunk form must equal the formula with no softmax."""
    torch.manual_seed(5)
    model = GPT(tiny_config(feature_map='identity', chunk_size=8))
    attn, x = model.layers[0].attn, torch.randn(2, 21, 32)
    q, k, v = attn.qkv(x).view(2, 21, 4, 24).split(8, dim=-1)
    from dijiang import apply_rotary, rotary_cos_sin
    cos, sin = rotary_cos_sin(torch.arange(21), 2, 10000.0)
    q, k = apply_rotary(q, cos, sin).double(), apply_rotary(k, cos, sin).double()
    n = torch.arange(21.0)
    weights = torch.where(n[:, None] >= n[None, :], attn.decay.double()[:, None, None] ** (n[:, None] - n[None, :]).clamp(min=0), 0)
    o = torch.einsum('bhnm,bmhe->bnhe', torch.einsum('bnhd,bmhd->bhnm', q, k) * weights, v.double())
    expected = attn.proj(attn.group_norm(o.reshape(42, 32).float()).view(2, 21, 32) * torch.nn.functional.silu(attn.gate(x)))
    assert rel_err(attn(x, cos, sin)[0], expected) < 1e-5


def test_prefill_with_chunk_then_continue_recurrent_equals_one_parallel_pass():
    torch.manual_seed(1)
    model = GPT(tiny_config(chunk_size=16), form='chunk')
    idx = torch.randint(0, 97, (3, 90))
    full = GPT(tiny_config(), form='parallel')
    full.load_state_dict(model.state_dict())
    with torch.no_grad():
        ref, _ = full(idx)
        cache = model.new_cache()
        pieces = [model(idx[:, :50], cache=cache)[0]]  # chunk prefill
        pieces += [model(idx[:, t:t + 1], cache=cache)[0] for t in range(50, 70)]  # recurrent steps
        pieces.append(model(idx[:, 70:], cache=cache)[0])  # chunk again, from the carried state
    assert cache.pos == 90
    assert cache.layers[0].shape == (3, 4, 8, 8)  # (B, H, D, D): constant size, whatever the context
    assert rel_err(torch.cat(pieces, dim=1), ref) < 1e-5


def test_softmax_kv_cache_decoding_matches_full_forward():
    torch.manual_seed(2)
    model = GPT(tiny_config(attention='softmax', block_size=64))
    idx = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        ref, _ = model(idx)
        cache = model.new_cache()
        pieces = [model(idx[:, :17], cache=cache)[0]]
        pieces += [model(idx[:, t:t + 1], cache=cache)[0] for t in range(17, 30)]
        pieces.append(model(idx[:, 30:], cache=cache)[0])  # several new tokens against a cache
    assert cache.layers[0][0].shape == (2, 4, 40, 8)  # the KV cache grows with the context
    assert rel_err(torch.cat(pieces, dim=1), ref) < 1e-5
    with pytest.raises(ValueError, match='block_size=64'):
        model(torch.zeros(1, 65, dtype=torch.long))


@pytest.mark.parametrize('attention', ['dijiang', 'softmax'])
def test_greedy_generate_matches_argmax_of_full_forward(attention):
    torch.manual_seed(3)
    model = GPT(tiny_config(attention=attention))
    prompt = torch.randint(0, 97, (2, 11))
    out = model.generate(prompt, max_new_tokens=8, temperature=0)
    assert out.shape == (2, 19) and torch.equal(out[:, :11], prompt)
    with torch.no_grad():
        for t in range(11, 19):
            assert torch.equal(model(out[:, :t])[0][:, -1].argmax(-1), out[:, t])


def test_sampling_filters():
    from dijiang import sample_next_token
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).log_softmax(-1).repeat(2000, 1)
    assert set(sample_next_token(logits, top_k=2).unique().tolist()) == {2, 3}
    probs = logits[0].softmax(-1)  # 0.03, 0.09, 0.24, 0.64: top_p=0.7 keeps the two largest
    assert probs[3] < 0.7 < probs[3] + probs[2]
    assert set(sample_next_token(logits, top_p=0.7).unique().tolist()) == {2, 3}
    assert set(sample_next_token(logits, top_p=0.5).unique().tolist()) == {3}


def test_bf16_cast_keeps_decay_and_projection_fp32():
    model = GPT(tiny_config()).to_dtype(torch.bfloat16)
    attn = model.layers[0].attn
    assert attn.qkv.weight.dtype == torch.bfloat16
    assert attn.decay.dtype == torch.float32 and attn.feature_proj.dtype == torch.float32
    assert torch.equal(attn.decay, decay_schedule(4))
    logits, _ = model(torch.randint(0, 97, (1, 300)))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    # a plain .to(bf16) rounds the slowest decay to 1.0 (no forgetting): refused with the fix named
    with pytest.raises(ValueError, match='to_dtype'):
        GPT(tiny_config()).to(torch.bfloat16)(torch.randint(0, 97, (1, 3)))


def test_checkpoint_round_trip_and_overrides(tmp_path):
    torch.manual_seed(4)
    model = GPT(tiny_config(feature_map='mc'))
    model.save_checkpoint(tmp_path, step=7)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['ckpt.pt', 'config.json']
    loaded = GPT.from_checkpoint(tmp_path, form='recurrent')
    assert loaded.layers[0].attn.form == 'recurrent' and loaded.config.feature_map == 'mc'
    assert 'form' not in json.loads((tmp_path / 'config.json').read_text())  # how to run is not what the model is
    idx = torch.randint(0, 97, (1, 20))
    with torch.no_grad():
        assert rel_err(loaded(idx)[0], model(idx)[0]) < 1e-5
    with pytest.raises(ValueError, match='unknown config field.*nonsense'):
        GPT.from_checkpoint(tmp_path, nonsense=1)
    with pytest.raises(ValueError, match='convert.py or train.py'):
        GPT.from_checkpoint(tmp_path / 'missing')
    with pytest.raises(ValueError, match="form='sideways'"):
        GPT(tiny_config(), form='sideways')


def test_linearizing_a_softmax_checkpoint_keeps_every_pretrained_weight(tmp_path):
    torch.manual_seed(6)
    teacher = GPT(tiny_config(attention='softmax'))
    teacher.save_checkpoint(tmp_path)
    student = GPT.from_checkpoint(tmp_path, attention='dijiang')
    student_params = student.state_dict()
    for name, tensor in teacher.state_dict().items():
        assert torch.equal(student_params[name], tensor), name
    attn = student.layers[1].attn
    assert torch.equal(attn.decay, decay_schedule(4)) and torch.equal(attn.feature_proj, projection_matrix(8, 'qmc', 1))
    assert torch.equal(attn.group_norm.weight, torch.ones(32)) and attn.gate.weight.abs().max() > 0
    student.save_checkpoint(tmp_path / 'dijiang')
    with pytest.raises(ValueError, match="missing.*unexpected.*gate"):
        GPT.from_checkpoint(tmp_path / 'dijiang', attention='softmax')


def test_named_configs_have_pythia_sizes():
    # parameter counts of the Pythia suite as EleutherAI reports them (total, with both embeddings)
    expected = {'pythia-70m': 70_426_624, 'pythia-160m': 162_322_944, 'pythia-410m': 405_334_016}
    for name, count in expected.items():
        with torch.device('meta'):
            model = GPT(GPTConfig.named(name, attention='softmax'))
        assert model.num_params() == count, name
    with torch.device('meta'):
        dijiang = GPT(GPTConfig.named('pythia-70m'))
    # DiJiang adds W_G (C x C) and a GroupNorm (2 C) per layer: 1.57M for 70M, as the notes say
    assert dijiang.num_params() - expected['pythia-70m'] == 6 * (512 * 512 + 2 * 512)
    assert math.isclose(6 * 512 * 512 / 1e6, 1.57, rel_tol=0.01)


LLAMA_TINY = dict(vocab_size=97, n_layer=2, n_head=6, n_kv_head=2, n_embd=48, intermediate_size=40, norm='rmsnorm',
                  mlp='swiglu', bias=False, parallel_residual=False, rotary_pct=1.0, rotary_base=100000.0)


def test_named_configs_have_llama_family_sizes():
    # parameter counts as Hugging Face reports them for each model (SmolLM2's head is its embedding)
    expected = {'smollm2-135m': 134_515_008, 'llama2-7b': 6_738_415_616, 'llama3-8b': 8_030_261_248}
    for name, count in expected.items():
        with torch.device('meta'):
            assert GPT(GPTConfig.named(name, attention='softmax')).num_params() == count, name


@pytest.mark.parametrize('tie', [False, True])
def test_grouped_query_dijiang_forms_agree_and_each_query_head_keeps_its_own_state(tie):
    """With 6 query heads over 2 key/value heads the three forms are one function (logits and every
    gradient within 1e-5 of the float64 parallel form), and each query head's output is the float64
    formula on its group's key and value head, with its own decay."""
    torch.manual_seed(8)
    config = GPTConfig(**LLAMA_TINY, tie_embeddings=tie)
    ref_model = GPT(config, form='parallel').double()
    idx, targets = torch.randint(0, 97, (2, 37)), torch.randint(0, 97, (2, 37))
    ref_logits, ref_loss = ref_model(idx, targets)
    ref_loss.backward()
    ref_grads = {name: p.grad for name, p in ref_model.named_parameters()}
    for form in ('chunk', 'recurrent'):
        model = GPT(GPTConfig(**LLAMA_TINY, tie_embeddings=tie, chunk_size=8), form=form)
        model.load_state_dict(ref_model.state_dict())
        logits, loss = model(idx, targets)
        loss.backward()
        assert rel_err(logits, ref_logits) < 1e-5, form
        for name, p in model.named_parameters():
            assert rel_err(p.grad, ref_grads[name]) < 1e-5, (form, name)
    attn, x = ref_model.layers[0].attn, torch.randn(1, 21, 48, dtype=torch.float64)
    cos, sin = dijiang.rotary_cos_sin(torch.arange(21), 8, 100000.0)
    q, k, v = dijiang.split_heads(attn.qkv(x), config)
    q, k = dijiang.apply_rotary(q, cos, sin), dijiang.apply_rotary(k, cos, sin)
    o, _ = attn.attend(q, k, v, None)
    for h in range(6):  # query head h reads key/value head h // 3
        expected, _ = reference_attention(q[:, :, h:h + 1], k[:, :, h // 3:h // 3 + 1], v[:, :, h // 3:h // 3 + 1],
                                          attn.feature_proj, attn.decay[h:h + 1])
        assert rel_err(o[:, :, h], expected[:, :, 0]) < 1e-12, h


def test_tied_embeddings_stay_tied_through_a_checkpoint(tmp_path):
    model = GPT(GPTConfig(**LLAMA_TINY, tie_embeddings=True))
    assert model.lm_head.weight is model.embed.weight
    model.save_checkpoint(tmp_path)
    loaded = GPT.from_checkpoint(tmp_path)
    assert loaded.lm_head.weight is loaded.embed.weight and torch.equal(loaded.embed.weight, model.embed.weight)
    assert loaded.num_params() == model.num_params() == GPT(GPTConfig(**LLAMA_TINY)).num_params() - 97 * 48


def test_softmax_grouped_query_kv_cache_holds_the_shared_heads():
    torch.manual_seed(9)
    model = GPT(GPTConfig(**LLAMA_TINY, attention='softmax'))
    idx = torch.randint(0, 97, (2, 30))
    with torch.no_grad():
        full, _ = model(idx)
        cache = model.new_cache()
        pieces = [model(idx[:, :20], cache=cache)[0]] + [model(idx[:, t:t + 1], cache=cache)[0] for t in range(20, 30)]
    assert cache.layers[0][0].shape == (2, 2, 30, 8)  # (B, H_kv, T, D): the cache holds 2 heads, not 6
    assert rel_err(torch.cat(pieces, dim=1), full) < 1e-5
    assert model.cache_bytes(2, 30, torch.float32) == 2 * 2 * 2 * 2 * 30 * 8 * 4
    assert GPT(GPTConfig(**LLAMA_TINY)).cache_bytes(2, 10 ** 6) == 2 * 2 * 6 * 8 * 8 * 4  # one state at any context


def test_a_damaged_config_or_weight_is_one_value_error(tmp_path):
    with pytest.raises(ValueError, match="rotary_pct=2.0"):
        tiny_config(rotary_pct=2.0)
    with pytest.raises(ValueError, match="norm_eps='1e-5': expected float"):
        tiny_config(norm_eps='1e-5')
    with pytest.raises(ValueError, match="n_kv_head=3"):
        tiny_config(n_kv_head=3)
    model = GPT(tiny_config())
    with torch.no_grad():
        model.layers[1].mlp.up.weight[3, 4] = float('nan')
    model.save_checkpoint(tmp_path)
    with pytest.raises(ValueError, match=r"weight layers\.1\.mlp\.up\.weight holds NaN"):
        GPT.from_checkpoint(tmp_path)
