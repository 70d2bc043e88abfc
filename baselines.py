"""
The attentions bench.py measures DiJiang's against, each on q (B, N, H, D), k and v (B, N, H_kv, D),
returning o (B, N, H, D): SDPA as the softmax model calls it, the released code's quadratic form (exact
until its gamma^-n overflows fp32), and fla's chunk_simple_gla fed DiJiang's feature map (when fla is
installed: a comparison, never a dependency).
"""

import inspect

import torch
import torch.nn.functional as F

from dijiang import feature_map


def sdpa_attention(q, k, v):
    """What SoftmaxAttention runs: SDPA on (B, heads, N, D) views of the (B, N, heads, D) projections."""
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                       enable_gqa=k.shape[2] < q.shape[2])
    return o.transpose(1, 2)


def released_attention(q, k, v, proj, decay):
    """The released code's quadratic form: (phi(Q) D1)(phi(K) D2)^T, causally masked, times V, with
    D1 = gamma^n and D2 = gamma^-n in fp32 and the products in the input dtype, as under bf16 autocast.
    gamma^-n passes fp32's maximum at n ~ 2797 for gamma = 0.96875 (the first head), and the output
    turns inf or NaN from there on. q, k, v (B, N, H, D): one key and value head per query head."""
    B, N, H, D = q.shape
    n = torch.arange(N, device=q.device, dtype=torch.float32)
    gamma = decay.float().view(1, 1, H, 1)
    D1, D2 = gamma ** n.view(1, N, 1, 1), gamma ** -n.view(1, N, 1, 1)  # (1, N, H, 1)
    q_scaled = (feature_map(q, proj) * D1).to(v.dtype)
    k_scaled = (feature_map(k, proj) * D2).to(v.dtype)
    scores = torch.einsum('bnhd,bmhd->bhnm', q_scaled, k_scaled)  # (B, H, N, N)
    causal = torch.ones(N, N, dtype=torch.bool, device=q.device).tril()
    scores = scores * causal  # multiplied, as released: inf * 0 is NaN
    return torch.einsum('bhnm,bmhd->bnhd', scores, v)


def fla_attention(q, k, v, proj, decay):
    """fla's chunk_simple_gla (fla-core on PyPI, Triton), in its (B, N, H, D) layout, fed our feature
    map; the decay goes in as the log gate per token, and no 1/sqrt(D) scale, as DiJiang."""
    from fla.ops.simple_gla import chunk_simple_gla
    B, N, H, D = q.shape
    phi_q, phi_k = feature_map(q, proj).to(v.dtype), feature_map(k, proj).to(v.dtype)
    log_gate = decay.float().log().view(1, 1, H).expand(B, N, H).contiguous()  # (B, N, H)
    layout = {'head_first': False} if 'head_first' in inspect.signature(chunk_simple_gla).parameters else {}
    o, _ = chunk_simple_gla(phi_q, phi_k, v, g=log_gate, scale=1.0, **layout)
    return o
