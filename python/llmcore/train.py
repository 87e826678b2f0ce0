"""The training loop: presets, data, AdamW with warmup + cosine, validation, checkpoints, metrics.

    llmcore train                          # the "cpu" preset on the bundled Shakespeare
    llmcore train --preset tiny --data my.txt --steps 50 --out runs/tiny
    llmcore train --out runs/tiny --resume # continue a run from its last checkpoint
    llmcore train --preset gpu-gpt2 --device cuda --matmul-precision high   # GPT-2 124M on a GPU

Files under --out: checkpoint/ (checkpoint.py), metrics.jsonl (one JSON object per logged step),
loss.png (when matplotlib is installed).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

from . import calc, data, nn
from . import checkpoint as ckpt
from .ops import get_matmul_precision, set_matmul_precision
from .ops.matmul import MATMUL_PRECISIONS
from .model import GPT, GPTConfig
from .optim import AdamW, clip_scale, grad_norm, lr_schedule
from .tokenizer import BPETokenizer, CharTokenizer, tokenizer_from_dict

# Model shape per preset, then the training settings. "cpu" is the default: on 2 CPU cores it
# reaches a readable sample (validation loss under 2.0 nats per character) in under 5 minutes.
PRESETS = {
    "tiny": dict(  # seconds: smoke tests
        model=dict(n_layer=1, n_head=2, n_kv_head=2, d_model=32, seq_len=32),
        batch_size=8, steps=40, lr=3e-3, warmup=5, eval_interval=20, eval_batches=2,
        ckpt_interval=20, sample_tokens=60),
    "cpu": dict(  # minutes on 2 CPU cores
        model=dict(n_layer=4, n_head=4, n_kv_head=4, d_model=128, seq_len=128),
        batch_size=16, steps=1200, lr=3e-3, warmup=60, eval_interval=200, eval_batches=8,
        ckpt_interval=200, sample_tokens=300),
    "gpu-small": dict(  # nanoGPT's shakespeare-char model
        model=dict(n_layer=6, n_head=6, n_kv_head=6, d_model=384, seq_len=256),
        batch_size=64, steps=5000, lr=1e-3, warmup=100, eval_interval=250, eval_batches=20,
        ckpt_interval=500, sample_tokens=500),
    "gpu-gpt2": dict(  # the GPT-2 124M shape, BPE tokens
        model=dict(n_layer=12, n_head=12, n_kv_head=12, d_model=768, seq_len=1024),
        tokenizer="bpe", bpe_vocab_size=8192,
        batch_size=16, steps=5000, lr=6e-4, warmup=200, eval_interval=250, eval_batches=20,
        ckpt_interval=500, sample_tokens=300),
}

# Settings every preset shares unless it says otherwise.
DEFAULTS = dict(tokenizer="char", bpe_vocab_size=1024, min_lr_ratio=0.1, weight_decay=0.1,
                beta1=0.9, beta2=0.95, grad_clip=1.0, log_interval=10, seed=1337, device="cpu",
                pos="rope", norm="rmsnorm", act="gelu", temperature=0.8,
                matmul_precision=None)  # None: "high" (TF32) on cuda; CPU matmuls are always fp32

# The matmul precision a cuda run uses unless told otherwise: TF32 tensor cores, as nanoGPT and
# llm.c train GPT-2 (torch.set_float32_matmul_precision("high")).
CUDA_MATMUL_PRECISION = "high"

BPE_TRAIN_CHARS = 2_000_000  # BPE merges are learned on the first 2 MB of the training text


def resolve_settings(preset: str, overrides: dict) -> dict:
    """The preset's settings with DEFAULTS filled in and the non-None overrides applied."""
    if preset not in PRESETS:
        raise ValueError(f"--preset: expected one of {list(PRESETS)}, got {preset!r}")
    s = dict(DEFAULTS)
    p = dict(PRESETS[preset])
    s["model"] = dict(p.pop("model"))
    s.update(p)
    s["preset"] = preset
    for key, value in overrides.items():
        if value is None:
            continue
        if key in ("seq_len", "n_layer", "n_head", "n_kv_head", "d_model"):
            s["model"][key] = value
        else:
            s[key] = value
    return s


