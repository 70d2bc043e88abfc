"""
DiJiang: a GPT-NeoX (Pythia) or LLaMA-family language model whose softmax attention is replaced by
the frequency-domain kernel attention of "DiJiang: Efficient Large Language Models through Compact
Kernelization" (Chen et al., ICML 2024, arXiv 2403.19928).

Read top to bottom:
  1. GPTConfig and the named configs: the Pythia suite, SmolLM2-135M, LLaMA-2-7B and LLaMA-3-8B
  2. rotary position embeddings (on the first rotary_pct of each head)
  3. the DiJiang math: the projection P, the feature map phi, the per-head decay, and the attention
     in three forms that compute the same function: parallel (the T x T matrix, the reference),
     chunk (O(T) memory, for training and prefill) and recurrent (a (D, D) state per head, O(1) per
     token, for decoding)
  4. the modules: SoftmaxAttention (the pretrained model's), DiJiangAttention, MLP, Block
  5. GPT: forward, generate, and checkpoints (model_dir.py reads and writes them), which linearize a
     softmax checkpoint when asked for attention='dijiang'

The two families differ only in config fields. Decays are always relative (gamma^(n-m), n >= m),
never gamma^(-n): the released code's D2 = gamma^(-n) overflows fp32 past about 2.8K tokens.
"""

import math
from dataclasses import dataclass, fields

import numpy as np
import scipy.fft
import scipy.stats
import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # the fused GPU kernels: Triton ships with PyTorch's CUDA builds, not with the CPU ones
    from fast import triton_attention
except ImportError:
    triton_attention = None

# -----------------------------------------------------------------------------
# 1. Config

ATTENTIONS = ('softmax', 'dijiang')
FEATURE_MAPS = ('qmc', 'mc', 'performer', 'identity')
CHOICES = dict(attention=ATTENTIONS, feature_map=FEATURE_MAPS, norm=('layernorm', 'rmsnorm'), mlp=('gelu', 'swiglu'))
FORMS = ('parallel', 'chunk', 'recurrent')  # how DiJiang is computed: a choice at run time, not in the config
KERNELS = ('auto', 'torch', 'triton')


@dataclass
class GPTConfig:
    vocab_size: int = 50304
    n_layer: int = 6
    n_head: int = 8
    n_kv_head: int = 0  # 0 means n_head; fewer is grouped-query attention, each key/value head serving a group
    n_embd: int = 512
    intermediate_size: int = 0  # 0 means 4 * n_embd, as in every Pythia model
    block_size: int = 2048  # the pretrained context: the softmax model's limit (DiJiang has none)
    norm: str = 'layernorm'  # 'layernorm' (Pythia) or 'rmsnorm' (LLaMA)
    norm_eps: float = 1e-5
    mlp: str = 'gelu'  # 'gelu': down(gelu(up x)) (Pythia), or 'swiglu': down(silu(gate x) * up x) (LLaMA)
    bias: bool = True  # biases in every linear layer but the head (Pythia), or none (LLaMA)
    parallel_residual: bool = True  # x + attn(ln1(x)) + mlp(ln2(x)) (GPT-NeoX), or one after the other
    tie_embeddings: bool = False  # the output head shares the embedding matrix (SmolLM2)
    rotary_pct: float = 0.25  # rotary embeddings on the first rotary_pct of each head's dims
    rotary_base: float = 10000.0
    attention: str = 'dijiang'  # 'softmax' (the pretrained model) or 'dijiang'
    chunk_size: int = 64
    feature_map: str = 'qmc'  # 'qmc' (the paper's quasi-Monte Carlo), 'mc' (the released code), 'performer'
                              # (orthogonal Gaussian features) or 'identity' (phi(x) = x, an ablation)
    feature_seed: int = 0  # layer i draws its projection with seed feature_seed + i

    def __post_init__(self):
        """Each field of its type and in its range, so that a damaged config.json is one ValueError."""
        for f in fields(self):
            value = getattr(self, f.name)
            if type(value) is not f.type and not (f.type is float and type(value) is int):
                raise ValueError(f"{f.name}={value!r}: expected {f.type.__name__}")
            setattr(self, f.name, f.type(value))
        self.n_kv_head, self.intermediate_size = self.n_kv_head or self.n_head, self.intermediate_size or 4 * self.n_embd
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}: use one of {', '.join(allowed)}")
        for name in ('vocab_size', 'n_layer', 'n_head', 'n_kv_head', 'n_embd', 'block_size', 'chunk_size'):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be positive")
        if self.n_embd % self.n_head or self.n_head % self.n_kv_head:
            raise ValueError(f"n_embd={self.n_embd}, n_head={self.n_head}, n_kv_head={self.n_kv_head}: n_embd must "
                             "divide into n_head heads, and n_head into n_kv_head groups")
        if not (0 < self.rotary_pct <= 1 and self.rotary_dim % 2 == 0 and self.rotary_base > 0 and self.norm_eps > 0):
            raise ValueError(f"rotary_pct={self.rotary_pct} (need (0, 1] and an even number of rotary dims per head), "
                             f"rotary_base={self.rotary_base}, norm_eps={self.norm_eps} (both need > 0)")

    @property
    def head_size(self):
        return self.n_embd // self.n_head

    @property
    def rotary_dim(self):
        return int(self.head_size * self.rotary_pct)

    @classmethod
    def named(cls, name, **overrides):
        if name not in CONFIGS:
            raise ValueError(f"model={name!r}: use one of {', '.join(CONFIGS)}")
        return cls(**{**CONFIGS[name], **overrides})


