"""llmcore.bench, the engine of `llmcore bench`: it runs, checks before it times, and writes JSON.

Speed itself is asserted nowhere here (DESIGN.md: speed lives in benchmarks/); these tests only
check that the command works and that its rows make sense. Quick mode without torch: a few seconds.
"""
import argparse
import json

import numpy as np
import pytest

from llmcore import bench, ops, reference


def _parse(argv):
    parser = argparse.ArgumentParser(prog="llmcore")
    bench.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["bench", *argv])


def test_quick_run_writes_rows_and_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = _parse(["--quick", "--ops", "softmax,adamw", "--repeats", "2", "--no-torch", "--json", str(out)])
    assert args.func is bench.run
    assert args.func(args) == 0

    doc = json.loads(out.read_text())
    rows = doc["rows"]
    expected = [(c.op, c.direction, c.label) for stem in ("softmax", "adamw") for c in bench.cases(stem, quick=True)]
    assert [(r["op"], r["direction"], r["shape"]) for r in rows] == expected
    for r in rows:
        assert r["status"] == "ok"
        assert 0 <= r["rel_err"] <= bench.TOLERANCE
        assert r["ours_ms"] > 0 and r["numpy_ms"] > 0 and r["torch_ms"] is None
        assert 0 < r["ours_best_ms"] <= r["ours_ms"]
        assert r["unit"] == "GB/s" and r["bytes"] > 0 and r["flops"] == 0
        assert r["rate"] == pytest.approx(r["bytes"] / (r["ours_ms"] * 1e-3) / 1e9)
        assert r["ceiling_fraction"] == pytest.approx(r["rate"] / doc["ceilings"]["copy_gbs"])
        assert r["speedup_numpy"] == pytest.approx(r["numpy_ms"] / r["ours_ms"])
    assert doc["ceilings"]["copy_gbs"] > 0 and doc["ceilings"]["matmul_gflops"] > 0
    assert doc["machine"]["llmcore"]["num_threads"] >= 1
    assert doc["options"]["quick"] is True

    table = capsys.readouterr().out
    assert "softmax" in table and "adamw" in table and "ours ms" in table


def test_matmul_rows_are_rated_in_flops():
    rows = bench.collect(["matmul"], quick=True, repeats=1, use_torch=False)
    assert rows and all(r["status"] == "ok" and r["unit"] == "GFLOP/s" for r in rows)
    square = rows[0]
    assert square["dims"] == {"M": 512, "K": 512, "N": 512}
    assert square["flops"] == 2 * 512 ** 3
    assert square["ceiling_fraction"] is None  # no ceilings were measured


def test_a_wrong_kernel_is_refused_not_timed():
    good = bench.cases("softmax", quick=True)[0]
    bad = bench.Case(good.op, good.direction, good.shape, good.label, good.make,
                     ours=lambda x: ops.softmax(x)[:, ::-1].copy(), ref=reference.softmax, nbytes=good.nbytes)
    row = bench.run_case(bad, repeats=1)
    assert row["status"].startswith("wrong")
    assert row["rel_err"] > bench.TOLERANCE
    assert row["ours_ms"] is None and row["rate"] is None


def test_every_operation_has_full_and_quick_shapes_and_unique_groups():
    for stem in ("matmul", "linear", "softmax", "rmsnorm", "layernorm", "gelu", "cross_entropy",
                 "embedding", "adamw"):
        assert stem in bench.BUILDERS
    for stem in bench.BUILDERS:
        for quick in (False, True):
            cases = bench.cases(stem, quick)
            assert cases, f"{stem}: no shapes (quick={quick})"
            groups = [c.group for c in cases]
            assert len(groups) == len(set(groups)), groups
            assert all((c.flops > 0) or (c.nbytes > 0) for c in cases)


def test_rel_error_skips_missing_outputs_and_catches_shape_mismatch():
    a = np.ones(4, np.float32)
    assert bench.rel_error((a, None), (a, a)) == 0.0
    assert bench.rel_error(a, np.ones(5)) == float("inf")
    assert bench.rel_error(a * 1.01, a) == pytest.approx(0.01, rel=1e-3)


def test_bad_options_are_refused(capsys):
    assert bench.run(_parse(["--ops", "nonsense", "--quick"])) == 2
    assert "unknown operation" in capsys.readouterr().err
    assert bench.run(_parse(["--repeats", "0", "--quick"])) == 2
