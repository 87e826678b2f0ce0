"""`llmcore experiment grokking`: a + b mod p, learned long after it was memorised.

Power et al. (2022), "Grokking", and Nanda et al. (2023): a small transformer trained full-batch
on a fraction of the table of a + b mod p with strong weight decay first fits its training pairs
(training accuracy near 100%, validation at chance), and only thousands of steps later generalises
to the pairs it never saw. Weight decay is what drives the second phase: the memorising solution
has large weights, and decay slowly trades it for the compact one (Fourier features of a and b).

Every pair is the sequence [a, b, =] (three tokens; "=" is token p) and the model is scored on the
last position only: the targets of a and b are -100, which cross-entropy ignores.

    llmcore experiment grokking --out runs/grok            # p = 97, 30% of the pairs to train on

With the defaults, on one CPU thread (~10 minutes): training accuracy passed 99% at step 60 and
validation accuracy at step 2400, 40x later.
"""
from __future__ import annotations

import argparse
import math
import sys
import textwrap
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..model import GPT, GPTConfig
from . import _common

THRESHOLD = 0.99


@dataclass
class GrokSettings:
    p: int = 97
    train_frac: float = 0.3
    n_layer: int = 1
    d_model: int = 128
    n_head: int = 4
    steps: int = 40000  # the cap: a run stops earlier, once validation accuracy has passed 99%
    lr: float = 1e-3
    weight_decay: float = 1.0
    beta2: float = 0.98
    warmup: int = 10
    eval_every: int = 20
    seed: int = 0
    device: str = "cpu"

    def check(self):
        if self.p < 2:
            raise ValueError(f"--p: expected an integer >= 2, got {self.p}")
        if not 0 < self.train_frac < 1:
            raise ValueError(f"--train-frac: expected a fraction strictly between 0 and 1, got {self.train_frac}")
        n_train = round(self.train_frac * self.p ** 2)
        if not 0 < n_train < self.p ** 2:
            raise ValueError(f"--train-frac {self.train_frac} leaves an empty split of the {self.p ** 2} pairs")
        for name in ("steps", "eval_every", "warmup", "n_layer", "d_model", "n_head"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}: expected a positive integer, got {getattr(self, name)}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ValueError(f"--lr must be > 0 and --weight-decay >= 0, got {self.lr} and {self.weight_decay}")


def split_pairs(p: int, train_frac: float, seed: int = 0):
    """(train, val): the p*p pairs (a, b) shuffled once and cut at train_frac; (n, 2) int arrays,
    disjoint, together every pair exactly once."""
    pairs = np.stack(np.meshgrid(np.arange(p), np.arange(p), indexing="ij"), axis=-1).reshape(-1, 2)  # (p*p, 2)
    pairs = pairs[np.random.default_rng(seed).permutation(len(pairs))]
    n_train = round(train_frac * len(pairs))
    return pairs[:n_train], pairs[n_train:]


def encode(pairs, p: int):
    """(x, y), each (n, 3): x = [a, b, =] with "=" the token p; y scores only the last position."""
    n = len(pairs)
    x = np.empty((n, 3), dtype=np.int64)
    x[:, :2] = pairs
    x[:, 2] = p
    y = np.full((n, 3), -100, dtype=np.int64)  # cross-entropy ignores -100
    y[:, 2] = (pairs[:, 0] + pairs[:, 1]) % p
    return x, y


def accuracy_and_loss(model, x, y) -> tuple[float, float]:
    logits, loss = model.forward(x, y)
    guess = model.be.to_host(logits[:, -1].argmax(axis=-1))  # (n,)
    return float((guess == y[:, -1]).mean()), loss


def first_step_at(rows, key, threshold=THRESHOLD):
    """The first logged step whose `key` reached the threshold, or None."""
    return next((r["step"] for r in rows if r[key] >= threshold), None)


def run(s: GrokSettings, out, log=_common.say) -> dict:
    """Trains; writes grokking.json (settings, the log, both 99% steps) and grokking.png; returns the JSON."""
    from tqdm import tqdm

    s.check()
    out = Path(out)
    train_pairs, val_pairs = split_pairs(s.p, s.train_frac, s.seed)
    train_x, train_y = encode(train_pairs, s.p)
    val_x, val_y = encode(val_pairs, s.p)
    cfg = GPTConfig(vocab_size=s.p + 1, seq_len=3, n_layer=s.n_layer, n_head=s.n_head, n_kv_head=s.n_head,
                    d_model=s.d_model, pos="learned", act="relu", tie_embeddings=False)
    rows, t0 = [], time.time()
    with _common.device(s.device) as be:
        model = GPT(cfg, backend=be, seed=s.seed)
        log(f"grokking: a + b mod {s.p}, {len(train_x)} training and {len(val_x)} validation pairs; "
            f"{model.num_params():,} parameters; full-batch AdamW, lr {s.lr}, weight decay {s.weight_decay}")
        bar = tqdm(total=s.steps, unit="step", dynamic_ncols=True, mininterval=1.0)

        def on_log(step, loss):
            train_acc, train_loss = accuracy_and_loss(model, train_x, train_y)
            val_acc, val_loss = accuracy_and_loss(model, val_x, val_y)
            rows.append({"step": step, "train_acc": train_acc, "val_acc": val_acc, "train_loss": train_loss,
                         "val_loss": val_loss, "elapsed": time.time() - t0})
            bar.update(step - bar.n)
            bar.set_postfix_str(f"train acc {train_acc:.3f}, val acc {val_acc:.3f}", refresh=False)
            grokked = first_step_at(rows, "val_acc")
            # Run on 20% past the step validation passed 99%, so the log shows that it stays there,
            # and end on a step where it does: once the training loss is ~0, Adam makes brief loss
            # spikes ("slingshots", Thilak et al. 2022) that the log keeps and the summary counts.
            return grokked is not None and step >= math.ceil(1.2 * grokked) and val_acc >= THRESHOLD

        def constant_after_warmup(step):
            return s.lr * min(1.0, (step + 1) / s.warmup)

        try:  # full batch, no gradient clipping: as in the papers
            _common.train_model(model, lambda step: (train_x, train_y), s.steps, constant_after_warmup,
                                weight_decay=s.weight_decay, betas=(0.9, s.beta2), grad_clip=0.0,
                                every=s.eval_every, callback=on_log)
        finally:
            bar.close()
    result = summarise(s, rows, time.time() - t0)
    log(report_line(result))
    _common.write_outputs(result, out, "grokking", plot, log)
    return result


