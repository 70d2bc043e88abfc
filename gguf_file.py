"""
A LLaMA-family GGUF file (llama.cpp's format) read as the Hugging Face checkpoint it was made from:
config.json's values from its llama.* metadata (CONFIG_KEYS; a bad one is named by its config.json
key), its tensors dequantized to float32 under Hugging Face's names, and its tokenizer from the
tokenizer.ggml.* metadata: what hf_checkpoint.HFFolder gives of a LlamaForCausalLM folder.

llama.cpp stores the rows of attn_q and attn_k permuted for its rotary embedding, which rotates
neighbouring channels (2j, 2j + 1) of a head together, where Hugging Face's (and ours) rotates channel
j with channel j + D/2: unpermute() puts them back.
"""

import json
import os
import re

import torch

from tokenizer import Tokenizer, tokenizer_json_from_gguf

CONFIG_KEYS = {  # config.json's key: the GGUF metadata key that holds it
    'vocab_size': 'llama.vocab_size', 'hidden_size': 'llama.embedding_length', 'num_hidden_layers': 'llama.block_count',
    'num_attention_heads': 'llama.attention.head_count', 'num_key_value_heads': 'llama.attention.head_count_kv',
    'intermediate_size': 'llama.feed_forward_length', 'max_position_embeddings': 'llama.context_length',
    'rms_norm_eps': 'llama.attention.layer_norm_rms_epsilon', 'rope_theta': 'llama.rope.freq_base',
    'head_dim': 'llama.rope.dimension_count',  # LLaMA rotates whole heads: other rotary dims are refused as a head_dim
    'sliding_window': 'llama.attention.sliding_window', 'num_local_experts': 'llama.expert_count',
}
TENSORS = {  # GGUF name: Hugging Face's; {i} is the layer
    'token_embd.weight': 'model.embed_tokens.weight',
    'blk.{i}.attn_norm.weight': 'model.layers.{i}.input_layernorm.weight',
    'blk.{i}.attn_q.weight': 'model.layers.{i}.self_attn.q_proj.weight',
    'blk.{i}.attn_k.weight': 'model.layers.{i}.self_attn.k_proj.weight',
    'blk.{i}.attn_v.weight': 'model.layers.{i}.self_attn.v_proj.weight',
    'blk.{i}.attn_output.weight': 'model.layers.{i}.self_attn.o_proj.weight',
    'blk.{i}.ffn_norm.weight': 'model.layers.{i}.post_attention_layernorm.weight',
    'blk.{i}.ffn_gate.weight': 'model.layers.{i}.mlp.gate_proj.weight',
    'blk.{i}.ffn_up.weight': 'model.layers.{i}.mlp.up_proj.weight',
    'blk.{i}.ffn_down.weight': 'model.layers.{i}.mlp.down_proj.weight',
    'output_norm.weight': 'model.norm.weight',
    'output.weight': 'lm_head.weight',  # absent when the head is the embedding
}


def unpermute(w, n_head):
    """Rows of one head in llama.cpp's order (j0, j0 + 1 pairs) back to Hugging Face's (two halves):
    the inverse of llama.cpp's permute, w.view(H, 2, D/2, C).transpose(1, 2). w (H D, C)."""
    return w.view(n_head, -1, 2, w.shape[-1]).transpose(1, 2).reshape(w.shape)


class GGUFFile:

    def __init__(self, path):
        try:
            import gguf
        except ImportError:
            raise ValueError(f"reading {path} needs the gguf package: pip install gguf") from None
        if not os.path.isfile(path):
            raise ValueError(f"--gguf={path}: no such file")
        try:  # not a GGUF file, a truncated one: the reader names each differently
            self.reader = gguf.GGUFReader(path)
            self.meta = {key: field.contents() for key, field in self.reader.fields.items()}
        except Exception as e:
            raise ValueError(f"{path} cannot be read as a GGUF file ({type(e).__name__}: {' '.join(str(e).split())[:120]}): "
                             "it is damaged, incomplete or not a GGUF file") from None
        self.path, self.dequantize = path, gguf.quants.dequantize
        if self.meta.get('general.architecture') != 'llama':
            raise ValueError(f"{path}: general.architecture={self.meta.get('general.architecture')!r}: only LLaMA-family "
                             "GGUF files ('llama': LLaMA, Mistral, SmolLM2...) are converted")
        self.config_path = path  # what holds config.json's values
        tied = 'output.weight' not in {t.name for t in self.reader.tensors}
        self.hf = {'model_type': 'llama', 'tie_word_embeddings': tied,
                   **{key: self.meta[name] for key, name in CONFIG_KEYS.items() if name in self.meta}}
        if 'vocab_size' not in self.hf and 'tokenizer.ggml.tokens' in self.meta:  # as llama.cpp: one row per token
            self.hf['vocab_size'] = len(self.meta['tokenizer.ggml.tokens'])
        if self.meta.get('llama.rope.scaling.type', 'none') != 'none':
            self.hf['rope_scaling'] = dict(rope_type=self.meta['llama.rope.scaling.type'],
                                           factor=self.meta.get('llama.rope.scaling.factor'))

    def tokenizer(self):
        """(Tokenizer, tokenizer.json's text) from the tokenizer.ggml.* metadata, or (None, None)."""
        if 'tokenizer.ggml.tokens' not in self.meta:
            return None, None
        text = json.dumps(tokenizer_json_from_gguf(self.meta, self.path), ensure_ascii=False)
        return Tokenizer.from_json(json.loads(text), self.path), text

    def tensors(self, config):
        """Yield (Hugging Face name, float32 tensor, file) for every tensor, q and k unpermuted."""
        for t in self.reader.tensors:
            match = re.match(r'blk\.(\d+)\.(.*)$', t.name)
            key = f'blk.{{i}}.{match[2]}' if match else t.name
            name = TENSORS[key].format(i=match[1] if match else '') if key in TENSORS else t.name
            try:
                tensor = torch.from_numpy(self.dequantize(t.data, t.tensor_type).copy())
            except (NotImplementedError, ValueError) as e:
                raise ValueError(f"{self.path}: tensor {t.name} is {t.tensor_type.name}, which the gguf package cannot "
                                 f"dequantize ({e}): try a newer gguf (pip install -U gguf)") from None
            heads = {'blk.{i}.attn_q.weight': config.n_head, 'blk.{i}.attn_k.weight': config.n_kv_head}.get(key, 0)
            if heads and tensor.dim() == 2 and tensor.shape[0] % (2 * heads) == 0:  # else the shape check names it
                tensor = unpermute(tensor, heads)
            yield name, tensor, self.path
