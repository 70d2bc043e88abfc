"""
DiJiang: a GPT-NeoX (Pythia) language model whose softmax attention is replaced by the
frequency-domain kernel attention of "DiJiang: Efficient Large Language Models through Compact
Kernelization" (Chen et al., ICML 2024, arXiv 2403.19928).

Read top to bottom:
  1. GPTConfig and the Pythia suite's named configs
  2. rotary position embeddings (GPT-NeoX style, on the first rotary_pct of each head)
  3. the DiJiang math: the projection P, the feature map phi, the per-head decay, and the
     attention in three forms that compute the same function:
        parallel  - the materialized T x T matrix, the readable reference
        chunk     - a loop over chunks with O(T) memory, for training and prefill
        recurrent - a (D, D) state per head and O(1) work per token, for decoding
  4. the modules: SoftmaxAttention (Pythia itself), DiJiangAttention, MLP, Block
  5. GPT: forward, generate, checkpoints, and linearizing a softmax checkpoint

Decays are always relative (gamma^(n-m) with n >= m), never gamma^(-n): the released code's
D2 = gamma^(-n) overflows fp32 past about 2.8K tokens.
"""

import json
import math
import os
from dataclasses import asdict, dataclass, fields

import numpy as np
import scipy.fft
import scipy.stats
import torch
import torch.nn as nn
import torch.nn.functional as F

from atomic import atomic_write, atomic_write_text

try:  # the fused GPU kernels: Triton ships with PyTorch's CUDA builds, not with the CPU ones
    from fast import triton_attention
except ImportError:
    triton_attention = None

# -----------------------------------------------------------------------------
# 1. Config

