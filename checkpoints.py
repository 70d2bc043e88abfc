"""
train.py's checkpoints in out_dir, in one of two formats:

- ckpt.pt, one file (dijiang.GPT.save_checkpoint): the model, the optimizer and the run's state. A DDP
  run (and one process) writes it; sample.py and GPT.from_checkpoint read it.
- ckpt/, a folder of shards (torch.distributed.checkpoint): an FSDP run's, each rank writing its own
  pieces of the model and the optimizer, and rank 0 meta.pt, the run's state. It is written as
  ckpt.tmp/ and renamed into place once every rank is done, the previous one kept as ckpt.old/ for
  the instant between the renames: a crash leaves one whole checkpoint, never a part of one. Every
  rank writes into out_dir, so on several nodes it must be one folder that every node sees.
  `python consolidate.py --out_dir=DIR` turns it into ckpt.pt (for sample.py, or to resume without FSDP).

Either resumes either way: DCP reshards a sharded checkpoint into a DDP run, and an FSDP run reads
ckpt.pt whole on every rank (CPU memory for the whole model and optimizer on each), each keeping its
pieces; a run resumes from the newer of the two.
"""

import json
import os
import random
import shutil
import warnings
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_optimizer_state_dict, set_state_dict
from torch.distributed.fsdp import FSDPModule

import ranks
from atomic import atomic_write_text
from model_dir import load_checkpoint
from rundir import PREVIOUS, SHARDED, WRITING  # the folders in out_dir
from tokenizer import Tokenizer


def tokenizer_of(ckpt, folder):
    """The name of a model's tokenizer: in its checkpoint (train.py and convert.py write it), else that of
    the folder's tokenizer.json, else None (unknown: only the vocabulary size is checked)."""
    if ckpt.get('tokenizer') is None and os.path.isfile(os.path.join(folder, 'tokenizer.json')):
        return Tokenizer.from_dir(folder).identity
    return ckpt.get('tokenizer')


def resumed_settings(ckpt, given, names, resumable, out_dir):
    """The settings of the run in out_dir (those in names), with the command line's given changes to the
    resumable ones, each said; a change of any other is refused."""
    if not isinstance(ckpt.get('settings'), dict) or not ('optimizer' in ckpt or 'sharded' in ckpt):
        raise ValueError(f"{os.path.join(out_dir, 'ckpt.pt')} holds a model, not a train.py run to resume: fine-tune it "
                         f"with --init_from={out_dir} and a new --out_dir")
    saved = {name: value for name, value in ckpt['settings'].items() if name in names}
    for name, value in given.items():
        if name not in resumable + ('init_from', 'out_dir') and saved.get(name, value) != value:
            raise ValueError(f"{name}={value!r}, but the run in {out_dir} has {name}={saved[name]!r}: a resumed run may "
                             f"change only the settings --help marks (r); start a new run (another --out_dir) to change {name}")
        if name in resumable and saved.get(name, value) != value and os.environ.get('RANK', '0') == '0':
            print(f"resuming with {name}={value!r} (the run had {saved[name]!r})")
    return {**saved, **given}


