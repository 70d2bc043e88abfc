"""
Fused Triton kernels for DiJiang attention on the GPU.

The math is the one in dijiang.py: phi(x) = softmax(x @ P) over the feature dim, and
    o[b,n,h] = sum_{m<=n} gamma_h^(n-m) (phi(q_n) . phi(k_m)) v_m        (no normalizer)
with the fp32 recurrent state S_n = gamma S_{n-1} + phi(k_n)^T v_n, o_n = phi(q_n) S_n.

chunk_attention() is the training / prefill path (forward and backward kernels), recurrent_step()
the one-token decoding update. Both compute the feature map inside the kernel, so phi(q), phi(k)
never touch device memory.

How chunk_attention splits the work. The sequence of each (batch, head) is cut into blocks of
L = NSUB * C tokens, each block into NSUB chunks of C tokens (C = chunk_size, 64 by default):
  1. _block_state_kernel: one program per block computes the block's own state contribution
     sum_u gamma^(len-1-u) phi(k_u)^T v_u, all blocks in parallel.
  2. _state_scan_kernel: a short sequential scan over blocks turns those into the state at the
     end of every block (the only sequential step, over T / L blocks of D x D numbers).
  3. _output_kernel: one program per block starts from the previous block's end state and walks
     its chunks: intra-chunk (phi_q phi_k^T * decay mask) v plus inter-chunk phi_q S.
Every decay is relative (gamma^(i-j) with i >= j, gamma^len of a chunk or block), so nothing
overflows at any length; states and accumulators are fp32, matrix products take bf16 operands.
The backward mirrors this: _dq_kernel walks the chunks forward (it needs S) and also emits each
block's reverse-state contribution, the same scan runs backwards, and _dkdv_kernel walks the chunks
backwards from the reverse state.
"""

import os
from typing import Optional

import torch
import triton
import triton.language as tl

# Triton's CPU interpreter (TRITON_INTERPRET=1, used to develop and test without a GPU) computes
# bf16 matrix products wrongly, so under it the products take fp32 operands instead.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MMA_DTYPE = tl.constexpr(tl.float32 if INTERPRET else tl.bfloat16)
LOG2E = tl.constexpr(1.4426950408889634)

# Launch settings. Up to head_dim 64, 4 warps in both directions suit an H100 best. Wider heads
# (padded to 128) take no load pipelining, since Triton's default stages overflow the H100's shared
# memory there, and 8 warps in the backward.
NUM_WARPS_FWD = 4
NUM_WARPS_BWD = 4
MIN_PROGRAMS = 1024  # keep at least this many block programs (about 8 per SM on an H100)
NUM_STAGES_WIDE = 1
NUM_WARPS_BWD_WIDE = 8


# -----------------------------------------------------------------------------
# Device helpers

@triton.jit
def _load_proj(proj, D, BLOCK_D: tl.constexpr):
    """P (D, D) fp32 padded to (BLOCK_D, BLOCK_D), split into hi + lo MMA-dtype parts: x @ P_hi +
    x @ P_lo carries P to about fp32 precision, while one bf16 product would leave ~1e-3
    relative error in the logits, which the softmax turns into ~1e-3 error in phi."""
    offs = tl.arange(0, BLOCK_D)
    mask = (offs[:, None] < D) & (offs[None, :] < D)
    p = tl.load(proj + offs[:, None] * D + offs[None, :], mask=mask, other=0.0)
    p_hi = p.to(MMA_DTYPE)
    p_lo = (p - p_hi.to(tl.float32)).to(MMA_DTYPE)
    return p_hi, p_lo


@triton.jit
def _feature_map(x, p_hi, p_lo, D, BLOCK_D: tl.constexpr, SPLIT_X: tl.constexpr):
    """phi = softmax(x @ P) in fp32 for a (rows, BLOCK_D) tile; padded feature columns get 0.
    bf16 x is exact in the MMA dtype; other dtypes are split into hi + lo parts too."""
    x_hi = x.to(MMA_DTYPE)
    z = tl.dot(x_hi, p_lo, tl.dot(x_hi, p_hi))
    if SPLIT_X:
        x_lo = (x.to(tl.float32) - x_hi.to(tl.float32)).to(MMA_DTYPE)
        z = tl.dot(x_lo, p_hi, z)
    z = tl.where((tl.arange(0, BLOCK_D) < D)[None, :], z, float("-inf"))
    e = tl.exp2((z - tl.max(z, axis=1)[:, None]) * LOG2E)
    return e / tl.sum(e, axis=1)[:, None]


@triton.jit
def _feature_map_backward(phi, dphi, p_hi):
    """dL/dx from dL/dphi through the softmax (dz = phi * (dphi - <dphi, phi>)) and z = x @ P."""
    dz = phi * (dphi - tl.sum(dphi * phi, axis=1)[:, None])
    return tl.dot(dz.to(MMA_DTYPE), tl.trans(p_hi))