def train_step(model, opt, x, y, *, lr: float, grad_clip: float) -> tuple[float, float]:
    """One update: forward with the loss on tokens x and targets y, backward, global-norm clipping
    at grad_clip, AdamW at lr. Returns (loss, gradient norm before clipping). When either is not
    finite the update is skipped, so the weights stay the last good ones; the caller decides what
    that means (`llmcore train` stops, an experiment raises)."""
    _, loss = model.forward(x, y)
    norm = float("nan")
    if math.isfinite(loss):
        model.zero_grad()
        model.backward()
        norm = grad_norm(opt.params, opt.be)
    if math.isfinite(loss) and math.isfinite(norm):
        opt.step(lr, grad_scale=clip_scale(norm, grad_clip))  # clipping applied as AdamW reads each gradient
    return loss, norm


def evaluate(model, tokens, batch_size, seq_len, max_batches) -> float:
    """Mean loss per token over fixed validation windows (data.eval_batches)."""
    total, count = 0.0, 0
    for x, y in data.eval_batches(tokens, batch_size, seq_len, max_batches):
        _, loss = model.forward(x, y)
        total += loss * x.size
        count += x.size
    return total / count


def _build_tokenizer(s, train_text, full_text):
    if s["tokenizer"] == "char":
        # Characters come from the whole corpus, so the validation split never has an unknown one.
        return CharTokenizer.train(full_text)
    if s["tokenizer"] == "bpe":
        return BPETokenizer.train(train_text[:BPE_TRAIN_CHARS], s["bpe_vocab_size"])
    raise ValueError(f"--tokenizer: expected 'char' or 'bpe', got {s['tokenizer']!r}")


def _load_metrics(path: Path, upto_step: int) -> list[dict]:
    """Metrics lines up to a step: a resumed run forgets those written after its checkpoint."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
        if row.get("step", 0) <= upto_step:
            rows.append(row)
    return rows


def plot_losses(rows, path: Path) -> str:
    """Writes the loss curve; returns a one-line message."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: skipping the loss curve (pip install 'llmcore[plot]')"
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"loss curve: {path}"


def flops_per_token(cfg: GPTConfig, n_params: int) -> float:
    """6N + 12·L·C·T (DESIGN.md, calc.flops_per_token): the matmul FLOPs of one forward and
    backward pass per token of this model."""
    return calc.flops_per_token(n_params, cfg.n_layer, cfg.d_model, cfg.seq_len)


def _apply_matmul_precision(s, log) -> str:
    """Sets the GPU matmul precision of a cuda run; returns a few words for the model line."""
    want = s.get("matmul_precision")
    if want is not None and want not in MATMUL_PRECISIONS:
        raise ValueError(f"--matmul-precision: expected one of {list(MATMUL_PRECISIONS)}, got {want!r}")
    if s["device"] != "cuda":
        if want is not None:
            log(f"note: --matmul-precision {want} applies to --device cuda only; ignored on "
                f"{s['device']}, whose matmuls are always float32")
        return ""
    precision = want or CUDA_MATMUL_PRECISION
    set_matmul_precision(precision)
    return f", matmul precision {precision} ({MATMUL_PRECISIONS[precision]})"


def train(preset="cpu", out="out", resume=False, log=print, **overrides) -> int:
    """Runs (or resumes) training; returns a process exit code (0 ok, 1 stopped on a bad loss).

    device "cpu" (default), "numpy" or "cuda" (the model, its gradients and AdamW's moments on the
    GPU as CuPy arrays). A cuda run sets llmcore.ops.set_matmul_precision to matmul_precision
    ("high", TF32, unless given) and restores the previous setting when it ends."""
    before = get_matmul_precision()
    try:
        return _train(preset, out, resume, log, **overrides)
    finally:
        if get_matmul_precision() != before:
            set_matmul_precision(before)


