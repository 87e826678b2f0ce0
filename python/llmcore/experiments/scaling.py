"""`llmcore experiment scaling`: validation loss against training compute, and the power law it follows.

IsoFLOP sweep (Hoffmann et al. 2022, "Chinchilla", approach 2): for each compute budget C, every
model size N is trained on D = C / (6N) tokens, its own warmup + cosine schedule ending exactly at
the budget, and its final validation loss is recorded. Per budget the lowest loss is the
compute-efficient frontier; across budgets it is fitted with

    L(C) = a · C^-α + L∞

(L∞: the loss no amount of compute removes, the entropy of the text as far as such models can tell),
and the compute-optimal size with N_opt ∝ C^aN, D_opt = C / (6 N_opt) ∝ C^(1 - aN).

Compute per run is C = 6·N·D with N the non-embedding parameters (Kaplan et al. 2020), D the
training tokens; the attention-score FLOPs (12·L·d·T per token) are left out, as Kaplan does.

    llmcore experiment scaling --quick                 # about 10 minutes on 2 CPU cores
    llmcore experiment scaling --device cuda           # the full sweep, meant for a GPU
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from .. import data
from ..model import GPT, GPTConfig
from ..optim import lr_schedule
from ..train import evaluate
from . import _common


@dataclass(frozen=True)
class Sweep:
    sizes: tuple  # (n_layer, d_model, n_head) per model
    budgets: tuple  # training FLOPs C = 6·N·D per run
    seq_len: int
    batch_size: int
    lr: float
    min_steps: int  # a shorter run is mostly warmup, not a trained model: skipped
    max_steps: int  # a longer one is a tiny model drowned in data, far off the frontier: skipped
    eval_batches: int


# 3k to 99k non-embedding parameters (32x); budgets a factor 2 apart over 32x. Chosen from two
# trial sweeps on the 2-core machine: with 12k-790k models the smallest was best at every budget
# under 1e12 (N_opt at the sweep's edge); with 3k-330k the optimum moved from 3k at 6e10 FLOPs to
# 25k-55k at 1e12, and 330k never came close. Time goes mostly to the small models' many short
# steps (~2.5 ms each for the smallest, ~13 ms for the largest, 1 thread): ~8 minutes in all.
QUICK = Sweep(sizes=((1, 16, 2), (1, 24, 2), (1, 32, 2), (2, 32, 2), (2, 48, 4), (2, 64, 4)),
              budgets=(6.25e10, 1.25e11, 2.5e11, 5e11, 1e12, 2e12), seq_len=64, batch_size=16, lr=3e-3,
              min_steps=50, max_steps=15000, eval_batches=32)
# 0.1M to 25M non-embedding parameters (255x), budgets over 100x: ~1e16 FLOPs in all, a day or more
# on 2 CPU cores, well under an hour on one H100 (estimated, not measured). The bundled corpus has
# 4.6M training characters, so the longest runs see it several times (the table's "epochs");
# --data takes a bigger corpus.
FULL = Sweep(sizes=((2, 64, 4), (3, 128, 4), (4, 192, 6), (4, 256, 8), (6, 320, 8), (6, 448, 8), (8, 512, 8)),
             budgets=(1e13, 2.5e13, 6.3e13, 1.6e14, 4e14, 1e15), seq_len=256, batch_size=32, lr=2e-3,
             min_steps=100, max_steps=50000, eval_batches=64)

# Published fits, for the comparison the report prints (all on web text, BPE tokens).
PUBLISHED = {
    "seed document": "L ∝ C^-α with α 0.05-0.1 (no floor)",
    "Kaplan et al. 2020": "L(C_min) ∝ C^-0.050 (no floor); N_opt ∝ C^0.73",
    "Hoffmann et al. 2022 (Chinchilla)": "L = E + A/N^0.34 + B/D^0.28, so L(C) - E ∝ C^-0.154 on the "
                                         "frontier; N_opt ∝ C^0.50, D_opt ∝ C^0.50, ~20 tokens per parameter",
}


def size_name(size) -> str:
    n_layer, d_model, n_head = size
    return f"L{n_layer}-d{d_model}"


def train_one(size, budget, sweep: Sweep, tokens, be, seed=0) -> dict:
    """Trains one model to one budget; returns its row (skipped runs say why instead of a loss)."""
    tok, train_tokens, val_tokens = tokens
    n_layer, d_model, n_head = size
    cfg = GPTConfig(vocab_size=tok.vocab_size, seq_len=sweep.seq_len, n_layer=n_layer, n_head=n_head,
                    n_kv_head=n_head, d_model=d_model)
    model = GPT(cfg, backend=be, seed=seed)
    n = _common.non_embedding_params(model)
    B, T = sweep.batch_size, sweep.seq_len
    steps = round(budget / (6 * n * B * T))
    row = {"model": size_name(size), "n_layer": n_layer, "d_model": d_model, "n_head": n_head, "params": n,
           "params_total": model.num_params(), "budget": budget, "steps": steps, "tokens": steps * B * T,
           "compute": 6.0 * n * steps * B * T, "epochs": steps * B * T / len(train_tokens)}
    if not sweep.min_steps <= steps <= sweep.max_steps:
        row["skipped"] = f"{steps} steps is outside [{sweep.min_steps}, {sweep.max_steps}]"
        return row
    rng = np.random.default_rng(seed)
    warmup = max(1, min(100, steps // 10))

    def lr_at(step):
        return lr_schedule(step, max_lr=sweep.lr, min_lr=sweep.lr / 10, warmup=warmup, total=steps)

    t0 = time.time()
    row["train_loss"] = _common.train_model(model, lambda step: data.get_batch(train_tokens, B, T, rng),
                                            steps, lr_at)
    row["val_loss"] = evaluate(model, val_tokens, B, T, sweep.eval_batches)
    row["seconds"] = time.time() - t0
    return row


# ----------------------------------------------------------------------------------------------
# Fitting. scipy is not a dependency, so the fits are NumPy: for a fixed α, L = a·x^-α + L∞ is
# linear in (a, L∞) and solved exactly, which leaves a one-dimensional search over α on a grid
# (variable projection). Every grid point and every bootstrap sample is one vectorised pass.

ALPHA_GRID = np.geomspace(1e-3, 3.0, 1500)  # neighbouring values 0.5% apart


def _best_on_grid(logx, ys, alphas):
    """Least squares of ys ≈ a·exp(-α·logx) + c with a > 0, c >= 0, per row of ys (R, n), over the
    grid alphas (G,): (a, α, c), each (R,)."""
    n = logx.shape[0]
    u = np.exp(-alphas[:, None] * logx[None, :])  # (G, n)
    su, suu = u.sum(1), (u * u).sum(1)  # (G,)
    sy, syy = ys.sum(1, keepdims=True), (ys * ys).sum(1, keepdims=True)  # (R, 1)
    suy = ys @ u.T  # (R, G)
    with np.errstate(divide="ignore", invalid="ignore"):
        a = (n * suy - su * sy) / (n * suu - su * su)  # (R, G): the 2x2 normal equations
        c = (sy - a * su) / n
        # A negative floor is not a loss: those fits fall back to a pure power law (c = 0).
        a = np.where(c < 0, suy / suu, a)
    c = np.maximum(c, 0.0)
    sse = syy - 2 * a * suy - 2 * c * sy + a * a * suu + 2 * a * c * su + n * c * c  # (R, G)
    sse = np.where((a > 0) & np.isfinite(sse), sse, np.inf)
    g = np.argmin(sse, axis=1)  # (R,)
    rows = np.arange(len(ys))
    return a[rows, g], alphas[g], c[rows, g]


def fit_power_law(x, y, n_boot: int = 1000, seed: int = 0) -> dict:
    """Fits y = a·x^-α + L∞ (a > 0, L∞ >= 0) by least squares; the 95% interval of α comes from a
    residual bootstrap (refits on fitted values plus resampled, dof-corrected residuals), given
    at least 4 points. x is scaled by its geometric mean inside, so C ~ 1e12 stays well conditioned."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 3 or (x <= 0).any():
        raise ValueError(f"fit_power_law: expected >= 3 positive x with matching y, got shapes {x.shape}, {y.shape}")
    x0 = math.exp(np.log(x).mean())
    logx = np.log(x / x0)
    a, alpha, c = (v[0] for v in _best_on_grid(logx, y[None, :], ALPHA_GRID))
    i = np.searchsorted(ALPHA_GRID, alpha)  # refine between the grid neighbours
    fine = np.linspace(ALPHA_GRID[max(i - 1, 0)], ALPHA_GRID[min(i + 1, len(ALPHA_GRID) - 1)], 201)
    a, alpha, c = (v[0] for v in _best_on_grid(logx, y[None, :], fine))
    fitted = a * np.exp(-alpha * logx) + c
    resid = y - fitted
    n = len(x)
    out = {"a": a * x0 ** alpha, "alpha": alpha, "L_inf": c, "rmse": float(np.sqrt((resid ** 2).mean())),
           "points": n, "alpha_ci95": None, "alpha_at_grid_edge": bool(alpha in (ALPHA_GRID[0], ALPHA_GRID[-1]))}
    if n >= 4:
        rng = np.random.default_rng(seed)
        scaled = resid * math.sqrt(n / (n - 3))  # residuals of a 3-parameter fit are too small by this
        ys = fitted[None, :] + scaled[rng.integers(0, n, size=(n_boot, n))]  # (n_boot, n)
        boot_alpha = _best_on_grid(logx, ys, ALPHA_GRID)[1]
        out["alpha_ci95"] = [float(np.percentile(boot_alpha, 2.5)), float(np.percentile(boot_alpha, 97.5))]
    return out


