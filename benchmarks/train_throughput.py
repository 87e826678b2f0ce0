"""Training throughput of one GPT on each backend: llmcore (cpu or cuda), the NumPy reference,
and the same model in PyTorch eager (benchmarks/torch_gpt.py) on the same device.

One step = forward + cross-entropy, backward, global-norm clipping at 1.0, AdamW: what
`llmcore train` does. Reports the median step time, tokens/s and model FLOP utilisation
(6N + 12·L·C·T FLOPs per token over a peak: --peak-tflops, else on cuda the cuBLAS TF32 rate
measured here, on cpu the best float32 2048^3 matmul of llmcore, NumPy and torch measured here).
Both models start from the same weights; their first losses are printed side by side as a check
that they compute the same thing. --rounds alternates llmcore and torch, for ratios that machine
speed drifting over minutes does not decide.

    python benchmarks/train_throughput.py --device cpu --numpy --rounds 5  # issue 5's model
    python benchmarks/train_throughput.py --device cuda --model gpt2-124m --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from llmcore import data, ops  # noqa: E402
from llmcore.model import GPT, GPTConfig  # noqa: E402
from llmcore.optim import AdamW  # noqa: E402
from llmcore.train import flops_per_token, train_step  # noqa: E402

MODELS = {
    # DESIGN.md / issue 5: the CPU comparison model (character vocabulary)
    "cpu-small": dict(config=dict(vocab_size=65, seq_len=128, n_layer=4, n_head=4, n_kv_head=4, d_model=256), batch=16),
    # the GPT-2 124M shape (vocabulary 50257, context 1024)
    "gpt2-124m": dict(config=dict(vocab_size=50257, seq_len=1024, n_layer=12, n_head=12, n_kv_head=12, d_model=768),
                      batch=8),
}


def _sync(device):
    if device == "cuda":
        import cupy

        cupy.cuda.get_current_stream().synchronize()


def time_llmcore(cfg, backend, batch, steps, warmup, tokens, seed=0):
    model = GPT(cfg, backend=backend, seed=seed)
    params = model.parameters()
    opt = AdamW(params, lr=3e-4, weight_decay=0.1, backend=backend)
    rng = np.random.default_rng(seed)
    times, losses = [], []
    for i in range(warmup + steps):
        x, y = data.get_batch(tokens, batch, cfg.seq_len, rng)
        t0 = time.perf_counter()
        loss, _ = train_step(model, opt, x, y, lr=opt.lr, grad_clip=1.0)
        _sync("cuda" if backend == "cuda" else "cpu")
        losses.append(loss)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times, losses, model


def time_torch(model, device, batch, steps, warmup, tokens, precision, seed=0):
    import torch

    from torch_gpt import from_llmcore

    torch.backends.cuda.matmul.allow_tf32 = precision == "high"
    torch.backends.cudnn.allow_tf32 = precision == "high"
    tm = from_llmcore(model, device)
    decay = [p for n, p in tm.named_parameters() if p.ndim >= 2]
    other = [p for n, p in tm.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=3e-4, betas=(0.9, 0.95), eps=1e-8, fused=device == "cuda")
    rng = np.random.default_rng(seed)
    times, losses = [], []
    for i in range(warmup + steps):
        x, y = data.get_batch(tokens, batch, model.config.seq_len, rng)
        t0 = time.perf_counter()
        xt = torch.from_numpy(np.asarray(x, np.int64)).to(device)
        yt = torch.from_numpy(np.asarray(y, np.int64)).to(device)
        loss = tm(xt, yt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tm.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())  # synchronises, as llmcore's float(loss) does
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times, losses


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--model", choices=list(MODELS), default=None, help="default: cpu-small on cpu, gpt2-124m on cuda")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--steps", type=int, default=10, help="timed steps per round (the median over all rounds is kept)")
    p.add_argument("--rounds", type=int, default=1,
                   help="alternate llmcore and torch this many times (machine speed drifts over minutes; "
                        "each round's ratio is printed, and the median step times are over every round)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--precision", choices=["highest", "high", "medium"], default="high",
                   help="matmul precision on cuda, for both llmcore and torch (default high = TF32)")
    p.add_argument("--numpy", action="store_true", help="also time the NumPy reference backend (slow)")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak for MFU (default: measured cuBLAS TF32 on cuda)")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)

    name = args.model or ("gpt2-124m" if args.device == "cuda" else "cpu-small")
    spec = MODELS[name]
    cfg = GPTConfig(**spec["config"])
    batch = args.batch or spec["batch"]
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, 2_000_000).astype(np.int32)  # random tokens: speed only
    if args.device == "cuda":
        ops.set_matmul_precision(args.precision)
    backend = "cuda" if args.device == "cuda" else "cpu"
    torch_name = "torch-eager-" + args.device
    use_torch = not args.no_torch
    if use_torch:
        try:
            import torch  # noqa: F401
        except ImportError:
            print("torch is not installed: no PyTorch column", file=sys.stderr)
            use_torch = False
    times = {"llmcore-" + backend: [], **({torch_name: []} if use_torch else {})}
    first_losses, ratios = {}, []
    for _ in range(max(1, args.rounds)):
        t, losses, model = time_llmcore(cfg, backend, batch, args.steps, args.warmup, tokens)
        times["llmcore-" + backend] += t
        first_losses["llmcore-" + backend] = losses[:3]
        if use_torch:
            tt, t_losses = time_torch(GPT(cfg, backend=backend, seed=0), args.device, batch,
                                      args.steps, args.warmup, tokens, args.precision)
            times[torch_name] += tt
            first_losses[torch_name] = t_losses[:3]
            ratios.append(statistics.median(tt) / statistics.median(t))
    if args.numpy:
        t, np_losses, _ = time_llmcore(cfg, "numpy", batch, max(2, args.steps // 5), 1, tokens)
        times["llmcore-numpy"], first_losses["llmcore-numpy"] = t, np_losses[:3]
    n_params = model.num_params()
    fpt = flops_per_token(cfg, n_params)
    tok = batch * cfg.seq_len
    rows = {}
    for key, t in times.items():
        step_s = statistics.median(t)
        rows[key] = {"step_ms": 1e3 * step_s, "tokens_per_s": tok / step_s, "first_losses": first_losses[key],
                     "steps_timed": len(t)}
    peak = args.peak_tflops
    if peak is None and args.device == "cuda" and not args.no_torch:
        import torch

        torch.backends.cuda.matmul.allow_tf32 = True
        a = torch.randn(8192, 8192, device="cuda")
        for _ in range(3):
            a @ a
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(10):
            a @ a
        torch.cuda.synchronize()
        peak = 2 * 8192**3 * 10 / (time.perf_counter() - t0) / 1e12
    if peak is None and args.device == "cpu":  # the best 2048^3 matmul of llmcore, NumPy and torch here
        from llmcore.bench import measure_ceilings

        peak = measure_ceilings(quick=True, torch=torch if use_torch else None)["matmul_gflops"] / 1e3
    for r in rows.values():
        r["mfu"] = None if peak is None else r["tokens_per_s"] * fpt / (peak * 1e12)
    ours = rows["llmcore-" + backend]["tokens_per_s"]
    print(f"model {name}: {n_params / 1e6:.1f}M parameters, batch {batch} x {cfg.seq_len}, "
          f"{fpt / 1e9:.2f} GFLOP/token; device {args.device}, matmul precision {args.precision}"
          + (f"; MFU against {peak:.3g} TFLOP/s" if peak else ""))
    for key, r in rows.items():
        mfu = "" if r["mfu"] is None else f"  MFU {100 * r['mfu']:.1f}%"
        print(f"  {key:<18} {r['step_ms']:9.1f} ms/step  {r['tokens_per_s']:10.0f} tok/s  "
              f"x{ours / r['tokens_per_s']:.2f} (llmcore / this){mfu}  first losses "
              + ", ".join(f"{x:.4f}" for x in r["first_losses"]))
    if ratios:
        print(f"  llmcore / torch per round: {', '.join(f'{r:.2f}' for r in ratios)}"
              f" (median {statistics.median(ratios):.2f})")
    if args.json:
        import llmcore
        from llmcore.bench import machine_info

        with open(args.json, "w") as f:
            json.dump({"argv": sys.argv, "model": name, "config": cfg.to_dict(), "batch": batch,
                       "n_params": n_params, "flops_per_token": fpt, "peak_tflops": peak,
                       "precision": args.precision, "rounds": args.rounds, "ratio_per_round": ratios,
                       "threads": llmcore.get_num_threads(), "machine": machine_info(), "rows": rows},
                      f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