@triton.jit
def _decay_powers(exponent, valid, log2_gamma):
    """gamma^exponent where valid, else 0; invalid entries never evaluate gamma to a power."""
    return tl.exp2(tl.where(valid, exponent.to(tl.float32) * log2_gamma, float("-inf")))


@triton.jit
def _tile_ptrs(base, b, h, t, s_b, s_t, s_h, BLOCK_D: tl.constexpr):
    """Pointers to rows t of head h, batch b, of a (B, T, H, D) tensor with last dim contiguous."""
    return base + b.to(tl.int64) * s_b + h * s_h + t.to(tl.int64)[:, None] * s_t + tl.arange(0, BLOCK_D)[None, :]


@triton.jit
def _block_setup(decay, proj, T, H, D, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, NSUB: tl.constexpr):
    """What every program of a chunk-walking kernel starts from: its block j and (b, h), the decay
    and P, and the decay masks, which are the same for every chunk."""
    j, bh = tl.program_id(0), tl.program_id(1)
    log2_gamma = tl.log2(tl.load(decay + bh % H))
    p_hi, p_lo = _load_proj(proj, D, BLOCK_D)
    rows = tl.arange(0, BLOCK_T)
    # gamma^(t-t') for t >= t' inside a chunk, and gamma^(t+1) from the state before the chunk
    causal_decay = _decay_powers(rows[:, None] - rows[None, :], rows[:, None] >= rows[None, :], log2_gamma)
    q_decay = _decay_powers(rows + 1, rows >= 0, log2_gamma)
    block_start = j * BLOCK_T * NSUB
    block_len = tl.minimum(BLOCK_T * NSUB, T - block_start)
    return j, bh, log2_gamma, p_hi, p_lo, rows, causal_decay, q_decay, block_start, block_len


@triton.jit
def _load_chunk(q, k, v, b, h, t, s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh,
                p_hi, p_lo, T, D, BLOCK_D: tl.constexpr, SPLIT_X: tl.constexpr):
    """Rows t of q, k, v for (b, h): phi(q), phi(k) in fp32, v in the MMA dtype, and the tile mask."""
    mask = (t < T)[:, None] & (tl.arange(0, BLOCK_D) < D)[None, :]
    qx = tl.load(_tile_ptrs(q, b, h, t, s_qb, s_qt, s_qh, BLOCK_D), mask=mask, other=0.0)
    kx = tl.load(_tile_ptrs(k, b, h, t, s_kb, s_kt, s_kh, BLOCK_D), mask=mask, other=0.0)
    vx = tl.load(_tile_ptrs(v, b, h, t, s_vb, s_vt, s_vh, BLOCK_D), mask=mask, other=0.0).to(MMA_DTYPE)
    phi_q = _feature_map(qx, p_hi, p_lo, D, BLOCK_D, SPLIT_X)
    phi_k = _feature_map(kx, p_hi, p_lo, D, BLOCK_D, SPLIT_X)
    return mask, phi_q, phi_k, vx


@triton.jit
def _advance_state(state, phi_k, vx, chunk_len, rows, log2_gamma):
    """The state after a chunk of chunk_len tokens: gamma^len S + sum_t gamma^(len-1-t) phi_k[t]^T v_t."""
    k_decay = _decay_powers(chunk_len - 1 - rows, rows < chunk_len, log2_gamma)
    return state * tl.exp2(chunk_len * log2_gamma) + tl.dot(tl.trans((phi_k * k_decay[:, None]).to(MMA_DTYPE)), vx)


# -----------------------------------------------------------------------------
# Forward kernels