def fit_line(logx, logy) -> tuple[float, float]:
    """(slope, intercept) of the least-squares line."""
    slope, intercept = np.polyfit(np.asarray(logx, dtype=np.float64), np.asarray(logy, dtype=np.float64), 1)
    return float(slope), float(intercept)


def frontier(runs) -> list[dict]:
    """Per budget: the lowest final loss, and N_opt from a parabola in log N through the best run and
    its two neighbours (Chinchilla's IsoFLOP profiles); where the best run is the sweep's smallest
    or largest model, N_opt is that model's N and "at_edge" says the sweep should be widened."""
    rows = []
    for budget in sorted({r["budget"] for r in runs}):
        pts = sorted((r for r in runs if r["budget"] == budget), key=lambda r: r["params"])
        i = min(range(len(pts)), key=lambda j: pts[j]["val_loss"])
        best = pts[i]
        n_opt, at_edge = best["params"], i in (0, len(pts) - 1)
        if not at_edge:
            logn = np.log([p["params"] for p in pts[i - 1:i + 2]])
            curve = np.polyfit(logn, [p["val_loss"] for p in pts[i - 1:i + 2]], 2)
            if curve[0] > 0:  # a true minimum (a tie between neighbours flattens it: keep the best run)
                n_opt = float(np.exp(-curve[1] / (2 * curve[0])))  # the vertex
        d_opt = best["compute"] / (6 * n_opt)
        rows.append({"budget": budget, "compute": best["compute"], "loss": best["val_loss"],
                     "best_model": best["model"], "N_opt": n_opt, "D_opt": d_opt, "tokens_per_param": d_opt / n_opt,
                     "at_edge": at_edge, "runs": len(pts)})
    return rows


