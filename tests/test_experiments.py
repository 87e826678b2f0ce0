"""`llmcore experiment scaling|grokking|positions`: the fits and data they rely on, and short runs of
each that must write their tables (and plots, where matplotlib is installed)."""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from llmcore.experiments import _common, grokking, positions, scaling
from llmcore.model import GPT, GPTConfig

HAS_PLOT = importlib.util.find_spec("matplotlib") is not None


def cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "llmcore.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ, LLMCORE_NUM_THREADS="1"))


# ----------------------------------------------------------------------------------------------
# scaling: the fits

@pytest.mark.parametrize("alpha, floor", [(0.3, 1.2), (0.08, 0.6), (0.5, 0.0)])
def test_power_law_fit_recovers_a_alpha_and_floor(rng, alpha, floor):
    c = np.geomspace(1e10, 1e14, 12)
    a = 1.5 * 1e10 ** alpha  # 1.5 nats above the floor at the smallest budget
    clean = a * c ** -alpha + floor
    y = clean + rng.normal(0, 0.004, c.shape)
    fit = scaling.fit_power_law(c, y, seed=1)
    assert fit["alpha"] == pytest.approx(alpha, rel=0.1)
    assert fit["L_inf"] == pytest.approx(floor, abs=0.05)
    assert fit["a"] * 1e12 ** -fit["alpha"] == pytest.approx(a * 1e12 ** -alpha, rel=0.05)
    lo, hi = fit["alpha_ci95"]
    assert lo <= alpha <= hi and lo < fit["alpha"] < hi
    assert fit["rmse"] < 0.01


def test_power_law_fit_without_noise_is_exact_and_without_enough_points_has_no_interval():
    c = np.geomspace(1e11, 1e13, 3)
    fit = scaling.fit_power_law(c, 40.0 * c ** -0.1 + 0.9)
    assert fit["alpha"] == pytest.approx(0.1, rel=1e-3) and fit["L_inf"] == pytest.approx(0.9, abs=1e-3)
    assert fit["alpha_ci95"] is None  # three points, three parameters: nothing left to resample
    with pytest.raises(ValueError, match="fit_power_law"):
        scaling.fit_power_law([1.0, 2.0], [3.0, 2.0])
    with pytest.raises(ValueError, match="fit_power_law"):
        scaling.fit_power_law([1.0, -2.0, 3.0], [3.0, 2.0, 1.0])


def _run(model, params, budget, loss):
    return {"model": model, "params": params, "budget": budget, "compute": budget, "val_loss": loss}


def test_frontier_finds_the_isoflop_minimum_and_flags_edges():
    # Losses on a parabola in log N with its vertex at N = 1e5, sampled at 2e4, 8e4, 3e5.
    ns = [2e4, 8e4, 3e5]
    runs = [_run(f"m{i}", n, 1e12, 2.0 + 0.1 * np.log(n / 1e5) ** 2) for i, n in enumerate(ns)]
    # A second budget whose best model is the largest: N_opt is at the edge of the sweep.
    runs += [_run(f"m{i}", n, 4e12, 2.0 - 0.1 * i) for i, n in enumerate(ns)]
    low, high = scaling.frontier(runs)
    assert low["N_opt"] == pytest.approx(1e5, rel=1e-6) and not low["at_edge"]
    assert low["D_opt"] == pytest.approx(1e12 / 6e5) and low["best_model"] == "m1"
    assert high["at_edge"] and high["N_opt"] == 3e5 and high["loss"] == pytest.approx(1.8)


