"""llmcore's GPT (python/llmcore/model.py) written in PyTorch eager, for throughput comparisons.

Same architecture and parameter names (wte, h.N.ln_1, h.N.attn.c_attn, h.N.attn.c_proj, h.N.ln_2,
h.N.mlp.c_fc, h.N.mlp.c_proj, ln_f; lm_head tied to wte): pre-norm blocks with RMSNorm or
LayerNorm, RoPE on interleaved pairs (base 10000) or learned positions, fused QKV with n_kv_head
key/value heads, tanh GELU, scaled_dot_product_attention. `from_llmcore` copies the weights of an
llmcore GPT, so both start from the same point and their first losses agree.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


class Norm(torch.nn.Module):
    def __init__(self, kind, dim):
        super().__init__()
        self.kind = kind
        self.weight = torch.nn.Parameter(torch.ones(dim))
        self.bias = torch.nn.Parameter(torch.zeros(dim)) if kind == "layernorm" else None

    def forward(self, x):
        if self.kind == "rmsnorm":
            return F.rms_norm(x, x.shape[-1:], self.weight, 1e-5)
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, 1e-5)


def rope(x, rot):
    """x (B, T, heads, D): pairs (x[2i], x[2i+1]) rotated by rot (T, D/2) complex."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * rot[None, :, None, :]).flatten(-2).type_as(x)


class Block(torch.nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.H, self.Hkv, self.D = cfg.n_head, cfg.n_kv_head, cfg.d_model // cfg.n_head
        self.ln_1 = Norm(cfg.norm, cfg.d_model)
        self.ln_2 = Norm(cfg.norm, cfg.d_model)
        self.attn = torch.nn.Module()
        self.attn.c_attn = torch.nn.Linear(cfg.d_model, (self.H + 2 * self.Hkv) * self.D, bias=cfg.bias)
        self.attn.c_proj = torch.nn.Linear(self.H * self.D, cfg.d_model, bias=cfg.bias)
        self.mlp = torch.nn.Module()
        self.mlp.c_fc = torch.nn.Linear(cfg.d_model, cfg.ffn_mult * cfg.d_model, bias=cfg.bias)
        self.mlp.c_proj = torch.nn.Linear(cfg.ffn_mult * cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.act = cfg.act

    def forward(self, x, rot):
        B, T, _ = x.shape
        H, Hkv, D = self.H, self.Hkv, self.D
        qkv = self.attn.c_attn(self.ln_1(x)).view(B, T, H + 2 * Hkv, D)
        q, k, v = qkv[:, :, :H], qkv[:, :, H:H + Hkv], qkv[:, :, H + Hkv:]
        if rot is not None:
            q, k = rope(q, rot), rope(k, rot)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True, enable_gqa=Hkv != H)  # (B, H, T, D)
        x = x + self.attn.c_proj(y.transpose(1, 2).reshape(B, T, H * D))
        h = self.mlp.c_fc(self.ln_2(x))
        h = F.gelu(h, approximate="tanh") if self.act == "gelu" else F.relu(h)
        return x + self.mlp.c_proj(h)


class TorchGPT(torch.nn.Module):
    def __init__(self, cfg):
        super().__init__()
        if cfg.pos not in ("rope", "learned") or not cfg.tie_embeddings:
            raise ValueError("torch_gpt mirrors pos='rope' or 'learned' with tied embeddings only")
        self.cfg = cfg
        self.wte = torch.nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = torch.nn.Embedding(cfg.seq_len, cfg.d_model) if cfg.pos == "learned" else None
        self.h = torch.nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = Norm(cfg.norm, cfg.d_model)
        D = cfg.d_model // cfg.n_head
        inv = 10000.0 ** (-np.arange(0, D, 2) / D)
        ang = np.arange(cfg.seq_len)[:, None] * inv[None, :]
        self.register_buffer("rot", torch.from_numpy(np.exp(1j * ang).astype(np.complex64)), persistent=False)

    def forward(self, idx, targets):
        T = idx.shape[1]
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(T, device=idx.device))
        rot = self.rot[:T] if self.wpe is None else None
        for block in self.h:
            x = block(x, rot)
        logits = F.linear(self.ln_f(x), self.wte.weight)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def from_llmcore(model, device) -> TorchGPT:
    """A TorchGPT on `device` holding copies of an llmcore GPT's weights."""
    t = TorchGPT(model.config).to(device)
    state = {}
    for name, p in model.parameters().items():
        state[name] = torch.from_numpy(np.ascontiguousarray(model.be.to_host(p.data)))
    missing, unexpected = t.load_state_dict(state, strict=False)
    unexpected = [u for u in unexpected if u]
    if unexpected or [m for m in missing if not m.endswith(".bias")]:
        raise RuntimeError(f"parameter names differ: missing {missing}, unexpected {unexpected}")
    return t