def analyse(runs) -> dict:
    """The frontier, the L(C) fit and the compute-optimal exponents of a finished sweep."""
    done = [r for r in runs if "val_loss" in r]
    front = frontier(done)
    result = {"frontier": front, "fit": None, "optimal": None}
    if len(front) >= 3:
        c = [f["compute"] for f in front]
        result["fit"] = fit_power_law(c, [f["loss"] for f in front])
        # Without a floor (the seed's and Kaplan's form): the slope of log L against log C.
        result["fit"]["alpha_no_floor"] = -fit_line(np.log(c), np.log([f["loss"] for f in front]))[0]
    # An N_opt at the sweep's edge is only a bound: the exponent comes from the others where it can.
    interior = [f for f in front if not f["at_edge"]]
    used = interior if len(interior) >= 2 else front
    if len(used) >= 2:
        slope_n, _ = fit_line(np.log([f["compute"] for f in used]), np.log([f["N_opt"] for f in used]))
        result["optimal"] = {"N_exponent": slope_n, "D_exponent": 1.0 - slope_n,  # D = C / 6N
                             "tokens_per_param": [f["tokens_per_param"] for f in used],
                             "budgets_fitted": len(used), "budgets_at_edge": len(front) - len(interior)}
    return result


def summary_lines(result) -> list[str]:
    fit, opt = result["fit"], result["optimal"]
    lines = []
    if fit is not None:
        ci = fit["alpha_ci95"]
        ci_text = f" (95% CI {ci[0]:.3f}-{ci[1]:.3f}, bootstrap)" if ci else " (too few budgets for an interval)"
        floor = " (at its bound: the points show no floor over this range)" if fit["L_inf"] == 0 else ""
        lines.append(f"L(C) = {fit['a']:.3g}·C^-{fit['alpha']:.3f} + {fit['L_inf']:.3f}: α = {fit['alpha']:.3f}"
                     f"{ci_text}, L∞ = {fit['L_inf']:.3f} nats/char{floor}, rms residual {fit['rmse']:.4f}; "
                     f"without a floor α = {fit['alpha_no_floor']:.3f}")
    if opt is not None:
        k = opt["budgets_at_edge"]
        edge = "" if not k else (f"; {k} budget(s) whose best model was the sweep's smallest or largest "
                                 + ("left out" if opt["budgets_fitted"] < len(result["frontier"]) else "kept"))
        lines.append(f"compute-optimal (fitted on {opt['budgets_fitted']} budgets{edge}): "
                     f"N_opt ∝ C^{opt['N_exponent']:.2f}, D_opt ∝ C^{opt['D_exponent']:.2f}, "
                     f"{min(opt['tokens_per_param']):.0f}-{max(opt['tokens_per_param']):.0f} tokens per parameter")
    lines += [f"published: {k}: {v}" for k, v in PUBLISHED.items()]
    return lines


