"""The `llmcore` command."""
from __future__ import annotations

import argparse
import json
import sys
import time

from . import attention_map, bench, calc, experiments


def _cmd_info(args) -> int:
    import llmcore

    info = llmcore.info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(len(k) for k in info)
    for key, value in info.items():
        if isinstance(value, list):
            value = ", ".join(value) or "none"
        print(f"{key:<{width}}  {value}")
    return 0


def _cmd_train(args) -> int:
    from .checkpoint import CheckpointError
    from .train import train

    overrides = {k: getattr(args, k) for k in (
        "data", "tokenizer", "bpe_vocab_size", "steps", "batch_size", "lr", "seq_len", "device", "seed",
        "eval_interval", "eval_batches", "ckpt_interval", "sample_tokens", "pos", "norm", "act",
        "n_layer", "n_head", "n_kv_head", "d_model", "matmul_precision")}
    try:
        return train(preset=args.preset, out=args.out, resume=args.resume, **overrides)
    except (CheckpointError, FileExistsError, FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"llmcore train: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        from .checkpoint import find

        try:
            where = find(args.out)
            print(f"\ninterrupted: the last checkpoint ({where}) is kept; continue with "
                  f"`llmcore train --out {args.out} --resume`", file=sys.stderr)
        except CheckpointError:
            print("\ninterrupted before the first checkpoint", file=sys.stderr)
        return 130


def _cmd_generate(args) -> int:
    import numpy as np

    from .checkpoint import CheckpointError, load_for_inference

    try:
        model, tok, meta = load_for_inference(args.ckpt, backend=args.device)
        if args.prompt:
            prompt = tok.encode(args.prompt)
        else:  # no prompt: start from a line break (token 0 if the vocabulary has none)
            try:
                prompt = tok.encode("\n")
            except ValueError:
                prompt = np.zeros(1, dtype=np.int64)
        if len(prompt) == 0:
            raise ValueError("--prompt encodes to no tokens")
        t0 = time.perf_counter()
        ids = model.generate(prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                             top_p=args.top_p, seed=args.seed, use_cache=not args.no_cache)
        seconds = time.perf_counter() - t0
    except (CheckpointError, ValueError, RuntimeError) as exc:
        print(f"llmcore generate: error: {exc}", file=sys.stderr)
        return 2
    print(tok.decode(ids if args.prompt else ids[len(prompt):]), flush=True)
    if args.max_new_tokens:
        print(f"[{args.max_new_tokens} tokens in {seconds:.2f}s, {1000 * seconds / args.max_new_tokens:.1f} ms/token, "
              f"{'no ' if args.no_cache else ''}KV cache, step {meta['step']}]", file=sys.stderr)
    return 0


def _add_train_parsers(sub) -> None:
    from .train import PRESETS

    p = sub.add_parser("train", help="train a GPT (default: the 'cpu' preset on the bundled Shakespeare)")
    p.add_argument("--preset", default="cpu", choices=list(PRESETS),
                   help="model size and schedule (default: cpu, a few minutes on 2 cores)")
    p.add_argument("--data", help="a UTF-8 text file or a folder of them (default: bundled Shakespeare)")
    p.add_argument("--tokenizer", choices=["char", "bpe"], help="default: the preset's (char)")
    p.add_argument("--bpe-vocab-size", type=int, help="vocabulary size of --tokenizer bpe (default 1024)")
    p.add_argument("--steps", type=int, help="optimizer steps in all (with --resume: the new total)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, help="peak learning rate (warmup, then cosine to lr/10)")
    p.add_argument("--seq-len", type=int, help="context length")
    p.add_argument("--n-layer", type=int)
    p.add_argument("--d-model", type=int)
    p.add_argument("--n-head", type=int)
    p.add_argument("--n-kv-head", type=int, help="K/V heads: = n_head is MHA, 1 is MQA, a divisor between is GQA")
    p.add_argument("--pos", choices=["rope", "learned", "sinusoidal", "alibi"])
    p.add_argument("--norm", choices=["rmsnorm", "layernorm"])
    p.add_argument("--act", choices=["gelu", "relu"])
    p.add_argument("--device", choices=["cpu", "numpy", "cuda"],
                   help="cpu: the compiled core (default); numpy: the NumPy reference; cuda: the CUDA core "
                        "on one GPU (needs a CUDA build of llmcore and CuPy: pip install 'llmcore[cuda]')")
    p.add_argument("--matmul-precision", choices=["highest", "high", "medium"],
                   help="GPU matmuls with --device cuda: highest = fp32, high = TF32 tensor cores (default), "
                        "medium = bf16 tensor cores (fp32 accumulation, as torch.set_float32_matmul_precision); "
                        "ignored on cpu/numpy, whose matmuls are always fp32")
    p.add_argument("--seed", type=int)
    p.add_argument("--eval-interval", type=int, help="steps between validation losses")
    p.add_argument("--eval-batches", type=int, help="validation batches per evaluation")
    p.add_argument("--ckpt-interval", type=int, help="steps between checkpoints")
    p.add_argument("--sample-tokens", type=int, help="tokens sampled at the end (0: none)")
    p.add_argument("--out", default="out", help="folder for checkpoint/, metrics.jsonl, loss.png (default: out)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("generate", help="sample text from a checkpoint")
    p.add_argument("--ckpt", required=True, help="a training --out folder or a checkpoint folder")
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", choices=["cpu", "numpy", "cuda"], default="cpu",
                   help="cpu: the compiled core (default); numpy: the NumPy reference; cuda: the CUDA core "
                        "(needs CuPy: pip install 'llmcore[cuda]')")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole context for every token")
    p.set_defaults(func=_cmd_generate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmcore", description="Train, sample and benchmark a GPT on llmcore's compiled kernels.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("info", help="version, SIMD level, threads and CUDA state of this build")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p.set_defaults(func=_cmd_info)
    _add_train_parsers(sub)
    bench.add_parser(sub)
    calc.add_parser(sub)
    experiments.add_parser(sub)
    attention_map.add_parser(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
