"""
Fused Triton kernels for DiJiang attention on the GPU.

The math is the one in dijiang.py: phi(x) = softmax(x @ P) over the feature dim (or phi(x) = x, the
identity map, when no P is given), and
    o[b,n,h] = sum_{m<=n} gamma_h^(n-m) (phi(q_n) . phi(k_m)) v_m        (no normalizer)
with the fp32 recurrent state S_n = gamma S_{n-1} + phi(k_n)^T v_n, o_n = phi(q_n) S_n.
Grouped-query attention: k and v may have fewer heads than q (H_kv dividing H); query head h reads
kv head h // (H / H_kv) in place and keeps its own decay and its own state.

chunk_attention() is the training / prefill path (forward and backward kernels), recurrent_step()
the one-token decoding update, supports() the one statement of what they take.

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
backwards from the reverse state. With grouped kv heads the backward writes dk, dv per query head
and the host sums each group.

Which part of the state a program holds. The rows of the D x D state are features (of phi), its
columns value dims. o, and the state itself, need every feature of a token (phi_q . phi_k sums over
them) but only the value columns they produce; dq needs every value column (do . v) but only its own
features; dv is like o, dk like dq. Up to head_dim 128 one program holds the whole state. At 256 it
cannot (256 x 256 fp32 is a whole SM's register file), so the programs of a block split the state in
SLICE-wide tiles: the forward kernels by columns, _dq_kernel by rows, and _dkdv_kernel runs twice,
by rows for dk and by columns for dv.

Where the feature map is computed. Up to head_dim 128 inside each chunk kernel that needs phi: P (in
two bf16 parts) stays on chip, and phi(q), phi(k) never touch device memory. At 256, P's parts take
256 KB and every slice program would compute the same phi again, so _feature_map_kernel writes phi(q),
phi(k) once in bf16 and the chunk kernels read them as they read q, k under the identity map; their
backward gives dphi, which _feature_map_backward_kernel takes back through the softmax and P.
"""

import os
from typing import Optional

import torch
import triton
import triton.language as tl

# Triton's CPU interpreter (TRITON_INTERPRET=1, used to develop and test without a GPU) rounds fp32
# to bf16 towards zero, so under it the products take fp32 operands instead, and the features that
# _feature_map_kernel writes are fp32.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MMA_DTYPE = tl.constexpr(tl.float32 if INTERPRET else tl.bfloat16)
FEATURE_DTYPE = torch.float32 if INTERPRET else torch.bfloat16  # of the phi that _feature_map_kernel writes
LOG2E = tl.constexpr(1.4426950408889634)

# What the kernels take (supports() says it to callers).
MAX_HEAD_DIM = 256
CHUNK_SIZES = (16, 32, 64, 128)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
FEATURE_MAPS = ("softmax", "identity")  # softmax(x @ P) for any P (the model's qmc, mc, performer), or x
LIMITS = ("head_dim <= 256, chunk_size 16, 32, 64 or 128, bf16, fp16 or fp32 inputs, "
          "feature map softmax(x @ P), or identity with bf16 inputs")

FUSED_MAP_MAX_DIM = 128  # wider heads get phi from _feature_map_kernel
SLICE = 64  # a program's share of a state too large for one program

# Launch settings. Up to head_dim 64, 4 warps in both directions suit an H100 best. Wider heads
# (padded to 128) take no load pipelining, since Triton's default stages overflow the H100's shared
# memory there, and 8 warps in the backward; 256 wide, 8 warps everywhere.
NUM_WARPS_FWD = 4
NUM_WARPS_BWD = 4
MIN_PROGRAMS = 1024  # keep at least this many block programs (about 8 per SM on an H100)
SUB_CHUNKS = (4, 2, 1)  # chunks per block, the longest tried first
NUM_STAGES_WIDE = 1
NUM_WARPS_BWD_WIDE = 8
NUM_WARPS_WIDEST = 8
FEATURE_ROWS = 64  # rows (tokens x heads) per program of the feature-map kernels


def supports(head_dim, chunk_size=64, dtype=torch.bfloat16, feature_map="softmax"):
    """Whether chunk_attention and recurrent_step take these settings (LIMITS says it in words).
    feature_map is 'softmax' for phi(x) = softmax(x @ P), whatever P is, or 'identity'. The identity
    map takes bf16 inputs only: its products take q, k, v as bf16 operands, and with unnormalized
    features a model's gradients move by ~3e-2 when fp32 q, k, v are rounded so (softmax features:
    ~6e-3, and fp32 x is split into two bf16 parts for x @ P). recurrent_step computes in fp32 and
    takes either map with any of DTYPES."""
    return (1 <= head_dim <= MAX_HEAD_DIM and chunk_size in CHUNK_SIZES and dtype in DTYPES
            and feature_map in FEATURE_MAPS and (feature_map == "softmax" or dtype == torch.bfloat16))


# -----------------------------------------------------------------------------
# Device helpers

@triton.jit
def _split_proj(p):
    """fp32 P as hi + lo MMA-dtype parts: x @ P_hi + x @ P_lo carries P to about fp32 precision,
    while one bf16 product would leave ~1e-3 relative error in the logits, which the softmax turns
    into ~1e-3 error in phi."""
    p_hi = p.to(MMA_DTYPE)
    return p_hi, (p - p_hi.to(tl.float32)).to(MMA_DTYPE)


@triton.jit
def _load_proj(proj, D, BLOCK_D: tl.constexpr, FUSED_MAP: tl.constexpr):
    """P (D, D) padded to (BLOCK_D, BLOCK_D) in hi + lo parts, for a kernel that computes phi itself;
    one whose features come ready needs no P and gets placeholders."""
    if FUSED_MAP:
        offs = tl.arange(0, BLOCK_D)
        mask = (offs[:, None] < D) & (offs[None, :] < D)
        p_hi, p_lo = _split_proj(tl.load(proj + offs[:, None] * D + offs[None, :], mask=mask, other=0.0))
    else:
        p_hi = tl.zeros((1, 1), MMA_DTYPE)
        p_lo = p_hi
    return p_hi, p_lo


