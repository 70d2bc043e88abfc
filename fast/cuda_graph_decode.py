"""
Decoding one token at a time with fixed shapes, captured once in a CUDA graph and optionally
compiled: what sample.py and bench.py use on CUDA for both attentions. GPT.generate_tokens without a
decoder, the model's eager steps, computes the same tokens.

    decoder = CUDAGraphDecoder(model, batch_size=1, compile=True)
    for token in model.generate_tokens(idx, 100, decoder=decoder): ...

A decoding step is launch-bound: a 24-layer model runs hundreds of tiny kernels per token. Captured
in a CUDA graph, a step is one launch. A graph replays fixed shapes at fixed addresses, so the step
holds a static cache, allocated once and written in place:
  state  DiJiang: per layer one (B, H, D, D) fp32 state, which has a fixed size anyway.
  kv     softmax: per layer a key and a value buffer (B, H_kv, max_length, D) (gpt-fast's static KV
         cache). A step writes its key and value at the current position and attends to the whole
         buffer under a length mask, so its shapes stay the same while the context grows.
StaticStep runs one token through the model's own modules with that cache; with fused=True a DiJiang
model runs fast/fused_decode.py's step instead: a few Triton kernels per layer over packed weights.
"""

import torch
import torch.nn.functional as F


def decoding_inductor(graph_module, example_inputs):
    """torch.compile's backend for one-token decoding steps: inductor, with every one-row matrix
    product (x @ W.T + b included) written as a multiply-and-sum reduction. At batch 1 a product is a
    read of the weights; inductor's reductions, tuned by coordinate descent (as gpt-fast does), read
    them faster than cuBLAS's general kernels and take the bias, the GELU and the LayerNorm's scaling
    into the same kernel."""
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.decomposition import select_decomp_table

    def one_row_addmm(bias, x, w, *, beta=1, alpha=1):
        if x.shape[0] != 1 or w.shape[0] > w.shape[1]:
            # a real matrix product, or a long reduction into few outputs (the MLP's down
            # projection), where cuBLAS's split-K kernels are faster
            return NotImplemented
        y = (x.float()[:, :, None] * w.float()[None]).sum(1)  # (1, K, 1) * (1, K, N) -> (1, N), fp32 sums
        return (alpha * y + beta * bias.float()).to(x.dtype)

    decompositions = {**select_decomp_table(), torch.ops.aten.addmm.default: one_row_addmm}
    # coordinate_descent_tuning also makes inductor decompose a plain one-row mm the same way
    return compile_fx(graph_module, example_inputs, decompositions=decompositions,
                      config_patches={'coordinate_descent_tuning': True})


def rotate(x, cos, sin):
    """dijiang.apply_rotary for one token: x (..., D), cos and sin (1, R/2) broadcast over the rest."""
    half = cos.shape[-1]
    x1, x2, x_pass = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, x_pass), dim=-1)


def why_not_fused(model):
    """'' when CUDAGraphDecoder(model, ..., fused=True) runs here, else why not: the fused step needs
    CUDA, Triton and a DiJiang model with heads up to 128 wide."""
    if not model.lm_head.weight.is_cuda:
        return 'the fused step needs CUDA'
    try:
        from fast import fused_decode
    except ImportError:  # Triton ships with PyTorch's CUDA builds, not with the CPU ones
        return 'the fused step needs Triton'
    return fused_decode.unsupported(model)


class StaticStep:
    """One token through the model's own modules against a static cache: GPT.forward and
    Block.forward for T = 1, with fixed shapes. step(token (B, 1), position) -> logits (B, 1, vocab)
    updates the cache in place; position is a 0-dim long tensor, the tokens seen so far. Runs on
    any device; captured in a CUDA graph by CUDAGraphDecoder."""

    def __init__(self, model, batch_size, max_length):
        cfg, weight = model.config, model.lm_head.weight
        self.model, self.kind = model, 'kv' if cfg.attention == 'softmax' else 'state'
        arange = torch.arange(0, cfg.rotary_dim, 2, device=weight.device, dtype=torch.float32)
        self.inv_freq = 1.0 / (cfg.rotary_base ** (arange / cfg.rotary_dim))  # as dijiang.rotary_cos_sin
        if self.kind == 'kv':
            shape = (batch_size, cfg.n_kv_head, max_length, cfg.head_size)
            self.layers = [tuple(torch.zeros(shape, device=weight.device, dtype=weight.dtype) for _ in 'kv')
                           for _ in range(cfg.n_layer)]
            self.key_positions = torch.arange(max_length, device=weight.device)  # for the length mask
        else:
            self.layers = [torch.zeros(batch_size, cfg.n_head, cfg.head_size, cfg.head_size, device=weight.device)
                           for _ in range(cfg.n_layer)]

    def load(self, cache):
        """Copy in a dijiang.Cache: what an eager prefill leaves, (k, v) per layer or a state."""
        for mine, theirs in zip(self.layers, cache.layers):
            if self.kind == 'kv':
                for buffer, tensor in zip(mine, theirs):
                    buffer[:, :, :tensor.shape[2]].copy_(tensor)
            else:
                mine.copy_(theirs)

    def step(self, token, position):
        model = self.model
        angles = position.float() * self.inv_freq  # (R/2,), as rotary_cos_sin computes them
        cos, sin = angles.cos()[None], angles.sin()[None]  # (1, R/2): one token
        x = model.embed(token)  # (B, 1, C)
        for block, layer in zip(model.layers, self.layers):
            h = block.ln_attn(x)
            if self.kind == 'kv':
                attn_out = self.attend(block.attn, h, cos, sin, layer, position)
            else:
                attn_out, state = block.attn(h, cos, sin, layer)
                if state is not layer:  # the Triton step updates the state in place; the torch forms return a new one
                    layer.copy_(state)
            if block.parallel_residual:
                x = x + attn_out + block.mlp(block.ln_mlp(x))
            else:
                x = x + attn_out
                x = x + block.mlp(block.ln_mlp(x))
        logits = model.lm_head(model.ln_f(x))
        return logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 logits, as GPT.forward

    def attend(self, attn, x, cos, sin, layer, position):
        """SoftmaxAttention.forward for one token x (B, 1, C): its key and value are written into the
        cache at position, and the query attends to every position up to it."""
        cfg, B = self.model.config, x.shape[0]
        group = cfg.n_head // cfg.n_kv_head
        qkv = attn.qkv(x).view(B, cfg.n_kv_head, group + 2, cfg.head_size)  # [q_1 ... q_group | k | v] per kv head
        q = rotate(qkv[:, :, :group].reshape(B, cfg.n_head, 1, cfg.head_size), cos, sin)  # (B, H, 1, D)
        k_cache, v_cache = layer  # (B, H_kv, max_length, D)
        at = position.view(1)
        k_cache[:, :, at] = rotate(qkv[:, :, group:group + 1], cos, sin)  # (B, H_kv, 1, D)
        v_cache[:, :, at] = qkv[:, :, group + 1:]
        seen = (self.key_positions <= position).view(1, 1, 1, -1)  # the positions written so far
        y = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=seen, enable_gqa=group > 1)
        return attn.proj(y.transpose(1, 2).reshape(B, 1, cfg.n_embd))


