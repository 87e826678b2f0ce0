"""`llmcore bench --device cuda`: every CUDA kernel timed against PyTorch (cuBLAS, cuDNN and its
own CUDA kernels) at the same precision, and rated against this GPU's measured ceilings.

For each operation and shape (GPT-2 124M: B=8, T=1024, C=768, H=12, D=64, V=50257; and D=128):
  1. ours is checked against torch on the same inputs (||ours - torch|| / ||torch|| under the
     precision's bar); a kernel that fails is reported and never timed;
  2. both are timed with CUDA events around each call, after warm-up, median of many calls, with
     inputs rotated over enough copies to exceed the L2 cache (50 MB on an H100), so that a small
     tensor is timed from HBM as in a training step, not from L2;
  3. ours is rated in GB/s (bytes read + written once) or TFLOP/s and divided by the ceilings:
     a device-to-device copy (read + write) and cuBLAS (through torch) at fp32, TF32 and bf16.

Needs CuPy and PyTorch with CUDA on the same GPU (torch reads CuPy arrays without a copy).
"""
from __future__ import annotations

import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from . import ops

L2_BYTES = 50 * 2**20
TOLERANCE = {"highest": 2e-5, "high": 3e-3, "medium": 3e-2}
TORCH_DTYPE_NOTE = "torch at bf16 reads bf16 operands (half the bytes); ours reads fp32 and rounds"


@dataclass
class Case:
    op: str
    direction: str
    shape: str
    make: Callable  # () -> one input set (a tuple of CuPy arrays and values)
    ours: Callable  # (inputs) -> result
    theirs: Callable | None  # (inputs) -> result, torch; None where torch has no counterpart
    flops: float = 0.0
    bytes: float = 0.0
    precision: str = "highest"
    compare: Callable | None = None  # (ours result, theirs result) -> (a, b) arrays to compare
    notes: list = field(default_factory=list)


def _cp():
    import cupy

    return cupy


def _torch():
    import torch

    return torch


def _t(x):
    """A torch view of a CuPy array (no copy)."""
    return _torch().as_tensor(x, device="cuda")


def time_gpu(fn, input_sets, *, warmup=3, min_calls=20, min_ms=200.0) -> float:
    """Median milliseconds of fn(inputs) timed with CUDA events, rotating over input_sets."""
    cp = _cp()
    for i in range(warmup):
        fn(input_sets[i % len(input_sets)])
    cp.cuda.get_current_stream().synchronize()
    times, total, i = [], 0.0, 0
    while len(times) < min_calls or (total < min_ms and len(times) < 2000):
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        fn(input_sets[i % len(input_sets)])
        end.record()
        end.synchronize()
        ms = cp.cuda.get_elapsed_time(start, end)
        times.append(ms)
        total += ms
        i += 1
    return statistics.median(times)


def _rel(a, b) -> float:
    cp = _cp()
    a = cp.asarray(a, dtype=cp.float64)
    b = cp.asarray(b, dtype=cp.float64)
    den = float(cp.linalg.norm(b))
    num = float(cp.linalg.norm(a - b))
    return num / den if den else num