ATTENTIONS = ('softmax', 'dijiang')
FORMS = ('parallel', 'chunk', 'recurrent')
FEATURE_MAPS = ('qmc', 'mc', 'performer', 'identity')
KERNELS = ('auto', 'torch', 'triton')


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
    feature_map: str = 'qmc'  # 'qmc' (the paper's quasi-Monte Carlo), 'mc' (the released code), 'performer'
                              # (orthogonal Gaussian features) or 'identity' (phi(x) = x, an ablation)
    feature_seed: int = 0  # layer i draws its projection with seed feature_seed + i
    kernel: str = 'auto'  # 'auto' (Triton on CUDA when available), 'torch' or 'triton'

    def __post_init__(self):
        if self.intermediate_size == 0:
            self.intermediate_size = 4 * self.n_embd
        for name, allowed in (('attention', ATTENTIONS), ('form', FORMS), ('feature_map', FEATURE_MAPS),
                              ('kernel', KERNELS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}: use one of {', '.join(allowed)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size={self.chunk_size} must be positive")

    @property
    def head_size(self):
        return self.n_embd // self.n_head

    @classmethod
    def named(cls, name, **overrides):
        if name not in CONFIGS:
            raise ValueError(f"model={name!r}: use one of {', '.join(CONFIGS)}")
        return cls(**{**CONFIGS[name], **overrides})


# The Pythia suite (EleutherAI), sizes as in their config.json files; 'tiny' is for tests and CPU demos.
CONFIGS = {
    'tiny':        dict(n_layer=2, n_head=4, n_embd=64),
    'small':       dict(n_layer=4, n_head=4, n_embd=128),
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
    """cos, sin (T, rotary_dim / 2) for positions (T,): one angle per channel pair, for any length."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, device=positions.device, dtype=torch.float32) / rotary_dim))
    angles = torch.outer(positions.float(), inv_freq)  # (T, R/2)
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    """Rotate the first rotary_dim = 2 * cos.shape[-1] channels of x (B, T, H, D); the rest pass through.
    GPT-NeoX pairs channel i with channel i + rotary_dim / 2 (the two halves), not with its neighbour."""
    half = cos.shape[-1]
    x1, x2, x_pass = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)  # (T, 1, R/2) broadcasts over heads
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, x_pass), dim=-1)

# -----------------------------------------------------------------------------
# 3. DiJiang: the feature map, the decay and three forms of the attention


def projection_matrix(head_size, feature_map='qmc', seed=0):
    """P (D, D) fp32 for phi(x) = softmax(x @ P), built on the CPU from seed alone.
    'qmc', 'mc': P = C @ diag(t), C the orthonormal DCT-II matrix: x @ P applies the inverse DCT, then
    scales frequency j by t_j = Phi^-1(u_j). 'mc' draws u i.i.d. uniform (the released code); 'qmc'
    takes a scrambled van der Corput sequence, which covers (0, 1) evenly (the paper's QMC, unweighted).
    'performer': P = G / D^(1/4), G's columns orthogonal with Gaussian-vector lengths (FAVOR+); the
    softmax's normalizer cancels Performer's exp(-|x|^2 / 2) factor. 'identity': no feature map."""
    cpu = dict(device='cpu', dtype=torch.float64)
    if feature_map == 'identity':
        return torch.eye(head_size, device='cpu')
    if feature_map == 'performer':
        g = torch.Generator().manual_seed(seed)
        directions, _ = torch.linalg.qr(torch.randn(head_size, head_size, generator=g, **cpu))
        lengths = torch.randn(head_size, head_size, generator=g, **cpu).norm(dim=0)  # chi(D) distributed
        return (directions * lengths / head_size ** 0.25).float()
    if feature_map == 'mc':
        u = torch.rand(head_size, generator=torch.Generator().manual_seed(seed), **cpu).numpy()
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
    """fp32 for fp32, bf16 and fp16 inputs; float64 for float64, so the code is its own reference."""
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


def per_token(decays):
    return decays.T[None, :, :, None]  # (H, T) -> (1, T, H, 1), to scale (B, T, H, D) token by token


def attention_parallel(phi_q, phi_k, v, decay, state=None):
    """The reference: o_n = sum_{m<=n} gamma^(n-m) (phi_q_n . phi_k_m) v_m as one (T, T) matrix per head.
    phi_q, phi_k (B, T, H, D), v (B, T, H, Dv), decay (H,), state (B, H, D, Dv) or None: the state
    after earlier tokens. Returns o (B, T, H, Dv) in v's dtype and the state after the last token
    (B, H, D, Dv) in compute_dtype(v)."""
    T, dtype = v.shape[1], compute_dtype(v)
    log_gamma = decay.double().log()
    q, k, vf = phi_q.to(dtype), phi_k.to(dtype), v.to(dtype)
    n = torch.arange(T, device=v.device)
    decay_matrix = relative_decay(log_gamma, n[:, None] - n[None, :], dtype)  # (H, T, T), zero above the diagonal
    scores = torch.einsum('bnhd,bmhd->bhnm', q, k) * decay_matrix  # (B, H, T, T)
    o = torch.einsum('bhnm,bmhe->bnhe', scores, vf)  # (B, T, H, Dv)
    k_to_end = k * per_token(relative_decay(log_gamma, T - 1 - n, dtype))  # key m decays gamma^(T-1-m) to the end
    final_state = torch.einsum('bmhd,bmhe->bhde', k_to_end, vf)  # (B, H, D, Dv)
    if state is not None:
        # an earlier state reaches token n decayed by gamma^(n+1), and the end by gamma^T; these
        # powers only shrink, so a long sequence underflows them to 0 (the true value), never overflows
        state = state.to(dtype)
        o = o + torch.einsum('bnhd,bhde->bnhe', q * per_token(relative_decay(log_gamma, n + 1, dtype)), state)
        final_state = final_state + relative_decay(log_gamma, n[-1:] + 1, dtype).view(1, -1, 1, 1) * state
    return o.to(v.dtype), final_state


def attention_chunk(phi_q, phi_k, v, decay, state=None, chunk_size=64):
    """Chunkwise form, O(T) memory: the parallel form inside each chunk of C tokens, and a state that
    carries everything before the chunk. Same inputs and outputs as attention_parallel."""
    B, T, H, D = phi_q.shape
    dtype = compute_dtype(v)
    log_gamma = decay.double().log()
    S = v.new_zeros(B, H, D, v.shape[-1], dtype=dtype) if state is None else state.to(dtype)  # (B, H, D, Dv)
    outputs = []
    for start in range(0, T, chunk_size):
        q, k, vc = (x[:, start:start + chunk_size].to(dtype) for x in (phi_q, phi_k, v))  # (B, C, H, D)
        i = torch.arange(q.shape[1], device=v.device)
        # within the chunk: the parallel form on its C tokens
        scores = torch.einsum('bihd,bjhd->bhij', q, k) * relative_decay(log_gamma, i[:, None] - i[None, :], dtype)
        o = torch.einsum('bhij,bjhe->bihe', scores, vc)  # (B, C, H, Dv)
        # from before the chunk: token i reads the carried state decayed by gamma^(i+1)
        o = o + torch.einsum('bihd,bhde->bihe', q * per_token(relative_decay(log_gamma, i + 1, dtype)), S)
        outputs.append(o)
        # the state after the chunk: the old one decayed by gamma^C, plus each key decayed to the chunk's end
        k_to_end = k * per_token(relative_decay(log_gamma, i[-1] - i, dtype))
        S = relative_decay(log_gamma, i[-1:] + 1, dtype).view(1, H, 1, 1) * S + torch.einsum('bjhd,bjhe->bhde', k_to_end, vc)
    return torch.cat(outputs, dim=1).to(v.dtype), S


def attention_recurrent(phi_q, phi_k, v, decay, state=None):
    """Token by token, O(1) per token (decoding): S_n = gamma S_{n-1} + phi_k_n^T v_n, o_n = phi_q_n S_n."""
    B, _, H, D = phi_q.shape
    dtype = compute_dtype(v)
    S = v.new_zeros(B, H, D, v.shape[-1], dtype=dtype) if state is None else state.to(dtype)
    gamma = decay.to(dtype).view(1, H, 1, 1)
    outputs = []
    for q_t, k_t, v_t in zip(*(x.to(dtype).unbind(dim=1) for x in (phi_q, phi_k, v))):  # (B, H, D) each
        S = gamma * S + k_t[..., :, None] * v_t[..., None, :]  # (B, H, D, Dv)
        outputs.append(torch.einsum('bhd,bhde->bhe', q_t, S))
    return torch.stack(outputs, dim=1).to(v.dtype), S

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
        # Fixed, not trained, saved with the model. They must stay fp32 (GPT.to_dtype keeps them so):
        # gamma = 0.998 would round to 1.0 in bf16 and the memory would never fade.
        self.register_buffer('feature_proj', projection_matrix(config.head_size, config.feature_map,
                                                               config.feature_seed + layer_idx))
        self.register_buffer('decay', decay_schedule(config.n_head))

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
        """kernel='auto': the fused Triton kernels for the chunk form and its decoding steps, on CUDA."""
        cfg = self.config
        if cfg.kernel == 'torch' or cfg.form != 'chunk':
            return False
        supported = q.is_cuda and triton_attention is not None and triton_attention.supports(
            cfg.head_size, cfg.chunk_size, q.dtype, 'identity' if cfg.feature_map == 'identity' else 'softmax')
        if cfg.kernel == 'triton' and not supported:
            raise ValueError("kernel='triton' needs CUDA, Triton and what fast/triton_attention.supports() takes "
                             "(head_size, chunk_size, dtype): use kernel='auto' or 'torch'")
        return supported

    def attend(self, q, k, v, past):
        """The decayed linear attention on rotary q, k and on v, each (B, T, H, D). Autocast is off
        here: the forms choose their own precision (fp32 features, decays and states), which bf16
        would spoil over long contexts."""
        if self.decay.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"the DiJiang decay is {self.decay.dtype} (gamma would round to 1): cast models with "
                             "GPT.to_dtype(dtype), which keeps the fixed buffers fp32, not with .to(dtype)")
        with torch.autocast(q.device.type, enabled=False):
            if self.uses_triton(q):  # the fused kernels compute the feature map themselves
                proj = None if self.config.feature_map == 'identity' else self.feature_proj  # None: phi(x) = x
                if q.shape[1] == 1 and past is not None:  # a decoding step: the state is updated in place
                    return triton_attention.recurrent_step(q, k, v, proj, self.decay, past), past
                return triton_attention.chunk_attention(q, k, v, proj, self.decay, past,
                                                        output_final_state=True, chunk_size=self.config.chunk_size)
            if self.config.feature_map == 'identity':
                phi_q, phi_k = q, k
            else:
                phi_q, phi_k = feature_map(q, self.feature_proj), feature_map(k, self.feature_proj)
            if self.config.form == 'recurrent' or q.shape[1] == 1:  # one new token is one recurrent step
                return attention_recurrent(phi_q, phi_k, v, self.decay, past)
            if self.config.form == 'chunk':
                return attention_chunk(phi_q, phi_k, v, self.decay, past, self.config.chunk_size)
            return attention_parallel(phi_q, phi_k, v, self.decay, past)


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

# -----------------------------------------------------------------------------
# 5. GPT


@dataclass
class Cache:
    """Tokens seen so far, and per layer the (k, v) of each of them (softmax) or one state (dijiang)."""
    pos: int
    layers: list


# what a DiJiang layer has beyond a softmax one: initialized, not imported, when linearizing
DIJIANG_ONLY_KEYS = ('attn.gate.weight', 'attn.group_norm.weight', 'attn.group_norm.bias', 'attn.feature_proj', 'attn.decay')


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
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= top_p  # keep tokens until top_p is reached
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float('-inf'))
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1)


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.n_embd)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)  # untied, as Pythia
        self.init_weights()

    def init_weights(self):
        # GPT-NeoX's normal(0, 0.02), with the residual outputs scaled down by the depth (GPT-2);
        # the DiJiang gate keeps its own xavier init, and the norms their ones and zeros.
        for name, p in self.named_parameters():
            if name.endswith('bias'):
                nn.init.zeros_(p)
            elif name.endswith(('attn.proj.weight', 'mlp.down.weight')):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * self.config.n_layer))
            elif p.dim() == 2 and not name.endswith('gate.weight'):
                nn.init.normal_(p, std=0.02)

    def to_dtype(self, dtype):
        """Cast the weights to dtype (bf16 or fp16 for inference). Only parameters are cast: the
        buffers, DiJiang's fixed P and decays, stay fp32."""
        for p in self.parameters():
            p.data = p.data.to(dtype)
        return self

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, T):
        """Training FLOPs per token, for MFU: 6 per parameter plus attention (softmax: PaLM's 12 L C T;
        DiJiang per head: feature maps 4 D^2, state 4 D^2, intra-chunk 4 C_chunk D, times 3 for backward)."""
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
        positions = start + torch.arange(T, device=idx.device)  # start may be a tensor (a CUDA-graph decoder)
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
    def generate_tokens(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, decoder=None):
        """Yield max_new_tokens next tokens (B, 1) one at a time: the prompt is read once, then each
        token is one step against the cache (softmax: a growing KV cache; dijiang: a fixed-size state).
        decoder (fast/cuda_graph_decode.py) runs the steps instead: prefill(idx) and step(token)."""
        if decoder is None:
            cache = self.new_cache()
            logits = self(idx, cache=cache)[0]

            def step(token):
                return self(token, cache=cache)[0]
        else:
            logits, step = decoder.prefill(idx), decoder.step
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
        atomic_write_text(os.path.join(out_dir, 'config.json'), json.dumps(config, indent=2) + '\n')

    @classmethod
    def from_checkpoint(cls, path, **overrides):
        """Load a directory written by convert.py or train.py. overrides replace config fields, e.g.
        form='recurrent'; attention='dijiang' on a softmax checkpoint linearizes it (the paper's
        method): every pretrained weight is kept, and the DiJiang-only parts keep their fresh init."""
        ckpt = load_checkpoint(path)
        ckpt_path = os.path.join(path, 'ckpt.pt')
        known = {f.name for f in fields(GPTConfig)}
        for where, names in (('overrides', overrides), (f"{ckpt_path}'s config", ckpt['config'])):
            if set(names) - known:
                raise ValueError(f"unknown config field(s) in {where}: {', '.join(sorted(set(names) - known))}; "
                                 f"the fields are {', '.join(sorted(known))}")
        config = GPTConfig(**{**ckpt['config'], **overrides})  # a bad override's ValueError names it
        linearize = ckpt['config'].get('attention', 'dijiang') == 'softmax' and config.attention == 'dijiang'
        # built on the meta device, then given the memory-mapped weights: a big model is held once
        # (a linearized one is built for real, since its new parts are not in the checkpoint)
        try:  # a config field of the wrong type or a weight of another shape: a damaged or foreign file
            with torch.device('cpu' if linearize else 'meta'):
                model = cls(config)
            missing, unexpected = model.load_state_dict(ckpt['model'], strict=False, assign=True)
        except (TypeError, ZeroDivisionError, RuntimeError) as e:
            detail = str(e).strip().splitlines()[-1].strip()[:200] if str(e).strip() else type(e).__name__
            raise ValueError(f"{ckpt_path}: its weights and config do not make a model ({detail}): the file is damaged "
                             "or was not written by train.py or convert.py") from None
        missing = [key for key in missing if not (linearize and key.endswith(DIJIANG_ONLY_KEYS))]
        if missing or unexpected:
            raise ValueError(f"{path}/ckpt.pt does not match the config (attention={config.attention!r}): missing "
                             f"{missing[:4]}, unexpected {unexpected[:4]}; check the overrides")
        return model


def load_checkpoint(path):
    """The dict in path/ckpt.pt, memory-mapped; one clear ValueError when it is missing or not a checkpoint."""
    ckpt_path = os.path.join(path, 'ckpt.pt')
    if not os.path.isfile(ckpt_path):
        raise ValueError(f"no checkpoint at {ckpt_path}: pass a directory written by convert.py or train.py")
    try:
        ckpt = torch.load(ckpt_path, map_location='cpu', mmap=True, weights_only=True)
    except Exception as e:  # random bytes, a truncated file, an old pickle: torch names each differently
        raise ValueError(f"{ckpt_path} is not a readable checkpoint ({type(e).__name__}): it is damaged or "
                         "was not written by train.py or convert.py; restore it or write it again") from None
    if not isinstance(ckpt, dict) or not {'config', 'model'} <= set(ckpt) or \
            not isinstance(ckpt['config'], dict) or not isinstance(ckpt['model'], dict):
        raise ValueError(f"{ckpt_path} is not a dijiang checkpoint (no config and model entries): "
                         "write it with train.py or convert.py")
    return ckpt
