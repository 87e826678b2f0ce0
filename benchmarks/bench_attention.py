"""Fused attention, forward and forward+backward: llmcore vs the NumPy reference (materialised
scores, BLAS matmuls) vs PyTorch's scaled_dot_product_attention on the CPU (when installed).

    PYTHONPATH=python python3 -m pytest benchmarks/bench_attention.py --benchmark-group-by=group

Groups are attention/<fwd|fwdbwd>/<shape>; each result is checked against the reference before it
is timed. extra_info carries the useful FLOPs (masked scores not counted: 4 D per visible
query/key pair forward, 10 D backward) and GFLOP/s.
"""
from __future__ import annotations

import numpy as np
import pytest

import llmcore
from llmcore import ops, reference

try:
    import torch
except ImportError:  # pragma: no cover
    torch = None

# (B, T, S, H, Hkv, D, causal): training shapes of a small GPT, and one GQA decoding step.
SHAPES = [
    (4, 512, 512, 8, 8, 64, True),
    (4, 2048, 2048, 8, 8, 64, True),
    (1, 1, 2048, 32, 8, 128, True),
]
IMPLS = ["llmcore", "numpy", "torch"]


def _name(shape):
    B, T, S, H, Hkv, D, causal = shape
    kv = f"-Hkv{Hkv}" if Hkv != H else ""
    s = f"-S{S}" if S != T else ""
    return f"B{B}-H{H}{kv}-T{T}{s}-D{D}" + ("" if causal else "-full")


def _visible_pairs(T, S, causal):
    # causal: query i (at key position S - T + i) sees S - T + i + 1 keys
    return T * (S - T) + T * (T + 1) // 2 if causal else T * S


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


_inputs_cache: dict = {}


def _inputs(shape):
    """Inputs, the reference forward and backward (float32) for one shape, computed once."""
    if shape not in _inputs_cache:
        _inputs_cache.clear()  # keep one shape's reference (up to a few GiB at T = 2048) at a time
        B, T, S, H, Hkv, D, causal = shape
        rng = np.random.default_rng(0)
        q = rng.standard_normal((B, T, H, D), dtype=np.float32)
        k = rng.standard_normal((B, S, Hkv, D), dtype=np.float32)
        v = rng.standard_normal((B, S, Hkv, D), dtype=np.float32)
        dout = rng.standard_normal((B, T, H, D), dtype=np.float32)
        out, lse = reference.attention(q, k, v, causal=causal)
        grads = reference.attention_backward(dout, q, k, v, out, lse, causal=causal)
        _inputs_cache[shape] = (q, k, v, dout, (out, lse), grads)
    return _inputs_cache[shape]


def _torch_fn(q, k, v, dout, causal, with_backward):
    B, T, H, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    torch.set_num_threads(llmcore.get_num_threads())
    # torch's is_causal aligns the mask top-left; with T < S our queries are the last T, so a
    # single decoding query (T = 1) sees every key: no mask.
    is_causal = causal and T > 1
    if causal and 1 < T < S:
        pytest.skip("torch's causal mask is top-left aligned")
    tq, tk, tv = (torch.from_numpy(np.ascontiguousarray(x.transpose(0, 2, 1, 3))) for x in (q, k, v))
    tdo = torch.from_numpy(np.ascontiguousarray(dout.transpose(0, 2, 1, 3)))
    gqa = dict(enable_gqa=True) if Hkv != H else {}
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if not with_backward:
        def run():
            with torch.no_grad():
                return (sdpa(tq, tk, tv, is_causal=is_causal, **gqa).numpy().transpose(0, 2, 1, 3),)
        return run
    for t in (tq, tk, tv):
        t.requires_grad_(True)

    def run():
        tq.grad = tk.grad = tv.grad = None
        o = sdpa(tq, tk, tv, is_causal=is_causal, **gqa)
        o.backward(tdo)
        return (o.detach().numpy().transpose(0, 2, 1, 3),
                *(t.grad.numpy().transpose(0, 2, 1, 3) for t in (tq, tk, tv)))
    return run


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("direction", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("shape", SHAPES, ids=_name)
def test_attention(benchmark, shape, direction, impl):
    B, T, S, H, Hkv, D, causal = shape
    q, k, v, dout, ref_fwd, ref_grads = _inputs(shape)
    with_backward = direction == "fwdbwd"
    if impl == "llmcore":
        def run():
            out, lse = ops.attention(q, k, v, causal=causal)
            if not with_backward:
                return out, lse
            return (out, *ops.attention_backward(dout, q, k, v, out, lse, causal=causal))
    elif impl == "numpy":
        def run():
            out, lse = reference.attention(q, k, v, causal=causal)
            if not with_backward:
                return out, lse
            return (out, *reference.attention_backward(dout, q, k, v, out, lse, causal=causal))
    else:
        if torch is None:
            pytest.skip("torch is not installed")
        run = _torch_fn(q, k, v, dout, causal, with_backward)

    # Correctness before timing: against the float32 reference.
    got = run()
    want = (ref_fwd[0], *ref_grads) if with_backward else ref_fwd[:len(got)]
    for a, b in zip(got, want):
        assert _rel_err(a, b) < 1e-4

    pairs = B * H * _visible_pairs(T, S, causal)
    flops = (14 if with_backward else 4) * D * pairs
    benchmark.group = f"attention/{direction}/{_name(shape)}"
    benchmark.extra_info.update(impl=impl, flops=flops, simd=llmcore.simd(),
                                threads=llmcore.get_num_threads())
    # The reference at T = 2048 takes seconds per call: a few rounds are enough there.
    slow = impl == "numpy" and T * S >= 2048 * 2048
    benchmark.pedantic(run, rounds=3 if slow else 10, iterations=1, warmup_rounds=0 if slow else 1)
    benchmark.extra_info["gflops"] = flops / benchmark.stats.stats.median / 1e9