LLAMA = dict(norm='rmsnorm', mlp='swiglu', bias=False, parallel_residual=False, rotary_pct=1.0)
# Sizes as in each model's config.json; 'tiny' and 'small' are for tests and the CPU demo.
CONFIGS = {
    'tiny':         dict(n_layer=2, n_head=4, n_embd=64),
    'small':        dict(n_layer=4, n_head=4, n_embd=128),
    'pythia-70m':   dict(n_layer=6, n_head=8, n_embd=512),
    'pythia-160m':  dict(n_layer=12, n_head=12, n_embd=768),
    'pythia-410m':  dict(n_layer=24, n_head=16, n_embd=1024),
    'pythia-1b':    dict(n_layer=16, n_head=8, n_embd=2048),
    'pythia-1.4b':  dict(n_layer=24, n_head=16, n_embd=2048),
    'pythia-2.8b':  dict(n_layer=32, n_head=32, n_embd=2560),
    'pythia-6.9b':  dict(n_layer=32, n_head=32, n_embd=4096, vocab_size=50432),
    'pythia-12b':   dict(n_layer=36, n_head=40, n_embd=5120, vocab_size=50688),
    'smollm2-135m': dict(LLAMA, n_layer=30, n_head=9, n_kv_head=3, n_embd=576, intermediate_size=1536,
                         vocab_size=49152, block_size=8192, rotary_base=100000.0, tie_embeddings=True),
    'llama2-7b':    dict(LLAMA, n_layer=32, n_head=32, n_embd=4096, intermediate_size=11008, vocab_size=32000,
                         block_size=4096),
    'llama3-8b':    dict(LLAMA, n_layer=32, n_head=32, n_kv_head=8, n_embd=4096, intermediate_size=14336,
                         vocab_size=128256, block_size=8192, rotary_base=500000.0),
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


def norm(config):
    if config.norm == 'rmsnorm':
        return nn.RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps)


def qkv_projection(config):
    """One matrix for q, k and v, laid out per key/value head as [q_1 ... q_group | k | v]: with one query
    head per group that is GPT-NeoX's own per-head [q | k | v], so Pythia's weights load as they are."""
    return nn.Linear(config.n_embd, (config.n_head + 2 * config.n_kv_head) * config.head_size, bias=config.bias)


def split_heads(qkv, config):
    """(B, T, (H + 2 H_kv) D) -> q (B, T, H, D), k and v (B, T, H_kv, D); query head h reads key/value
    head h // (H / H_kv), as Hugging Face's repeat_kv."""
    B, T, _ = qkv.shape
    group, D = config.n_head // config.n_kv_head, config.head_size
    qkv = qkv.view(B, T, config.n_kv_head, group + 2, D)
    return qkv[:, :, :, :group].reshape(B, T, config.n_head, D), qkv[:, :, :, group], qkv[:, :, :, group + 1]


