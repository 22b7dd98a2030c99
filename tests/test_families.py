"""Every Qwen generation: Qwen1 (remote code), Qwen3 (tied and untied), Qwen2-MoE and Qwen3-MoE."""

import json

import pytest
import torch
from safetensors import safe_open

from qwen_gptq.families import FAMILIES, family_for
from qwen_gptq.hf import UnfusedExperts, load_model, load_quantized, unfuse_experts

from .conftest import CALIB, EVAL_TEXT, TINY, cli, make_tiny
from .conftest import quantize_cli as quantize
from .conftest import verify_cli as verify
from .fixtures.make_qwen1 import CODE_FILES, make_qwen1


def load_original(directory, **kw):
    return load_model(directory, torch.float32, **kw)


def keys(directory):
    with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
        return set(f.keys())


# ----------------------------------------------------------------------------- Qwen1


@pytest.fixture(scope="module")
def qwen1(tmp_path_factory):
    return make_qwen1(TINY, tmp_path_factory.mktemp("qwen1") / "qwen1-tiny")


def test_qwen1_fixture_computes_what_qwen2_tiny_computes(qwen1):
    q1, _ = load_original(qwen1, trust_remote_code=True)
    q2, tok = load_original(TINY)
    ids = tok("The kernel schedules threads on every CPU.", add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(q1(input_ids=ids).logits, q2(input_ids=ids).logits, atol=1e-4)


def test_qwen1_needs_trust_remote_code(qwen1, tmp_path):
    r = cli("quantize", "--model_name_or_path", str(qwen1), "--data_path", CALIB, "--out_path", str(tmp_path / "o"))
    assert r.returncode == 2 and "--trust-remote-code" in r.stderr and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_qwen1_quantize_verify_chat(qwen1, tmp_path):
    out = tmp_path / "qwen1-w4"
    report = quantize(qwen1, out, "--trust-remote-code", "--num-samples", "64", "--max_len", "512")
    assert report["family"] == "qwen"
    names = {p.name for p in out.iterdir()}
    assert set(CODE_FILES) | {"qwen.tiktoken", "generation_config.json", "tokenizer_config.json"} <= names
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_qwen.QWenLMHeadModel"
    assert config["quantization_config"] == json.loads((out / "quantize_config.json").read_text())
    k = keys(out)
    for i in range(6):
        for lin in ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj"):
            assert f"transformer.h.{i}.{lin}.qweight" in k
        assert f"transformer.h.{i}.attn.c_attn.bias" in k and f"transformer.h.{i}.attn.c_proj.bias" not in k

    code, rep, err = verify(out)
    assert code == 2 and "--trust-remote-code" in err  # never runs shipped code silently
    code, rep, err = verify(out, "--trust-remote-code", "--original", str(qwen1), "--eval-text", EVAL_TEXT,
                            "--windows", "16")
    assert code == 0, (rep, err[-2000:])
    close = {c["name"]: c for c in rep["checks"]}["closeness"]["figures"]
    # The same bound as qwen2-tiny's w4 (51.3 / 49.83 = +2.95%), relative to its own original.
    assert close["ppl_increase_pct"] < 3.5, close

    model, tok = load_quantized(out, trust_remote_code=True)
    response, history = model.chat(tok, "你好", history=None)
    assert isinstance(response, str) and response and history == [("你好", response)]


# ----------------------------------------------------------------------------- tiny random models


def _logit_cosine(original, quantized):
    ids = torch.arange(3, 67).view(1, -1)
    with torch.no_grad():
        a = original(input_ids=ids).logits.flatten().float()
        b = quantized(input_ids=ids).logits.flatten().float()
    return torch.nn.functional.cosine_similarity(a, b, dim=0).item()


@pytest.mark.parametrize("tied", [False, True])
def test_qwen3(tmp_path, tied):
    src = make_tiny(tmp_path / "src", "qwen3", tied=tied)
    out = tmp_path / "q"
    report = quantize(src, out, "--num-samples", "16", "--max_len", "128")
    assert report["family"] == "qwen3"
    k = keys(out)
    assert "model.layers.0.self_attn.q_norm.weight" in k and "model.layers.0.self_attn.k_norm.weight" in k
    assert "model.layers.0.self_attn.q_proj.qweight" in k and "model.layers.0.self_attn.q_proj.bias" not in k
    assert ("lm_head.weight" in k) is (not tied)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is tied
    code, rep, err = verify(out)
    assert code == 0, (rep, err[-2000:])
    model, _ = load_quantized(out)
    if tied:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    original, _ = load_original(src)
    assert _logit_cosine(original, model) > 0.95


@pytest.mark.parametrize("model_type", ["qwen2_moe", "qwen3_moe"])
def test_moe(tmp_path, model_type):
    extra = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=128, decoder_sparse_step=1,
                 norm_topk_prob=True)
    if model_type == "qwen2_moe":
        extra["shared_expert_intermediate_size"] = 256
    src = make_tiny(tmp_path / "src", model_type, **extra)
    out = tmp_path / "q"
    report = quantize(src, out, "--num-samples", "16", "--max_len", "128")
    assert report["family"] == model_type and report["rtn_fallbacks"] == []
    k = keys(out)
    for e in range(4):
        for lin in ("gate_proj", "up_proj", "down_proj"):
            assert f"model.layers.1.mlp.experts.{e}.{lin}.qweight" in k
    assert "model.layers.0.mlp.gate.weight" in k  # the router stays in full precision
    assert not any(n.endswith("gate.qweight") and ".experts." not in n and "shared" not in n and "gate_proj" not in n
                   for n in k)
    if model_type == "qwen2_moe":
        assert "model.layers.0.mlp.shared_expert.down_proj.qweight" in k
        assert "model.layers.0.mlp.shared_expert_gate.weight" in k
    code, rep, err = verify(out)
    assert code == 0, (rep, err[-2000:])
    model, _ = load_quantized(out)
    assert isinstance(model.model.layers[0].mlp.experts, UnfusedExperts)
    original, _ = load_original(src)
    assert _logit_cosine(original, model) > 0.95