def run(sweep: Sweep, out, device="cpu", data_path=None, log=_common.say) -> dict:
    """Runs the sweep; writes scaling.json and scaling.png under out; returns the JSON."""
    out = Path(out)
    t0 = time.time()
    tokens = _common.corpus_tokens(data_path)
    for name, split in (("training", tokens[1]), ("validation", tokens[2])):
        data.check_split_size(name, split, sweep.seq_len)
    runs = []
    plan = [(b, s) for b in sorted(sweep.budgets) for s in sweep.sizes]
    with _common.device(device) as be:
        for k, (budget, size) in enumerate(plan, 1):
            row = train_one(size, budget, sweep, tokens, be)
            runs.append(row)
            what = (f"skipped: {row['skipped']}" if "skipped" in row else
                    f"{row['steps']} steps, {row['tokens']:.3g} tokens: val loss {row['val_loss']:.4f} "
                    f"({row['seconds']:.1f}s)")
            log(f"[{k:2d}/{len(plan)}] C={budget:.3g} {row['model']:>9} (N={row['params']:,}): {what}")
    if not any("val_loss" in r for r in runs):
        per_step = [6 * r["params"] * sweep.batch_size * sweep.seq_len for r in runs]  # FLOPs of one step
        raise ValueError(f"every run was skipped (each needs {sweep.min_steps} to {sweep.max_steps} steps): choose "
                         f"budgets between {min(per_step) * sweep.min_steps:.3g} and "
                         f"{max(per_step) * sweep.max_steps:.3g} FLOPs")
    result = {"sweep": asdict(sweep), "device": device, "data": data_path or "bundled Shakespeare",
              "compute_definition": "C = 6·N·D, N = non-embedding parameters, D = training tokens",
              "runs": runs, **analyse(runs), "published": PUBLISHED, "seconds": time.time() - t0}
    for line in summary_lines(result):
        log(line)
    _common.write_outputs(result, out, "scaling", plot, log)
    return result