@triton.jit
def _project(x, p_hi, p_lo, acc, SPLIT_X: tl.constexpr):
    """acc + x @ P. bf16 x is exact in the MMA dtype; other dtypes are split into hi + lo parts too."""
    x_hi = x.to(MMA_DTYPE)
    acc = tl.dot(x_hi, p_lo, tl.dot(x_hi, p_hi, acc))
    if SPLIT_X:
        acc = tl.dot((x.to(tl.float32) - x_hi.to(tl.float32)).to(MMA_DTYPE), p_hi, acc)
    return acc


@triton.jit
def _softmax_features(z, D, BLOCK_D: tl.constexpr):
    """softmax over the first D columns of z (rows, BLOCK_D) in fp32; padded columns get 0."""
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
def _row_ptrs(base, b, h, t, s_b, s_t, s_h, cols):
    """Pointers to rows t, columns cols of head h, batch b, of a (B, T, H, D) tensor with last dim contiguous."""
    return base + b.to(tl.int64) * s_b + h * s_h + t.to(tl.int64)[:, None] * s_t + cols[None, :]


@triton.jit
def _load_rows(base, b, h, t, s_b, s_t, s_h, cols, T, D):
    mask = (t < T)[:, None] & (cols < D)[None, :]
    return tl.load(_row_ptrs(base, b, h, t, s_b, s_t, s_h, cols), mask=mask, other=0.0)


