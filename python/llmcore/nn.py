"""Layers with explicit forward and backward passes, built only from llmcore operations.

Every layer runs on a Backend: "numpy" (llmcore.reference, float32 or float64), "cpu" (llmcore.ops,
the compiled core, float32) and "cuda" (llmcore.ops on CuPy arrays: the CUDA core, float32).
Elementwise glue (adds, reshapes, ReLU, RoPE) is written with array methods and be.xp, so the same
code serves each backend; parameters are drawn on the host and moved with be.to_device.

The gradient rule, for every layer in this file:
  * forward(x) saves what backward needs and returns the output;
  * backward(dy) returns dx, a fresh array: activation gradients OVERWRITE (=);
  * parameter gradients ACCUMULATE into Parameter.grad (+=), so two forward/backward passes before
    an optimizer step add up (gradient accumulation), and a parameter shared by two layers (tied
    embeddings) receives the sum of both contributions. Call zero_grad() before each new step.
"""
from __future__ import annotations

import numpy as np

from . import positions


# ----------------------------------------------------------------------------------------------
# Backends: name -> the namespace of operations, the array module the glue uses, and the two copies
# between the host and the backend's device. Layers never ask which backend they run on: they call
# be.ops for the kernels, be.xp for glue arrays, be.to_device for arrays made on the host (weights
# drawn from NumPy's RNG, fixed tables, token ids) and be.to_host for what Python must read.

def _same(array):
    return array


class Backend:
    def __init__(self, name: str, ops, xp, *, to_device=None, to_host=None):
        self.name, self.ops, self.xp = name, ops, xp
        self.to_device = _same if to_device is None else to_device  # NumPy array -> backend array
        self.to_host = _same if to_host is None else to_host  # backend array -> NumPy array

    def __repr__(self):
        return f"Backend({self.name!r})"


BACKENDS = ("numpy", "cpu", "cuda")


def _cuda_backend() -> Backend:
    """The CUDA core: CuPy arrays on the GPU. Needs CuPy and a CUDA build of llmcore that sees a GPU."""
    from . import _backend, ops

    problems = []
    try:
        import cupy
    except ImportError as exc:
        problems.append(f'CuPy is not installed ({exc}); install it with: pip install "llmcore[cuda]"')
    if not _backend.cuda_available():
        problems.append((_backend._cuda_error + "; reinstall llmcore on a machine where nvcc is found")
                        if _backend._cuda_error else
                        "llmcore's CUDA core sees no GPU (check nvidia-smi, the driver and CUDA_VISIBLE_DEVICES)")
    if problems:
        raise RuntimeError("backend 'cuda' is not available: " + "; ".join(problems)
                           + ". Use backend 'cpu' (--device cpu: the compiled CPU core) or 'numpy' (the reference).")
    return Backend("cuda", ops, cupy, to_device=cupy.asarray, to_host=cupy.asnumpy)


def get_backend(name: str) -> Backend:
    """The Backend called `name`: "numpy" (NumPy reference), "cpu" (compiled core) or "cuda"
    (the CUDA core on CuPy arrays; RuntimeError saying what is missing where it cannot run)."""
    if isinstance(name, Backend):
        return name
    if name == "numpy":
        from . import reference

        return Backend("numpy", reference, np)
    if name == "cpu":
        from . import ops

        return Backend("cpu", ops, np)
    if name == "cuda":
        return _cuda_backend()
    raise ValueError(f"backend: expected one of {list(BACKENDS)}, got {name!r}")


def array_module(x):
    """numpy or cupy: the module that made the array x."""
    from .ops._checks import array_module

    return array_module(x)


# ----------------------------------------------------------------------------------------------

class Parameter:
    """A trainable array and the gradient that backward passes accumulate into it (same device).

    zero_grad() only marks the gradient zero: the zeros are written when .grad is next read, and a
    layer whose kernel makes the whole gradient (Linear) instead takes that fresh array as .grad.
    Zeroing every gradient of the cpu-small model, 12.8 MB, took 2.2 ms of a 170 ms training step,
    and the weight-gradient GEMMs then read the zeros back to add to them."""

    __slots__ = ("data", "_grad", "_grad_is_zero")

    def __init__(self, data):
        self.data = data
        self._grad = array_module(data).zeros_like(data)
        self._grad_is_zero = False

    @property
    def grad(self):
        if self._grad_is_zero:
            self._grad[...] = 0
            self._grad_is_zero = False
        return self._grad

    @grad.setter
    def grad(self, value):
        self._grad, self._grad_is_zero = value, False

    @property
    def grad_is_zero(self) -> bool:
        """True from zero_grad() until something reads or writes .grad."""
        return self._grad_is_zero

    def zero_grad(self):
        self._grad_is_zero = True

    def __repr__(self):
        return f"Parameter(shape={self.data.shape}, dtype={self.data.dtype})"


