"""
Pythia's tokenizer (GPT-NeoX-20B byte-level BPE) on tiktoken, giving exactly the ids of Hugging Face
`tokenizers` on its tokenizer.json, and a byte-level tokenizer for offline demos.

    tok = Tokenizer.from_file('data/pythia-tokenizer.json')   # Pythia's (shipped in this repo)
    tok = Tokenizer.bytes()                                   # ids 0..255 are UTF-8 bytes, 256 is <|endoftext|>

What makes the BPE exact:
- Text is NFC-normalized as HF does it: special tokens are matched on the raw text first, and HF's NFC
  tables are Unicode 9.0, so the newer characters that normalization would move or (de)compose stay as
  they are (HF_UNKNOWN; derived by probing HF's normalizer against Unicode 18 data).
- Vocab strings spell bytes with GPT-2's byte-to-unicode map, and the merge order equals the id order
  (checked in from_file), so tiktoken's "lowest id merges first" is HF's "earliest merge first".
- The 23 added tokens for runs of 2..24 spaces are matched before BPE, leftmost-longest: a run splits
  greedily into pieces of at most 24, and a single leftover space stays with the text that follows.
  Putting ` {2,24}` first in GPT-2's pre-tokenizer regex, and keeping its whitespace rules off double
  spaces, does the same in the one regex pass, so encoding stays inside tiktoken's Rust code.
- Like HF's encode, special-token text in the input ("<|endoftext|>") becomes the special id.
"""

import hashlib
import json
import os
import re
import unicodedata

import tiktoken

_WS = r"(?:[^\S ]| (?! ))"  # one whitespace char that does not start a run of 2+ spaces
PYTHIA_PATTERN = r" {2,24}|'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|" + _WS + r"+(?!\S)|" + _WS + "+"
HF_UNKNOWN_RANGES = """05C8-05C9 07FD 0897-089F 08CA-08D3 09FE 0C3C 0D3B-0D3C 0EBA 1715 1ABF-1AF0 1DF6-1DFA A82C 105C9
105D2 105DA 105E4 10D24-10D27 10D69-10D6D 10EAB-10EAC 10ECB-10ECF 10EF0-10EFB 10EFD-10EFF 10F46-10F50
10F82-10F85 11070 1133B 11382-11385 1138B 1138E 11390-11391 113B8 113BB 113C2 113C5 113C7-113C9 113CE-113D0
1145E 11839-1183A 11930 11935 11938 1193D-1193E 11943 119E0 11A34 11A47 11A99 11D42 11D44-11D45 11D97
11F41-11F42 1611E-16129 1612F 16D63 16D67-16D6A 16FF0-16FF1 1D127-1D128 1D250-1D252 1D25B-1D25C 1D25F
1D280-1D281 1E08F 1E130-1E136 1E2AE 1E2EC-1E2EF 1E4EC-1E4EF 1E5EE-1E5EF 1E6E3 1E6E6 1E6EE-1E6EF 1E6F5"""
HF_UNKNOWN = '[' + ''.join('-'.join(chr(int(x, 16)) for x in r.split('-')) for r in HF_UNKNOWN_RANGES.split()) + ']'


def gpt2_byte_to_unicode():
    printable = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1), *range(ord('®'), ord('ÿ') + 1)]
    others = [b for b in range(256) if b not in printable]  # spaces, controls etc. become chr(256 + k)
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + k) for k, b in enumerate(others)}}


class Tokenizer:
    """Tokenizer.from_file('tokenizer.json') for Pythia's, Tokenizer.bytes() for the byte-level one."""

    def __init__(self, identity, pattern, ranks, special_tokens, nfc):
        self.identity = identity  # stored in data shards and checkpoints, compared by train.py
        self.enc = tiktoken.Encoding(identity, pat_str=pattern, mergeable_ranks=ranks, special_tokens=special_tokens)
        self.eot_token = special_tokens['<|endoftext|>']
        self.vocab_size = self.enc.max_token_value + 1
        self.id_to_bytes = {i: b for b, i in ranks.items()} | {i: s.encode() for s, i in special_tokens.items()}
        # pieces of text that NFC must leave alone: special tokens, and characters HF's tables don't know
        self.keep_re = re.compile('(' + '|'.join(map(re.escape, special_tokens)) + '|' + HF_UNKNOWN + ')') if nfc else None

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
        """Pythia's tokenizer from its tokenizer.json; ValueError naming the file if it is not one."""
        if not os.path.isfile(path):
            raise ValueError(f"no tokenizer at {path}: pass the tokenizer.json of a Pythia model "
                             "(data/pythia-tokenizer.json is Pythia's)")
        try:
            return cls._from_json(path)
        except ValueError as e:
            if str(e).startswith(path):  # _from_json's own, naming the file
                raise
            error = e
        except (KeyError, TypeError, AttributeError, IndexError, OSError) as e:  # JSON of another shape, or unreadable
            error = e
        detail = ' '.join(str(error).split())[:160]
        raise ValueError(f"{path} is not a GPT-NeoX tokenizer.json ({type(error).__name__}: {detail}): pass Pythia's "
                         "tokenizer.json (data/pythia-tokenizer.json)")

    @classmethod
    def _from_json(cls, path):
        with open(path, encoding='utf-8') as f:
            tj = json.load(f)
        model, kinds = tj['model'], [(tj.get(k) or {}).get('type') for k in ('normalizer', 'pre_tokenizer', 'decoder')]
        if model.get('type') != 'BPE' or kinds != ['NFC', 'ByteLevel', 'ByteLevel']:
            raise ValueError(f"{path}: not a GPT-NeoX byte-level BPE tokenizer (model {model.get('type')}, {kinds})")
        byte_of = {c: b for b, c in gpt2_byte_to_unicode().items()}
        id_to_bytes = {i: bytes(byte_of[c] for c in s) for s, i in model['vocab'].items()}
        special = {t['content']: t['id'] for t in tj['added_tokens'] if t['special']}
        ranks = {b: i for i, b in id_to_bytes.items() if i not in special.values()}
        merged = [model['vocab'][''.join(m.split(' ') if isinstance(m, str) else m)] for m in model['merges']]
        if merged != sorted(merged) or any(len(b) > 1 and i < merged[0] for b, i in ranks.items()):
            raise ValueError(f"{path}: merge order differs from id order; tiktoken cannot reproduce this BPE")
        for t in tj['added_tokens']:  # the space runs take over the bytes of the BPE tokens that spell them
            if not t['special']:
                if set(t['content']) != {' '} or not 2 <= len(t['content']) <= 24:
                    raise ValueError(f"{path}: unsupported added token {t['content']!r} (only runs of 2..24 spaces)")
                ranks[t['content'].encode()] = t['id']
        digest = hashlib.sha256(json.dumps([model['vocab'], model['merges'], tj['added_tokens']], sort_keys=True).encode())
        tok = cls('pythia-' + digest.hexdigest()[:16], PYTHIA_PATTERN, ranks, special, nfc=True)
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
        return self.enc.encode(self.normalize(text), allowed_special='all')

    def encode_batch(self, texts, num_threads=8):
        """Encode many texts; tiktoken releases the GIL, so the threads run in parallel."""
        return self.enc.encode_batch([self.normalize(t) for t in texts], num_threads=num_threads, allowed_special='all')

    def decode(self, ids):
        """Invalid UTF-8 becomes U+FFFD; ids with no text (a model's padding rows) give nothing, as in HF."""
        return b''.join(self.id_to_bytes.get(int(i), b'') for i in ids).decode('utf-8', errors='replace')