def summarise(s: GrokSettings, rows, seconds) -> dict:
    train_step, val_step = first_step_at(rows, "train_acc"), first_step_at(rows, "val_acc")
    gap = None if train_step is None or val_step is None else val_step - train_step
    # Logged steps where training accuracy fell back under 99% after first passing it: the spikes.
    dips = [] if train_step is None else [r["step"] for r in rows if r["step"] > train_step
                                          and r["train_acc"] < THRESHOLD]
    return {"settings": asdict(s), "train_99_step": train_step, "val_99_step": val_step, "gap_steps": gap,
            "threshold": THRESHOLD, "train_acc_dips": dips, "seconds": seconds, "log": rows}


def report_line(r) -> str:
    def at(step):
        return f"step {step}" if step is not None else "never (within the steps run)"

    line = (f"training accuracy passed 99% at {at(r['train_99_step'])}; validation accuracy at "
            f"{at(r['val_99_step'])}")
    if r["gap_steps"] is not None:
        line += f": {r['gap_steps']} steps later ({r['val_99_step'] / max(r['train_99_step'], 1):.1f}x)"
    if r["train_acc_dips"]:
        line += f"; training accuracy dipped under 99% at {len(r['train_acc_dips'])} logged step(s) after (loss spikes)"
    return line


def plot(r, path: Path) -> str:
    plt = _common.pyplot()
    if plt is None:
        return _common.PLOT_HINT
    steps = [row["step"] for row in r["log"]]
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4))
    acc_ax.plot(steps, [row["train_acc"] for row in r["log"]], label="train")
    acc_ax.plot(steps, [row["val_acc"] for row in r["log"]], label="validation")
    for key, style in (("train_99_step", ":"), ("val_99_step", "--")):
        if r[key] is not None:
            acc_ax.axvline(r[key], color="grey", ls=style, lw=1)
    acc_ax.set_ylabel("accuracy")
    loss_ax.plot(steps, [row["train_loss"] for row in r["log"]], label="train")
    loss_ax.plot(steps, [row["val_loss"] for row in r["log"]], label="validation")
    loss_ax.set_yscale("log")
    loss_ax.set_ylabel("loss (nats)")
    s = r["settings"]
    for ax in (acc_ax, loss_ax):
        ax.set_xscale("log")  # the two phases are an order of magnitude apart in steps
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"a + b mod {s['p']}, {s['train_frac']:.0%} of pairs for training, weight decay {s['weight_decay']}\n"
                 + textwrap.fill(report_line(r), 150), fontsize=9)
    return _common.save_figure(plt, fig, path)


def add_parser(sub) -> argparse.ArgumentParser:
    d = GrokSettings()
    p = sub.add_parser("grokking", help="a + b mod p: training vs validation accuracy over steps (grokking)",
                       description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--p", type=int, default=d.p, help=f"the modulus (default {d.p})")
    p.add_argument("--train-frac", type=float, default=d.train_frac,
                   help=f"fraction of the p*p pairs trained on (default {d.train_frac})")
    p.add_argument("--steps", type=int, default=d.steps,
                   help=f"at most this many full-batch steps (default {d.steps}; the run stops 20%% after "
                        "validation accuracy passes 99%%)")
    p.add_argument("--lr", type=float, default=d.lr, help=f"learning rate, constant after warmup (default {d.lr})")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help=f"AdamW's (default {d.weight_decay})")
    p.add_argument("--n-layer", type=int, default=d.n_layer)
    p.add_argument("--d-model", type=int, default=d.d_model)
    p.add_argument("--n-head", type=int, default=d.n_head)
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="steps between accuracy measurements")
    p.add_argument("--seed", type=int, default=d.seed, help="fixes the split and the initial weights")
    p.add_argument("--device", choices=["cpu", "numpy", "cuda"], default="cpu")
    p.add_argument("--out", default="runs/grokking", help="folder for grokking.json and grokking.png")
    p.set_defaults(func=_cmd)
    return p


def _cmd(args) -> int:
    names = set(GrokSettings.__dataclass_fields__)
    s = GrokSettings(**{k: v for k, v in vars(args).items() if k in names})
    try:
        run(s, args.out)
    except (ValueError, RuntimeError, FloatingPointError) as exc:
        print(f"llmcore experiment grokking: error: {exc}", file=sys.stderr)
        return 2
    return 0
