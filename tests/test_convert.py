"""convert.py: Hugging Face GPT-NeoX checkpoints in every on-disk form give the logits of transformers'
GPTNeoXForCausalLM; a checkpoint in the released DiJiang format gives the logits of a float64 evaluation
of the released code's formulas; downloads resume; bad input gets one clear message. No real network."""
import http.server
import json
import math
import os
import sys
import threading

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import convert  # noqa: E402
from dijiang import GPT, decay_schedule, projection_matrix  # noqa: E402

transformers = pytest.importorskip('transformers', reason='transformers is the reference (pip install transformers)')
safetensors_torch = pytest.importorskip('safetensors.torch', reason='pip install safetensors')
from conftest import PYTHIA_TOKENIZER as TOKENIZER_JSON  # noqa: E402

# small GPT-NeoX configs: partial and full rotary, parallel residual on and off, odd sizes
CONFIGS = {
    'pythia-like': dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, rotary_pct=0.25, use_parallel_residual=True),
    'full-rotary-serial': dict(vocab_size=101, hidden_size=24, num_hidden_layers=3, num_attention_heads=3,
                               intermediate_size=37, rotary_pct=1.0, use_parallel_residual=False),
    'odd': dict(vocab_size=77, hidden_size=80, num_hidden_layers=1, num_attention_heads=5,
                intermediate_size=59, rotary_pct=0.25, use_parallel_residual=False, rotary_emb_base=500.0),
}
# room for Pythia's tokenizer (50277 ids in 50304 rows), for the download test
HUB_CONFIG = dict(vocab_size=50304, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=64, rotary_pct=0.25, use_parallel_residual=True)
BLOCK = 32


def hf_model(name, seed=0):
    """A GPTNeoXForCausalLM with random weights everywhere (LayerNorms included), in eval mode."""
    torch.manual_seed(seed)
    cfg = dict(HUB_CONFIG if name == 'hub' else CONFIGS[name])
    cfg['rope_parameters'] = dict(rope_type='default', rope_theta=cfg.pop('rotary_emb_base', 10000.0),
                                  partial_rotary_factor=cfg.pop('rotary_pct'))
    model = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(max_position_embeddings=BLOCK, **cfg))
    with torch.no_grad():
        for pname, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if 'layernorm' in pname or 'layer_norm' in pname
                    else 0.15 * torch.randn_like(p))
    return model.eval()


def on_disk_state(model):
    """The state dict under the names checkpoints use: embed_out for the head, as every Pythia file."""
    return {('embed_out.weight' if k == 'lm_head.weight' else k): v.clone() for k, v in model.state_dict().items()}


def old_config(model):
    """config.json as the hub's Pythia checkpoints spell it: rotary_pct and rotary_emb_base."""
    cfg = model.config.to_dict()
    rope = cfg.pop('rope_parameters')
    return {**cfg, 'rotary_pct': rope['partial_rotary_factor'], 'rotary_emb_base': rope['rope_theta'], 'rope_scaling': None}


