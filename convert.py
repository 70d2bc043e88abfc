"""
Convert a Hugging Face GPT-NeoX checkpoint (the Pythia suite, or one saved by the released DiJiang
code) into a directory that GPT.from_checkpoint, sample.py and train.py read: ckpt.pt, config.json
and a copy of tokenizer.json.

    python convert.py --model=pythia-410m                        # download from the hub, then convert
    python convert.py --model=pythia-160m --revision=step100000   # one of Pythia's training checkpoints
    python convert.py --hf_dir=path/to/pythia-1b                  # a local folder: config.json + weights
    python convert.py --model=pythia-410m --attn=dijiang          # linearize: DiJiang layers, pretrained weights kept
    python convert.py --hf_dir=path/to/dijiang-410m               # a released-DiJiang checkpoint (detected)
    python convert.py --help                                      # every setting and its default

Downloads go over plain HTTPS into cache_dir, with a progress bar; an interrupted download resumes
where it stopped. Weights are read lazily (safetensors) or memory-mapped (.bin) and the model is
built on the meta device, so converting a model takes about its own size in RAM once.

Checkpoints saved by the released DiJiang code carry, per layer, attention.W_G, attention.group_norm,
attention.proj_matrix and attention.D1 / D2 = gamma^n / gamma^-n of shape (1, H, max_pos, 1). W_G,
the GroupNorm and P come over exactly; gamma per head is recovered from D1 and D2 (a least-squares fit
of log D over n, exact for the released init; the fit error is printed when training moved them).
"""

import json
import os
import re
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import torch
from tqdm import tqdm

from atomic import remove_leftover_dir
from configurator import check, interrupted, interrupts_deferred, parse_settings, settings_help
from dijiang import DIJIANG_ONLY_KEYS, FEATURE_MAPS, GPT, CONFIGS, DiJiangAttention, GPTConfig
from tokenizer import Tokenizer

# -----------------------------------------------------------------------------
# settings: each can be overridden as --name=value
hf_dir = ''  # a local Hugging Face GPT-NeoX folder: config.json, the weights (model.safetensors, sharded
             # *.safetensors with an index, pytorch_model.bin or sharded .bin) and tokenizer.json if any
model = ''  # or a Pythia model to download: pythia-70m, -160m, -410m, -1b, -1.4b, -2.8b, -6.9b, -12b (or *-deduped)
revision = 'main'  # a hub branch, tag or commit: e.g. step143000, one of Pythia's training checkpoints
cache_dir = '~/.cache/dijiang'  # downloads land in cache_dir/EleutherAI/MODEL/REVISION and resume from there
hub_url = os.environ.get('HF_ENDPOINT', 'https://huggingface.co')  # where downloads come from
out_dir = ''  # where to write; '' means out-MODEL, or out-NAME for --hf_dir=.../NAME
attn = 'auto'  # 'auto' (as the checkpoint: softmax for Pythia, dijiang for released DiJiang), 'softmax', or 'dijiang':
               # linearize Pythia, keeping every weight and initializing W_G, GroupNorm and P as the released code
feature_map = 'qmc'  # P of newly initialized DiJiang layers: 'qmc' (the paper, as train.py) or 'mc' (the released code's draw)
seed = 0  # newly initialized DiJiang layers: the torch seed of their W_G draw
feature_seed = 0  # newly initialized DiJiang layers: layer i draws its P with seed feature_seed + i, as train.py
dtype = 'auto'  # weights as the checkpoint stores them ('auto'), or 'float32', 'bfloat16', 'float16'
# -----------------------------------------------------------------------------
SETTINGS = {name: value for name, value in globals().items()
            if not name.startswith('_') and isinstance(value, (bool, int, float, str, tuple))}

