"""What the experiments share: the corpus as tokens, a bare training loop, JSON and matplotlib.

The loop here runs train.py's train_step (forward, backward, clip, AdamW at a scheduled rate) without
what a long user-facing run needs (checkpoints, metrics files, resume, sampling): an experiment
trains dozens of short-lived models and keeps only a number or two from each.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
from pathlib import Path

import numpy as np

from .. import data, nn
from ..ops import get_matmul_precision, set_matmul_precision
from ..optim import AdamW
from ..tokenizer import CharTokenizer
from ..train import CUDA_MATMUL_PRECISION, train_step

# Progress lines reach a log file as they happen, not when the buffer fills.
say = functools.partial(print, flush=True)

PLOT_HINT = "matplotlib is not installed: no plot written (pip install 'llmcore[plot]' for the pictures)"


def corpus_tokens(path=None):
    """(tokenizer, train tokens, validation tokens) of a corpus (default: the bundled Shakespeare),
    character-level, split as `llmcore train` splits it."""
    train_text, val_text = data.split_documents(data.load_documents(path))
    tok = CharTokenizer.train(train_text + val_text)  # every character of both splits is known
    return tok, tok.encode(train_text).astype(np.int32), tok.encode(val_text).astype(np.int32)


@contextlib.contextmanager
def device(name: str):
    """The nn.Backend for --device; on cuda, TF32 matmuls (as `llmcore train` uses) while inside."""
    be = nn.get_backend(name)
    before = get_matmul_precision()
    if be.name == "cuda":
        set_matmul_precision(CUDA_MATMUL_PRECISION)
    try:
        yield be
    finally:
        set_matmul_precision(before)


def train_model(model, batch, steps: int, lr_at, *, weight_decay=0.1, betas=(0.9, 0.95), grad_clip=1.0,
                every: int = 0, callback=None) -> float:
    """Trains `model` for `steps` AdamW updates; returns the last training loss.

    batch(step) -> (x, y) token arrays; lr_at(step) -> the learning rate of that update.
    callback(step, loss), after every `every`-th update (and the last), may return True to stop early.
    A non-finite loss or gradient raises FloatingPointError: an experiment's number would be garbage.
    """
    params = model.parameters()
    opt = AdamW(params, lr=lr_at(0), betas=betas, weight_decay=weight_decay, backend=model.be)
    loss = float("nan")
    for step in range(steps):
        x, y = batch(step)
        loss, norm = train_step(model, opt, x, y, lr=lr_at(step), grad_clip=grad_clip)
        if not (math.isfinite(loss) and math.isfinite(norm)):
            raise FloatingPointError(f"training diverged at step {step + 1} (loss {loss}, gradient norm "
                                     f"{norm}): lower the learning rate")
        done = step + 1
        if callback is not None and every and (done % every == 0 or done == steps):
            if callback(done, loss):
                break
    return loss


def non_embedding_params(model) -> int:
    """Parameters outside the token and position tables: Kaplan et al.'s N, the one whose power
    laws stay straight down to small models (the tables are a large share of a tiny model)."""
    skip = {"wte.weight", "wpe.weight"}
    return sum(p.data.size for name, p in model.parameters().items() if name not in skip)


def write_json(path: Path, obj) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1) + "\n")
    return path


def write_outputs(result: dict, out: Path, stem: str, plot, log=say) -> None:
    """out/stem.json, then out/stem.png drawn by plot(result, path) (which returns its log line)."""
    log(f"table: {write_json(Path(out) / f'{stem}.json', result)}")
    log(plot(result, Path(out) / f"{stem}.png"))


def save_figure(plt, fig, path: Path, dpi=100) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return f"plot: {path}"


def pyplot():
    """matplotlib.pyplot with a file-only backend, or None when the plot extra is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
