"""GELU and its backward, elementwise: csrc/gelu.cpp."""
from __future__ import annotations

from . import _checks as chk

_FORMS = ("tanh", "none")


def gelu(x, approximate: str = "tanh"):
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), or with approximate="none" x Phi(x)."""
    x = chk.float_array("x", x)
    approximate = chk.choice("approximate", approximate, _FORMS)
    return chk.backend(x).gelu_forward(x, approximate == "tanh")


def gelu_backward(dy, x, approximate: str = "tanh"):
    """dx = dy * gelu'(x)."""
    x = chk.float_array("x", x)
    dy = chk.float_array("dy", dy)
    chk.same_shape("dy", dy, x.shape, "x's shape")
    approximate = chk.choice("approximate", approximate, _FORMS)
    return chk.backend(dy, x).gelu_backward(dy, x, approximate == "tanh")
