"""`llmcore calc`: its formulas against numbers computed by hand, and the command as a user runs it."""
import json

import pytest

from llmcore import calc
from llmcore.cli import main
from llmcore.model import GPT, GPTConfig


def shape(preset):
    return calc.resolve_shape(preset, {})


def total(s):
    return sum(calc.param_counts(s).values())


def test_gpt2_124m_by_hand():
    # V 50257, T 1024, C 768, L 12, FFN 3072, biases, LayerNorm (gain + bias), learned positions, tied:
    #   wte 50257*768 = 38,597,376; wpe 1024*768 = 786,432
    #   per layer: q,k,v,o 4*(768*768 + 768) = 2,362,368; ffn 768*3072 + 3072 + 3072*768 + 768 = 4,722,432;
    #              two LayerNorms 2*2*768 = 3,072; so 7,087,872, times 12 = 85,054,464
    #   ln_f 1,536; lm_head tied: 0
    #   total 38,597,376 + 786,432 + 85,054,464 + 1,536 = 124,439,808
    counts = calc.param_counts(shape("gpt2-124m"))
    assert counts["token embedding"] == 38_597_376 and counts["position embedding"] == 786_432
    assert counts["attention q"] == 12 * (768 * 768 + 768)
    assert counts["ffn"] == 12 * 4_722_432 and counts["norms"] == 12 * 3_072 and counts["final norm"] == 1_536
    assert counts["lm_head"] == 0
    assert sum(counts.values()) == 124_439_808
    assert calc.non_embedding_params(counts) == 124_439_808 - 38_597_376 - 786_432


def test_llama3_8b_by_hand():
    # V 128256, C 4096, L 32, 32 query heads and 8 K/V heads of D 128, SwiGLU 14336, RMSNorm, untied:
    #   embeddings 2 * 128256*4096 = 1,050,673,152
    #   per layer: q 4096*4096 = 16,777,216; k, v 4096*(8*128) = 4,194,304 each; o 16,777,216
    #              ffn 3 * 4096*14336 = 176,160,768; norms 2*4096 = 8,192; so 218,112,000
    #   32 layers 6,979,584,000; final norm 4,096
    #   total 6,979,584,000 + 1,050,673,152 + 4,096 = 8,030,261,248
    counts = calc.param_counts(shape("llama3-8b"))
    assert counts["attention k"] == counts["attention v"] == 32 * 4_194_304
    assert counts["ffn"] == 32 * 176_160_768 and counts["lm_head"] == 128256 * 4096
    assert sum(counts.values()) == 8_030_261_248


def test_llama3_70b_by_hand():
    # C 8192, L 80, 64 query heads and 8 K/V heads of D 128, SwiGLU 28672, V 128256, untied:
    #   per layer: q, o 8192*8192 = 67,108,864 each; k, v 8192*1024 = 8,388,608 each;
    #              ffn 3 * 8192*28672 = 704,643,072; norms 16,384; so 855,654,400, times 80 = 68,452,352,000
    #   embeddings 2 * 128256*8192 = 2,101,346,304; final norm 8,192
    #   total 70,553,706,496
    assert total(shape("llama3-70b")) == 70_553_706_496


@pytest.mark.parametrize("preset", ["gpt3-175b", "llama3-8b", "llama3-70b", "gpt2-124m"])
def test_published_counts_within_2_percent(preset):
    # Published: GPT-3 175B, Llama 3 8.03B and 70.6B, GPT-2 "124M".
    published = calc.PUBLISHED_PARAMS[preset]
    assert abs(total(shape(preset)) - published) / published < 0.02


@pytest.mark.parametrize("config", [
    dict(vocab_size=65, seq_len=32, n_layer=2, n_head=4, n_kv_head=4, d_model=32),
    dict(vocab_size=97, seq_len=24, n_layer=3, n_head=6, n_kv_head=2, d_model=48, pos="learned", norm="layernorm",
         bias=True, tie_embeddings=False),
])
def test_counts_match_llmcore_model(config):
    # The calculator and the model it describes agree, GQA, biases, LayerNorm, learned positions and all.
    cfg = GPTConfig(**config)
    s = calc.Shape(n_layer=cfg.n_layer, d_model=cfg.d_model, n_head=cfg.n_head, n_kv_head=cfg.n_kv_head,
                   vocab_size=cfg.vocab_size, seq_len=cfg.seq_len, ffn_hidden=cfg.ffn_mult * cfg.d_model,
                   tie_embeddings=cfg.tie_embeddings, bias=cfg.bias, norm=cfg.norm, pos=cfg.pos)
    assert total(s) == GPT(cfg, backend="numpy").num_params()


