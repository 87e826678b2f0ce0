"""Corpora, the fixed train/validation split, and batches.

A corpus is a list of documents (name, text): the bundled Shakespeare (one document per work) or
any UTF-8 text file or folder of files. Every document gives its last 10% (cut at a line break) to
validation, so each work is represented in both splits and the split never changes between runs.
"""
from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np

BUNDLED = Path(__file__).parent / "corpus" / "shakespeare.tar.gz"
VAL_FRACTION = 0.1


def load_documents(path=None) -> list[tuple[str, str]]:
    """[(name, text)]: the bundled Shakespeare when path is None, else the UTF-8 file at path, or
    every file under the folder at path (sorted by name; hidden files and folders skipped)."""
    if path is None:
        with tarfile.open(BUNDLED, "r:gz") as tar:
            members = sorted((m for m in tar.getmembers() if m.isfile()), key=lambda m: m.name)
            return [(Path(m.name).stem, tar.extractfile(m).read().decode("utf-8")) for m in members]
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise ValueError(f"--data {path}: the folder contains no files")
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(f"--data {path}: no such file or folder")
    docs = []
    for f in files:
        try:
            docs.append((str(f.relative_to(path)) if path.is_dir() else f.name, f.read_text(encoding="utf-8")))
        except UnicodeDecodeError as exc:
            raise ValueError(f"--data: {f} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return docs


def split_text(text: str, val_fraction: float = VAL_FRACTION) -> tuple[str, str]:
    """(train, val): val is the last val_fraction of text, starting just after the first line break
    past the cut (so no line is split in two), or at the exact character if there is none."""
    cut = int(len(text) * (1 - val_fraction))
    nl = text.find("\n", cut, max(cut, len(text) - 1))
    cut = nl + 1 if nl >= 0 and nl < len(text) - 1 else cut
    return text[:cut], text[cut:]


def split_documents(docs, val_fraction: float = VAL_FRACTION) -> tuple[str, str]:
    """(train text, val text): each document split by split_text, the parts joined in order."""
    train, val = [], []
    for _, text in docs:
        a, b = split_text(text, val_fraction)
        train.append(a)
        val.append(b)
    return "".join(train), "".join(val)


def get_batch(tokens: np.ndarray, batch_size: int, seq_len: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Random windows of a 1-D token array: inputs x and next-token targets y, each (B, T) int64."""
    starts = rng.integers(0, len(tokens) - seq_len, size=batch_size)  # (B,)
    offsets = starts[:, None] + np.arange(seq_len + 1)[None, :]  # (B, T + 1)
    window = tokens[offsets]
    return window[:, :-1].astype(np.int64), window[:, 1:].astype(np.int64)


def eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int, max_batches: int):
    """Fixed, evenly spaced windows over a 1-D token array (the same ones every evaluation, so
    validation losses of one run, and of runs with one seq_len, are comparable)."""
    n_windows = (len(tokens) - 1) // seq_len
    n = min(n_windows, batch_size * max_batches)
    starts = (np.arange(n) * ((len(tokens) - 1 - seq_len) // max(n - 1, 1))) if n > 1 else np.zeros(1, int)
    for i in range(0, n, batch_size):
        offsets = starts[i:i + batch_size, None] + np.arange(seq_len + 1)[None, :]
        window = tokens[offsets]
        yield window[:, :-1].astype(np.int64), window[:, 1:].astype(np.int64)


def check_split_size(name: str, tokens: np.ndarray, seq_len: int):
    if len(tokens) < seq_len + 2:
        raise ValueError(f"the {name} split has {len(tokens)} tokens, but one window of seq_len={seq_len} "
                         f"needs {seq_len + 2}: use more text or a smaller --seq-len")