class CUDAGraphDecoder:
    """prefill(idx) reads the prompt with the model's own forward and loads the cache it leaves;
    step(token) decodes one token with the static step, replaying the captured graph.

    compile: torch.compile the static step (decoding_inductor) inside the graph. fused: a DiJiang
    model's step is fast/fused_decode.py's Triton kernels (which compile leaves as they are).
    max_length: the tokens a softmax model's static KV cache holds (0: block_size); each step attends
    over all of it, so the shortest that fits is the fastest. graph=False runs the step without
    capturing it: the same computation on any device."""

    @torch.no_grad()
    def __init__(self, model, batch_size, compile=False, fused=False, max_length=0, graph=True):
        cfg, device = model.config, model.lm_head.weight.device
        self.model, self.max_length = model, max_length or cfg.block_size
        if cfg.attention == 'softmax' and not 1 <= self.max_length <= cfg.block_size:
            raise ValueError(f"max_length={max_length}: a softmax model's static KV cache holds from 1 to "
                             f"block_size={cfg.block_size} tokens")
        if fused:
            from fast.fused_decode import FusedStep  # imported here: it needs Triton, the static step does not
            self.run = FusedStep(model, batch_size)
        else:
            self.run = StaticStep(model, batch_size, self.max_length)
        self.step_fn = self.run.step
        if compile and not fused:
            self.step_fn = torch.compile(self.run.step, dynamic=False, backend=decoding_inductor)
        self.token = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.position = torch.zeros((), dtype=torch.long, device=device)
        self.length = 0  # position, kept on the host too: the KV cache's bound is checked without a sync
        self.graph = None
        if graph:
            side_stream = torch.cuda.Stream()  # warm up outside the graph: compilation, autotuning, library handles
            side_stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side_stream):
                for _ in range(3):
                    self.step_fn(self.token, self.position)
            torch.cuda.current_stream().wait_stream(side_stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self.step_fn(self.token, self.position)  # (B, 1, vocab_size), rewritten by every replay

    def load(self, cache):
        """Continue from a dijiang.Cache: its per-layer tensors and its count of tokens."""
        if self.run.kind == 'kv' and cache.pos > self.max_length:
            raise ValueError(f"{cache.pos} tokens of context, but this decoder's KV cache holds max_length="
                             f"{self.max_length}: build the decoder with a larger max_length")
        self.run.load(cache)
        self.position.fill_(cache.pos)
        self.length = int(cache.pos)

    @torch.no_grad()
    def prefill(self, idx):
        """Read the prompt (B, T) with the model's own forward; return its logits (B, T, vocab_size)."""
        if self.run.kind == 'kv' and idx.shape[1] > self.max_length:
            raise ValueError(f"a prompt of {idx.shape[1]} tokens, but this decoder's KV cache holds max_length="
                             f"{self.max_length}: shorten the prompt or build the decoder with a larger max_length")
        cache = self.model.new_cache()
        logits, _ = self.model(idx, cache=cache)
        self.load(cache)
        return logits

    @torch.no_grad()
    def step(self, token):
        """Consume token (B, 1); return the logits (B, 1, vocab_size) for the next one."""
        if self.run.kind == 'kv' and self.length >= self.max_length:
            raise ValueError(f"token {self.length + 1} of context, but this decoder's KV cache holds max_length="
                             f"{self.max_length}: build the decoder with a larger max_length")
        self.token.copy_(token)
        if self.graph is None:
            logits = self.step_fn(self.token, self.position)
        else:
            self.graph.replay()
            logits = self.logits
        self.position += 1
        self.length += 1
        return logits
