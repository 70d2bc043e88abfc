"""
DiJiang: a GPT-NeoX (Pythia) language model whose softmax attention is replaced by the
frequency-domain kernel attention of "DiJiang: Efficient Large Language Models through Compact
Kernelization" (Chen et al., ICML 2024, arXiv 2403.19928).

Read top to bottom:
  1. GPTConfig and the Pythia suite's named configs
  2. rotary position embeddings (GPT-NeoX style, on the first rotary_pct of each head)
  3. the DiJiang math: the DCT projection P, the feature map phi, the per-head decay, and the
     attention in three forms that compute the same function:
        parallel  - the materialized N x N matrix, the readable reference
        chunk     - chunkwise with O(N) memory, for training and prefill
        recurrent - a (D, D) state per head and O(1) work per token, for decoding
  4. the modules: SoftmaxAttention (Pythia itself), DiJiangAttention, MLP, Block, GPT
  5. Tokenizer (Pythia's BPE on tiktoken, and a byte-level one for offline demos)

Decays are always relative (gamma^(n-m) with n >= m), never gamma^(-n): the released code's
D2 = gamma^(-n) overflows fp32 past about 2.8K tokens.
"""

import hashlib
import json
import math
import os
import re
import unicodedata
from dataclasses import asdict, dataclass, fields

import numpy as np
import scipy.fft
import scipy.stats
import tiktoken
import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # the fused GPU kernels: Triton ships with PyTorch's CUDA builds, not with the CPU ones
    import dijiang_triton
except ImportError:
    dijiang_triton = None

# -----------------------------------------------------------------------------
# 1. Config


