"""`llmcore calc`: a transformer's size, compute, training cost, KV cache and Chinchilla budget.

Every number comes from a small pure function below, from a model shape given by preset or flags:

  parameters      by part: token embedding, learned position embedding, attention q/k/v/o (k and v
                  sized by the K/V heads), FFN (gelu: 2 matrices, swiglu: 3), norms, untied lm_head
  FLOPs/token     6N + 12·L·C·T, N = all parameters, embeddings included (see flops_per_token)
  training        FLOPs = FLOPs/token x tokens; time = FLOPs / (GPUs x peak x MFU); cost = GPU-hours x price
  KV cache        2·L·Hkv·D·bytes per token, at MHA, GQA-k for every divisor k of n_head, and MQA
  Chinchilla      ~20 tokens per parameter; for a compute budget C = 6ND, N = sqrt(C/120), D = 20N

The seed's KV-cache table (32 query heads; MHA 100%, GQA-8 25%, MQA 3%) is Llama 3 8B's attention:
32 query heads sharing 8 K/V heads, d_model 4096 (the seed's own example width), and the seed names
Llama 3 8B and its 15 trillion training tokens. So the seed's example is

    llmcore calc --preset llama3-8b --tokens 15T

or, the same shape by numbers,

    llmcore calc --n-layer 32 --d-model 4096 --n-head 32 --n-kv-head 8 --vocab-size 128256 \\
        --seq-len 8192 --ffn swiglu --ffn-hidden 14336 --untie-embeddings --tokens 15T
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass

CHINCHILLA_TOKENS_PER_PARAM = 20  # Hoffmann et al. 2022, the seed's "approximately 20 tokens per parameter"
CHAR_VOCAB = 65  # distinct characters of the bundled Shakespeare: the char presets' vocabulary

# Defaults of the training estimate: an H100 SXM's dense bf16 tensor-core peak, a typical large-run
# model FLOP utilisation, and a rental price per GPU-hour (an assumption: change it with the flag).
H100_BF16_TFLOPS = 989.0
DEFAULT_MFU = 0.4
DEFAULT_PRICE_PER_GPU_HOUR = 2.0


@dataclass(frozen=True)
class Shape:
    """A decoder-only transformer, as far as its size and compute go."""
    n_layer: int
    d_model: int
    n_head: int  # query heads
    n_kv_head: int  # key/value heads: n_head is MHA, 1 is MQA, a divisor in between GQA
    vocab_size: int
    seq_len: int  # training context: T of the 12·L·C·T attention term
    ffn_hidden: int
    ffn: str = "gelu"  # "gelu": up and down matrices (also ReLU's count); "swiglu": gate, up, down
    tie_embeddings: bool = True  # lm_head reuses the token embedding
    bias: bool = False  # biases in every linear layer (GPT-2, GPT-3) or none (Llama)
    norm: str = "rmsnorm"  # "rmsnorm": a gain; "layernorm": a gain and a bias
    pos: str = "rope"  # only "learned" has parameters (a seq_len x d_model table)

    def __post_init__(self):
        for name in ("n_layer", "d_model", "n_head", "n_kv_head", "vocab_size", "seq_len", "ffn_hidden"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')}: expected a positive integer, got {value!r}")
        if self.d_model % self.n_head:
            raise ValueError(f"--d-model ({self.d_model}) must be divisible by --n-head ({self.n_head})")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"--n-kv-head ({self.n_kv_head}) must divide --n-head ({self.n_head})")
        if self.ffn not in ("gelu", "swiglu"):
            raise ValueError(f"--ffn: expected 'gelu' or 'swiglu', got {self.ffn!r}")
        if self.norm not in ("rmsnorm", "layernorm"):
            raise ValueError(f"--norm: expected 'rmsnorm' or 'layernorm', got {self.norm!r}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head


# ---------------------------------------------------------------------------------------------
# Presets. ffn_hidden None means the FFN rule of default_ffn_hidden, so that --d-model on a GPT
# preset scales its FFN the way the architecture defines it (4·d_model).

PUBLISHED_SHAPES = {
    "gpt2-124m": dict(n_layer=12, d_model=768, n_head=12, vocab_size=50257, seq_len=1024, ffn="gelu",
                      tie_embeddings=True, bias=True, norm="layernorm", pos="learned"),
    "gpt3-175b": dict(n_layer=96, d_model=12288, n_head=96, vocab_size=50257, seq_len=2048, ffn="gelu",
                      tie_embeddings=True, bias=True, norm="layernorm", pos="learned"),
    "llama3-8b": dict(n_layer=32, d_model=4096, n_head=32, n_kv_head=8, vocab_size=128256, seq_len=8192,
                      ffn="swiglu", ffn_hidden=14336, tie_embeddings=False, bias=False, norm="rmsnorm", pos="rope"),
    "llama3-70b": dict(n_layer=80, d_model=8192, n_head=64, n_kv_head=8, vocab_size=128256, seq_len=8192,
                       ffn="swiglu", ffn_hidden=28672, tie_embeddings=False, bias=False, norm="rmsnorm", pos="rope"),
}

# The published parameter counts the calculator is checked against (tests/test_calc.py: within 2%).
PUBLISHED_PARAMS = {"gpt2-124m": 124e6, "gpt3-175b": 175e9, "llama3-8b": 8.03e9, "llama3-70b": 70.6e9}


def project_shapes() -> dict[str, dict]:
    """The model shapes of `llmcore train`'s presets. Imported when asked for, so that the formulas
    here need nothing beyond the standard library (and no import cycle with train can arise)."""
    from .train import PRESETS, resolve_settings

    shapes = {}
    for name in PRESETS:
        s = resolve_settings(name, {})
        m = s["model"]
        vocab = s["bpe_vocab_size"] if s["tokenizer"] == "bpe" else CHAR_VOCAB
        # llmcore's GPT: MLP of 4·d_model with two matrices (gelu or relu), tied lm_head, no biases.
        shapes[name] = dict(n_layer=m["n_layer"], d_model=m["d_model"], n_head=m["n_head"],
                            n_kv_head=m["n_kv_head"], vocab_size=vocab, seq_len=m["seq_len"], ffn="gelu",
                            tie_embeddings=True, bias=False, norm=s["norm"], pos=s["pos"])
    return shapes


def preset_names() -> list[str]:
    return [*PUBLISHED_SHAPES, *project_shapes()]


def default_ffn_hidden(d_model: int, ffn: str) -> int:
    """gelu: 4·d_model (GPT). swiglu: 2/3 of that, rounded up to a multiple of 256 (Llama's rule
    before its per-model multiplier), so a SwiGLU FFN's three matrices hold about a GELU FFN's count."""
    if ffn == "gelu":
        return 4 * d_model
    return 256 * math.ceil(int(8 * d_model / 3) / 256)


def resolve_shape(preset: str | None, overrides: dict) -> Shape:
    """The preset's shape (or none) with the non-None overrides applied; missing sizes are an error."""
    spec = {}
    if preset is not None:
        shapes = {**PUBLISHED_SHAPES, **project_shapes()}
        if preset not in shapes:
            raise ValueError(f"--preset: expected one of {list(shapes)}, got {preset!r}")
        spec = dict(shapes[preset])
    spec.update({k: v for k, v in overrides.items() if v is not None})
    missing = [k for k in ("n_layer", "d_model", "n_head", "vocab_size", "seq_len") if k not in spec]
    if missing:
        flags = ", ".join("--" + k.replace("_", "-") for k in missing)
        raise ValueError(f"give --preset, or the model's sizes: missing {flags}")
    spec.setdefault("n_kv_head", spec["n_head"])  # MHA unless told otherwise
    if spec.get("ffn_hidden") is None:
        spec["ffn_hidden"] = default_ffn_hidden(spec["d_model"], spec.get("ffn", "gelu"))
    return Shape(**spec)


