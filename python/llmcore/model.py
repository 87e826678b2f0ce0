"""The GPT: configuration, parameters, forward pass with the loss, backward pass, sampling.

    model = GPT(GPTConfig(vocab_size=65, seq_len=128, n_layer=4, n_head=4, n_kv_head=4, d_model=128))
    logits, loss = model.forward(idx, targets)   # idx, targets (B, T) int
    model.zero_grad(); model.backward()          # fills p.grad for p in model.parameters().values()

Layers and the gradient rule are in nn.py; the same model runs on every backend there. On "cuda",
parameters, gradients and activations are CuPy arrays; with the same seed the weights start equal to
the cpu model's (drawn on the host by NumPy's RNG, then copied to the GPU).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from . import nn, positions

POS_KINDS = ("rope", "learned", "sinusoidal", "alibi")


@dataclass
class GPTConfig:
    vocab_size: int
    seq_len: int  # the longest context the model is trained on (and the size of its KV cache)
    n_layer: int
    n_head: int
    n_kv_head: int  # == n_head: MHA; 1: MQA; a divisor of n_head in between: GQA
    d_model: int
    ffn_mult: int = 4
    pos: str = "rope"  # "rope" | "learned" | "sinusoidal" | "alibi"
    norm: str = "rmsnorm"  # "rmsnorm" | "layernorm"
    act: str = "gelu"  # "gelu" | "relu"
    tie_embeddings: bool = True
    bias: bool = False  # biases in the linear layers (GPT-2 has them; Llama does not)

    def __post_init__(self):
        for name in ("vocab_size", "seq_len", "n_layer", "n_head", "n_kv_head", "d_model", "ffn_mult"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head})")
        if self.pos not in POS_KINDS:
            raise ValueError(f"pos: expected one of {list(POS_KINDS)}, got {self.pos!r}")
        if self.pos == "rope" and (self.d_model // self.n_head) % 2:
            raise ValueError(f"pos='rope' rotates pairs of channels: the head dimension "
                             f"d_model/n_head = {self.d_model // self.n_head} must be even")
        if self.norm not in ("rmsnorm", "layernorm"):
            raise ValueError(f"norm: expected 'rmsnorm' or 'layernorm', got {self.norm!r}")
        if self.act not in ("gelu", "relu"):
            raise ValueError(f"act: expected 'gelu' or 'relu', got {self.act!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        return cls(**d)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, backend="cpu", seed: int = 0, dtype=np.float32):
        cfg = self.config = config
        be = self.be = nn.get_backend(backend)
        self.dtype = np.dtype(dtype)
        if be.name != "numpy" and self.dtype != np.float32:
            raise TypeError(f"dtype: backend {be.name!r} runs in float32 only, got {self.dtype} "
                            "(float64 is for the 'numpy' reference backend)")
        rng = np.random.default_rng(seed)
        self.wte = nn.Embedding(be, cfg.vocab_size, cfg.d_model, rng=rng, dtype=self.dtype)
        self.wpe = None
        if cfg.pos == "learned":
            self.wpe = nn.Embedding(be, cfg.seq_len, cfg.d_model, rng=rng, dtype=self.dtype, std=0.01)
        self.pos_table = None
        if cfg.pos == "sinusoidal":
            self.pos_table = be.to_device(positions.sinusoidal_table(cfg.seq_len, cfg.d_model, dtype=self.dtype))
        self.h = [nn.Block(be, cfg, rng=rng, dtype=self.dtype) for _ in range(cfg.n_layer)]
        self.ln_f = nn.make_norm(cfg.norm, be, cfg.d_model, dtype=self.dtype)
        tied = self.wte.weight if cfg.tie_embeddings else None  # (V, C) is already (out, in)
        self.lm_head = nn.Linear(be, cfg.d_model, cfg.vocab_size, rng=rng, dtype=self.dtype, weight=tied)
        self.loss_scale = None

    @property
    def backend(self) -> str:
        return self.be.name

    def parameters(self) -> dict:
        """GPT-2-style names -> Parameter. A tied lm_head shares wte.weight and is not listed twice."""
        return dict(self.named_parameters())

    def num_params(self) -> int:
        return sum(p.data.size for p in self.parameters().values())

    # ------------------------------------------------------------------------------------------

    def _check_idx(self, idx, start=0):
        """Token ids (NumPy, as data.py makes them, a list, or already on the device) -> int64 on the
        backend's device. Checked on the host: ids are small next to the activations."""
        idx = np.asarray(self.be.to_host(idx))
        if idx.ndim != 2 or idx.dtype.kind not in "iu":
            raise ValueError(f"idx: expected a (B, T) integer array, got {idx.dtype} of shape {idx.shape}")
        if start + idx.shape[1] > self.config.seq_len:
            raise ValueError(f"idx: positions up to {start + idx.shape[1]} exceed the model's "
                             f"seq_len {self.config.seq_len}")
        return self.be.to_device(idx.astype(np.int64, copy=False))

    def _trunk(self, idx, caches=None, start=0):
        """Token ids (B, T) at positions start.. -> final normalised hidden states (B, T, C)."""
        T = idx.shape[1]
        x = self.wte.forward(idx)  # (B, T, C)
        if self.wpe is not None:
            pos = self.be.xp.arange(start, start + T, dtype=np.int64)[None, :]  # (1, T)
            x = x + self.wpe.forward(pos)  # (B, T, C) + (1, T, C)
        elif self.pos_table is not None:
            x = x + self.pos_table[start:start + T]
        for i, block in enumerate(self.h):
            x = block.forward(x, None if caches is None else caches[i], start)
        return self.ln_f.forward(x)

    def forward(self, idx, targets=None):
        """(logits (B, T, V), mean cross-entropy over targets != -100, or None without targets).

        idx and targets may be NumPy arrays on any backend; logits live on the backend's device
        (CuPy on "cuda"); the loss is a Python float."""
        idx = self._check_idx(idx)
        B, T = idx.shape
        x = self._trunk(idx)
        logits = self.lm_head.forward(x)  # (B, T, V)
        self.targets = None
        if targets is None:
            return logits, None
        targets = np.asarray(self.be.to_host(targets))
        if targets.shape != (B, T) or targets.dtype.kind not in "iu":
            raise ValueError(f"targets: expected integers of idx's shape {(B, T)}, got {targets.dtype} "
                             f"of shape {targets.shape}")
        targets = targets.astype(np.int64, copy=False).reshape(B * T)  # (N,)
        n_valid = int((targets != -100).sum())  # counted on the host, before the copy
        targets = self.be.to_device(targets)
        logits2 = logits.reshape(B * T, -1)  # (N, V), a view
        losses, self.lse = self.be.ops.cross_entropy(logits2, targets)  # (N,), (N,)
        self.targets, self.logits2 = targets, logits2
        self.loss_scale = 1.0 / max(n_valid, 1)  # d(mean)/d(loss_i)
        # The sum is accumulated in float64 on the backend's device; float() is the one wait for the
        # GPU in a training step's forward pass.
        return logits, float(losses.sum(dtype=np.float64)) * self.loss_scale

    def backward(self):
        """Backpropagates the loss of the last forward(idx, targets): accumulates every p.grad."""
        if self.targets is None:
            raise RuntimeError("backward() needs a preceding forward(idx, targets) with targets")
        N = self.targets.shape[0]
        dloss = self.be.xp.full(N, self.loss_scale, dtype=self.dtype)
        dlogits = self.be.ops.cross_entropy_backward(dloss, self.logits2, self.targets, self.lse)  # (N, V)
        B, T = self.wte.ids.shape
        dx = self.lm_head.backward(dlogits.reshape(B, T, -1))  # (B, T, C)
        dx = self.ln_f.backward(dx)
        for block in reversed(self.h):
            dx = block.backward(dx)
        if self.wpe is not None:
            self.wpe.backward(dx.sum(axis=0, keepdims=True))  # positions are shared across the batch
        self.wte.backward(dx)

    # ------------------------------------------------------------------------------------------

    def new_kv_caches(self, batch_size: int):
        """One empty KVCache per layer, seq_len long."""
        cfg = self.config
        return [nn.KVCache(batch_size, cfg.seq_len, cfg.n_kv_head, cfg.d_model // cfg.n_head, self.dtype,
                           self.be.xp) for _ in range(cfg.n_layer)]

    def forward_last(self, idx, caches=None, start=0):
        """Logits (B, V) of the last position only, for sampling. With caches, idx (B, T) holds the
        tokens at positions start..start+T-1 and the caches hold every token before them."""
        idx = self._check_idx(idx, start)
        x = self._trunk(idx, caches, start)
        return self.lm_head.forward(x[:, -1])  # (B, V): the other positions need no logits

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, seed=None,
                 use_cache=True):
        """idx (B, T) or (T,) token ids -> the same with max_new_tokens sampled tokens appended."""
        from .generate import generate

        return generate(self, idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        seed=seed, use_cache=use_cache)
