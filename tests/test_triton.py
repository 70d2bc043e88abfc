"""
Tests of fast/triton_attention.py against a direct float64 evaluation of the DiJiang attention formula.
They need a GPU and are skipped on CPU; with TRITON_INTERPRET=1 they run on the CPU through
Triton's interpreter (slow, for kernel development: shorter sequences there), except the CUDA-graph,
opcheck and 64K-token tests. Tolerances: relative errors ||x - ref|| / ||ref|| under 1e-2 wherever
bf16 takes part (inputs, outputs or matrix operands), 1e-5 for the fp32 decoding step.
"""

import math
import os

import pytest
import torch

triton = pytest.importorskip("triton")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() or INTERPRET),
                                reason="Triton kernels need a CUDA GPU (or TRITON_INTERPRET=1)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

from conftest import reference_attention, rel_err  # noqa: E402
from dijiang import projection_matrix  # noqa: E402
from fast import triton_attention  # noqa: E402
from fast.triton_attention import chunk_attention, recurrent_step, supports  # noqa: E402

# The Pythia suite's head sizes: 70m to 410m, 2.8b, 1.4b / 6.9b / 12b, and 1b.
HEAD_DIMS = [64, 80, 128, 256]


def make_inputs(B, T, H, D, dtype=torch.bfloat16, seed=0, fused=False, H_kv=None, identity=False):
    """Random q (B, T, H, D) and k, v (B, T, H_kv, D) like the model's, proj = orthonormal @ diag(normal)
    like the released P (None with identity=True, where q and k are scaled by D^-1/4 so that q . k stays
    near 1), and RetNet's decay schedule. fused=True makes q, k, v strided views of one qkv tensor."""
    H_kv = H_kv or H
    g = torch.Generator().manual_seed(seed)
    if fused:
        qkv = torch.randn(B, T, H, 3 * D, generator=g).to(DEVICE, dtype)
        q, k, v = qkv.split(D, dim=-1)
    else:
        q = torch.randn(B, T, H, D, generator=g).to(DEVICE, dtype)
        k, v = (torch.randn(B, T, H_kv, D, generator=g).to(DEVICE, dtype) for _ in range(2))
    ortho, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    proj = (ortho * torch.randn(D, generator=g, dtype=torch.float64)).float().contiguous().to(DEVICE)
    if identity:
        q, k, proj = q * D ** -0.25, k * D ** -0.25, None
    decay = (1 - torch.exp(torch.linspace(math.log(1 / 32), math.log(1 / 512), H))).to(DEVICE)
    return q, k, v, proj, decay


def check_against_float64(q, k, v, proj, decay, with_state=True, chunk_size=64, seed=0):
    """chunk_attention forward and backward against reference_attention in float64: o, the final state,
    and the gradients of q, k, v and the initial state through a random loss on o and the final state."""
    B, T, H, D = q.shape
    g = torch.Generator().manual_seed(seed)
    inputs = [q, k, v] + ([(torch.randn(B, H, D, D, generator=g) * 0.1).to(DEVICE)] if with_state else [])
    leaves = [x.detach().requires_grad_() for x in inputs]
    o, final = chunk_attention(*leaves[:3], proj, decay, initial_state=leaves[3] if with_state else None,
                               output_final_state=True, chunk_size=chunk_size)
    do = torch.randn(o.shape, generator=g).to(DEVICE, o.dtype)
    d_final = (torch.randn(final.shape, generator=g) * 0.1).to(DEVICE)
    grads = torch.autograd.grad((o.float() * do).sum() + (final * d_final).sum(), leaves)

    ref_leaves = [x.detach().double().requires_grad_() for x in inputs]
    o_ref, final_ref = reference_attention(*ref_leaves[:3], proj, decay, ref_leaves[3] if with_state else None)
    ref_grads = torch.autograd.grad((o_ref * do.double()).sum() + (final_ref * d_final.double()).sum(), ref_leaves)
    assert o.dtype == v.dtype and o.shape == q.shape and final.shape == (B, H, D, D)
    assert [grad.shape for grad in grads] == [x.shape for x in inputs]
    errors = dict(o=rel_err(o, o_ref), final_state=rel_err(final, final_ref),
                  **{name: rel_err(grad, ref) for name, grad, ref in zip(("dq", "dk", "dv", "d_initial_state"),
                                                                          grads, ref_grads)})
    assert max(errors.values()) < 1e-2, errors


@pytest.mark.parametrize("T", [1, 63, 65, 1000] + ([] if INTERPRET else [4097]))
def test_forward_and_backward_match_float64(T):
    check_against_float64(*make_inputs(2, T, 2, 64, fused=True, seed=T), seed=T)


@pytest.mark.parametrize("feature_map", ["qmc", "mc", "performer"])
def test_every_feature_map_matches_float64(feature_map):
    """The kernel takes any P: the model's three softmax feature maps, forward and backward."""
    q, k, v, _, decay = make_inputs(2, 200, 2, 64, seed=5)
    check_against_float64(q, k, v, projection_matrix(64, feature_map, seed=3).to(DEVICE), decay, with_state=False)