def test_scaling_tiny_sweep_writes_table_and_plot(tmp_path):
    sweep = scaling.Sweep(sizes=((1, 16, 2), (1, 24, 2), (2, 32, 2)), budgets=(1e8, 2e8, 4e8, 8e8), seq_len=16,
                          batch_size=8, lr=3e-3, min_steps=10, max_steps=300, eval_batches=2)
    lines = []
    result = scaling.run(sweep, tmp_path, log=lines.append)
    table = json.loads((tmp_path / "scaling.json").read_text())
    assert table["runs"] == json.loads(json.dumps(result["runs"]))
    done = [r for r in table["runs"] if "val_loss" in r]
    skipped = [r for r in table["runs"] if "skipped" in r]
    assert len(done) + len(skipped) == 12 and skipped  # the largest model at 1e8 is under 10 steps
    for r in done:
        assert r["compute"] == pytest.approx(6 * r["params"] * r["tokens"])
        assert r["steps"] * 8 * 16 == r["tokens"] and np.isfinite(r["val_loss"])
    assert {f["budget"] for f in table["frontier"]} == set(sweep.budgets)
    assert {"a", "alpha", "alpha_ci95", "L_inf", "alpha_no_floor"} <= set(table["fit"])
    assert {"N_exponent", "D_exponent", "tokens_per_param"} <= set(table["optimal"])
    assert any(line.startswith("L(C) = ") for line in lines)
    assert (tmp_path / "scaling.png").exists() == HAS_PLOT


def test_without_matplotlib_the_table_is_written_and_the_hint_printed(tmp_path, monkeypatch):
    monkeypatch.setattr(_common, "pyplot", lambda: None)
    s = positions.PosSettings(seq_len=8, steps=5, d_model=16, n_layer=1, n_head=2, eval_batches=1, kinds=("rope",))
    lines = []
    positions.run(s, tmp_path, log=lines.append)
    assert (tmp_path / "positions.json").exists() and not (tmp_path / "positions.png").exists()
    assert any("pip install 'llmcore[plot]'" in line for line in lines)


def test_scaling_cli_rejects_bad_budgets(tmp_path):
    r = cli("experiment", "scaling", "--quick", "--budgets", "1e11,-3")
    assert r.returncode == 2 and "--budgets" in r.stderr and "positive" in r.stderr
    r = cli("experiment", "scaling", "--quick", "--budgets", "1e5", "--out", tmp_path)  # 0 steps for every model
    assert r.returncode == 2 and "every run was skipped" in r.stderr and "choose budgets between" in r.stderr


# ----------------------------------------------------------------------------------------------
# grokking

def test_grokking_split_is_every_pair_once_and_disjoint():
    p = 13
    train, val = grokking.split_pairs(p, 0.3, seed=4)
    assert len(train) == round(0.3 * p * p) and len(train) + len(val) == p * p
    train_set, val_set = set(map(tuple, train)), set(map(tuple, val))
    assert len(train_set) == len(train) and len(val_set) == len(val)  # no pair twice
    assert not train_set & val_set
    assert train_set | val_set == {(a, b) for a in range(p) for b in range(p)}
    again, _ = grokking.split_pairs(p, 0.3, seed=4)
    assert np.array_equal(again, train)  # the seed fixes the split


def test_grokking_sequences_score_only_the_answer():
    p = 97
    pairs = np.array([[3, 5], [96, 96], [50, 47]])
    x, y = grokking.encode(pairs, p)
    assert x.tolist() == [[3, 5, p], [96, 96, p], [50, 47, p]]
    assert y[:, :2].tolist() == [[-100, -100]] * 3 and y[:, 2].tolist() == [8, 95, 0]


def test_grokking_short_run_writes_log_and_plot(tmp_path):
    s = grokking.GrokSettings(p=11, train_frac=0.5, steps=60, eval_every=20, d_model=32, n_head=2, lr=3e-3)
    lines = []
    result = grokking.run(s, tmp_path, log=lines.append)
    table = json.loads((tmp_path / "grokking.json").read_text())
    assert {"settings", "train_99_step", "val_99_step", "gap_steps", "train_acc_dips", "log"} <= set(table)
    assert [row["step"] for row in table["log"]] == [20, 40, 60]
    for row in table["log"]:
        assert 0 <= row["train_acc"] <= 1 and 0 <= row["val_acc"] <= 1 and row["val_loss"] > 0
    assert table["settings"]["p"] == 11 and result["train_99_step"] == table["train_99_step"]
    assert any("training accuracy passed 99%" in line for line in lines)
    assert (tmp_path / "grokking.png").exists() == HAS_PLOT