@triton.jit
def _block_state_kernel(k, v, proj, decay, states,
                        s_kb, s_kt, s_kh, s_vb, s_vt, s_vh,
                        T, H, D, NB,
                        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, NSUB: tl.constexpr,
                        SPLIT_X: tl.constexpr):
    """states[bh, j] = sum over block j of gamma^(len-1-u) phi(k_u)^T v_u  (own contribution only)."""
    j, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    log2_gamma = tl.log2(tl.load(decay + h))
    p_hi, p_lo = _load_proj(proj, D, BLOCK_D)
    offs_d = tl.arange(0, BLOCK_D)
    rows = tl.arange(0, BLOCK_T)
    block_start = j * BLOCK_T * NSUB
    block_len = tl.minimum(BLOCK_T * NSUB, T - block_start)

    acc = tl.zeros((BLOCK_D, BLOCK_D), tl.float32)
    for c in range(tl.cdiv(block_len, BLOCK_T)):
        u = c * BLOCK_T + rows  # position inside the block
        mask = (u < block_len)[:, None] & (offs_d < D)[None, :]
        kx = tl.load(_tile_ptrs(k, b, h, block_start + u, s_kb, s_kt, s_kh, BLOCK_D), mask=mask, other=0.0)
        vx = tl.load(_tile_ptrs(v, b, h, block_start + u, s_vb, s_vt, s_vh, BLOCK_D), mask=mask, other=0.0)
        phi_k = _feature_map(kx, p_hi, p_lo, D, BLOCK_D, SPLIT_X)
        phi_k *= _decay_powers(block_len - 1 - u, u < block_len, log2_gamma)[:, None]
        acc = tl.dot(tl.trans(phi_k.to(MMA_DTYPE)), vx.to(MMA_DTYPE), acc)
    tile = offs_d[:, None] * BLOCK_D + offs_d[None, :]
    tl.store(states + (bh * NB + j).to(tl.int64) * BLOCK_D * BLOCK_D + tile, acc)


@triton.jit
def _decay_combine(a1, s1, a2, s2):
    # Composition of two affine steps S -> a S + s: first (a1, s1), then (a2, s2).
    return a1 * a2, s1 * a2 + s2


@triton.jit
def _state_scan_kernel(states, carry_in, carry_out, decay,
                       T, H, D, NB,
                       BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, TILE: tl.constexpr,
                       GROUP: tl.constexpr, REVERSE: tl.constexpr,
                       HAS_CARRY_IN: tl.constexpr, HAS_CARRY_OUT: tl.constexpr):
    """In place over the blocks of one (b, h), for one TILE of the D x D state:
    X_j = gamma^len_j X_prev + states[j], where prev is j-1 (or j+1 when REVERSE), starting from
    carry_in (user layout (B, H, D, D)) or 0; writes the last X to carry_out.
    GROUP blocks are loaded at once and combined with an associative scan, so the sequential
    chain has NB / GROUP memory round trips instead of NB."""
    bh, tile_id = tl.program_id(0), tl.program_id(1)
    log2_gamma = tl.log2(tl.load(decay + bh % H))
    offs = tile_id * TILE + tl.arange(0, TILE)  # flat index into the padded (BLOCK_D, BLOCK_D) state
    row, col = offs // BLOCK_D, offs % BLOCK_D
    user_mask = (row < D) & (col < D)
    user_offs = bh.to(tl.int64) * D * D + row * D + col
    if HAS_CARRY_IN:
        carry = tl.load(carry_in + user_offs, mask=user_mask, other=0.0)
    else:
        carry = tl.zeros((TILE,), tl.float32)

    step = tl.arange(0, GROUP)
    base = states + bh.to(tl.int64) * NB * BLOCK_D * BLOCK_D
    for g in range(tl.cdiv(NB, GROUP)):
        valid = g * GROUP + step < NB
        if REVERSE:
            j = NB - 1 - (g * GROUP + step)
        else:
            j = g * GROUP + step
        ptrs = base + j[:, None] * BLOCK_D * BLOCK_D + offs[None, :]
        own = tl.load(ptrs, mask=valid[:, None], other=0.0)
        block_len = tl.minimum(BLOCK_L, T - j * BLOCK_L)
        # Past the last block, the identity step (1, 0) carries the state through unchanged.
        a = tl.where(valid, tl.exp2(block_len.to(tl.float32) * log2_gamma), 1.0)
        a = a[:, None] + tl.zeros((GROUP, TILE), tl.float32)
        a_scan, s_scan = tl.associative_scan((a, own), axis=0, combine_fn=_decay_combine)
        x = a_scan * carry[None, :] + s_scan
        tl.store(ptrs, x, mask=valid[:, None])
        carry = tl.sum(tl.where(step[:, None] == GROUP - 1, x, 0.0), axis=0)
    if HAS_CARRY_OUT:
        tl.store(carry_out + user_offs, carry, mask=user_mask)


@triton.jit
def _load_state(states, init, bh, j, NB, D, BLOCK_D: tl.constexpr, HAS_INIT: tl.constexpr):
    """The D x D state entering block j: states[bh, j] for j in range, else init (or 0).
    Used as end state of block j-1 (forward) and as reverse state of block j+1 (backward)."""
    offs_d = tl.arange(0, BLOCK_D)
    in_range = (j >= 0) & (j < NB)
    tile = offs_d[:, None] * BLOCK_D + offs_d[None, :]
    s = tl.load(states + (bh * NB + j).to(tl.int64) * BLOCK_D * BLOCK_D + tile, mask=in_range, other=0.0)
    if HAS_INIT:
        user_mask = (offs_d[:, None] < D) & (offs_d[None, :] < D) & ((j < 0) | (j >= NB))
        s += tl.load(init + bh.to(tl.int64) * D * D + offs_d[:, None] * D + offs_d[None, :], mask=user_mask, other=0.0)
    return s


