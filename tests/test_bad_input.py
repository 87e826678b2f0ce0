"""Wrong input never crashes the interpreter: a result or a clear TypeError/ValueError."""
import os
import subprocess
import sys

import numpy as np
import pytest

import llmcore
from llmcore import ops

FUZZ_SCRIPT = os.path.join(os.path.dirname(__file__), "fuzz", "fuzz_ops.py")
sys.path.insert(0, os.path.dirname(FUZZ_SCRIPT))
from fuzz_ops import FUZZERS  # noqa: E402


@pytest.mark.parametrize("fuzzer", [f.__name__ for f in FUZZERS])
def test_fuzzed_inputs_never_crash(fuzzer):
    # In a subprocess: a segfault here would otherwise end the whole test run.
    result = subprocess.run([sys.executable, FUZZ_SCRIPT, fuzzer], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"exit code {result.returncode}\n{result.stdout}\n{result.stderr[-4000:]}"
    assert f"{fuzzer}: ok" in result.stdout


f32 = np.ones((4, 8), np.float32)
w8 = np.ones(8, np.float32)
w38 = np.ones((3, 8), np.float32)  # a linear weight, (out, in)
r4 = np.ones(4, np.float32)  # a norm's saved mean or rstd for f32


@pytest.mark.parametrize("call,error,names", [
    (lambda: ops.softmax(f32.astype(np.float64)), TypeError, ["x", "float32", "float64"]),
    (lambda: ops.softmax([[1.0, 2.0]]), TypeError, ["x", "numpy.ndarray"]),
    (lambda: ops.softmax(np.float32(1.0)), TypeError, ["x"]),
    (lambda: ops.softmax(np.ones((), np.float32)), ValueError, ["x", "dimensions"]),
    (lambda: ops.rmsnorm(f32, np.ones(7, np.float32)), ValueError, ["weight", "(8,)", "(7,)"]),
    (lambda: ops.rmsnorm(np.ones((3, 0), np.float32), np.ones(0, np.float32)), ValueError, ["x", "empty"]),
    (lambda: ops.layernorm(f32, w8, None), TypeError, ["bias"]),
    (lambda: ops.matmul(f32, f32), ValueError, ["b", "K=8", "K=4"]),
    (lambda: ops.matmul(np.ones(3, np.float32), f32), ValueError, ["a", "dimensions"]),
    (lambda: ops.matmul(np.ones((2, 3, 4), np.float32), np.ones((5, 4, 2), np.float32)), ValueError, ["b", "batch"]),
    (lambda: ops.linear(f32, np.ones((3, 7), np.float32)), ValueError, ["x", "in_features"]),
    (lambda: ops.gelu(f32, "exact"), ValueError, ["approximate", "tanh"]),
    (lambda: ops.cross_entropy(f32, np.array([0, 1, 2, 8])), ValueError, ["targets", "8", "[0, 8)"]),
    (lambda: ops.cross_entropy(f32, np.zeros(4, np.float32)), TypeError, ["targets", "integer"]),
    (lambda: ops.cross_entropy(f32, np.zeros(3, np.int64)), ValueError, ["targets", "(4,)"]),
    (lambda: ops.embedding(f32, np.array([4])), ValueError, ["ids", "[0, 4)"]),
    (lambda: ops.embedding(f32, np.array([-1])), ValueError, ["ids"]),
    (lambda: ops.embedding_backward(f32, np.arange(4), 3), ValueError, ["ids", "[0, 3)"]),
    (lambda: ops.adamw_step(f32.copy(), f32, f32.copy(), f32.copy(), lr=-1.0, step=1), ValueError, ["lr"]),
    # residual: the output's shape (linear) or x's (the norms' backward), never broadcast
    (lambda: ops.linear(f32, w38, residual=np.ones((4, 8), np.float32)), ValueError, ["residual", "(4, 3)", "(4, 8)"]),
    (lambda: ops.linear(f32, w38, residual=np.ones(3, np.float32)), ValueError, ["residual", "(4, 3)", "(3,)"]),
    (lambda: ops.linear(f32, w38, w38[:, 0].copy(), residual=np.ones((1, 4, 3), np.float32)), ValueError, ["residual"]),
    (lambda: ops.linear(f32, w38, residual=np.ones((4, 3))), TypeError, ["residual", "float32", "float64"]),
    (lambda: ops.linear(f32, w38, residual=[[0.0] * 3] * 4), TypeError, ["residual", "list"]),
    (lambda: ops.rmsnorm_backward(f32, f32, w8, r4, residual=np.ones((4, 7), np.float32)), ValueError,
     ["residual", "(4, 8)", "(4, 7)"]),
    (lambda: ops.rmsnorm_backward(f32, f32, w8, r4, residual=w8), ValueError, ["residual", "(4, 8)", "(8,)"]),
    (lambda: ops.rmsnorm_backward(f32, f32, w8, r4, residual=f32.astype(np.float16)), TypeError, ["residual", "float16"]),
    (lambda: ops.layernorm_backward(f32, f32, w8, r4, r4, residual=np.ones((8, 4), np.float32)), ValueError,
     ["residual", "(4, 8)", "(8, 4)"]),
    (lambda: ops.layernorm_backward(f32, f32, w8, r4, r4, residual=np.ones((1, 8), np.float32)), ValueError, ["residual"]),
    (lambda: ops.layernorm_backward(f32, f32, w8, r4, r4, residual=f32.astype(np.int32)), TypeError, ["residual", "int32"]),
])
def test_clear_errors(call, error, names):
    with pytest.raises(error) as info:
        call()
    for name in names:
        assert name in str(info.value), f"{name!r} not in {str(info.value)!r}"


def test_zero_size_arrays_give_empty_results():
    empty_rows = np.ones((0, 8), np.float32)
    assert ops.softmax(empty_rows).shape == (0, 8)
    assert ops.softmax(np.ones((3, 0), np.float32)).shape == (3, 0)
    y, rstd = ops.rmsnorm(empty_rows, w8)
    assert y.shape == (0, 8) and rstd.shape == (0,)
    assert ops.gelu(np.ones((0,), np.float32)).shape == (0,)
    loss, lse = ops.cross_entropy(empty_rows, np.zeros(0, np.int64))
    assert loss.shape == (0,)
    assert ops.embedding(f32, np.zeros((0, 5), np.int64)).shape == (0, 5, 8)
    np.testing.assert_array_equal(ops.embedding_backward(np.ones((0, 8), np.float32), np.zeros(0, np.int64), 3), np.zeros((3, 8)))


def test_compiled_entry_points_check_their_inputs():
    # llmcore._cpu called directly must refuse out-of-bounds work, not read past an array.
    cpu = llmcore._cpu
    with pytest.raises(ValueError, match="targets"):
        cpu.cross_entropy_forward(f32, np.array([0, 1, 2, 99]), -100)
    with pytest.raises(ValueError, match="ids"):
        cpu.embedding_forward(f32, np.array([1 << 40]))
    with pytest.raises(TypeError, match="float32"):
        cpu.softmax_forward(f32.astype(np.float64))
    with pytest.raises(ValueError, match="contiguous"):
        cpu.softmax_forward(f32.T)
    with pytest.raises(ValueError, match="rstd"):
        cpu.rmsnorm_backward(f32, f32, w8, np.ones(3, np.float32))
    with pytest.raises(ValueError, match="writeable"):
        frozen = f32.copy()
        frozen.flags.writeable = False
        cpu.adamw_step(frozen, f32, f32.copy(), f32.copy(), 1e-3, 0.9, 0.999, 1e-8, 0.0, 1)


def test_compiled_entry_points_check_residuals():
    # The residual the compiled kernels read must have the output's (linear) or x's (norms) shape.
    cpu = llmcore._cpu
    with pytest.raises(ValueError, match="residual"):
        cpu.linear(f32, w38, None, np.ones(12, np.float32))
    with pytest.raises(TypeError, match="residual"):
        cpu.linear(f32, w38, None, np.ones((4, 3)))
    with pytest.raises(ValueError, match="residual"):
        cpu.linear(f32, w38, None, np.ones((3, 4), np.float32).T)  # not C-contiguous
    with pytest.raises(ValueError, match="residual"):
        cpu.rmsnorm_backward(f32, f32, w8, r4, np.ones((4, 7), np.float32))
    with pytest.raises(ValueError, match="residual"):
        cpu.layernorm_backward(f32, f32, w8, r4, r4, np.ones(8, np.float32))
    with pytest.raises(TypeError, match="residual"):
        cpu.layernorm_backward(f32, f32, w8, r4, r4, f32.astype(np.float64))
