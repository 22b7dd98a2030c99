"""The current Qwen generation: Qwen3-Next, Qwen3.5 (dense and MoE, vision-language and
text-only checkpoints), Qwen2.5-VL, Qwen3-VL (dense and MoE), on tiny fixtures."""

import json
import re

import pytest
import torch
import torch.nn.functional as F

from qwen_gptq import hf
from qwen_gptq.families import decoder_layers, family_for, layer_groups
from qwen_gptq.gptq import QuantConfig, rtn
from qwen_gptq.gptq_v1 import MIN_ZERO

from .conftest import CALIB, EVAL_TEXT, all_tensors, cli, quantize_cli, verify_cli
from .fixtures.make_families import FIXTURES, MTP_TENSORS, make_fixture

# What vLLM and every public quantized release expect (written here independently of the
# family table): quantized, and kept in 16 bits.
QUANTIZED = re.compile(r"(self_attn\.[qkvo]_proj|linear_attn\.(in_proj_qkvz|in_proj_qkv|in_proj_z|out_proj)"
                       r"|mlp\.(experts\.\d+\.|shared_expert\.)?(gate|up|down)_proj)$")
KEPT = re.compile(r"(linear_attn\.in_proj_(a|b|ba)|mlp\.gate|mlp\.shared_expert_gate)$")
LAYER = re.compile(r"^(model\.language_model\.layers|model\.layers)\.(\d+)\.(.+)$")
OUTSIDE = ("model.visual.", "visual.", "mtp.")


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """model_type -> (source, quantized output, report), made on first use."""
    made = {}

    def get(model_type, *extra):
        if model_type not in made:
            base = tmp_path_factory.mktemp(model_type)
            src = make_fixture(base / "src", model_type)
            out = base / "q"
            made[model_type] = (src, out, quantize_cli(src, out, "--num-samples", "4", "--max_len", "32", *extra))
        return made[model_type]

    return get


@pytest.mark.parametrize("model_type", sorted(FIXTURES))
def test_quantizes_the_language_model_and_keeps_the_rest(outputs, model_type):
    src, out, report = outputs(model_type)
    assert report["family"] == model_type and report["rtn_fallbacks"] == []
    source, stored = all_tensors(src), all_tensors(out)

    quantized = {k[: -len(".qweight")] for k in stored if k.endswith(".qweight")}
    for name in quantized:
        assert QUANTIZED.search(LAYER.match(name).group(3)), f"{name} should not be quantized"
    for k in source:
        m = LAYER.match(k[: -len(".weight")]) if k.endswith(".weight") else None
        if m is None:
            continue
        module = m.group(3)
        if QUANTIZED.search(module) and source[k].dim() == 2:
            assert any(q.endswith(f"layers.{m.group(2)}.{module}") for q in quantized), f"{k} was not quantized"
        if KEPT.search(module):
            assert not any(q.endswith(f"layers.{m.group(2)}.{module}") for q in quantized), f"{k} was quantized"
            assert any(s.endswith(f"layers.{m.group(2)}.{module}.weight") for s in stored), f"{k} is missing"
        if module.startswith("mlp.experts.") and source[k].dim() == 3:  # fused experts: one Linear each
            experts = {q for q in quantized if f"layers.{m.group(2)}.mlp.experts." in q}
            assert len(experts) == 3 * source[k].shape[0], (k, len(experts))
    if "layer_types" in FIXTURES[model_type][0]:  # hybrid: both kinds of layer were quantized
        assert any(".linear_attn." in q for q in quantized) and any(".self_attn." in q for q in quantized)

    # The vision tower and the multi-token-prediction tensors: byte for byte, under
    # transformers' names (older Qwen2.5-VL checkpoints say visual.*, transformers 5 model.visual.*).
    outside = [k for k in source if k.startswith(OUTSIDE)]
    assert bool(outside) == (FIXTURES[model_type][1] is not None or FIXTURES[model_type][2])
    for k in outside:
        name = "model." + k if k.startswith("visual.") else k
        assert stored[name].dtype == source[k].dtype and torch.equal(stored[name].view(torch.uint8),
                                                                     source[k].view(torch.uint8)), k
    if FIXTURES[model_type][2]:
        assert set(MTP_TENSORS) <= set(stored)

    config, original = json.loads((out / "config.json").read_text()), json.loads((src / "config.json").read_text())
    assert config["architectures"] == original["architectures"]
    assert {k: v for k, v in config.items() if k not in ("quantization_config", "torch_dtype", "dtype")} == \
           {k: v for k, v in original.items() if k not in ("torch_dtype", "dtype")}
    if FIXTURES[model_type][1] is not None:
        assert config["architectures"][0].endswith("ForConditionalGeneration")
        assert (out / "preprocessor_config.json").read_text() == (src / "preprocessor_config.json").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("model_type", sorted(FIXTURES))
