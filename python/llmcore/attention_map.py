"""`llmcore attention-map`: where every head of every layer looks, for one prompt.

    llmcore attention-map --ckpt out --prompt "ROMEO. What say you" --out attention.png

The attention kernels never form the T x S matrix of weights (they keep only the log-sum-exp), so
the weights are recomputed here in NumPy from what each attention layer saved for its backward
pass: q and k after RoPE, with llmcore.reference.attention's conventions (scale 1/sqrt(D), ALiBi
-slope·|i - j|, causal mask, key/value head h // (H / Hkv) for query head h).
Writes the PNG grid (rows: layers, columns: heads; needs the plot extra) and, always, the weights
as an .npz beside it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from .reference.attention import rotate_qk

MAX_LABELS = 48  # beyond this many tokens the axis labels would overlap: ticks only


def attention_weights(model) -> np.ndarray:
    """(n_layer, B, H, T, T) float64 softmax weights of the model's last forward pass (without a
    KV cache). Rows sum to 1; entries above the diagonal (future keys) are 0."""
    maps = []
    for block in model.h:
        attn = block.attn
        q, k = (np.asarray(model.be.to_host(a), dtype=np.float64) for a in attn.saved[:2])
        rope = attn.saved[5]  # set when the kernel rotated q and k itself (RoPE fused)
        if rope is not None:
            q, k = rotate_qk(q, k, model.be.to_host(rope))
        B, T, H, D = q.shape
        k = np.repeat(k, H // k.shape[2], axis=2)  # (B, T, H, D): each query head's key head
        s = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(D)  # (B, H, T, T)
        rel = np.arange(T)[:, None] - np.arange(T)[None, :]  # (T, T): query position - key position
        if attn.alibi_slopes is not None:
            slopes = np.asarray(model.be.to_host(attn.alibi_slopes), dtype=np.float64)
            s = s - slopes[None, :, None, None] * np.abs(rel)
        s = np.where(rel >= 0, s, -np.inf)
        p = np.exp(s - s.max(axis=-1, keepdims=True))
        maps.append(p / p.sum(axis=-1, keepdims=True))
    return np.stack(maps)


def prompt_ids(tok, prompt: str, seq_len: int) -> np.ndarray:
    ids = np.asarray(tok.encode(prompt), dtype=np.int64)
    if len(ids) == 0:
        raise ValueError("--prompt encodes to no tokens")
    if len(ids) > seq_len:
        raise ValueError(f"--prompt is {len(ids)} tokens long; the model's context is {seq_len}: shorten it")
    return ids


def token_labels(tok, ids) -> list[str]:
    """Each token as printable text (spaces and line breaks made visible)."""
    return [tok.decode([i]).replace("\n", "\\n").replace(" ", "·") for i in ids]


def plot(weights, labels, path: Path, title: str) -> str:
    """weights (n_layer, H, T, T) -> a grid of heatmaps at path; returns a one-line message."""
    from .experiments._common import PLOT_HINT, pyplot

    plt = pyplot()
    if plt is None:
        return PLOT_HINT
    n_layer, H, T, _ = weights.shape
    fig, axes = plt.subplots(n_layer, H, figsize=(2.4 * H + 0.6, 2.4 * n_layer + 0.6), squeeze=False)
    for layer in range(n_layer):
        for h in range(H):
            ax = axes[layer, h]
            ax.imshow(weights[layer, h], cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(f"layer {layer} head {h}", fontsize=8)
            if T <= MAX_LABELS:
                ax.set_xticks(range(T), labels, fontsize=5, rotation=90)
                ax.set_yticks(range(T), labels, fontsize=5)
            else:
                ax.tick_params(labelsize=5)
    fig.suptitle(f"{title}\nrows: query position, columns: key position", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"attention map: {path}"


def run(ckpt, prompt: str, out, device="cpu") -> list[str]:
    """Loads the checkpoint, runs the prompt, writes out (PNG) and out.npz; returns the messages."""
    from .checkpoint import load_for_inference

    model, tok, meta = load_for_inference(ckpt, backend=device)
    ids = prompt_ids(tok, prompt, model.config.seq_len)
    model.forward(ids[None, :])
    weights = attention_weights(model)[:, 0]  # (n_layer, H, T, T): the one sequence
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    npz = out.with_suffix(".npz")
    np.savez(npz, weights=weights.astype(np.float32), tokens=ids)
    cfg = model.config
    title = (f"{len(ids)} tokens; {cfg.n_layer} layer(s) x {cfg.n_head} head(s), {cfg.pos} positions, "
             f"checkpoint step {meta.get('step', '?')}")
    return [f"weights: {npz} (weights: layers x heads x query x key)",
            plot(weights, token_labels(tok, ids), out, title)]


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Adds the `attention-map` subcommand to the `llmcore` command's subparsers."""
    p = subparsers.add_parser("attention-map", help="a PNG grid of every layer's and head's attention for a prompt",
                              description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="a training --out folder or a checkpoint folder")
    p.add_argument("--prompt", required=True, help="the text whose attention is drawn (at most seq_len tokens)")
    p.add_argument("--out", default="attention.png", help="the PNG (the weights go to the same name .npz)")
    p.add_argument("--device", choices=["cpu", "numpy", "cuda"], default="cpu")
    p.set_defaults(func=_cmd)
    return p


def _cmd(args) -> int:
    from .checkpoint import CheckpointError

    try:
        lines = run(args.ckpt, args.prompt, args.out, device=args.device)
    except (CheckpointError, ValueError, RuntimeError) as exc:
        print(f"llmcore attention-map: error: {exc}", file=sys.stderr)
        return 2
    for line in lines:
        print(line)
    return 0
