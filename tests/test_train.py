"""Training pieces: AdamW, the schedule, clipping, data splits and batches, checkpoints, the loop."""
import importlib.util
import json
import math

import numpy as np
import pytest

import llmcore
from helpers import rel_err
from llmcore import checkpoint as ckpt
from llmcore import data
from llmcore.model import GPT
from llmcore.nn import Parameter
from llmcore.optim import AdamW, clip_grad_norm, lr_schedule
from llmcore.train import PRESETS, resolve_settings, train

HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


pytestmark = pytest.mark.usefixtures("one_thread")


def test_adamw_decays_only_matrices_and_matches_torch_formula(rng):
    w = Parameter(rng.standard_normal((3, 4)).astype(np.float32))
    b = Parameter(rng.standard_normal(4).astype(np.float32))
    w0, b0 = w.data.copy(), b.data.copy()
    opt = AdamW({"w": w, "b": b}, lr=0.1, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.5)
    assert opt.be.name == "cpu"
    gw, gb = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 4))
    mw, vw, mb, vb = 0, 0, 0, 0
    for t in (1, 2):
        w.grad[...], b.grad[...] = gw[t - 1], gb[t - 1]
        opt.step()
        # torch.optim.AdamW by hand, in float64
        w0 = w0 * (1 - 0.1 * 0.5)  # decoupled decay: matrices only
        mw, vw = 0.9 * mw + 0.1 * gw[t - 1], 0.99 * vw + 0.01 * gw[t - 1] ** 2
        w0 = w0 - 0.1 * (mw / (1 - 0.9 ** t)) / (np.sqrt(vw / (1 - 0.99 ** t)) + 1e-8)
        mb, vb = 0.9 * mb + 0.1 * gb[t - 1], 0.99 * vb + 0.01 * gb[t - 1] ** 2
        b0 = b0 - 0.1 * (mb / (1 - 0.9 ** t)) / (np.sqrt(vb / (1 - 0.99 ** t)) + 1e-8)
    assert rel_err(w.data, w0) < 1e-5 and rel_err(b.data, b0) < 1e-5
    assert opt.step_count == 2
    # state round trip
    arrays = {k: v.copy() for k, v in opt.state_arrays().items()}
    other = AdamW({"w": Parameter(w.data.copy()), "b": Parameter(b.data.copy())})
    other.load_state_arrays(arrays, opt.step_count)
    assert other.step_count == 2 and np.array_equal(other.m["w"], opt.m["w"])


def test_lr_schedule_warms_up_then_decays():
    kw = dict(max_lr=1.0, min_lr=0.1, warmup=10, total=110)
    lrs = [lr_schedule(s, **kw) for s in range(120)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10]))  # linear warmup
    assert all(a >= b for a, b in zip(lrs[10:110], lrs[11:111]))  # monotone cosine decay
    assert lrs[60] == pytest.approx(0.55)  # halfway: the mean of max and min
    assert lrs[110] == lrs[119] == 0.1


def test_clip_grad_norm(rng):
    params = {k: Parameter(np.zeros(s, np.float32)) for k, s in (("a", (3, 4)), ("b", (5,)))}
    for p in params.values():
        p.grad[...] = rng.standard_normal(p.grad.shape)
    norm = math.sqrt(sum(float((p.grad.astype(np.float64) ** 2).sum()) for p in params.values()))
    assert clip_grad_norm(params, 100.0) == pytest.approx(norm, rel=1e-6)  # under the limit: unchanged
    assert clip_grad_norm(params, 0.5) == pytest.approx(norm, rel=1e-6)
    after = math.sqrt(sum(float((p.grad.astype(np.float64) ** 2).sum()) for p in params.values()))
    assert after == pytest.approx(0.5, rel=1e-4)
    params["a"].grad[0, 0] = np.nan
    assert not math.isfinite(clip_grad_norm(params, 1.0))


def test_bundled_corpus_split_is_fixed():
    docs = data.load_documents()
    assert len(docs) == 42 and docs[0][0] == "alls_well_that_ends_well"
    train_text, val_text = data.split_documents(docs)
    total = sum(len(t) for _, t in docs)
    assert len(train_text) + len(val_text) == total
    assert 0.095 < len(val_text) / total < 0.105
    for name, text in docs:  # each work: the last ~10%, starting at a line
        a, b = data.split_text(text)
        assert a + b == text and a.endswith("\n") and 0.08 < len(b) / len(text) < 0.11, name
    assert "Exeunt" in val_text and len(set(train_text)) == 84