class SoftmaxAttention(nn.Module):
    """The pretrained model's attention: causal softmax through F.scaled_dot_product_attention, with a KV cache."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.qkv = qkv_projection(config)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x, cos, sin, past=None):
        """x (B, T, C); past: (k, v) of earlier tokens, each (B, H_kv, T_past, D), or None. Returns (y, (k, v))."""
        B, T, C = x.shape
        q, k, v = split_heads(self.qkv(x), self.config)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, D)
        if past is not None:
            k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)
        T_past, gqa = k.shape[2] - T, self.config.n_kv_head < self.config.n_head
        if T_past == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:  # the new tokens see all of the past and are causal among themselves
            mask = torch.ones(T, T_past + T, dtype=torch.bool, device=x.device).tril(diagonal=T_past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.proj(y), (k, v)


class DiJiangAttention(nn.Module):
    """DiJiang attention, as the released code computes it:
    rotary q, k -> phi = softmax(. @ P) -> decayed linear attention -> GroupNorm -> * silu(x W_G) -> dense.
    With grouped-query attention each query head keeps its own state and decay, over its group's
    shared keys and values: exactly the softmax model's sharing, with the kernel in place of softmax."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.config = config
        self.form, self.kernel = 'chunk', 'auto'  # how it is computed, set by GPT.set_form
        self.qkv = qkv_projection(config)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.gate = nn.Linear(config.n_embd, config.n_embd, bias=False)  # the released W_G (gate.weight = W_G^T)
        nn.init.xavier_uniform_(self.gate.weight, gain=2 ** -2.5)
        # The released grouping: head_size groups over the concatenated heads, so the groups do not line
        # up with the heads (70M: 64 groups of 8 channels across 8 heads). Kept for exact imports.
        self.group_norm = nn.GroupNorm(num_groups=config.head_size, num_channels=config.n_embd, eps=1e-5)
        # Fixed, not learned: buffers, saved with the model. They must stay fp32 (GPT.to_dtype keeps them so):
        # gamma = 0.998 would round to 1.0 in bf16 and the memory would never fade.
        self.register_buffer('feature_proj', projection_matrix(config.head_size, config.feature_map,
                                                               config.feature_seed + layer_idx))
        self.register_buffer('decay', decay_schedule(config.n_head))

    def forward(self, x, cos, sin, past=None):
        """x (B, T, C); past: the recurrent state (B, H, D, D) fp32 after earlier tokens, or None.
        Returns (y, state after the last token)."""
        B, T, C = x.shape
        q, k, v = split_heads(self.qkv(x), self.config)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)  # (B, T, H or H_kv, D)
        o, state = self.attend(q, k, v, past)  # (B, T, H, D)
        y = self.group_norm(o.reshape(B * T, C)).view(B, T, C)  # per token, over the concatenated heads
        y = y * F.silu(self.gate(x))
        return self.proj(y), state

    def uses_triton(self, q):
        """kernel='auto': the fused Triton kernels for the chunk form and its decoding steps, on CUDA."""
        if self.kernel == 'torch' or self.form != 'chunk':
            return False
        cfg = self.config
        supported = q.is_cuda and triton_attention is not None and triton_attention.supports(
            cfg.head_size, cfg.chunk_size, q.dtype, 'identity' if cfg.feature_map == 'identity' else 'softmax')
        if self.kernel == 'triton' and not supported:
            raise ValueError("kernel='triton' needs CUDA, Triton and what fast/triton_attention.supports() takes "
                             "(head_size, chunk_size, dtype): use kernel='auto' or 'torch'")
        return supported

    def attend(self, q, k, v, past):
        """The decayed linear attention on rotary q (B, T, H, D), k and v (B, T, H_kv, D). Autocast is
        off here: the forms choose their own precision (fp32 features, decays and states), which bf16
        would spoil over long contexts."""
        if self.decay.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"the DiJiang decay is {self.decay.dtype} (gamma would round to 1): cast models with "
                             "GPT.to_dtype(dtype), which keeps the fixed buffers fp32, not with .to(dtype)")
        with torch.autocast(q.device.type, enabled=False):
            if self.uses_triton(q):  # the fused kernels read each group's shared k, v in place
                proj = None if self.config.feature_map == 'identity' else self.feature_proj  # None: phi(x) = x
                if q.shape[1] == 1 and past is not None:  # a decoding step: the state is updated in place
                    return triton_attention.recurrent_step(q, k, v, proj, self.decay, past), past
                return triton_attention.chunk_attention(q, k, v, proj, self.decay, past,
                                                        output_final_state=True, chunk_size=self.config.chunk_size)
            group = self.config.n_head // self.config.n_kv_head
            k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)  # each query head a copy
            if self.config.feature_map == 'identity':
                phi_q, phi_k = q, k
            else:
                phi_q, phi_k = feature_map(q, self.feature_proj), feature_map(k, self.feature_proj)
            if self.form == 'recurrent' or q.shape[1] == 1:  # one new token is one recurrent step
                return attention_recurrent(phi_q, phi_k, v, self.decay, past)
            if self.form == 'chunk':
                return attention_chunk(phi_q, phi_k, v, self.decay, past, self.config.chunk_size)
            return attention_parallel(phi_q, phi_k, v, self.decay, past)


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.up = nn.Linear(config.n_embd, config.intermediate_size, bias=config.bias)
        self.gate = nn.Linear(config.n_embd, config.intermediate_size, bias=config.bias) if config.mlp == 'swiglu' else None
        self.down = nn.Linear(config.intermediate_size, config.n_embd, bias=config.bias)

    def forward(self, x):
        if self.gate is None:
            return self.down(F.gelu(self.up(x)))  # exact (erf) GELU, as Pythia
        return self.down(F.silu(self.gate(x)) * self.up(x))  # SwiGLU, as LLaMA