def write_checkpoint(folder, config, state, form):
    """Save state in one of the forms convert.py reads."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, 'config.json'), 'w') as f:
        json.dump(config, f)
    names = sorted(state)
    if form == 'safetensors':
        safetensors_torch.save_file(state, os.path.join(folder, 'model.safetensors'))
    elif form == 'bin':
        torch.save(state, os.path.join(folder, 'pytorch_model.bin'))
    else:  # sharded: two shards and an index
        ext = 'safetensors' if form == 'sharded-safetensors' else 'bin'
        halves = [names[:len(names) // 2], names[len(names) // 2:]]
        weight_map = {}
        for n, half in enumerate(halves, start=1):
            file = f'model-0000{n}-of-00002.{ext}'
            part = {k: state[k] for k in half}
            safetensors_torch.save_file(part, os.path.join(folder, file)) if ext == 'safetensors' else \
                torch.save(part, os.path.join(folder, file))
            weight_map.update(dict.fromkeys(half, file))
        index = 'model.safetensors.index.json' if ext == 'safetensors' else 'pytorch_model.bin.index.json'
        with open(os.path.join(folder, index), 'w') as f:
            json.dump(dict(metadata={}, weight_map=weight_map), f)


def run_convert(hf_dir, out_dir, **settings):
    convert.main({**convert.SETTINGS, 'hf_dir': str(hf_dir), 'out_dir': str(out_dir), **settings})
    return GPT.from_checkpoint(str(out_dir))


def assert_logits_close(ours, theirs, rel):
    error = (ours - theirs).abs().max().item()
    assert error <= rel * theirs.abs().max().item(), f'max error {error:.3g}, scale {theirs.abs().max().item():.3g}'

# -----------------------------------------------------------------------------
# Pythia: parity with transformers


@pytest.mark.parametrize('name', CONFIGS)
@pytest.mark.parametrize('form', ['transformers-5', 'bin'])
def test_softmax_logits_match_transformers(tmp_path, name, form):
    hf = hf_model(name)
    if form == 'transformers-5':  # save_pretrained: model.safetensors, and rope_parameters in config.json
        hf.save_pretrained(tmp_path / 'hf')
    else:  # an older-style checkpoint: pytorch_model.bin, rotary_pct, and the buffers it used to save
        state = on_disk_state(hf)
        for i in range(hf.config.num_hidden_layers):
            state[f'gpt_neox.layers.{i}.attention.bias'] = torch.ones(1, 1, BLOCK, BLOCK, dtype=torch.bool).tril()
            state[f'gpt_neox.layers.{i}.attention.masked_bias'] = torch.tensor(-1e9)
            state[f'gpt_neox.layers.{i}.attention.rotary_emb.inv_freq'] = torch.ones(2)
        write_checkpoint(tmp_path / 'hf', old_config(hf), state, 'bin')
    model = run_convert(tmp_path / 'hf', tmp_path / 'out')
    assert model.config.attention == 'softmax' and model.config.block_size == BLOCK
    idx = torch.randint(0, hf.config.vocab_size, (2, BLOCK), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_logits_close(model(idx)[0], hf(idx).logits, rel=1e-4)


@pytest.mark.parametrize('form', ['sharded-safetensors', 'sharded-bin'])
def test_sharded_checkpoints(tmp_path, form):
    hf = hf_model('pythia-like')
    write_checkpoint(tmp_path / 'hf', old_config(hf), on_disk_state(hf), form)
    model = run_convert(tmp_path / 'hf', tmp_path / 'out')
    idx = torch.randint(0, 96, (1, 16))
    with torch.no_grad():
        assert_logits_close(model(idx)[0], hf(idx).logits, rel=1e-4)


def test_lm_head_name_and_dtype(tmp_path, capsys):
    # transformers 5's in-memory name for the head is accepted too; --dtype casts the weights
    hf = hf_model('odd')
    state = {k: v.half() for k, v in hf.state_dict().items()}  # lm_head.weight, fp16 like the hub's files
    write_checkpoint(tmp_path / 'hf', old_config(hf), state, 'safetensors')
    model = run_convert(tmp_path / 'hf', tmp_path / 'out')
    assert model.lm_head.weight.dtype == torch.float16
    assert torch.equal(model.lm_head.weight, state['lm_head.weight'])
    model = run_convert(tmp_path / 'hf', tmp_path / 'out', dtype='float32')  # also replaces the earlier output
    assert model.lm_head.weight.dtype == torch.float32
    assert sorted(os.listdir(tmp_path)) == ['hf', 'out']  # no temporary folders left behind
    assert 'parameters, softmax (Pythia)' in capsys.readouterr().out

# -----------------------------------------------------------------------------
# Checkpoints in the released DiJiang format


def released_dijiang_state(hf, D1_noise=0.0):
    """hf's weights plus what the released DiJiang code adds per layer, drawn as it draws them (W_G,
    GroupNorm, P), then randomized so that carrying them over is tested; D1 = gamma^n, D2 = gamma^-n."""
    cfg = hf.config
    C, H = cfg.hidden_size, cfg.num_attention_heads
    D = C // H
    state = on_disk_state(hf)
    gamma = 1 - torch.exp(torch.linspace(math.log(1 / 32), math.log(1 / 512), H))
    powers = gamma.view(H, 1, 1) ** torch.arange(BLOCK).unsqueeze(1)  # (H, L, 1), as the released _get_D1
    for i in range(cfg.num_hidden_layers):
        prefix = f'gpt_neox.layers.{i}.attention.'
        state[prefix + 'W_G'] = 0.3 * torch.randn(C, C)
        state[prefix + 'group_norm.weight'] = 1 + 0.2 * torch.randn(C)
        state[prefix + 'group_norm.bias'] = 0.2 * torch.randn(C)
        state[prefix + 'proj_matrix'] = projection_matrix(D, 'mc', seed=100 + i)
        state[prefix + 'D1'] = (powers.float().unsqueeze(0) * torch.exp(D1_noise * torch.randn(1, H, BLOCK, 1)))
        state[prefix + 'D2'] = 1 / powers.float().unsqueeze(0)
    return state


def released_dijiang_logits(sd, cfg, idx):
    """The released DiJiang forward (modeling_gpt_neox.py) in float64, straight from the checkpoint's
    tensors: rotary, phi = softmax(x @ P), (phi(Q) D1)(phi(K) D2)^T masked, GroupNorm(head_size groups),
    times silu(x @ W_G), dense; GPT-NeoX residuals, final LayerNorm and embed_out."""
    g = {k: v.double() for k, v in sd.items()}
    C, H, L = cfg['hidden_size'], cfg['num_attention_heads'], cfg['num_hidden_layers']
    D, eps = C // H, cfg['layer_norm_eps']
    R = int(D * cfg['rotary_pct'])
    B, T = idx.shape
    inv_freq = 1.0 / cfg['rotary_emb_base'] ** (torch.arange(0, R, 2, dtype=torch.float64) / R)
    angles = torch.outer(torch.arange(T, dtype=torch.float64), inv_freq)
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()

    def rotary(x):  # (B, H, T, D): the first R dims, rotated as two halves
        x_rot, x_pass = x[..., :R], x[..., R:]
        rotated = torch.cat((-x_rot[..., R // 2:], x_rot[..., :R // 2]), -1)
        return torch.cat((x_rot * cos + rotated * sin, x_pass), -1)

    def linear(x, name, bias=True):
        return x @ g[name + '.weight'].T + (g[name + '.bias'] if bias else 0)

    def layer_norm(x, name):
        return F.layer_norm(x, (C,), g[name + '.weight'], g[name + '.bias'], eps)

    x = g['gpt_neox.embed_in.weight'][idx]
    for i in range(L):
        p = f'gpt_neox.layers.{i}.'
        h = layer_norm(x, p + 'input_layernorm')
        q, k, v = linear(h, p + 'attention.query_key_value').view(B, T, H, 3 * D).transpose(1, 2).split(D, -1)
        P = g[p + 'attention.proj_matrix']
        phi_q = torch.softmax(rotary(q) @ P, -1) * g[p + 'attention.D1'][:, :, :T]
        phi_k = torch.softmax(rotary(k) @ P, -1) * g[p + 'attention.D2'][:, :, :T]
        o = ((phi_q @ phi_k.transpose(-1, -2)).tril() @ v).transpose(1, 2).reshape(B * T, C)
        o = F.group_norm(o, D, g[p + 'attention.group_norm.weight'], g[p + 'attention.group_norm.bias'], 1e-5)
        attn = linear(o.view(B, T, C) * F.silu(h @ g[p + 'attention.W_G']), p + 'attention.dense')

        def mlp(y):
            return linear(F.gelu(linear(layer_norm(y, p + 'post_attention_layernorm'), p + 'mlp.dense_h_to_4h')),
                          p + 'mlp.dense_4h_to_h')
        x = x + attn + mlp(x) if cfg['use_parallel_residual'] else (x + attn) + mlp(x + attn)
    return layer_norm(x, 'gpt_neox.final_layer_norm') @ g['embed_out.weight'].T


@pytest.mark.parametrize('name,form', [('pythia-like', 'safetensors'), ('full-rotary-serial', 'bin')])
def test_released_dijiang_matches_float64_reference(tmp_path, capsys, name, form):
    hf = hf_model(name, seed=2)
    cfg = old_config(hf)
    state = released_dijiang_state(hf)
    write_checkpoint(tmp_path / 'hf', cfg, state, form)
    run_convert(tmp_path / 'hf', tmp_path / 'out')  # detected: no --attn needed
    assert 'released DiJiang' in capsys.readouterr().out
    idx = torch.randint(0, cfg['vocab_size'], (2, BLOCK), generator=torch.Generator().manual_seed(3))
    reference = released_dijiang_logits(state, cfg, idx)
    model = GPT.from_checkpoint(str(tmp_path / 'out'), chunk_size=8)  # several chunks
    assert model.config.attention == 'dijiang'
    layer = model.layers[0].attn
    assert torch.equal(layer.decay, decay_schedule(cfg['num_attention_heads']))  # gamma recovered exactly
    assert torch.equal(layer.gate.weight, state['gpt_neox.layers.0.attention.W_G'].T)
    assert torch.equal(layer.feature_proj, state['gpt_neox.layers.0.attention.proj_matrix'])
    with torch.no_grad():
        assert_logits_close(model(idx)[0].double(), reference, rel=1e-4)
        assert_logits_close(model.double()(idx)[0], reference, rel=1e-6)  # the same math, to fp32's gamma and P


def test_released_dijiang_trained_decay_is_fitted(tmp_path, capsys):
    # D1 moved off gamma^n by training: gamma is fitted, the fit error printed, never silently
    hf = hf_model('pythia-like', seed=4)
    state = released_dijiang_state(hf, D1_noise=0.01)
    write_checkpoint(tmp_path / 'hf', old_config(hf), state, 'safetensors')
    model = run_convert(tmp_path / 'hf', tmp_path / 'out', attn='dijiang')
    out = capsys.readouterr().out
    assert 'NOT a pure geometric decay' in out
    deviation = float(out.split('max |log D - n log gamma| = ')[1].split(')')[0])
    assert 0.01 < deviation < 0.1  # noise of 1% over 32 positions: about 3 sigma at the worst
    assert torch.allclose(model.layers[0].attn.decay, decay_schedule(4), rtol=1e-3)


def test_recover_decay_from_fp16_and_overflow():
    # the released D1 / D2 over 2048 positions in fp16: D2 overflows to inf, D1 underflows to 0 or
    # subnormals; gamma still comes back to fp16's precision and the decay counts as geometric
    gamma = decay_schedule(8)
    powers = (gamma.view(8, 1, 1) ** torch.arange(2048).unsqueeze(1)).float().unsqueeze(0)
    D1, D2 = powers.half(), (1 / powers).half()
    assert torch.isinf(D2).any() and (D1 == 0).any()
    recovered, deviation = convert.recover_decay(D1, D2)
    assert torch.allclose(recovered, gamma, rtol=1e-6, atol=0)
    assert deviation <= 4 * torch.finfo(torch.float16).eps
    recovered, deviation = convert.recover_decay(powers, 1 / powers)  # fp32, as the released init
    assert torch.equal(recovered, gamma) and deviation < 1e-6


def test_linearize_pythia(tmp_path):
    # --attn=dijiang on Pythia keeps every pretrained weight; W_G, GroupNorm and gamma start as released, P by QMC
    hf = hf_model('pythia-like')
    hf.save_pretrained(tmp_path / 'hf')
    model = run_convert(tmp_path / 'hf', tmp_path / 'out', attn='dijiang', seed=5, feature_seed=7)
    sd = hf.state_dict()
    for i, block in enumerate(model.layers):
        assert torch.equal(block.attn.qkv.weight, sd[f'gpt_neox.layers.{i}.attention.query_key_value.weight'])
        assert torch.equal(block.attn.feature_proj, projection_matrix(8, 'qmc', seed=7 + i))
        assert torch.equal(block.attn.decay, decay_schedule(4))
        assert torch.equal(block.attn.group_norm.weight, torch.ones(32))
        bound = 2 ** -2.5 * math.sqrt(6 / 64)  # xavier-uniform with gain 2^-2.5
        assert 0.5 * bound < block.attn.gate.weight.abs().max() <= bound
    assert torch.equal(model.lm_head.weight, sd['lm_head.weight'])
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 96, (1, 16)))[0]).all()

    # seed draws W_G and feature_seed draws P, each alone
    for name, settings, same_gate, same_proj in (('feature_seed', dict(seed=5, feature_seed=8), True, False),
                                                  ('seed', dict(seed=6, feature_seed=7), False, True)):
        other = run_convert(tmp_path / 'hf', tmp_path / f'out-{name}', attn='dijiang', **settings)
        for block, other_block in zip(model.layers, other.layers):
            assert torch.equal(block.attn.gate.weight, other_block.attn.gate.weight) == same_gate, name
            assert torch.equal(block.attn.feature_proj, other_block.attn.feature_proj) == same_proj, name

# -----------------------------------------------------------------------------
# Downloads: a local stand-in for the hub that serves byte ranges and 404s


@pytest.fixture
def hub(tmp_path):
    files, ranges = tmp_path / 'hub', []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            path = files / self.path.split('/resolve/main/')[-1]
            if '/EleutherAI/pythia-70m/resolve/main/' not in self.path or not path.is_file():
                self.send_error(404)
                return
            data, start = path.read_bytes(), 0
            if self.headers.get('Range'):
                start = int(self.headers['Range'].removeprefix('bytes=').rstrip('-'))
                ranges.append(start)
                self.send_response(206)
                self.send_header('Content-Range', f'bytes {start}-{len(data) - 1}/{len(data)}')
            else:
                self.send_response(200)
            self.send_header('Content-Length', str(len(data) - start))
            self.end_headers()
            self.wfile.write(data[start:])

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield files, f'http://127.0.0.1:{server.server_port}', ranges
    server.shutdown()


@pytest.mark.parametrize('have_tokenizer', [False, True])
def test_download_resumes_and_converts(tmp_path, hub, have_tokenizer):
    if have_tokenizer and not os.path.isfile(TOKENIZER_JSON):
        pytest.skip(f"needs Pythia's tokenizer at {TOKENIZER_JSON}")
    files, url, ranges = hub
    hf = hf_model('hub')
    write_checkpoint(files, old_config(hf), on_disk_state(hf), 'bin')  # no model.safetensors: a 404 first
    if have_tokenizer:
        (files / 'tokenizer.json').write_bytes(open(TOKENIZER_JSON, 'rb').read())
    cache = tmp_path / 'cache' / 'EleutherAI' / 'pythia-70m' / 'main'
    cache.mkdir(parents=True)
    weights = (files / 'pytorch_model.bin').read_bytes()
    (cache / 'pytorch_model.bin.partial').write_bytes(weights[:100_000])  # an interrupted download
    settings = dict(model='pythia-70m', cache_dir=str(tmp_path / 'cache'), hub_url=url)
    model = run_convert('', tmp_path / 'out', **settings)
    assert ranges == [100_000] and (cache / 'pytorch_model.bin').read_bytes() == weights
    assert not (cache / 'pytorch_model.bin.partial').exists()
    with torch.no_grad():
        idx = torch.randint(0, 50304, (1, 8))
        assert_logits_close(model(idx)[0], hf(idx).logits, rel=1e-4)
    ckpt = torch.load(tmp_path / 'out' / 'ckpt.pt', weights_only=True)
    assert ckpt['source'] == 'EleutherAI/pythia-70m@main'
    assert ckpt.get('tokenizer') == ('pythia-f6114ad7fefe2060' if have_tokenizer else None)
    assert (tmp_path / 'out' / 'tokenizer.json').exists() == have_tokenizer
    # everything is cached now, and so are the hub's 404s: a second run needs no server
    assert (cache / 'model.safetensors.absent').exists() and (cache / 'tokenizer.json.absent').exists() != have_tokenizer
    run_convert('', tmp_path / 'out2', **{**settings, 'hub_url': 'http://127.0.0.1:9'})


def test_offline_download_is_one_clear_line(tmp_path):
    settings = dict(convert.SETTINGS, model='pythia-70m', cache_dir=str(tmp_path), hub_url='http://127.0.0.1:9')
    with pytest.raises(SystemExit, match=r'^error: cannot reach http://127\.0\.0\.1:9/EleutherAI/pythia-70m/resolve/main/'
                                         r'config\.json \(.*\): check the network'):
        convert.main(settings)

# -----------------------------------------------------------------------------
# Bad input


@pytest.fixture
def checkpoint(tmp_path):
    """(folder, config, state) of a small Pythia checkpoint, to be spoiled by each test."""
    hf = hf_model('pythia-like')
    return tmp_path / 'hf', old_config(hf), on_disk_state(hf)


def convert_error(folder, **settings):
    with pytest.raises(SystemExit) as e:
        convert.main({**convert.SETTINGS, 'hf_dir': str(folder), 'out_dir': str(folder) + '-out', **settings})
    message = str(e.value)
    assert message.startswith('error: ') and '\n' not in message
    return message


def test_missing_dir_and_config(tmp_path):
    assert 'is not a directory' in convert_error(tmp_path / 'nowhere')
    (tmp_path / 'empty').mkdir()
    assert 'no config.json in' in convert_error(tmp_path / 'empty')
    assert 'pass either --hf_dir=DIR' in convert_error('')


def test_no_weights(checkpoint):
    folder, config, state = checkpoint
    write_checkpoint(folder, config, state, 'bin')
    os.remove(folder / 'pytorch_model.bin')
    assert 'no weights in' in convert_error(folder)


def test_unknown_key(checkpoint):
    folder, config, state = checkpoint
    state['gpt_neox.layers.1.attention.rotary_scale'] = torch.ones(3)
    write_checkpoint(folder, config, state, 'safetensors')
    assert 'unknown key gpt_neox.layers.1.attention.rotary_scale in' in convert_error(folder)


def test_missing_key(checkpoint):
    folder, config, state = checkpoint
    del state['gpt_neox.layers.1.mlp.dense_4h_to_h.bias']
    write_checkpoint(folder, config, state, 'bin')
    assert 'missing key gpt_neox.layers.1.mlp.dense_4h_to_h.bias in' in convert_error(folder)


def test_shape_mismatch(checkpoint):
    folder, config, state = checkpoint
    state['gpt_neox.layers.0.attention.dense.weight'] = torch.zeros(32, 31)
    write_checkpoint(folder, config, state, 'safetensors')
    assert 'gpt_neox.layers.0.attention.dense.weight has shape (32, 31)' in convert_error(folder)
    config['vocab_size'] = 100  # the config disagrees with the weights
    write_checkpoint(folder, config, on_disk_state(hf_model('pythia-like')), 'safetensors')
    assert 'gpt_neox.embed_in.weight has shape (96, 32)' in convert_error(folder)


def test_unsupported_config(checkpoint):
    folder, config, state = checkpoint
    write_checkpoint(folder, {**config, 'hidden_act': 'gelu_new'}, state, 'safetensors')
    assert "hidden_act='gelu_new'" in convert_error(folder)
    write_checkpoint(folder, {k: v for k, v in config.items() if k != 'num_attention_heads'}, state, 'safetensors')
    assert "has no 'num_attention_heads'" in convert_error(folder)


def test_released_dijiang_errors(tmp_path):
    hf = hf_model('pythia-like')
    state = released_dijiang_state(hf)
    write_checkpoint(tmp_path / 'a', old_config(hf), state, 'safetensors')
    assert 'is a DiJiang checkpoint' in convert_error(tmp_path / 'a', attn='softmax')
    del state['gpt_neox.layers.1.attention.D2']
    write_checkpoint(tmp_path / 'b', old_config(hf), state, 'safetensors')
    assert 'missing key gpt_neox.layers.1.attention.D2' in convert_error(tmp_path / 'b')


def test_bad_settings(checkpoint, tmp_path):
    folder, config, state = checkpoint
    write_checkpoint(folder, config, state, 'safetensors')
    assert "--attn=linear" in convert_error(folder, attn='linear')
    assert "--dtype=int8" in convert_error(folder, dtype='int8')
    assert 'choose one of pythia-70m' in convert_error('', model='gpt2')
    (tmp_path / 'precious').mkdir()
    (tmp_path / 'precious' / 'notes.txt').write_text('keep me')
    assert 'holds no ckpt.pt' in convert_error(folder, out_dir=str(tmp_path / 'precious'))
    assert (tmp_path / 'precious' / 'notes.txt').read_text() == 'keep me'
    # a build folder left beside the output holding a file convert.py did not write: kept, and named
    (tmp_path / 'out.tmp').mkdir()
    (tmp_path / 'out.tmp' / 'mine.txt').write_text('keep me too')
    assert 'out.tmp, where convert.py writes before renaming into place, holds mine.txt' in \
        convert_error(folder, out_dir=str(tmp_path / 'out'))
    assert (tmp_path / 'out.tmp' / 'mine.txt').read_text() == 'keep me too'