def test_user_data_file_and_folder(tmp_path):
    (tmp_path / "a.txt").write_text("first line\n" * 50)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("second, ünïcode\n" * 50)
    (tmp_path / ".hidden").write_text("skip me")
    docs = data.load_documents(tmp_path)
    assert [n for n, _ in docs] == ["a.txt", "sub/b.md"]
    assert data.load_documents(tmp_path / "a.txt")[0][1] == "first line\n" * 50
    (tmp_path / "bad.bin").write_bytes(b"\xff\xfe\x00 not utf-8")
    with pytest.raises(ValueError, match="not UTF-8"):
        data.load_documents(tmp_path)
    with pytest.raises(FileNotFoundError):
        data.load_documents(tmp_path / "missing.txt")


def test_batches(rng):
    tokens = np.arange(1000, dtype=np.int32)
    x, y = data.get_batch(tokens, 4, 16, rng)
    assert x.shape == y.shape == (4, 16) and x.dtype == np.int64
    assert (y == x + 1).all()  # targets are the next tokens
    windows = list(data.eval_batches(tokens, 4, 16, max_batches=3))
    again = list(data.eval_batches(tokens, 4, 16, max_batches=3))
    assert len(windows) == 3 and all((a[0] == b[0]).all() for a, b in zip(windows, again))
    starts = np.concatenate([w[0][:, 0] for w in windows])
    assert starts[0] == 0 and starts[-1] > 900 and (np.diff(starts) > 0).all()  # spread over the split


def small_arrays(rng):
    return {"w": rng.standard_normal((4, 3)).astype(np.float32)}, {"m.w": np.zeros((4, 3), np.float32)}


def test_checkpoint_round_trip_and_atomic_swap(tmp_path, rng):
    model_arrays, opt_arrays = small_arrays(rng)
    ckpt.save(tmp_path, model_arrays, opt_arrays, {"step": 1})
    model_arrays["w"] += 1
    folder = ckpt.save(tmp_path, model_arrays, opt_arrays, {"step": 2})
    assert folder == tmp_path / "checkpoint" and not (tmp_path / "checkpoint.old").exists()
    meta, m, o = ckpt.load(tmp_path)
    assert meta["step"] == 2 and np.array_equal(m["w"], model_arrays["w"])
    # killed between the two renames: only checkpoint.old is there, and it is found
    (tmp_path / "checkpoint").rename(tmp_path / "checkpoint.old")
    assert ckpt.load(tmp_path)[0]["step"] == 2
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint"):
        ckpt.load(tmp_path / "nowhere")


