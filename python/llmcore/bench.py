"""`llmcore bench`: every compiled CPU kernel timed against the NumPy reference and PyTorch CPU.

For each operation and shape (shapes from real model configurations, below) it
  1. checks the kernel against llmcore.reference: ||ours - ref|| / ||ref|| must stay under TOLERANCE,
     and a kernel that fails is reported and never timed;
  2. times ours, the NumPy reference and (when importable) torch.nn.functional on the same inputs,
     keeping the median of several rounds, and notes how busy other processes kept the machine;
  3. rates ours in GFLOP/s (matmul, linear) or GB/s (everything else: bytes read + written once)
     and divides by this machine's measured ceilings (measure_ceilings).

Adding an operation takes two entries: its shapes in SHAPES / QUICK_SHAPES and a
builder registered with @register("name") that turns one Shape into its fwd and bwd Cases.
benchmarks/ (the pytest-benchmark suites) builds its cases from the same registry.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from . import ops, reference

# ours vs the float32 reference. Both round in float32 but in a different order; the largest honest
# gap seen at these shapes is ~1e-6 (long reductions), while a wrong kernel lands near 1e-1 or more.
TOLERANCE = 1e-4


# ---------------------------------------------------------------------------------------------
# Shapes, from the models llmcore trains.

@dataclass(frozen=True)
class Model:
    name: str
    C: int  # channels (n_embd)
    H: int  # attention heads
    T: int  # context length
    V: int  # vocabulary
    rows: int  # B*T rows in one batch


GPT2 = Model("gpt2-124M", C=768, H=12, T=1024, V=50257, rows=4096)  # B=4
CHAR = Model("char", C=256, H=4, T=128, V=65, rows=4096)  # the character-level default, B=32


@dataclass(frozen=True)
class Shape:
    model: str  # the configuration it comes from ("square" for plain GEMM sizes)
    what: str  # the tensor or layer of that model
    dims: dict = field(hash=False)  # the op's sizes by name (rows, C, M, K, N, V, ...)

    def __getitem__(self, key):
        return self.dims[key]


def _s(model, what, **dims) -> Shape:
    return Shape(model.name if isinstance(model, Model) else model, what, dims)


def _block_params(m: Model) -> int:
    """Parameters of one transformer block: 12 C^2 weights + 13 C biases and norm gains."""
    return 12 * m.C * m.C + 13 * m.C


# Full runs: GPT-2 small at B*T = 4096 (8192 rows for the norms so that x and y leave the 32 MiB
# L3 and the number is a DRAM number) and the char model. Cross-entropy over GPT-2's 50257 tokens
# runs at N=512 rows (a 103 MB logits array) to stay quick; lm_head likewise. Model "goal": the
# shapes at which DESIGN.md's CPU performance goals are stated (issue 5), rows of 1024 and GEMMs.
SHAPES: dict[str, list[Shape]] = {
    "matmul": [
        _s("square", "512^3", M=512, K=512, N=512),
        _s("square", "1024^3", M=1024, K=1024, N=1024),
        _s("square", "2048^3", M=2048, K=2048, N=2048),
        _s("goal", "(4096x768) @ (768x3072)", M=GPT2.rows, K=GPT2.C, N=4 * GPT2.C),
        _s(GPT2, "q @ k^T, 12 heads", batch=GPT2.H, M=GPT2.T, K=GPT2.C // GPT2.H, N=GPT2.T, transpose_b=True),
        _s(GPT2, "att @ v, 12 heads", batch=GPT2.H, M=GPT2.T, K=GPT2.T, N=GPT2.C // GPT2.H),
    ],
    "linear": [
        _s(GPT2, "c_attn", rows=GPT2.rows, c_in=GPT2.C, c_out=3 * GPT2.C, bias=True),
        _s(GPT2, "c_fc", rows=GPT2.rows, c_in=GPT2.C, c_out=4 * GPT2.C, bias=True),
        _s(GPT2, "mlp.c_proj", rows=GPT2.rows, c_in=4 * GPT2.C, c_out=GPT2.C, bias=True),
        _s(GPT2, "lm_head", rows=512, c_in=GPT2.C, c_out=GPT2.V, bias=False),
        _s(CHAR, "c_fc", rows=CHAR.rows, c_in=CHAR.C, c_out=4 * CHAR.C, bias=True),
        _s(CHAR, "lm_head", rows=CHAR.rows, c_in=CHAR.C, c_out=CHAR.V, bias=False),
    ],
    "softmax": [
        _s("goal", "8192x1024", rows=8192, C=1024),
        _s(GPT2, "attention probs, 12 heads", rows=GPT2.H * GPT2.T, C=GPT2.T),
        _s(CHAR, "attention probs, B=32", rows=32 * CHAR.H * CHAR.T, C=CHAR.T),
    ],
    "rmsnorm": [_s("goal", "8192x1024", rows=8192, C=1024), _s(GPT2, "ln", rows=2 * GPT2.rows, C=GPT2.C),
                _s(CHAR, "ln", rows=CHAR.rows, C=CHAR.C)],
    "layernorm": [_s(GPT2, "ln", rows=2 * GPT2.rows, C=GPT2.C), _s(CHAR, "ln", rows=CHAR.rows, C=CHAR.C)],
    "gelu": [_s("goal", "8192x1024", rows=8192, C=1024), _s(GPT2, "mlp hidden", rows=GPT2.rows, C=4 * GPT2.C),
             _s(CHAR, "mlp hidden", rows=CHAR.rows, C=4 * CHAR.C)],
    "cross_entropy": [_s(GPT2, "logits", N=512, V=GPT2.V), _s(CHAR, "logits", N=CHAR.rows, V=CHAR.V)],
    "embedding": [
        _s(GPT2, "wte", N=GPT2.rows, V=GPT2.V, C=GPT2.C),
        _s(CHAR, "wte", N=CHAR.rows, V=CHAR.V, C=CHAR.C),
    ],
    "adamw": [
        _s(GPT2, "one block's params", n=_block_params(GPT2)),
        _s(CHAR, "c_fc.weight", n=4 * CHAR.C * CHAR.C),
    ],
    # Causal self-attention at training shapes, and one GQA decoding step against a KV cache.
    "attention": [
        _s("goal", "B4 H8 T512 D64", B=4, T=512, S=512, H=8, Hkv=8, D=64),
        _s(GPT2, "attn, B=2", B=2, T=GPT2.T, S=GPT2.T, H=GPT2.H, Hkv=GPT2.H, D=GPT2.C // GPT2.H),
        _s(CHAR, "attn, B=32", B=32, T=CHAR.T, S=CHAR.T, H=CHAR.H, Hkv=CHAR.H, D=CHAR.C // CHAR.H),
        _s("llama3-8b", "decode 1 token, GQA-8", B=1, T=1, S=2048, H=32, Hkv=8, D=128),
    ],
}

# --quick: the same layers at fewer rows, so that a whole run takes seconds.
QUICK_SHAPES: dict[str, list[Shape]] = {
    "matmul": [
        _s("square", "512^3", M=512, K=512, N=512),
        _s(GPT2, "q @ k^T, 2 heads", batch=2, M=256, K=64, N=256, transpose_b=True),
    ],
    "linear": [
        _s(GPT2, "c_fc", rows=256, c_in=GPT2.C, c_out=4 * GPT2.C, bias=True),
        _s(CHAR, "lm_head", rows=512, c_in=CHAR.C, c_out=CHAR.V, bias=False),
    ],
    "softmax": [_s(GPT2, "attention probs, 1 head", rows=GPT2.T, C=GPT2.T),
                _s(CHAR, "attention probs", rows=1024, C=CHAR.T)],
    "rmsnorm": [_s(GPT2, "ln", rows=512, C=GPT2.C), _s(CHAR, "ln", rows=512, C=CHAR.C)],
    "layernorm": [_s(GPT2, "ln", rows=512, C=GPT2.C), _s(CHAR, "ln", rows=512, C=CHAR.C)],
    "gelu": [_s(GPT2, "mlp hidden", rows=256, C=4 * GPT2.C), _s(CHAR, "mlp hidden", rows=512, C=4 * CHAR.C)],
    "cross_entropy": [_s(GPT2, "logits", N=16, V=GPT2.V), _s(CHAR, "logits", N=512, V=CHAR.V)],
    "embedding": [_s(GPT2, "wte", N=256, V=GPT2.V, C=GPT2.C), _s(CHAR, "wte", N=512, V=CHAR.V, C=CHAR.C)],
    "adamw": [_s(CHAR, "c_fc.weight", n=4 * CHAR.C * CHAR.C)],
    "attention": [_s(CHAR, "attn, B=2", B=2, T=CHAR.T, S=CHAR.T, H=CHAR.H, Hkv=CHAR.H, D=CHAR.C // CHAR.H),
                  _s("llama3-8b", "decode 1 token, GQA-8, S=256", B=1, T=1, S=256, H=32, Hkv=8, D=128)],
}


# ---------------------------------------------------------------------------------------------
# Cases: one operation, one direction, one shape, with everything needed to check and time it.

@dataclass
class Case:
    op: str  # the public op, e.g. "linear" (its backward is direction "bwd", not a separate op)
    direction: str  # "fwd" or "bwd"
    shape: Shape
    label: str  # the sizes as printed, e.g. "4096x768->3072"
    make: Callable[[np.random.Generator], tuple]  # float32 inputs (int64 ids and targets)
    ours: Callable[..., Any]  # llmcore.ops on those inputs
    ref: Callable[..., Any]  # llmcore.reference on those inputs: the values that decide
    torch: Callable[..., Callable[[], Any]] | None = None  # (torch, *inputs) -> a call that runs it
    flops: float = 0.0  # > 0: rated in GFLOP/s against the matmul ceiling
    nbytes: float = 0.0  # bytes read + written once: GB/s against the copy ceiling
    inplace: bool = False  # updates its inputs: the correctness check runs on copies

    @property
    def group(self) -> str:
        """op/direction/shape: the pytest-benchmark group, unique per case."""
        return f"{self.op}/{self.direction}/{self.label}"


BUILDERS: dict[str, Callable[[Shape], list[Case]]] = {}


def register(stem: str):
    """Registers `builder(shape) -> [Case, ...]` for the shapes listed under `stem`."""
    def wrap(builder):
        BUILDERS[stem] = builder
        return builder
    return wrap


def cases(stem: str, quick: bool = False) -> list[Case]:
    """Every case of one operation stem at the full (or quick) shapes."""
    shapes = (QUICK_SHAPES if quick else SHAPES).get(stem, [])
    return [c for shape in shapes for c in BUILDERS[stem](shape)]


F32 = 4  # bytes per float32
I64 = 8  # bytes per int64 id or target


def _randn(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape, dtype=np.float32) * np.float32(scale))


def _grads(torch, outputs, inputs, upstream):
    """A call running only the backward of an already-built autograd graph, like training does."""
    return lambda: torch.autograd.grad(outputs, inputs, upstream, retain_graph=True)


def _leaf(torch, x):
    return torch.from_numpy(x).requires_grad_(True)


@register("matmul")
def _matmul(s: Shape) -> list[Case]:
    batch, M, K, N, tb = s.dims.get("batch"), s["M"], s["K"], s["N"], s.dims.get("transpose_b", False)
    lead = (batch,) if batch else ()
    label = ("%dx" % batch if batch else "") + f"{M}x{K}x{N}" + ("^T" if tb else "")

    def make(rng):
        return _randn(rng, *lead, M, K), _randn(rng, *lead, *((N, K) if tb else (K, N)))

    def torch_fn(th, a, b):
        a, b = th.from_numpy(a), th.from_numpy(b)
        return lambda: th.matmul(a, b.mT if tb else b)

    count = batch or 1
    return [Case("matmul", "fwd", s, label, make,
                 ours=lambda a, b: ops.matmul(a, b, transpose_b=tb),
                 ref=lambda a, b: reference.matmul(a, b, transpose_b=tb), torch=torch_fn,
                 flops=2.0 * count * M * N * K, nbytes=F32 * count * (M * K + K * N + M * N))]


@register("linear")
def _linear(s: Shape) -> list[Case]:
    R, I, O, bias = s["rows"], s["c_in"], s["c_out"], s["bias"]
    label = f"{R}x{I}->{O}" + ("+b" if bias else "")

    def make_fwd(rng):
        return _randn(rng, R, I), _randn(rng, O, I, scale=I ** -0.5), (_randn(rng, O) if bias else None)

    def torch_fwd(th, x, w, b):
        x, w, b = th.from_numpy(x), th.from_numpy(w), (th.from_numpy(b) if b is not None else None)
        return lambda: th.nn.functional.linear(x, w, b)

    def make_bwd(rng):
        return _randn(rng, R, O), _randn(rng, R, I), _randn(rng, O, I, scale=I ** -0.5)

    def torch_bwd(th, dy, x, w):
        x, w = _leaf(th, x), _leaf(th, w)
        b = th.zeros(O, requires_grad=True) if bias else None
        y = th.nn.functional.linear(x, w, b)
        return _grads(th, y, (x, w, b) if bias else (x, w), th.from_numpy(dy))

    mnk = float(R) * I * O
    io = F32 * (R * I + O * I + R * O)
    return [
        Case("linear", "fwd", s, label, make_fwd, ops.linear, reference.linear, torch_fwd,
             flops=2 * mnk, nbytes=io + (F32 * O if bias else 0)),
        # dx = dy @ W and dW = dy^T @ x: two GEMMs of the forward's size (dbias is a reduction).
        Case("linear", "bwd", s, label, make_bwd,
             ours=lambda dy, x, w: ops.linear_backward(dy, x, w, has_bias=bias),
             ref=lambda dy, x, w: reference.linear_backward(dy, x, w, has_bias=bias), torch=torch_bwd,
             flops=4 * mnk, nbytes=F32 * (R * O + 2 * R * I + 2 * O * I) + (F32 * O if bias else 0)),
    ]


@register("softmax")
def _softmax(s: Shape) -> list[Case]:
    R, C = s["rows"], s["C"]

    def make_fwd(rng):
        return (_randn(rng, R, C, scale=3.0),)

    def make_bwd(rng):
        return _randn(rng, R, C), reference.softmax(_randn(rng, R, C, scale=3.0))

    def torch_fwd(th, x):
        x = th.from_numpy(x)
        return lambda: th.softmax(x, dim=-1)

    def torch_bwd(th, dy, y):
        x = _leaf(th, np.log(y))  # softmax(log y) = y: the graph saves the same y
        return _grads(th, th.softmax(x, dim=-1), (x,), th.from_numpy(dy))

    n = F32 * R * C
    return [Case("softmax", "fwd", s, f"{R}x{C}", make_fwd, ops.softmax, reference.softmax, torch_fwd, nbytes=2 * n),
            Case("softmax", "bwd", s, f"{R}x{C}", make_bwd, ops.softmax_backward, reference.softmax_backward,
                 torch_bwd, nbytes=3 * n)]


@register("rmsnorm")
def _rmsnorm(s: Shape) -> list[Case]:
    R, C = s["rows"], s["C"]

    def make_fwd(rng):
        return _randn(rng, R, C), 1 + _randn(rng, C, scale=0.1)

    def make_bwd(rng):
        x, w = make_fwd(rng)
        return _randn(rng, R, C), x, w, reference.rmsnorm(x, w)[1]

    def torch_fwd(th, x, w):
        x, w = th.from_numpy(x), th.from_numpy(w)
        return lambda: (th.nn.functional.rms_norm(x, (C,), w, 1e-5), None)  # no rstd in torch's API

    def torch_bwd(th, dy, x, w, rstd):
        x, w = _leaf(th, x), _leaf(th, w)
        return _grads(th, th.nn.functional.rms_norm(x, (C,), w, 1e-5), (x, w), th.from_numpy(dy))

    n, row = F32 * R * C, F32 * R
    return [Case("rmsnorm", "fwd", s, f"{R}x{C}", make_fwd, ops.rmsnorm, reference.rmsnorm, torch_fwd,
                 nbytes=2 * n + F32 * C + row),
            Case("rmsnorm", "bwd", s, f"{R}x{C}", make_bwd, ops.rmsnorm_backward, reference.rmsnorm_backward,
                 torch_bwd, nbytes=3 * n + 2 * F32 * C + row)]


@register("layernorm")
def _layernorm(s: Shape) -> list[Case]:
    R, C = s["rows"], s["C"]

    def make_fwd(rng):
        return _randn(rng, R, C, scale=2.0) + 0.5, 1 + _randn(rng, C, scale=0.1), _randn(rng, C, scale=0.1)

    def make_bwd(rng):
        x, w, b = make_fwd(rng)
        _, mean, rstd = reference.layernorm(x, w, b)
        return _randn(rng, R, C), x, w, mean, rstd

    def torch_fwd(th, x, w, b):
        x, w, b = th.from_numpy(x), th.from_numpy(w), th.from_numpy(b)
        return lambda: (th.nn.functional.layer_norm(x, (C,), w, b, 1e-5), None, None)

    def torch_bwd(th, dy, x, w, mean, rstd):
        x, w, b = _leaf(th, x), _leaf(th, w), th.zeros(C, requires_grad=True)
        return _grads(th, th.nn.functional.layer_norm(x, (C,), w, b, 1e-5), (x, w, b), th.from_numpy(dy))

    n, row = F32 * R * C, F32 * R
    return [Case("layernorm", "fwd", s, f"{R}x{C}", make_fwd,
                 ours=lambda x, w, b: ops.layernorm(x, w, b, 1e-5),
                 ref=lambda x, w, b: reference.layernorm(x, w, b, 1e-5), torch=torch_fwd,
                 nbytes=2 * n + 2 * F32 * C + 2 * row),
            Case("layernorm", "bwd", s, f"{R}x{C}", make_bwd, ops.layernorm_backward, reference.layernorm_backward,
                 torch_bwd, nbytes=3 * n + 3 * F32 * C + 2 * row)]


@register("gelu")
def _gelu(s: Shape) -> list[Case]:
    # The tanh form only: it is GPT-2's, and the reference's erf form is a scalar math.erf per
    # element (np.vectorize), far too slow to be a fair baseline at these sizes.
    R, C = s["rows"], s["C"]

    def make_fwd(rng):
        return (_randn(rng, R, C, scale=2.0),)

    def make_bwd(rng):
        return _randn(rng, R, C), _randn(rng, R, C, scale=2.0)

    def torch_fwd(th, x):
        x = th.from_numpy(x)
        return lambda: th.nn.functional.gelu(x, approximate="tanh")

    def torch_bwd(th, dy, x):
        x = _leaf(th, x)
        return _grads(th, th.nn.functional.gelu(x, approximate="tanh"), (x,), th.from_numpy(dy))

    n = F32 * R * C
    return [Case("gelu", "fwd", s, f"{R}x{C}", make_fwd, ops.gelu, reference.gelu, torch_fwd, nbytes=2 * n),
            Case("gelu", "bwd", s, f"{R}x{C}", make_bwd, ops.gelu_backward, reference.gelu_backward, torch_bwd,
                 nbytes=3 * n)]


@register("cross_entropy")
def _cross_entropy(s: Shape) -> list[Case]:
    N, V = s["N"], s["V"]

    def make_fwd(rng):
        return _randn(rng, N, V, scale=2.0), rng.integers(0, V, N, dtype=np.int64)

    def make_bwd(rng):
        logits, targets = make_fwd(rng)
        return _randn(rng, N), logits, targets, reference.cross_entropy(logits, targets)[1]

    def torch_fwd(th, logits, targets):
        logits, targets = th.from_numpy(logits), th.from_numpy(targets)
        return lambda: (th.nn.functional.cross_entropy(logits, targets, reduction="none"), None)

    def torch_bwd(th, dloss, logits, targets, lse):
        logits = _leaf(th, logits)
        loss = th.nn.functional.cross_entropy(logits, th.from_numpy(targets), reduction="none")
        return _grads(th, loss, (logits,), th.from_numpy(dloss))

    n = F32 * N * V
    return [Case("cross_entropy", "fwd", s, f"{N}x{V}", make_fwd, ops.cross_entropy, reference.cross_entropy,
                 torch_fwd, nbytes=n + I64 * N + 2 * F32 * N),
            Case("cross_entropy", "bwd", s, f"{N}x{V}", make_bwd, ops.cross_entropy_backward,
                 reference.cross_entropy_backward, torch_bwd, nbytes=2 * n + I64 * N + 2 * F32 * N)]


@register("embedding")
def _embedding(s: Shape) -> list[Case]:
    N, V, C = s["N"], s["V"], s["C"]

    def make_fwd(rng):
        return _randn(rng, V, C), rng.integers(0, V, N, dtype=np.int64)

    def make_bwd(rng):
        return _randn(rng, N, C), rng.integers(0, V, N, dtype=np.int64)

    def torch_fwd(th, w, ids):
        w, ids = th.from_numpy(w), th.from_numpy(ids)
        return lambda: th.nn.functional.embedding(ids, w)

    def torch_bwd(th, dout, ids):
        w = th.zeros(V, C, requires_grad=True)
        out = th.nn.functional.embedding(th.from_numpy(ids), w)
        return _grads(th, out, (w,), th.from_numpy(dout))

    rows = F32 * N * C
    return [Case("embedding", "fwd", s, f"{N}x{C} of {V}", make_fwd, ops.embedding, reference.embedding, torch_fwd,
                 nbytes=2 * rows + I64 * N),  # the gathered rows only, not the whole table
            # the whole (V, C) gradient is written: zeroed, then the N rows added into it
            Case("embedding", "bwd", s, f"{N}x{C} of {V}", make_bwd,
                 ours=lambda d, ids: ops.embedding_backward(d, ids, V),
                 ref=lambda d, ids: reference.embedding_backward(d, ids, V), torch=torch_bwd,
                 nbytes=rows + I64 * N + F32 * V * C)]


ADAMW = dict(lr=3e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)


@register("adamw")
def _adamw(s: Shape) -> list[Case]:
    n = s["n"]

    def make(rng):
        return (_randn(rng, n), _randn(rng, n), _randn(rng, n, scale=0.01),
                np.abs(_randn(rng, n, scale=1e-4)))

    def step(impl):  # the step updates in place; the updated state is what gets compared
        def apply(p, g, m, v):
            impl(p, g, m, v, step=10, **ADAMW)
            return p, m, v
        return apply

    def torch_fn(th, p, g, m, v):
        p = th.from_numpy(p.copy()).requires_grad_(True)
        p.grad = th.from_numpy(g)
        kw = dict(lr=ADAMW["lr"], betas=(ADAMW["beta1"], ADAMW["beta2"]), eps=ADAMW["eps"],
                  weight_decay=ADAMW["weight_decay"])
        try:  # the fused CPU AdamW (torch >= 2.4) is torch's fastest; the default otherwise
            opt = th.optim.AdamW([p], fused=True, **kw)
        except (RuntimeError, TypeError, ValueError):
            opt = th.optim.AdamW([p], **kw)
        # start from the same moments and step count as ours, so the first call can be checked
        opt.state[p] = {"step": th.tensor(9.0), "exp_avg": th.from_numpy(m.copy()),
                        "exp_avg_sq": th.from_numpy(v.copy())}

        def run():
            opt.step()
            st = opt.state[p]
            return p.detach(), st["exp_avg"], st["exp_avg_sq"]
        return run

    return [Case("adamw", "step", s, f"{n}", make, step(ops.adamw_step), step(reference.adamw_step), torch_fn,
                 nbytes=7 * F32 * n, inplace=True)]  # reads p, g, m, v; writes p, m, v


@register("attention")
def _attention(s: Shape) -> list[Case]:
    # Causal: query i sits at key position S - T + i (DESIGN.md). FLOPs count visible query/key
    # pairs only: 4 D each forward (q.k and p.v), 10 D backward (s, dp, dv, dq, dk).
    B, T, S, H, Hkv, D = (s[n] for n in ("B", "T", "S", "H", "Hkv", "D"))
    label = f"B{B} H{H}" + (f"/{Hkv}" if Hkv != H else "") + f" T{T}" + (f" S{S}" if S != T else "") + f" D{D}"
    pairs = B * H * (T * (S - T) + T * (T + 1) // 2)

    def make_fwd(rng):
        return _randn(rng, B, T, H, D), _randn(rng, B, S, Hkv, D), _randn(rng, B, S, Hkv, D)

    def make_bwd(rng):
        q, k, v = make_fwd(rng)
        return (_randn(rng, B, T, H, D), q, k, v, *reference.attention(q, k, v, causal=True))

    def sdpa(th, q, k, v):
        """torch's SDPA on (B, T, H, D) arrays, as (B, T, H, D). Its causal mask is aligned
        top-left, ours bottom-right: they agree when T == S, and a single query (T = 1) sees every
        key either way, so it runs unmasked."""
        f = th.nn.functional.scaled_dot_product_attention
        gqa = dict(enable_gqa=True) if Hkv != H else {}
        return f(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=T > 1, **gqa).transpose(1, 2)

    torch_ok = T == S or T == 1

    def torch_fwd(th, q, k, v):
        q, k, v = (th.from_numpy(x) for x in (q, k, v))
        return lambda: (sdpa(th, q, k, v), None)  # torch returns no lse

    def torch_bwd(th, dout, q, k, v, out, lse):
        q, k, v = (_leaf(th, x) for x in (q, k, v))
        return _grads(th, sdpa(th, q, k, v), (q, k, v), th.from_numpy(dout))

    io = F32 * (2 * B * T * H * D + 2 * B * S * Hkv * D)
    fwd = Case("attention", "fwd", s, label, make_fwd,
               ours=lambda q, k, v: ops.attention(q, k, v, causal=True),
               ref=lambda q, k, v: reference.attention(q, k, v, causal=True),
               torch=torch_fwd if torch_ok else None, nbytes=io,
               flops=4.0 * D * pairs if T > 1 else 0.0)  # one decoding query is a read of the cache: GB/s
    if T == 1:
        return [fwd]  # decoding has no backward
    return [fwd, Case("attention", "bwd", s, label, make_bwd,
                      ours=lambda *a: ops.attention_backward(*a, causal=True),
                      ref=lambda *a: reference.attention_backward(*a, causal=True),
                      torch=torch_bwd if torch_ok else None, flops=10.0 * D * pairs, nbytes=2 * io)]


# ---------------------------------------------------------------------------------------------
# Correctness and timing.

def _as_tuple(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def rel_error(got, want) -> float:
    """max over outputs of ||got - want|| / ||want|| in float64; outputs `want` lacks (None) are skipped."""
    worst = 0.0
    for g, w in zip(_as_tuple(got), _as_tuple(want)):
        if g is None or w is None:
            continue
        g = np.asarray(g.detach().numpy() if hasattr(g, "detach") else g, dtype=np.float64)
        w = np.asarray(w, dtype=np.float64)
        if g.shape != w.shape:
            return math.inf
        denom = np.linalg.norm(w)
        err = np.linalg.norm(g - w) / (denom if denom > 0 else 1.0)
        worst = max(worst, float(err) if np.isfinite(err) else math.inf)
    return worst


def _copies(args):
    return tuple(a.copy() if isinstance(a, np.ndarray) else a for a in args)


def time_calls(fn: Callable[[], Any], repeats: int, *, min_sample_s: float = 2e-3,
               budget_s: float = 4.0) -> list[float]:
    """Seconds per call of fn, one sample per round, after two warm-up calls.

    Each implementation is timed in its own block rather than interleaved with the others: on a
    2-core machine the first softmax after a NumPy BLAS call took 1.8 ms instead of 0.04 ms
    (OpenBLAS's threads still spin on the core our second thread needs); interleaving would charge
    that to ours on every round.
    A sample repeats the call until it lasts min_sample_s (timer resolution, call overhead); slow
    calls get fewer rounds so that one block takes about budget_s, but never fewer than 3.
    """
    fn()
    t0 = time.perf_counter()
    fn()
    t = max(time.perf_counter() - t0, 1e-9)
    number = max(1, int(min_sample_s / t))
    rounds = min(repeats, max(3, int(budget_s / (t * number))))
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        samples.append((time.perf_counter() - t0) / number)
    return samples


class Load:
    """CPU time that other processes take while we time (Linux /proc; None elsewhere).

    Our kernels run one thread per core, so a neighbour that takes one core for a moment stalls a
    parallel region for a whole scheduler tick (4 ms here): a 0.2 ms kernel reads 8 ms. Rows timed
    under such load are measured again after the machine quiets down, and the load is recorded.
    """

    @staticmethod
    def _read():
        try:
            with open("/proc/stat") as f:
                jiffies = [int(v) for v in f.readline().split()[1:]]
            with open("/proc/self/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after the command name
        except (OSError, ValueError):
            return None
        busy = sum(jiffies) - jiffies[3] - jiffies[4]  # everything but idle and iowait (steal counts)
        return busy, int(fields[11]) + int(fields[12]), sum(jiffies)  # ..., our utime + stime, total

    def __enter__(self):
        self.start, self.others = self._read(), None
        return self

    def __exit__(self, *exc):
        end = self._read()
        if self.start and end and end[2] > self.start[2]:
            busy, ours, total = (e - s for e, s in zip(end, self.start))
            self.others = max(0.0, (busy - ours) / total)  # a fraction of all cores

    @classmethod
    def wait_quiet(cls, threshold: float, max_wait_s: float, interval_s: float = 0.5) -> float | None:
        """Sleeps until others take < threshold of the machine over interval_s (or max_wait_s)."""
        deadline = time.monotonic() + max_wait_s
        while True:
            with cls() as load:
                time.sleep(interval_s)
            if load.others is None or load.others < threshold or time.monotonic() > deadline:
                return load.others


BUSY = 0.05  # others' share of the machine above which a row is timed again (the median absorbs less)
# Pause before each implementation's block: OpenBLAS's and torch's worker threads keep spinning for
# ~0.1-0.2 s after their last call, and our first calls after a NumPy matmul took 50 ms, not 0.6.
PAUSE_S = 0.25


def _load_torch(threads: int):
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(threads)
    return torch


def run_case(case: Case, *, repeats: int, torch=None, ceilings=None, settle_s: float = 0.0,
             pause_s: float = 0.0, min_sample_s: float = 2e-3, seed: int = 0) -> dict:
    """Checks one case, then times it; returns its row (see the keys below).

    pause_s: sleep before each implementation's block (see PAUSE_S).
    settle_s > 0: wait for a quiet machine before timing, and time again (once) when other
    processes took more than BUSY of the machine meanwhile; at most settle_s of waiting in all.
    """
    rng = np.random.default_rng(seed)
    args = case.make(rng)
    row = {"op": case.op, "direction": case.direction, "model": case.shape.model, "what": case.shape.what,
           "shape": case.label, "dims": dict(case.shape.dims), "flops": case.flops, "bytes": case.nbytes,
           "status": "ok", "rel_err": None, "torch_rel_err": None,
           "ours_ms": None, "numpy_ms": None, "torch_ms": None,  # medians
           "ours_best_ms": None, "numpy_best_ms": None, "torch_best_ms": None, "rounds": None,
           "others_cpu": None, "waited_s": 0.0,  # other processes' share of the machine while timing
           "rate": None, "unit": "GFLOP/s" if case.flops else "GB/s", "ceiling_fraction": None,
           "speedup_numpy": None, "speedup_torch": None}
    try:
        want = case.ref(*_copies(args) if case.inplace else args)
        got = case.ours(*_copies(args) if case.inplace else args)
    except Exception as exc:  # a kernel that raises is reported, and the run goes on
        row["status"] = f"error: {type(exc).__name__}: {exc}"
        return row
    row["rel_err"] = err = rel_error(got, want)
    if not err <= TOLERANCE:
        row["status"] = f"wrong: rel_err {err:.2e} > {TOLERANCE:.0e}, not timed"
        return row
    fns = {"ours": lambda: case.ours(*args), "numpy": lambda: case.ref(*args)}
    if torch is not None and case.torch is not None:
        try:
            call = case.torch(torch, *(_copies(args) if case.inplace else args))
            row["torch_rel_err"] = terr = rel_error(call(), want)
            if terr <= TOLERANCE:
                fns["torch"] = call  # for adamw it simply goes on stepping
            else:  # our torch equivalent computes something else: say so rather than time it
                row["status"] = f"ok (torch differs from the reference: rel_err {terr:.1e}, not timed)"
        except Exception as exc:
            row["status"] = f"ok (torch failed: {type(exc).__name__}: {exc})"
    for attempt in range(2 if settle_s else 1):
        if settle_s:
            t0 = time.monotonic()
            Load.wait_quiet(BUSY, settle_s / 2)
            row["waited_s"] += time.monotonic() - t0
        samples = {}
        with Load() as load:
            for name, fn in fns.items():
                time.sleep(pause_s)
                samples[name] = time_calls(fn, repeats, min_sample_s=min_sample_s)
        if load.others is None or load.others < BUSY:
            break
    row["others_cpu"] = load.others
    times = {name: statistics.median(v) for name, v in samples.items()}
    row["rounds"] = len(samples["ours"])
    for name, v in samples.items():  # the median decides; the best shows how much noise there was
        row[f"{name}_ms"], row[f"{name}_best_ms"] = 1e3 * times[name], 1e3 * min(v)
    row["speedup_numpy"] = times["numpy"] / times["ours"]
    if "torch" in times:
        row["speedup_torch"] = times["torch"] / times["ours"]
    row["rate"] = (case.flops or case.nbytes) / times["ours"] / 1e9
    if ceilings:
        ceiling = ceilings["matmul_gflops"] if case.flops else ceilings["copy_gbs"]
        row["ceiling_fraction"] = row["rate"] / ceiling
    return row


# ---------------------------------------------------------------------------------------------
# This machine's ceilings.

def _copy_gbs(n: int, threads: int, repeats: int) -> float:
    """Best GB/s (read + write counted) of np.copyto over n floats, split across `threads` threads
    (NumPy releases the GIL while it copies, so the slices run in parallel)."""
    src, dst = np.ones(n, np.float32), np.empty(n, np.float32)
    cuts = np.linspace(0, n, threads + 1).astype(int)
    parts = [(dst[a:b], src[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
    best = math.inf
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats + 1):  # the first pass faults the pages in
            t0 = time.perf_counter()
            list(pool.map(lambda p: np.copyto(*p), parts))
            best = min(best, time.perf_counter() - t0)
    return 2 * F32 * n / best / 1e9


def measure_ceilings(quick: bool = False, threads: int | None = None, torch=None) -> dict:
    """This machine's ceilings, best of a few tries each.

    copy_gbs: np.copyto over 128 MiB arrays (4x the L3 of the machine this was written on; larger
    ones never measured higher), on one thread and on `threads` threads, read + write counted. The
    hardware also reads each destination line before writing it, which a kernel updating its
    arrays in place (adamw) does not pay: such kernels can pass 100% of this ceiling.
    matmul_gflops: the best float32 2048^3 product among NumPy, llmcore and torch. NumPy alone is no
    ceiling where its OpenBLAS does not know the CPU: on the Zen 5 VM it ran its AVX2 kernel at
    ~245 GFLOP/s while llmcore's AVX-512 kernel ran at ~430 (the per-library numbers are kept).
    """
    import llmcore

    threads = threads or llmcore.get_num_threads()
    n = 32 << 20  # floats: 128 MiB per array
    repeats = 3 if quick else 5
    by_threads = {t: _copy_gbs(n, t, repeats) for t in sorted({1, threads})}
    a = np.random.default_rng(0).standard_normal((2048, 2048), dtype=np.float32)
    products = {"numpy": lambda: a @ a, "llmcore": lambda: ops.matmul(a, a)}
    if torch is not None:
        ta = torch.from_numpy(a)
        products["torch"] = lambda: torch.matmul(ta, ta)
    gflops = {}
    for name, fn in products.items():
        time.sleep(PAUSE_S)
        gflops[name] = 2 * 2048 ** 3 / min(time_calls(fn, repeats)) / 1e9
    return {"copy_gbs": max(by_threads.values()), "copy_gbs_by_threads": by_threads, "copy_mib": F32 * n >> 20,
            "matmul_gflops": max(gflops.values()), "matmul_gflops_by_library": gflops, "matmul_n": 2048}


def machine_info(torch=None) -> dict:
    import llmcore

    cpu = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "cpu family", "model", "stepping", "flags") and key not in cpu:
                    cpu[key] = value.strip()
                if not line.strip() and cpu:
                    break  # the first processor is enough
    except OSError:
        pass
    flags = cpu.pop("flags", "").split()
    cpu["simd_flags"] = [f for f in flags if f.startswith(("avx", "fma", "amx"))]
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "llmcore": llmcore.info(), "cpu": cpu, "platform": platform.platform(), "numpy": np.__version__}
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        info["numpy_blas"] = f"{blas.get('name')} {blas.get('version')}"
    except Exception:  # older NumPy has no dict form; the BLAS name is a nicety
        pass
    if torch is not None:
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    # The allocator decides whether NumPy's and torch's large temporaries page-fault fresh memory
    # (glibc's default for blocks of 32 MiB and more) or reuse touched memory, as llmcore's output
    # pool does: it moves their times by up to 4x (benchmarks/README.md), so it goes on record.
    info["allocator_env"] = {k: v for k, v in os.environ.items()
                             if k.startswith(("MALLOC_", "GLIBC_TUNABLES", "LD_PRELOAD"))}
    return info


# ---------------------------------------------------------------------------------------------
# The command.

def collect(stems=None, *, quick=False, repeats=None, use_torch=True, ceilings=None, settle_s=None,
            progress=None) -> list[dict]:
    """Rows for every case of `stems` (all registered operations when None).

    settle_s: how long in all to wait for other processes to go quiet (default: 10 minutes in full
    runs, at most a minute per case; none in quick runs, which are smoke tests, not measurements)."""
    import llmcore

    stems = list(BUILDERS) if not stems else stems
    torch = _load_torch(llmcore.get_num_threads()) if use_torch else None
    repeats = repeats or (5 if quick else 9)
    wait_budget = (0.0 if quick else 600.0) if settle_s is None else settle_s
    rows = []
    for stem in stems:
        for case in cases(stem, quick):
            # full runs: samples of >= 10 ms, so that one tick lost to a neighbour moves a sub-ms
            # kernel's median less (two clean 2 ms-sample runs disagreed by up to 2x on such rows)
            row = run_case(case, repeats=repeats, torch=torch, ceilings=ceilings, pause_s=0.0 if quick else PAUSE_S,
                           min_sample_s=2e-3 if quick else 10e-3, settle_s=min(60.0, wait_budget))
            wait_budget = max(0.0, wait_budget - row.get("waited_s", 0.0))
            rows.append(row)
            if progress:
                progress(row)
    return rows


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


COLUMNS = ("op", "dir", "model", "shape", "ours ms", "numpy ms", "torch ms", "rate", "% ceil", "x numpy", "x torch")


def format_row(row: dict) -> list[str]:
    rate = None if row["rate"] is None else f"{row['rate']:.1f} {row['unit']}"
    frac = None if row["ceiling_fraction"] is None else 100 * row["ceiling_fraction"]
    cells = [row["op"], row["direction"], row["model"], row["shape"], _fmt(row["ours_ms"], ".3f"),
             _fmt(row["numpy_ms"], ".3f"), _fmt(row["torch_ms"], ".3f"), rate or "-", _fmt(frac, ".0f"),
             _fmt(row["speedup_numpy"], ".2f"), _fmt(row["speedup_torch"], ".2f")]
    if row["status"] != "ok":  # a refused kernel, or a note about the torch column
        cells.append(row["status"])
    if row["others_cpu"] is not None and row["others_cpu"] >= BUSY:
        cells.append(f"(busy machine: other processes took {100 * row['others_cpu']:.0f}% of it)")
    return cells


def format_table(rows: list[dict], markdown: bool = False) -> str:
    body = [format_row(r) for r in rows]
    if markdown:
        notes = any(len(c) > len(COLUMNS) for c in body)  # a note column only when a row has one
        head = list(COLUMNS) + (["note"] if notes else [])
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(c[:len(COLUMNS)] + (["; ".join(c[len(COLUMNS):])] if notes else [])) + " |"
                  for c in body]
        return "\n".join(lines)
    widths = [max([len(h)] + [len(c[i]) for c in body]) for i, h in enumerate(COLUMNS)]
    right = {i for i, h in enumerate(COLUMNS) if i >= 4}

    def line(cells):
        out = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(out + cells[len(COLUMNS):]).rstrip()
    return "\n".join([line(list(COLUMNS)), line(["-" * w for w in widths])] + [line(c) for c in body])


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Adds the `bench` subcommand to the `llmcore` command's subparsers."""
    p = subparsers.add_parser("bench", help="time every kernel against the NumPy reference (and PyTorch CPU)",
                              description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--ops", default="", metavar="NAME[,NAME]",
                   help=f"operations to run (default all): {', '.join(BUILDERS)}")
    p.add_argument("--quick", action="store_true", help="smaller shapes and fewer repeats: seconds, not minutes")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per case, median kept (default 9, quick 5)")
    p.add_argument("--json", metavar="PATH", help="also write the rows and this machine's description as JSON")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison even if torch imports")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cpu: the C++ core vs NumPy and PyTorch CPU (default); cuda: the CUDA core vs PyTorch "
                        "on the GPU (llmcore.bench_cuda)")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    """Runs `llmcore bench`; 0 when every kernel passed its check, 1 otherwise (2: bad options)."""
    if getattr(args, "device", "cpu") == "cuda":
        from . import bench_cuda

        return bench_cuda.run(args)
    stems = [s.strip() for s in args.ops.split(",") if s.strip()] if args.ops else list(BUILDERS)
    unknown = [s for s in stems if s not in BUILDERS]
    if unknown:
        print(f"llmcore bench: unknown operation(s) {', '.join(unknown)}; choose from {', '.join(BUILDERS)}",
              file=sys.stderr)
        return 2
    if args.repeats is not None and args.repeats < 1:
        print(f"llmcore bench: --repeats must be >= 1, got {args.repeats}", file=sys.stderr)
        return 2
    import llmcore

    if not args.quick:
        Load.wait_quiet(BUSY, 60.0)
    torch = None if args.no_torch else _load_torch(llmcore.get_num_threads())
    ceilings = measure_ceilings(args.quick, torch=torch)
    by_lib = ", ".join(f"{k} {v:.0f}" for k, v in ceilings["matmul_gflops_by_library"].items())
    print(f"llmcore {llmcore.__version__}  simd {llmcore.simd()}  threads {llmcore.get_num_threads()}  "
          f"torch {torch.__version__ if torch else '-'}\n"
          f"ceilings: copy {ceilings['copy_gbs']:.1f} GB/s (read+write), "
          f"matmul {ceilings['matmul_gflops']:.1f} GFLOP/s (2048^3, best of {by_lib}); times are medians",
          flush=True)
    rows = collect(stems, quick=args.quick, repeats=args.repeats, use_torch=not args.no_torch, ceilings=ceilings,
                   progress=lambda r: print(f"  {r['op']} {r['direction']} {r['shape']}: {r['status']}",
                                            file=sys.stderr, flush=True))
    print(format_table(rows))
    if args.json:
        doc = {"argv": sys.argv,
               "options": {"ops": stems, "quick": args.quick, "repeats": args.repeats, "torch": torch is not None,
                           "pause_s": 0.0 if args.quick else PAUSE_S, "busy_threshold": BUSY},
               "tolerance": TOLERANCE, "machine": machine_info(torch), "ceilings": ceilings, "rows": rows}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1, default=str)
        print(f"wrote {args.json}")
    return 0 if all(r["status"].startswith("ok") for r in rows) else 1


def main(argv=None) -> int:
    """`python -m llmcore.bench [options]`, the same as `llmcore bench [options]`."""
    parser = argparse.ArgumentParser(prog="llmcore")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(["bench", *(argv if argv is not None else sys.argv[1:])]))


if __name__ == "__main__":
    sys.exit(main())