def test_grokking_reports_both_thresholds_from_the_log():
    rows = [{"step": 10 * i, "train_acc": t, "val_acc": v}
            for i, (t, v) in enumerate([(0.5, 0.0), (0.995, 0.1), (0.7, 0.2), (1.0, 0.5), (1.0, 0.99)], 1)]
    r = grokking.summarise(grokking.GrokSettings(), rows, 1.0)
    assert (r["train_99_step"], r["val_99_step"], r["gap_steps"]) == (20, 50, 30)
    assert r["train_acc_dips"] == [30]  # a loss spike after memorisation
    assert "30 steps later" in grokking.report_line(r) and "1 logged step(s)" in grokking.report_line(r)


def test_grokking_cli(tmp_path):
    r = cli("experiment", "grokking", "--p", 7, "--steps", 20, "--eval-every", 10, "--d-model", 16,
            "--n-head", 2, "--out", tmp_path)
    assert r.returncode == 0, r.stderr
    assert "validation accuracy" in r.stdout and (tmp_path / "grokking.json").exists()
    bad = cli("experiment", "grokking", "--train-frac", 0, "--out", tmp_path)
    assert bad.returncode == 2 and "--train-frac" in bad.stderr


# ----------------------------------------------------------------------------------------------
# positions

def test_first_positions_of_a_long_window_are_a_short_window():
    """What the experiment's 'loss at T' relies on: a causal model's outputs at positions < T do not
    depend on the tokens after them, with every encoding."""
    rng = np.random.default_rng(0)
    for pos in ("learned", "sinusoidal", "rope", "alibi"):
        model = GPT(GPTConfig(vocab_size=11, seq_len=16, n_layer=2, n_head=2, n_kv_head=2, d_model=16, pos=pos))
        x = rng.integers(0, 11, (2, 16))
        long, _ = model.forward(x)
        short, _ = model.forward(x[:, :8])
        np.testing.assert_allclose(long[:, :8], short, rtol=1e-5, atol=1e-6)


def test_positions_short_run_writes_table_and_plot(tmp_path):
    s = positions.PosSettings(seq_len=12, steps=20, d_model=16, n_layer=1, n_head=2, eval_batches=2)
    lines = []
    positions.run(s, tmp_path, log=lines.append)
    table = json.loads((tmp_path / "positions.json").read_text())
    assert [r["pos"] for r in table["rows"]] == ["learned", "sinusoidal", "rope", "alibi"]
    for r in table["rows"]:
        curve = np.array(r["loss_by_position"])
        assert curve.shape == (24,) and np.isfinite(curve).all()
        assert r["val_loss_at_T"] == pytest.approx(curve[:12].mean())
        assert r["val_loss_beyond_T"] == pytest.approx(curve[12:].mean())
        assert r["val_loss_at_2T"] == pytest.approx(curve.mean())
    assert "never trained" in table["rows"][0]["note"]
    assert any("seq_len 2T" in line for line in lines)  # the table says how the models were built
    assert (tmp_path / "positions.png").exists() == HAS_PLOT


def test_positions_cli(tmp_path):
    r = cli("experiment", "positions", "--pos", "rope,alibi", "--seq-len", 8, "--steps", 5, "--d-model", 16,
            "--n-layer", 1, "--n-head", 2, "--eval-batches", 1, "--out", tmp_path)
    assert r.returncode == 0, r.stderr
    assert [row["pos"] for row in json.loads((tmp_path / "positions.json").read_text())["rows"]] == ["rope", "alibi"]
    bad = cli("experiment", "positions", "--pos", "rope,nope", "--out", tmp_path)
    assert bad.returncode == 2 and "--pos" in bad.stderr
