"""
Byte-level BPE tokenizers on tiktoken, giving exactly the ids of Hugging Face `tokenizers` on the same
tokenizer.json: Pythia's (GPT-NeoX-20B), SmolLM2's (its tokenizer.json, or the one that a GGUF file's
tokenizer.ggml.* metadata describes), and a byte-level tokenizer for offline demos.

    tok = Tokenizer.from_file('data/pythia-tokenizer.json')       # Pythia's (shipped in this repo)
    tok = Tokenizer.from_file('out-smollm2-135m/tokenizer.json')  # SmolLM2's, as convert.py writes it
    tok = Tokenizer.bytes()                                       # ids 0..255 are UTF-8 bytes, 256 is <|endoftext|>

What makes the BPE exact:
- Vocab strings spell bytes with GPT-2's byte-to-unicode map, and the merge order equals the id order
  (checked), so tiktoken's "lowest id merges first" is HF's "earliest merge first".
- HF's pre-tokenizer becomes one regex, so encoding stays inside tiktoken's Rust code:
  - ByteLevel is GPT-2's regex.
  - SmolLM2 splits off each digit first (HF's Digits(individual_digits=True) before ByteLevel; llama.cpp
    calls it 'smollm'). In one regex that is a digit as the first alternative, and whitespace just before
    a digit ends its piece as the end of the text would: the lookahead (?![^\\s{DIGITS}]).
  - Pythia's 23 added tokens for runs of 2..24 spaces are matched before BPE, leftmost-longest: a run
    splits greedily into pieces of at most 24, and a single leftover space stays with the text that
    follows. Putting ` {2,24}` first in GPT-2's regex, and keeping its whitespace rules off double
    spaces, does the same.
- Pythia's text is NFC-normalized as HF does it: special tokens are matched on the raw text first, and
  HF's NFC tables are Unicode 9.0, so the newer characters that normalization would move or (de)compose
  stay as they are (HF_UNKNOWN; derived by probing HF's normalizer against Unicode 18 data).
- A byte the vocab has no token for (SmolLM2 lacks 21, such as 0x04 and 0xF1) is dropped by HF inside
  its piece, and the bytes on either side may then merge. Text holding one is split and merged in Python.
- Like HF's encode, special-token text in the input ("<|endoftext|>") becomes the special id. Nothing
  is added around the text: neither Pythia's nor SmolLM2's tokenizer adds a BOS token.
"""

import hashlib
import json
import os
import re
import unicodedata

import tiktoken

GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# a digit as HF's Digits pre-tokenizer sees one (Rust's char::is_numeric): \p{N}, and 13 characters of Unicode 17
# that tiktoken's regex tables do not know yet (derived by probing both on every code point)
DIGITS = r'\p{N}\U00011DE0-\U00011DE9\U00016FF4-\U00016FF6'
DIGITS_PATTERN = rf"[{DIGITS}]|'s|'t|'re|'ve|'m|'ll|'d| ?\p{{L}}+| ?[^\s\p{{L}}{DIGITS}]+|\s+(?![^\s{DIGITS}])|\s+"
_WS = r"(?:[^\S ]| (?! ))"  # one whitespace char that does not start a run of 2+ spaces
PYTHIA_PATTERN = r" {2,24}|'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|" + _WS + r"+(?!\S)|" + _WS + "+"
HF_UNKNOWN_RANGES = """05C8-05C9 07FD 0897-089F 08CA-08D3 09FE 0C3C 0D3B-0D3C 0EBA 1715 1ABF-1AF0 1DF6-1DFA A82C 105C9
105D2 105DA 105E4 10D24-10D27 10D69-10D6D 10EAB-10EAC 10ECB-10ECF 10EF0-10EFB 10EFD-10EFF 10F46-10F50
10F82-10F85 11070 1133B 11382-11385 1138B 1138E 11390-11391 113B8 113BB 113C2 113C5 113C7-113C9 113CE-113D0
1145E 11839-1183A 11930 11935 11938 1193D-1193E 11943 119E0 11A34 11A47 11A99 11D42 11D44-11D45 11D97
11F41-11F42 1611E-16129 1612F 16D63 16D67-16D6A 16FF0-16FF1 1D127-1D128 1D250-1D252 1D25B-1D25C 1D25F
1D280-1D281 1E08F 1E130-1E136 1E2AE 1E2EC-1E2EF 1E4EC-1E4EF 1E5EE-1E5EF 1E6E3 1E6E6 1E6EE-1E6EF 1E6F5"""
HF_UNKNOWN = '[' + ''.join('-'.join(chr(int(x, 16)) for x in r.split('-')) for r in HF_UNKNOWN_RANGES.split()) + ']'