@triton.jit
def _output_kernel(q, k, v, o, proj, decay, states, init,
                   s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_ob, s_ot, s_oh,
                   T, H, D, NB,
                   BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, NSUB: tl.constexpr,
                   SPLIT_X: tl.constexpr, HAS_INIT: tl.constexpr):
    """o for the chunks of block j, from the state at the end of block j-1."""
    j, bh, log2_gamma, p_hi, p_lo, rows, causal_decay, q_decay, block_start, block_len = _block_setup(
        decay, proj, T, H, D, BLOCK_T, BLOCK_D, NSUB)
    b, h = bh // H, bh % H
    state = _load_state(states, init, bh, j - 1, NB, D, BLOCK_D, HAS_INIT)  # (D, D) fp32
    for c in range(tl.cdiv(block_len, BLOCK_T)):
        t = block_start + c * BLOCK_T + rows
        mask, phi_q, phi_k, vx = _load_chunk(q, k, v, b, h, t, s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh,
                                             p_hi, p_lo, T, D, BLOCK_D, SPLIT_X)
        scores = tl.dot(phi_q.to(MMA_DTYPE), tl.trans(phi_k.to(MMA_DTYPE))) * causal_decay  # (C, C)
        out = tl.dot(scores.to(MMA_DTYPE), vx)
        out = tl.dot((phi_q * q_decay[:, None]).to(MMA_DTYPE), state.to(MMA_DTYPE), out)
        tl.store(_tile_ptrs(o, b, h, t, s_ob, s_ot, s_oh, BLOCK_D), out.to(o.dtype.element_ty), mask=mask)
        state = _advance_state(state, phi_k, vx, tl.minimum(BLOCK_T, T - block_start - c * BLOCK_T), rows, log2_gamma)


# -----------------------------------------------------------------------------
# Backward kernels

@triton.jit
def _dq_kernel(q, k, v, do, dq, proj, decay, states, init, rev_states,
               s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_db, s_dt, s_dh, s_ob, s_ot, s_oh,
               T, H, D, NB,
               BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, NSUB: tl.constexpr,
               SPLIT_X: tl.constexpr, HAS_INIT: tl.constexpr):
    """dq for block j (walking its chunks forward with the state S), and the block's own
    reverse-state contribution rev_states[bh, j] = sum_u gamma^(u+1) phi(q_u)^T do_u."""
    j, bh, log2_gamma, p_hi, p_lo, rows, causal_decay, q_decay, block_start, block_len = _block_setup(
        decay, proj, T, H, D, BLOCK_T, BLOCK_D, NSUB)
    b, h = bh // H, bh % H
    state = _load_state(states, init, bh, j - 1, NB, D, BLOCK_D, HAS_INIT)
    rev_state = tl.zeros((BLOCK_D, BLOCK_D), tl.float32)
    for c in range(tl.cdiv(block_len, BLOCK_T)):
        t = block_start + c * BLOCK_T + rows
        mask, phi_q, phi_k, vx = _load_chunk(q, k, v, b, h, t, s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh,
                                             p_hi, p_lo, T, D, BLOCK_D, SPLIT_X)
        dox = tl.load(_tile_ptrs(do, b, h, t, s_db, s_dt, s_dh, BLOCK_D), mask=mask, other=0.0).to(MMA_DTYPE)

        # dphi_q[t] = sum_{t'<=t} gamma^(t-t') (do_t . v_t') phi_k[t'] + gamma^(t+1) do_t S^T
        dscores = tl.dot(dox, tl.trans(vx)) * causal_decay
        dphi_q = tl.dot(dscores.to(MMA_DTYPE), phi_k.to(MMA_DTYPE))
        dphi_q += tl.dot(dox, tl.trans(state.to(MMA_DTYPE))) * q_decay[:, None]
        dqx = _feature_map_backward(phi_q, dphi_q, p_hi)
        tl.store(_tile_ptrs(dq, b, h, t, s_ob, s_ot, s_oh, BLOCK_D), dqx.to(dq.dtype.element_ty), mask=mask)

        state = _advance_state(state, phi_k, vx, tl.minimum(BLOCK_T, T - block_start - c * BLOCK_T), rows, log2_gamma)
        u = c * BLOCK_T + rows  # position inside the block; rows past T have do = 0
        rev_decay = _decay_powers(u + 1, u < block_len, log2_gamma)
        rev_state = tl.dot(tl.trans((phi_q * rev_decay[:, None]).to(MMA_DTYPE)), dox, rev_state)
    offs_d = tl.arange(0, BLOCK_D)
    tile = offs_d[:, None] * BLOCK_D + offs_d[None, :]
    tl.store(rev_states + (bh * NB + j).to(tl.int64) * BLOCK_D * BLOCK_D + tile, rev_state)