def test_verifies_and_beats_round_to_nearest(tmp_path, model_type):
    """KL(original ‖ quantized) of our w4g128 below round-to-nearest's at the same settings."""
    src = make_fixture(tmp_path / "src", model_type)
    out = tmp_path / "q"
    quantize_cli(src, out, "--num-samples", "64", "--max_len", "256")
    code, report, err = verify_cli(out)
    assert code == 0, (report, err[-2000:])

    original, tok = hf.load_model(src, torch.float32)
    family = family_for(original.config.model_type)
    rounded, _ = hf.load_model(src, torch.float32)
    hf.prepare(rounded, family)
    cfg = QuantConfig(min_zero=MIN_ZERO)
    for layer in decoder_layers(rounded, family):
        for names in layer_groups(layer, family):
            for n in names:
                w = layer.get_submodule(n).weight
                w.data = rtn(w.data, cfg).weight.to(w.dtype)
    ours, _ = hf.load_quantized(out)
    ids = tok(open(EVAL_TEXT, encoding="utf-8").read()[:20000], add_special_tokens=False,
              return_tensors="pt")["input_ids"][:, :512].view(4, 128)
    with torch.no_grad():
        target = F.log_softmax(original(input_ids=ids).logits.float(), -1).flatten(0, 1)
        kl = {name: F.kl_div(F.log_softmax(m(input_ids=ids).logits.float(), -1).flatten(0, 1), target,
                             log_target=True, reduction="batchmean").item()
              for name, m in (("gptq", ours), ("rtn", rounded))}
    assert kl["gptq"] < kl["rtn"], kl


def test_a_partly_quantized_fused_module_is_named(outputs, tmp_path):
    """vLLM fuses in_proj_qkv and in_proj_z into one module: quantizing one alone is refused."""
    from safetensors.torch import save_file

    _, out, _ = outputs("qwen3_5_text")
    damaged = tmp_path / "d"
    damaged.mkdir()
    for f in out.iterdir():
        (damaged / f.name).write_bytes(f.read_bytes())
    tensors = all_tensors(damaged)
    name = "model.layers.0.linear_attn.in_proj_z"
    for leaf in ("qweight", "qzeros", "scales", "g_idx"):
        del tensors[f"{name}.{leaf}"]
    tensors[f"{name}.weight"] = torch.zeros(128, 128, dtype=torch.float16)
    save_file(tensors, str(damaged / "model.safetensors"), metadata={"format": "pt"})
    code, report, _ = verify_cli(damaged)
    structure = {c["name"]: c for c in report["checks"]}["structure"]
    assert code == 1 and any("linear_attn.in_proj_qkv quantized but linear_attn.in_proj_z not" in p
                             for p in structure["problems"]), structure


def test_qwen4_exp_is_refused_naming_what_is_missing(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "qwen4_exp"}))
    r = cli("quantize", "--model_name_or_path", model, "--data_path", CALIB, "--out_path", tmp_path / "o")
    assert r.returncode == 2 and "qwen4_exp" in r.stderr and "hyper-connections" in r.stderr
    assert not (tmp_path / "o").exists()


def test_image_parts_in_calibration_are_refused(tmp_path):
    data = tmp_path / "c.json"
    data.write_text(json.dumps([{"messages": [{"role": "user", "content": [
        {"type": "image", "image": "cat.png"}, {"type": "text", "text": "What is this?"}]}]}]))
    r = cli("quantize", "--model_name_or_path", "examples/qwen2-tiny", "--data_path", data, "--out_path", tmp_path / "o")
    assert r.returncode == 2 and "sample 0, messages[0]: field 'content' has image parts" in r.stderr
    data.write_text(json.dumps([{"messages": [{"role": "user", "content": [{"type": "text", "text": "Hello"},
                                                                          {"type": "text", "text": " there"}]}]}]))
    from qwen_gptq.calib import read_samples

    assert read_samples(data)[0].messages[1] == ("user", "Hello there")