def test_project_presets():
    # The 'cpu' preset: V 65, C 128, L 4, MLP 512, RMSNorm, RoPE, tied, no biases:
    #   wte 65*128 = 8,320; per layer 4*128*128 + 2*128*512 + 2*128 = 196,864, times 4 = 787,456; ln_f 128
    #   total 795,904 (README: "0.8M parameters")
    s = shape("cpu")
    assert (s.vocab_size, s.n_layer, s.d_model, s.ffn_hidden) == (65, 4, 128, 512)
    assert total(s) == 795_904
    assert shape("gpu-gpt2").vocab_size == 8192  # the BPE preset's vocabulary


def test_flops_per_token_by_hand():
    # 'cpu' preset: 6N = 6 * 795,904 = 4,775,424; 12*L*C*T = 12 * 4 * 128 * 128 = 786,432; sum 5,561,856
    assert calc.flops_per_token(795_904, 4, 128, 128) == 5_561_856
    # the same formula as the training loop's MFU
    from llmcore.train import flops_per_token

    cfg = GPTConfig(vocab_size=65, seq_len=128, n_layer=4, n_head=4, n_kv_head=4, d_model=128)
    assert flops_per_token(cfg, 795_904) == 5_561_856


def test_training_time_and_cost_by_hand():
    # 1e18 FLOPs on 2 GPUs of 1000 TFLOP/s at 50% MFU: 1e18 / (2 * 1e15 * 0.5) = 1000 s;
    # 2 GPUs * 1000/3600 h * $3.60 = $2.00
    assert calc.training_flops(1e9, 1e9) == 1e18
    seconds = calc.training_seconds(1e18, 1000.0, 0.5, 2)
    assert seconds == pytest.approx(1000.0)
    assert calc.training_cost(seconds, 2, 3.6) == pytest.approx(2.0)


def test_kv_cache_seed_table():
    # The seed: 32 query heads; MHA 100%, GQA-8 25%, MQA 1/32 = 3.125% ("3%").
    # Llama 3 8B per token: 2 * 32 layers * 8 K/V heads * 128 * 2 bytes = 131,072 B = 128 KiB
    s = shape("llama3-8b")
    assert calc.kv_cache_bytes_per_token(s.n_layer, s.n_kv_head, s.head_dim, 2) == 131_072
    rows = {r["attention"]: r for r in calc.kv_cache_table(s, 8192, 2)}
    assert list(rows) == ["MHA", "GQA-16", "GQA-8", "GQA-4", "GQA-2", "MQA"]  # the divisors of 32
    assert rows["MHA"]["percent_of_mha"] == 100.0
    assert rows["GQA-8"]["percent_of_mha"] == 25.0 and rows["GQA-8"]["this_model"]
    assert rows["MQA"]["percent_of_mha"] == 3.125
    assert rows["GQA-8"]["bytes_for_context"] == 131_072 * 8192  # 1 GiB


def test_chinchilla_by_hand():
    # 20 tokens per parameter; a budget C = 6ND with D = 20N is 120 N^2: C = 1.2e20 gives N = 1e9, D = 2e10
    assert calc.chinchilla_tokens(8e9) == 1.6e11
    n, d = calc.compute_optimal(1.2e20)
    assert n == pytest.approx(1e9) and d == pytest.approx(2e10)