class Block(nn.Module):

    def __init__(self, config, layer_idx):
        super().__init__()
        self.parallel_residual = config.parallel_residual
        self.ln_attn, self.ln_mlp = norm(config), norm(config)
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

    def select(self, rows):
        """A copy holding the batch rows `rows` (B',) of this cache, repeats allowed: one context read
        once, then continued by several sequences, each from its own copy."""
        def pick(state):
            return tuple(t[rows] for t in state) if isinstance(state, tuple) else state[rows]
        return Cache(self.pos, [pick(state) for state in self.layers])


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

    def __init__(self, config, form='chunk', kernel='auto'):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.n_embd)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.init_weights()
        self.tie_weights()
        self.set_form(form, kernel)

    def init_weights(self):
        # GPT-NeoX's normal(0, 0.02), with the residual outputs scaled down by the depth (GPT-2);
        # the DiJiang gate keeps its own xavier init, and the norms their ones and zeros.
        for name, p in self.named_parameters():
            if name.endswith('bias'):
                nn.init.zeros_(p)
            elif name.endswith(('attn.proj.weight', 'mlp.down.weight')):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * self.config.n_layer))
            elif p.dim() == 2 and not name.endswith('attn.gate.weight'):
                nn.init.normal_(p, std=0.02)

    def tie_weights(self):
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def set_form(self, form='chunk', kernel='auto'):
        """How the DiJiang layers compute, which does not change what: the form ('chunk', 'parallel' or
        'recurrent') and the kernel ('auto': Triton on CUDA where it applies, 'torch' or 'triton')."""
        if form not in FORMS or kernel not in KERNELS:
            raise ValueError(f"form={form!r}, kernel={kernel!r}: use a form of {', '.join(FORMS)} and a kernel of "
                             f"{', '.join(KERNELS)}")
        for block in self.layers:
            block.attn.form, block.attn.kernel = form, kernel
        return self

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

    def cache_bytes(self, batch, context, dtype=torch.bfloat16):
        """What decoding holds for batch sequences at context tokens: per layer, the softmax model's keys
        and values, 2 (B, H_kv, context, D) in dtype, or DiJiang's one state (B, H, D, D) in fp32."""
        cfg = self.config
        if cfg.attention == 'softmax':
            return 2 * cfg.n_layer * batch * cfg.n_kv_head * context * cfg.head_size * dtype.itemsize
        return cfg.n_layer * batch * cfg.n_head * cfg.head_size ** 2 * 4

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
        cos, sin = rotary_cos_sin(positions, self.config.rotary_dim, self.config.rotary_base)
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
        """Write out_dir/ckpt.pt (config, weights and any extra entries) and config.json: model_dir.py."""
        from model_dir import save_checkpoint  # model_dir.py imports this module: imported here, not above
        save_checkpoint(self, out_dir, **extra)

    @classmethod
    def from_checkpoint(cls, path, form='chunk', kernel='auto', **overrides):
        """Load a directory written by convert.py or train.py, every file checked (model_dir.py). overrides
        replace config fields; attention='dijiang' on a softmax checkpoint linearizes it (the paper's
        method): every pretrained weight is kept, and the DiJiang-only parts keep their fresh init."""
        from model_dir import build_model, load_checkpoint
        return build_model(load_checkpoint(path), path, form, kernel, **overrides)
