"""matmul, linear and linear_backward: the GEMM in csrc/matmul.cpp."""
from __future__ import annotations

from . import _checks as chk


def _operand(name: str, x, transpose: bool):
    """A float32 operand and its transpose flag, without copying a transposed 2-D view."""
    chk.float_array(name, x, (2, None), contiguous=False)
    if not x.flags.c_contiguous and x.ndim == 2 and x.T.flags.c_contiguous:
        return x.T, not transpose  # x is the transpose of a C-contiguous array: flip the flag
    return chk.array_module(x).ascontiguousarray(x), transpose


def matmul(a, b, *, transpose_a: bool = False, transpose_b: bool = False):
    """a @ b over the last two axes (each optionally transposed).

    a is (..., M, K) ((..., K, M) with transpose_a); b is (K, N) ((N, K) with transpose_b), or
    has a's batch dimensions in front. Returns (..., M, N) float32.
    """
    a, transpose_a = _operand("a", a, bool(transpose_a))
    b, transpose_b = _operand("b", b, bool(transpose_b))
    k_a = a.shape[-2] if transpose_a else a.shape[-1]
    k_b = b.shape[-1] if transpose_b else b.shape[-2]
    if k_a != k_b:
        raise ValueError(f"b: inner dimensions differ: a gives K={k_a} (shape {a.shape}, transpose_a="
                         f"{transpose_a}), b gives K={k_b} (shape {b.shape}, transpose_b={transpose_b})")
    if b.ndim > 2 and b.shape[:-2] != a.shape[:-2]:
        raise ValueError(f"b: expected 2 dimensions or a's batch dimensions {a.shape[:-2]} in front, got shape {b.shape}")
    return chk.backend(a, b).matmul(a, b, transpose_a, transpose_b)


def _linear_shapes(x, weight):
    x = chk.float_array("x", x, (1, None))
    weight = chk.float_array("weight", weight, 2)
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x: last axis must equal weight's in_features {weight.shape[1]} "
                         f"(weight is (out, in) = {weight.shape}), got shape {x.shape}")
    return x, weight


def linear(x, weight, bias=None, residual=None):
    """x (..., in) @ weight (out, in).T + bias (out,) + residual (..., out) -> (..., out).

    residual is a skip connection's input (a transformer block's x + proj(...)): on the CPU the
    GEMM adds it as it writes each tile, with no pass of its own.
    """
    x, weight = _linear_shapes(x, weight)
    bias = chk.optional_float_array("bias", bias, (weight.shape[0],), "weight's out_features")
    out_shape = x.shape[:-1] + (weight.shape[0],)
    residual = chk.optional_float_array("residual", residual, out_shape, "the output's shape")
    mod = chk.backend(*(a for a in (x, weight, bias, residual) if a is not None))
    return chk.with_residual(mod.linear, (x, weight, bias), residual)


def linear_backward(dy, x, weight, *, has_bias: bool = False, dweight=None, dbias=None):
    """(dx, dweight, dbias or None) for y = linear(x, weight, bias).

    dweight (out, in) and, with has_bias, dbias (out,): gradients to add into, in place, as a
    training step accumulates each parameter's gradient (C-contiguous, writeable float32). They
    are returned as given. On the CPU the weight-gradient GEMM adds into dweight directly, with
    no fresh array and no separate pass.
    """
    x, weight = _linear_shapes(x, weight)
    dy = chk.float_array("dy", dy)
    chk.same_shape("dy", dy, x.shape[:-1] + (weight.shape[0],), "x's shape with out_features last")
    has_bias = bool(has_bias)
    if dweight is None and dbias is None:
        return chk.backend(dy, x, weight).linear_backward(dy, x, weight, has_bias)
    if dweight is None or (dbias is not None) != has_bias:
        raise ValueError("dweight, dbias: pass dweight, plus dbias exactly when has_bias, or neither")
    dweight = chk.writable_float_array("dweight", dweight, weight.shape)
    if dbias is not None:
        dbias = chk.writable_float_array("dbias", dbias, (weight.shape[0],))
    mod = chk.backend(*(a for a in (dy, x, weight, dweight, dbias) if a is not None))
    if chk.is_cupy(dy):
        # The CUDA core reduces its split-K weight gradient into a fresh array: add it here.
        dx, dw, db = mod.linear_backward(dy, x, weight, has_bias)
        dweight += dw
        if dbias is not None:
            dbias += db
        return dx, dweight, dbias
    return mod.linear_backward(dy, x, weight, has_bias, dweight, dbias)


# How CuPy matmuls use the tensor cores; the names and meanings of torch.set_float32_matmul_precision.
# Storage stays float32 in every mode (CuPy has no bfloat16): operands are rounded as the kernel
# stages them, products are accumulated in float32. CPU matmuls always compute in float32.
MATMUL_PRECISIONS = {
    "highest": "float32 on the CUDA cores (exact fp32, the default)",
    "high": "TF32 tensor cores (10-bit mantissa operands), fp32 accumulation",
    "medium": "bfloat16 tensor cores (7-bit mantissa operands), fp32 accumulation",
}
_matmul_precision = "highest"


def set_matmul_precision(precision: str) -> None:
    """Sets how matmul, linear and linear_backward on CuPy arrays use the GPU's tensor cores:
    'highest' (fp32), 'high' (tf32) or 'medium' (bf16), as torch.set_float32_matmul_precision."""
    global _matmul_precision
    chk.choice("precision", precision, MATMUL_PRECISIONS)
    from .._backend import _load_cuda

    mod = _load_cuda()
    if mod is not None:
        mod.set_matmul_precision(precision)
    _matmul_precision = precision


def get_matmul_precision() -> str:
    """The current setting of set_matmul_precision."""
    return _matmul_precision