class Module:
    """Finds its parameters by walking its attributes (Parameters, Modules, lists of Modules)."""

    def named_parameters(self, prefix: str = ""):
        seen = set()
        for name, value in vars(self).items():
            items = [(name, value)]
            if isinstance(value, list):
                items = [(f"{name}.{i}", v) for i, v in enumerate(value)]
            for key, item in items:
                if isinstance(item, Parameter) and id(item) not in seen:
                    seen.add(id(item))
                    yield prefix + key, item
                elif isinstance(item, Module):
                    for sub_name, p in item.named_parameters(prefix + key + "."):
                        if id(p) not in seen:  # a shared Parameter keeps its first name
                            seen.add(id(p))
                            yield sub_name, p

    def zero_grad(self):
        for _, p in self.named_parameters():
            p.zero_grad()


def _normal(rng, shape, std, dtype):
    return (rng.standard_normal(shape) * std).astype(dtype)


class Embedding(Module):
    """Rows of a (num, dim) table looked up by integer ids."""

    def __init__(self, be, num, dim, *, rng, dtype, std=0.02):
        self.be = be
        self.weight = Parameter(be.to_device(_normal(rng, (num, dim), std, dtype)))

    def forward(self, ids):
        self.ids = ids  # (B, T)
        return self.be.ops.embedding(self.weight.data, ids)  # (B, T, C)

    def backward(self, dout):
        self.weight.grad += self.be.ops.embedding_backward(dout, self.ids, self.weight.data.shape[0])
        return None  # ids are integers: nothing flows further back


class Linear(Module):
    """y = x @ weight.T (+ bias), weight (out, in). `weight` may be an existing Parameter (tying)."""

    def __init__(self, be, d_in, d_out, *, rng, dtype, bias=False, std=0.02, weight=None):
        self.be = be
        if weight is None:
            weight = Parameter(be.to_device(_normal(rng, (d_out, d_in), std, dtype)))
        self.weight = weight
        self.bias = Parameter(be.to_device(np.zeros(d_out, dtype=dtype))) if bias else None

    def forward(self, x, residual=None):
        """x (..., in) -> (..., out), plus residual (..., out) when given (a skip connection, added
        as the kernel writes the output; its gradient is dy itself, the caller's to route)."""
        self.x = x
        bias = None if self.bias is None else self.bias.data
        return self.be.ops.linear(x, self.weight.data, bias, residual=residual)

    def backward(self, dy):
        weight, bias = self.weight, self.bias
        has_bias = bias is not None
        # The step's first gradient for these parameters: the kernel's fresh arrays become .grad.
        # Otherwise the kernel adds into .grad (a tied weight's second use, gradient accumulation).
        fresh = weight.grad_is_zero and (not has_bias or bias.grad_is_zero)
        dx, dweight, dbias = self.be.ops.linear_backward(
            dy, self.x, weight.data, has_bias=has_bias, dweight=None if fresh else weight.grad,
            dbias=None if fresh or not has_bias else bias.grad)
        if fresh:
            weight.grad = dweight
            if has_bias:
                bias.grad = dbias
        return dx


class RMSNorm(Module):
    def __init__(self, be, dim, *, dtype, eps=1e-5):
        self.be, self.eps = be, eps
        self.weight = Parameter(be.to_device(np.ones(dim, dtype=dtype)))

    def forward(self, x):
        y, self.rstd = self.be.ops.rmsnorm(x, self.weight.data, self.eps)
        self.x = x
        return y

    def backward(self, dy, residual=None):
        """dx, plus residual when given (the gradient reaching x around the norm)."""
        dx, dw = self.be.ops.rmsnorm_backward(dy, self.x, self.weight.data, self.rstd, residual=residual)
        self.weight.grad += dw
        return dx