@pytest.mark.parametrize("feature_map", ["softmax", "identity"])
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_head_dims_and_feature_maps_match_float64(D, feature_map):
    """80 runs padded to 128; 256 splits the state over programs and computes phi in its own kernel."""
    T = 70 if INTERPRET else 1000
    check_against_float64(*make_inputs(1, T, 2, D, seed=D, identity=feature_map == "identity"), seed=D)


@pytest.mark.parametrize("T", [1, 63, 65] + ([] if INTERPRET else [300, 2049]))
@pytest.mark.parametrize("feature_map", ["softmax", "identity"])
def test_widest_heads_at_odd_lengths(T, feature_map):
    check_against_float64(*make_inputs(1, T, 2, 256, seed=T, identity=feature_map == "identity"),
                          with_state=T % 2 == 1, seed=T)


@pytest.mark.parametrize("H,H_kv,D,feature_map", [(6, 2, 64, "softmax"), (9, 3, 64, "identity"), (9, 3, 64, "softmax"),
                                                  (4, 1, 80, "softmax"), (2, 1, 256, "softmax"), (2, 1, 256, "identity")])
def test_grouped_kv_heads_match_float64(H, H_kv, D, feature_map):
    """Query head h reads kv head h // (H / H_kv) with its own decay and state; dk, dv sum over the group."""
    for T in ([45] if INTERPRET else [45, 777]):
        check_against_float64(*make_inputs(1, T, H, D, seed=T + H, H_kv=H_kv, identity=feature_map == "identity"),
                              seed=T)


def test_float32_inputs_and_small_chunks():
    for D, chunk_size in ((64, 32), (128, 16), (256, 32)):
        check_against_float64(*make_inputs(1, 100, 2, D, dtype=torch.float32, seed=D), chunk_size=chunk_size)


def test_state_passing_equals_one_pass():
    # Two calls chained through the state give the same result as one call over the whole sequence.
    q, k, v, proj, decay = make_inputs(2, 300, 2, 64)
    o, final = chunk_attention(q, k, v, proj, decay, output_final_state=True)
    o1, s1 = chunk_attention(q[:, :137], k[:, :137], v[:, :137], proj, decay, output_final_state=True)
    o2, s2 = chunk_attention(q[:, 137:], k[:, 137:], v[:, 137:], proj, decay, initial_state=s1, output_final_state=True)
    assert rel_err(torch.cat([o1, o2], 1), o) < 1e-2
    assert rel_err(s2, final) < 5e-3  # two bf16-operand computations


@pytest.mark.skipif(INTERPRET, reason="too slow for the interpreter")
def test_long_sequence_stays_finite_and_exact():
    # At 65,536 tokens, an absolute gamma^(-n) would overflow; check the last token and the final
    # state against a float64 sum over the whole sequence.
    T, H = 65536, 4
    q, k, v, proj, decay = make_inputs(1, T, H, 64)
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    o, final = chunk_attention(*leaves, proj, decay, output_final_state=True)
    grads = torch.autograd.grad(o, leaves, torch.randn_like(o))
    assert torch.isfinite(o).all() and torch.isfinite(final).all()
    assert all(torch.isfinite(g).all() for g in grads)
    phi_q, phi_k = (torch.softmax(x.double() @ proj.double(), -1) for x in (q, k))
    k_decay = decay.double()[None, :] ** torch.arange(T - 1, -1, -1, device=DEVICE)[:, None]  # (T, H)
    final_ref = torch.einsum("bmhd,bmhe->bhde", phi_k * k_decay[None, :, :, None], v.double())
    o_last_ref = torch.einsum("bhd,bhde->bhe", phi_q[:, -1], final_ref)
    assert rel_err(final, final_ref) < 1e-2
    assert rel_err(o[:, -1], o_last_ref) < 1e-2


def test_recurrent_step_matches_chunk_attention():
    B, T, H, D = 2, 40, 2, 64
    q, k, v, proj, decay = make_inputs(B, T, H, D)
    o_ref, final_ref = reference_attention(q, k, v, proj, decay)
    state = torch.zeros(B, H, D, D, device=DEVICE)
    outs = [recurrent_step(q[:, t], k[:, t], v[:, t], proj, decay, state) for t in range(T - 1)]
    outs.append(recurrent_step(q[:, -1:], k[:, -1:], v[:, -1:], proj, decay, state)[:, 0])  # (B, 1, H, D) form
    o = torch.stack(outs, 1)
    assert o.dtype == v.dtype
    assert rel_err(o, o_ref) < 1e-2
    assert rel_err(state, final_ref) < 1e-4


@pytest.mark.parametrize("D,H,H_kv,feature_map", [(D, 2, 2, "softmax") for D in HEAD_DIMS] + [
    (64, 2, 2, "identity"), (256, 2, 2, "identity"), (64, 9, 3, "softmax"), (256, 6, 2, "identity")])