# GPT-NeoX (Hugging Face) names -> ours. {i} is the layer index, {p} weight or bias.
KEY_MAP = {
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
KEY_PATTERNS = [(re.compile(re.escape(hf).replace(r'\{i\}', r'(?P<i>\d+)').replace(r'\{p\}', r'(?P<p>weight|bias)') + '$'),
                 ours) for hf, ours in KEY_MAP.items()]
# buffers that older checkpoints saved and that are recomputed: the causal mask and the rotary tables
DROPPED = re.compile(r'(^|\.)(attention\.(bias|masked_bias)|rotary_emb\.(inv_freq|cos_cached|sin_cached))$')
WEIGHT_FILES = ('model.safetensors', 'model.safetensors.index.json', 'pytorch_model.bin', 'pytorch_model.bin.index.json')

# -----------------------------------------------------------------------------
# Downloading from the hub


def download(url, path):
    """Fetch url into path with a progress bar. An interrupted download stays in path.partial and
    resumes from there with an HTTP Range request. Returns False when the server has no such file."""
    partial = path + '.partial'
    have = os.path.getsize(partial) if os.path.exists(partial) else 0
    request = urllib.request.Request(url, headers={'Range': f'bytes={have}-'} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return False
        if e.code == 416 and e.headers.get('Content-Range', '').endswith(f'/{have}'):  # the partial file was whole
            os.replace(partial, path)
            return True
        if e.code == 416:  # the file changed on the server: start over
            os.remove(partial)
            return download(url, path)
        raise SystemExit(f"error: {url}: HTTP {e.code} {e.reason}: check --model and --revision")
    except OSError as e:  # URLError, refused connections, timeouts
        raise SystemExit(f"error: cannot reach {url} ({getattr(e, 'reason', e)}): check the network, or download "
                         f"the files yourself and pass --hf_dir=DIR") from None
    with response:
        if response.status != 206:  # the server ignored the Range: start over
            have = 0
        size = response.headers.get('Content-Length')
        try:
            # the bar shows on a terminal only (not in a log), and goes away if the download stops
            with open(partial, 'ab' if have else 'wb') as f, \
                    tqdm(desc=os.path.basename(path), total=have + int(size) if size else None, initial=have,
                         unit='B', unit_scale=True, unit_divisor=1024, disable=None) as bar:
                try:
                    while chunk := response.read(1 << 20):
                        f.write(chunk)
                        bar.update(len(chunk))
                except BaseException:
                    bar.leave = False
                    raise
        except OSError as e:
            raise SystemExit(f"error: download of {url} broke off ({e}): run the same command again to resume") from None
    os.replace(partial, path)
    return True


def download_model(name, revision, cache_dir, hub_url):
    """Download config.json, tokenizer.json and the weights of EleutherAI/name at revision into the
    cache (files already there are kept), and return that folder."""
    if not name.startswith('pythia-') or name.removesuffix('-deduped') not in CONFIGS:
        choices = ', '.join(n for n in CONFIGS if n.startswith('pythia-'))
        raise SystemExit(f"error: --model={name}: choose one of {choices} (or add -deduped), or pass --hf_dir=DIR")
    folder = os.path.join(os.path.expanduser(cache_dir), 'EleutherAI', name, revision.replace('/', '--'))
    os.makedirs(folder, exist_ok=True)
    base = f"{hub_url.rstrip('/')}/EleutherAI/{name}/resolve/{urllib.parse.quote(revision, safe='')}/"

    def fetch(file):
        """True once file is in the cache. A file the hub does not have is remembered as file.absent
        (as huggingface_hub's .no_exist), so that a later run needs no network to learn it again."""
        path = os.path.join(folder, file)
        if os.path.exists(path):
            return True
        if os.path.exists(path + '.absent'):
            return False
        if download(base + file, path):
            return True
        open(path + '.absent', 'w').close()
        return False

    if not fetch('config.json'):
        raise SystemExit(f"error: {base}config.json not found: check --model and --revision")
    fetch('tokenizer.json')
    # the hub holds one of these forms, depending on the model and the revision: take the first there is
    weights = next((f for f in WEIGHT_FILES if os.path.exists(os.path.join(folder, f))), None)
    weights = weights or next((f for f in WEIGHT_FILES if fetch(f)), None)
    if weights is None:
        raise SystemExit(f"error: no weights ({', '.join(WEIGHT_FILES)}) under {base}")
    if weights.endswith('.index.json'):
        for shard in shard_files(os.path.join(folder, weights)):
            if not fetch(shard):
                raise SystemExit(f"error: {base}{shard}, listed in {weights}, not found")
    return folder

# -----------------------------------------------------------------------------
# Reading a Hugging Face checkpoint


def gpt_config(hf, path):
    """Our config from a GPT-NeoX config.json, in either spelling: rotary_pct / rotary_emb_base
    (hub checkpoints) or rope_parameters (transformers 5)."""
    if not isinstance(hf, dict):
        raise SystemExit(f"error: {path} holds a JSON {type(hf).__name__}, not an object: is this a GPT-NeoX config.json?")
    for key in ('vocab_size', 'hidden_size', 'num_hidden_layers', 'num_attention_heads', 'intermediate_size',
                'max_position_embeddings'):
        if key not in hf:
            raise SystemExit(f"error: {path} has no {key!r}: is this a GPT-NeoX config.json?")
        if not isinstance(hf[key], int) or isinstance(hf[key], bool) or hf[key] < 1:
            raise SystemExit(f"error: {path}: {key}={hf[key]!r}, expected a positive integer")
    if hf['hidden_size'] % hf['num_attention_heads']:
        raise SystemExit(f"error: {path}: hidden_size={hf['hidden_size']} is not divisible by "
                         f"num_attention_heads={hf['num_attention_heads']}")
    unsupported = [
        (hf.get('model_type', 'gpt_neox') != 'gpt_neox', f"model_type={hf.get('model_type')!r}, not 'gpt_neox'"),
        (hf.get('hidden_act', 'gelu') != 'gelu', f"hidden_act={hf.get('hidden_act')!r}: only 'gelu' (exact, as Pythia)"),
        (hf.get('attention_bias', True) is not True, "attention_bias=false: Pythia's attention has biases"),
        (hf.get('tie_word_embeddings', False), "tie_word_embeddings=true: Pythia's output head is untied"),
        (bool(hf.get('rope_scaling')) or (hf.get('rope_parameters') or {}).get('rope_type', 'default') != 'default',
         f"scaled RoPE ({hf.get('rope_scaling') or hf.get('rope_parameters')})"),
    ]
    for bad, what in unsupported:
        if bad:
            raise SystemExit(f"error: {path}: {what} is not supported")
    rope = hf.get('rope_parameters') or {}
    config = dict(vocab_size=hf['vocab_size'], n_layer=hf['num_hidden_layers'], n_head=hf['num_attention_heads'],
                  n_embd=hf['hidden_size'], intermediate_size=hf['intermediate_size'],
                  block_size=hf['max_position_embeddings'],
                  rotary_pct=float(rope.get('partial_rotary_factor', hf.get('rotary_pct', 0.25))),
                  rotary_base=float(rope.get('rope_theta', hf.get('rotary_emb_base', 10000))),
                  parallel_residual=bool(hf.get('use_parallel_residual', True)),
                  layer_norm_eps=float(hf.get('layer_norm_eps', 1e-5)))
    if int(config['n_embd'] // config['n_head'] * config['rotary_pct']) % 2:
        raise SystemExit(f"error: {path}: rotary_pct={config['rotary_pct']} gives an odd number of rotary dims per head")
    return config


def shard_files(index_path):
    try:
        with open(index_path, encoding='utf-8') as f:
            return sorted(set(json.load(f)['weight_map'].values()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # not JSON, or no weight_map of file names
        raise SystemExit(f"error: {index_path} is not a weights index ({type(e).__name__}: {one_line(e)}): it is damaged "
                         "or incomplete; download it again") from None


def one_line(error, limit=160):
    """An exception's message on one line, cut to limit characters: for the one line of an error."""
    text = ' '.join(str(error).split())
    return text if len(text) <= limit else text[:limit - 3] + '...'


def unreadable(path, error):
    return SystemExit(f"error: {path} cannot be read ({type(error).__name__}: {one_line(error)}): the file is damaged "
                      "or incomplete; download it again (remove it from the cache first)")


def read_weights(folder):
    """Yield (name, tensor, file) for every tensor of the checkpoint in folder. safetensors are read
    one tensor at a time, .bin files are memory-mapped: nothing is loaded twice."""
    form = next((f for f in WEIGHT_FILES if os.path.exists(os.path.join(folder, f))), None)
    if form is None:
        raise SystemExit(f"error: no weights in {folder}: expected one of {', '.join(WEIGHT_FILES)}")
    files = shard_files(os.path.join(folder, form)) if form.endswith('.index.json') else [form]
    for file in files:
        path = os.path.join(folder, file)
        if not os.path.exists(path):
            raise SystemExit(f"error: {path} is missing (listed in {form})")
        if file.endswith('.safetensors'):
            try:
                from safetensors import safe_open
            except ImportError:
                raise SystemExit(f"error: reading {path} needs the safetensors package: pip install safetensors") from None
            try:  # random bytes, a truncated download: safetensors names each differently
                handle = safe_open(path, framework='pt')
                names = list(handle.keys())
            except Exception as e:
                raise unreadable(path, e) from None
            with handle:
                for name in names:
                    try:
                        tensor = handle.get_tensor(name)
                    except Exception as e:
                        raise unreadable(path, e) from None
                    yield name, tensor, file
        else:
            try:
                state = torch.load(path, map_location='cpu', mmap=True, weights_only=True)
            except Exception as e:
                raise unreadable(path, e) from None
            if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
                raise SystemExit(f"error: {path} holds no dict of tensors: not a Hugging Face weights file")
            for name, tensor in state.items():
                yield name, tensor, file


def our_name(hf_name):
    for pattern, ours in KEY_PATTERNS:
        if m := pattern.match(hf_name):
            return ours.format(**m.groupdict())
    return None


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

# -----------------------------------------------------------------------------
# The conversion


def convert(folder, attn='auto', feature_map='qmc', seed=0, dtype='auto', feature_seed=0):
    """Read the HF checkpoint in folder; return our model (weights memory-mapped or freshly read) and
    what was found, for the summary."""
    if not os.path.isdir(folder):
        raise SystemExit(f"error: --hf_dir={folder} is not a directory")
    config_path = os.path.join(folder, 'config.json')
    if not os.path.isfile(config_path):
        raise SystemExit(f"error: no config.json in {folder}: pass a Hugging Face GPT-NeoX model folder")
    try:
        with open(config_path, encoding='utf-8') as f:
            hf = json.load(f)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise SystemExit(f"error: {config_path} is not JSON ({one_line(e)}): it is damaged or incomplete; "
                         "download it again") from None
    config = gpt_config(hf, config_path)

    state, sources, decays = {}, {}, {}  # ours -> tensor, ours -> HF name, layer -> {'D1': .., 'D2': ..}
    for hf_name, tensor, file in read_weights(folder):
        if DROPPED.search(hf_name):
            continue
        ours = our_name(hf_name)
        if ours is None:
            raise SystemExit(f"error: unknown key {hf_name} in {os.path.join(folder, file)}: not a GPT-NeoX "
                             f"(Pythia) or released-DiJiang checkpoint")
        if ours in sources and not ours.endswith('decay'):
            raise SystemExit(f"error: {hf_name} and {sources[ours]} in {folder} are the same weight ({ours})")
        if ours.endswith('attn.decay'):
            decays.setdefault(ours, {})[hf_name.rpartition('.')[2]] = tensor
        state[ours] = tensor.t() if ours.endswith('gate.weight') else tensor
        sources[ours] = hf_name

    released_dijiang = any(name.endswith('attn.gate.weight') for name in state)
    if attn == 'auto':
        attn = 'dijiang' if released_dijiang else 'softmax'
    if attn not in ('softmax', 'dijiang'):
        raise SystemExit(f"error: --attn={attn}: use 'auto', 'softmax' or 'dijiang'")
    if released_dijiang and attn == 'softmax':
        raise SystemExit(f"error: {folder} is a DiJiang checkpoint (it has attention.W_G): convert it with --attn=dijiang")
    try:
        config = GPTConfig(**config, attention=attn, feature_map=feature_map, feature_seed=feature_seed)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None

    with torch.device('meta'):
        model = GPT(config)
    expected = model.state_dict()
    if attn == 'dijiang' and not released_dijiang:
        # linearize Pythia: the new parts start from DiJiangAttention's init (the released code's)
        torch.manual_seed(seed)
        for i in range(config.n_layer):
            fresh = DiJiangAttention(config, i).state_dict()
            state.update({f'layers.{i}.{key}': fresh[key.removeprefix('attn.')] for key in DIJIANG_ONLY_KEYS})
    worst, geometric = 0.0, True
    for ours, D in decays.items():
        if set(D) != {'D1', 'D2'}:
            missing = sources[ours].rpartition('.')[0] + ('.D2' if 'D1' in D else '.D1')
            raise SystemExit(f"error: missing key {missing} in {folder}")
        H = config.n_head
        if D['D1'].shape != D['D2'].shape or D['D1'].dim() != 4 or D['D1'].shape[:2] != (1, H) or D['D1'].shape[3] != 1:
            raise SystemExit(f"error: {sources[ours].rpartition('.')[0]}.D1/D2 have shapes {tuple(D['D1'].shape)} and "
                             f"{tuple(D['D2'].shape)}; expected (1, {H}, max_positions, 1)")
        state[ours], deviation = recover_decay(D['D1'], D['D2'])
        worst, geometric = max(worst, deviation), geometric and deviation <= 4 * torch.finfo(D['D1'].dtype).eps

    hf_name_of = {**hf_names(config), **sources}  # for the messages: the names in this checkpoint, else the usual ones
    missing = [hf_name_of[key] for key in expected if key not in state]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ''
        raise SystemExit(f"error: missing key {missing[0]} in {folder}{more}")
    unexpected = [sources[key] for key in state if key not in expected]
    if unexpected:  # e.g. DiJiang tensors for more layers than config.json has
        raise SystemExit(f"error: unexpected key {unexpected[0]} in {folder}: config.json has {config.n_layer} layers")
    for key, want in expected.items():
        if state[key].shape != want.shape:
            got = tuple(state[key].shape[::-1] if key.endswith('gate.weight') else state[key].shape)
            raise SystemExit(f"error: {hf_name_of[key]} has shape {got} in {folder}, but config.json implies "
                             f"{tuple(want.shape)}")

    target = state['embed.weight'].dtype if dtype == 'auto' else getattr(torch, dtype, None)
    if not isinstance(target, torch.dtype) or not target.is_floating_point:
        raise SystemExit(f"error: --dtype={dtype}: use 'auto', 'float32', 'bfloat16' or 'float16'")
    fixed = {key for key in state if key.endswith(('attn.feature_proj', 'attn.decay'))}  # kept in fp32 by the model
    state = {key: (t.float() if key in fixed else t.to(target)).contiguous() for key, t in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model, dict(released_dijiang=released_dijiang, linearized=attn == 'dijiang' and not released_dijiang,
                       decay_deviation=worst if decays else None, decay_geometric=geometric)


def hf_names(config):
    """ours -> the GPT-NeoX name it comes from, for error messages (first spelling in KEY_MAP)."""
    names = {}
    for hf, ours in KEY_MAP.items():
        for i in range(config.n_layer):
            for p in ('weight', 'bias'):
                names.setdefault(ours.format(i=i, p=p), hf.format(i=i, p=p))
    return names


OUTPUT_FILES = ('ckpt.pt', 'config.json', 'tokenizer.json')


def is_output_file(name):
    return name in OUTPUT_FILES or name.removesuffix('.tmp') in OUTPUT_FILES  # or one half written


def write_output(model, out_dir, tokenizer_json, tokenizer_identity, source):
    """ckpt.pt, config.json and tokenizer.json, written into out_dir + '.tmp' and renamed into place
    (the old conversion moved to out_dir + '.old' meanwhile), so out_dir holds either the old
    conversion or the whole new one. The names are fixed: what a killed run left is replaced."""
    tmp_dir, old_dir = f"{out_dir}.tmp", f"{out_dir}.old"
    if not os.path.exists(out_dir) and os.path.isfile(os.path.join(old_dir, 'ckpt.pt')):
        os.replace(old_dir, out_dir)  # a run killed between the two renames below: the old conversion comes back
    if os.path.exists(out_dir) and os.listdir(out_dir) and not os.path.exists(os.path.join(out_dir, 'ckpt.pt')):
        raise SystemExit(f"error: --out_dir={out_dir} exists and holds no ckpt.pt: choose another --out_dir")
    for leftover in (tmp_dir, old_dir):  # what a killed run left
        try:
            remove_leftover_dir(leftover, is_output_file, 'where convert.py writes before renaming into place',
                                'convert.py')
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
    try:
        extra = dict(source=source)
        if tokenizer_identity:
            extra['tokenizer'] = tokenizer_identity  # train.py compares it with the data's
        model.save_checkpoint(tmp_dir, **extra)
        if tokenizer_json:
            shutil.copyfile(tokenizer_json, os.path.join(tmp_dir, 'tokenizer.json'))
        with interrupts_deferred():  # two renames, never one alone
            if os.path.exists(out_dir):
                os.replace(out_dir, old_dir)
            os.replace(tmp_dir, out_dir)
    finally:
        if not os.path.exists(out_dir) and os.path.exists(old_dir):
            os.replace(old_dir, out_dir)
        for leftover in (tmp_dir, old_dir):
            shutil.rmtree(leftover, ignore_errors=True)


def check_settings(settings):
    """Each setting on its own, before anything is read or downloaded: one line names the first bad one."""
    if bool(settings['hf_dir']) == bool(settings['model']):
        raise SystemExit("error: pass either --hf_dir=DIR (a local Hugging Face folder) or --model=pythia-... (to download)")
    for name, allowed in (('attn', ('auto', 'softmax', 'dijiang')), ('feature_map', FEATURE_MAPS),
                          ('dtype', ('auto', 'float32', 'bfloat16', 'float16'))):
        if settings[name] not in allowed:
            raise SystemExit(f"error: --{name}={settings[name]}: use {', '.join(repr(a) for a in allowed)}")
    for name in ('seed', 'feature_seed'):
        check(0 <= settings[name] < 2 ** 32, name, settings[name], 'give a seed from 0 to 2**32 - 1')
    check(bool(settings['revision']), 'revision', settings['revision'], "name a branch, tag or commit, e.g. 'main'")


def main(settings):
    t0 = time.time()
    check_settings(settings)
    out = os.path.normpath(settings['out_dir'] or 'out-' + (settings['model'] or os.path.basename(os.path.normpath(settings['hf_dir']))))
    try:
        convert_into(settings, out, t0)
    except KeyboardInterrupt:  # the line __main__ prints
        raise KeyboardInterrupt(f"{out} is as it was (a conversion is renamed into place only when whole); a download "
                                "resumes where it stopped: run the same command again") from None


def convert_into(settings, out, t0):
    if settings['model']:
        folder = download_model(settings['model'], settings['revision'], settings['cache_dir'], settings['hub_url'])
        source = f"EleutherAI/{settings['model']}@{settings['revision']}"
    else:
        folder = source = settings['hf_dir']
    tokenizer_json, identity = os.path.join(folder, 'tokenizer.json'), None
    if os.path.isfile(tokenizer_json):
        try:
            tokenizer = Tokenizer.from_file(tokenizer_json)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
        identity = tokenizer.identity
    else:
        tokenizer_json = None
    model, found = convert(folder, settings['attn'], settings['feature_map'], settings['seed'], settings['dtype'],
                           settings['feature_seed'])
    if tokenizer_json and tokenizer.vocab_size > model.config.vocab_size:
        raise SystemExit(f"error: {tokenizer_json} has {tokenizer.vocab_size} tokens, more than the model's "
                         f"{model.config.vocab_size} embedding rows")
    write_output(model, out, tokenizer_json, identity, source)

    c = model.config
    kind = ('released DiJiang' if found['released_dijiang'] else
            'linearized to DiJiang' if found['linearized'] else 'softmax (Pythia)')
    print(f"converted {source} -> {out}/ in {time.time() - t0:.1f} s")
    print(f"  {model.num_params():,} parameters, {kind}: {c.n_layer} layers, {c.n_head} heads, n_embd {c.n_embd}, "
          f"vocab {c.vocab_size}, {next(model.parameters()).dtype}")
    if found['decay_deviation'] is not None:
        gammas = torch.stack([layer.attn.decay for layer in model.layers])
        verdict = 'a geometric decay, gamma recovered' if found['decay_geometric'] else 'NOT a pure geometric decay: gamma fitted'
        print(f"  decay from D1/D2: {verdict} (max |log D - n log gamma| = {found['decay_deviation']:.3g}); "
              f"gamma {gammas.min():.5f} .. {gammas.max():.5f}")
    for name in sorted(os.listdir(out)):
        print(f"  {name:<16} {os.path.getsize(os.path.join(out, name)) / 1e6:10.3f} MB")
    if not tokenizer_json:  # after the conversion: a failed one says one thing, its error
        print(f"note: no tokenizer.json in {folder}: sample.py and data/prepare.py need one; copy Pythia's into {out}",
              file=sys.stderr)


if __name__ == '__main__':
    overrides = parse_settings(sys.argv[1:], SETTINGS, settings_help(__file__))
    try:
        main({**SETTINGS, **overrides})
    except OSError as e:  # a folder that cannot be written, a full disk: the output folder stays as it was
        raise SystemExit(f"error: {e.filename or 'convert.py'}: {e.strerror or e}: check the path and the free space")
    except KeyboardInterrupt as e:
        interrupted(str(e) or 'nothing was written; run the same command again')