@dataclass
class GPTConfig:
    vocab_size: int = 50304
    n_layer: int = 6
    n_head: int = 8
    n_embd: int = 512
    intermediate_size: int = 0  # 0 means 4 * n_embd, as in every Pythia model
    block_size: int = 2048  # Pythia's max_position_embeddings: the softmax model's context limit
    rotary_pct: float = 0.25  # rotary embeddings on the first rotary_pct of each head's dims
    rotary_base: float = 10000.0
    parallel_residual: bool = True  # x + attn(ln1(x)) + mlp(ln2(x)), as GPT-NeoX
    layer_norm_eps: float = 1e-5
    attention: str = 'dijiang'  # 'softmax' (Pythia) or 'dijiang'
    form: str = 'chunk'  # 'parallel', 'chunk' or 'recurrent': the same function, three ways
    chunk_size: int = 64
    feature_map: str = 'qmc'  # 'qmc' (the paper's quasi-Monte Carlo), 'mc' (the released code), or
                              # 'identity' (phi(x) = x: RetNet-like decayed linear attention, for ablations)
    feature_seed: int = 0  # layer i draws its projection with seed feature_seed + i
    kernel: str = 'auto'  # 'auto' (Triton on CUDA when available), 'torch' or 'triton'

    def __post_init__(self):
        if self.intermediate_size == 0:
            self.intermediate_size = 4 * self.n_embd
        checks = [
            (self.attention in ('softmax', 'dijiang'), f"attention={self.attention!r}: use 'softmax' or 'dijiang'"),
            (self.form in ATTENTION_FORMS, f"form={self.form!r}: use one of {sorted(ATTENTION_FORMS)}"),
            (self.feature_map in ('qmc', 'mc', 'identity'), f"feature_map={self.feature_map!r}: use 'qmc', 'mc' or 'identity'"),
            (self.kernel in ('auto', 'torch', 'triton'), f"kernel={self.kernel!r}: use 'auto', 'torch' or 'triton'"),
            (self.n_embd % self.n_head == 0, f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}"),
            (self.chunk_size > 0, f"chunk_size={self.chunk_size} must be positive"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"GPTConfig: {message}")

    @property
    def head_size(self):
        return self.n_embd // self.n_head

    @classmethod
    def named(cls, name, **overrides):
        if name not in CONFIGS:
            raise ValueError(f"unknown model {name!r}: choose one of {', '.join(CONFIGS)}")
        return cls(**{**CONFIGS[name], **overrides})


# The Pythia suite (EleutherAI), sizes as in their config.json files; 'tiny' is for tests and CPU demos.
CONFIGS = {
    'tiny':        dict(n_layer=2, n_head=4, n_embd=64),
    'pythia-70m':  dict(n_layer=6, n_head=8, n_embd=512),
    'pythia-160m': dict(n_layer=12, n_head=12, n_embd=768),
    'pythia-410m': dict(n_layer=24, n_head=16, n_embd=1024),
    'pythia-1b':   dict(n_layer=16, n_head=8, n_embd=2048),
    'pythia-1.4b': dict(n_layer=24, n_head=16, n_embd=2048),
    'pythia-2.8b': dict(n_layer=32, n_head=32, n_embd=2560),
    'pythia-6.9b': dict(n_layer=32, n_head=32, n_embd=4096, vocab_size=50432),
    'pythia-12b':  dict(n_layer=36, n_head=40, n_embd=5120, vocab_size=50688),
}

# -----------------------------------------------------------------------------
# 2. Rotary position embeddings


def rotary_cos_sin(positions, rotary_dim, base):
    """cos and sin of the rotation angles for positions (T,), each (T, rotary_dim / 2): one angle per
    rotated channel pair. Computed on demand, so there is no length limit."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, device=positions.device, dtype=torch.float32) / rotary_dim))
    angles = torch.outer(positions.float(), inv_freq)  # (T, R/2)
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    """Rotate the first rotary_dim = 2 * cos.shape[-1] channels of x (B, T, H, D); the rest pass through.
    GPT-NeoX pairs channel i with channel i + rotary_dim / 2 (the two halves), not with its neighbour."""
    half = cos.shape[-1]
    x1, x2, x_pass = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)  # (T, 1, R/2) broadcasts over heads
    # one flat cat of elementwise terms: torch.compile makes it a single kernel
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, x_pass), dim=-1)

# -----------------------------------------------------------------------------
# 3. DiJiang: the feature map, the decay and three forms of the attention


def projection_matrix(head_size, feature_map='qmc', seed=0):
    """P = C @ diag(t), (D, D) fp32. C is the orthonormal DCT-II matrix, so x @ P applies the
    inverse DCT and then scales frequency j by t_j = Phi^-1(u_j), Phi the standard normal CDF.
    'mc' draws u i.i.d. uniform, as the released code; 'qmc' takes a scrambled van der Corput
    (1-D Halton) sequence, the paper's weighted quasi-Monte Carlo, which covers (0, 1) evenly.
    'identity' is the ablation without a feature map: P = I and no softmax."""
    if feature_map == 'identity':
        return torch.eye(head_size, device='cpu')
    if feature_map == 'mc':
        u = torch.rand(head_size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64, device='cpu').numpy()
    else:
        u = scipy.stats.qmc.Halton(d=1, scramble=True, seed=seed).random(head_size)[:, 0]
    t = scipy.stats.norm.ppf(u)
    t[~np.isfinite(t)] = 0.0  # u = 0 gives -inf; the released code sets it to 0
    C = scipy.fft.dct(np.eye(head_size), axis=0, norm='ortho')
    return torch.from_numpy(C * t[None, :]).float()  # C @ diag(t) scales the columns


def decay_schedule(n_head):
    """gamma_h = 1 - exp(linspace(ln 1/32, ln 1/512, H)), from 0.96875 to 0.99805 (RetNet's schedule).
    Computed in fp32 as the released code does, so imported models get identical decays."""
    return 1 - torch.exp(torch.linspace(math.log(1 / 32), math.log(1 / 512), n_head))


def compute_dtype(x):
    """The attention math runs in fp32 for fp32, bf16 and fp16 inputs, and in float64 for float64
    inputs, so the same code is its own high-precision reference."""
    return torch.promote_types(x.dtype, torch.float32)


def feature_map(x, proj):
    """phi(x) = softmax(x @ P) over the feature dim, in fp32 (or float64). No 1/sqrt(D) scale, as released."""
    dtype = compute_dtype(x)
    return torch.softmax(x.to(dtype) @ proj.to(dtype), dim=-1)


def relative_decay(log_gamma, distance, dtype):
    """gamma^distance for distance >= 0 and 0 where distance < 0 (the causal mask), built in float64.
    log_gamma (H,), distance (...) integer -> (H, ...) in dtype."""
    exponent = distance.clamp(min=0).double() * log_gamma.double().view(-1, *[1] * distance.dim())
    return torch.where(distance >= 0, exponent.exp(), 0.0).to(dtype)


def add_initial_state(o, final_state, phi_q, log_gamma, state):
    """Add the contribution of a state carried in from earlier tokens: it reaches the token at offset
    n decayed by gamma^(n+1), and the end of the sequence by gamma^T. These powers only shrink, so a
    long sequence underflows them to 0 (the true value), never overflows."""
    T, dtype = phi_q.shape[1], phi_q.dtype
    steps = torch.arange(1, T + 1, device=phi_q.device)
    q_decayed = phi_q * relative_decay(log_gamma, steps, dtype).T[None, :, :, None]  # (B, T, H, D)
    state = state.to(dtype)
    o = o + torch.einsum('bthd,bhde->bthe', q_decayed, state)
    final_state = final_state + relative_decay(log_gamma, steps[-1:], dtype).view(1, -1, 1, 1) * state
    return o, final_state


def attention_parallel(phi_q, phi_k, v, decay, state=None):
    """The reference: o_n = sum_{m<=n} gamma^(n-m) (phi_q_n . phi_k_m) v_m as one (T, T) matrix per head.
    phi_q, phi_k (B, T, H, D), v (B, T, H, Dv), decay (H,), state (B, H, D, Dv) or None. Returns o
    (B, T, H, Dv) in v's dtype and the state after token T-1 (B, H, D, Dv), in compute_dtype(v)."""
    T, dtype = v.shape[1], compute_dtype(v)
    log_gamma = decay.double().log()
    q, k, vf = phi_q.to(dtype), phi_k.to(dtype), v.to(dtype)
    n = torch.arange(T, device=v.device)
    decay_matrix = relative_decay(log_gamma, n[:, None] - n[None, :], dtype)  # (H, T, T), zero above the diagonal
    scores = torch.einsum('bnhd,bmhd->bhnm', q, k) * decay_matrix  # (B, H, T, T)
    o = torch.einsum('bhnm,bmhe->bnhe', scores, vf)  # (B, T, H, Dv)
    k_to_end = k * relative_decay(log_gamma, T - 1 - n, dtype).T[None, :, :, None]  # key m decays gamma^(T-1-m) to the end
    final_state = torch.einsum('bmhd,bmhe->bhde', k_to_end, vf)  # (B, H, D, Dv)
    if state is not None:
        o, final_state = add_initial_state(o, final_state, q, log_gamma, state)
    return o.to(v.dtype), final_state


def decayed_prefix_sum(x, log_step_decay):
    """y_c = sum_{c' <= c} g^(c - c') x_c' along dim 2 of x (B, H, N, ...), with g = exp(log_step_decay)
    per head: the state at the end of each chunk. A Hillis-Steele scan: after the pass with offset s,
    y_c sums the 2s chunks ending at c, so log2(N) batched passes replace a loop over chunks."""
    N, offset = x.shape[2], 1
    while offset < N:
        g = (log_step_decay * offset).exp().to(x.dtype).view(1, -1, *[1] * (x.dim() - 2))  # (1, H, 1, ...)
        x = torch.cat((x[:, :, :offset], x[:, :, offset:] + g * x[:, :, :-offset]), dim=2)
        offset *= 2
    return x


def attention_chunk(phi_q, phi_k, v, decay, state=None, chunk_size=64):
    """Chunkwise form, O(T) memory. Inside a chunk of C tokens the decays are gamma^(i-j); across chunks
    a state carries everything before, decayed by gamma^C per chunk. Same inputs and outputs as
    attention_parallel."""
    B, T, H, D = phi_q.shape
    Dv, C, dtype = v.shape[-1], chunk_size, compute_dtype(v)
    pad = -T % C
    # Pad at the front with zeros: a zero key adds nothing to any state, so the state at the end is exact.
    q, k, vf = (F.pad(x.to(dtype), (0, 0, 0, 0, pad, 0)) for x in (phi_q, phi_k, v))
    N = (T + pad) // C
    q, k = (x.view(B, N, C, H, D).permute(0, 3, 1, 2, 4) for x in (q, k))  # (B, H, N, C, D)
    vf = vf.view(B, N, C, H, Dv).permute(0, 3, 1, 2, 4)  # (B, H, N, C, Dv)
    log_gamma = decay.double().log()
    i = torch.arange(C, device=v.device)

    # within each chunk: the parallel form on C tokens
    scores = (q @ k.transpose(-1, -2)) * relative_decay(log_gamma, i[:, None] - i[None, :], dtype)[:, None]  # (B, H, N, C, C)
    o = scores @ vf  # (B, H, N, C, Dv)

    # each chunk's own keys, decayed to its last token, sum to its state increment
    k_to_end = k * relative_decay(log_gamma, C - 1 - i, dtype)[:, None, :, None]  # (B, H, N, C, D)
    chunk_states = decayed_prefix_sum(k_to_end.transpose(-1, -2) @ vf, log_gamma * C)  # (B, H, N, D, Dv)
    # token i of chunk c reads the state at the end of chunk c-1, decayed by gamma^(i+1)
    states_before = torch.cat((torch.zeros_like(chunk_states[:, :, :1]), chunk_states[:, :, :-1]), dim=2)
    q_from_start = q * relative_decay(log_gamma, i + 1, dtype)[:, None, :, None]
    o = o + q_from_start @ states_before

    o = o.permute(0, 2, 3, 1, 4).reshape(B, N * C, H, Dv)[:, pad:]  # (B, T, H, Dv)
    final_state = chunk_states[:, :, -1]  # (B, H, D, Dv)
    if state is not None:
        o, final_state = add_initial_state(o, final_state, phi_q.to(dtype), log_gamma, state)
    return o.to(v.dtype), final_state


def attention_recurrent(phi_q, phi_k, v, decay, state=None):
    """Token by token: S_n = gamma S_{n-1} + phi_k_n^T v_n, o_n = phi_q_n S_n. O(1) work and memory
    per token: the decoding path. Same inputs and outputs as attention_parallel."""
    B, _, H, D = phi_q.shape
    dtype = compute_dtype(v)
    S = v.new_zeros(B, H, D, v.shape[-1], dtype=dtype) if state is None else state.to(dtype)
    gamma = decay.to(dtype).view(1, H, 1, 1)
    outputs = []
    for q_t, k_t, v_t in zip(*(x.to(dtype).unbind(dim=1) for x in (phi_q, phi_k, v))):  # (B, H, D) each
        S = gamma * S + k_t[..., :, None] * v_t[..., None, :]  # (B, H, D, Dv)
        outputs.append(torch.einsum('bhd,bhde->bhe', q_t, S))
    return torch.stack(outputs, dim=1).to(v.dtype), S


ATTENTION_FORMS = {'parallel': attention_parallel, 'chunk': attention_chunk, 'recurrent': attention_recurrent}

# -----------------------------------------------------------------------------
# 4. Modules


class SoftmaxAttention(nn.Module):
    """Pythia's attention: causal softmax through F.scaled_dot_product_attention, with a KV cache."""

    def __init__(self, config):
        super().__init__()
        self.n_head, self.head_size = config.n_head, config.head_size
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x, cos, sin, past=None):
        """x (B, T, C); past: (k, v) of earlier tokens or None. Returns (y, (k, v))."""
        B, T, C = x.shape
        # Pythia lays the fused projection out per head as [q | k | v]
        q, k, v = self.qkv(x).view(B, T, self.n_head, 3 * self.head_size).split(self.head_size, dim=-1)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        if past is not None:
            k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)
        T_past = k.shape[2] - T
        if T_past == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # the new tokens see all of the past and are causal among themselves
            mask = torch.ones(T, T_past + T, dtype=torch.bool, device=x.device).tril(diagonal=T_past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.proj(y), (k, v)


class DiJiangAttention(nn.Module):
    """DiJiang attention, as the released code computes it:
    rotary q, k -> phi = softmax(. @ P) -> decayed linear attention -> GroupNorm -> * silu(x W_G) -> dense."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.config = config
        self.n_head, self.head_size = config.n_head, config.head_size
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.proj = nn.Linear(config.n_embd, config.n_embd)
        self.gate = nn.Linear(config.n_embd, config.n_embd, bias=False)  # the released W_G (gate.weight = W_G^T)
        nn.init.xavier_uniform_(self.gate.weight, gain=2 ** -2.5)
        # The released grouping: head_size groups over the concatenated heads, so the groups do not line
        # up with the heads (70M: 64 groups of 8 channels across 8 heads). Kept for exact imports.
        self.group_norm = nn.GroupNorm(num_groups=config.head_size, num_channels=config.n_embd, eps=1e-5)
        # fixed, not trained, saved with the model
        self.register_buffer('feature_proj', projection_matrix(config.head_size, config.feature_map,
                                                               config.feature_seed + layer_idx))
        self.register_buffer('decay', decay_schedule(config.n_head))

    def _apply(self, fn, recurse=True):
        # Keep the fixed decay and projection in fp32 when the model is cast to bf16 or fp16:
        # gamma = 0.998 would round to 1.0 in bf16 and the memory would never fade.
        fixed = {name: self._buffers[name] for name in ('feature_proj', 'decay')}
        super()._apply(fn, recurse)
        for name, tensor in fixed.items():
            self._buffers[name] = tensor.to(self._buffers[name].device)
        return self

    def forward(self, x, cos, sin, past=None):
        """x (B, T, C); past: the recurrent state (B, H, D, D) fp32 after earlier tokens, or None.
        Returns (y, state after the last token)."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, self.n_head, 3 * self.head_size).split(self.head_size, dim=-1)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)  # (B, T, H, D)
        o, state = self.attend(q, k, v, past)  # (B, T, H, D)
        y = self.group_norm(o.reshape(B * T, C)).view(B, T, C)  # per token, over the concatenated heads
        y = y * F.silu(self.gate(x))
        return self.proj(y), state

    def uses_triton(self, q):
        """kernel='auto' takes the Triton kernels for the chunk form (and its decoding steps) on CUDA;
        'parallel' and 'recurrent' always run the readable torch code below."""
        cfg = self.config
        if cfg.kernel == 'torch' or cfg.form != 'chunk':
            return False
        supported = (q.is_cuda and cfg.feature_map != 'identity' and cfg.head_size <= 128
                     and cfg.chunk_size in (16, 32, 64, 128) and dijiang_triton is not None)
        if cfg.kernel == 'triton' and not supported:
            raise ValueError("kernel='triton' needs CUDA, Triton, head_size <= 128, chunk_size in 16/32/64/128 "
                             "and a softmax feature map: use kernel='auto' or 'torch'")
        return supported

    def attend(self, q, k, v, past):
        """The decayed linear attention on rotary q, k and on v, each (B, T, H, D). Autocast is off
        here: the forms choose their own precision (fp32 features, decays and states), which bf16
        would spoil over long contexts."""
        with torch.autocast(q.device.type, enabled=False):
            if self.uses_triton(q):  # the fused kernels compute the feature map themselves
                if q.shape[1] == 1 and past is not None:  # a decoding step: the state is updated in place
                    return dijiang_triton.recurrent_step(q, k, v, self.feature_proj, self.decay, past), past
                return dijiang_triton.chunk_attention(q, k, v, self.feature_proj, self.decay, past,
                                                      output_final_state=True, chunk_size=self.config.chunk_size)
            if self.config.feature_map == 'identity':
                phi_q, phi_k = q, k
            else:
                phi_q, phi_k = feature_map(q, self.feature_proj), feature_map(k, self.feature_proj)
            form = 'recurrent' if q.shape[1] == 1 else self.config.form  # one new token is one recurrent step
            if form == 'chunk':
                return attention_chunk(phi_q, phi_k, v, self.decay, past, self.config.chunk_size)
            return ATTENTION_FORMS[form](phi_q, phi_k, v, self.decay, past)


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.up = nn.Linear(config.n_embd, config.intermediate_size)
        self.down = nn.Linear(config.intermediate_size, config.n_embd)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))  # exact (erf) GELU, as Pythia