def _copies(make, nbytes) -> list:
    """Enough input sets that one pass over them exceeds twice the L2 cache."""
    n = max(1, min(8, math.ceil(2 * L2_BYTES / max(nbytes, 1))))
    return [make() for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# Ceilings

def measure_ceilings() -> dict:
    cp, torch = _cp(), _torch()
    n = 2**28  # 1 GiB of float32
    src, dst = cp.ones(n, cp.float32), cp.empty(n, cp.float32)
    ms = time_gpu(lambda _: dst.__setitem__(Ellipsis, src), [None], min_calls=20)
    copy_gbs = 2 * n * 4 / ms / 1e6
    del src, dst
    out = {"copy_gbs": copy_gbs}
    N = 8192
    for name, dtype, tf32 in (("fp32", torch.float32, False), ("tf32", torch.float32, True),
                              ("bf16", torch.bfloat16, False)):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        a = torch.randn(N, N, device="cuda", dtype=dtype)
        b = torch.randn(N, N, device="cuda", dtype=dtype)
        ms = time_gpu(lambda _: torch.matmul(a, b), [None], min_calls=10)
        out[f"cublas_{name}_tflops"] = 2 * N**3 / ms / 1e9
    torch.backends.cuda.matmul.allow_tf32 = False
    return out


# ---------------------------------------------------------------------------------------------
# Cases: GPT-2 124M shapes

B, T, C, H, D, V = 8, 1024, 768, 12, 64, 50257
ROWS = B * T
PRECISION_TORCH = {"highest": "fp32", "high": "tf32", "medium": "bf16"}


def _randn(*shape, scale=1.0):
    cp = _cp()
    return (cp.random.standard_normal(shape, dtype=cp.float32) * scale).astype(cp.float32)


def _matmul_cases() -> list[Case]:
    torch = _torch()
    cases = []
    shapes = [("gpt2 mlp c_fc", ROWS, 4 * C, C), ("gpt2 attn c_attn", ROWS, 3 * C, C),
              ("gpt2 lm_head", ROWS, V, C), ("square 4096", 4096, 4096, 4096)]
    for precision in ("highest", "high", "medium"):
        for what, M, N, K in shapes:
            def make(M=M, N=N, K=K):
                return _randn(M, K), _randn(N, K)

            def theirs(inp, precision=precision):
                x, w = _t(inp[0]), _t(inp[1])
                if precision == "medium":
                    return torch.nn.functional.linear(x.bfloat16(), w.bfloat16()).float()
                torch.backends.cuda.matmul.allow_tf32 = precision == "high"
                return torch.nn.functional.linear(x, w)

            cases.append(Case("linear", "fwd", f"{what} ({M}x{K} @ {K}x{N}^T)", make,
                              lambda inp: ops.linear(inp[0], inp[1]), theirs,
                              flops=2.0 * M * N * K, bytes=4.0 * (M * K + N * K + M * N), precision=precision))
    # backward (dx = dy @ W and dW = dy^T @ x): the weight gradient has a small output and a
    # long K (the 8192 rows), the shape that starves a GEMM of blocks
    for precision in ("highest", "high", "medium"):
        for what, M, N, K in shapes[:3]:
            def make_bwd(M=M, N=N, K=K):
                return _randn(M, N), _randn(M, K), _randn(N, K)  # dy, x, w

            def theirs_bwd(inp, precision=precision):
                dy, x, w = (_t(a) for a in inp)
                if precision == "medium":
                    dy, x, w = dy.bfloat16(), x.bfloat16(), w.bfloat16()
                else:
                    torch.backends.cuda.matmul.allow_tf32 = precision == "high"
                return (dy @ w).float(), (dy.t() @ x).float()

            cases.append(Case("linear", "bwd", f"{what} (dx and dW, {M} rows)", make_bwd,
                              lambda inp: ops.linear_backward(inp[0], inp[1], inp[2])[:2], theirs_bwd,
                              flops=4.0 * M * N * K, bytes=4.0 * (2 * M * K + 2 * N * K + M * N),
                              precision=precision, compare=lambda o, t: (o[1], t[1])))
    return cases


def _rowwise_cases() -> list[Case]:
    torch = _torch()
    F = torch.nn.functional
    cp = _cp()
    c = []
    sm_rows, sm_cols = B * H * T // 4, T  # a quarter of GPT-2's attention-score rows: 100 MB
    c.append(Case("softmax", "fwd", f"({sm_rows}, {sm_cols})", lambda: (_randn(sm_rows, sm_cols, scale=3.0),),
                  lambda i: ops.softmax(i[0]), lambda i: F.softmax(_t(i[0]), dim=-1), bytes=8.0 * sm_rows * sm_cols))

    def sm_bwd_make():
        y = ops.softmax(_randn(sm_rows, sm_cols, scale=3.0))
        return _randn(sm_rows, sm_cols), y
    c.append(Case("softmax", "bwd", f"({sm_rows}, {sm_cols})", sm_bwd_make, lambda i: ops.softmax_backward(i[0], i[1]),
                  lambda i: torch._softmax_backward_data(_t(i[0]), _t(i[1]), -1, torch.float32),
                  bytes=12.0 * sm_rows * sm_cols))

    def norm_make():
        return _randn(ROWS, C), _randn(C), _randn(C), _randn(ROWS, C)
    c.append(Case("rmsnorm", "fwd", f"({ROWS}, {C})", norm_make, lambda i: ops.rmsnorm(i[0], i[1])[0],
                  lambda i: F.rms_norm(_t(i[0]), (C,), _t(i[1]), 1e-5), bytes=8.0 * ROWS * C))
    c.append(Case("layernorm", "fwd", f"({ROWS}, {C})", norm_make, lambda i: ops.layernorm(i[0], i[1], i[2])[0],
                  lambda i: F.layer_norm(_t(i[0]), (C,), _t(i[1]), _t(i[2]), 1e-5), bytes=8.0 * ROWS * C))

    def rms_bwd_make():
        x, w, _, dy = norm_make()
        return dy, x, w, ops.rmsnorm(x, w)[1]

    def rms_bwd_torch(i):
        x = _t(i[1]).detach().requires_grad_()
        w = _t(i[2]).detach().requires_grad_()
        y = F.rms_norm(x, (C,), w, 1e-5)
        return torch.autograd.grad(y, (x, w), _t(i[0]))

    # torch's time for the norm backwards includes its forward (autograd recomputes nothing, but
    # the graph must exist): reported as fwd+bwd in the torch column, noted on the row.
    c.append(Case("rmsnorm", "bwd", f"({ROWS}, {C})", rms_bwd_make, lambda i: ops.rmsnorm_backward(*i),
                  rms_bwd_torch, bytes=12.0 * ROWS * C, compare=lambda o, t: (o[0], t[0]),
                  notes=["torch column is forward+backward through autograd"]))

    def ln_bwd_make():
        x, w, b, dy = norm_make()
        _, mean, rstd = ops.layernorm(x, w, b)
        return dy, x, w, mean, rstd, b

    def ln_bwd_torch(i):
        x = _t(i[1]).detach().requires_grad_()
        w = _t(i[2]).detach().requires_grad_()
        b = _t(i[5]).detach().requires_grad_()
        y = F.layer_norm(x, (C,), w, b, 1e-5)
        return torch.autograd.grad(y, (x, w, b), _t(i[0]))
    c.append(Case("layernorm", "bwd", f"({ROWS}, {C})", ln_bwd_make, lambda i: ops.layernorm_backward(*i[:5]),
                  ln_bwd_torch, bytes=12.0 * ROWS * C, compare=lambda o, t: (o[0], t[0]),
                  notes=["torch column is forward+backward through autograd"]))

    g_n = ROWS * 4 * C
    c.append(Case("gelu", "fwd", f"({ROWS}, {4 * C})", lambda: (_randn(ROWS, 4 * C), _randn(ROWS, 4 * C)),
                  lambda i: ops.gelu(i[0]), lambda i: F.gelu(_t(i[0]), approximate="tanh"), bytes=8.0 * g_n))
    c.append(Case("gelu", "bwd", f"({ROWS}, {4 * C})", lambda: (_randn(ROWS, 4 * C), _randn(ROWS, 4 * C)),
                  lambda i: ops.gelu_backward(i[1], i[0]),
                  lambda i: torch.ops.aten.gelu_backward(_t(i[1]), _t(i[0]), approximate="tanh"), bytes=12.0 * g_n))

    def ce_make():
        return _randn(ROWS, V, scale=2.0), cp.asarray(np.random.default_rng(0).integers(0, V, ROWS)), _randn(ROWS)
    c.append(Case("cross_entropy", "fwd", f"({ROWS}, {V})", ce_make, lambda i: ops.cross_entropy(i[0], i[1])[0],
                  lambda i: F.cross_entropy(_t(i[0]), _t(i[1]), reduction="none"), bytes=4.0 * ROWS * V))

    def ce_bwd_make():
        logits, targets, dloss = ce_make()
        return dloss, logits, targets, ops.cross_entropy(logits, targets)[1]

    def ce_bwd_torch(i):
        logits = _t(i[1]).detach().requires_grad_()
        loss = F.cross_entropy(logits, _t(i[2]), reduction="none")
        return torch.autograd.grad(loss, logits, _t(i[0]))[0]
    c.append(Case("cross_entropy", "bwd", f"({ROWS}, {V})", ce_bwd_make, lambda i: ops.cross_entropy_backward(*i),
                  ce_bwd_torch, bytes=8.0 * ROWS * V, notes=["torch column is forward+backward through autograd"]))

    def emb_make():
        return _randn(V, C), cp.asarray(np.random.default_rng(1).integers(0, V, (B, T))), _randn(B, T, C)
    c.append(Case("embedding", "fwd", f"V={V} C={C} ids ({B}, {T})", emb_make, lambda i: ops.embedding(i[0], i[1]),
                  lambda i: F.embedding(_t(i[1]), _t(i[0])), bytes=8.0 * ROWS * C))
    c.append(Case("embedding", "bwd", f"V={V} C={C} ids ({B}, {T})", emb_make,
                  lambda i: ops.embedding_backward(i[2], i[1], V),
                  lambda i: torch.ops.aten.embedding_dense_backward(_t(i[2]), _t(i[1]), V, -1, False),
                  bytes=4.0 * (2 * ROWS * C + V * C)))

    n_params = 124_000_000
    hyper = dict(lr=3e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)

    def adamw_make():
        return _randn(n_params), _randn(n_params), cp.zeros(n_params, cp.float32), cp.zeros(n_params, cp.float32)

    def adamw_torch(i):
        p, g, m, v = (_t(a) for a in i)
        torch._fused_adamw_([p], [g], [m], [v], [], [torch.tensor(1.0, device="cuda")], lr=hyper["lr"],
                            beta1=hyper["beta1"], beta2=hyper["beta2"], weight_decay=hyper["weight_decay"],
                            eps=hyper["eps"], amsgrad=False, maximize=False)
        return p

    def adamw_ours(i):
        ops.adamw_step(i[0], i[1], i[2], i[3], step=1, **hyper)
        return i[0]
    c.append(Case("adamw", "step", f"{n_params} params", adamw_make, adamw_ours, adamw_torch,
                  bytes=4.0 * n_params * 7, compare=None, notes=["torch: torch._fused_adamw_"]))
    return c


def _attention_cases() -> list[Case]:
    torch = _torch()
    F = torch.nn.functional
    cases = []
    for (b, t, s, h, hkv, d, what) in [(B, T, T, H, H, 64, "gpt2 D=64"), (B, T, T, H // 2, H // 2, 128, "D=128"),
                                        (B, 1, 4096, 32, 8, 128, "decode GQA-8")]:
        def make(b=b, t=t, s=s, h=h, hkv=hkv, d=d):
            return _randn(b, t, h, d), _randn(b, s, hkv, d), _randn(b, s, hkv, d), _randn(b, t, h, d)

        def torch_fwd(i, hkv=hkv, h=h, t=t, s=s):
            q, k, v = (_t(x).transpose(1, 2) for x in i[:3])  # (B, heads, L, D) views
            # torch aligns a causal mask top-left (query 0 sees key 0 only); llmcore bottom-right
            # (query i sits at S - T + i). They agree for T == S; a single decoding query sees all.
            return F.scaled_dot_product_attention(q, k, v, is_causal=t == s, enable_gqa=hkv != h).transpose(1, 2)

        causal_frac = 0.5 if t == s else 1.0
        flops = 4.0 * b * h * t * s * d * causal_frac
        io = 4.0 * (2 * b * t * h * d + 2 * b * s * hkv * d)
        shape = f"{what}: B={b} T={t} S={s} H={h} Hkv={hkv} D={d}"
        cases.append(Case("attention", "fwd", shape, make, lambda i: ops.attention(i[0], i[1], i[2])[0], torch_fwd,
                          flops=flops, bytes=io))
        if t > 1:
            def bwd_make(make=make):
                q, k, v, dout = make()
                out, lse = ops.attention(q, k, v)
                return dout, q, k, v, out, lse

            def torch_bwd(i, hkv=hkv, h=h):
                q, k, v = (_t(x).transpose(1, 2).detach().requires_grad_() for x in i[1:4])
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=hkv != h)
                dq, dk, dv = torch.autograd.grad(out, (q, k, v), _t(i[0]).transpose(1, 2))
                return dq.transpose(1, 2)

            cases.append(Case("attention", "bwd", shape, bwd_make, lambda i: ops.attention_backward(*i)[0], torch_bwd,
                              flops=2.5 * flops, bytes=io * 2, compare=None,
                              notes=["torch column is forward+backward through autograd"]))
    return cases


def all_cases(only=None) -> list[Case]:
    cases = _matmul_cases() + _rowwise_cases() + _attention_cases()
    return [c for c in cases if not only or c.op in only]


def run_case(case: Case, ceilings: dict) -> dict:
    cp = _cp()
    ops.set_matmul_precision(case.precision)
    row = {"op": case.op, "direction": case.direction, "shape": case.shape, "precision": case.precision,
           "ours_ms": None, "torch_ms": None, "rate": None, "unit": None, "ceiling_fraction": None,
           "speedup_torch": None, "error_vs_torch": None, "status": "ok", "notes": list(case.notes)}
    try:
        inputs = case.make()
        ours = case.ours(inputs)
        if case.theirs is not None:
            theirs = case.theirs(inputs)
            a, b = case.compare(ours, theirs) if case.compare else (ours, theirs)
            if isinstance(a, tuple):
                a, b = a[0], b[0]
            err = _rel(a, cp.asarray(b.detach().float()) if hasattr(b, "detach") else b)
            row["error_vs_torch"] = err
            if not err <= TOLERANCE[case.precision] and case.op != "adamw":
                row["status"] = f"FAILED check: error vs torch {err:.2e}"
                return row
        nbytes = sum(getattr(x, "nbytes", 0) for x in inputs)
        sets = [inputs] + _copies(case.make, nbytes)[1:]
        row["ours_ms"] = time_gpu(case.ours, sets)
        if case.theirs is not None:
            row["torch_ms"] = time_gpu(case.theirs, sets)
            row["speedup_torch"] = row["torch_ms"] / row["ours_ms"]
        if case.op in ("linear", "attention"):
            row["rate"], row["unit"] = case.flops / row["ours_ms"] / 1e9, "TFLOP/s"
            peak = ceilings[f"cublas_{PRECISION_TORCH[case.precision]}_tflops"]
            row["ceiling_fraction"] = row["rate"] / peak
        else:
            row["rate"], row["unit"] = case.bytes / row["ours_ms"] / 1e6, "GB/s"
            row["ceiling_fraction"] = row["rate"] / ceilings["copy_gbs"]
        del sets, inputs
    except Exception as exc:  # a failure is a row, not the end of the run
        row["status"] = f"ERROR {type(exc).__name__}: {exc}"[:300]
    finally:
        ops.set_matmul_precision("highest")
        cp.get_default_memory_pool().free_all_blocks()
    return row


COLUMNS = ("op", "dir", "precision", "shape", "ours ms", "torch ms", "rate", "% ceil", "x torch", "err vs torch")


def format_table(rows, markdown=False) -> str:
    def cells(r):
        rate = "-" if r["rate"] is None else f"{r['rate']:.1f} {r['unit']}"
        f = lambda v, s: "-" if v is None else format(v, s)  # noqa: E731
        out = [r["op"], r["direction"], PRECISION_TORCH[r["precision"]], r["shape"], f(r["ours_ms"], ".3f"),
               f(r["torch_ms"], ".3f"), rate, f(None if r["ceiling_fraction"] is None else 100 * r["ceiling_fraction"], ".0f"),
               f(r["speedup_torch"], ".2f"), f(r["error_vs_torch"], ".1e")]
        note = "; ".join(([] if r["status"] == "ok" else [r["status"]]) + r["notes"])
        return out + [note]
    body = [cells(r) for r in rows]
    head = list(COLUMNS) + ["note"]
    if markdown:
        return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] +
                         ["| " + " | ".join(c) + " |" for c in body])
    widths = [max(len(h), *(len(c[i]) for c in body)) for i, h in enumerate(head)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip()
                     for line in [head] + body)