class LayerNorm(Module):
    def __init__(self, be, dim, *, dtype, eps=1e-5):
        self.be, self.eps = be, eps
        self.weight = Parameter(be.to_device(np.ones(dim, dtype=dtype)))
        self.bias = Parameter(be.to_device(np.zeros(dim, dtype=dtype)))

    def forward(self, x):
        y, self.mean, self.rstd = self.be.ops.layernorm(x, self.weight.data, self.bias.data, self.eps)
        self.x = x
        return y

    def backward(self, dy, residual=None):
        """dx, plus residual when given (the gradient reaching x around the norm)."""
        dx, dw, db = self.be.ops.layernorm_backward(dy, self.x, self.weight.data, self.mean, self.rstd,
                                                    residual=residual)
        self.weight.grad += dw
        self.bias.grad += db
        return dx


def make_norm(kind, be, dim, *, dtype):
    if kind == "rmsnorm":
        return RMSNorm(be, dim, dtype=dtype)
    if kind == "layernorm":
        return LayerNorm(be, dim, dtype=dtype)
    raise ValueError(f"norm: expected 'rmsnorm' or 'layernorm', got {kind!r}")


class KVCache:
    """Keys and values of the tokens seen so far, for one attention layer: (B, max_len, Hkv, D) each.

    With GQA/MQA it holds only the Hkv shared heads: the cache is H/Hkv times smaller than MHA's."""

    def __init__(self, B, max_len, n_kv_head, head_dim, dtype, xp=np):
        self.k = xp.empty((B, max_len, n_kv_head, head_dim), dtype=dtype)
        self.v = xp.empty((B, max_len, n_kv_head, head_dim), dtype=dtype)


class CausalSelfAttention(Module):
    """Multi-head causal self-attention with one fused QKV projection and n_kv_head K/V heads
    (n_kv_head == n_head: MHA; 1: MQA; in between: GQA, each K/V head shared by n_head/n_kv_head
    query heads, which the attention kernel handles without expanding K and V)."""

    def __init__(self, be, cfg, *, rng, dtype):
        self.be = be
        self.n_head, self.n_kv_head = cfg.n_head, cfg.n_kv_head
        self.head_dim = cfg.d_model // cfg.n_head
        qkv_dim = (cfg.n_head + 2 * cfg.n_kv_head) * self.head_dim
        self.c_attn = Linear(be, cfg.d_model, qkv_dim, rng=rng, dtype=dtype, bias=cfg.bias)
        # GPT-2's scaled init of the projections into the residual stream: 1/sqrt(2 * n_layer).
        self.c_proj = Linear(be, cfg.n_head * self.head_dim, cfg.d_model, rng=rng, dtype=dtype,
                             bias=cfg.bias, std=0.02 / np.sqrt(2 * cfg.n_layer))
        # Fixed tables live on the backend's device, next to the activations they meet.
        self.rope = None
        if cfg.pos == "rope":
            self.rope = be.to_device(positions.rope_tables(cfg.seq_len, self.head_dim, dtype=dtype))
        self.alibi_slopes = None
        if cfg.pos == "alibi":
            self.alibi_slopes = be.to_device(positions.alibi_slopes(cfg.n_head, dtype=dtype))

    def forward(self, x, cache=None, start=0, residual=None):
        """x (B, T, C). With a KVCache, x holds the tokens at positions start..start+T-1 and attends
        to every cached token before them as well (prefill: start=0; decoding: T=1). residual
        (B, T, C), if given, is added to the output by the output projection."""
        xp, ops = self.be.xp, self.be.ops
        B, T, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        qkv = self.c_attn.forward(x).reshape(B, T, H + 2 * Hkv, D)  # (B, T, H + 2Hkv, D)
        # q, k, v are strided views into the fused buffer: the kernel reads them without a copy.
        q, k, v = qkv[:, :, :H], qkv[:, :, H:H + Hkv], qkv[:, :, H + Hkv:]
        rope = None  # RoPE fused into the attention kernels (training: keys at positions 0..T-1)
        if self.rope is not None and cache is None:
            rope = self.rope[:T]
        elif self.rope is not None:
            # The cache keeps rotated keys (each is rotated once, not at every decoding step): q and
            # k rotated in place, the rotation reading and writing the same lines.
            positions.rope_forward(qkv[:, :, :H + Hkv], self.rope[start:start + T], out=qkv[:, :, :H + Hkv])
        if cache is not None:
            cache.k[:, start:start + T] = k
            cache.v[:, start:start + T] = v
            k, v = cache.k[:, :start + T], cache.v[:, :start + T]  # (B, S, Hkv, D), S = start + T
        out, lse = ops.attention(q, k, v, causal=True, alibi_slopes=self.alibi_slopes, rope=rope)  # (B, T, H, D)
        self.saved = (q, k, v, out, lse, rope)
        return self.c_proj.forward(out.reshape(B, T, H * D), residual)  # (B, T, C)

    def backward(self, dy):
        xp, ops = self.be.xp, self.be.ops
        q, k, v, out, lse, rope = self.saved
        B, T, H, D = q.shape
        Hkv = self.n_kv_head
        dout = self.c_proj.backward(dy).reshape(B, T, H, D)  # (B, T, H, D)
        # The kernel writes dq, dk, dv straight into the fused buffer's gradient (dq and dk turned
        # back through RoPE as they are written).
        dqkv = xp.empty((B, T, H + 2 * Hkv, D), dtype=dout.dtype)
        ops.attention_backward(dout, q, k, v, out, lse, causal=True, alibi_slopes=self.alibi_slopes,
                               dq=dqkv[:, :, :H], dk=dqkv[:, :, H:H + Hkv], dv=dqkv[:, :, H + Hkv:], rope=rope)
        return self.c_attn.backward(dqkv.reshape(B, T, (H + 2 * Hkv) * D))  # (B, T, C)