def plot(result, path: Path) -> str:
    plt = _common.pyplot()
    if plt is None:
        return _common.PLOT_HINT
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    runs = [r for r in result["runs"] if "val_loss" in r]
    front, fit = result["frontier"], result["fit"]
    fig, (ax_c, ax_n, ax_opt) = plt.subplots(1, 3, figsize=(16, 4.8))
    models = sorted({(r["params"], r["model"]) for r in runs})
    colors = plt.cm.viridis(np.linspace(0, 0.9, max(len(models), 1)))
    for (n, name), color in zip(models, colors):
        pts = sorted((r["compute"], r["val_loss"]) for r in runs if r["model"] == name)
        ax_c.plot(*zip(*pts), "o-", color=color, ms=4, lw=1, label=f"{name} (N={n:,})")
    ax_c.plot([f["compute"] for f in front], [f["loss"] for f in front], "k*", ms=11, label="frontier")
    if fit is not None:
        c = np.geomspace(min(f["compute"] for f in front), max(f["compute"] for f in front), 100)
        ci = fit["alpha_ci95"]
        ci_text = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
        ax_c.plot(c, fit["a"] * c ** -fit["alpha"] + fit["L_inf"], "k--",
                  label=f"{fit['a']:.3g}·C^-{fit['alpha']:.3f}{ci_text} + {fit['L_inf']:.3f}")
        ax_c.axhline(fit["L_inf"], color="grey", ls=":", lw=1)
    ax_c.set(xscale="log", yscale="log", xlabel="training compute C = 6·N·D (FLOPs)",
             ylabel="final validation loss (nats/char)", title="loss against compute")
    for axis in (ax_c.yaxis.set_major_formatter, ax_c.yaxis.set_minor_formatter):
        axis(FormatStrFormatter("%.2f"))  # plain losses, not 2.2 x 10^0
    ax_c.legend(fontsize=7)
    budgets = sorted({r["budget"] for r in runs})
    for budget, color in zip(budgets, plt.cm.plasma(np.linspace(0, 0.85, len(budgets)))):
        pts = sorted((r["params"], r["val_loss"]) for r in runs if r["budget"] == budget)
        ax_n.plot(*zip(*pts), "o-", color=color, ms=4, lw=1, label=f"C={budget:.3g}")
        f = next(f for f in front if f["budget"] == budget)
        ax_n.axvline(f["N_opt"], color=color, ls=":", lw=1)
    ax_n.set(xscale="log", xlabel="non-embedding parameters N", ylabel="final validation loss",
             title="IsoFLOP profiles (dotted: N_opt)")
    ax_n.legend(fontsize=7)
    ax_opt.plot([f["compute"] for f in front], [f["N_opt"] for f in front], "o-", label="N_opt (parameters)")
    ax_opt.plot([f["compute"] for f in front], [f["D_opt"] for f in front], "s-", label="D_opt (tokens)")
    edge = [f for f in front if f["at_edge"]]
    if edge:  # hollow: the best model was the sweep's smallest or largest, so N_opt is only a bound
        ax_opt.plot([f["compute"] for f in edge], [f["N_opt"] for f in edge], "o", mfc="white", mec="k",
                    label="best model at the sweep's edge")
    if result["optimal"] is not None:
        o = result["optimal"]
        ax_opt.set_title(f"compute-optimal: N ∝ C^{o['N_exponent']:.2f}, D ∝ C^{o['D_exponent']:.2f}")
    ax_opt.set(xscale="log", yscale="log", xlabel="training compute C (FLOPs)")
    ax_opt.legend(fontsize=7)
    for ax in (ax_c, ax_n, ax_opt):
        ax.grid(alpha=0.3, which="both")
        ax.xaxis.set_minor_formatter(NullFormatter())  # labelled minor ticks overlap on short log axes
    return _common.save_figure(plt, fig, path)


def _budgets(text: str) -> tuple:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated FLOP counts such as 1e11,1e12, got {text!r}")
    if not values or any(not math.isfinite(v) or v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive FLOP counts, got {text!r}")
    return values


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("scaling", help="loss against compute over model sizes; fits L(C) = a·C^-α + L∞",
                       description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help=f"{len(QUICK.sizes)} sizes x {len(QUICK.budgets)} budgets of small models: about 10 minutes "
                        "on 2 CPU cores (default: the full sweep, meant for --device cuda)")
    p.add_argument("--budgets", type=_budgets, metavar="C[,C]",
                   help="compute budgets in FLOPs instead of the sweep's own")
    p.add_argument("--device", choices=["cpu", "numpy", "cuda"], default="cpu",
                   help="backend the models train on (cuda: the CUDA core, TF32 matmuls)")
    p.add_argument("--data", help="a UTF-8 text file or folder (default: the bundled Shakespeare)")
    p.add_argument("--out", default="runs/scaling", help="folder for scaling.json and scaling.png")
    p.set_defaults(func=_cmd)
    return p


def _cmd(args) -> int:
    sweep = QUICK if args.quick else FULL
    if args.budgets:
        sweep = replace(sweep, budgets=args.budgets)
    try:
        run(sweep, args.out, device=args.device, data_path=args.data)
    except (ValueError, RuntimeError, FileNotFoundError, FloatingPointError) as exc:
        print(f"llmcore experiment scaling: error: {exc}", file=sys.stderr)
        return 2
    return 0
