"""
A Hugging Face model folder, read: config.json's values as GPTConfig fields, each checked for its type
and range, with what the model does not do refused by name; the weights, one tensor at a time
(safetensors) or memory-mapped (.bin), from one file or from shards; and each family's key map from
its tensor names to ours. The families: GPT-NeoX (Pythia, and checkpoints saved by the released
DiJiang code, whose per-head gamma recover_decay finds in its D1 and D2) and LLaMA (LlamaForCausalLM,
MistralForCausalLM). gguf_file.py reads a GGUF file into the same form.
"""

import json
import math
import os
import re
from dataclasses import fields

import torch

from dijiang import LLAMA, GPTConfig
from tokenizer import Tokenizer

# Hugging Face names -> ours. {i} is the layer index, {p} weight or bias.
NEOX_KEYS = {
    'gpt_neox.embed_in.weight': 'embed.weight',
    'gpt_neox.layers.{i}.input_layernorm.{p}': 'layers.{i}.ln_attn.{p}',
    'gpt_neox.layers.{i}.post_attention_layernorm.{p}': 'layers.{i}.ln_mlp.{p}',
    'gpt_neox.layers.{i}.attention.query_key_value.{p}': 'layers.{i}.attn.qkv.{p}',  # both per head [q|k|v]
    'gpt_neox.layers.{i}.attention.dense.{p}': 'layers.{i}.attn.proj.{p}',
    'gpt_neox.layers.{i}.mlp.dense_h_to_4h.{p}': 'layers.{i}.mlp.up.{p}',
    'gpt_neox.layers.{i}.mlp.dense_4h_to_h.{p}': 'layers.{i}.mlp.down.{p}',
    'gpt_neox.final_layer_norm.{p}': 'ln_f.{p}',
    'embed_out.weight': 'lm_head.weight',
    'lm_head.weight': 'lm_head.weight',  # what transformers 5 calls embed_out in memory
    # saved by the released DiJiang code
    'gpt_neox.layers.{i}.attention.W_G': 'layers.{i}.attn.gate.weight',  # transposed: the released code does x @ W_G
    'gpt_neox.layers.{i}.attention.group_norm.{p}': 'layers.{i}.attn.group_norm.{p}',
    'gpt_neox.layers.{i}.attention.proj_matrix': 'layers.{i}.attn.feature_proj',
    'gpt_neox.layers.{i}.attention.D1': 'layers.{i}.attn.decay',  # D1 and D2 together give gamma
    'gpt_neox.layers.{i}.attention.D2': 'layers.{i}.attn.decay',
}
LLAMA_KEYS = {
    'model.embed_tokens.weight': 'embed.weight',
    'model.layers.{i}.input_layernorm.weight': 'layers.{i}.ln_attn.weight',
    'model.layers.{i}.self_attn.q_proj.weight': 'layers.{i}.attn.q',  # q, k and v: fused into attn.qkv.weight
    'model.layers.{i}.self_attn.k_proj.weight': 'layers.{i}.attn.k',
    'model.layers.{i}.self_attn.v_proj.weight': 'layers.{i}.attn.v',
    'model.layers.{i}.self_attn.o_proj.weight': 'layers.{i}.attn.proj.weight',
    'model.layers.{i}.post_attention_layernorm.weight': 'layers.{i}.ln_mlp.weight',
    'model.layers.{i}.mlp.gate_proj.weight': 'layers.{i}.mlp.gate.weight',
    'model.layers.{i}.mlp.up_proj.weight': 'layers.{i}.mlp.up.weight',
    'model.layers.{i}.mlp.down_proj.weight': 'layers.{i}.mlp.down.weight',
    'model.norm.weight': 'ln_f.weight',
    'lm_head.weight': 'lm_head.weight',  # absent when tie_word_embeddings is true
}
# buffers that older checkpoints saved and that are recomputed: the causal mask and the rotary tables
DROPPED = re.compile(r'(^|\.)(attention\.(bias|masked_bias)|rotary_emb\.(inv_freq|cos_cached|sin_cached))$')

# config.json -> GPTConfig: (field, the keys that may hold it, the first one there wins; default, ... if it must be there)
COMMON = [('vocab_size', ['vocab_size'], ...), ('n_embd', ['hidden_size'], ...), ('n_layer', ['num_hidden_layers'], ...),
          ('n_head', ['num_attention_heads'], ...), ('intermediate_size', ['intermediate_size'], ...),
          ('block_size', ['max_position_embeddings'], ...)]
NEOX_CONFIG = COMMON + [('rotary_pct', ['rope_parameters.partial_rotary_factor', 'rotary_pct'], 0.25),
                        ('rotary_base', ['rope_parameters.rope_theta', 'rotary_emb_base'], 10000.0),
                        ('parallel_residual', ['use_parallel_residual'], True), ('norm_eps', ['layer_norm_eps'], 1e-5)]
LLAMA_CONFIG = COMMON + [('n_kv_head', ['num_key_value_heads'], 0), ('norm_eps', ['rms_norm_eps'], 1e-6),
                         ('rotary_base', ['rope_parameters.rope_theta', 'rope_theta'], 10000.0),
                         ('tie_embeddings', ['tie_word_embeddings'], False)]
