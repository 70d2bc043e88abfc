"""convert.py: Hugging Face GPT-NeoX, LLaMA and Mistral checkpoints in every on-disk form give the logits of
transformers; a GGUF file gives the weights and the tokenizer that transformers' GGUF loader gives; a checkpoint
in the released DiJiang format gives the logits of a float64 evaluation of the released code's formulas;
downloads come from the Hugging Face cache, offline. No network: everything is written in tmp_path."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import PYTHIA_TOKENIZER as TOKENIZER_JSON, REPO, assert_one_error_line, run_script
from dijiang import GPT, decay_schedule, projection_matrix
from hf_checkpoint import recover_decay
from tokenizer import Tokenizer, gpt2_byte_to_unicode

transformers = pytest.importorskip('transformers', reason='transformers is the reference (pip install transformers)')
safetensors_torch = pytest.importorskip('safetensors.torch', reason='pip install safetensors')

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
# small LLaMA configs: grouped-query and multi-head attention, tied and untied heads, odd sizes
LLAMA_CONFIGS = {
    'gqa-tied': dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                     intermediate_size=80, tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=5000.0),
    'gqa-untied': dict(vocab_size=101, hidden_size=48, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=3,
                       intermediate_size=72, tie_word_embeddings=False, rms_norm_eps=1e-6, rope_theta=10000.0),
    'mha-untied': dict(vocab_size=77, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
                       intermediate_size=37, tie_word_embeddings=False, rms_norm_eps=1e-5, rope_theta=500.0),
}
BLOCK = 32


def randomized(model):
    """model with random weights everywhere (norms around 1), in eval mode."""
    with torch.no_grad():
        for pname, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if 'norm' in pname else 0.15 * torch.randn_like(p))
    return model.eval()


def hf_model(name, seed=0):
    """A GPTNeoXForCausalLM with random weights."""
    torch.manual_seed(seed)
    cfg = dict(HUB_CONFIG if name == 'hub' else CONFIGS[name])
    cfg['rope_parameters'] = dict(rope_type='default', rope_theta=cfg.pop('rotary_emb_base', 10000.0),
                                  partial_rotary_factor=cfg.pop('rotary_pct'))
    return randomized(transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(max_position_embeddings=BLOCK, **cfg)))


def hf_llama(name, family='llama', seed=0, **overrides):
    """A LlamaForCausalLM (or MistralForCausalLM, without a sliding window) with random weights."""
    torch.manual_seed(seed)
    cfg = dict(LLAMA_CONFIGS[name], **overrides)
    cfg['rope_parameters'] = dict(rope_type='default', rope_theta=cfg.pop('rope_theta'))
    if family == 'mistral':
        return randomized(transformers.MistralForCausalLM(transformers.MistralConfig(
            max_position_embeddings=BLOCK, sliding_window=None, **cfg)))
    return randomized(transformers.LlamaForCausalLM(transformers.LlamaConfig(max_position_embeddings=BLOCK, **cfg)))


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


def run_convert(capsys, *args):
    """convert.py in this process; returns its stdout, after asserting it succeeded."""
    status, out, err = run_script(capsys, 'convert.py', *args)
    assert status == 0 and 'Traceback' not in err, err
    return out


def converted(capsys, hf_dir, out_dir, *args):
    run_convert(capsys, f'--hf_dir={hf_dir}', f'--out_dir={out_dir}', *args)
    return GPT.from_checkpoint(str(out_dir))


def max_rel_error(ours, theirs):
    """The largest logit error, relative to the largest logit."""
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()

# -----------------------------------------------------------------------------
# GPT-NeoX (Pythia): parity with transformers


@pytest.mark.parametrize('name', CONFIGS)
@pytest.mark.parametrize('form', ['transformers-5', 'bin'])
def test_softmax_logits_match_transformers(tmp_path, capsys, name, form):
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
    model = converted(capsys, tmp_path / 'hf', tmp_path / 'out')
    assert model.config.attention == 'softmax' and model.config.block_size == BLOCK
    idx = torch.randint(0, hf.config.vocab_size, (2, BLOCK), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert max_rel_error(model(idx)[0], hf(idx).logits) <= 1e-4


@pytest.mark.parametrize('form', ['sharded-safetensors', 'sharded-bin'])
def test_sharded_checkpoints(tmp_path, capsys, form):
    hf = hf_model('pythia-like')
    write_checkpoint(tmp_path / 'hf', old_config(hf), on_disk_state(hf), form)
    model = converted(capsys, tmp_path / 'hf', tmp_path / 'out')
    idx = torch.randint(0, 96, (1, 16))
    with torch.no_grad():
        assert max_rel_error(model(idx)[0], hf(idx).logits) <= 1e-4


def test_lm_head_name_and_dtype(tmp_path, capsys):
    # transformers 5's in-memory name for the head is accepted too; --dtype casts the weights
    hf = hf_model('odd')
    state = {k: v.half() for k, v in hf.state_dict().items()}  # lm_head.weight, fp16 like the hub's files
    write_checkpoint(tmp_path / 'hf', old_config(hf), state, 'safetensors')
    model = converted(capsys, tmp_path / 'hf', tmp_path / 'out')
    assert model.lm_head.weight.dtype == torch.float16
    assert torch.equal(model.lm_head.weight, state['lm_head.weight'])
    out = run_convert(capsys, f"--hf_dir={tmp_path / 'hf'}", f"--out_dir={tmp_path / 'out'}", '--dtype=float32')
    assert GPT.from_checkpoint(str(tmp_path / 'out')).lm_head.weight.dtype == torch.float32  # the earlier output replaced
    assert sorted(os.listdir(tmp_path)) == ['hf', 'out']  # no temporary folders left behind
    assert sorted(os.listdir(tmp_path / 'out')) == ['ckpt.pt', 'config.json', 'convert.json']
    assert 'parameters, softmax (Pythia)' in out
    manifest = json.loads((tmp_path / 'out' / 'convert.json').read_text())
    assert manifest['source'] == str(tmp_path / 'hf') and manifest['settings']['dtype'] == 'float32'

# -----------------------------------------------------------------------------
# LLaMA and Mistral: parity with transformers


@pytest.mark.parametrize('name', LLAMA_CONFIGS)
@pytest.mark.parametrize('form', ['safetensors', 'sharded'])
def test_llama_logits_match_transformers(tmp_path, capsys, name, form):
    hf = hf_llama(name)
    hf.save_pretrained(tmp_path / 'hf', max_shard_size='40KB' if form == 'sharded' else '5GB')
    assert os.path.exists(tmp_path / 'hf' / ('model.safetensors.index.json' if form == 'sharded' else 'model.safetensors'))
    model = converted(capsys, tmp_path / 'hf', tmp_path / 'out')
    c = model.config
    assert (c.norm, c.mlp, c.bias, c.parallel_residual, c.rotary_pct) == ('rmsnorm', 'swiglu', False, False, 1.0)
    assert (c.n_kv_head, c.tie_embeddings) == (hf.config.num_key_value_heads, hf.config.tie_word_embeddings)
    assert (model.lm_head.weight is model.embed.weight) == hf.config.tie_word_embeddings
    idx = torch.randint(0, hf.config.vocab_size, (2, BLOCK), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert max_rel_error(model(idx)[0], hf(idx).logits) <= 1e-4


def test_mistral_without_a_sliding_window_matches_transformers(tmp_path, capsys):
    hf = hf_llama('gqa-untied', family='mistral')
    hf.save_pretrained(tmp_path / 'hf')
    model = converted(capsys, tmp_path / 'hf', tmp_path / 'out')
    idx = torch.randint(0, hf.config.vocab_size, (2, BLOCK), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert max_rel_error(model(idx)[0], hf(idx).logits) <= 1e-4


def test_linearize_llama(tmp_path, capsys):
    # --attn=dijiang on a grouped-query LLaMA: every pretrained weight kept, W_G, GroupNorm and P fresh,
    # and the model's forms agree
    hf = hf_llama('gqa-tied')
    hf.save_pretrained(tmp_path / 'hf')
    softmax = converted(capsys, tmp_path / 'hf', tmp_path / 'softmax')
    out = run_convert(capsys, f"--hf_dir={tmp_path / 'hf'}", f"--out_dir={tmp_path / 'out'}", '--attn=dijiang',
                      '--feature_seed=3')
    assert 'linearized to DiJiang: 2 layers, 8 heads (2 key/value)' in out
    model = GPT.from_checkpoint(str(tmp_path / 'out'))
    assert model.config.attention == 'dijiang' and model.config.n_kv_head == 2
    for i, (block, pretrained) in enumerate(zip(model.layers, softmax.layers)):
        for name, weight in pretrained.state_dict().items():
            assert torch.equal(block.state_dict()[name], weight), name
        assert torch.equal(block.attn.feature_proj, projection_matrix(8, 'qmc', seed=3 + i))
        assert torch.equal(block.attn.decay, decay_schedule(8))  # each query head its own decay
    idx = torch.randint(0, 96, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        chunk = model.set_form('chunk')(idx)[0]
        for form in ('parallel', 'recurrent'):
            assert max_rel_error(model.set_form(form)(idx)[0], chunk) < 1e-5


def test_llama_q_k_v_are_fused_per_key_value_head(tmp_path, capsys):
    # our qkv rows, per key/value head: its group's query heads, then its key head, then its value head
    hf = hf_llama('gqa-untied')
    hf.save_pretrained(tmp_path / 'hf')
    model = converted(capsys, tmp_path / 'hf', tmp_path / 'out')
    sd = hf.state_dict()
    D, group = 8, 2
    rows = model.layers[1].attn.qkv.weight.view(3, group + 2, D, 48)  # (H_kv, group + 2, D, C)
    q, k, v = (sd[f'model.layers.1.self_attn.{x}_proj.weight'].view(-1, D, 48) for x in 'qkv')
    assert torch.equal(rows[:, :group].reshape(6, D, 48), q)
    assert torch.equal(rows[:, group], k) and torch.equal(rows[:, group + 1], v)

# -----------------------------------------------------------------------------
# GGUF: a small file written here, against transformers' GGUF loader


def permute(w, n_head):
    """llama.cpp's convert_hf_to_gguf.py: the rows of each head from two halves to neighbouring pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def small_vocab():
    """A byte-level BPE vocab and its merges, trained here, with three special tokens and without the
    tokens of bytes 0x04 and 0xF1 (as SmolLM2 has none for them): (tokens in id order, merges)."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=['<|endoftext|>', '<|im_start|>', '<|im_end|>'],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = open(os.path.join(REPO, 'README.md'), encoding='utf-8').read()[:20000]
    tok.train_from_iterator([text, "The capital of France is Paris. def fibonacci(n):\n    return n"], trainer)
    model = json.loads(tok.to_str())['model']
    dropped = {gpt2_byte_to_unicode()[b] for b in (0x04, 0xF1)}
    tokens = [t for t, _ in sorted(model['vocab'].items(), key=lambda kv: kv[1]) if t not in dropped]
    merges = [m if isinstance(m, str) else ' '.join(m) for m in model['merges']]
    assert not any(set(m.split(' ')) & dropped for m in merges)
    return tokens, merges


def write_gguf(path, hf, tokens, merges):
    """hf (a LlamaForCausalLM) as llama.cpp writes it: llama metadata, the tokenizer, q and k rows
    permuted, F32 norms and a mix of F16, Q8_0 and Q4_1 matrices."""
    import gguf
    Q = gguf.GGMLQuantizationType
    c, sd = hf.config, {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}
    w = gguf.GGUFWriter(str(path), 'llama')
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters['rope_theta'])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_tokenizer_model('gpt2')
    w.add_tokenizer_pre('gpt2')
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types([3 if t.startswith('<|') else 1 for t in tokens])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)

    def add(name, array, qtype):
        if qtype == Q.F32:
            w.add_tensor(name, array)
        elif qtype == Q.F16:
            w.add_tensor(name, array.astype('float16'))
        else:
            w.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    add('token_embd.weight', sd['model.embed_tokens.weight'], Q.Q8_0)
    add('output_norm.weight', sd['model.norm.weight'], Q.F32)
    add('output.weight', sd['lm_head.weight'], Q.Q4_1)
    for i in range(c.num_hidden_layers):
        p = f'model.layers.{i}.'
        add(f'blk.{i}.attn_norm.weight', sd[p + 'input_layernorm.weight'], Q.F32)
        add(f'blk.{i}.ffn_norm.weight', sd[p + 'post_attention_layernorm.weight'], Q.F32)
        add(f'blk.{i}.attn_q.weight', permute(sd[p + 'self_attn.q_proj.weight'], c.num_attention_heads), Q.Q4_1)
        add(f'blk.{i}.attn_k.weight', permute(sd[p + 'self_attn.k_proj.weight'], c.num_key_value_heads), Q.Q8_0)
        add(f'blk.{i}.attn_v.weight', sd[p + 'self_attn.v_proj.weight'], Q.Q4_1)
        add(f'blk.{i}.attn_output.weight', sd[p + 'self_attn.o_proj.weight'], Q.F16)
        add(f'blk.{i}.ffn_gate.weight', sd[p + 'mlp.gate_proj.weight'], Q.Q4_1)
        add(f'blk.{i}.ffn_up.weight', sd[p + 'mlp.up_proj.weight'], Q.F32)
        add(f'blk.{i}.ffn_down.weight', sd[p + 'mlp.down_proj.weight'], Q.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope='module')
def small_gguf(tmp_path_factory):
    """(folder, file name, transformers' model and tokenizer from that file), GQA 8 query / 2 key-value heads."""
    pytest.importorskip('gguf', reason='pip install gguf')
    tokens, merges = small_vocab()
    folder = tmp_path_factory.mktemp('gguf')
    hf = hf_llama('gqa-tied', vocab_size=len(tokens), tie_word_embeddings=False, hidden_size=64, intermediate_size=96)
    write_gguf(folder / 'small.gguf', hf, tokens, merges)
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(folder), gguf_file='small.gguf', dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), gguf_file='small.gguf')
    return folder, 'small.gguf', reference.eval(), tokenizer


