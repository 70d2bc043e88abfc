"""
Token shards: the files data/prepare.py writes and train.py reads. Each shard is a 1024-byte header
and the tokens, all little-endian:

    offset  type       field
    0       int32      magic 240319928 (the paper's arXiv id 2403.19928)
    4       int32      version 1
    8       int32      vocab_size of the tokenizer (every id is below it)
    12      int32      bytes per token: 2 (uint16) when vocab_size <= 65536, else 4 (uint32)
    16      int64      number of tokens after the header
    24      char[64]   tokenizer identity, ASCII, NUL-padded ('bytes' or 'pythia-<hash of its vocab>')
    88..1023           zeros
    1024    uint16/32  the tokens

A data folder holds train_000000.bin, ..., val_000000.bin, ... (and val_ood_*.bin for a corpus with
an out-of-distribution split), and prepare.json, written last: a folder without it is unfinished.
"""

import glob
import math
import os

import numpy as np

from atomic import atomic_write

MAGIC = 240319928
VERSION = 1
HEADER_BYTES = 1024
HEADER = np.dtype([('magic', '<i4'), ('version', '<i4'), ('vocab_size', '<i4'), ('token_bytes', '<i4'),
                   ('num_tokens', '<i8'), ('tokenizer', 'S64'), ('zeros', 'V', HEADER_BYTES - 88)])


def token_dtype(vocab_size):
    return np.uint16 if vocab_size <= 2 ** 16 else np.uint32


def shard_header(num_tokens, vocab_size, identity):
    if len(identity.encode('ascii')) > 64:
        raise ValueError(f"tokenizer identity {identity!r} is longer than the 64 bytes the header holds")
    header = np.zeros((), dtype=HEADER)
    header['magic'], header['version'], header['vocab_size'] = MAGIC, VERSION, vocab_size
    header['token_bytes'], header['num_tokens'] = np.dtype(token_dtype(vocab_size)).itemsize, num_tokens
    header['tokenizer'] = identity.encode('ascii')
    return header.tobytes()


def write_shard(path, tokens, vocab_size, identity):
    def write(tmp_path):
        with open(tmp_path, 'wb') as f:
            f.write(shard_header(len(tokens), vocab_size, identity))
            f.write(tokens.tobytes())
    atomic_write(path, write)


def read_header(path):
    """The header of a shard as a dict, checked against the file; ValueError names what is wrong."""
    try:
        with open(path, 'rb') as f:
            raw = f.read(HEADER_BYTES)
    except OSError as e:
        raise ValueError(f"{path} cannot be read ({e.strerror}): check its permissions, or rerun data/prepare.py") from None
    if len(raw) < HEADER_BYTES or int(np.frombuffer(raw, '<i4', 1)[0]) != MAGIC:
        raise ValueError(f"{path} is not a token shard (wrong magic number): make it with data/prepare.py")
    header = np.frombuffer(raw, HEADER, 1)[0]
    if header['version'] != VERSION:
        raise ValueError(f"{path} is shard format version {header['version']}, this code reads version {VERSION}: "
                         "rerun data/prepare.py")
    info = dict(vocab_size=int(header['vocab_size']), token_bytes=int(header['token_bytes']),
                num_tokens=int(header['num_tokens']), tokenizer=header['tokenizer'].decode('ascii', errors='replace'))
    expected_size = HEADER_BYTES + info['num_tokens'] * info['token_bytes']
    if os.path.getsize(path) != expected_size:
        raise ValueError(f"{path} has {os.path.getsize(path)} bytes, its header says {expected_size}: "
                         "the file is damaged; rerun data/prepare.py")
    return info


def splits_of(data_dir, block_size):
    """The train split of a data folder, and its val splits by their log names: val_loss, and val_loss_ood
    where data/prepare.py wrote a second, out-of-distribution val split; all of one tokenizer."""
    train = Shards(data_dir, 'train', block_size)
    splits = {'val_loss': Shards(data_dir, 'val', block_size)}
    splits['val_loss'].check_tokenizer(train.tokenizer, train.vocab_size, "rerun data/prepare.py into an empty folder")
    if any(name.startswith('val_ood_') and name.endswith('.bin') for name in os.listdir(data_dir)):
        splits['val_loss_ood'] = Shards(data_dir, 'val_ood', block_size)
        splits['val_loss_ood'].check_tokenizer(train.tokenizer, train.vocab_size, "rerun data/prepare.py")
    return train, splits


