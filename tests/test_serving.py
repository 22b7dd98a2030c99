"""vLLM's loading rules without vLLM: the serving check, quantize's warnings, --pad-for-tp."""

import json

import pytest
import torch

from qwen_gptq import hf, serving
from qwen_gptq.families import decoder_layers, family_for

from .conftest import CALIB, EVAL_TEXT, TINY, cli, verify_cli

SMALL = ("--num-samples", "2", "--max_len", "32")


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    made = {}

    def get(name, *extra):
        if name not in made:
            out = tmp_path_factory.mktemp(name) / "q"
            r = cli("quantize", "--model_name_or_path", TINY, "--data_path", CALIB, "--out_path", out, *SMALL, *extra)
            assert r.returncode == 0, r.stderr[-2000:]
            made[name] = (out, r.stderr)
        return made[name]

    return get


def _serving(report):
    return {c["name"]: c for c in report["checks"]}["serving"]


@pytest.mark.slow
@pytest.mark.parametrize("name,extra,tp_sizes", [
    ("w4", (), [1]),  # intermediate 1408 = 11 groups of 128: not TP-2-aligned
    ("w8", ("--bits", "8"), [1]),
    ("w4-pad2", ("--pad-for-tp", "2"), [1, 2, 4]),  # 1536 = 2 x 768 (and 4 x 384): both split into 128s
    # the quality levers change no format rule (g_idx stays in order, no new config keys)
    ("w4-levers", ("--gptaq", "--act-group-aware", "--clip-weight", "loss"), [1]),
])
def test_loadable_and_tensor_parallel_sizes(outputs, name, extra, tp_sizes):
    out, err = outputs(name, *extra)
    if not extra or extra[0] == "--bits":  # quantize said so before starting
        assert "vLLM will load the output at tensor-parallel sizes [1] only" in err and "--pad-for-tp" in err
    code, report, _ = verify_cli(out)
    check = _serving(report)
    assert code == 0 and check["status"] == "pass"
    assert check["figures"]["vllm"] == {"loads": True, "tp_sizes": tp_sizes}
    if tp_sizes == [1]:
        assert "mlp.down_proj: input 704 per GPU at TP 2 is not a multiple of 128" in check["message"]
        code, report, _ = verify_cli(out, "--serve", "vllm", "--tp", "2")
        assert code == 1 and "at tensor parallelism 2" in _serving(report)["problems"][0]
    if name == "w4-levers":  # not a key more in the configs
        plain, _ = outputs("w4")
        for f in ("quantize_config.json", "config.json"):
            assert (out / f).read_text() == (plain / f).read_text(), f


@pytest.mark.slow
@pytest.mark.parametrize("name,extra", [("w3", ("--bits", "3")), ("asym", ("--asym",))])
def test_not_loadable_passes_by_default_and_fails_when_asked(outputs, name, extra):
    out, err = outputs(name, *extra)
    assert "vLLM will not load the output" in err
    code, report, _ = verify_cli(out)
    check = _serving(report)
    assert code == 0 and check["status"] == "pass" and check["figures"]["vllm"] == {"loads": False, "tp_sizes": []}
    assert "vLLM would not load it" in check["message"] and "--serve vllm" in check["message"]
    code, report, _ = verify_cli(out, "--serve", "vllm")
    assert code == 1 and _serving(report)["status"] == "fail"
    assert "Marlin" in _serving(report)["problems"][0]


def test_quantized_router_and_misaligned_shapes_are_named():
    q = {"bits": 4, "sym": True, "group_size": 128}
    router = serving.Linear("model.layers.3.mlp.gate", 2048, 128)
    report = serving.vllm_report(q, [router])
    assert not report.loads and "model.layers.3.mlp.gate is quantized" in report.problems[0]
    odd = serving.Linear("model.layers.0.self_attn.o_proj", 1000, 512)
    report = serving.vllm_report(q, [odd])
    assert not report.loads and "model.layers.0.self_attn.o_proj" in report.problems[0]
    # k/v projections with fewer KV heads than GPUs are replicated, one head per GPU
    kv = serving.Linear("model.layers.0.self_attn.k_proj", 512, 128)
    assert serving.vllm_report(q, [kv], kv_heads=2).tp_sizes == [1, 2, 4, 8]
    assert serving.padded_size(29568, 2, 128) == 29696  # Qwen2.5-72B, as Qwen's own GPTQ releases padded it
    assert serving.padded_size(1408, 4, 128) == 1536


def test_padding_computes_the_same_function():
    model, tok = hf.load_model(TINY, torch.float32)
    ids = tok(open(EVAL_TEXT, encoding="utf-8").read()[:3000], add_special_tokens=False,
              return_tensors="pt")["input_ids"][:, :256]
    with torch.no_grad():
        before = model(input_ids=ids).logits
        changed = hf.pad_mlps(decoder_layers(model, family_for("qwen2")), lambda n: serving.padded_size(n, 4, 128))
        after = model(input_ids=ids).logits
    assert changed == {"intermediate_size": 1536}
    assert model.model.layers[0].mlp.down_proj.weight.shape == (512, 1536)
    assert (after - before).abs().max().item() <= 1e-5


@pytest.mark.slow
def test_padded_quantization_is_as_good_and_loads(tmp_path, w4_ppl):
    """--pad-for-tp 4 against the plain run at the same settings (the session's w4 checkpoint)."""
    from qwen_gptq.evaluate import eval_windows, perplexity

    out = tmp_path / "pad4"
    r = cli("quantize", "--model_name_or_path", TINY, "--data_path", CALIB, "--out_path", out,
            "--num-samples", "128", "--max_len", "512", "-q", "--pad-for-tp", "4")
    assert r.returncode == 0, r.stderr[-2000:]
    model, tok = hf.load_quantized(out)
    padded = perplexity(model, eval_windows(tok, open(EVAL_TEXT, encoding="utf-8").read(), 64, 512))
    assert abs(padded - w4_ppl) <= 0.1, (padded, w4_ppl)
    assert json.loads((tmp_path / "pad4" / "config.json").read_text())["intermediate_size"] == 1536