@triton.jit
def _store_rows(base, b, h, t, s_b, s_t, s_h, cols, T, D, x):
    mask = (t < T)[:, None] & (cols < D)[None, :]
    tl.store(_row_ptrs(base, b, h, t, s_b, s_t, s_h, cols), x.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _phi(x, b, h, t, s_b, s_t, s_h, feats, p_hi, p_lo, T, D,
         BLOCK_D: tl.constexpr, FUSED_MAP: tl.constexpr, SPLIT_X: tl.constexpr):
    """phi at the features feats of rows t of head h: softmax(x @ P) computed here in fp32 (FUSED_MAP,
    where feats are all BLOCK_D features), else x as it is (the identity map, or the features that
    _feature_map_kernel wrote), in the MMA dtype."""
    if FUSED_MAP:
        z = _project(_load_rows(x, b, h, t, s_b, s_t, s_h, feats, T, D), p_hi, p_lo,
                     tl.zeros((t.shape[0], BLOCK_D), tl.float32), SPLIT_X)
        phi = _softmax_features(z, D, BLOCK_D)
    else:
        phi = _load_rows(x, b, h, t, s_b, s_t, s_h, feats, T, D).to(MMA_DTYPE)
    return phi


@triton.jit
def _block_setup(decay, proj, T, H, G, D, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, NSUB: tl.constexpr,
                 FUSED_MAP: tl.constexpr):
    """What every program of a chunk-walking kernel starts from: its block j, its (b, h) and the kv
    head hkv that h reads, the decay and P, and the decay masks, which are the same for every chunk."""
    j, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    log2_gamma = tl.log2(tl.load(decay + h))
    p_hi, p_lo = _load_proj(proj, D, BLOCK_D, FUSED_MAP)
    pos = tl.arange(0, BLOCK_T)  # position inside a chunk
    # gamma^(t-t') for t >= t' inside a chunk, and gamma^(t+1) from the state before the chunk
    causal_decay = _decay_powers(pos[:, None] - pos[None, :], pos[:, None] >= pos[None, :], log2_gamma)
    q_decay = _decay_powers(pos + 1, pos >= 0, log2_gamma)
    block_start = j * BLOCK_T * NSUB
    block_len = tl.minimum(BLOCK_T * NSUB, T - block_start)
    return j, bh, b, h, h // G, log2_gamma, p_hi, p_lo, pos, causal_decay, q_decay, block_start, block_len


@triton.jit
def _state_tile(BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """The features (state rows, BLOCK_R of them) and value dims (state columns, BLOCK_C) this program
    holds: program_id(2) numbers the tiles of the padded (BLOCK_D, BLOCK_D) state row by row."""
    tile = tl.program_id(2)
    n_col_tiles = BLOCK_D // BLOCK_C
    feats = (tile // n_col_tiles) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = (tile % n_col_tiles) * BLOCK_C + tl.arange(0, BLOCK_C)
    return feats, cols


@triton.jit
def _state_ptrs(states, bh, j, NB, feats, cols, BLOCK_D: tl.constexpr):
    """A tile of block j's state in states (B*H, NB, BLOCK_D, BLOCK_D)."""
    return states + (bh * NB + j).to(tl.int64) * BLOCK_D * BLOCK_D + feats[:, None] * BLOCK_D + cols[None, :]


@triton.jit
def _load_state(states, init, bh, j, NB, D, feats, cols, BLOCK_D: tl.constexpr, HAS_INIT: tl.constexpr):
    """The tile of the state entering block j: states[bh, j] for j in range, else init (or 0).
    Used as end state of block j-1 (forward) and as reverse state of block j+1 (backward)."""
    in_range = (j >= 0) & (j < NB)
    s = tl.load(_state_ptrs(states, bh, j, NB, feats, cols, BLOCK_D), mask=in_range, other=0.0)
    if HAS_INIT:
        user_mask = (feats[:, None] < D) & (cols[None, :] < D) & ((j < 0) | (j >= NB))
        s += tl.load(init + bh.to(tl.int64) * D * D + feats[:, None] * D + cols[None, :], mask=user_mask, other=0.0)
    return s


@triton.jit
def _to_chunk_end(phi_k, chunk_len, pos, log2_gamma):
    """phi_k[t] gamma^(len-1-t) in the MMA dtype: each key decayed to the end of its chunk (0 past it)."""
    return (phi_k * _decay_powers(chunk_len - 1 - pos, pos < chunk_len, log2_gamma)[:, None]).to(MMA_DTYPE)


@triton.jit
def _advance_state(state, k_end, vx, chunk_len, log2_gamma):
    """The state after a chunk of chunk_len tokens: gamma^len S + sum_t gamma^(len-1-t) phi_k[t]^T v_t,
    k_end from _to_chunk_end."""
    return state * tl.exp2(chunk_len * log2_gamma) + tl.dot(tl.trans(k_end), vx)


# -----------------------------------------------------------------------------
# Forward kernels

@triton.jit
def _block_state_kernel(k, v, proj, decay, states,
                        s_kb, s_kt, s_kh, s_vb, s_vt, s_vh,
                        T, H, G, D, NB,
                        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, NSUB: tl.constexpr,
                        FUSED_MAP: tl.constexpr, SPLIT_X: tl.constexpr):
    """states[bh, j][:, cols] = sum over block j of gamma^(len-1-u) phi(k_u)^T v_u[cols]  (own contribution only)."""
    j, bh, b, h, hkv, log2_gamma, p_hi, p_lo, pos, _, _, block_start, block_len = _block_setup(
        decay, proj, T, H, G, D, BLOCK_T, BLOCK_D, NSUB, FUSED_MAP)
    feats, cols = _state_tile(BLOCK_D, BLOCK_D, BLOCK_C)
    acc = tl.zeros((BLOCK_D, BLOCK_C), tl.float32)
    for c in range(tl.cdiv(block_len, BLOCK_T)):
        u = c * BLOCK_T + pos  # position inside the block
        phi_k = _phi(k, b, hkv, block_start + u, s_kb, s_kt, s_kh, feats, p_hi, p_lo, T, D, BLOCK_D, FUSED_MAP, SPLIT_X)
        vx = _load_rows(v, b, hkv, block_start + u, s_vb, s_vt, s_vh, cols, T, D).to(MMA_DTYPE)
        weights = _decay_powers(block_len - 1 - u, u < block_len, log2_gamma)
        acc = tl.dot(tl.trans((phi_k * weights[:, None]).to(MMA_DTYPE)), vx, acc)
    tl.store(_state_ptrs(states, bh, j, NB, feats, cols, BLOCK_D), acc)


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
def _output_kernel(q, k, v, o, proj, decay, states, init,
                   s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_ob, s_ot, s_oh,
                   T, H, G, D, NB,
                   BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, NSUB: tl.constexpr,
                   FUSED_MAP: tl.constexpr, SPLIT_X: tl.constexpr, HAS_INIT: tl.constexpr):
    """o[:, cols] for the chunks of block j, from the state at the end of block j-1."""
    j, bh, b, h, hkv, log2_gamma, p_hi, p_lo, pos, causal_decay, q_decay, block_start, block_len = _block_setup(
        decay, proj, T, H, G, D, BLOCK_T, BLOCK_D, NSUB, FUSED_MAP)
    feats, cols = _state_tile(BLOCK_D, BLOCK_D, BLOCK_C)
    state = _load_state(states, init, bh, j - 1, NB, D, feats, cols, BLOCK_D, HAS_INIT)  # (D, C) fp32
    for c in range(tl.cdiv(block_len, BLOCK_T)):
        t = block_start + c * BLOCK_T + pos
        chunk_len = tl.minimum(BLOCK_T, T - block_start - c * BLOCK_T)
        phi_q = _phi(q, b, h, t, s_qb, s_qt, s_qh, feats, p_hi, p_lo, T, D, BLOCK_D, FUSED_MAP, SPLIT_X)
        # each phi in the MMA dtype as soon as it is computed, plainly and decayed as the products take it:
        # what stays live through the chunk is then half as large
        q_in = (phi_q * q_decay[:, None]).to(MMA_DTYPE)  # reading the state from before the chunk
        phi_q = phi_q.to(MMA_DTYPE)
        phi_k = _phi(k, b, hkv, t, s_kb, s_kt, s_kh, feats, p_hi, p_lo, T, D, BLOCK_D, FUSED_MAP, SPLIT_X)
        k_end = _to_chunk_end(phi_k, chunk_len, pos, log2_gamma)
        phi_k = phi_k.to(MMA_DTYPE)
        vx = _load_rows(v, b, hkv, t, s_vb, s_vt, s_vh, cols, T, D).to(MMA_DTYPE)
        scores = tl.dot(phi_q, tl.trans(phi_k)) * causal_decay  # (C, C)
        out = tl.dot(scores.to(MMA_DTYPE), vx)
        out = tl.dot(q_in, state.to(MMA_DTYPE), out)
        _store_rows(o, b, h, t, s_ob, s_ot, s_oh, cols, T, D, out)
        state = _advance_state(state, k_end, vx, chunk_len, log2_gamma)


# -----------------------------------------------------------------------------
# Backward kernels

@triton.jit
def _dq_kernel(q, k, v, do, dq, proj, decay, states, init, rev_states,
               s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_db, s_dt, s_dh, s_gb, s_gt, s_gh,
               T, H, G, D, NB,
               BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, NSUB: tl.constexpr,
               FUSED_MAP: tl.constexpr, SPLIT_X: tl.constexpr, HAS_INIT: tl.constexpr):
    """dq at the features feats for block j (dphi_q where the features came ready), walking its chunks
    forward with the state rows S[feats, :], and the block's own reverse-state contribution
    rev_states[bh, j][feats, :] = sum_u gamma^(u+1) phi(q_u)[feats]^T do_u."""
    j, bh, b, h, hkv, log2_gamma, p_hi, p_lo, pos, causal_decay, q_decay, block_start, block_len = _block_setup(
        decay, proj, T, H, G, D, BLOCK_T, BLOCK_D, NSUB, FUSED_MAP)
    feats, cols = _state_tile(BLOCK_D, BLOCK_R, BLOCK_D)
    state = _load_state(states, init, bh, j - 1, NB, D, feats, cols, BLOCK_D, HAS_INIT)
    rev_state = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
    for c in range(tl.cdiv(block_len, BLOCK_T)):
        t = block_start + c * BLOCK_T + pos
        chunk_len = tl.minimum(BLOCK_T, T - block_start - c * BLOCK_T)
        phi_k = _phi(k, b, hkv, t, s_kb, s_kt, s_kh, feats, p_hi, p_lo, T, D, BLOCK_D, FUSED_MAP, SPLIT_X)
        k_end = _to_chunk_end(phi_k, chunk_len, pos, log2_gamma)
        phi_k = phi_k.to(MMA_DTYPE)
        vx = _load_rows(v, b, hkv, t, s_vb, s_vt, s_vh, cols, T, D).to(MMA_DTYPE)
        dox = _load_rows(do, b, h, t, s_db, s_dt, s_dh, cols, T, D).to(MMA_DTYPE)

        # dphi_q[t] = sum_{t'<=t} gamma^(t-t') (do_t . v_t') phi_k[t'] + gamma^(t+1) do_t S^T
        dscores = tl.dot(dox, tl.trans(vx)) * causal_decay
        grad = tl.dot(dscores.to(MMA_DTYPE), phi_k)
        grad += tl.dot(dox, tl.trans(state.to(MMA_DTYPE))) * q_decay[:, None]
        state = _advance_state(state, k_end, vx, chunk_len, log2_gamma)

        # phi_q only now, for the reverse state and the feature map's backward
        phi_q = _phi(q, b, h, t, s_qb, s_qt, s_qh, feats, p_hi, p_lo, T, D, BLOCK_D, FUSED_MAP, SPLIT_X)
        u = c * BLOCK_T + pos  # position inside the block; rows past T have do = 0
        rev_decay = _decay_powers(u + 1, u < block_len, log2_gamma)
        rev_state = tl.dot(tl.trans((phi_q * rev_decay[:, None]).to(MMA_DTYPE)), dox, rev_state)
        if FUSED_MAP:
            grad = _feature_map_backward(phi_q, grad, p_hi)
        _store_rows(dq, b, h, t, s_gb, s_gt, s_gh, feats, T, D, grad)
    tl.store(_state_ptrs(rev_states, bh, j, NB, feats, cols, BLOCK_D), rev_state)


@triton.jit
def _dkdv_kernel(q, k, v, do, dk, dv, proj, decay, rev_states, d_final,
                 s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_db, s_dt, s_dh, s_gb, s_gt, s_gh,
                 T, H, G, D, NB,
                 BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                 NSUB: tl.constexpr, FUSED_MAP: tl.constexpr, SPLIT_X: tl.constexpr, HAS_D_FINAL: tl.constexpr):
    """dk, dv of query head h's reads for block j, walking its chunks backwards with the tile
    R[feats, cols] of the reverse state: the gradient reaching the state after a chunk, already
    decayed by one step, so that token t of a chunk of length len receives gamma^(len-1-t) R.
    dv[:, cols] needs every feature and dk[:, feats] (dphi_k where the features came ready) every
    value column: a program computes what its tile covers. dk and dv share dq's strides."""
    j, bh, b, h, hkv, log2_gamma, p_hi, p_lo, pos, causal_decay, q_decay, block_start, block_len = _block_setup(
        decay, proj, T, H, G, D, BLOCK_T, BLOCK_D, NSUB, FUSED_MAP)
    feats, cols = _state_tile(BLOCK_D, BLOCK_R, BLOCK_C)
    n_chunks = tl.cdiv(block_len, BLOCK_T)

    rev_state = _load_state(rev_states, d_final, bh, j + 1, NB, D, feats, cols, BLOCK_D, HAS_D_FINAL)
    for i in range(n_chunks):
        c = n_chunks - 1 - i
        t = block_start + c * BLOCK_T + pos
        chunk_len = tl.minimum(BLOCK_T, T - block_start - c * BLOCK_T)
        phi_q = _phi(q, b, h, t, s_qb, s_qt, s_qh, feats, p_hi, p_lo, T, D, BLOCK_D, FUSED_MAP, SPLIT_X)
        q_start = (phi_q * q_decay[:, None]).to(MMA_DTYPE)  # each query reading the state before the chunk
        phi_q = phi_q.to(MMA_DTYPE)
        phi_k = _phi(k, b, hkv, t, s_kb, s_kt, s_kh, feats, p_hi, p_lo, T, D, BLOCK_D, FUSED_MAP, SPLIT_X)
        dox = _load_rows(do, b, h, t, s_db, s_dt, s_dh, cols, T, D).to(MMA_DTYPE)
        rev = rev_state.to(MMA_DTYPE)

        if BLOCK_R == BLOCK_D:
            # dv[t'] = sum_{t>=t'} gamma^(t-t') (phi_q[t] . phi_k[t']) do_t + gamma^(len-1-t') phi_k[t'] R
            scores = tl.dot(phi_q, tl.trans(phi_k.to(MMA_DTYPE))) * causal_decay  # (t, t')
            dvx = tl.dot(tl.trans(scores.to(MMA_DTYPE)), dox)
            dvx = tl.dot(_to_chunk_end(phi_k, chunk_len, pos, log2_gamma), rev, dvx)
            _store_rows(dv, b, h, t, s_gb, s_gt, s_gh, cols, T, D, dvx)
        if BLOCK_C == BLOCK_D:
            # dphi_k[t'] = sum_{t>=t'} gamma^(t-t') (do_t . v_t') phi_q[t] + gamma^(len-1-t') v_t' R^T
            vx = _load_rows(v, b, hkv, t, s_vb, s_vt, s_vh, cols, T, D).to(MMA_DTYPE)
            dscores = tl.dot(dox, tl.trans(vx)) * causal_decay  # (t, t')
            grad = tl.dot(tl.trans(dscores.to(MMA_DTYPE)), phi_q)
            grad += tl.dot(vx, tl.trans(rev)) * _decay_powers(chunk_len - 1 - pos, pos < chunk_len, log2_gamma)[:, None]
            if FUSED_MAP:
                grad = _feature_map_backward(phi_k, grad, p_hi)
            _store_rows(dk, b, h, t, s_gb, s_gt, s_gh, feats, T, D, grad)

        # R for the chunk before: gamma^len R + sum_t gamma^(t+1) phi_q[t]^T do_t (rows past T have do = 0).
        rev_state = rev_state * tl.exp2(chunk_len * log2_gamma) + tl.dot(tl.trans(q_start), dox)


# -----------------------------------------------------------------------------
# The feature map on its own, for heads too wide to compute it inside the chunk kernels

@triton.jit
def _wide_features(x, proj, r, s_b, s_t, s_h, T, HX, D, N_ROWS,
                   BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, SPLIT_X: tl.constexpr):
    """phi = softmax(x @ P) in fp32 for rows r (flat over batch, time and head) of x (B, T, HX, D).
    P is read BLOCK_P rows at a time, x @ P summed over those slices, so no program holds all of it."""
    base = x + (r // (T * HX)).to(tl.int64) * s_b + ((r // HX) % T).to(tl.int64) * s_t + (r % HX) * s_h
    offs_d = tl.arange(0, BLOCK_D)
    z = tl.zeros((r.shape[0], BLOCK_D), tl.float32)
    for p0 in tl.static_range(0, BLOCK_D, BLOCK_P):
        ks = p0 + tl.arange(0, BLOCK_P)
        xs = tl.load(base[:, None] + ks[None, :], mask=(r < N_ROWS)[:, None] & (ks < D)[None, :], other=0.0)
        p = tl.load(proj + ks[:, None] * D + offs_d[None, :], mask=(ks < D)[:, None] & (offs_d < D)[None, :], other=0.0)
        p_hi, p_lo = _split_proj(p)
        z = _project(xs, p_hi, p_lo, z, SPLIT_X)
    return _softmax_features(z, D, BLOCK_D)


@triton.jit
def _feature_map_kernel(x, phi, proj, s_b, s_t, s_h, T, HX, D, N_ROWS,
                        BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
                        SPLIT_X: tl.constexpr):
    """phi (B, T, HX, D) contiguous, in the MMA dtype, for BLOCK_ROWS rows of x."""
    r = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    features = _wide_features(x, proj, r, s_b, s_t, s_h, T, HX, D, N_ROWS, BLOCK_D, BLOCK_P, SPLIT_X)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (r < N_ROWS)[:, None] & (offs_d < D)[None, :]
    tl.store(phi + r.to(tl.int64)[:, None] * D + offs_d[None, :], features.to(phi.dtype.element_ty), mask=mask)


@triton.jit
def _feature_map_backward_kernel(x, dphi, dx, proj, s_b, s_t, s_h, T, HX, D, N_ROWS,
                                 BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
                                 SPLIT_X: tl.constexpr):
    """dx (B, T, HX, D) contiguous from dphi (the same layout, fp32), for BLOCK_ROWS rows: phi is
    computed again in fp32 from x, and dz @ P^T is written BLOCK_P output columns at a time."""
    r = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    features = _wide_features(x, proj, r, s_b, s_t, s_h, T, HX, D, N_ROWS, BLOCK_D, BLOCK_P, SPLIT_X)
    offs_d = tl.arange(0, BLOCK_D)
    row_mask = (r < N_ROWS)[:, None]
    grad = tl.load(dphi + r.to(tl.int64)[:, None] * D + offs_d[None, :], mask=row_mask & (offs_d < D)[None, :], other=0.0)
    dz = (features * (grad - tl.sum(grad * features, axis=1)[:, None])).to(MMA_DTYPE)
    for p0 in tl.static_range(0, BLOCK_D, BLOCK_P):
        cs = p0 + tl.arange(0, BLOCK_P)
        p = tl.load(proj + cs[:, None] * D + offs_d[None, :], mask=(cs < D)[:, None] & (offs_d < D)[None, :], other=0.0)
        dxs = tl.dot(dz, tl.trans(p.to(MMA_DTYPE)))
        tl.store(dx + r.to(tl.int64)[:, None] * D + cs[None, :], dxs.to(dx.dtype.element_ty), mask=row_mask & (cs < D)[None, :])


# -----------------------------------------------------------------------------
# Host side

def _check_inputs(q, k, v, proj, decay):
    """q (..., H, D), k and v (..., H_kv, D) with the same leading dims; returns H, H_kv, D."""
    if q.dim() not in (3, 4) or k.shape != v.shape or k.dim() != q.dim() or k.shape[:-2] != q.shape[:-2] \
            or k.shape[-1] != q.shape[-1] or q.shape[-2] % k.shape[-2]:
        raise ValueError(f"q must be (..., H, D) and k, v one (..., H_kv, D) shape with the same leading dims and "
                         f"H_kv dividing H, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    H, H_kv, D = q.shape[-2], k.shape[-2], q.shape[-1]
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not supports(D, dtype=q.dtype):
        raise NotImplementedError(f"head_dim {D}, dtype {q.dtype}: the Triton kernels take {LIMITS}; "
                                  f"use kernel='torch'")
    if any(x.stride(-1) != 1 for x in (q, k, v)):
        raise ValueError("q, k, v need a contiguous last dim; call .contiguous() first")
    if proj is not None and (proj.shape != (D, D) or proj.dtype != torch.float32):
        raise ValueError(f"proj must be None or a ({D}, {D}) float32 tensor, got {tuple(proj.shape)} {proj.dtype}")
    if decay.shape != (H,) or decay.dtype != torch.float32:
        raise ValueError(f"decay must be a ({H},) float32 tensor, got {tuple(decay.shape)} {decay.dtype}")
    return H, H_kv, D


def _check_state(state, B, H, D, name):
    if state.shape != (B, H, D, D) or state.dtype != torch.float32 or not state.is_contiguous():
        raise ValueError(f"{name} must be a contiguous ({B}, {H}, {D}, {D}) float32 tensor, "
                         f"got {tuple(state.shape)} {state.dtype}")


def _block_d(D):
    """The head dim padded to what tl.arange and tl.dot take: a power of two, 16 at least."""
    return max(16, triton.next_power_of_2(D))


def _slice(D):
    """The state rows or columns one program holds: all of them up to 128, else SLICE."""
    return _block_d(D) if _block_d(D) <= FUSED_MAP_MAX_DIM else SLICE


def _sub_chunks_per_block(B, H, T, D, chunk_size):
    # Longer blocks write and scan fewer states; shorter blocks give more programs to the GPU. The
    # block states are kept for the backward, so a block holds at least 2 D tokens: its D x D fp32
    # state then takes no more memory than half its k and v.
    tiles = _block_d(D) // _slice(D)
    least = triton.cdiv(2 * D, chunk_size)
    for nsub in SUB_CHUNKS:
        if B * H * tiles * triton.cdiv(T, chunk_size * max(nsub, least)) >= MIN_PROGRAMS:
            return max(nsub, least)
    return least


def _states_shape(B, T, H, D, chunk_size):
    """The per-block states that the forward keeps for the backward: (B*H, NB, BLOCK_D, BLOCK_D)."""
    block_len = chunk_size * _sub_chunks_per_block(B, H, T, D, chunk_size)
    return B * H, triton.cdiv(T, block_len), _block_d(D), _block_d(D)


def _launch_options(block_d, backward):
    if block_d <= 64:
        return dict(num_warps=NUM_WARPS_BWD if backward else NUM_WARPS_FWD)
    if block_d <= FUSED_MAP_MAX_DIM:
        return dict(num_warps=NUM_WARPS_BWD_WIDE if backward else NUM_WARPS_FWD, num_stages=NUM_STAGES_WIDE)
    return dict(num_warps=NUM_WARPS_WIDEST, num_stages=NUM_STAGES_WIDE)


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


def _feature_launch(kernel, x, proj, *tensors):
    """Run one of the feature-map kernels over every (b, t, head) row of x (B, T, HX, D)."""
    B, T, HX, D = x.shape
    rows = B * T * HX
    kernel[(triton.cdiv(rows, FEATURE_ROWS),)](x, *tensors, proj, *_strides(x), T, HX, D, rows,
                                               BLOCK_ROWS=FEATURE_ROWS, BLOCK_D=_block_d(D), BLOCK_P=SLICE,
                                               SPLIT_X=x.dtype != torch.bfloat16, num_warps=NUM_WARPS_WIDEST)


def _features(q, k, proj):
    """What the chunk kernels read as phi(q), phi(k), and whether they apply the map to it themselves:
    q, k under the identity map (proj None) and up to FUSED_MAP_MAX_DIM; beyond, phi written here."""
    if proj is None:
        return q, k, False
    if q.shape[-1] <= FUSED_MAP_MAX_DIM:
        return q, k, True
    phi = []
    for x in (q, k):
        phi.append(torch.empty(x.shape, device=x.device, dtype=FEATURE_DTYPE))
        _feature_launch(_feature_map_kernel, x, proj, phi[-1])
    return phi[0], phi[1], False


def _chunk_meta(q, fused, D, chunk_size, nsub, backward):
    return dict(BLOCK_T=chunk_size, BLOCK_D=_block_d(D), NSUB=nsub, FUSED_MAP=fused,
                SPLIT_X=fused and q.dtype != torch.bfloat16, **_launch_options(_block_d(D), backward))


def _forward(q, k, v, proj, decay, initial_state, output_final_state, chunk_size):
    B, T, H, D = q.shape
    G = H // k.shape[2]
    states = torch.empty(_states_shape(B, T, H, D, chunk_size), device=q.device, dtype=torch.float32)
    _, NB, BLOCK_D, _ = states.shape
    nsub = _sub_chunks_per_block(B, H, T, D, chunk_size)
    final_state = torch.empty(B, H, D, D, device=q.device, dtype=torch.float32) if output_final_state else None
    o = torch.empty(B, T, H, D, device=q.device, dtype=v.dtype)
    phi_q, phi_k, fused = _features(q, k, proj)
    meta = _chunk_meta(q, fused, D, chunk_size, nsub, backward=False)
    cols = _slice(D)
    grid = (NB, B * H, BLOCK_D // cols)

    _block_state_kernel[grid](phi_k, v, proj, decay, states, *_strides(phi_k), *_strides(v),
                              T, H, G, D, NB, BLOCK_C=cols, **meta)
    _scan(states, initial_state, final_state, decay, T, H, D, chunk_size * nsub, reverse=False)
    _output_kernel[grid](phi_q, phi_k, v, o, proj, decay, states, initial_state,
                         *_strides(phi_q), *_strides(phi_k), *_strides(v), *_strides(o),
                         T, H, G, D, NB, BLOCK_C=cols, **meta, HAS_INIT=initial_state is not None)
    return o, final_state, states


def _group_sum(x, H_kv, dtype):
    """Per-query-head gradients (B, T, H, D) summed over each kv head's group of query heads."""
    B, T, H, D = x.shape
    return (x if H == H_kv else x.view(B, T, H_kv, H // H_kv, D).sum(3)).to(dtype)


def _backward(q, k, v, proj, decay, initial_state, states, chunk_size, do, d_final, need_d_init):
    B, T, H, D = q.shape
    H_kv = k.shape[2]
    nsub = _sub_chunks_per_block(B, H, T, D, chunk_size)  # as in _forward, which made states
    BH, NB, BLOCK_D, _ = states.shape
    phi_q, phi_k, fused = _features(q, k, proj)
    meta = _chunk_meta(q, fused, D, chunk_size, nsub, backward=True)
    wide = proj is not None and not fused  # the kernels give dphi, taken through the map below
    # per query head: dk and dv straight in their dtype, where no group sums them and no map follows
    dq = torch.empty(B, T, H, D, device=q.device, dtype=torch.float32 if wide else q.dtype)
    dk = torch.empty(B, T, H, D, device=q.device, dtype=torch.float32 if wide or H > H_kv else k.dtype)
    dv = torch.empty(B, T, H, D, device=q.device, dtype=torch.float32 if H > H_kv else v.dtype)
    rev_states = torch.empty_like(states)
    d_init = torch.empty(B, H, D, D, device=q.device, dtype=torch.float32) if need_d_init else None
    common = (*_strides(phi_q), *_strides(phi_k), *_strides(v), *_strides(do), *_strides(dq), T, H, H // H_kv, D, NB)

    rows = _slice(D)
    _dq_kernel[(NB, BH, BLOCK_D // rows)](phi_q, phi_k, v, do, dq, proj, decay, states, initial_state, rev_states,
                                          *common, BLOCK_R=rows, **meta, HAS_INIT=initial_state is not None)
    _scan(rev_states, d_final, d_init, decay, T, H, D, chunk_size * nsub, reverse=True)
    # one launch with the whole state, or one by rows for dk and one by columns for dv
    tiles = [(BLOCK_D, BLOCK_D)] if rows == BLOCK_D else [(rows, BLOCK_D), (BLOCK_D, rows)]
    for block_r, block_c in tiles:
        n_tiles = (BLOCK_D // block_r) * (BLOCK_D // block_c)
        _dkdv_kernel[(NB, BH, n_tiles)](phi_q, phi_k, v, do, dk, dv, proj, decay, rev_states, d_final, *common,
                                        BLOCK_R=block_r, BLOCK_C=block_c, **meta, HAS_D_FINAL=d_final is not None)
    dk, dv = _group_sum(dk, H_kv, dk.dtype), _group_sum(dv, H_kv, v.dtype)
    if wide:
        dq, dk = (_feature_map_backward_wide(x, grad, proj) for x, grad in ((q, dq), (k, dk)))
    return dq, dk.to(k.dtype), dv, d_init


def _feature_map_backward_wide(x, dphi, proj):
    dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    _feature_launch(_feature_map_backward_kernel, x, proj, dphi, dx)
    return dx


# -----------------------------------------------------------------------------
# The torch ops: registered with torch.library, so that torch.compile treats each as one opaque call
# (it would otherwise trace into the Triton launches) and inductor fuses everything around them.

@torch.library.custom_op("dijiang::chunk_attention", mutates_args=())
def _chunk_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, proj: Optional[torch.Tensor],
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
def _chunk_attention_backward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, proj: Optional[torch.Tensor],
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
        do = q.new_zeros(q.shape, dtype=v.dtype)
    dq, dk, dv, d_init = _chunk_attention_backward_op(q, k, v, proj, decay, initial_state, states, do, d_final,
                                                      ctx.chunk_size, ctx.needs_input_grad[5])
    return dq, dk, dv, None, None, d_init if ctx.needs_input_grad[5] else None, None, None


torch.library.register_autograd("dijiang::chunk_attention", _chunk_attention_backward, setup_context=_setup_context)


def chunk_attention(q, k, v, proj, decay, initial_state=None, output_final_state=False, chunk_size=64):
    """DiJiang attention over a whole sequence, chunkwise, in Triton.
    q: (B, T, H, D), k, v: (B, T, H_kv, D) with H_kv dividing H (grouped-query attention when smaller),
    each with a contiguous last dim (views into a fused qkv output are fine), q and k after rotary;
    proj: (D, D) fp32, the P matrix of phi(x) = softmax(x @ P), or None for phi(x) = x;
    decay: (H,) fp32, gamma per query head in (0, 1]; initial_state: optional (B, H, D, D) fp32 state
    before the first token. Returns o (B, T, H, D) in v's dtype and, if output_final_state, the
    (B, H, D, D) fp32 state after the last token (else None). Differentiable w.r.t. q, k, v and
    initial_state; proj and decay are frozen. supports() gives the head dims, chunk sizes and dtypes."""
    if q.dim() != 4:
        raise ValueError(f"q must be (B, T, H, D), got {tuple(q.shape)}")
    H, _, D = _check_inputs(q, k, v, proj, decay)
    if chunk_size not in CHUNK_SIZES:
        raise ValueError(f"chunk_size must be one of {CHUNK_SIZES}, got {chunk_size}")
    if proj is None and q.dtype != torch.bfloat16:
        raise NotImplementedError(f"the identity map with {q.dtype} inputs: the Triton kernels take {LIMITS}; "
                                  f"use kernel='torch'")
    if initial_state is not None:
        _check_state(initial_state, q.shape[0], H, D, "initial_state")
    o, final_state, _ = _chunk_attention_op(q, k, v, None if proj is None else proj.contiguous(), decay.contiguous(),
                                            initial_state, output_final_state, chunk_size)
    return o, (final_state if output_final_state else None)


# -----------------------------------------------------------------------------
# Decoding

@triton.jit
def _recurrent_step_kernel(q, k, v, o, proj, decay, state,
                           s_qb, s_qh, s_kb, s_kh, s_vb, s_vh, s_ob, s_oh,
                           H, G, D, BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_P: tl.constexpr,
                           IDENTITY: tl.constexpr):
    """One token for one (b, h) and BLOCK_V columns of the state, all in fp32:
    S = gamma S + phi(k)^T v, o = phi(q) S, with k, v from kv head h // G. Each column tile computes
    phi(q), phi(k) again: that is a D x D matrix-vector product, cheaper than another launch. P is
    read BLOCK_P rows at a time, so a 256-wide head does not hold all of it at once."""
    bh, col_tile = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    offs_d = tl.arange(0, BLOCK_D)
    offs_v = col_tile * BLOCK_V + tl.arange(0, BLOCK_V)
    d_mask, v_mask = offs_d < D, offs_v < D
    gamma = tl.load(decay + h)
    q_row, k_row = q + b * s_qb + h * s_qh, k + b * s_kb + (h // G) * s_kh
    if IDENTITY:
        phi_q = tl.load(q_row + offs_d, mask=d_mask, other=0.0).to(tl.float32)
        phi_k = tl.load(k_row + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    else:
        zq = tl.zeros((BLOCK_D,), tl.float32)
        zk = tl.zeros((BLOCK_D,), tl.float32)
        for p0 in tl.static_range(0, BLOCK_D, BLOCK_P):
            ks = p0 + tl.arange(0, BLOCK_P)
            p = tl.load(proj + ks[:, None] * D + offs_d[None, :], mask=(ks < D)[:, None] & d_mask[None, :], other=0.0)
            zq += tl.sum(tl.load(q_row + ks, mask=ks < D, other=0.0).to(tl.float32)[:, None] * p, axis=0)
            zk += tl.sum(tl.load(k_row + ks, mask=ks < D, other=0.0).to(tl.float32)[:, None] * p, axis=0)
        zq, zk = tl.where(d_mask, zq, float("-inf")), tl.where(d_mask, zk, float("-inf"))
        eq = tl.exp2((zq - tl.max(zq, axis=0)) * LOG2E)
        ek = tl.exp2((zk - tl.max(zk, axis=0)) * LOG2E)
        phi_q, phi_k = eq / tl.sum(eq, axis=0), ek / tl.sum(ek, axis=0)
    vx = tl.load(v + b * s_vb + (h // G) * s_vh + offs_v, mask=v_mask, other=0.0).to(tl.float32)

    ptrs = state + bh.to(tl.int64) * D * D + offs_d[:, None] * D + offs_v[None, :]
    mask = d_mask[:, None] & v_mask[None, :]
    s = tl.load(ptrs, mask=mask, other=0.0)
    s = gamma * s + phi_k[:, None] * vx[None, :]
    tl.store(ptrs, s, mask=mask)
    out = tl.sum(phi_q[:, None] * s, axis=0)
    tl.store(o + b * s_ob + h * s_oh + offs_v, out.to(o.dtype.element_ty), mask=v_mask)


@torch.library.custom_op("dijiang::recurrent_step", mutates_args=("state",))
def _recurrent_step_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, proj: Optional[torch.Tensor],
                       decay: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    B, H, D = q.shape
    o = torch.empty(B, H, D, device=v.device, dtype=v.dtype)
    BLOCK_D = _block_d(D)
    BLOCK_V = 32
    _recurrent_step_kernel[(B * H, triton.cdiv(D, BLOCK_V))](
        q, k, v, o, proj, decay, state,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), o.stride(0), o.stride(1),
        H, H // k.shape[1], D, BLOCK_D=BLOCK_D, BLOCK_V=BLOCK_V, BLOCK_P=min(BLOCK_D, 64), IDENTITY=proj is None,
        num_warps=4 if BLOCK_D <= 64 else 8)
    return o


@_recurrent_step_op.register_fake
def _(q, k, v, proj, decay, state):
    return v.new_empty(q.shape)


def recurrent_step(q, k, v, proj, decay, state):
    """One decoding token. q: (B, H, D) or (B, 1, H, D); k, v: (B, H_kv, D) or (B, 1, H_kv, D), H_kv
    dividing H; proj: the (D, D) P, or None for the identity map; state: (B, H, D, D) fp32, updated in
    place (S = gamma S + phi(k)^T v). Returns o = phi(q) S, shaped like q and typed like v. One kernel
    launch, no host sync and no allocation besides o, so it can be captured in a CUDA graph."""
    squeeze = q.dim() == 4
    if squeeze and not (q.shape[1] == 1 and k.dim() == 4 and k.shape[1] == 1):
        raise ValueError(f"a decoding step takes one token: q, k, v (B, 1, H, D), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    q3, k3, v3 = (x[:, 0] if squeeze else x for x in (q, k, v))
    H, _, D = _check_inputs(q3, k3, v3, proj, decay)
    if not (decay.is_contiguous() and (proj is None or proj.is_contiguous())):
        raise ValueError("proj and decay must be contiguous (a copy here would break CUDA-graph capture)")
    _check_state(state, q3.shape[0], H, D, "state")
    o = _recurrent_step_op(q3, k3, v3, proj, decay, state)
    return o[:, None] if squeeze else o