class MLP(Module):
    """c_fc (C -> ffn_mult*C), GELU (tanh form, an llmcore op) or ReLU, c_proj back to C."""

    def __init__(self, be, cfg, *, rng, dtype):
        self.be, self.act = be, cfg.act
        if cfg.act not in ("gelu", "relu"):
            raise ValueError(f"act: expected 'gelu' or 'relu', got {cfg.act!r}")
        hidden = cfg.ffn_mult * cfg.d_model
        self.c_fc = Linear(be, cfg.d_model, hidden, rng=rng, dtype=dtype, bias=cfg.bias)
        self.c_proj = Linear(be, hidden, cfg.d_model, rng=rng, dtype=dtype, bias=cfg.bias,
                             std=0.02 / np.sqrt(2 * cfg.n_layer))

    def forward(self, x, residual=None):
        """x (B, T, C) -> (B, T, C), plus residual when given (added by c_proj)."""
        self.h = self.c_fc.forward(x)  # (B, T, 4C)
        if self.act == "gelu":
            a = self.be.ops.gelu(self.h)
        else:
            a = self.be.xp.maximum(self.h, 0)  # ReLU is one comparison: NumPy glue, not a kernel
        return self.c_proj.forward(a, residual)  # (B, T, C)

    def backward(self, dy):
        da = self.c_proj.backward(dy)  # (B, T, 4C), fresh: safe to modify in place
        if self.act == "gelu":
            dh = self.be.ops.gelu_backward(da, self.h)
        else:
            # (where, not da[h <= 0] = 0: CuPy's boolean-mask assignment waits for the GPU)
            dh = self.be.xp.where(self.h > 0, da, da.dtype.type(0))
        return self.c_fc.backward(dh)


class Block(Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then + mlp(ln_2(x))."""

    def __init__(self, be, cfg, *, rng, dtype):
        self.ln_1 = make_norm(cfg.norm, be, cfg.d_model, dtype=dtype)
        self.attn = CausalSelfAttention(be, cfg, rng=rng, dtype=dtype)
        self.ln_2 = make_norm(cfg.norm, be, cfg.d_model, dtype=dtype)
        self.mlp = MLP(be, cfg, rng=rng, dtype=dtype)

    def forward(self, x, cache=None, start=0):
        # Each branch's output projection adds the residual stream as it writes its output: the
        # sums x + attn(...) and h + mlp(...) take no pass of their own.
        h = self.attn.forward(self.ln_1.forward(x), cache, start, residual=x)  # (B, T, C)
        return self.mlp.forward(self.ln_2.forward(h), residual=h)

    def backward(self, dy):
        # The residual stream passes dy through unchanged, and each norm's backward adds it to the
        # gradient that came through its branch.
        d = self.ln_2.backward(self.mlp.backward(dy), residual=dy)
        return self.ln_1.backward(self.attn.backward(d), residual=d)
