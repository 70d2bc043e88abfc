"""
A DiJiang model's one-token decoding step as a few Triton kernels per layer: what
CUDAGraphDecoder(model, batch_size, fused=True) replays. dijiang.py's eager steps are its reference
(tests/test_decode.py on the CPU under TRITON_INTERPRET=1, tests/test_gpu_model.py on the GPU).

At batch 1 a step is a read of every weight: 0.76 GB for pythia-410m, 0.16 ms at 4.8 TB/s. Run as
the model's modules it is some fourteen small kernels per layer, none long enough to reach that
bandwidth, with a gap between each two. Here a layer is three kernels:

  1. _norm_matmul_kernel: the norm and one product over the packed rows
         [qkv; attention gate; MLP up (; MLP gate)]
     The norms' scales are folded into the packed weights once (W diag(w), and W b into the bias),
     so one normalized x serves every row, whichever of the two norms it had. The kernel also
     writes x + the output biases, the start of the layer's output.
  2. _recurrent_gate_kernel: per head, rotary on q and k read straight from that output,
     phi = softmax(. @ P), S = gamma S + phi(k)^T v in place, o = phi(q) S, then GroupNorm and
     * silu(gate).
  3. _matmul_add_kernel: one product over the packed columns [proj | down], the GELU (or SwiGLU)
     applied to its MLP input as it is read, split along the reduction and added atomically onto
     the layer's output: x + attention + MLP.

That is GPT-NeoX's parallel residual. A sequential one (LLaMA) needs the attention's output before
the MLP's norm, so it runs 1-2-3 for the attention and 1-3 for the MLP: five kernels. The first
layer's kernel 1 reads the token's embedding row, and the head is kernel 1 again (ln_f folded into
lm_head). GroupNorm stays in kernel 2 when its groups (n_head channels each) lie inside a head's
column block; otherwise (pythia-160m, SmolLM2) kernel 2 writes o and torch's group_norm and gate
follow. The residual stream is kept in fp32; products take the weights' dtype with fp32 sums, as
the model's do. Heads up to 128 wide; batch 1 multiplies and sums on the CUDA cores, larger
batches use tl.dot. Block sizes are autotuned on the first step, before the graph is captured.
"""

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

# Triton's CPU interpreter (TRITON_INTERPRET=1) computes bf16 products wrongly: there the products
# take fp32 operands, and each kernel has one small configuration, so that tiny models exercise
# every split and boundary.
INTERPRET = os.environ.get('TRITON_INTERPRET') == '1'
FP32_PRODUCTS = tl.constexpr(INTERPRET)  # what the kernels read (a kernel sees only constexpr globals)
MAX_HEAD_SIZE = 128
NORMS = {'layernorm': 0, 'rmsnorm': 1}
ACTIVATIONS = {'gelu': 0, 'swiglu': 1}


def _configs(names, interpreted, *candidates):
    """The autotuner's triton.Configs: each candidate gives names' values, then num_warps. Under the
    interpreter one small configuration, so that tiny models exercise every split and boundary."""
    if INTERPRET:
        return [triton.Config(dict(zip(names, interpreted)))]
    return [triton.Config(dict(zip(names, values)), num_warps=values[-1]) for values in candidates]


def _autotune(configs, key, **options):
    """triton.autotune with quick timings (each config a few milliseconds), kept on disk across runs."""
    def quick(kernel_call, quantiles):
        return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)
    return triton.autotune(configs=configs, key=key, do_bench=quick, cache_results=True, **options)


@triton.jit
def _accumulate(acc, x, w, BLOCK_M: tl.constexpr):
    """acc (M, N) fp32 += x (M, K) @ w (N, K)^T, x already in w's dtype."""
    if BLOCK_M == 1:  # one row: multiply and sum on the CUDA cores, the weight tile read once
        acc += tl.sum(w.to(tl.float32) * x.to(tl.float32), axis=1)[None, :]
    elif FP32_PRODUCTS:
        acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc)
    else:
        acc = tl.dot(x, tl.trans(w), acc, input_precision='ieee')  # 'ieee': no TF32 for fp32 weights
    return acc

# -----------------------------------------------------------------------------
# 1. norm(x) @ W^T + b, and x + res_bias for the layer's output