# ---------------------------------------------------------------------------------------------
# Parameters.

def linear_params(d_in: int, d_out: int, bias: bool) -> int:
    """A (d_out, d_in) weight, plus d_out biases when the model has them."""
    return d_in * d_out + (d_out if bias else 0)


def norm_params(d_model: int, norm: str) -> int:
    """RMSNorm has a gain per channel; LayerNorm a gain and a bias."""
    return d_model * (2 if norm == "layernorm" else 1)


def attention_params(s: Shape) -> dict[str, int]:
    """One layer's q, k, v, o projections. k and v map to n_kv_head heads only: that is GQA's saving."""
    q_dim, kv_dim = s.n_head * s.head_dim, s.n_kv_head * s.head_dim
    return {"attention q": linear_params(s.d_model, q_dim, s.bias),
            "attention k": linear_params(s.d_model, kv_dim, s.bias),
            "attention v": linear_params(s.d_model, kv_dim, s.bias),
            "attention o": linear_params(q_dim, s.d_model, s.bias)}


def ffn_params(s: Shape) -> int:
    """One layer's FFN: up and down (gelu), plus a gate of the up's size (swiglu)."""
    up = linear_params(s.d_model, s.ffn_hidden, s.bias)
    down = linear_params(s.ffn_hidden, s.d_model, s.bias)
    return (2 if s.ffn == "swiglu" else 1) * up + down