@triton.jit
def _dkdv_kernel(q, k, v, do, dk, dv, proj, decay, rev_states, d_final,
                 s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_db, s_dt, s_dh, s_ob, s_ot, s_oh,
                 T, H, D, NB,
                 BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, NSUB: tl.constexpr,
                 SPLIT_X: tl.constexpr, HAS_D_FINAL: tl.constexpr):
    """dk, dv for block j, walking its chunks backwards with the reverse state R: the gradient
    reaching the state after a chunk, already decayed by one step, so that token t of a chunk of
    length len receives gamma^(len-1-t) R."""
    j, bh, log2_gamma, p_hi, p_lo, rows, causal_decay, q_decay, block_start, block_len = _block_setup(
        decay, proj, T, H, D, BLOCK_T, BLOCK_D, NSUB)
    b, h = bh // H, bh % H
    n_chunks = tl.cdiv(block_len, BLOCK_T)

    rev_state = _load_state(rev_states, d_final, bh, j + 1, NB, D, BLOCK_D, HAS_D_FINAL)
    for i in range(n_chunks):
        c = n_chunks - 1 - i
        t = block_start + c * BLOCK_T + rows
        chunk_len = tl.minimum(BLOCK_T, T - block_start - c * BLOCK_T)
        mask, phi_q, phi_k, vx = _load_chunk(q, k, v, b, h, t, s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh,
                                             p_hi, p_lo, T, D, BLOCK_D, SPLIT_X)
        phi_q = phi_q.to(MMA_DTYPE)
        dox = tl.load(_tile_ptrs(do, b, h, t, s_db, s_dt, s_dh, BLOCK_D), mask=mask, other=0.0).to(MMA_DTYPE)
        k_decay = _decay_powers(chunk_len - 1 - rows, rows < chunk_len, log2_gamma)
        rev = rev_state.to(MMA_DTYPE)

        # dv[t'] = sum_{t>=t'} gamma^(t-t') (phi_q[t] . phi_k[t']) do_t + gamma^(len-1-t') phi_k[t'] R
        scores = tl.dot(phi_q, tl.trans(phi_k.to(MMA_DTYPE))) * causal_decay  # (t, t')
        dvx = tl.dot(tl.trans(scores.to(MMA_DTYPE)), dox)
        dvx = tl.dot((phi_k * k_decay[:, None]).to(MMA_DTYPE), rev, dvx)
        # dphi_k[t'] = sum_{t>=t'} gamma^(t-t') (do_t . v_t') phi_q[t] + gamma^(len-1-t') v_t' R^T
        dscores = tl.dot(dox, tl.trans(vx)) * causal_decay  # (t, t')
        dphi_k = tl.dot(tl.trans(dscores.to(MMA_DTYPE)), phi_q)
        dphi_k += tl.dot(vx, tl.trans(rev)) * k_decay[:, None]
        dkx = _feature_map_backward(phi_k, dphi_k, p_hi)
        tl.store(_tile_ptrs(dk, b, h, t, s_ob, s_ot, s_oh, BLOCK_D), dkx.to(dk.dtype.element_ty), mask=mask)
        tl.store(_tile_ptrs(dv, b, h, t, s_ob, s_ot, s_oh, BLOCK_D), dvx.to(dv.dtype.element_ty), mask=mask)

        # R for the chunk before: gamma^len R + sum_t gamma^(t+1) phi_q[t]^T do_t (rows past T have do = 0).
        rev_state = rev_state * tl.exp2(chunk_len * log2_gamma) + tl.dot(
            tl.trans((phi_q.to(tl.float32) * q_decay[:, None]).to(MMA_DTYPE)), dox)


# -----------------------------------------------------------------------------
# Host side

def _check(q, k, v, proj, decay):
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must share one (B, T, H, D) shape, "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, T, H, D = q.shape
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    _check_common(q, k, v, proj, decay, H, D)
    return B, T, H, D


def _check_common(q, k, v, proj, decay, H, D):
    if D > 128:
        raise NotImplementedError(f"head_dim {D} > 128 is not supported by the Triton kernel; use kernel='torch'")
    if any(x.stride(-1) != 1 for x in (q, k, v)):
        raise ValueError("q, k, v need a contiguous last dim; call .contiguous() first")
    if proj.shape != (D, D) or proj.dtype != torch.float32:
        raise ValueError(f"proj must be a ({D}, {D}) float32 tensor, got {tuple(proj.shape)} {proj.dtype}")
    if decay.shape != (H,) or decay.dtype != torch.float32:
        raise ValueError(f"decay must be a ({H},) float32 tensor, got {tuple(decay.shape)} {decay.dtype}")