@_autotune(_configs(('BLOCK_N', 'BLOCK_K'), (32, 32), (16, 256, 4), (16, 512, 4), (32, 128, 4), (32, 256, 4),
                    (32, 256, 8), (64, 128, 4), (64, 128, 8), (64, 256, 8)), key=['M', 'N', 'K'])
@triton.jit
def _norm_matmul_kernel(x, token, embed, w, bias, out, x_next, res_bias, M, N, K, eps,
                        NORM: tl.constexpr, FROM_EMBED: tl.constexpr, WRITE_NEXT: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out (M, N) = norm(x) @ w^T + bias for rows x (M, K) fp32, or the embedding rows of token (M,)
    when FROM_EMBED; norm without its scale (folded into w): LayerNorm (NORM 0) or RMSNorm (1).
    WRITE_NEXT: the first column of programs also writes x_next = x + res_bias (M, K) fp32."""
    pid_n, pid_m = tl.program_id(0), tl.program_id(1)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = m < M
    if FROM_EMBED:
        rows = embed + tl.load(token + m, mask=m_mask, other=0).to(tl.int64) * K
    else:
        rows = x + m.to(tl.int64) * K
    cols = tl.arange(0, BLOCK_K)

    # pass 1: the statistics, tile by tile (Chan's combination of means and squared deviations, for
    # LayerNorm; RMSNorm sums squares), and the layer output's start
    mean = tl.zeros((BLOCK_M,), tl.float32)
    squares = tl.zeros((BLOCK_M,), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + cols
        mask = m_mask[:, None] & (k < K)[None, :]
        xk = tl.load(rows[:, None] + k[None, :], mask=mask, other=0.0).to(tl.float32)
        if WRITE_NEXT:
            xk_next = xk + tl.load(res_bias + k, mask=k < K, other=0.0)[None, :]
            tl.store(x_next + m.to(tl.int64)[:, None] * K + k[None, :], xk_next, mask=mask & (pid_n == 0))
        if NORM == 0:
            seen, count = k0 * 1.0, tl.minimum(K - k0, BLOCK_K) * 1.0
            tile_mean = tl.sum(xk, axis=1) / count
            centred = tl.where(mask, xk - tile_mean[:, None], 0.0)
            delta = tile_mean - mean
            mean += delta * (count / (seen + count))
            squares += tl.sum(centred * centred, axis=1) + delta * delta * (seen * count / (seen + count))
        else:  # RMSNorm does not centre
            squares += tl.sum(xk * xk, axis=1)
    rstd = 1.0 / tl.sqrt(squares / K + eps)

    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # pass 2: the product
    n_mask = n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + cols
        mask = m_mask[:, None] & (k < K)[None, :]
        xk = tl.load(rows[:, None] + k[None, :], mask=mask, other=0.0).to(tl.float32)
        x_hat = ((xk - mean[:, None]) * rstd[:, None]).to(w.dtype.element_ty)  # rounded as the model's norm output
        wk = tl.load(w + n.to(tl.int64)[:, None] * K + k[None, :], mask=n_mask[:, None] & (k < K)[None, :], other=0.0)
        acc = _accumulate(acc, x_hat, wk, BLOCK_M)
    acc += tl.load(bias + n, mask=n_mask, other=0.0)[None, :]
    tl.store(out + m.to(tl.int64)[:, None] * N + n[None, :], acc.to(out.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])

# -----------------------------------------------------------------------------
# 2. The recurrent step of one head, with rotary, GroupNorm and the gate


@triton.jit
def _recurrent_gate_kernel(hidden, state, proj, decay, inv_freq, position, gn_weight, gn_bias, y,
                           s_hidden, H, D, R, C, gate_off, eps,
                           GROUP: tl.constexpr, GN_SIZE: tl.constexpr, FUSE_GN: tl.constexpr, IDENTITY: tl.constexpr,
                           BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr):
    """For batch row b, query head h and BLOCK_V columns of its state: q, k, v from hidden's row,
    laid out per key/value head as [q_1 ... q_GROUP | k | v] (dijiang.qkv_projection), rotary on the
    first R channels (channel i paired with i + R/2), S = gamma S + phi(k)^T v in place,
    o = phi(q) S. FUSE_GN: y = GroupNorm(o) * silu(gate) for these columns (groups of GN_SIZE
    channels inside the block); else y = o, fp32."""
    b, h, col_block = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    row = hidden + b.to(tl.int64) * s_hidden
    head = row + (h // GROUP) * (GROUP + 2) * D
    d = tl.arange(0, BLOCK_D)
    d_mask = d < D
    half = R // 2
    # rotary as dijiang.apply_rotary, its cos and sin rounded to the activations' dtype as there
    frequency = tl.load(inv_freq + tl.where(d < half, d, d - half), mask=d < R, other=0.0)
    angle = tl.load(position).to(tl.float32) * frequency
    cos = tl.cos(angle).to(hidden.dtype.element_ty).to(tl.float32)
    sin = tl.sin(angle).to(hidden.dtype.element_ty).to(tl.float32)
    partner = tl.where(d < half, d + half, tl.where(d < R, d - half, d))
    sin = tl.where(d < half, -sin, sin)
    q = tl.load(head + (h % GROUP) * D + d, mask=d_mask, other=0.0).to(tl.float32)
    q = tl.where(d < R, q * cos + tl.load(head + (h % GROUP) * D + partner, mask=d_mask, other=0.0) * sin, q)
    k = tl.load(head + GROUP * D + d, mask=d_mask, other=0.0).to(tl.float32)
    k = tl.where(d < R, k * cos + tl.load(head + GROUP * D + partner, mask=d_mask, other=0.0) * sin, k)
    if IDENTITY:
        phi_q, phi_k = q, k
    else:  # phi = softmax(x @ P) over the features, fp32
        p = tl.load(proj + d[:, None] * D + d[None, :], mask=d_mask[:, None] & d_mask[None, :], other=0.0)
        z_q = tl.where(d_mask, tl.sum(q[:, None] * p, axis=0), float('-inf'))
        z_k = tl.where(d_mask, tl.sum(k[:, None] * p, axis=0), float('-inf'))
        e_q, e_k = tl.exp(z_q - tl.max(z_q, axis=0)), tl.exp(z_k - tl.max(z_k, axis=0))
        phi_q, phi_k = e_q / tl.sum(e_q, axis=0), e_k / tl.sum(e_k, axis=0)
    # phi's index is the state's row, rows d of the (D, D) state; these programs own BLOCK_V of its columns
    cols = col_block * BLOCK_V + tl.arange(0, BLOCK_V)
    c_mask = cols < D
    v = tl.load(head + (GROUP + 1) * D + cols, mask=c_mask, other=0.0).to(tl.float32)
    ptrs = state + ((b * H + h).to(tl.int64) * D + d[:, None]) * D + cols[None, :]
    s_mask = d_mask[:, None] & c_mask[None, :]
    s = tl.load(ptrs, mask=s_mask, other=0.0)
    s = tl.load(decay + h) * s + phi_k[:, None] * v[None, :]
    tl.store(ptrs, s, mask=s_mask)
    o = tl.sum(phi_q[:, None] * s, axis=0)  # (BLOCK_V,)
    channels = h * D + cols  # in the concatenated heads, where GroupNorm and the gate see them
    if FUSE_GN:
        grouped = tl.reshape(o, (BLOCK_V // GN_SIZE, GN_SIZE))
        mean = tl.sum(grouped, axis=1) / GN_SIZE
        centred = grouped - mean[:, None]
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / GN_SIZE + eps)
        o = tl.reshape(centred * rstd[:, None], (BLOCK_V,))
        o = (o * tl.load(gn_weight + channels, mask=c_mask, other=0.0)
             + tl.load(gn_bias + channels, mask=c_mask, other=0.0))
        gate = tl.load(row + gate_off + channels, mask=c_mask, other=0.0).to(tl.float32)
        o = o * gate * tl.sigmoid(gate)
    tl.store(y + b.to(tl.int64) * C + channels, o.to(y.dtype.element_ty), mask=c_mask)

# -----------------------------------------------------------------------------
# 3. acc += [a | act(mlp hidden)] @ W^T, split along the reduction


@triton.jit
def _gelu_or_swiglu(hidden_row, j, mask, up_off, gate_off, ACT: tl.constexpr):
    """The MLP's activation of columns j of hidden's rows: gelu(up) (exact, erf) or silu(gate) * up."""
    up = tl.load(hidden_row + up_off + j, mask=mask, other=0.0).to(tl.float32)
    if ACT == 0:
        return 0.5 * up * (1.0 + tl.math.erf(up * 0.7071067811865476))
    gate = tl.load(hidden_row + gate_off + j, mask=mask, other=0.0).to(tl.float32)
    return gate * tl.sigmoid(gate) * up


@_autotune(_configs(('BLOCK_N', 'BLOCK_K', 'SPLIT_K'), (32, 32, 64), (16, 256, 1024, 4), (16, 256, 2048, 4),
                    (32, 128, 512, 4), (32, 128, 1024, 4), (32, 256, 1024, 4), (32, 256, 2048, 4), (64, 128, 512, 4),
                    (64, 128, 1024, 8)), key=['M', 'N', 'K_A', 'K_B'], restore_value=['acc_out'])
@triton.jit
def _matmul_add_kernel(a, hidden, w, acc_out, M, N, K_A, K_B, s_hidden, up_off, gate_off,
                       ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       SPLIT_K: tl.constexpr):
    """acc_out (M, N) fp32 += [a | act(hidden)] @ w^T, w (N, K_A + K_B): the first K_A columns take
    a (M, K_A), the others the MLP activation of hidden's rows. Program (n, s) sums the s-th slice
    of SPLIT_K columns, each slice inside one of the two parts, and adds its share atomically."""
    pid_n, pid_s, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = m < M
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    slices_a = tl.cdiv(K_A, SPLIT_K)
    in_a = pid_s < slices_a
    start = tl.where(in_a, pid_s * SPLIT_K, K_A + (pid_s - slices_a) * SPLIT_K)
    end = tl.minimum(start + SPLIT_K, tl.where(in_a, K_A, K_A + K_B))
    hidden_rows = hidden + m.to(tl.int64)[:, None] * s_hidden
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(start, end, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        mask = m_mask[:, None] & (k < end)[None, :]
        from_a = tl.load(a + m.to(tl.int64)[:, None] * K_A + k[None, :], mask=mask & in_a, other=0.0).to(tl.float32)
        from_mlp = _gelu_or_swiglu(hidden_rows, (k - K_A)[None, :], mask & (pid_s >= slices_a), up_off, gate_off, ACT)
        xk = tl.where(in_a, from_a, from_mlp).to(w.dtype.element_ty)
        wk = tl.load(w + n.to(tl.int64)[:, None] * (K_A + K_B) + k[None, :], mask=n_mask[:, None] & (k < end)[None, :],
                     other=0.0)
        acc = _accumulate(acc, xk, wk, BLOCK_M)
    tl.atomic_add(acc_out + m.to(tl.int64)[:, None] * N + n[None, :], acc, mask=m_mask[:, None] & n_mask[None, :],
                  sem='relaxed')

# -----------------------------------------------------------------------------
# Host side: the packed weights, built once, and the launches of one step


def unsupported(model):
    """'' when FusedStep runs this model, else why it cannot."""
    cfg = model.config
    if cfg.attention != 'dijiang':
        return f"attention={cfg.attention!r}: the fused step is DiJiang's recurrent one"
    if cfg.head_size > MAX_HEAD_SIZE:
        return f"head_size={cfg.head_size}: the fused step takes heads up to {MAX_HEAD_SIZE} wide"
    return ''


def fold_norm(norm, linears):
    """The rows of linears stacked, with norm's scale folded in: W diag(w) and b + W @ norm.bias, so
    that norm(x) @ W^T + b = x_hat @ W'^T + b', x_hat the norm without its scale. (W', b' fp32)."""
    weight = torch.cat([linear.weight for linear in linears]).float()
    bias = torch.cat([linear.bias.float() if linear.bias is not None else weight.new_zeros(linear.out_features)
                      for linear in linears])
    if getattr(norm, 'bias', None) is not None:
        bias = bias + weight @ norm.bias.float()
    return (weight * norm.weight.float()[None, :]).to(norm.weight.dtype).contiguous(), bias.contiguous()


def output_bias(*linears):
    """The biases added to the residual stream, summed in fp32 (zeros when there are none)."""
    total = torch.zeros(linears[0].out_features, device=linears[0].weight.device)
    for linear in linears:
        if linear.bias is not None:
            total += linear.bias.float()
    return total


@dataclass
class Product:
    """One norm-and-product launch: the packed rows (N, K), their bias (N,) fp32, and the bias
    (K,) fp32 of the layer output that it starts."""
    weight: torch.Tensor
    bias: torch.Tensor
    next_bias: Optional[torch.Tensor] = None


@dataclass
class Layer:
    first: Product  # [qkv; gate] (with the MLP's rows too under a parallel residual)
    second: Optional[Product]  # sequential residual: [MLP up; MLP gate] after the attention
    out_weight: torch.Tensor  # [proj | down] (parallel), or proj alone with down_weight after it
    down_weight: Optional[torch.Tensor]
    attn: torch.nn.Module  # the model's DiJiangAttention: P, the decays, GroupNorm's weights


class FusedStep:
    """DiJiang's one-token step as the kernels above, over weights packed from the model once (a
    copy: about the size of the model's layers and head). step(token (B, 1), position) -> logits
    (B, 1, vocab_size) fp32, each layer's state updated in place."""
    kind = 'state'

    def __init__(self, model, batch_size):
        reason = unsupported(model)
        if reason:
            raise ValueError(f"{reason}: decode with fused=False")
        cfg, device = model.config, model.lm_head.weight.device
        self.model, self.batch_size = model, batch_size
        with torch.no_grad():
            self.layers = [self.pack(block, cfg) for block in model.layers]
            self.head = Product(*fold_norm(model.ln_f, [model.lm_head]))
        arange = torch.arange(0, cfg.rotary_dim, 2, device=device, dtype=torch.float32)
        self.inv_freq = 1.0 / (cfg.rotary_base ** (arange / cfg.rotary_dim))  # as dijiang.rotary_cos_sin
        self.states = [torch.zeros(batch_size, cfg.n_head, cfg.head_size, cfg.head_size, device=device)
                       for _ in range(cfg.n_layer)]
        dtype, B, C = model.lm_head.weight.dtype, batch_size, cfg.n_embd
        widest = max(p.weight.shape[0] for layer in self.layers for p in (layer.first, layer.second) if p)
        self.hidden = torch.empty(B * widest, device=device, dtype=dtype)  # kernel 1's output, viewed (B, N)
        self.residual = torch.empty(2, B, C, device=device)  # fp32: a layer reads one and writes the other
        # GroupNorm's groups are n_head channels wide: kernel 2 takes them when they tile a head's columns
        self.fuse_group_norm = cfg.head_size == triton.next_power_of_2(cfg.head_size) and cfg.head_size % cfg.n_head == 0
        self.y = torch.empty(B, C, device=device, dtype=dtype)  # the gated attention output, kernel 3's input
        self.o = None if self.fuse_group_norm else torch.empty(B, C, device=device)  # before GroupNorm, fp32
        self.logits = torch.empty(B, cfg.vocab_size, device=device)

    @staticmethod
    def pack(block, cfg):
        attn, mlp = block.attn, block.mlp
        mlp_rows = [mlp.up] + ([mlp.gate] if mlp.gate is not None else [])  # up first: its offset is 0 in `second`
        if block.parallel_residual:
            w, b = (torch.cat(parts) for parts in zip(fold_norm(block.ln_attn, [attn.qkv, attn.gate]),
                                                      fold_norm(block.ln_mlp, mlp_rows)))
            first = Product(w, b, output_bias(attn.proj, mlp.down))
            out_weight = torch.cat([attn.proj.weight, mlp.down.weight], dim=1).contiguous()
            return Layer(first, None, out_weight, None, attn)
        first = Product(*fold_norm(block.ln_attn, [attn.qkv, attn.gate]), output_bias(attn.proj))
        second = Product(*fold_norm(block.ln_mlp, mlp_rows), output_bias(mlp.down))
        return Layer(first, second, attn.proj.weight.contiguous(), mlp.down.weight.contiguous(), attn)

    def load(self, cache):
        """Copy in the states of a dijiang.Cache (what an eager prefill leaves)."""
        for mine, theirs in zip(self.states, cache.layers):
            mine.copy_(theirs)

    def step(self, token, position):
        cfg = self.model.config
        qkv_rows, I = (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_size, cfg.intermediate_size
        mlp_off = qkv_rows + cfg.n_embd  # where the MLP's rows start in a parallel layer's output
        current = 0
        for i, (layer, state) in enumerate(zip(self.layers, self.states)):
            token_row = token.view(-1) if i == 0 else None  # the first layer reads the embedding rows
            hidden = self.norm_matmul(self.residual[current], layer.first, self.residual[1 - current], token_row)
            current = 1 - current
            self.attention(layer.attn, hidden, state, position, gate_off=qkv_rows)
            if layer.second is None:  # parallel: proj and down in one product
                self.matmul_add(layer.out_weight, self.y, hidden, mlp_off, mlp_off + I, self.residual[current])
                continue
            self.matmul_add(layer.out_weight, self.y, None, 0, 0, self.residual[current])
            hidden = self.norm_matmul(self.residual[current], layer.second, self.residual[1 - current])
            current = 1 - current
            self.matmul_add(layer.down_weight, None, hidden, 0, I, self.residual[current])
        self.norm_matmul(self.residual[current], self.head, out=self.logits)
        return self.logits.view(self.batch_size, 1, -1)

    def norm_matmul(self, x, product, x_next=None, token=None, out=None):
        """Kernel 1: norm(x) @ W^T + b into out (or the hidden buffer, returned (B, N))."""
        (N, K), M = product.weight.shape, self.batch_size
        out = self.hidden[:M * N].view(M, N) if out is None else out
        block_m = block_rows(M)
        embed = self.model.embed.weight
        _norm_matmul_kernel[lambda meta: (triton.cdiv(N, meta['BLOCK_N']), triton.cdiv(M, block_m))](
            x, x if token is None else token, embed, product.weight, product.bias, out,
            x if x_next is None else x_next, product.bias if x_next is None else product.next_bias,
            M, N, K, self.model.config.norm_eps,
            NORM=NORMS[self.model.config.norm], FROM_EMBED=token is not None, WRITE_NEXT=x_next is not None,
            BLOCK_M=block_m)
        return out

    def attention(self, attn, hidden, state, position, gate_off):
        """Kernel 2 into self.y, then GroupNorm and the gate in torch when they are not fused."""
        cfg, (M, N) = self.model.config, hidden.shape
        D = cfg.head_size
        block_d = max(16, triton.next_power_of_2(D))
        block_v = max(cfg.n_head, min(32, block_d)) if self.fuse_group_norm else min(32, block_d)
        _recurrent_gate_kernel[(M, cfg.n_head, block_d // block_v)](
            hidden, state, attn.feature_proj, attn.decay, self.inv_freq, position, attn.group_norm.weight,
            attn.group_norm.bias, self.y if self.fuse_group_norm else self.o, N, cfg.n_head, D, cfg.rotary_dim,
            cfg.n_embd, gate_off, attn.group_norm.eps, GROUP=cfg.n_head // cfg.n_kv_head, GN_SIZE=cfg.n_head,
            FUSE_GN=self.fuse_group_norm, IDENTITY=cfg.feature_map == 'identity', BLOCK_D=block_d, BLOCK_V=block_v,
            num_warps=4 if block_d <= 64 else 8)
        if not self.fuse_group_norm:  # GroupNorm's groups cross the heads: the module itself, then the gate
            gate = hidden[:, gate_off:gate_off + cfg.n_embd]
            self.y.copy_(attn.group_norm(self.o.to(gate.dtype)) * F.silu(gate))

    def matmul_add(self, weight, a, hidden, up_off, gate_off, acc):
        """Kernel 3: acc += [a | act(hidden)] @ weight^T; a (B, K_A) or None, hidden (B, *) or None."""
        M, (N, K) = self.batch_size, weight.shape
        K_A = 0 if a is None else a.shape[1]
        block_m = block_rows(M)

        def grid(meta):
            slices = triton.cdiv(K_A, meta['SPLIT_K']) + triton.cdiv(K - K_A, meta['SPLIT_K'])
            return triton.cdiv(N, meta['BLOCK_N']), slices, triton.cdiv(M, block_m)
        _matmul_add_kernel[grid](
            acc if a is None else a, acc if hidden is None else hidden, weight, acc, M, N, K_A, K - K_A,
            0 if hidden is None else hidden.stride(0), up_off, gate_off,
            ACT=ACTIVATIONS[self.model.config.mlp], BLOCK_M=block_m)


def block_rows(M):
    """Rows of the batch per program: 1 at batch 1 (no tensor cores), else 16 to 64 (tl.dot's least is 16)."""
    return 1 if M == 1 else min(64, max(16, triton.next_power_of_2(M)))
