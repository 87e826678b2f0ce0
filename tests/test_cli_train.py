"""`llmcore train` and `llmcore generate` as a user runs them: in a subprocess, on a small text file."""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import llmcore

from helpers import rel_err
from llmcore import checkpoint as ckpt

TINY = ["--preset", "tiny", "--seed", "3"]


def cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "llmcore.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ, LLMCORE_NUM_THREADS="1"))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    rng = np.random.default_rng(0)
    words = ["the", "king", "queen", "shall", "not", "be", "my", "lord", "and", "of", "love", "thee"]
    lines = [" ".join(rng.choice(words, 7)).capitalize() + "." for _ in range(800)]
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_train_then_generate(tmp_path, text_file):
    out = tmp_path / "run"
    r = cli("train", *TINY, "--data", text_file, "--steps", 40, "--out", out)
    assert r.returncode == 0, r.stderr
    assert "validation loss" in r.stdout and "--- sample" in r.stdout
    assert "step/s" in r.stderr or "it/s" in r.stderr or "40/40" in r.stderr  # the tqdm bar
    assert (out / "checkpoint" / "model.safetensors").exists()
    if importlib.util.find_spec("matplotlib") is not None:  # the optional [plot] extra
        assert (out / "loss.png").exists()
    else:
        assert "matplotlib is not installed" in r.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 40 and "val_loss" in rows[-1]

    r = cli("generate", "--ckpt", out, "--prompt", "The king", "--max-new-tokens", 30, "--seed", 1)
    assert r.returncode == 0, r.stderr
    text = r.stdout.rstrip("\n")
    assert text.startswith("The king") and len(text) == len("The king") + 30
    again = cli("generate", "--ckpt", out / "checkpoint", "--prompt", "The king", "--max-new-tokens", 30,
                "--seed", 1)
    assert again.stdout == r.stdout  # a seed fixes the sample
    greedy = cli("generate", "--ckpt", out, "--prompt", "The", "--temperature", 0, "--max-new-tokens", 50)
    assert greedy.returncode == 0 and greedy.stdout.startswith("The") and "ms/token" in greedy.stderr
    # 50 new tokens on a 32-token window: the cache is refilled as the window jumps
    uncached = cli("generate", "--ckpt", out, "--prompt", "The", "--temperature", 0, "--max-new-tokens", 50,
                   "--no-cache")
    assert uncached.stdout == greedy.stdout and "no KV cache" in uncached.stderr

    r = cli("generate", "--ckpt", out, "--prompt", "Zebra ~")  # characters the corpus never had
    assert r.returncode == 2 and "vocabulary" in r.stderr


def test_bpe_tokenizer_run(tmp_path, text_file):
    out = tmp_path / "bpe"
    r = cli("train", *TINY, "--data", text_file, "--tokenizer", "bpe", "--bpe-vocab-size", 300,
            "--steps", 10, "--sample-tokens", 5, "--out", out)
    assert r.returncode == 0, r.stderr
    meta = json.loads((out / "checkpoint" / "checkpoint.json").read_text())
    assert meta["tokenizer"]["kind"] == "bpe" and len(meta["tokenizer"]["merges"]) == 44
    assert meta["config"]["vocab_size"] == 300
    r = cli("generate", "--ckpt", out, "--prompt", "The queen ☃", "--max-new-tokens", 5)
    assert r.returncode == 0 and r.stdout.startswith("The queen ☃")  # BPE encodes any text