def test_recurrent_step_matches_float64(D, H, H_kv, feature_map):
    """fp32 steps from a random state against the formula: every head size, the identity map, grouped kv heads."""
    q, k, v, proj, decay = make_inputs(3, 5, H, D, dtype=torch.float32, seed=D + H, H_kv=H_kv,
                                       identity=feature_map == "identity")
    state = torch.randn(3, H, D, D, device=DEVICE)
    s0 = state.clone()
    outs = [recurrent_step(q[:, t], k[:, t], v[:, t], proj, decay, state) for t in range(5)]
    o_ref, final_ref = reference_attention(q, k, v, proj, decay, s0)
    assert rel_err(torch.stack(outs, 1), o_ref) < 1e-5
    assert rel_err(state, final_ref) < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_recurrent_step_cuda_graph():
    B, H, D = 4, 16, 64
    q, k, v, proj, decay = make_inputs(B, 3, H, D)
    state = torch.zeros(B, H, D, D, device=DEVICE)
    static_in = [x[:, 0].clone() for x in (q, k, v)]
    recurrent_step(*static_in, proj, decay, state)  # compile outside the capture
    state.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = recurrent_step(*static_in, proj, decay, state)
    state.zero_()
    outs = []
    for t in range(3):
        for dst, src in zip(static_in, (q, k, v)):
            dst.copy_(src[:, t])
        graph.replay()
        outs.append(static_out.clone())
    o_ref, final_ref = reference_attention(q, k, v, proj, decay)
    assert rel_err(torch.stack(outs, 1), o_ref) < 1e-2
    assert rel_err(state, final_ref) < 1e-4


def test_matches_dijiang_attention_chunk():
    import dijiang
    q, k, v, proj, decay = make_inputs(2, 201, 4, 64, dtype=torch.float32)
    s0 = torch.randn(2, 4, 64, 64, device=DEVICE) * 0.1
    o, final = chunk_attention(q, k, v, proj, decay, initial_state=s0, output_final_state=True)
    phi_q, phi_k = dijiang.feature_map(q, proj), dijiang.feature_map(k, proj)
    o_torch, final_torch = dijiang.attention_chunk(phi_q, phi_k, v, decay, s0.clone(), chunk_size=64)
    assert rel_err(o, o_torch) < 1e-2
    assert rel_err(final, final_torch) < 1e-2


def test_supports_states_the_limits():
    assert all(supports(D) for D in HEAD_DIMS + [1, 32, 100])
    assert supports(64, 16, torch.bfloat16, "identity") and supports(256, 128, torch.float16)
    assert not supports(257) and not supports(64, chunk_size=48) and not supports(64, dtype=torch.float64)
    assert not supports(64, dtype=torch.float32, feature_map="identity")  # see supports()
    assert not supports(64, feature_map="qmc")  # the model's softmax maps are all 'softmax' here
    q, k, v, proj, decay = make_inputs(1, 8, 2, 64)
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_attention(q, k, v, proj, decay, chunk_size=48)
    with pytest.raises(ValueError, match="H_kv dividing H"):
        chunk_attention(q, k[:, :, :1].expand(1, 8, 3, 64), v[:, :, :1].expand(1, 8, 3, 64), proj, decay)
    with pytest.raises(NotImplementedError, match="identity map with torch.float32"):
        chunk_attention(q.float(), k.float(), v.float(), None, decay)
    with pytest.raises(NotImplementedError, match="head_dim 300"):
        x = torch.zeros(1, 8, 2, 300, device=DEVICE)
        chunk_attention(x, x, x, None, decay)


@pytest.mark.skipif(INTERPRET, reason="the AOT dispatch check crashes Triton's interpreter")
def test_torch_ops_pass_opcheck():
    """The torch.library registrations that torch.compile relies on: schema, fake (meta) shapes and
    strides equal to the real ones, autograd through the op, and AOT dispatch with dynamic shapes."""
    q, k, v, proj, decay = make_inputs(2, 37, 2, 16, dtype=torch.float32)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    s0 = torch.randn(2, 2, 16, 16, device=DEVICE, requires_grad=True)
    torch.library.opcheck(triton_attention._chunk_attention_op, (q, k, v, proj, decay, None, False, 16))
    torch.library.opcheck(triton_attention._chunk_attention_op, (q, k, v, proj, decay, s0, True, 32))
    state = torch.randn(2, 2, 16, 16, device=DEVICE)
    torch.library.opcheck(triton_attention._recurrent_step_op,
                          (q[:, 0].detach(), k[:, 0].detach(), v[:, 0].detach(), proj, decay, state))
    # grouped kv heads with the identity map, and the widest heads
    for H, H_kv, D, identity in ((4, 2, 16, True), (2, 1, 256, False)):
        q, k, v, proj, decay = make_inputs(1, 20, H, D, dtype=torch.float32, H_kv=H_kv, identity=identity)
        q, k, v = (x.requires_grad_() for x in (q, k, v))
        torch.library.opcheck(triton_attention._chunk_attention_op, (q, k, v, proj, decay, None, True, 16))
        torch.library.opcheck(triton_attention._recurrent_step_op,
                              (q[:, 0].detach(), k[:, 0].detach(), v[:, 0].detach(), proj, decay,
                               torch.randn(1, H, D, D, device=DEVICE)))