def _train(preset, out, resume, log, **overrides) -> int:
    from tqdm import tqdm

    out = Path(out)
    state_meta = None
    if resume:
        state_meta, model_arrays, opt_arrays = ckpt.load(out)
        s = dict(state_meta["train"])
        for key in ("steps", "device", "eval_interval", "ckpt_interval", "eval_batches", "log_interval",
                    "sample_tokens", "matmul_precision"):
            if overrides.get(key) is not None:
                s[key] = overrides[key]
        if overrides.get("data") is not None:
            s["data"] = overrides["data"]
    else:
        for old in (out / ckpt.NAME, out / (ckpt.NAME + ".old")):
            if (old / "checkpoint.json").exists():
                raise FileExistsError(f"{out} already holds a checkpoint: pass --resume to continue it, "
                                      "or choose another --out")
        s = resolve_settings(preset, overrides)
        s["data"] = None if overrides.get("data") is None else str(Path(overrides["data"]).resolve())

    be = nn.get_backend(s["device"])  # before the data: "cuda" without CuPy or a GPU fails at once
    t0 = time.time()
    docs = data.load_documents(s["data"])
    train_text, val_text = data.split_documents(docs)
    if state_meta is not None:
        tok = tokenizer_from_dict(state_meta["tokenizer"])
        cfg = GPTConfig.from_dict(state_meta["config"])
    else:
        tok = _build_tokenizer(s, train_text, train_text + val_text)
        m = s["model"]
        cfg = GPTConfig(vocab_size=tok.vocab_size, seq_len=m["seq_len"], n_layer=m["n_layer"],
                        n_head=m["n_head"], n_kv_head=m["n_kv_head"], d_model=m["d_model"],
                        pos=s["pos"], norm=s["norm"], act=s["act"])
    train_tokens = tok.encode(train_text).astype(np.int32)
    val_tokens = tok.encode(val_text).astype(np.int32)
    data.check_split_size("training", train_tokens, cfg.seq_len)
    data.check_split_size("validation", val_tokens, cfg.seq_len)
    source = s["data"] or "bundled Shakespeare"
    log(f"data: {source}: {len(docs)} document(s), {len(train_tokens):,} training and "
        f"{len(val_tokens):,} validation tokens ({tok.kind} tokenizer, vocabulary {tok.vocab_size}); "
        f"prepared in {time.time() - t0:.1f}s")

    model = GPT(cfg, backend=be, seed=s["seed"])
    precision_note = _apply_matmul_precision(s, log)
    params = model.parameters()
    opt = AdamW(params, lr=s["lr"], betas=(s["beta1"], s["beta2"]), weight_decay=s["weight_decay"],
                backend=be)
    rng = np.random.default_rng(s["seed"])
    step, elapsed_before = 0, 0.0
    if state_meta is not None:
        ckpt.load_model_arrays(model, model_arrays)
        opt.load_state_arrays(opt_arrays, state_meta["optimizer_step"])
        rng.bit_generator.state = state_meta["rng"]
        step, elapsed_before = state_meta["step"], state_meta.get("elapsed", 0.0)
        log(f"resumed from {ckpt.find(out)} at step {step}")
    log(f"model: {model.num_params():,} parameters, {cfg.n_layer} layers, d_model {cfg.d_model}, "
        f"{cfg.n_head} heads ({cfg.n_kv_head} K/V), seq_len {cfg.seq_len}, {cfg.pos}, {cfg.norm}, "
        f"{cfg.act}; backend {model.backend}{precision_note}")
    fpt = flops_per_token(cfg, model.num_params())

    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"
    rows = _load_metrics(metrics_path, step)
    metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics = open(metrics_path, "a")

    def save_checkpoint():
        ckpt.save(out, {k: be.to_host(p.data) for k, p in params.items()},
                  {k: be.to_host(a) for k, a in opt.state_arrays().items()}, {
            "step": step, "optimizer_step": opt.step_count, "rng": rng.bit_generator.state,
            "elapsed": elapsed_before + time.time() - t_start, "config": cfg.to_dict(),
            "tokenizer": tok.to_dict(), "train": s})

    def run_eval():
        val = evaluate(model, val_tokens, s["batch_size"], cfg.seq_len, s["eval_batches"])
        row = {"step": step, "val_loss": val, "elapsed": elapsed_before + time.time() - t_start}
        metrics.write(json.dumps(row) + "\n")
        metrics.flush()
        rows.append(row)
        return val

    total, B, T = s["steps"], s["batch_size"], cfg.seq_len
    min_lr = s["lr"] * s["min_lr_ratio"]
    t_start = time.time()
    bar = tqdm(total=total, initial=step, unit="step", dynamic_ncols=True, mininterval=0.5)
    # Throughput counts the training steps only (not evaluation, checkpoints or sampling). On cuda
    # each step waits for the GPU twice (float(loss), the gradient norm), so the clock is honest.
    step_first, train_time, train_time_last, step_last, last_val = step, 0.0, 0.0, step, None
    try:
        while step < total:
            t_step = time.perf_counter()
            lr = lr_schedule(step, max_lr=s["lr"], min_lr=min_lr, warmup=s["warmup"], total=total)
            x, y = data.get_batch(train_tokens, B, T, rng)
            loss, norm = train_step(model, opt, x, y, lr=lr, grad_clip=s["grad_clip"])
            if not (math.isfinite(loss) and math.isfinite(norm)):
                # Stop before the update: the weights on disk are the last good ones.
                bar.close()
                what = f"training loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {norm}"
                try:
                    kept = f"The last good checkpoint is kept in {ckpt.find(out)}."
                except ckpt.CheckpointError:
                    kept = "No checkpoint was written yet."
                log(f"error: the {what} at step {step + 1}: stopping. {kept} Try a lower --lr.")
                return 1
            train_time += time.perf_counter() - t_step
            step += 1
            bar.update(1)
            if step % s["log_interval"] == 0 or step == total:
                now = time.time()
                tok_s = (step - step_last) * B * T / max(train_time - train_time_last, 1e-9)
                train_time_last, step_last = train_time, step
                row = {"step": step, "loss": loss, "lr": lr, "grad_norm": norm, "tokens_per_s": tok_s,
                       "model_tflops": tok_s * fpt / 1e12, "elapsed": elapsed_before + now - t_start}
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()  # on disk before any checkpoint that covers it
                rows.append(row)
                bar.set_postfix_str(f"loss {loss:.3f}, {tok_s:,.0f} tok/s"
                                    + (f", val {last_val:.3f}" if last_val is not None else ""), refresh=False)
            if step % s["eval_interval"] == 0 or step == total:
                last_val = run_eval()
                bar.write(f"step {step}: train loss {loss:.4f}, validation loss {last_val:.4f}")
            if step % s["ckpt_interval"] == 0 or step == total:
                save_checkpoint()
    finally:
        bar.close()
        metrics.close()
    wall = time.time() - t_start
    log(f"trained to step {step} in {wall:.1f}s this run ({elapsed_before + wall:.1f}s in all); "
        f"checkpoint: {out / ckpt.NAME}")
    if step > step_first:
        tok_s = (step - step_first) * B * T / max(train_time, 1e-9)
        log(f"throughput: {tok_s:,.0f} tokens/s on {model.backend} "
            f"({tok_s * fpt / 1e12:.2f} TFLOP/s of model matmuls, 6N + 12·L·C·T = {fpt / 1e9:.3g} GFLOP/token)")
    if last_val is not None:
        log(f"final validation loss: {last_val:.4f}")
    log(plot_losses(rows, out / "loss.png"))
    if s["sample_tokens"] > 0:
        prompt = tok.encode("\n") if tok.kind == "bpe" or "\n" in getattr(tok, "stoi", {}) else train_tokens[:1]
        ids = model.generate(np.asarray(prompt, dtype=np.int64), s["sample_tokens"],
                             temperature=s["temperature"], seed=s["seed"])
        log(f"--- sample ({s['sample_tokens']} tokens, temperature {s['temperature']}) ---")
        log(tok.decode(ids))
    return 0
