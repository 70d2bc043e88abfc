"""
A Hugging Face model folder, read: config.json's values as GPTConfig fields, each checked for its type
and range, with what the model does not do refused by name; and the weights, one tensor at a time
(safetensors) or memory-mapped (.bin), from one file or from shards. The families: GPT-NeoX (Pythia)
and LLaMA (LlamaForCausalLM, MistralForCausalLM). gguf_file.py reads a GGUF file into the same form.
"""

import json
import math
import os
from dataclasses import fields

import torch

from dijiang import LLAMA, GPTConfig

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
CONFIGS = {'gpt_neox': (NEOX_CONFIG, {}), 'llama': (LLAMA_CONFIG, LLAMA), 'mistral': (LLAMA_CONFIG, LLAMA)}
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


def gpt_config(hf, path, names={}):
    """GPTConfig's fields from a config.json's values hf, each checked for type and range; names
    spells the keys in messages (a GGUF file's own)."""
    if not isinstance(hf, dict) or not isinstance(hf.get('rope_parameters') or {}, dict):
        raise ValueError(f"{path} holds no config.json object (with rope_parameters an object, if there): is it one?")
    family = hf.get('model_type', 'gpt_neox')
    if family not in CONFIGS:
        raise ValueError(f"{path}: model_type={family!r} is not supported: only {', '.join(map(repr, CONFIGS))}")
    values = {**hf, **{f'rope_parameters.{k}': v for k, v in (hf.get('rope_parameters') or {}).items()}}
    config = dict(CONFIGS[family][1])
    for field, keys, default in CONFIGS[family][0]:
        key = next((k for k in keys if k in values), None)
        if key is None and default is ...:
            raise ValueError(f"{path} has no {names.get(keys[-1], keys[-1])!r}: is this a {family} config.json?")
        value, kind = (default, None) if key is None else (values[key], FIELD_TYPES[field])
        ok = kind is None or type(value) is kind or (kind is float and type(value) is int)
        if ok and kind in (int, float):
            ok = 0 < value < math.inf and (field != 'rotary_pct' or value <= 1)
        if not ok:
            need = {bool: 'true or false', int: 'a positive integer', float: 'a positive number'}[kind]
            need = 'a number in (0, 1]' if field == 'rotary_pct' else need
            raise ValueError(f"{path}: {names.get(key, key)}={value!r}: expected {need}")
        config[field] = value
    for bad, what in refused(hf, family):
        if bad:
            raise ValueError(f"{path}: {what} is not supported")
    try:
        GPTConfig(**config)  # what holds between fields: heads divide the width, an even number of rotary dims
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return config, family


def shard_files(index_path):
    try:
        with open(index_path, encoding='utf-8') as f:
            return sorted(set(json.load(f)['weight_map'].values()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # not JSON, or no weight_map of file names
        raise unreadable(index_path, e) from None


def unreadable(path, error):
    detail = ' '.join(str(error).split())[:160]
    return ValueError(f"{path} cannot be read ({type(error).__name__}: {detail}): the file is damaged or incomplete; "
                      "download it again (remove it from the cache first)")


def read_weights(folder):
    """Yield (name, tensor, file) for every tensor of the checkpoint in folder, one at a time."""
    form = next((f for f in WEIGHT_FILES if os.path.exists(os.path.join(folder, f))), None)
    if form is None:
        raise ValueError(f"no weights in {folder}: expected one of {', '.join(WEIGHT_FILES)}")
    for file in shard_files(os.path.join(folder, form)) if form.endswith('.index.json') else [form]:
        path = os.path.join(folder, file)
        if not os.path.exists(path):
            raise ValueError(f"{path} is missing (listed in {form})")
        try:  # random bytes, a truncated download: safetensors and torch name each differently
            if file.endswith('.safetensors'):
                from safetensors import safe_open
                with safe_open(path, framework='pt') as handle:
                    for name in handle.keys():
                        yield name, handle.get_tensor(name), file
                continue
            state = torch.load(path, map_location='cpu', mmap=True, weights_only=True)
        except ImportError:
            raise ValueError(f"reading {path} needs the safetensors package: pip install safetensors") from None
        except Exception as e:
            raise unreadable(path, e) from None
        if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
            raise ValueError(f"{path} holds no dict of tensors: not a Hugging Face weights file")
        yield from ((name, tensor, file) for name, tensor in state.items())


def read_config(folder):
    """config.json's values in folder, and its path."""
    if not os.path.isdir(folder):
        raise ValueError(f"--hf_dir={folder} is not a directory")
    path = os.path.join(folder, 'config.json')
    if not os.path.isfile(path):
        raise ValueError(f"no config.json in {folder}: pass a Hugging Face model folder")
    try:
        with open(path, encoding='utf-8') as f:
            return json.load(f), path
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise unreadable(path, e) from None

