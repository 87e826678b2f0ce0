"""Where a GPT-2 124M training step on llmcore's CUDA backend spends its time: every kernel of a
few steps captured with torch.profiler (CUPTI sees all kernels in the process, CuPy's and
llmcore's too), summed by name, next to the step's wall time (the gap is host-side overhead).

    python benchmarks/gpu/profile_step.py [--steps 3] [--precision high]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main() -> int:
    import cupy
    import torch
    from torch.profiler import ProfilerActivity, profile

    from llmcore import data, ops
    from llmcore.model import GPT, GPTConfig
    from llmcore.optim import AdamW, clip_grad_norm
    from train_throughput import MODELS

    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--precision", default="high")
    args = p.parse_args()
    ops.set_matmul_precision(args.precision)
    cfg = GPTConfig(**MODELS["gpt2-124m"]["config"])
    model = GPT(cfg, backend="cuda", seed=0)
    params = model.parameters()
    opt = AdamW(params, lr=3e-4, backend="cuda")
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, 1_000_000).astype(np.int32)

    def step():
        x, y = data.get_batch(tokens, 8, cfg.seq_len, rng)
        model.forward(x, y)
        model.zero_grad()
        model.backward()
        clip_grad_norm(params, 1.0)
        opt.step()

    for _ in range(3):
        step()
    cupy.cuda.runtime.deviceSynchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        cupy.cuda.runtime.deviceSynchronize()
        wall = (time.perf_counter() - t0) / args.steps
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    gpu_total = sum(e.device_time_total for e in events) / args.steps / 1e3
    print(f"wall {wall * 1e3:.1f} ms/step, GPU kernels {gpu_total:.1f} ms/step "
          f"({100 * gpu_total / (wall * 1e3):.0f}% busy)")
    for e in sorted(events, key=lambda e: -e.device_time_total)[:40]:
        ms = e.device_time_total / args.steps / 1e3
        print(f"{ms:8.2f} ms {100 * ms / gpu_total:5.1f}%  x{e.count // args.steps:<4d} {e.key[:110]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