def _check_state(state, B, H, D, name):
    if state.shape != (B, H, D, D) or state.dtype != torch.float32 or not state.is_contiguous():
        raise ValueError(f"{name} must be a contiguous ({B}, {H}, {D}, {D}) float32 tensor, "
                         f"got {tuple(state.shape)} {state.dtype}")


def _sub_chunks_per_block(B, H, T, chunk_size):
    # Longer blocks write and scan fewer states; shorter blocks give more programs to the GPU.
    for nsub in (4, 2):
        if B * H * triton.cdiv(T, chunk_size * nsub) >= MIN_PROGRAMS:
            return nsub
    return 1


def _block_d(D):
    """The head dim padded to what tl.arange and tl.dot take: a power of two, 16 at least."""
    return max(16, triton.next_power_of_2(D))


def _states_shape(B, T, H, D, chunk_size):
    """The per-block states that the forward keeps for the backward: (B*H, NB, BLOCK_D, BLOCK_D)."""
    block_len = chunk_size * _sub_chunks_per_block(B, H, T, chunk_size)
    return B * H, triton.cdiv(T, block_len), _block_d(D), _block_d(D)


def _launch_options(block_d, backward):
    if block_d <= 64:
        return dict(num_warps=NUM_WARPS_BWD if backward else NUM_WARPS_FWD)
    return dict(num_warps=NUM_WARPS_BWD_WIDE if backward else NUM_WARPS_FWD, num_stages=NUM_STAGES_WIDE)


def _strides(x):
    return x.stride(0), x.stride(1), x.stride(2)


def _scan(states, carry_in, carry_out, decay, T, H, D, block_len, reverse):
    """Run _state_scan_kernel over states (B*H, NB, BD, BD) in place."""
    BH, NB, BLOCK_D, _ = states.shape
    tile = 256
    group = min(16, triton.next_power_of_2(NB))
    _state_scan_kernel[(BH, BLOCK_D * BLOCK_D // tile)](
        states, carry_in, carry_out, decay, T, H, D, NB,
        BLOCK_L=block_len, BLOCK_D=BLOCK_D, TILE=tile, GROUP=group, REVERSE=reverse,
        HAS_CARRY_IN=carry_in is not None, HAS_CARRY_OUT=carry_out is not None, num_warps=4)


def _forward(q, k, v, proj, decay, initial_state, output_final_state, chunk_size):
    B, T, H, D = q.shape
    states = torch.empty(_states_shape(B, T, H, D, chunk_size), device=q.device, dtype=torch.float32)
    _, NB, BLOCK_D, _ = states.shape
    nsub = _sub_chunks_per_block(B, H, T, chunk_size)
    block_len = chunk_size * nsub
    split_x = q.dtype != torch.bfloat16
    final_state = torch.empty(B, H, D, D, device=q.device, dtype=torch.float32) if output_final_state else None
    o = torch.empty(B, T, H, D, device=q.device, dtype=v.dtype)
    meta = dict(BLOCK_T=chunk_size, BLOCK_D=BLOCK_D, NSUB=nsub, SPLIT_X=split_x, **_launch_options(BLOCK_D, False))

    _block_state_kernel[(NB, B * H)](k, v, proj, decay, states, *_strides(k), *_strides(v),
                                     T, H, D, NB, **meta)
    _scan(states, initial_state, final_state, decay, T, H, D, block_len, reverse=False)
    _output_kernel[(NB, B * H)](q, k, v, o, proj, decay, states, initial_state,
                                *_strides(q), *_strides(k), *_strides(v), *_strides(o),
                                T, H, D, NB, **meta, HAS_INIT=initial_state is not None)
    return o, final_state, states


def _backward(q, k, v, proj, decay, initial_state, states, chunk_size, do, d_final, need_d_init):
    B, T, H, D = q.shape
    nsub = _sub_chunks_per_block(B, H, T, chunk_size)  # as in _forward, which made states
    BH, NB, BLOCK_D, _ = states.shape
    block_len = chunk_size * nsub
    split_x = q.dtype != torch.bfloat16
    meta = dict(BLOCK_T=chunk_size, BLOCK_D=BLOCK_D, NSUB=nsub, SPLIT_X=split_x, **_launch_options(BLOCK_D, True))
    dq, dk, dv = (torch.empty(B, T, H, D, device=q.device, dtype=x.dtype) for x in (q, k, v))
    rev_states = torch.empty_like(states)
    d_init = torch.empty(B, H, D, D, device=q.device, dtype=torch.float32) if need_d_init else None

    _dq_kernel[(NB, BH)](q, k, v, do, dq, proj, decay, states, initial_state, rev_states,
                         *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
                         T, H, D, NB, **meta, HAS_INIT=initial_state is not None)
    _scan(rev_states, d_final, d_init, decay, T, H, D, block_len, reverse=True)
    _dkdv_kernel[(NB, BH)](q, k, v, do, dk, dv, proj, decay, rev_states, d_final,
                           *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk),
                           T, H, D, NB, **meta, HAS_D_FINAL=d_final is not None)
    return dq, dk, dv, d_init