class Block(nn.Module):

    def __init__(self, config, layer_idx):
        super().__init__()
        self.parallel_residual = config.parallel_residual
        self.ln_attn = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.ln_mlp = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.attn = DiJiangAttention(config, layer_idx) if config.attention == 'dijiang' else SoftmaxAttention(config)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, past=None):
        attn_out, state = self.attn(self.ln_attn(x), cos, sin, past)
        if self.parallel_residual:  # GPT-NeoX: attention and MLP both read the block's input
            return x + attn_out + self.mlp(self.ln_mlp(x)), state
        x = x + attn_out
        return x + self.mlp(self.ln_mlp(x)), state


@dataclass
class Cache:
    """What incremental decoding carries between calls: how many tokens were seen, and per layer the
    (k, v) of every earlier token (softmax) or one fixed-size recurrent state (dijiang)."""
    pos: int
    layers: list


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.n_embd)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)  # untied, as Pythia
        self._init_weights()

    def _init_weights(self):
        # GPT-NeoX's normal(0, 0.02), with the residual outputs scaled down by the depth (GPT-2);
        # the DiJiang gate keeps its own xavier init, and the norms their ones and zeros.
        for name, p in self.named_parameters():
            if name.endswith('bias'):
                nn.init.zeros_(p)
            elif name.endswith(('attn.proj.weight', 'mlp.down.weight')):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * self.config.n_layer))
            elif p.dim() == 2 and not name.endswith('gate.weight'):
                nn.init.normal_(p, std=0.02)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, T):
        """Training FLOPs per token (forward + backward), for MFU: 6 per parameter plus attention.
        Softmax: PaLM's 12 * L * C * T. DiJiang, per head and token: the feature maps (4 D^2), the
        state update and read (4 D^2) and the intra-chunk products (4 C_chunk D), times 3 for backward."""
        cfg, D = self.config, self.config.head_size
        if cfg.attention == 'softmax':
            attention = 12 * cfg.n_layer * cfg.n_embd * T
        else:
            attention = 3 * cfg.n_layer * cfg.n_head * (8 * D * D + 4 * min(cfg.chunk_size, T) * D)
        return 6 * self.num_params() + attention

    def new_cache(self):
        return Cache(pos=0, layers=[None] * self.config.n_layer)

    def forward(self, idx, targets=None, cache=None):
        """idx (B, T) token ids. Returns logits (B, T, vocab_size) fp32 and the mean cross-entropy
        against targets (B, T) (-1 entries are ignored), or None. With a cache, idx continues the
        tokens seen so far and the cache is updated in place."""
        B, T = idx.shape
        start = 0 if cache is None else cache.pos
        if self.config.attention == 'softmax' and start + T > self.config.block_size:
            raise ValueError(f"{start + T} tokens of context, but this softmax model has block_size="
                             f"{self.config.block_size}: shorten the input, or use attention='dijiang'")
        positions = start + torch.arange(T, device=idx.device)  # start may be a tensor (CUDAGraphDecoder)
        cos, sin = rotary_cos_sin(positions, int(self.config.head_size * self.config.rotary_pct), self.config.rotary_base)
        x = self.embed(idx)  # (B, T, C)
        for i, block in enumerate(self.layers):
            x, state = block(x, cos, sin, None if cache is None else cache.layers[i])
            if cache is not None:
                cache.layers[i] = state
        if cache is not None:
            cache.pos = cache.pos + T
        logits = self.lm_head(self.ln_f(x))
        logits = logits.to(compute_dtype(logits))  # fp32 logits from a bf16 model
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def generate_tokens(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, compile=False):
        """Yield max_new_tokens next tokens (B, 1) one at a time. The prompt is processed once
        (dijiang: the configured form, 'chunk' by default); each new token then costs one step
        against the cache: a growing KV cache for softmax, a fixed-size state for dijiang, replayed
        as one CUDA graph on CUDA (compile=True also compiles that step)."""
        if idx.is_cuda and self.config.attention == 'dijiang':
            decoder = CUDAGraphDecoder(self, batch_size=idx.shape[0], compile=compile)
            logits, step = decoder.prefill(idx), decoder.step
        else:
            cache = self.new_cache()
            logits, _ = self(idx, cache=cache)

            def step(token):
                return self(token, cache=cache)[0]
        for i in range(max_new_tokens):
            next_token = sample_next_token(logits[:, -1], temperature, top_k, top_p)
            yield next_token
            if i + 1 < max_new_tokens:
                logits = step(next_token)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None):
        """Return idx (B, T) extended by max_new_tokens sampled tokens: (B, T + max_new_tokens)."""
        new = list(self.generate_tokens(idx, max_new_tokens, temperature, top_k, top_p))
        return torch.cat([idx, *new], dim=1)

    def save_checkpoint(self, out_dir, **extra):
        """Write out_dir/ckpt.pt (config, weights and any extra entries) and a readable config.json,
        each atomically: a crash leaves the previous files intact."""
        os.makedirs(out_dir, exist_ok=True)
        config = asdict(self.config)
        atomic_write(os.path.join(out_dir, 'ckpt.pt'),
                     lambda path: torch.save(dict(config=config, model=self.state_dict(), **extra), path))
        atomic_write(os.path.join(out_dir, 'config.json'), lambda path: write_text(path, json.dumps(config, indent=2) + '\n'))

    @classmethod
    def from_checkpoint(cls, path, **overrides):
        """Load a directory written by convert.py or train.py. overrides replace config fields, e.g.
        form='recurrent'. Weights are memory-mapped, and the model is built on the meta device, so a
        big model is not held twice in memory."""
        ckpt_path = os.path.join(path, 'ckpt.pt')
        if not os.path.isfile(ckpt_path):
            raise FileNotFoundError(f"no checkpoint at {ckpt_path}: pass a directory written by convert.py or train.py")
        ckpt = torch.load(ckpt_path, map_location='cpu', mmap=True, weights_only=True)
        known = {f.name for f in fields(GPTConfig)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown config field(s) {', '.join(unknown)}: choose from {', '.join(sorted(known))}")
        config = GPTConfig(**{**ckpt['config'], **overrides})
        # attention='dijiang' on a softmax checkpoint is the paper's linearization: every pretrained
        # weight is kept and the DiJiang-only parts keep their fresh init, so those must be real tensors.
        linearize = ckpt['config']['attention'] == 'softmax' and config.attention == 'dijiang'
        with torch.device('cpu' if linearize else 'meta'):
            model = cls(config)
        missing, unexpected = model.load_state_dict(ckpt['model'], strict=False, assign=True)
        missing = [key for key in missing if not (linearize and key.endswith(DIJIANG_ONLY_KEYS))]
        if missing or unexpected:
            raise ValueError(f"{ckpt_path} does not match the config (attention={config.attention!r}): missing "
                             f"{missing[:4]}, unexpected {unexpected[:4]}; check the overrides")
        return model


# what a DiJiang layer has beyond a softmax one: initialized, not imported, when linearizing
DIJIANG_ONLY_KEYS = ('attn.gate.weight', 'attn.group_norm.weight', 'attn.group_norm.bias', 'attn.feature_proj', 'attn.decay')


def decoding_inductor(graph_module, example_inputs):
    """torch.compile's backend for one-token decoding steps: inductor, with every one-row matrix
    product (x @ W.T + b included) written as a multiply-and-sum reduction. At batch 1 cuBLAS takes
    4-7 us for each of a layer's 1-8 MB weight reads on an H100 (0.6-1.9 TB/s); inductor's reductions,
    tuned by coordinate descent (as gpt-fast does), are faster and take the bias, the GELU and the
    LayerNorm's scaling into the same kernel."""
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.decomposition import select_decomp_table

    def one_row_addmm(bias, x, w, *, beta=1, alpha=1):
        if x.shape[0] != 1 or w.shape[0] > w.shape[1]:
            # a real matrix product, or a long reduction into few outputs (the MLP's down projection:
            # 11.8 us as a reduction against 7.7 us in cuBLAS): cuBLAS
            return NotImplemented
        y = (x.float()[:, :, None] * w.float()[None]).sum(1)  # (1, K, 1) * (1, K, N) -> (1, N), fp32 sums
        return (alpha * y + beta * bias.float()).to(x.dtype)

    decompositions = {**select_decomp_table(), torch.ops.aten.addmm.default: one_row_addmm}
    # coordinate_descent_tuning also makes inductor decompose a plain one-row mm the same way
    return compile_fx(graph_module, example_inputs, decompositions=decompositions,
                      config_patches={'coordinate_descent_tuning': True})


class CUDAGraphDecoder:
    """Decoding one token is launch-bound: a 24-layer model runs hundreds of tiny kernels per token.
    DiJiang's state has a fixed size, so one decoding step has fixed shapes at any context length and
    can be captured once in a CUDA graph and replayed with a single launch per token."""

    @torch.no_grad()
    def __init__(self, model, batch_size, compile=False):
        cfg, device = model.config, model.lm_head.weight.device
        self.model = model
        # compile=True fuses each layer's small ops into fewer kernels inside the graph
        self.step_model = torch.compile(model, dynamic=False, backend=decoding_inductor) if compile else model
        self.token = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.position = torch.zeros((), dtype=torch.long, device=device)
        self.states = [torch.zeros(batch_size, cfg.n_head, cfg.head_size, cfg.head_size, device=device)
                       for _ in range(cfg.n_layer)]
        side_stream = torch.cuda.Stream()  # warm up outside the graph: lazy inits, library handles
        side_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side_stream):
            for _ in range(3):
                self._step()
        torch.cuda.current_stream().wait_stream(side_stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._step()  # (B, 1, vocab_size), rewritten by every replay

    def _step(self):
        cache = Cache(pos=self.position, layers=list(self.states))
        logits, _ = self.step_model(self.token, cache=cache)
        self._load_states(cache)
        return logits

    def _load_states(self, cache):
        for state, new_state in zip(self.states, cache.layers):
            state.copy_(new_state)  # the graph's inputs are fixed buffers: update them in place

    @torch.no_grad()
    def prefill(self, idx):
        """Run the prompt (B, T) in the configured form and load the states it leaves."""
        cache = self.model.new_cache()
        logits, _ = self.model(idx, cache=cache)
        self._load_states(cache)
        self.position.fill_(cache.pos)
        return logits

    @torch.no_grad()
    def step(self, token):
        """Consume token (B, 1); return the logits (B, 1, vocab_size) for the next one."""
        self.token.copy_(token)
        self.graph.replay()
        self.position += 1
        return self.logits


def sample_next_token(logits, temperature=1.0, top_k=None, top_p=None):
    """Sample one token per row from logits (B, V): greedy at temperature 0, else from the softmax
    restricted to the top_k tokens and to the smallest set whose probability reaches top_p."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float('-inf'))
    if top_p is not None:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative - sorted_logits.softmax(dim=-1) >= top_p  # keep tokens until top_p is reached
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float('-inf'))
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1)


def write_text(path, text):
    with open(path, 'w', encoding='utf-8') as f:
        f.write(text)


def atomic_write(path, write):
    """Call write(tmp_path), then rename tmp_path over path, so readers never see a partial file."""
    tmp_path = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp_path)
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)

# -----------------------------------------------------------------------------
# 5. Tokenizer
# Pythia's tokenizer (GPT-NeoX-20B byte-level BPE) on tiktoken, giving exactly the ids of HF `tokenizers`
# on its tokenizer.json. What makes that exact:
# - Text is NFC-normalized as HF does it: special tokens are matched on the raw text first, and HF's NFC
#   tables are Unicode 9.0, so the newer characters that normalization would move or (de)compose stay as
#   they are (HF_UNKNOWN; derived by probing HF's normalizer against Unicode 18 data).
# - Vocab strings spell bytes with GPT-2's byte-to-unicode map, and the merge order equals the id order
#   (checked in from_file), so tiktoken's "lowest id merges first" is HF's "earliest merge first".
# - The 23 added tokens for runs of 2..24 spaces are matched before BPE, leftmost-longest: a run splits
#   greedily into pieces of at most 24, and a single leftover space stays with the text that follows.
#   Putting ` {2,24}` first in GPT-2's pre-tokenizer regex, and keeping its whitespace rules off double
#   spaces, does the same in the one regex pass, so encoding stays inside tiktoken's Rust code.
# - Like HF's encode, special-token text in the input ("<|endoftext|>") becomes the special id.


_WS = r"(?:[^\S ]| (?! ))"  # one whitespace char that does not start a run of 2+ spaces
PYTHIA_PATTERN = r" {2,24}|'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|" + _WS + r"+(?!\S)|" + _WS + "+"
HF_UNKNOWN_RANGES = """05C8-05C9 07FD 0897-089F 08CA-08D3 09FE 0C3C 0D3B-0D3C 0EBA 1715 1ABF-1AF0 1DF6-1DFA A82C 105C9
105D2 105DA 105E4 10D24-10D27 10D69-10D6D 10EAB-10EAC 10ECB-10ECF 10EF0-10EFB 10EFD-10EFF 10F46-10F50
10F82-10F85 11070 1133B 11382-11385 1138B 1138E 11390-11391 113B8 113BB 113C2 113C5 113C7-113C9 113CE-113D0
1145E 11839-1183A 11930 11935 11938 1193D-1193E 11943 119E0 11A34 11A47 11A99 11D42 11D44-11D45 11D97
11F41-11F42 1611E-16129 1612F 16D63 16D67-16D6A 16FF0-16FF1 1D127-1D128 1D250-1D252 1D25B-1D25C 1D25F
1D280-1D281 1E08F 1E130-1E136 1E2AE 1E2EC-1E2EF 1E4EC-1E4EF 1E5EE-1E5EF 1E6E3 1E6E6 1E6EE-1E6EF 1E6F5"""
HF_UNKNOWN = '[' + ''.join('-'.join(chr(int(x, 16)) for x in r.split('-')) for r in HF_UNKNOWN_RANGES.split()) + ']'


def gpt2_byte_to_unicode():
    printable = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1), *range(ord('®'), ord('ÿ') + 1)]
    others = [b for b in range(256) if b not in printable]  # spaces, controls etc. become chr(256 + k)
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + k) for k, b in enumerate(others)}}


class Tokenizer:
    """Tokenizer.from_file('tokenizer.json') for Pythia's, Tokenizer.bytes() for the byte-level one."""

    def __init__(self, identity, pattern, ranks, special_tokens, nfc):
        self.identity = identity  # stored in data shards and checkpoints, compared by train.py
        self.enc = tiktoken.Encoding(identity, pat_str=pattern, mergeable_ranks=ranks, special_tokens=special_tokens)
        self.eot_token = special_tokens['<|endoftext|>']
        self.vocab_size = self.enc.max_token_value + 1
        self.id_to_bytes = {i: b for b, i in ranks.items()} | {i: s.encode() for s, i in special_tokens.items()}
        # pieces of text that NFC must leave alone: special tokens, and characters HF's tables don't know
        self.keep_re = re.compile('(' + '|'.join(map(re.escape, special_tokens)) + '|' + HF_UNKNOWN + ')') if nfc else None

    @classmethod
    def bytes(cls):
        """Byte-level tokenizer for offline demos: ids 0..255 are the UTF-8 bytes, eot = 256, vocab 257."""
        return cls('bytes', r"[\s\S]{1,64}", {bytes([b]): b for b in range(256)}, {'<|endoftext|>': 256}, nfc=False)

    @classmethod
    def from_dir(cls, dir):
        return cls.from_file(os.path.join(dir, 'tokenizer.json'))

    @classmethod
    def from_file(cls, path):
        with open(path, encoding='utf-8') as f:
            tj = json.load(f)
        model, kinds = tj['model'], [(tj.get(k) or {}).get('type') for k in ('normalizer', 'pre_tokenizer', 'decoder')]
        if model.get('type') != 'BPE' or kinds != ['NFC', 'ByteLevel', 'ByteLevel']:
            raise ValueError(f"{path}: not a GPT-NeoX byte-level BPE tokenizer (model {model.get('type')}, {kinds})")
        byte_of = {c: b for b, c in gpt2_byte_to_unicode().items()}
        id_to_bytes = {i: bytes(byte_of[c] for c in s) for s, i in model['vocab'].items()}
        special = {t['content']: t['id'] for t in tj['added_tokens'] if t['special']}
        ranks = {b: i for i, b in id_to_bytes.items() if i not in special.values()}
        merged = [model['vocab'][''.join(m.split(' ') if isinstance(m, str) else m)] for m in model['merges']]
        if merged != sorted(merged) or any(len(b) > 1 and i < merged[0] for b, i in ranks.items()):
            raise ValueError(f"{path}: merge order differs from id order; tiktoken cannot reproduce this BPE")
        for t in tj['added_tokens']:  # the space runs take over the bytes of the BPE tokens that spell them
            if not t['special']:
                if set(t['content']) != {' '} or not 2 <= len(t['content']) <= 24:
                    raise ValueError(f"{path}: unsupported added token {t['content']!r} (only runs of 2..24 spaces)")
                ranks[t['content'].encode()] = t['id']
        digest = hashlib.sha256(json.dumps([model['vocab'], model['merges'], tj['added_tokens']], sort_keys=True).encode())
        tok = cls('pythia-' + digest.hexdigest()[:16], PYTHIA_PATTERN, ranks, special, nfc=True)
        tok.id_to_bytes = id_to_bytes | tok.id_to_bytes  # decode also the BPE ids of space runs (encode never makes them)
        return tok

    def normalize(self, text):
        # Text that is NFC already (nearly all) is also left as is by HF's older tables, which only
        # make fewer characters interact; so the split below is needed only for text NFC changes.
        if not self.keep_re or text.isascii() or unicodedata.is_normalized('NFC', text):
            return text
        parts = self.keep_re.split(text)  # odd parts are the kept pieces
        return ''.join(p if i % 2 else unicodedata.normalize('NFC', p) for i, p in enumerate(parts))

    def encode(self, text):
        """text -> list of ids, exactly HF's tokenizer.encode(text).ids."""
        return self.enc.encode(self.normalize(text), allowed_special='all')

    def encode_batch(self, texts, num_threads=8):
        """Encode many texts; tiktoken releases the GIL, so the threads run in parallel."""
        return self.enc.encode_batch([self.normalize(t) for t in texts], num_threads=num_threads, allowed_special='all')

    def decode(self, ids):
        """Invalid UTF-8 becomes U+FFFD; ids with no text (a model's padding rows) give nothing, as in HF."""
        return b''.join(self.id_to_bytes.get(int(i), b'') for i in ids).decode('utf-8', errors='replace')