class Shards:
    """The shards of one split, memory-mapped and read as windows of block_size + 1 tokens (inputs and
    their next-token targets). Window j of a shard starts at token j * block_size; windows do not cross
    shards, so each shard's last partial window is left out."""

    def __init__(self, data_dir, split, block_size):
        if not os.path.isfile(os.path.join(data_dir, 'prepare.json')):
            raise ValueError(f"no prepared data in {data_dir} (no prepare.json; an interrupted run leaves none): "
                             f"run python data/prepare.py --out_dir={data_dir} ...")
        paths = sorted(glob.glob(os.path.join(data_dir, f'{split}_[0-9]*.bin')))
        if not paths:
            raise ValueError(f"no {split}_*.bin shards in {data_dir}: rerun data/prepare.py")
        headers = [read_header(path) for path in paths]
        for path, header in zip(paths, headers):
            if (header['tokenizer'], header['vocab_size']) != (headers[0]['tokenizer'], headers[0]['vocab_size']):
                raise ValueError(f"{path} was made with tokenizer {header['tokenizer']}, {paths[0]} with "
                                 f"{headers[0]['tokenizer']}: rerun data/prepare.py into an empty folder")
        self.data_dir, self.split, self.block_size = data_dir, split, block_size
        self.tokenizer, self.vocab_size = headers[0]['tokenizer'], headers[0]['vocab_size']
        self.num_tokens = sum(h['num_tokens'] for h in headers)
        dtype = token_dtype(self.vocab_size)
        self.tokens = [np.memmap(path, dtype=dtype, mode='r', offset=HEADER_BYTES, shape=(h['num_tokens'],))
                       for path, h in zip(paths, headers)]
        # a damaged shard can keep its header: one pass over the ids (fast on a memory map) finds
        # them before they index past the embedding, which on a GPU is an opaque device-side assert
        for path, tokens in zip(paths, self.tokens):
            if len(tokens) and int(tokens.max()) >= self.vocab_size:
                raise ValueError(f"{path} holds token id {int(tokens.max())}, but its header's vocab_size is "
                                 f"{self.vocab_size}: the file is damaged; rerun data/prepare.py")
        windows = [max(0, (len(t) - 1) // block_size) for t in self.tokens]
        self.first_window = np.cumsum([0] + windows)  # window index where each shard starts
        self.num_windows = int(self.first_window[-1])
        if self.num_windows == 0:
            raise ValueError(f"the {split} split of {data_dir} has {self.num_tokens} tokens, fewer than "
                             f"block_size + 1 = {block_size + 1}: use more data or a smaller block_size")
        # Windows are read in a fixed scattered order, window i -> i * stride mod N, with the stride
        # coprime to N and near N / golden ratio: consecutive reads land far apart, so a batch mixes
        # many documents, while the order stays a function of the index alone (so resuming and the
        # ranks' disjoint reads need nothing more).
        self.stride = max(1, round(self.num_windows * 0.6180339887))
        while math.gcd(self.stride, self.num_windows) != 1:
            self.stride += 1

    def check_tokenizer(self, tokenizer, vocab_size, fix):
        """Refuse shards the model cannot read: another tokenizer (when known) or ids past its vocab."""
        if tokenizer is not None and tokenizer != self.tokenizer:
            raise ValueError(f"{self.data_dir} was tokenized with {self.tokenizer}, the model uses {tokenizer}: {fix}")
        if self.vocab_size > vocab_size:
            raise ValueError(f"{self.data_dir} holds token ids up to {self.vocab_size - 1}, the model's vocab_size "
                             f"is {vocab_size}: {fix}")

    def windows(self, start, count):
        """Windows number start .. start + count - 1 of the scattered order (wrapping around at the end,
        for the next epoch) as int64 (count, block_size + 1)."""
        out = np.empty((count, self.block_size + 1), dtype=np.int64)
        for i in range(count):
            window = (start + i) * self.stride % self.num_windows
            shard = int(np.searchsorted(self.first_window, window, side='right')) - 1
            offset = (window - int(self.first_window[shard])) * self.block_size
            out[i] = self.tokens[shard][offset:offset + self.block_size + 1]
        return out
