"""
Decoding one token at a time as a CUDA graph, optionally compiled: what sample.py and bench.py use
on CUDA for a DiJiang model (the eager path, GPT.generate, computes the same tokens).

    decoder = CUDAGraphDecoder(model, batch_size=1, compile=True)
    for token in model.generate_tokens(idx, 100, decoder=decoder): ...

A decoding step is launch-bound: a 24-layer model runs hundreds of tiny kernels per token. DiJiang's
state has a fixed size, so one step has fixed shapes at any context length and can be captured once
and replayed with a single launch per token.
"""

import torch


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


class CUDAGraphDecoder:
    """A DiJiang model's decoding step captured once in a CUDA graph; prefill() reads the prompt
    eagerly and loads the states it leaves, step() replays the graph for one token."""

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
        cache = self.model.new_cache()
        cache.pos, cache.layers = self.position, list(self.states)
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