def test_defaults_and_errors():
    assert calc.default_ffn_hidden(768, "gelu") == 3072
    assert calc.default_ffn_hidden(4096, "swiglu") == 11008  # int(8*4096/3) = 10922, up to a multiple of 256
    s = calc.resolve_shape(None, dict(n_layer=2, d_model=64, n_head=4, vocab_size=100, seq_len=16))
    assert s.n_kv_head == 4 and s.ffn_hidden == 256  # MHA and 4*d_model unless told
    with pytest.raises(ValueError, match="--n-kv-head"):
        calc.resolve_shape("llama3-8b", {"n_kv_head": 5})
    with pytest.raises(ValueError, match="missing --vocab-size, --seq-len"):
        calc.resolve_shape(None, dict(n_layer=2, d_model=64, n_head=4))


def test_humanised_units():
    assert calc.human_count(8_030_261_248) == "8.03 B"
    assert calc.human_bytes(131_072) == "128 KiB" and calc.human_bytes(2 ** 30) == "1 GiB"
    assert calc.human_flops(9.16e23) == "9.16e+23 FLOP (916 ZFLOP)"
    assert calc.human_seconds(2 * 86400) == "2 days"
    assert calc.human_dollars(1_286_368.4) == "$1,286,368"


def test_cli_seed_example(capsys):
    assert main(["calc", "--preset", "llama3-8b", "--tokens", "15T"]) == 0
    out = capsys.readouterr().out
    assert "8,030,261,248" in out and "published: 8.03 B" in out
    lines = {line.split()[0]: line for line in out.splitlines()[-15:] if line.startswith("  ")}
    assert lines["MHA"].split()[-1] == "100%"
    assert lines["GQA-8"].endswith("25%  <- this model")
    assert lines["MQA"].split()[-1] == "3.125%"
    assert "1,868 tokens per parameter" in out  # the seed's "nearly 2,000 tokens per parameter"
    # the same shape by numbers prints the same tables
    assert main(["calc", "--n-layer", "32", "--d-model", "4096", "--n-head", "32", "--n-kv-head", "8",
                 "--vocab-size", "128256", "--seq-len", "8192", "--ffn", "swiglu", "--ffn-hidden", "14336",
                 "--untie-embeddings", "--tokens", "15e12"]) == 0
    by_numbers = capsys.readouterr().out
    assert by_numbers.split("\n\n")[2:] == out.split("\n\n")[2:]


def test_cli_llama3_70b_and_json(capsys):
    assert main(["calc", "--preset", "llama3-70b"]) == 0
    out = capsys.readouterr().out
    assert "70,553,706,496" in out and "published: 70.6 B (computed is -0.07%)" in out
    assert "12.5%  <- this model" in out
    assert main(["calc", "--preset", "llama3-70b", "--json", "--compute", "1.2e20"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["params"]["total"] == 70_553_706_496
    assert rep["flops_per_token"]["total"] == 6 * 70_553_706_496 + 12 * 80 * 8192 * 8192
    assert rep["training"]["tokens"] == 20 * 70_553_706_496  # Chinchilla by default
    assert rep["chinchilla"]["compute"]["n_opt"] == pytest.approx(1e9)
    assert [r["percent_of_mha"] for r in rep["kv_cache"]["table"]][-1] == 100 / 64


@pytest.mark.parametrize("argv, message", [
    (["--preset", "cpu", "--mfu", "1.5"], "argument --mfu: expected a fraction in (0, 1]"),
    (["--preset", "cpu", "--tokens", "lots"], "argument --tokens: expected a positive count"),
    (["--preset", "cpu", "--n-layer", "0"], "argument --n-layer: expected a positive int"),
    (["--preset", "gpt5"], "argument --preset: invalid choice"),
    (["--preset", "cpu", "--ffn", "relu2"], "argument --ffn: invalid choice"),
])
def test_cli_bad_flags(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        main(["calc", *argv])
    assert exc.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--n-layer", "2"], "give --preset, or the model's sizes: missing --d-model, --n-head, --vocab-size, --seq-len"),
    (["--preset", "llama3-8b", "--n-kv-head", "5"], "--n-kv-head (5) must divide --n-head (32)"),
    (["--preset", "cpu", "--d-model", "130"], "--d-model (130) must be divisible by --n-head (4)"),
])
def test_cli_inconsistent_shape(capsys, argv, message):
    assert main(["calc", *argv]) == 2
    assert f"llmcore calc: error: {message}" in capsys.readouterr().err