FAMILIES = {  # config.json's model_type: its config.json fields, the GPTConfig values it implies, its key map
    'gpt_neox': (NEOX_CONFIG, {}, NEOX_KEYS), 'llama': (LLAMA_CONFIG, LLAMA, LLAMA_KEYS),
    'mistral': (LLAMA_CONFIG, LLAMA, LLAMA_KEYS)}
PATTERNS = {family: [(re.compile(re.escape(hf).replace(r'\{i\}', r'(?P<i>\d+)').replace(r'\{p\}', r'(?P<p>weight|bias)')
                                 + '$'), ours) for hf, ours in keys.items()] for family, (_, _, keys) in FAMILIES.items()}
FIELD_TYPES = {f.name: f.type for f in fields(GPTConfig)}
WEIGHT_FILES = ('model.safetensors', 'model.safetensors.index.json', 'pytorch_model.bin', 'pytorch_model.bin.index.json')


def refused(hf, family):
    """(True if config.json asks for it, what the model does not do) for each such thing in the family."""
    rope, get = hf.get('rope_parameters') or {}, hf.get
    scaling = get('rope_scaling') or {}  # None, or {'rope_type': 'default'} in some configs, means none
    scaled = (not isinstance(scaling, dict) or scaling.get('rope_type', scaling.get('type', 'default')) != 'default' or
              rope.get('rope_type', 'default') != 'default', f"scaled RoPE ({get('rope_scaling') or rope})")
    if family == 'gpt_neox':
        return [(get('hidden_act', 'gelu') != 'gelu', f"hidden_act={get('hidden_act')!r}: only 'gelu' (exact, as Pythia)"),
                (get('attention_bias', True) is not True, "attention_bias=false: Pythia's attention has biases"),
                (get('tie_word_embeddings', False) is not False, "tie_word_embeddings=true: Pythia's head is untied"),
                scaled]
    head_dim = get('hidden_size') // get('num_attention_heads')  # both checked by then
    return [(get('hidden_act', 'silu') != 'silu', f"hidden_act={get('hidden_act')!r}: only 'silu' (SwiGLU, as LLaMA)"),
            (get('attention_bias', False) is not False or get('mlp_bias', False) is not False, "biases in attention or MLP"),
            (get('head_dim') not in (None, head_dim),
             f"head_dim={get('head_dim')!r} (only hidden_size / num_attention_heads = {head_dim})"),
            (rope.get('partial_rotary_factor', get('partial_rotary_factor', 1.0)) != 1.0,
             "rotary embeddings on part of each head"),
            (get('sliding_window') is not None and not (isinstance(get('sliding_window'), int) and
             get('sliding_window') >= get('max_position_embeddings')),  # a window as long as the context is none
             f"sliding_window={get('sliding_window')!r} attention"),
            (bool(get('num_local_experts')), f"a mixture of {get('num_local_experts')} experts"), scaled]


def gpt_config(hf):
    """GPTConfig's fields from a config.json's values hf, each checked for type and range, and the
    family (model_type). A ValueError names the key; the caller names the file."""
    if not isinstance(hf, dict) or not isinstance(hf.get('rope_parameters') or {}, dict):
        raise ValueError("not a config.json object (with rope_parameters an object, if there): is it one?")
    family = hf.get('model_type', 'gpt_neox')
    if family not in FAMILIES:
        raise ValueError(f"model_type={family!r} is not supported: only {', '.join(map(repr, FAMILIES))}")
    values = {**hf, **{f'rope_parameters.{k}': v for k, v in (hf.get('rope_parameters') or {}).items()}}
    config = dict(FAMILIES[family][1])
    for field, keys, default in FAMILIES[family][0]:
        key = next((k for k in keys if k in values), None)
        if key is None and default is ...:
            raise ValueError(f"has no {keys[-1]!r}: is this a {family} config.json?")
        value, kind = (default, None) if key is None else (values[key], FIELD_TYPES[field])
        ok = kind is None or type(value) is kind or (kind is float and type(value) is int)
        if ok and kind in (int, float):
            ok = 0 < value < math.inf and (field != 'rotary_pct' or value <= 1)
        if not ok:
            need = {bool: 'true or false', int: 'a positive integer', float: 'a positive number'}[kind]
            raise ValueError(f"{key}={value!r}: expected {'a number in (0, 1]' if field == 'rotary_pct' else need}")
        config[field] = value
    for bad, what in refused(hf, family):
        if bad:
            raise ValueError(f"{what} is not supported")
    GPTConfig(**config)  # what holds between fields: heads divide the width, an even number of rotary dims
    return config, family


def our_name(name, family):
    """Our name for a tensor of the family's checkpoints, or None."""
    for pattern, ours in PATTERNS[family]:
        if match := pattern.match(name):
            return ours.format(**match.groupdict())
    return None