# The pre-tokenizers of tokenizer.json this file reproduces, and those of GGUF files (tokenizer.ggml.pre)
BYTE_LEVEL = {'type': 'ByteLevel', 'add_prefix_space': False, 'trim_offsets': True, 'use_regex': True}
DIGITS_THEN_BYTE_LEVEL = {'type': 'Sequence', 'pretokenizers': [{'type': 'Digits', 'individual_digits': True}, BYTE_LEVEL]}
GGUF_PRE_TOKENIZERS = {'gpt2': BYTE_LEVEL, 'smollm': DIGITS_THEN_BYTE_LEVEL, 'starcoder': DIGITS_THEN_BYTE_LEVEL}


class Unsupported(ValueError):
    """A well-formed tokenizer of a kind this file does not reproduce (SentencePiece, a BOS token added...)."""


def gpt2_byte_to_unicode():
    printable = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1), *range(ord('®'), ord('ÿ') + 1)]
    others = [b for b in range(256) if b not in printable]  # spaces, controls etc. become chr(256 + k)
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + k) for k, b in enumerate(others)}}


def split_pattern(pre_tokenizer):
    """The regex for a tokenizer.json's pre_tokenizer (Pythia's aside), or None if it is another kind."""
    steps = pre_tokenizer.get('pretokenizers') if pre_tokenizer.get('type') == 'Sequence' else [pre_tokenizer]
    last = steps[-1] if isinstance(steps, list) and steps and isinstance(steps[-1], dict) else {}
    if last.get('type') != 'ByteLevel' or not last.get('use_regex', True) or last.get('add_prefix_space'):
        return None
    if len(steps) == 1:
        return GPT2_PATTERN
    return DIGITS_PATTERN if steps[:-1] == [{'type': 'Digits', 'individual_digits': True}] else None


def chars_spelled_with(missing):
    """A regex of the characters whose UTF-8 bytes include one of missing (byte values), or None if none do."""
    ranges = []
    for b in missing:  # a lead byte starts the characters from (b - lead) << bits on; 0xC0, 0xC1, 0xF5.. start none
        if 0x80 <= b < 0xC0:  # a continuation byte: in every character of 2 bytes or more
            ranges.append((0x80, 0x10FFFF))
            continue
        lead, bits, lowest = (0, 0, 0) if b < 0x80 else (0xC0, 6, 0x80) if b < 0xE0 else (0xE0, 12, 0x800) if b < 0xF0 \
            else (0xF0, 18, 0x10000)
        first = (b - lead) << bits
        ranges.append((max(first, lowest), min(first + (1 << bits) - 1, 0x10FFFF)))
    ranges = ''.join(f'{re.escape(chr(first))}-{re.escape(chr(last))}' for first, last in ranges if first <= last)
    return re.compile(f'[{ranges}]') if ranges else None


def tokenizer_json_from_gguf(meta, path):
    """The tokenizer.json (Hugging Face's format) of the tokenizer that a GGUF file's tokenizer.ggml.*
    metadata describes: meta maps its keys to their values. Unsupported for kinds this file cannot run."""
    model, pre = meta.get('tokenizer.ggml.model'), meta.get('tokenizer.ggml.pre', 'gpt2')
    if model != 'gpt2' or pre not in GGUF_PRE_TOKENIZERS:
        raise Unsupported(f"{path}: tokenizer.ggml.model={model!r}, pre={pre!r}: tokenizer.py reproduces byte-level "
                          f"BPE ('gpt2') split as {', '.join(map(repr, GGUF_PRE_TOKENIZERS))}")
    if meta.get('tokenizer.ggml.add_bos_token'):
        raise Unsupported(f"{path}: tokenizer.ggml.add_bos_token is true: tokenizer.py adds no BOS token")
    tokens, merges = meta['tokenizer.ggml.tokens'], meta['tokenizer.ggml.merges']
    kinds = meta.get('tokenizer.ggml.token_type') or [1] * len(tokens)
    if set(kinds) - {1, 3}:  # llama.cpp's NORMAL and CONTROL: no user-defined (added, not special) tokens
        raise Unsupported(f"{path}: token types {sorted(set(kinds) - {1, 3})} (only normal and control tokens)")
    return {'version': '1.0', 'truncation': None, 'padding': None,
            'added_tokens': [{'id': i, 'content': t, 'single_word': False, 'lstrip': False, 'rstrip': False,
                              'normalized': False, 'special': True}
                             for i, (t, kind) in enumerate(zip(tokens, kinds)) if kind == 3],
            'normalizer': None, 'pre_tokenizer': GGUF_PRE_TOKENIZERS[pre], 'post_processor': None, 'decoder': BYTE_LEVEL,
            'model': {'type': 'BPE', 'dropout': None, 'unk_token': None, 'continuing_subword_prefix': None,
                      'end_of_word_suffix': None, 'fuse_unk': False, 'byte_fallback': False, 'ignore_merges': False,
                      'vocab': {t: i for i, t in enumerate(tokens)}, 'merges': [m.split(' ') for m in merges]}}