def test_gguf_converts_to_the_weights_transformers_loads(small_gguf, tmp_path, capsys):
    folder, name, reference, _ = small_gguf
    out = run_convert(capsys, f'--gguf={folder / name}', f"--out_dir={tmp_path / 'out'}")
    assert 'softmax (LLaMA): 2 layers, 8 heads (2 key/value)' in out
    model = GPT.from_checkpoint(str(tmp_path / 'out'))
    sd, D = reference.state_dict(), 8
    for i, block in enumerate(model.layers):
        p = f'model.layers.{i}.'
        rows = block.attn.qkv.weight.view(2, 4 + 2, D, 64)  # per key/value head: 4 query heads, k, v
        assert torch.equal(rows[:, :4].reshape(64, 64), sd[p + 'self_attn.q_proj.weight'])
        assert torch.equal(rows[:, 4].reshape(16, 64), sd[p + 'self_attn.k_proj.weight'])
        assert torch.equal(rows[:, 5].reshape(16, 64), sd[p + 'self_attn.v_proj.weight'])
        for ours, theirs in ((block.attn.proj, 'self_attn.o_proj'), (block.mlp.gate, 'mlp.gate_proj'),
                             (block.mlp.up, 'mlp.up_proj'), (block.mlp.down, 'mlp.down_proj'),
                             (block.ln_attn, 'input_layernorm'), (block.ln_mlp, 'post_attention_layernorm')):
            assert torch.equal(ours.weight, sd[p + theirs + '.weight']), theirs
    for ours, theirs in ((model.embed, 'model.embed_tokens'), (model.ln_f, 'model.norm'), (model.lm_head, 'lm_head')):
        assert torch.equal(ours.weight, sd[theirs + '.weight']), theirs
    assert model.config.norm_eps == reference.config.rms_norm_eps and model.config.rotary_base == 5000.0
    idx = torch.randint(0, model.config.vocab_size, (2, BLOCK), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert max_rel_error(model(idx)[0], reference(idx).logits) <= 1e-5


def test_gguf_tokenizer_is_id_exact_with_transformers(small_gguf, tmp_path, capsys):
    from test_tokenizer import VARIED
    folder, name, _, reference = small_gguf
    run_convert(capsys, f'--gguf={folder / name}', f"--out_dir={tmp_path / 'out'}")
    tok = Tokenizer.from_dir(tmp_path / 'out')  # the tokenizer.json convert.py wrote
    texts = [*VARIED.values(), 'a\x04b ..\x04.. x\U00040000y \x04<|im_start|>\x04', 'The capital of France is Paris.']
    for text in texts:
        ids = tok.encode(text)
        assert ids == reference(text)['input_ids'], text  # no BOS: the file says add_bos_token false
        assert tok.decode(ids) == reference.decode(ids)
    ids = tok.encode('<|im_start|>user\nHi<|im_end|>')
    assert (ids[0], ids[-1], tok.eot_token) == (1, 2, 0)

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
    out = run_convert(capsys, f"--hf_dir={tmp_path / 'hf'}", f"--out_dir={tmp_path / 'out'}")  # detected: no --attn needed
    assert 'released DiJiang' in out
    idx = torch.randint(0, cfg['vocab_size'], (2, BLOCK), generator=torch.Generator().manual_seed(3))
    reference = released_dijiang_logits(state, cfg, idx)
    model = GPT.from_checkpoint(str(tmp_path / 'out'), chunk_size=8)  # several chunks
    assert model.config.attention == 'dijiang'
    layer = model.layers[0].attn
    assert torch.equal(layer.decay, decay_schedule(cfg['num_attention_heads']))  # gamma recovered exactly
    assert torch.equal(layer.gate.weight, state['gpt_neox.layers.0.attention.W_G'].T)
    assert torch.equal(layer.feature_proj, state['gpt_neox.layers.0.attention.proj_matrix'])
    with torch.no_grad():
        assert max_rel_error(model(idx)[0].double(), reference) <= 1e-4
        assert max_rel_error(model.double()(idx)[0], reference) <= 1e-6  # the same math, to fp32's gamma and P


def test_released_dijiang_trained_decay_is_fitted(tmp_path, capsys):
    # D1 moved off gamma^n by training: gamma is fitted, the fit error printed, never silently
    hf = hf_model('pythia-like', seed=4)
    write_checkpoint(tmp_path / 'hf', old_config(hf), released_dijiang_state(hf, D1_noise=0.01), 'safetensors')
    out = run_convert(capsys, f"--hf_dir={tmp_path / 'hf'}", f"--out_dir={tmp_path / 'out'}", '--attn=dijiang')
    assert 'NOT a pure geometric decay' in out
    deviation = float(out.split('max |log D - n log gamma| = ')[1].split(')')[0])
    assert 0.01 < deviation < 0.1  # noise of 1% over 32 positions: about 3 sigma at the worst
    assert torch.allclose(GPT.from_checkpoint(str(tmp_path / 'out')).layers[0].attn.decay, decay_schedule(4), rtol=1e-3)


def test_recover_decay_from_fp16_and_overflow():
    # the released D1 / D2 over 2048 positions in fp16: D2 overflows to inf, D1 underflows to 0 or
    # subnormals; gamma still comes back to fp16's precision and the decay counts as geometric
    gamma = decay_schedule(8)
    powers = (gamma.view(8, 1, 1) ** torch.arange(2048).unsqueeze(1)).float().unsqueeze(0)
    D1, D2 = powers.half(), (1 / powers).half()
    assert torch.isinf(D2).any() and (D1 == 0).any()
    recovered, deviation = recover_decay(D1, D2)
    assert torch.allclose(recovered, gamma, rtol=1e-6, atol=0)
    assert deviation <= 4 * torch.finfo(torch.float16).eps
    recovered, deviation = recover_decay(powers, 1 / powers)  # fp32, as the released init
    assert torch.equal(recovered, gamma) and deviation < 1e-6


def test_linearize_pythia(tmp_path, capsys):
    # --attn=dijiang on Pythia keeps every pretrained weight; W_G, GroupNorm and gamma start as released, P by QMC
    hf = hf_model('pythia-like')
    hf.save_pretrained(tmp_path / 'hf')
    model = converted(capsys, tmp_path / 'hf', tmp_path / 'out', '--attn=dijiang', '--seed=5', '--feature_seed=7')
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
    for name, settings, same_gate, same_proj in (('feature_seed', ['--seed=5', '--feature_seed=8'], True, False),
                                                  ('seed', ['--seed=6', '--feature_seed=7'], False, True)):
        other = converted(capsys, tmp_path / 'hf', tmp_path / f'out-{name}', '--attn=dijiang', *settings)
        for block, other_block in zip(model.layers, other.layers):
            assert torch.equal(block.attn.gate.weight, other_block.attn.gate.weight) == same_gate, name
            assert torch.equal(block.attn.feature_proj, other_block.attn.feature_proj) == same_proj, name

# -----------------------------------------------------------------------------
# Downloads: from a Hugging Face cache written here, offline


def fill_cache(hub, repo, files, commit='0123456789abcdef0123456789abcdef01234567', ref='main'):
    """The standard cache layout for repo at commit: the files under snapshots/COMMIT/, refs/REF naming it."""
    folder = hub / f"models--{repo.replace('/', '--')}"
    (folder / 'snapshots' / commit).mkdir(parents=True)
    (folder / 'refs').mkdir()
    (folder / 'refs' / ref).write_text(commit)
    for name, data in files.items():
        (folder / 'snapshots' / commit / name).write_bytes(data)


def test_download_reads_the_hugging_face_cache_offline(tmp_path):
    hf = hf_model('hub')
    write_checkpoint(tmp_path / 'hf', old_config(hf), on_disk_state(hf), 'safetensors')
    files = {name: (tmp_path / 'hf' / name).read_bytes() for name in ('config.json', 'model.safetensors')}
    files['tokenizer.json'] = open(TOKENIZER_JSON, 'rb').read()
    fill_cache(tmp_path / 'home' / 'hub', 'EleutherAI/pythia-70m', files)
    env = {**os.environ, 'HF_HOME': str(tmp_path / 'home'), 'HF_HUB_OFFLINE': '1', 'OMP_NUM_THREADS': '1'}
    result = subprocess.run([sys.executable, 'convert.py', '--model=pythia-70m', f"--out_dir={tmp_path / 'out'}"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"converted EleutherAI/pythia-70m@main -> {tmp_path / 'out'}/")
    model = GPT.from_checkpoint(str(tmp_path / 'out'))
    with torch.no_grad():
        idx = torch.randint(0, 50304, (1, 8))
        assert max_rel_error(model(idx)[0], hf(idx).logits) <= 1e-4
    ckpt = torch.load(tmp_path / 'out' / 'ckpt.pt', weights_only=True)
    assert ckpt['source'] == 'EleutherAI/pythia-70m@main' and ckpt['tokenizer'] == 'pythia-f6114ad7fefe2060'

    # offline with an empty cache: one line, and no folder made anywhere
    env['HF_HOME'] = str(tmp_path / 'empty')
    result = subprocess.run([sys.executable, 'convert.py', '--model=pythia-70m', f"--out_dir={tmp_path / 'out2'}"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert_one_error_line(result.returncode, result.stdout, result.stderr, 'error: EleutherAI/pythia-70m@main: not in the '
                          f"Hugging Face cache ({tmp_path / 'empty' / 'hub'})", 'HF_HUB_OFFLINE is set', '--hf_dir=DIR')
    assert sorted(os.listdir(tmp_path)) == ['hf', 'home', 'out']


def test_download_of_any_hub_model_at_a_revision(tmp_path, capsys, monkeypatch):
    # --hf_repo takes any model id; --revision a commit; .bin weights when the snapshot has no safetensors
    huggingface_hub = pytest.importorskip('huggingface_hub')
    monkeypatch.chdir(tmp_path)  # the default out_dir lands here
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)  # what HF_HUB_OFFLINE=1 sets on import
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(tmp_path / 'hub'))
    hf = hf_llama('gqa-untied')
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    write_checkpoint(tmp_path / 'hf', hf.config.to_dict(), state, 'bin')
    commit = 'fedcba9876543210fedcba9876543210fedcba98'
    fill_cache(tmp_path / 'hub', 'SomeOrg/tiny-llama', {n: (tmp_path / 'hf' / n).read_bytes()
                                                        for n in ('config.json', 'pytorch_model.bin')}, commit=commit)
    out = run_convert(capsys, '--hf_repo=SomeOrg/tiny-llama', f'--revision={commit}')
    assert out.startswith(f'converted SomeOrg/tiny-llama@{commit} -> out-tiny-llama/')  # the default out_dir
    model = GPT.from_checkpoint(str(tmp_path / 'out-tiny-llama'))
    idx = torch.randint(0, 101, (1, 12))
    with torch.no_grad():
        assert max_rel_error(model(idx)[0], hf(idx).logits) <= 1e-4
    assert_one_error_line(*run_script(capsys, 'convert.py', '--hf_repo=SomeOrg/other', f"--out_dir={tmp_path / 'x'}"),
                          'error: SomeOrg/other@main: not in the Hugging Face cache', 'HF_HUB_OFFLINE is set')
    assert not (tmp_path / 'hub' / 'models--SomeOrg--other').exists() and not (tmp_path / 'x').exists()

# -----------------------------------------------------------------------------
# Bad input: one line naming the file, the key or the setting


@pytest.fixture
def checkpoint(tmp_path):
    """(folder, config, state) of a small Pythia checkpoint, to be spoiled by each test."""
    hf = hf_model('pythia-like')
    return tmp_path / 'hf', old_config(hf), on_disk_state(hf)


def convert_error(capsys, folder, *args):
    """The one error line of converting folder, which leaves no output behind."""
    status, out, err = run_script(capsys, 'convert.py', f'--hf_dir={folder}', f'--out_dir={folder}-out', *args)
    line = assert_one_error_line(status, out, err)
    assert not os.path.exists(f'{folder}-out')
    return line


def test_missing_dir_and_config(tmp_path, capsys):
    assert 'is not a directory' in convert_error(capsys, tmp_path / 'nowhere')
    (tmp_path / 'empty').mkdir()
    assert 'no config.json in' in convert_error(capsys, tmp_path / 'empty')
    assert 'pass one of --hf_dir=DIR' in convert_error(capsys, '')


def test_no_weights(checkpoint, capsys):
    folder, config, state = checkpoint
    write_checkpoint(folder, config, state, 'bin')
    os.remove(folder / 'pytorch_model.bin')
    assert 'no weights in' in convert_error(capsys, folder)


def test_unknown_key(checkpoint, capsys):
    folder, config, state = checkpoint
    state['gpt_neox.layers.1.attention.rotary_scale'] = torch.ones(3)
    write_checkpoint(folder, config, state, 'safetensors')
    assert 'unknown key gpt_neox.layers.1.attention.rotary_scale in' in convert_error(capsys, folder)


def test_missing_key(checkpoint, capsys):
    folder, config, state = checkpoint
    del state['gpt_neox.layers.1.mlp.dense_4h_to_h.bias']
    write_checkpoint(folder, config, state, 'bin')
    assert 'missing key gpt_neox.layers.1.mlp.dense_4h_to_h.bias in' in convert_error(capsys, folder)


def test_shape_mismatch(checkpoint, capsys):
    folder, config, state = checkpoint
    state['gpt_neox.layers.0.attention.dense.weight'] = torch.zeros(32, 31)
    write_checkpoint(folder, config, state, 'safetensors')
    assert 'gpt_neox.layers.0.attention.dense.weight has shape (32, 31)' in convert_error(capsys, folder)
    config['vocab_size'] = 100  # the config disagrees with the weights
    write_checkpoint(folder, config, on_disk_state(hf_model('pythia-like')), 'safetensors')
    assert 'gpt_neox.embed_in.weight has shape (96, 32)' in convert_error(capsys, folder)


def test_llama_missing_and_misshapen_keys(tmp_path, capsys):
    hf = hf_llama('gqa-untied')
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    del state['model.layers.2.self_attn.k_proj.weight']
    write_checkpoint(tmp_path / 'a', hf.config.to_dict(), state, 'safetensors')
    assert 'missing key model.layers.2.self_attn.k_proj.weight in' in convert_error(capsys, tmp_path / 'a')
    state['model.layers.2.self_attn.k_proj.weight'] = torch.zeros(16, 48)  # 2 key/value heads, not 3
    write_checkpoint(tmp_path / 'b', hf.config.to_dict(), state, 'safetensors')
    assert 'model.layers.2.self_attn.k_proj.weight has shape (16, 48)' in convert_error(capsys, tmp_path / 'b')
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    state['model.layers.0.self_attn.q_proj.bias'] = torch.zeros(48)
    write_checkpoint(tmp_path / 'c', hf.config.to_dict(), state, 'safetensors')
    assert 'unknown key model.layers.0.self_attn.q_proj.bias in' in convert_error(capsys, tmp_path / 'c')


def test_unsupported_config(checkpoint, capsys):
    folder, config, state = checkpoint
    write_checkpoint(folder, {**config, 'hidden_act': 'gelu_new'}, state, 'safetensors')
    assert "hidden_act='gelu_new'" in convert_error(capsys, folder)
    write_checkpoint(folder, {k: v for k, v in config.items() if k != 'num_attention_heads'}, state, 'safetensors')
    assert "has no 'num_attention_heads'" in convert_error(capsys, folder)


def test_released_dijiang_errors(tmp_path, capsys):
    hf = hf_model('pythia-like')
    state = released_dijiang_state(hf)
    write_checkpoint(tmp_path / 'a', old_config(hf), state, 'safetensors')
    assert 'is a DiJiang checkpoint' in convert_error(capsys, tmp_path / 'a', '--attn=softmax')
    del state['gpt_neox.layers.1.attention.D2']
    write_checkpoint(tmp_path / 'b', old_config(hf), state, 'safetensors')
    assert 'missing key gpt_neox.layers.1.attention.D2' in convert_error(capsys, tmp_path / 'b')


def test_bad_settings(checkpoint, tmp_path, capsys):
    folder, config, state = checkpoint
    write_checkpoint(folder, config, state, 'safetensors')
    assert "attn='linear': use 'auto', 'softmax', 'dijiang'" in convert_error(capsys, folder, '--attn=linear')
    assert "dtype='int8'" in convert_error(capsys, folder, '--dtype=int8')
    assert 'pass one of --hf_dir' in convert_error(capsys, folder, '--model=pythia-70m')
    assert 'choose one of pythia-70m' in assert_one_error_line(*run_script(capsys, 'convert.py', '--model=gpt2'))
    assert "hf_repo='gpt2'" in assert_one_error_line(*run_script(capsys, 'convert.py', '--hf_repo=gpt2'))


def test_a_tokenizer_of_another_kind_is_left_behind_with_a_note(tmp_path, capsys):
    # a SentencePiece (LLaMA-2, Mistral) or WordPiece tokenizer.json: the weights convert, one note says why it stays
    hf = hf_llama('mha-untied')
    hf.save_pretrained(tmp_path / 'hf')
    tokenizer = json.load(open(TOKENIZER_JSON))
    tokenizer['model']['type'] = 'WordPiece'
    (tmp_path / 'hf' / 'tokenizer.json').write_text(json.dumps(tokenizer))
    capsys.readouterr()  # save_pretrained's progress bar
    status, out, err = run_script(capsys, 'convert.py', f"--hf_dir={tmp_path / 'hf'}", f"--out_dir={tmp_path / 'out'}")
    assert status == 0 and err.startswith('note: ') and len(err.splitlines()) == 1, err
    assert 'not a byte-level BPE tokenizer of the kinds tokenizer.py reproduces (model WordPiece' in err
    assert sorted(os.listdir(tmp_path / 'out')) == ['ckpt.pt', 'config.json', 'convert.json']
