"""`llmcore experiment positions`: one small model, four positional encodings, at and beyond the
training length.

The same GPT (same size, data, seed and schedule) is trained with learned, sinusoidal, RoPE and
ALiBi positions on windows of T tokens, then scored on validation windows of 2T tokens: the loss
on positions < T is the loss at the training length, the loss on positions T..2T-1 is pure
extrapolation. (A causal model's outputs at positions < T do not depend on what follows, so those
positions of a 2T window are exactly a T-token window.)

Every model is built with seq_len = 2T, so that positions up to 2T exist: for learned positions the
rows T..2T-1 of the table are never trained and keep their random initialisation; the sinusoidal
table, RoPE's angles and ALiBi's distance penalty are defined at any position.

    llmcore experiment positions --out runs/positions
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .. import data
from ..model import GPT, GPTConfig, POS_KINDS
from ..optim import lr_schedule
from . import _common

NOTES = {
    "learned": "table rows T..2T-1 never trained (random init)",
    "sinusoidal": "fixed table, defined at every position",
    "rope": "rotation angles defined at every position",
    "alibi": "distance penalty, no position table",
}


@dataclass
class PosSettings:
    seq_len: int = 64  # T, the training length
    steps: int = 1500
    batch_size: int = 16
    lr: float = 3e-3
    n_layer: int = 2
    d_model: int = 96
    n_head: int = 4
    eval_batches: int = 32
    seed: int = 0
    device: str = "cpu"
    kinds: tuple = ("learned", "sinusoidal", "rope", "alibi")

    def check(self):
        for name in ("seq_len", "steps", "batch_size", "n_layer", "d_model", "n_head", "eval_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}: expected a positive integer, got {getattr(self, name)}")
        unknown = [k for k in self.kinds if k not in POS_KINDS]
        if unknown or not self.kinds:
            raise ValueError(f"--pos: expected some of {list(POS_KINDS)}, got {list(self.kinds)}")


def loss_by_position(model, tokens, seq_len, batch_size, max_batches) -> np.ndarray:
    """(seq_len,) mean validation loss at each position of fixed seq_len-token windows."""
    be = model.be
    total, rows = np.zeros(seq_len), 0
    for x, y in data.eval_batches(tokens, batch_size, seq_len, max_batches):
        logits, _ = model.forward(x)  # (B, T, V)
        B, T, V = logits.shape
        losses, _ = be.ops.cross_entropy(logits.reshape(B * T, V), be.to_device(y.reshape(B * T)))  # (B*T,)
        total += be.to_host(losses).reshape(B, T).sum(axis=0)
        rows += B
    return total / rows


def train_one(kind, s: PosSettings, tokens, be) -> dict:
    tok, train_tokens, val_tokens = tokens
    T = s.seq_len
    cfg = GPTConfig(vocab_size=tok.vocab_size, seq_len=2 * T, n_layer=s.n_layer, n_head=s.n_head,
                    n_kv_head=s.n_head, d_model=s.d_model, pos=kind)
    model = GPT(cfg, backend=be, seed=s.seed)
    rng = np.random.default_rng(s.seed)  # the same batches for every encoding
    warmup = max(1, min(100, s.steps // 10))

    def lr_at(step):
        return lr_schedule(step, max_lr=s.lr, min_lr=s.lr / 10, warmup=warmup, total=s.steps)

    t0 = time.time()
    train_loss = _common.train_model(model, lambda step: data.get_batch(train_tokens, s.batch_size, T, rng),
                                     s.steps, lr_at)
    curve = loss_by_position(model, val_tokens, 2 * T, s.batch_size, s.eval_batches)  # (2T,)
    return {"pos": kind, "params": model.num_params(), "train_loss": train_loss,
            "val_loss_at_T": float(curve[:T].mean()), "val_loss_at_2T": float(curve.mean()),
            "val_loss_beyond_T": float(curve[T:].mean()), "note": NOTES[kind],
            "seconds": time.time() - t0, "loss_by_position": curve.tolist()}


def table(rows, T) -> list[str]:
    head = (f"{'positions':<11} {'loss @ T=' + str(T):>12} {'loss @ 2T':>10} {'pos T..2T-1':>12}  "
            f"(models built with seq_len 2T = {2 * T})")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['pos']:<11} {r['val_loss_at_T']:>12.4f} {r['val_loss_at_2T']:>10.4f} "
                     f"{r['val_loss_beyond_T']:>12.4f}  {r['note']}")
    return lines


def run(s: PosSettings, out, data_path=None, log=_common.say) -> dict:
    """Trains one model per encoding; writes positions.json and positions.png; returns the JSON."""
    s.check()
    out = Path(out)
    tokens = _common.corpus_tokens(data_path)
    data.check_split_size("training", tokens[1], s.seq_len)
    data.check_split_size("validation", tokens[2], 2 * s.seq_len)
    rows = []
    with _common.device(s.device) as be:
        for i, kind in enumerate(s.kinds, 1):
            row = train_one(kind, s, tokens, be)
            rows.append(row)
            log(f"[{i}/{len(s.kinds)}] {kind}: {s.steps} steps at T={s.seq_len}: validation loss "
                f"{row['val_loss_at_T']:.4f} at T, {row['val_loss_beyond_T']:.4f} on positions T..2T-1 "
                f"({row['seconds']:.1f}s)")
    result = {"settings": asdict(s), "data": data_path or "bundled Shakespeare",
              "note": "every model is built with seq_len = 2T and trained on T-token windows; 'at_2T' averages "
                      "all 2T positions, 'beyond_T' only positions T..2T-1", "rows": rows}
    for line in table(rows, s.seq_len):
        log(line)
    _common.write_outputs(result, out, "positions", plot, log)
    return result


def plot(result, path: Path) -> str:
    plt = _common.pyplot()
    if plt is None:
        return _common.PLOT_HINT
    T = result["settings"]["seq_len"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in result["rows"]:
        ax.plot(np.arange(2 * T), r["loss_by_position"], lw=1.2,
                label=f"{r['pos']}: {r['val_loss_at_T']:.3f} at T, {r['val_loss_beyond_T']:.3f} beyond")
    ax.axvline(T - 0.5, color="grey", ls="--", lw=1)
    ax.text(T, ax.get_ylim()[1], " beyond the training length", va="top", fontsize=8, color="grey")
    ax.set(xlabel="position in a 2T-token validation window", ylabel="validation loss (nats/char)",
           title=f"trained on T={T} tokens, scored on 2T={2 * T}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _common.save_figure(plt, fig, path)


def add_parser(sub) -> argparse.ArgumentParser:
    d = PosSettings()
    p = sub.add_parser("positions", help="learned, sinusoidal, RoPE and ALiBi positions at T and 2T",
                       description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--pos", default=",".join(d.kinds), metavar="KIND[,KIND]",
                   help=f"encodings to compare (default all: {', '.join(d.kinds)})")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help=f"training length T (default {d.seq_len})")
    p.add_argument("--steps", type=int, default=d.steps, help=f"training steps per encoding (default {d.steps})")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--n-layer", type=int, default=d.n_layer)
    p.add_argument("--d-model", type=int, default=d.d_model)
    p.add_argument("--n-head", type=int, default=d.n_head)
    p.add_argument("--eval-batches", type=int, default=d.eval_batches, help="validation batches of 2T-token windows")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", choices=["cpu", "numpy", "cuda"], default="cpu")
    p.add_argument("--data", help="a UTF-8 text file or folder (default: the bundled Shakespeare)")
    p.add_argument("--out", default="runs/positions", help="folder for positions.json and positions.png")
    p.set_defaults(func=_cmd)
    return p


def _cmd(args) -> int:
    kinds = tuple(k.strip() for k in args.pos.split(",") if k.strip())
    names = set(PosSettings.__dataclass_fields__) - {"kinds"}
    s = PosSettings(kinds=kinds, **{k: v for k, v in vars(args).items() if k in names})
    try:
        run(s, args.out, data_path=args.data)
    except (ValueError, RuntimeError, FileNotFoundError, FloatingPointError) as exc:
        print(f"llmcore experiment positions: error: {exc}", file=sys.stderr)
        return 2
    return 0
