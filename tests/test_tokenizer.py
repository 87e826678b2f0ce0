"""Tokenizers: character-level and byte-level BPE (training, round trips, saving)."""
import re
import time
from collections import Counter

import numpy as np
import pytest

from llmcore import data
from llmcore.tokenizer import _SPLIT, BPETokenizer, CharTokenizer, tokenizer_from_dict

ODD_TEXT = ("Héllo, wörld! 你好，世界。 Ελληνικά — emoji 🙂👍🏽 family 👨‍👩‍👧 e\u0301 (combining)\n"
            "tabs\tand\r\nCRLF,  double  spaces   , under_score __init__ 3.14159 1,000,000\x00 nul "
            "ﬁ ligature, Ω, \u200b zero-width, RTL עברית مرحبا, math ∑ x² ≤ ∞\n\n\n  trailing   ")


@pytest.fixture(scope="module")
def shakespeare_slice():
    train, _ = data.split_documents(data.load_documents()[:3])
    return train[:150_000]


def test_char_round_trip_and_vocabulary():
    text = "to be, or not to be\nthat is the question"
    tok = CharTokenizer.train(text)
    assert tok.chars == sorted(set(text))
    ids = tok.encode(text)
    assert ids.dtype == np.int64 and len(ids) == len(text)
    assert tok.decode(ids) == text
    assert tokenizer_from_dict(tok.to_dict()).encode(text).tolist() == ids.tolist()
    odd = CharTokenizer.train(ODD_TEXT)
    assert odd.decode(odd.encode(ODD_TEXT)) == ODD_TEXT
    with pytest.raises(ValueError, match="outside"):
        tok.encode("xyz!")


def naive_bpe_merges(text, n_merges):
    """BPE the slow, obvious way: recount every pair of every chunk before each merge."""
    words = [list(w.encode("utf-8")) for w in re.findall(_SPLIT, text)]
    merges = []
    for k in range(n_merges):
        counts = Counter()
        for w in words:
            counts.update(zip(w, w[1:]))
        if not counts:
            break
        top = max(counts.values())
        pair = min(p for p, c in counts.items() if c == top)  # ties: the smallest pair, like the trainer
        merges.append(pair)
        new = []
        for w in words:
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == pair:
                    out.append(256 + k)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new.append(out)
        words = new
    return merges


def test_bpe_merges_equal_naive_recounting(shakespeare_slice):
    text = shakespeare_slice[:20_000]
    tok = BPETokenizer.train(text, 256 + 60)
    assert tok.merges == naive_bpe_merges(text, 60)


def test_bpe_first_merges_are_the_most_frequent_pairs():
    tok = BPETokenizer.train("aaab aaab aaab aab cd", 256 + 2)
    a, b, sp = ord("a"), ord("b"), ord(" ")
    # chunks "aaab", " aaab" x2, " aab", " cd": (a, a) occurs 2+2+2+1 = 7 times. After merging it
    # (aa = 256), "aaab" -> [aa, a, b]: (aa, a), (a, b) and (space, aa) tie at 3, and ties go to
    # the smallest pair.
    assert tok.merges[0] == (a, a)
    assert tok.merges[1] == (sp, 256)
    assert tok.decode(tok.encode("aaab aab")) == "aaab aab" and b == 98
    assert tok.vocab[256] == b"aa"


def test_bpe_round_trips_any_text_and_compresses(shakespeare_slice):
    t0 = time.perf_counter()
    tok = BPETokenizer.train(shakespeare_slice, 512)
    assert time.perf_counter() - t0 < 20  # incremental counting: about a second here
    assert tok.vocab_size == 512
    for text in (shakespeare_slice[:5000], ODD_TEXT, "", " ", "\n\n", "a", "🙂"):
        ids = tok.encode(text)
        assert ids.dtype == np.int64
        assert ids.size == 0 or (ids.min() >= 0 and ids.max() < 512)
        assert tok.decode(ids) == text
    sample = shakespeare_slice[-20_000:]
    assert len(tok.encode(sample)) < 0.55 * len(sample.encode("utf-8"))
    # random bytes decoded leniently are still round-tripped exactly
    rng = np.random.default_rng(0)
    junk = bytes(rng.integers(0, 256, 3000, dtype=np.uint8)).decode("utf-8", errors="replace")
    assert tok.decode(tok.encode(junk)) == junk
    # a sample cut inside a multi-byte character decodes without raising
    assert tok.decode([0xC3]) == "\ufffd" and tok.decode([0xC3, 0xA9]) == "é"


def test_bpe_saves_and_loads(shakespeare_slice):
    tok = BPETokenizer.train(shakespeare_slice[:30_000], 300)
    again = tokenizer_from_dict(tok.to_dict())
    text = shakespeare_slice[-3000:] + ODD_TEXT
    assert again.encode(text).tolist() == tok.encode(text).tolist()
    assert again.vocab_size == 300
    with pytest.raises(ValueError, match="vocab_size"):
        BPETokenizer.train("abc", 100)
    with pytest.raises(ValueError, match="unknown kind"):
        tokenizer_from_dict({"kind": "wordpiece"})