def layer_params(s: Shape) -> dict[str, int]:
    """One transformer block by part: attention, FFN, and its two norms (before attention, before FFN)."""
    return {**attention_params(s), "ffn": ffn_params(s), "norms": 2 * norm_params(s.d_model, s.norm)}


def param_counts(s: Shape) -> dict[str, int]:
    """The whole model by part. A tied lm_head is the token embedding and counts 0 here."""
    counts = {"token embedding": s.vocab_size * s.d_model,
              "position embedding": s.seq_len * s.d_model if s.pos == "learned" else 0}
    counts.update({part: s.n_layer * n for part, n in layer_params(s).items()})
    counts["final norm"] = norm_params(s.d_model, s.norm)
    counts["lm_head"] = 0 if s.tie_embeddings else s.vocab_size * s.d_model  # no bias, in every model here
    return counts


def non_embedding_params(counts: dict[str, int]) -> int:
    """Kaplan et al.'s N: without the token and position tables, which are lookups, not matmuls.
    An untied lm_head stays in: it is a matmul on every token."""
    return sum(counts.values()) - counts["token embedding"] - counts["position embedding"]


# ---------------------------------------------------------------------------------------------
# Compute, time, cost.

def flops_per_token(n_params: int, n_layer: int, d_model: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N + 12·L·C·T (forward 2N + 4LCT, backward twice that).

    N is ALL parameters, embeddings included, as this project's MFU (train.flops_per_token with
    model.num_params()) and llm.c count it; Kaplan's C = 6N uses the non-embedding N instead, which
    is smaller by the embedding tables. 12·L·C·T is the attention scores and weighted sum (q·k and
    p·v) over the full T x T square, masked half included, as PaLM (appendix B) and nanoGPT count
    it (llm.c counts 6·L·C·T, the causal half); it depends on the query width C = n_head·D, not on
    the K/V heads."""
    return 6.0 * n_params + 12.0 * n_layer * d_model * seq_len


def training_flops(fpt: float, tokens: float) -> float:
    return fpt * tokens


def training_seconds(flops: float, tflops: float, mfu: float, gpus: int) -> float:
    """Wall time on `gpus` accelerators of `tflops` peak, each doing useful work at fraction `mfu`."""
    return flops / (gpus * tflops * 1e12 * mfu)


def training_cost(seconds: float, gpus: int, price_per_gpu_hour: float) -> float:
    return gpus * seconds / 3600.0 * price_per_gpu_hour


# ---------------------------------------------------------------------------------------------
# KV cache.

def kv_cache_bytes_per_token(n_layer: int, n_kv_head: int, head_dim: int, dtype_bytes: float) -> float:
    """2 (K and V) · L · Hkv · D · bytes per element: what one more token of context costs."""
    return 2 * n_layer * n_kv_head * head_dim * dtype_bytes


def attention_kind(n_head: int, n_kv_head: int) -> str:
    """MHA, MQA or GQA-k, k the number of K/V heads (the seed's GQA-8: 32 query heads, 8 K/V heads)."""
    if n_kv_head == n_head:
        return "MHA"
    return "MQA" if n_kv_head == 1 else f"GQA-{n_kv_head}"


def kv_cache_table(s: Shape, context: int, dtype_bytes: float) -> list[dict]:
    """One row per valid K/V head count (the divisors of n_head), MHA first, MQA last."""
    mha = kv_cache_bytes_per_token(s.n_layer, s.n_head, s.head_dim, dtype_bytes)
    rows = []
    for kv in sorted((k for k in range(1, s.n_head + 1) if s.n_head % k == 0), reverse=True):
        per_token = kv_cache_bytes_per_token(s.n_layer, kv, s.head_dim, dtype_bytes)
        rows.append({"attention": attention_kind(s.n_head, kv), "n_kv_head": kv, "bytes_per_token": per_token,
                     "bytes_for_context": per_token * context, "percent_of_mha": 100.0 * per_token / mha,
                     "this_model": kv == s.n_kv_head})
    return rows


# ---------------------------------------------------------------------------------------------
# Chinchilla.

def chinchilla_tokens(n_params: float) -> float:
    """Compute-optimal training tokens for a model of n_params: about 20 per parameter.
    Hoffmann et al. count all parameters, embeddings included: the same N as flops_per_token."""
    return CHINCHILLA_TOKENS_PER_PARAM * n_params


def compute_optimal(compute: float) -> tuple[float, float]:
    """(N, D) for a budget of `compute` FLOPs: C = 6ND with D = 20N gives N = sqrt(C / 120)."""
    n = math.sqrt(compute / (6 * CHINCHILLA_TOKENS_PER_PARAM))
    return n, chinchilla_tokens(n)


# ---------------------------------------------------------------------------------------------
# The report: every number once, as a dict (--json prints it, format_report lays it out).

def report(s: Shape, *, preset=None, tokens=None, tflops=H100_BF16_TFLOPS, mfu=DEFAULT_MFU, gpus=1,
           price_per_gpu_hour=DEFAULT_PRICE_PER_GPU_HOUR, dtype_bytes=2.0, context=None, compute=None) -> dict:
    counts = param_counts(s)
    n = sum(counts.values())
    fpt = flops_per_token(n, s.n_layer, s.d_model, s.seq_len)
    tokens_from = "--tokens" if tokens is not None else "chinchilla"
    tokens = tokens if tokens is not None else chinchilla_tokens(n)
    flops = training_flops(fpt, tokens)
    seconds = training_seconds(flops, tflops, mfu, gpus)
    context = context or s.seq_len
    per_token = kv_cache_bytes_per_token(s.n_layer, s.n_kv_head, s.head_dim, dtype_bytes)
    rep = {
        "preset": preset,
        "model": {**asdict(s), "head_dim": s.head_dim, "attention": attention_kind(s.n_head, s.n_kv_head)},
        "params": {"by_part": counts, "per_layer": layer_params(s), "total": n,
                   "non_embedding": non_embedding_params(counts), "published": PUBLISHED_PARAMS.get(preset)},
        "flops_per_token": {"n_counted": "all parameters, embeddings included", "six_n": 6.0 * n,
                            "attention": fpt - 6.0 * n, "total": fpt},
        "training": {"tokens": tokens, "tokens_from": tokens_from, "flops": flops, "tflops_per_gpu": tflops,
                     "mfu": mfu, "gpus": gpus, "seconds": seconds, "gpu_hours": gpus * seconds / 3600.0,
                     "price_per_gpu_hour": price_per_gpu_hour,
                     "cost_usd": training_cost(seconds, gpus, price_per_gpu_hour)},
        "kv_cache": {"dtype_bytes": dtype_bytes, "context": context, "bytes_per_token": per_token,
                     "bytes_for_context": per_token * context, "table": kv_cache_table(s, context, dtype_bytes)},
        "chinchilla": {"tokens_per_param": CHINCHILLA_TOKENS_PER_PARAM, "optimal_tokens": chinchilla_tokens(n),
                       "budget_tokens_per_param": tokens / n, "compute": None},
    }
    if compute is not None:
        n_opt, d_opt = compute_optimal(compute)
        rep["chinchilla"]["compute"] = {"flops": compute, "n_opt": n_opt, "d_opt": d_opt,
                                        "seconds": training_seconds(compute, tflops, mfu, gpus)}
    return rep


# ---------------------------------------------------------------------------------------------
# Humanised units.

def _scaled(x: float, units: list[tuple[float, str]]) -> str:
    """x in the largest unit not above it, three significant digits."""
    for size, name in units:
        if abs(x) >= size:
            return f"{x / size:.3g} {name}".rstrip()
    return f"{x:.3g} {units[-1][1]}".rstrip()


def human_count(x: float) -> str:
    """8.03 B, 15 T: counts of parameters and tokens."""
    return _scaled(x, [(1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K"), (1, "")])


def human_flops(x: float) -> str:
    """SI-prefixed FLOP with the exponent beside it: 9.16e+23 FLOP (916 ZFLOP)."""
    prefixes = [(1e30, "QFLOP"), (1e27, "RFLOP"), (1e24, "YFLOP"), (1e21, "ZFLOP"), (1e18, "EFLOP"),
                (1e15, "PFLOP"), (1e12, "TFLOP"), (1e9, "GFLOP"), (1e6, "MFLOP"), (1e3, "kFLOP"), (1, "FLOP")]
    return f"{x:.3g} FLOP ({_scaled(x, prefixes)})"


def human_bytes(x: float) -> str:
    return _scaled(x, [(2.0 ** 40, "TiB"), (2.0 ** 30, "GiB"), (2.0 ** 20, "MiB"), (2.0 ** 10, "KiB"), (1, "B")])


def human_seconds(x: float) -> str:
    return _scaled(x, [(365.25 * 86400, "years"), (86400, "days"), (3600, "hours"), (60, "minutes"),
                       (1, "seconds")])


def _number(x: float) -> str:
    """Thousands separated when large, three significant digits when small: 643,184 or 0.0242."""
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def human_dollars(x: float) -> str:
    return f"${x:,.0f}" if x >= 100 else f"${x:,.2f}"


# ---------------------------------------------------------------------------------------------
# Text layout.

def _table(rows: list[list[str]], right: set[int]) -> list[str]:
    """Columns padded to their widest cell; the columns in `right` aligned right (numbers)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]

    def line(row):
        return "  " + "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
    return [line(r).rstrip() for r in rows]


def _model_line(rep: dict) -> str:
    m = rep["model"]
    return (f"{m['n_layer']} layers, d_model {m['d_model']}, {m['n_head']} query heads of dim {m['head_dim']}, "
            f"{m['n_kv_head']} K/V heads ({m['attention']}), FFN {m['ffn']} {m['ffn_hidden']}, "
            f"vocab {m['vocab_size']:,}, seq_len {m['seq_len']:,}, {m['norm']}, {m['pos']} positions, "
            f"{'tied' if m['tie_embeddings'] else 'untied'} embeddings, {'biases' if m['bias'] else 'no biases'}")


def _params_lines(rep: dict) -> list[str]:
    p = rep["params"]
    total = p["total"]
    rows = [["part", "per layer", "total", "share"]]
    for part, n in p["by_part"].items():
        per_layer = f"{p['per_layer'][part]:,}" if part in p["per_layer"] else ""
        rows.append([part, per_layer, f"{n:,}", f"{100 * n / total:.1f}%"])
    rows.append(["total", "", f"{total:,}", human_count(total)])
    rows.append(["non-embedding (Kaplan)", "", f"{p['non_embedding']:,}", human_count(p["non_embedding"])])
    lines = ["parameters", *_table(rows, right={1, 2, 3})]
    if p["published"]:
        off = 100 * (total - p["published"]) / p["published"]
        lines.append(f"  published: {human_count(p['published'])} (computed is {off:+.2f}%)")
    return lines


def _compute_lines(rep: dict) -> list[str]:
    f, t, m = rep["flops_per_token"], rep["training"], rep["model"]
    source = "the Chinchilla-optimal budget; --tokens to change" if t["tokens_from"] == "chinchilla" else "--tokens"
    rows = [["6N", human_flops(f["six_n"])],
            [f"12·L·C·T (T = {m['seq_len']:,})", human_flops(f["attention"])],
            ["total", human_flops(f["total"])]]
    lines = [f"FLOPs per token (training, N = {f['n_counted']})", *_table(rows, right=set())]
    rows = [["tokens", f"{human_count(t['tokens'])} ({source})"],
            ["FLOPs", human_flops(t["flops"])],
            ["on", f"{t['gpus']} x {t['tflops_per_gpu']:g} TFLOP/s peak at {100 * t['mfu']:g}% MFU"],
            ["time", f"{human_seconds(t['seconds'])} ({_number(t['gpu_hours'])} GPU-hours)"],
            ["cost", f"{human_dollars(t['cost_usd'])} at ${t['price_per_gpu_hour']:g}/GPU-hour"]]
    return lines + ["", "training", *_table(rows, right=set())]


def _kv_lines(rep: dict) -> list[str]:
    kv = rep["kv_cache"]
    head = (f"KV cache ({kv['dtype_bytes']:g} bytes per element): this model {human_bytes(kv['bytes_per_token'])} "
            f"per token, {human_bytes(kv['bytes_for_context'])} for {kv['context']:,} tokens")
    n_head = rep["model"]["n_head"]
    rows = [["attention", "query heads", "K/V heads", "per token", f"for {kv['context']:,} tokens", "of MHA", ""]]
    for r in kv["table"]:
        rows.append([r["attention"], str(n_head), str(r["n_kv_head"]), human_bytes(r["bytes_per_token"]),
                     human_bytes(r["bytes_for_context"]), f"{r['percent_of_mha']:.4g}%",
                     "<- this model" if r["this_model"] else ""])
    return [head, *_table(rows, right={1, 2, 3, 4, 5})]


def _chinchilla_lines(rep: dict) -> list[str]:
    c, n = rep["chinchilla"], rep["params"]["total"]
    lines = [f"Chinchilla (~{c['tokens_per_param']} tokens per parameter)",
             f"  optimal tokens for {human_count(n)} parameters: {human_count(c['optimal_tokens'])}",
             f"  this budget: {c['budget_tokens_per_param']:,.0f} tokens per parameter "
             f"({c['budget_tokens_per_param'] / c['tokens_per_param']:.3g}x the optimum)"]
    if c["compute"]:
        b = c["compute"]
        lines.append(f"  a budget of {human_flops(b['flops'])}: N = {human_count(b['n_opt'])} parameters, "
                     f"D = {human_count(b['d_opt'])} tokens (C = 6ND, D = 20N); "
                     f"{human_seconds(b['seconds'])} on the accelerators above")
    return lines


def format_report(rep: dict) -> str:
    title = f"llmcore calc: {rep['preset'] or 'custom model'}"
    parts = [[title, _model_line(rep)], _params_lines(rep), _compute_lines(rep), _kv_lines(rep),
             _chinchilla_lines(rep)]
    return "\n\n".join("\n".join(p) for p in parts)


# ---------------------------------------------------------------------------------------------
# The command.

_SUFFIXES = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12, "P": 1e15}


def _positive(kind):
    """An argparse type: a positive int or float, named in the error when it is not."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}") from None
        if not value > 0 or math.isinf(value):
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        return value
    parse.__name__ = kind.__name__
    return parse


def _count(text: str) -> float:
    """A positive count: 15e12, 15T, 300B, 2.5M."""
    scale = _SUFFIXES.get(text[-1:].upper(), 1.0)
    number = text[:-1] if scale != 1.0 else text
    try:
        return _positive(float)(number) * scale
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a positive count like 15e12 or 15T, got {text!r}") from None


def _fraction(text: str) -> float:
    value = _positive(float)(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}")
    return value


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Adds the `calc` subcommand to the `llmcore` command's subparsers."""
    p = subparsers.add_parser(
        "calc", help="parameters, FLOPs, training time and cost, KV cache, Chinchilla budget of a model shape",
        description=(__doc__ or "").split("\n\n")[0] + "\nGive --preset, or the sizes; flags override a preset.",
        epilog="example, the seed's GQA table (Llama 3 8B, 32 query heads, 8 K/V heads) on 15T tokens:\n"
               "  llmcore calc --preset llama3-8b --tokens 15T",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    model = p.add_argument_group("model")
    names = preset_names()
    model.add_argument("--preset", choices=names, metavar="NAME",
                       help=f"a published shape or an `llmcore train` preset: {', '.join(names)}")
    model.add_argument("--n-layer", type=_positive(int), metavar="N")
    model.add_argument("--d-model", type=_positive(int), metavar="N")
    model.add_argument("--n-head", type=_positive(int), metavar="N", help="query heads")
    model.add_argument("--n-kv-head", type=_positive(int), metavar="N",
                       help="K/V heads: = n_head is MHA (default), 1 is MQA, a divisor in between GQA")
    model.add_argument("--vocab-size", type=_positive(int), metavar="N")
    model.add_argument("--seq-len", type=_positive(int), metavar="N", help="training context, T in 12·L·C·T")
    model.add_argument("--ffn", choices=["gelu", "swiglu"], help="gelu: 2 FFN matrices (default); swiglu: 3")
    model.add_argument("--ffn-hidden", type=_positive(int), metavar="N",
                       help="FFN width (default: the preset's, else 4·d_model for gelu, "
                            "8·d_model/3 rounded up to 256 for swiglu)")
    model.add_argument("--untie-embeddings", dest="tie_embeddings", action="store_false", default=None,
                       help="a separate lm_head matrix (Llama); default tied (GPT-2)")
    model.add_argument("--tie-embeddings", dest="tie_embeddings", action="store_true", default=None,
                       help="lm_head reuses the token embedding")
    model.add_argument("--bias", action=argparse.BooleanOptionalAction, default=None,
                       help="biases in the linear layers (default: the preset's, else none)")
    model.add_argument("--norm", choices=["rmsnorm", "layernorm"], help="layernorm adds a bias per gain")
    model.add_argument("--pos", choices=["rope", "learned", "sinusoidal", "alibi"],
                       help="only learned positions have parameters (default rope)")
    train = p.add_argument_group("training estimate")
    train.add_argument("--tokens", type=_count, metavar="N",
                       help="training tokens, e.g. 15e12 or 15T (default: Chinchilla 20·N)")
    train.add_argument("--tflops", type=_positive(float), default=H100_BF16_TFLOPS,
                       help=f"peak TFLOP/s per accelerator (default {H100_BF16_TFLOPS:g}: H100 SXM, bf16 dense)")
    train.add_argument("--mfu", type=_fraction, default=DEFAULT_MFU,
                       help=f"model FLOP utilisation: the fraction of peak spent on model FLOPs "
                            f"(default {DEFAULT_MFU:g})")
    train.add_argument("--gpus", type=_positive(int), default=1, help="accelerators (default 1)")
    train.add_argument("--price-per-gpu-hour", type=_positive(float), metavar="DOLLARS",
                       default=DEFAULT_PRICE_PER_GPU_HOUR,
                       help=f"dollars per accelerator-hour (default {DEFAULT_PRICE_PER_GPU_HOUR:g}, "
                            "an assumed rental price)")
    train.add_argument("--compute", type=_positive(float), metavar="FLOPS",
                       help="also the Chinchilla-optimal N and D for this many FLOPs, e.g. 1e24")
    kv = p.add_argument_group("KV cache")
    kv.add_argument("--context", type=_positive(int), metavar="TOKENS",
                    help="tokens held in the cache (default: --seq-len)")
    kv.add_argument("--dtype-bytes", type=_positive(float), metavar="BYTES", default=2.0,
                    help="bytes per cached element (default 2: bf16/fp16; 1 for fp8)")
    p.add_argument("--json", action="store_true", help="print the same numbers as a JSON object")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    """Runs `llmcore calc`; 0, or 2 with a message when the model shape is incomplete or inconsistent."""
    overrides = {k: getattr(args, k) for k in ("n_layer", "d_model", "n_head", "n_kv_head", "vocab_size", "seq_len",
                                               "ffn", "ffn_hidden", "tie_embeddings", "bias", "norm", "pos")}
    try:
        shape = resolve_shape(args.preset, overrides)
    except ValueError as exc:
        print(f"llmcore calc: error: {exc}", file=sys.stderr)
        return 2
    rep = report(shape, preset=args.preset, tokens=args.tokens, tflops=args.tflops, mfu=args.mfu, gpus=args.gpus,
                 price_per_gpu_hour=args.price_per_gpu_hour, dtype_bytes=args.dtype_bytes, context=args.context,
                 compute=args.compute)
    print(json.dumps(rep, indent=2) if args.json else format_report(rep))
    return 0