class Tokenizer:
    """Tokenizer.from_file('tokenizer.json') for Pythia's or SmolLM2's, Tokenizer.bytes() for the byte-level one."""

    def __init__(self, identity, pattern, ranks, special_tokens, nfc):
        """ranks: bytes -> id, for BPE; the bytes it lacks are dropped from the text, as HF does."""
        self.identity = identity  # stored in data shards and checkpoints, compared by train.py
        self.vocab_size = max([*ranks.values(), *special_tokens.values()]) + 1
        self.id_to_bytes = {i: b for b, i in ranks.items()} | {i: s.encode() for s, i in special_tokens.items()}
        self.missing, self.pattern = {b for b in range(256) if bytes([b]) not in ranks}, pattern
        self.dropped_re = chars_spelled_with(self.missing)  # finds the text that encode_dropping takes
        self.enc = tiktoken.Encoding(identity, pat_str=pattern, mergeable_ranks=ranks, special_tokens=special_tokens)
        self.eot_token = special_tokens['<|endoftext|>']
        self.special_tokens = special_tokens
        # pieces of text that NFC must leave alone: special tokens, and characters HF's tables don't know
        self.keep_re = re.compile('(' + '|'.join(map(re.escape, special_tokens)) + '|' + HF_UNKNOWN + ')') if nfc else None
        self.special_re = re.compile('(' + '|'.join(map(re.escape, sorted(special_tokens, key=len, reverse=True))) + ')')

    @classmethod
    def bytes(cls):
        """Byte-level tokenizer for offline demos: ids 0..255 are the UTF-8 bytes, eot = 256, vocab 257."""
        return cls('bytes', r"[\s\S]{1,64}", {bytes([b]): b for b in range(256)}, {'<|endoftext|>': 256}, nfc=False)

    @classmethod
    def from_dir(cls, dir):
        return cls.from_file(os.path.join(dir, 'tokenizer.json'))

    @classmethod
    def for_model(cls, dir, identity):
        """A model directory's tokenizer: its tokenizer.json, or the byte-level one when the checkpoint's
        tokenizer identity says 'bytes' (train.py on a built-in corpus)."""
        if identity == 'bytes':
            return cls.bytes()
        if not os.path.isfile(os.path.join(dir, 'tokenizer.json')):
            raise ValueError(f"{dir} has no tokenizer.json and its checkpoint does not say tokenizer='bytes': copy "
                             f"the model's tokenizer.json (e.g. from its Hugging Face folder) into {dir}")
        return cls.from_dir(dir)

    @classmethod
    def from_file(cls, path):
        """The tokenizer in a tokenizer.json; ValueError naming the file if it is not one this file reads."""
        if not os.path.isfile(path):
            raise ValueError(f"no tokenizer at {path}: pass the tokenizer.json of a Pythia or SmolLM2 model "
                             "(data/pythia-tokenizer.json is Pythia's)")
        try:
            with open(path, encoding='utf-8') as f:
                return cls.from_json(json.load(f), path)
        except ValueError as e:
            if str(e).startswith(path):  # from_json's own, naming the file
                raise
            error = e
        except (KeyError, TypeError, AttributeError, IndexError, OSError) as e:  # JSON of another shape, or unreadable
            error = e
        detail = ' '.join(str(error).split())[:160]
        raise ValueError(f"{path} is not a byte-level BPE tokenizer.json ({type(error).__name__}: {detail}): pass the "
                         "model's own tokenizer.json (data/pythia-tokenizer.json is Pythia's)")

    @classmethod
    def from_json(cls, tj, path):
        """The tokenizer in a tokenizer.json's content tj (path names it in errors)."""
        model, normalizer = tj['model'], (tj.get('normalizer') or {}).get('type')
        pythia = normalizer == 'NFC' and split_pattern(tj.get('pre_tokenizer') or {}) == GPT2_PATTERN
        pattern = PYTHIA_PATTERN if pythia else split_pattern(tj.get('pre_tokenizer') or {}) if normalizer is None else None
        decoder, post = (tj.get(key) or {} for key in ('decoder', 'post_processor'))
        adds = [p for p in (post.get('single') or []) if 'SpecialToken' in p]
        if model.get('type') != 'BPE' or pattern is None or decoder.get('type') != 'ByteLevel' or adds or \
                model.get('byte_fallback') or model.get('dropout') or model.get('continuing_subword_prefix'):
            raise Unsupported(f"{path}: not a byte-level BPE tokenizer of the kinds tokenizer.py reproduces (model "
                              f"{model.get('type')}, normalizer {normalizer}, pre-tokenizer "
                              f"{(tj.get('pre_tokenizer') or {}).get('type')}, decoder {decoder.get('type')}"
                              f"{', a special token added to each text' if adds else ''})")
        byte_of = {c: b for b, c in gpt2_byte_to_unicode().items()}
        special = {t['content']: t['id'] for t in tj['added_tokens'] if t['special']}
        id_to_bytes = {i: bytes(byte_of[c] for c in s) for s, i in model['vocab'].items() if s not in special}
        ranks = {b: i for i, b in id_to_bytes.items()}
        merged = [model['vocab'][''.join(m.split(' ') if isinstance(m, str) else m)] for m in model['merges']]
        if len(ranks) != len(id_to_bytes) or merged != sorted(merged) or \
                any(len(b) > 1 and i < merged[0] for b, i in ranks.items()):
            raise Unsupported(f"{path}: merge order differs from id order; tiktoken cannot reproduce this BPE")
        for t in tj['added_tokens']:  # Pythia's space runs take over the bytes of the BPE tokens that spell them
            if not t['special']:
                if not pythia or set(t['content']) != {' '} or not 2 <= len(t['content']) <= 24:
                    raise Unsupported(f"{path}: unsupported added token {t['content']!r} (only Pythia's runs of "
                                      "2..24 spaces)")
                ranks[t['content'].encode()] = t['id']
        if '<|endoftext|>' not in special:
            raise Unsupported(f"{path}: no special token <|endoftext|>, which separates documents")
        if pythia:  # the identity that data shards and checkpoints written before other tokenizers hold
            digest, name = json.dumps([model['vocab'], model['merges'], tj['added_tokens']], sort_keys=True), 'pythia'
        else:  # what makes the ids, in a form that does not depend on how the file spells it
            merges = [m.split(' ') if isinstance(m, str) else m for m in model['merges']]
            split = 'Digits+ByteLevel' if pattern == DIGITS_PATTERN else 'ByteLevel'  # not our regex's spelling
            digest, name = json.dumps([model['vocab'], merges, special, split], sort_keys=True), 'bpe'
        tok = cls(f"{name}-{hashlib.sha256(digest.encode()).hexdigest()[:16]}", pattern, ranks, special, pythia)
        tok.id_to_bytes = id_to_bytes | tok.id_to_bytes  # decode also the BPE ids of space runs (encode never makes them)
        return tok

    def normalize(self, text):
        # Text that is NFC already (nearly all) is also left as is by HF's older tables, which only
        # make fewer characters interact; so the split below is needed only for text NFC changes.
        if not self.keep_re or text.isascii() or unicodedata.is_normalized('NFC', text):
            return text
        parts = self.keep_re.split(text)  # odd parts are the kept pieces
        return ''.join(p if i % 2 else unicodedata.normalize('NFC', p) for i, p in enumerate(parts))

    def encode(self, text):
        """text -> list of ids, exactly HF's tokenizer.encode(text).ids."""
        text = self.normalize(text)
        if self.dropped_re and self.dropped_re.search(text):
            return self.encode_dropping(text)
        return self.enc.encode(text, allowed_special='all')

    def encode_batch(self, texts, num_threads=8):
        """Encode many texts; tiktoken releases the GIL, so the threads run in parallel."""
        texts = [self.normalize(t) for t in texts]
        dropping = [bool(self.dropped_re and self.dropped_re.search(t)) for t in texts]
        ids = iter(self.enc.encode_batch([t for t, d in zip(texts, dropping) if not d], num_threads=num_threads,
                                         allowed_special='all'))
        return [self.encode_dropping(t) if d else next(ids) for t, d in zip(texts, dropping)]

    def encode_dropping(self, text):
        """encode for text holding a character spelled with a byte that the vocab lacks. HF drops such a
        byte inside its piece and merges what is left, which tiktoken cannot: here the pieces come from the
        same regex in Python (the regex package, which tiktoken needs too), and each is merged without them."""
        import regex
        ids, split = [], regex.compile(self.pattern)
        for n, part in enumerate(self.special_re.split(text)):  # as tiktoken, special tokens first
            if n % 2:
                ids.append(self.special_tokens[part])
                continue
            for piece in split.findall(part):
                kept = bytes(b for b in piece.encode('utf-8') if b not in self.missing)
                ids += self.enc._encode_single_piece(kept) if kept else []  # BPE on these bytes alone
        return ids

    def decode(self, ids):
        """Invalid UTF-8 becomes U+FFFD; ids with no text (a model's padding rows) give nothing, as in HF."""
        return b''.join(self.id_to_bytes.get(int(i), b'') for i in ids).decode('utf-8', errors='replace')