# -----------------------------------------------------------------------------
# The torch ops: registered with torch.library, so that torch.compile treats each as one opaque call
# (it would otherwise trace into the Triton launches) and inductor fuses everything around them.

@torch.library.custom_op("dijiang::chunk_attention", mutates_args=())
def _chunk_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, proj: torch.Tensor,
                        decay: torch.Tensor, initial_state: Optional[torch.Tensor], output_final_state: bool,
                        chunk_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    o, final_state, states = _forward(q, k, v, proj, decay, initial_state, output_final_state, chunk_size)
    return o, (final_state if output_final_state else q.new_empty(0, dtype=torch.float32)), states


@_chunk_attention_op.register_fake
def _(q, k, v, proj, decay, initial_state, output_final_state, chunk_size):
    B, T, H, D = q.shape
    final_state = q.new_empty((B, H, D, D) if output_final_state else (0,), dtype=torch.float32)
    return (v.new_empty(B, T, H, D), final_state,
            q.new_empty(_states_shape(B, T, H, D, chunk_size), dtype=torch.float32))


@torch.library.custom_op("dijiang::chunk_attention_backward", mutates_args=())
def _chunk_attention_backward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, proj: torch.Tensor,
                                 decay: torch.Tensor, initial_state: Optional[torch.Tensor], states: torch.Tensor,
                                 do: torch.Tensor, d_final: Optional[torch.Tensor], chunk_size: int,
                                 need_d_init: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    do = do if do.stride(-1) == 1 else do.contiguous()
    d_final = None if d_final is None else d_final.contiguous()
    dq, dk, dv, d_init = _backward(q, k, v, proj, decay, initial_state, states, chunk_size, do, d_final, need_d_init)
    return dq, dk, dv, (d_init if need_d_init else q.new_empty(0, dtype=torch.float32))


@_chunk_attention_backward_op.register_fake
def _(q, k, v, proj, decay, initial_state, states, do, d_final, chunk_size, need_d_init):
    B, T, H, D = q.shape
    d_init = q.new_empty((B, H, D, D) if need_d_init else (0,), dtype=torch.float32)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), d_init


def _setup_context(ctx, inputs, output):
    q, k, v, proj, decay, initial_state, output_final_state, chunk_size = inputs
    ctx.save_for_backward(q, k, v, proj, decay, initial_state, output[2])
    ctx.mark_non_differentiable(output[2])
    ctx.set_materialize_grads(False)  # an unused final state gets no gradient, not a tensor of zeros
    ctx.chunk_size, ctx.output_final_state = chunk_size, output_final_state


def _chunk_attention_backward(ctx, do, d_final, _):
    q, k, v, proj, decay, initial_state, states = ctx.saved_tensors
    if not ctx.output_final_state:
        d_final = None  # the gradient of the empty placeholder
    if do is None:  # only the final state was used
        do = torch.zeros_like(v)
    dq, dk, dv, d_init = _chunk_attention_backward_op(q, k, v, proj, decay, initial_state, states, do, d_final,
                                                      ctx.chunk_size, ctx.needs_input_grad[5])
    return dq, dk, dv, None, None, d_init if ctx.needs_input_grad[5] else None, None, None


torch.library.register_autograd("dijiang::chunk_attention", _chunk_attention_backward, setup_context=_setup_context)


def chunk_attention(q, k, v, proj, decay, initial_state=None, output_final_state=False, chunk_size=64):
    """DiJiang attention over a whole sequence, chunkwise, in Triton.
    q, k, v: (B, T, H, D) with contiguous last dim (views into a fused qkv output are fine), q and k
    after rotary; proj: (D, D) fp32, the P matrix; decay: (H,) fp32, gamma per head in (0, 1].
    initial_state: optional (B, H, D, D) fp32 state before the first token.
    Returns o (B, T, H, D) in v's dtype and, if output_final_state, the (B, H, D, D) fp32 state
    after the last token (else None). Differentiable w.r.t. q, k, v and initial_state; proj and
    decay are frozen. Supports D <= 128 (D = 80 runs padded to 128)."""
    B, T, H, D = _check(q, k, v, proj, decay)
    if chunk_size not in (16, 32, 64, 128):
        raise ValueError(f"chunk_size must be 16, 32, 64 or 128, got {chunk_size}")
    if initial_state is not None:
        _check_state(initial_state, B, H, D, "initial_state")
    o, final_state, _ = _chunk_attention_op(q, k, v, proj.contiguous(), decay.contiguous(), initial_state,
                                            output_final_state, chunk_size)
    return o, (final_state if output_final_state else None)