def seed_all(seed):
    """The random generators a run draws from, torch's, numpy's and Python's, seeded alike."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def rng_state():
    numpy_state = np.random.get_state()  # ('MT19937', keys uint32 (624,), pos, has_gauss, gauss)
    return dict(torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                numpy=[numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]],
                python=random.getstate())


def set_rng_state(rng):
    torch.set_rng_state(rng['torch'])
    if torch.cuda.is_available() and len(rng['cuda']) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng['cuda'])
    np.random.set_state((rng['numpy'][0], rng['numpy'][1].numpy().astype(np.uint32), *rng['numpy'][2:]))
    random.setstate(rng['python'])


def sharded_folder(out_dir):
    """The whole sharded checkpoint in out_dir, or None: ckpt/, or ckpt.old/ when a crash came between the renames."""
    for name in (SHARDED, PREVIOUS):
        if os.path.isfile(os.path.join(out_dir, name, 'meta.pt')):
            return os.path.join(out_dir, name)
    return None


def read_meta(folder):
    return torch.load(os.path.join(folder, 'meta.pt'), map_location='cpu', weights_only=True)


def latest(out_dir):
    """The checkpoint to resume from, as (the dict: train.py's entries, with 'sharded': its folder if it is
    one), the newer of ckpt.pt and ckpt/; None when out_dir has neither."""
    folder, has_file = sharded_folder(out_dir), os.path.isfile(os.path.join(out_dir, 'ckpt.pt'))
    sharded = dict(read_meta(folder), sharded=folder) if folder else None
    whole = load_checkpoint(out_dir) if has_file else None
    if sharded and whole:
        return sharded if sharded['step'] >= whole['step'] else whole
    return sharded or whole


def save(out_dir, gpt, optimizer, sharded, **state):
    """A checkpoint of the run, with the random state: sharded, each rank its shards; else ckpt.pt, by rank 0,
    written whole or not at all (atomic.py): a full disk leaves the last one as it was."""
    if sharded:
        save_sharded(out_dir, gpt, optimizer, rng=rng_state(), **state)
    elif ranks.rank == 0:
        gpt.save_checkpoint(out_dir, optimizer=optimizer.state_dict(), rng=rng_state(), **state)


def resume(ckpt, gpt, optimizer, out_dir):
    """The optimizer (and a sharded checkpoint's model) and the random state of the checkpoint ckpt into this
    run; ckpt.pt's model is in gpt already (sharded or not). Returns where it was: (optimizer steps done,
    windows read)."""
    try:
        if 'sharded' in ckpt:
            load_sharded(ckpt['sharded'], gpt, optimizer)
        elif isinstance(gpt, FSDPModule):  # ckpt.pt into shards: each rank keeps its pieces of the whole states
            set_optimizer_state_dict(gpt, optimizer, by_name(ckpt['optimizer'], gpt, optimizer),
                                     options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(ckpt['optimizer'])
        set_rng_state(ckpt['rng'])
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as e:
        raise ValueError(f"{ckpt.get('sharded') or os.path.join(out_dir, 'ckpt.pt')}: its optimizer or random state does "
                         f"not fit the model ({type(e).__name__}): the file is damaged; restore it, or start a new run") from None
    return ckpt['step'], ckpt['data_position']


def save_sharded(out_dir, gpt, optimizer, **meta):
    """Every rank writes its shards into ckpt.tmp/, rank 0 meta.pt; then rank 0 renames it to ckpt/."""
    writing, final, previous = (os.path.join(out_dir, name) for name in (WRITING, SHARDED, PREVIOUS))
    if ranks.rank == 0 and os.path.exists(writing):
        shutil.rmtree(writing)  # what a killed write left
    ranks.barrier()
    model_state, optimizer_state = get_state_dict(gpt, optimizer)
    try:
        dcp.save(dict(model=model_state, optimizer=optimizer_state), checkpoint_id=writing)
        if ranks.rank == 0:
            torch.save(dict(meta, config=asdict(gpt.config)), os.path.join(writing, 'meta.pt'))
    except (OSError, RuntimeError, dcp.api.CheckpointException) as e:
        raise OSError(getattr(e, 'errno', None), f"cannot write the sharded checkpoint ({str(e).strip()[:120]}): make "
                      "room, or write elsewhere; the earlier checkpoint is as it was", writing) from None
    ranks.barrier()
    if ranks.rank == 0:
        if os.path.isdir(final):
            if os.path.isdir(previous):
                shutil.rmtree(previous)
            os.replace(final, previous)
        os.replace(writing, final)  # between these two renames ckpt.old/ is the checkpoint
        if os.path.isdir(previous):
            shutil.rmtree(previous)
        atomic_write_text(os.path.join(out_dir, 'config.json'), json.dumps(asdict(gpt.config), indent=2) + '\n')
    ranks.barrier()


def load_sharded(folder, gpt, optimizer):
    """The model and optimizer of a sharded checkpoint into gpt and optimizer, sharded or not (resharded as needed)."""
    model_state, optimizer_state = get_state_dict(gpt, optimizer)
    state = dict(model=model_state, optimizer=optimizer_state)
    with warnings.catch_warnings():  # in one process (no ranks) DCP says on stderr that it assumes so
        warnings.filterwarnings('ignore', 'torch.distributed is disabled', UserWarning)
        dcp.load(state, checkpoint_id=folder)
    set_state_dict(gpt, optimizer, model_state_dict=state['model'], optim_state_dict=state['optimizer'])


def by_name(state, gpt, optimizer):
    """An optimizer's state_dict(), keyed by parameter number (ckpt.pt's), keyed by parameter name (DCP's):
    number i is the i-th parameter of the optimizer's groups. consolidated() goes the other way."""
    names = {id(p): name for name, p in gpt.named_parameters()}
    name = [names[id(p)] for group in optimizer.param_groups for p in group['params']]
    return dict(state={name[i]: value for i, value in state['state'].items()},
                param_groups=[dict(group, params=[name[i] for i in group['params']]) for group in state['param_groups']])


def consolidated(folder):
    """A sharded checkpoint as the dict of one ckpt.pt: the whole model, and the optimizer keyed by
    parameter number, as torch's state_dict() has it. Read in this one process (no ranks needed)."""
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner  # as format_utils reads one
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
    state = {}
    _load_state_dict(state, storage_reader=dcp.FileSystemReader(folder), planner=_EmptyStateDictLoadPlanner(),
                     no_dist=True)
    groups = state['optimizer']['param_groups']
    number = {name: i for i, name in enumerate(name for group in groups for name in group['params'])}
    optimizer = dict(state={number[name]: value for name, value in state['optimizer']['state'].items()},
                     param_groups=[dict(group, params=[number[name] for name in group['params']]) for group in groups])
    meta = read_meta(folder)
    return dict(config=meta.pop('config'), model=state['model'], optimizer=optimizer, **meta)