def test_unfused_experts_match_fused(tmp_path):
    """Splitting transformers' fused expert tensors into Linears changes nothing numerically."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("qwen3_moe", hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=32, vocab_size=100,
                                  num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        assert unfuse_experts(model) == 1
        after = model(input_ids=ids).logits
        model.model.layers[0].mlp.experts.calibrate_all = True  # every expert computes every token
        every = model(input_ids=ids).logits
    assert torch.allclose(before, after, atol=1e-5)
    assert torch.allclose(before, every, atol=1e-5)  # ...but the output keeps the real routing


def test_expert_without_tokens_falls_back_to_rtn(tmp_path):
    src = make_tiny(tmp_path / "src", "qwen3_moe", num_experts=16, num_experts_per_tok=1, moe_intermediate_size=128,
                    decoder_sparse_step=1)
    out = tmp_path / "q"
    r = cli("quantize", "--model_name_or_path", src, "--data_path", CALIB, "--out_path", out, "--json",
            "--num-samples", "1", "--max_len", "4")
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout)
    assert report["rtn_fallbacks"], report
    assert all(".mlp.experts." in name for name in report["rtn_fallbacks"])
    # One warning per layer and group, with the count and the first few named, not one per Linear
    warned = [line for line in r.stderr.splitlines() if "saw no calibration tokens" in line]
    per_group: dict[tuple[str, str], int] = {}
    for name in report["rtn_fallbacks"]:
        layer, _, module = name.partition(".")
        key = (layer, "down_proj" if module.endswith("down_proj") else "gate/up")
        per_group[key] = per_group.get(key, 0) + 1
    assert len(warned) == len(per_group), warned
    for (layer, _), n in per_group.items():
        assert any(f"layer {layer}: {n} Linears saw no calibration tokens and were quantized with round-to-nearest: "
                   in line for line in warned), (layer, n, warned)
    assert all(line.count("mlp.experts.") <= 6 for line in warned)
    log = (out / "quant_log.csv").read_text()
    assert ",rtn" in log
    k = keys(out)
    assert all(f"model.layers.0.mlp.experts.{e}.down_proj.qweight" in k for e in range(16))
    code, rep, err = verify(out)
    assert code == 0, (rep, err[-2000:])
    report = quantize(src, tmp_path / "all", "--num-samples", "1", "--max_len", "4", "--moe-calibrate-all-experts")
    assert report["rtn_fallbacks"] == []
    assert ",rtn" not in (tmp_path / "all" / "quant_log.csv").read_text()


def _tokens_per_module(out):
    import csv

    with open(out / "quant_log.csv", newline="") as f:
        return {(r["layer"], r["module"]): int(r["tokens"]) for r in csv.DictReader(f)}


@pytest.mark.slow
@pytest.mark.parametrize("every_expert", [False, True])
def test_padding_stays_out_of_the_experts_hessians(tmp_path, every_expert):
    """Padded batches (--batch-size 4, samples of different lengths): the experts' Hessians
    count the very tokens they count one sample at a time, routed or (all experts) not. (Past
    layer 0 a token's routing may flip with the float order of earlier layers; each layer's
    routed rows still add up to top-k per real token.)"""
    src = make_tiny(tmp_path / "src", "qwen3_moe", num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1)
    extra = ["--num-samples", "6", "--max_len", "1024"] + (["--moe-calibrate-all-experts"] if every_expert else [])
    one = quantize(src, tmp_path / "b1", "--batch-size", "1", *extra)
    four = quantize(src, tmp_path / "b4", "--batch-size", "4", *extra)
    assert one["tokens"] == four["tokens"]
    a, b = _tokens_per_module(tmp_path / "b1"), _tokens_per_module(tmp_path / "b4")
    first = [k for k in a if ".experts." in k[1] and k[0] == "0"]
    assert first and all(a[k] == b[k] for k in first), [(k, a[k], b[k]) for k in first if a[k] != b[k]]
    for layer in {k[0] for k in b}:
        gates = [n for (i, m), n in b.items() if i == layer and ".experts." in m and m.endswith("gate_proj")]
        assert (gates == [one["tokens"]] * 4) if every_expert else (sum(gates) == 2 * one["tokens"]), (layer, gates)


def test_models_lists_every_family():
    r = cli("models", "--json")
    assert r.returncode == 0
    listed = {f["family"] for f in json.loads(r.stdout)}
    assert listed == {f.name for f in FAMILIES} == {"qwen", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "qwen3_next",
                                                    "qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text",
                                                    "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"}
    assert family_for("qwen2").layers == "model.layers"
