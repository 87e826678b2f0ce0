"""Tokenizers: characters, and byte-level BPE trained on a corpus.

Both turn text into a 1-D int array and back, and save themselves as a small JSON-able dict that
travels inside the checkpoint (tokenizer_from_dict rebuilds either one).

Byte-level BPE (GPT-2's idea): text -> UTF-8 bytes, so the 256 byte values are the base vocabulary
and any text can be encoded; training repeatedly merges the most frequent adjacent pair into a new
token. Text is first split into chunks (words with their leading space, numbers, punctuation runs,
whitespace) and merges never cross a chunk boundary, so tokens stay word-like.
"""
from __future__ import annotations

import heapq
import re
from collections import Counter, defaultdict

import numpy as np

# Every character falls into one alternative (letters, digits, other symbols incl. '_', whitespace),
# so the chunks always join back into the text.
_SPLIT = r"""'(?:[sdmt]|ll|ve|re)| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+"""


class CharTokenizer:
    """One token per distinct character of the training text (sorted, so ids are reproducible)."""

    kind = "char"

    def __init__(self, chars):
        self.chars = list(chars)
        if len(set(self.chars)) != len(self.chars):
            raise ValueError("chars: expected distinct characters")
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self._codes = np.array([ord(c) for c in self.chars], dtype=np.uint32)
        self._order = np.argsort(self._codes)

    @classmethod
    def train(cls, text: str) -> "CharTokenizer":
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        # Vectorised: code points via UTF-32, then a binary search in the sorted vocabulary
        # (~50x faster than a per-character dict lookup on the 5 MB corpus).
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        pos = np.searchsorted(self._codes[self._order], codes)
        pos = np.minimum(pos, len(self.chars) - 1)
        ids = self._order[pos]
        unknown = self._codes[ids] != codes
        if unknown.any():
            missing = sorted({chr(c) for c in codes[unknown]})[:10]
            raise ValueError(f"text contains characters outside this character tokenizer's vocabulary: "
                             f"{missing!r} (the vocabulary comes from the training text)")
        return ids.astype(np.int64)

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in np.asarray(ids).reshape(-1))

    def to_dict(self) -> dict:
        return {"kind": self.kind, "chars": "".join(self.chars)}


class BPETokenizer:
    """Byte-level BPE: ids 0..255 are bytes, id 256 + i is merges[i] = (left id, right id)."""

    kind = "bpe"

    def __init__(self, merges, pattern: str = _SPLIT):
        self.merges = [tuple(int(t) for t in m) for m in merges]
        self.pattern = pattern
        self._re = re.compile(pattern)
        self.ranks = {pair: i for i, pair in enumerate(self.merges)}  # lower rank merges first
        self.vocab = [bytes([i]) for i in range(256)]
        for a, b in self.merges:
            self.vocab.append(self.vocab[a] + self.vocab[b])
        self._chunk_cache: dict[str, list[int]] = {}

    @property
    def vocab_size(self) -> int:
        return 256 + len(self.merges)

    @classmethod
    def train(cls, text: str, vocab_size: int, pattern: str = _SPLIT) -> "BPETokenizer":
        """Learns vocab_size - 256 merges from text.

        Works on distinct chunks weighted by their counts, and updates pair counts incrementally:
        merging a pair touches only the chunks that contain it (an index pair -> chunks), and a heap
        with lazy deletion finds the most frequent pair. Training on 1 MB takes about a second.
        """
        if vocab_size < 256:
            raise ValueError(f"vocab_size: a byte-level BPE needs at least 256 tokens, got {vocab_size}")
        counts = Counter(re.findall(pattern, text))
        words = [list(w.encode("utf-8")) for w in counts]  # distinct chunks as byte ids
        freq = list(counts.values())
        pair_count = defaultdict(int)
        where = defaultdict(set)  # pair -> indices of the words containing it
        for wi, w in enumerate(words):
            for pair in zip(w, w[1:]):
                pair_count[pair] += freq[wi]
                where[pair].add(wi)
        heap = [(-c, pair) for pair, c in pair_count.items()]
        heapq.heapify(heap)
        merges = []
        while len(merges) < vocab_size - 256 and heap:
            neg, pair = heapq.heappop(heap)
            if pair_count.get(pair, 0) != -neg or -neg <= 0:
                continue  # a stale heap entry: the count changed since it was pushed
            new_id = 256 + len(merges)
            merges.append(pair)
            changed = set()
            for wi in where.pop(pair):
                w, f = words[wi], freq[wi]
                for p in zip(w, w[1:]):  # take the word's old pairs out ...
                    pair_count[p] -= f
                    changed.add(p)
                w = words[wi] = _merge(w, pair, new_id)
                for p in zip(w, w[1:]):  # ... and put its new pairs in
                    pair_count[p] += f
                    where[p].add(wi)
                    changed.add(p)
            del pair_count[pair]
            for p in changed:
                c = pair_count.get(p, 0)
                if c > 0:
                    heapq.heappush(heap, (-c, p))
                else:
                    pair_count.pop(p, None)
                    where.pop(p, None)
        return cls(merges, pattern)

    def _encode_chunk(self, chunk: str) -> list[int]:
        ids = self._chunk_cache.get(chunk)
        if ids is None:
            ids = list(chunk.encode("utf-8"))
            while len(ids) >= 2:
                # apply the earliest-learned merge present, as training did
                pair = min(zip(ids, ids[1:]), key=lambda p: self.ranks.get(p, len(self.ranks)))
                if pair not in self.ranks:
                    break
                ids = _merge(ids, pair, 256 + self.ranks[pair])
            if len(self._chunk_cache) < 200_000:  # words repeat: cache them, within reason
                self._chunk_cache[chunk] = ids
        return ids

    def encode(self, text: str) -> np.ndarray:
        out = []
        for chunk in self._re.findall(text):
            out.extend(self._encode_chunk(chunk))
        return np.asarray(out, dtype=np.int64)

    def decode(self, ids) -> str:
        """Invalid UTF-8 (a sample cut inside a multi-byte character) becomes U+FFFD."""
        data = b"".join(self.vocab[int(i)] for i in np.asarray(ids).reshape(-1))
        return data.decode("utf-8", errors="replace")

    def to_dict(self) -> dict:
        return {"kind": self.kind, "merges": [list(m) for m in self.merges], "pattern": self.pattern}


def _merge(ids, pair, new_id):
    """ids with every non-overlapping occurrence of pair (left to right) replaced by new_id."""
    out, i, n = [], 0, len(ids)
    a, b = pair
    while i < n:
        if i < n - 1 and ids[i] == a and ids[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def tokenizer_from_dict(d: dict):
    kind = d.get("kind")
    if kind == "char":
        return CharTokenizer(d["chars"])
    if kind == "bpe":
        return BPETokenizer(d["merges"], d.get("pattern", _SPLIT))
    raise ValueError(f"tokenizer: unknown kind {kind!r} (expected 'char' or 'bpe')")