def machine_info() -> dict:
    import platform

    import llmcore

    cp, torch = _cp(), _torch()
    props = cp.cuda.runtime.getDeviceProperties(0)
    return {"gpu": props["name"].decode(), "llmcore": llmcore.__version__, "cupy": cp.__version__,
            "torch": torch.__version__, "python": platform.python_version(), "info": llmcore.info()}


def run(args) -> int:
    import llmcore

    if not llmcore.cuda_available():
        print("llmcore bench --device cuda: " + ("no GPU is visible" if llmcore.info()["cuda_built"]
              else "llmcore was built without its CUDA core"), file=sys.stderr)
        return 2
    try:
        _torch()
    except ImportError:
        print("llmcore bench --device cuda: compares against PyTorch, which is not installed", file=sys.stderr)
        return 2
    only = [s.strip() for s in args.ops.split(",") if s.strip()] if args.ops else None
    ceilings = measure_ceilings()
    print(f"ceilings: copy {ceilings['copy_gbs']:.0f} GB/s (read+write); cuBLAS 8192^3 fp32 "
          f"{ceilings['cublas_fp32_tflops']:.1f}, tf32 {ceilings['cublas_tf32_tflops']:.1f}, "
          f"bf16 {ceilings['cublas_bf16_tflops']:.1f} TFLOP/s", flush=True)
    rows = []
    for case in all_cases(only):
        row = run_case(case, ceilings)
        print(f"  {row['op']} {row['direction']} {PRECISION_TORCH[row['precision']]} {row['shape']}: "
              f"{row['status']} {row['ours_ms'] if row['ours_ms'] is None else round(row['ours_ms'], 3)} ms",
              file=sys.stderr, flush=True)
        rows.append(row)
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"argv": sys.argv, "machine": machine_info(), "ceilings": ceilings, "rows": rows}, f,
                      indent=1, default=str)
        info = machine_info()
        with open(args.json.rsplit(".", 1)[0] + ".md", "w") as f:
            f.write(f"`{' '.join(sys.argv)}` on {info['gpu']} (torch {info['torch']}, cupy {info['cupy']}).\n"
                    f"Ceilings: copy {ceilings['copy_gbs']:.0f} GB/s (read+write); cuBLAS 8192^3 fp32 "
                    f"{ceilings['cublas_fp32_tflops']:.1f}, tf32 {ceilings['cublas_tf32_tflops']:.1f}, "
                    f"bf16 {ceilings['cublas_bf16_tflops']:.1f} TFLOP/s. % ceil: of the copy rate (GB/s rows) "
                    f"or of cuBLAS at the row's precision (TFLOP/s rows). x torch: torch time / ours.\n\n")
            f.write(format_table(rows, markdown=True) + "\n")
        print(f"wrote {args.json}")
    return 0 if all(r["status"] == "ok" for r in rows) else 1