# -----------------------------------------------------------------------------
# Decoding

@triton.jit
def _recurrent_step_kernel(q, k, v, o, proj, decay, state,
                           s_qb, s_qh, s_kb, s_kh, s_vb, s_vh, s_ob, s_oh,
                           H, D, BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr):
    """One token for one (b, h) and BLOCK_V columns of the state, all in fp32:
    S = gamma S + phi(k)^T v, o = phi(q) S. Each column tile recomputes phi(q), phi(k): that is
    a D x D matrix-vector product, cheaper than another launch."""
    bh, col_tile = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    offs_d = tl.arange(0, BLOCK_D)
    offs_v = col_tile * BLOCK_V + tl.arange(0, BLOCK_V)
    d_mask, v_mask = offs_d < D, offs_v < D
    gamma = tl.load(decay + h)
    p = tl.load(proj + offs_d[:, None] * D + offs_d[None, :], mask=d_mask[:, None] & d_mask[None, :], other=0.0)
    qx = tl.load(q + b * s_qb + h * s_qh + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    kx = tl.load(k + b * s_kb + h * s_kh + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    vx = tl.load(v + b * s_vb + h * s_vh + offs_v, mask=v_mask, other=0.0).to(tl.float32)
    zq = tl.where(d_mask, tl.sum(qx[:, None] * p, axis=0), float("-inf"))
    zk = tl.where(d_mask, tl.sum(kx[:, None] * p, axis=0), float("-inf"))
    eq = tl.exp2((zq - tl.max(zq, axis=0)) * LOG2E)
    ek = tl.exp2((zk - tl.max(zk, axis=0)) * LOG2E)
    phi_q, phi_k = eq / tl.sum(eq, axis=0), ek / tl.sum(ek, axis=0)

    ptrs = state + bh.to(tl.int64) * D * D + offs_d[:, None] * D + offs_v[None, :]
    mask = d_mask[:, None] & v_mask[None, :]
    s = tl.load(ptrs, mask=mask, other=0.0)
    s = gamma * s + phi_k[:, None] * vx[None, :]
    tl.store(ptrs, s, mask=mask)
    out = tl.sum(phi_q[:, None] * s, axis=0)
    tl.store(o + b * s_ob + h * s_oh + offs_v, out.to(o.dtype.element_ty), mask=v_mask)


@torch.library.custom_op("dijiang::recurrent_step", mutates_args=("state",))
def _recurrent_step_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, proj: torch.Tensor, decay: torch.Tensor,
                       state: torch.Tensor) -> torch.Tensor:
    B, H, D = q.shape
    o = torch.empty(B, H, D, device=v.device, dtype=v.dtype)
    BLOCK_D = _block_d(D)
    BLOCK_V = 32
    _recurrent_step_kernel[(B * H, triton.cdiv(D, BLOCK_V))](
        q, k, v, o, proj, decay, state,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), o.stride(0), o.stride(1),
        H, D, BLOCK_D=BLOCK_D, BLOCK_V=BLOCK_V, num_warps=4 if BLOCK_D <= 64 else 8)
    return o


@_recurrent_step_op.register_fake
def _(q, k, v, proj, decay, state):
    return v.new_empty(v.shape)


def recurrent_step(q, k, v, proj, decay, state):
    """One decoding token. q, k, v: (B, H, D) or (B, 1, H, D); state: (B, H, D, D) fp32, updated in
    place (S = gamma S + phi(k)^T v). Returns o = phi(q) S, shaped like q and typed like v. One kernel
    launch, no host sync and no allocation besides o, so it can be captured in a CUDA graph."""
    squeeze = q.dim() == 4
    q3, k3, v3 = (x[:, 0] if squeeze else x for x in (q, k, v))
    if q3.dim() != 3 or q3.shape != k3.shape or q3.shape != v3.shape or (squeeze and q.shape[1] != 1):
        raise ValueError(f"q, k, v must share one (B, H, D) or (B, 1, H, D) shape, "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, H, D = q3.shape
    _check_common(q3, k3, v3, proj, decay, H, D)
    if not (proj.is_contiguous() and decay.is_contiguous()):
        raise ValueError("proj and decay must be contiguous (a copy here would break CUDA-graph capture)")
    _check_state(state, B, H, D, "state")
    o = _recurrent_step_op(q3, k3, v3, proj, decay, state)
    return o[:, None] if squeeze else o