def test_model_shape_options(tmp_path, text_file):
    out = tmp_path / "gqa"
    r = cli("train", *TINY, "--data", text_file, "--steps", 4, "--sample-tokens", 3, "--n-layer", 2, "--d-model", 24,
            "--n-head", 6, "--n-kv-head", 2, "--pos", "alibi", "--norm", "layernorm", "--act", "relu", "--out", out)
    assert r.returncode == 0, r.stderr
    cfg = json.loads((out / "checkpoint" / "checkpoint.json").read_text())["config"]
    assert (cfg["n_layer"], cfg["d_model"], cfg["n_head"], cfg["n_kv_head"]) == (2, 24, 6, 2)
    assert (cfg["pos"], cfg["norm"], cfg["act"]) == ("alibi", "layernorm", "relu")
    r = cli("train", *TINY, "--data", text_file, "--n-head", 4, "--n-kv-head", 3, "--out", tmp_path / "bad")
    assert r.returncode == 2 and "n_kv_head" in r.stderr


def test_kill_and_resume_continues_exactly(tmp_path, text_file):
    args = [*TINY, "--data", text_file, "--steps", 1000, "--ckpt-interval", 10, "--eval-interval", 250,
            "--sample-tokens", 0]
    straight = tmp_path / "straight"
    assert cli("train", *args, "--out", straight).returncode == 0

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "llmcore.cli", "train", *map(str, args), "--out", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, LLMCORE_NUM_THREADS="1"))
    deadline = time.time() + 60
    while not (killed / "checkpoint" / "checkpoint.json").exists() and time.time() < deadline:
        time.sleep(0.005)
    time.sleep(0.05)  # a few more steps past the checkpoint, then a hard kill
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    step_at_kill = ckpt.load(killed)[0]["step"]
    assert 10 <= step_at_kill < 1000
    # killed/checkpoint, or killed/checkpoint.old when the kill landed while checkpoints swapped
    resume_from = ckpt.find(killed)

    r = cli("train", "--out", killed, "--resume")
    assert r.returncode == 0, r.stderr
    assert f"resumed from {resume_from} at step {step_at_kill}" in r.stdout
    a_meta, a, a_opt = ckpt.load(straight)
    b_meta, b, b_opt = ckpt.load(killed)
    assert a_meta["step"] == b_meta["step"] == 1000 and b_meta["optimizer_step"] == 1000
    assert a_meta["rng"] == b_meta["rng"]
    for k in a:  # the same weights and moments as the run that was never interrupted
        assert rel_err(b[k], a[k]) < 1e-5, k
    for k in a_opt:
        assert rel_err(b_opt[k], a_opt[k]) < 1e-4, k
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == list(range(10, 1001, 10))  # no step logged twice, none missing


def test_bad_checkpoints_and_arguments_are_refused(tmp_path, text_file):
    out = tmp_path / "run"
    assert cli("train", *TINY, "--data", text_file, "--steps", 5, "--sample-tokens", 0, "--out", out).returncode == 0
    r = cli("train", *TINY, "--data", text_file, "--steps", 5, "--out", out)
    assert r.returncode == 2 and "--resume" in r.stderr  # never overwrites a run by accident
    model_file = out / "checkpoint" / "model.safetensors"
    raw = bytearray(model_file.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    model_file.write_bytes(bytes(raw))
    for r in (cli("generate", "--ckpt", out, "--prompt", "The"), cli("train", "--out", out, "--resume")):
        assert r.returncode == 2 and "corrupted" in r.stderr and "refusing" in r.stderr
    model_file.write_bytes(bytes(raw[:100]))
    r = cli("generate", "--ckpt", out)
    assert r.returncode == 2 and "truncated" in r.stderr
    r = cli("train", "--out", tmp_path / "empty", "--resume")
    assert r.returncode == 2 and "no checkpoint" in r.stderr
    if not llmcore.cuda_available():  # without a GPU, --device cuda says what is missing
        r = cli("train", *TINY, "--data", text_file, "--device", "cuda", "--out", tmp_path / "gpu")
        assert r.returncode == 2 and "cuda" in r.stderr.lower()
    r = cli("train", *TINY, "--data", tmp_path / "missing.txt", "--out", tmp_path / "x")
    assert r.returncode == 2 and "no such file" in r.stderr
    assert cli("info").returncode == 0
