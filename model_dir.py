"""
A model directory, what convert.py, train.py and transfer.py write and every script reads: ckpt.pt (the
config, the weights and any extra entries: a run's optimizer and state, the tokenizer's name) and a
readable config.json beside it, with tokenizer.json where the model has a BPE vocabulary.

    model, tokenizer = load('out')                  # ready to run, on the GPU if there is one
    ckpt = load_checkpoint('out')                   # the dict, read once: a script may build several models from it
    model = build_model(ckpt, 'out', attention='dijiang')
    save_checkpoint(model, 'out', tokenizer='bytes')

Everything read is checked: a missing, damaged or foreign file, an unknown config field, a NaN weight or
a weight of the wrong shape is one ValueError naming the file and what to do. GPT.from_checkpoint and
GPT.save_checkpoint are these functions as methods.
"""

import json
import os
from dataclasses import asdict, fields

import torch

from atomic import atomic_write, atomic_write_text
from dijiang import DIJIANG_ONLY_KEYS, GPT, GPTConfig
from tokenizer import Tokenizer

RENAMED_FIELDS = {'layer_norm_eps': 'norm_eps'}  # config fields of older checkpoints
RUNTIME_FIELDS = ('form', 'kernel')  # saved in the config by older checkpoints: now chosen at run time


def save_checkpoint(model, out_dir, **extra):
    """Write out_dir/ckpt.pt (config, weights and any extra entries) and a readable config.json,
    each atomically: a crash leaves the previous files intact."""
    os.makedirs(out_dir, exist_ok=True)
    config = asdict(model.config)
    atomic_write(os.path.join(out_dir, 'ckpt.pt'),
                 lambda path: torch.save(dict(config=config, model=model.state_dict(), **extra), path))
    atomic_write_text(os.path.join(out_dir, 'config.json'), json.dumps(config, indent=2) + '\n')


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
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get('config'), dict) or not isinstance(ckpt.get('model'), dict):
        raise ValueError(f"{ckpt_path} is not a dijiang checkpoint (no config and model entries): "
                         "write it with train.py or convert.py")
    return ckpt


def build_model(ckpt, path, form='chunk', kernel='auto', **overrides):
    """The GPT in the dict that load_checkpoint(path) returned. overrides replace config fields;
    attention='dijiang' on a softmax checkpoint linearizes it (the paper's method): every pretrained
    weight is kept, and the DiJiang-only parts keep their fresh init."""
    ckpt_path = os.path.join(path, 'ckpt.pt')
    saved = {RENAMED_FIELDS.get(k, k): v for k, v in ckpt['config'].items() if k not in RUNTIME_FIELDS}
    known = {f.name for f in fields(GPTConfig)}
    for where, names in (('overrides', overrides), (f"{ckpt_path}'s config", saved)):
        if set(names) - known:
            raise ValueError(f"unknown config field(s) in {where}: {', '.join(sorted(set(names) - known))}; "
                             f"the fields are {', '.join(sorted(known))}")
    config = GPTConfig(**{**saved, **overrides})  # a bad field's ValueError names it
    linearize = saved.get('attention', 'dijiang') == 'softmax' and config.attention == 'dijiang'
    for key, tensor in ckpt['model'].items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"{ckpt_path}: weight {key} holds NaN or inf: the model is damaged (a diverged run "
                             "or a bad conversion); use an earlier checkpoint")
    # built on the meta device, then given the memory-mapped weights: a big model is held once
    # (a linearized one is built for real, since its new parts are not in the checkpoint)
    try:  # a weight of another shape: a damaged or foreign file
        with torch.device('cpu' if linearize else 'meta'):
            model = GPT(config, form, kernel)
        missing, unexpected = model.load_state_dict(ckpt['model'], strict=False, assign=True)
    except RuntimeError as e:
        detail = str(e).strip().splitlines()[-1].strip()[:200] if str(e).strip() else type(e).__name__
        raise ValueError(f"{ckpt_path}: its weights and config do not make a model ({detail}): the file is damaged "
                         "or was not written by train.py or convert.py") from None
    model.tie_weights()  # assign=True gave the head and the embedding separate tensors
    missing = [key for key in missing if not (linearize and key.endswith(DIJIANG_ONLY_KEYS))
               and not (config.tie_embeddings and key == 'lm_head.weight')]
    if missing or unexpected:
        raise ValueError(f"{ckpt_path} does not match the config (attention={config.attention!r}): missing "
                         f"{missing[:4]}, unexpected {unexpected[:4]}; check the overrides")
    return model


def pick_device(device='auto', dtype='auto'):
    """device ('auto': CUDA when torch sees a GPU, else the CPU) and dtype ('auto': bfloat16 on a GPU
    that has it, else float32) resolved, as (device string, torch dtype); ValueError for a GPU torch lacks."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device = ('cuda' if gpus else 'cpu') if device == 'auto' else device
    index = device.removeprefix('cuda').removeprefix(':')
    if device != 'cpu' and not (device == 'cuda' or device.startswith('cuda:') and index.isdigit()):
        raise ValueError(f"device={device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if device != 'cpu' and int(index or 0) >= gpus:
        raise ValueError(f"device={device!r}, but torch sees {gpus} CUDA GPU(s): use --device=cpu, or a GPU it sees")
    if dtype == 'auto':
        dtype = 'bfloat16' if device != 'cpu' and torch.cuda.is_bf16_supported() else 'float32'
    if dtype not in ('float32', 'bfloat16', 'float16'):
        raise ValueError(f"dtype={dtype!r}: use 'auto', 'float32', 'bfloat16' or 'float16'")
    return device, getattr(torch, dtype)


def load(path, device='auto', dtype='auto', **overrides):
    """The model in a directory that convert.py or train.py wrote, ready to run (eval mode, weights in
    dtype on device, as pick_device resolves them), and its tokenizer. overrides go to build_model."""
    device, dtype = pick_device(device, dtype)
    ckpt = load_checkpoint(path)
    model = build_model(ckpt, path, **overrides).to(device).to_dtype(dtype).eval()
    return model, Tokenizer.for_model(path, ckpt.get('tokenizer'))
