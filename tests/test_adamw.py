import numpy as np
import pytest

from llmcore import ops, reference as ref
from helpers import assert_close, randn

HYPER = dict(lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)


@pytest.mark.parametrize("shape", [(1,), (7,), (17, 33), (3, 5, 129), (70001,)])
def test_adamw_matches_reference_over_steps(simd, rng, shape):
    param, m, v = randn(rng, shape), np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    rparam, rm, rv = param.astype(np.float64), m.astype(np.float64), v.astype(np.float64)
    for step in range(1, 6):
        grad = randn(rng, shape)
        ops.adamw_step(param, grad, m, v, step=step, **HYPER)
        ref.adamw_step(rparam, grad.astype(np.float64), rm, rv, step=step, **HYPER)
    assert_close(param, rparam, 1e-6, "param")
    assert_close(m, rm, 1e-6, "m")
    assert_close(v, rv, 1e-5, "v")


def test_adamw_matches_torch_semantics_by_hand():
    # One step from m = v = 0 moves each weight by lr * sign(grad) (bias-corrected Adam), after
    # decoupled decay param * (1 - lr * wd).
    param = np.array([1.0, -2.0, 0.5], np.float32)
    grad = np.array([0.3, -0.001, 2.0], np.float32)
    m, v = np.zeros(3, np.float32), np.zeros(3, np.float32)
    ops.adamw_step(param, grad, m, v, lr=0.1, beta1=0.9, beta2=0.999, eps=0.0, weight_decay=0.5, step=1)
    expected = np.array([1.0, -2.0, 0.5]) * (1 - 0.05) - 0.1 * np.sign(grad)
    np.testing.assert_allclose(param, expected, rtol=1e-6)
    np.testing.assert_allclose(m, 0.1 * grad, rtol=1e-6)
    one_minus_beta2 = np.float64(np.float32(1) - np.float32(0.999))  # as float32 arithmetic rounds it
    np.testing.assert_allclose(v, one_minus_beta2 * grad.astype(np.float64) ** 2, rtol=1e-6)


def test_adamw_refuses_arrays_it_cannot_update_in_place(rng):
    param = randn(rng, (8, 8))
    m, v, grad = np.zeros_like(param), np.zeros_like(param), randn(rng, (8, 8))
    with pytest.raises(ValueError, match="param"):
        ops.adamw_step(param.T, grad, m, v, step=1, **HYPER)
    frozen = param.copy()
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="param"):
        ops.adamw_step(frozen, grad, m, v, step=1, **HYPER)
    with pytest.raises(ValueError, match="step"):
        ops.adamw_step(param, grad, m, v, step=0, **HYPER)
    with pytest.raises(ValueError, match="beta1"):
        ops.adamw_step(param, grad, m, v, step=1, **{**HYPER, "beta1": 1.0})
