"""Checkpoints: a folder `checkpoint/` holding

    model.safetensors       the parameters, by their GPT-2-style names
    optimizer.safetensors   AdamW's moments m.<name>, v.<name>
    checkpoint.json         config, tokenizer, step, RNG states, training settings, and the SHA-256
                            and size of both .safetensors files

safetensors files hold only tensors and a JSON header, so other tools can read them and loading one
never runs code. A checkpoint is written whole into checkpoint.tmp/, then swapped in with two
renames (checkpoint -> checkpoint.old, checkpoint.tmp -> checkpoint), so a run killed at any moment
leaves a complete checkpoint behind: `checkpoint/`, or `checkpoint.old/` if it died between the two
renames. Loading verifies the checksums and refuses a corrupted or truncated checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from ._backend import is_cupy

NAME = "checkpoint"
FORMAT = 1


class CheckpointError(RuntimeError):
    """The checkpoint is missing, incomplete or corrupted."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _host(array):
    """A C-contiguous NumPy array for safetensors (a CuPy array is copied off the GPU)."""
    if is_cupy(array):
        array = array.get()
    return np.ascontiguousarray(array)


def save(out_dir, model_arrays: dict, optimizer_arrays: dict, state: dict) -> Path:
    """Writes a checkpoint under out_dir atomically; returns its folder. Arrays are NumPy (the
    training loop copies device arrays with be.to_host first) or CuPy (copied here)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp, final, old = out_dir / (NAME + ".tmp"), out_dir / NAME, out_dir / (NAME + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    files = {}
    for fname, arrays in (("model.safetensors", model_arrays), ("optimizer.safetensors", optimizer_arrays)):
        save_file({k: _host(v) for k, v in arrays.items()}, str(tmp / fname),
                  metadata={"format": "llmcore", "version": str(FORMAT)})
        _fsync(tmp / fname)
        files[fname] = {"sha256": _sha256(tmp / fname), "bytes": (tmp / fname).stat().st_size}
    meta = dict(state, format=FORMAT, files=files)
    with open(tmp / "checkpoint.json", "w") as f:
        json.dump(meta, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def find(path) -> Path:
    """The checkpoint folder for path: the folder itself, or path/checkpoint (a training --out
    folder), or path/checkpoint.old when a run was killed while swapping checkpoints."""
    path = Path(path)
    for cand in (path, path / NAME, path / (NAME + ".old")):
        if (cand / "checkpoint.json").is_file():
            return cand
    raise CheckpointError(f"no checkpoint in {path} (expected {path / NAME / 'checkpoint.json'})")


def load(path, *, with_optimizer: bool = True):
    """(state dict, model arrays, optimizer arrays or None), after checking every file's size and
    SHA-256 against checkpoint.json."""
    folder = find(path)
    try:
        meta = json.loads((folder / "checkpoint.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint {folder}: checkpoint.json is corrupted or truncated ({exc}); "
                              "refusing to load it") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "files" not in meta:
        raise CheckpointError(f"checkpoint {folder}: checkpoint.json is not an llmcore checkpoint "
                              f"of format {FORMAT}")
    names = ["model.safetensors"] + (["optimizer.safetensors"] if with_optimizer else [])
    for fname in names:
        expect = meta["files"].get(fname)
        f = folder / fname
        if expect is None or not f.is_file():
            raise CheckpointError(f"checkpoint {folder}: {fname} is missing")
        size = f.stat().st_size
        if size != expect["bytes"]:
            raise CheckpointError(f"checkpoint {folder}: {fname} has {size} bytes, expected "
                                  f"{expect['bytes']} (truncated or overwritten); refusing to load it")
        digest = _sha256(f)
        if digest != expect["sha256"]:
            raise CheckpointError(f"checkpoint {folder}: {fname} is corrupted (SHA-256 {digest[:16]}..., "
                                  f"expected {expect['sha256'][:16]}...); refusing to load it")
    model_arrays = load_file(str(folder / "model.safetensors"))
    opt_arrays = load_file(str(folder / "optimizer.safetensors")) if with_optimizer else None
    return meta, model_arrays, opt_arrays


def load_model_arrays(model, arrays: dict):
    """Copies arrays (NumPy, from load) into model.parameters() on the model's device, checking
    names and shapes."""
    params = model.parameters()
    missing = sorted(set(params) - set(arrays))
    extra = sorted(set(arrays) - set(params))
    if missing or extra:
        raise CheckpointError(f"checkpoint weights do not match the model: missing {missing}, unexpected {extra}")
    for name, p in params.items():
        if arrays[name].shape != p.data.shape:
            raise CheckpointError(f"checkpoint weight {name!r} has shape {arrays[name].shape}, "
                                  f"the model expects {p.data.shape}")
        p.data[...] = model.be.to_device(arrays[name])


def load_for_inference(path, backend: str = "cpu"):
    """(model, tokenizer, meta) from a checkpoint, for sampling on backend "cpu", "numpy" or "cuda"
    (checkpoints hold host arrays, so one written on any backend loads on any other)."""
    from .model import GPT, GPTConfig
    from .tokenizer import tokenizer_from_dict

    meta, arrays, _ = load(path, with_optimizer=False)
    model = GPT(GPTConfig.from_dict(meta["config"]), backend=backend)
    load_model_arrays(model, arrays)
    return model, tokenizer_from_dict(meta["tokenizer"]), meta