@pytest.mark.parametrize("damage", ["flip", "truncate", "json"])
def test_corrupted_checkpoint_is_refused(tmp_path, rng, damage):
    ckpt.save(tmp_path, *small_arrays(rng), {"step": 3})
    folder = tmp_path / "checkpoint"
    if damage == "flip":
        raw = bytearray((folder / "model.safetensors").read_bytes())
        raw[-3] ^= 0x40
        (folder / "model.safetensors").write_bytes(bytes(raw))
        match = "corrupted"
    elif damage == "truncate":
        raw = (folder / "optimizer.safetensors").read_bytes()
        (folder / "optimizer.safetensors").write_bytes(raw[: len(raw) // 2])
        match = "truncated"
    else:
        text = (folder / "checkpoint.json").read_text()
        (folder / "checkpoint.json").write_text(text[: len(text) // 2])
        match = "corrupted or truncated"
    with pytest.raises(ckpt.CheckpointError, match=match):
        ckpt.load(tmp_path)


def test_presets_resolve():
    s = resolve_settings("cpu", {"steps": 7, "seq_len": 64, "lr": None})
    assert s["steps"] == 7 and s["model"]["seq_len"] == 64 and s["lr"] == PRESETS["cpu"]["lr"]
    assert s["tokenizer"] == "char" and s["device"] == "cpu"
    with pytest.raises(ValueError, match="preset"):
        resolve_settings("huge", {})


@pytest.fixture
def text_file(tmp_path):
    rng = np.random.default_rng(0)
    words = ["the", "king", "queen", "shall", "not", "be", "my", "lord", "and", "of", "love"]
    lines = [" ".join(rng.choice(words, 8)) + "." for _ in range(600)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_training_lowers_validation_loss_and_writes_outputs(tmp_path, text_file):
    out = tmp_path / "run"
    code = train("tiny", out, data=str(text_file), steps=60, eval_interval=30, log=lambda *a: None)
    assert code == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(vals) == 2 and len(losses) == 6
    assert losses[-1] < losses[0] - 0.5 and vals[-1] < math.log(len(set(text_file.read_text())))
    meta, arrays, _ = ckpt.load(out)
    assert meta["step"] == 60 and meta["optimizer_step"] == 60 and meta["tokenizer"]["kind"] == "char"
    assert "h.0.attn.c_attn.weight" in arrays and "wte.weight" in arrays  # GPT-2-style names
    if HAVE_MATPLOTLIB:  # an optional extra ([plot]); without it the curve is skipped
        assert (out / "loss.png").stat().st_size > 1000


@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_non_finite_values_stop_and_keep_the_last_checkpoint(tmp_path, text_file, monkeypatch, where):
    import llmcore.train

    out = tmp_path / "run"
    calls = {"n": 0}
    real_forward, real_norm = GPT.forward, llmcore.train.grad_norm

    def forward(self, idx, targets=None):
        logits, loss = real_forward(self, idx, targets)
        calls["n"] += 1  # training batches only: no evaluation runs before step 40
        return logits, (float("nan") if where == "loss" and calls["n"] == 26 else loss)

    def grad_norm(params, backend=None):
        norm = real_norm(params, backend)
        return float("inf") if where == "gradient" and calls["n"] == 26 else norm

    monkeypatch.setattr(GPT, "forward", forward)
    monkeypatch.setattr(llmcore.train, "grad_norm", grad_norm)
    messages = []
    code = train("tiny", out, data=str(text_file), steps=40, eval_interval=1000, ckpt_interval=10,
                 log=messages.append)
    assert code == 1
    want = "loss is nan" if where == "loss" else "gradient norm is inf"
    assert any(want in m and "at step 26" in m and "last good checkpoint" in m for m in messages), messages
    meta, arrays, _ = ckpt.load(out)
    assert meta["step"] == 20  # the checkpoint before the bad step is intact
    assert all(np.isfinite(a).all() for a in arrays.values())


def test_loss_curve_is_skipped_without_matplotlib(tmp_path, monkeypatch):
    import sys

    from llmcore.train import plot_losses

    rows = [{"step": 10, "loss": 3.0}, {"step": 20, "loss": 2.5, "val_loss": 2.6}]
    if HAVE_MATPLOTLIB:
        assert "loss curve" in plot_losses(rows, tmp_path / "a.png") and (tmp_path / "a.png").exists()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    message = plot_losses(rows, tmp_path / "b.png")
    assert "matplotlib is not installed" in message and "\n" not in message
    assert not (tmp_path / "b.png").exists()


# ----------------------------------------------------------------------------------------------
# The training loop on a device backend: a fake one everywhere (test_model.fake_device_backend:
# NumPy underneath, every device array a distinct type), the real "cuda" one where a GPU is.

def _run_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_training_on_a_device_backend_matches_cpu(tmp_path, text_file, monkeypatch):
    """train() on the fake device (checkpoints via to_host, resume via to_device, sampling from
    device logits) gives the cpu backend's losses, weights, moments and sample, bit for bit."""
    from test_model import DeviceArray, fake_device_backend

    import llmcore.nn

    kw = dict(data=str(text_file), eval_interval=1000, ckpt_interval=10, sample_tokens=20, seed=7)

    def run(out, log):  # 20 steps of a 20-step schedule, then resumed to 30 steps
        assert train("tiny", out, steps=20, log=lambda *a: None, **kw) == 0
        assert train("tiny", out, resume=True, steps=30, log=log, **kw) == 0

    logs = {"cpu": [], "device": []}
    run(tmp_path / "cpu", logs["cpu"].append)

    calls = {}
    fake, real = fake_device_backend(calls), llmcore.nn.get_backend
    monkeypatch.setattr(llmcore.nn, "get_backend", lambda name: fake if name == "cpu" else real(name))
    seen = []
    real_save = ckpt.save

    def save(out_dir, model_arrays, optimizer_arrays, state):  # what reaches safetensors: host arrays
        seen.extend(type(a) for a in [*model_arrays.values(), *optimizer_arrays.values()])
        return real_save(out_dir, model_arrays, optimizer_arrays, state)

    monkeypatch.setattr(ckpt, "save", save)
    out = tmp_path / "device"
    run(out, logs["device"].append)
    assert seen and set(seen) == {np.ndarray}
    assert calls["to_device"] > 0 and calls["to_host"] > 0
    assert any("backend fake-device" in m for m in logs["device"])

    a = [r for r in _run_metrics(tmp_path / "cpu") if "loss" in r]
    b = [r for r in _run_metrics(out) if "loss" in r]
    assert [r["loss"] for r in a] == [r["loss"] for r in b] and [r["step"] for r in b] == [10, 20, 30]
    assert all(r["tokens_per_s"] > 0 and r["model_tflops"] > 0 for r in b)
    (_, ma, oa), (_, mb, ob) = ckpt.load(tmp_path / "cpu"), ckpt.load(out)
    for k in ma:
        assert np.array_equal(ma[k], mb[k]), k
    for k in oa:
        assert np.array_equal(oa[k], ob[k]), k
    sample = logs["cpu"][logs["cpu"].index(next(m for m in logs["cpu"] if m.startswith("--- sample"))) + 1]
    assert sample == logs["device"][logs["device"].index(next(
        m for m in logs["device"] if m.startswith("--- sample"))) + 1]
    assert any(m.startswith("throughput:") and "tokens/s" in m for m in logs["device"])
    # and a checkpoint loads for sampling on the device
    monkeypatch.undo()
    model, _, _ = ckpt.load_for_inference(out, backend=fake_device_backend())
    assert isinstance(model.parameters()["wte.weight"].data, DeviceArray)
    assert np.array_equal(np.asarray(model.parameters()["wte.weight"].data), ma["wte.weight"])


def test_matmul_precision_is_a_cuda_setting(tmp_path, text_file):
    before = llmcore.ops.get_matmul_precision()
    messages = []
    assert train("tiny", tmp_path / "run", data=str(text_file), steps=2, eval_interval=1000, sample_tokens=0,
                 matmul_precision="medium", log=messages.append) == 0
    assert any("--matmul-precision medium applies to --device cuda only" in m for m in messages), messages
    assert llmcore.ops.get_matmul_precision() == before
    with pytest.raises(ValueError, match="matmul-precision"):
        train("tiny", tmp_path / "bad", data=str(text_file), steps=2, matmul_precision="low", log=lambda *a: None)


def test_presets_cover_gpt2_124m():
    s = resolve_settings("gpu-gpt2", {})
    assert s["model"] == dict(n_layer=12, n_head=12, n_kv_head=12, d_model=768, seq_len=1024)


@pytest.mark.cuda
def test_training_on_cuda(tmp_path, text_file, cp):
    before = llmcore.ops.get_matmul_precision()
    out = tmp_path / "run"
    messages = []
    code = train("tiny", out, data=str(text_file), device="cuda", steps=40, eval_interval=20,
                 ckpt_interval=20, sample_tokens=20, log=messages.append)
    assert code == 0, messages
    assert any("backend cuda, matmul precision high" in m for m in messages), messages
    assert llmcore.ops.get_matmul_precision() == before  # restored after the run
    rows = _run_metrics(out)
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < losses[0] - 0.5 and all(r["tokens_per_s"] > 0 for r in rows if "loss" in r)
    # resume on the GPU, then load the GPU-written checkpoint on the CPU: same loss on a batch
    assert train("tiny", out, resume=True, device="cuda", steps=50, log=lambda *a: None) == 0
    assert ckpt.load(out)[0]["step"] == 50
    cpu_model, tok, _ = ckpt.load_for_inference(out, backend="cpu")
    gpu_model, _, _ = ckpt.load_for_inference(out, backend="cuda")
    x, y = data.get_batch(tok.encode(text_file.read_text()[:5000]).astype(np.int32), 4, 32,
                          np.random.default_rng(0))
    assert isinstance(gpu_model.parameters()["wte.weight"].data, cp.ndarray)
    a, b = cpu_model.forward(x, y)[1], gpu_model.forward(x, y)[1]
    assert abs(a - b) <= 1e-4 * abs(a), (a, b)