def read_state(tensors, family):
    """The family's key map applied to tensors, an iterator of (name, tensor, file): {ours: tensor},
    {ours: its name}, and the released DiJiang decays, {ours: {'D1': .., 'D2': ..}}."""
    state, sources, decays = {}, {}, {}
    for name, tensor, file in tensors:
        if DROPPED.search(name):
            continue
        ours = our_name(name, family)
        if ours is None:
            raise ValueError(f"unknown key {name} in {file}: not a {family} checkpoint this converts")
        if ours in sources and not ours.endswith('attn.decay'):
            raise ValueError(f"{name} and {sources[ours]} in {file} are the same weight ({ours})")
        if ours.endswith('attn.decay'):  # D1 and D2: fp16 ones overflow, and recover_decay skips what did
            decays.setdefault(ours, {})[name.rpartition('.')[2]] = tensor
        elif tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"{name} in {file} holds NaN or inf: the checkpoint is damaged (a diverged run, a bad "
                             "export); convert another one")
        state[ours], sources[ours] = (tensor.t() if ours.endswith('attn.gate.weight') else tensor), name
    return state, sources, decays


def recover_decay(D1, D2):
    """gamma per head from the released D1 = gamma^n and D2 = gamma^-n, each (1, H, L, 1): least
    squares of log D = +-n log gamma over both, skipping entries that overflowed or underflowed (fp16
    D2 overflows past a few hundred positions). For the released fp32 init this gives gamma exactly.
    Returns gamma (H,) fp32 and the largest deviation |log D -+ n log gamma|, about the worst relative
    error of the decay, which rounding alone keeps within a few eps of D's dtype."""
    L = D1.shape[2]
    values = torch.cat((D1[0, :, :, 0], D2[0, :, :, 0]), dim=1)  # (H, 2L)
    n = torch.cat((torch.arange(L), -torch.arange(L))).double()  # log D = n log gamma, n signed
    ok = torch.isfinite(values) & (values >= torch.finfo(values.dtype).tiny)
    logs = values.double().log().where(ok, 0)
    log_gamma = (n * logs).sum(1) / (n * n * ok).sum(1)  # (H,)
    deviation = ((logs - n * log_gamma[:, None]) * ok).abs().max().item()
    return log_gamma.exp().float(), deviation


def hf_names(config, key_map=NEOX_KEYS):
    """ours -> the name it comes from (the first spelling in key_map), for messages."""
    return {ours.format(i=i, p=p): hf.format(i=i, p=p) for hf, ours in reversed(key_map.items())
            for i in range(config.n_layer) for p in ('weight', 'bias')}


def unreadable(path, error):
    detail = ' '.join(str(error).split())[:160]
    return ValueError(f"{path} cannot be read ({type(error).__name__}: {detail}): the file is damaged or incomplete; "
                      "download it again (remove it from the cache first)")


def read_json(path):
    try:
        with open(path, encoding='utf-8') as f:
            return json.load(f)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise unreadable(path, e) from None


class HFFolder:
    """A Hugging Face model folder: config.json's values (hf), its tensors and its tokenizer."""

    def __init__(self, folder):
        if not os.path.isdir(folder):
            raise ValueError(f"--hf_dir={folder} is not a directory")
        self.path, self.config_path = folder, os.path.join(folder, 'config.json')
        if not os.path.isfile(self.config_path):
            raise ValueError(f"no config.json in {folder}: pass a Hugging Face model folder")
        self.hf = read_json(self.config_path)

    def tokenizer(self):
        """(Tokenizer, tokenizer.json's text), or (None, None) without one; Unsupported for one of a kind
        tokenizer.py does not reproduce."""
        path = os.path.join(self.path, 'tokenizer.json')
        if not os.path.isfile(path):
            return None, None
        tokenizer = Tokenizer.from_file(path)
        with open(path, encoding='utf-8') as f:
            return tokenizer, f.read()

    def tensors(self, config):
        """Yield (name, tensor, file) for every tensor of the checkpoint, one at a time."""
        form = next((f for f in WEIGHT_FILES if os.path.exists(os.path.join(self.path, f))), None)
        if form is None:
            raise ValueError(f"no weights in {self.path}: expected one of {', '.join(WEIGHT_FILES)}")
        index = os.path.join(self.path, form)
        try:
            files = sorted(set(read_json(index)['weight_map'].values())) if form.endswith('.index.json') else [form]
        except (KeyError, TypeError, AttributeError) as e:  # JSON, but no weight_map of file names
            raise unreadable(index, e) from None
        for path in (os.path.join(self.path, file) for file in files):
            if not os.path.exists(path):
                raise ValueError(f"{path} is missing (listed in {form})")
            try:  # random bytes, a truncated download: safetensors and torch name each differently
                if path.endswith('.safetensors'):
                    from safetensors import safe_open
                    with safe_open(path, framework='pt') as handle:
                        for name in handle.keys():
                            yield name, handle.get_tensor(name), path
                    continue
                state = torch.load(path, map_location='cpu', mmap=True, weights_only=True)
            except ImportError:
                raise ValueError(f"reading {path} needs the safetensors package: pip install safetensors") from None
            except Exception as e:
                raise unreadable(path, e) from None
            if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
                raise ValueError(f"{path} holds no dict of tensors: not a Hugging Face weights file")
            yield from ((name, tensor, path) for name, tensor in state.items())
