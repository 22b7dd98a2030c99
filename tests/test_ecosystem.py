"""Our output loads in the ecosystem: transformers' GPTQ path (optimum + gptqmodel) and AutoGPTQ itself.

Both need optional installs. .ci/run installs them and sets QWEN_GPTQ_REQUIRE_ECOSYSTEM=1,
which turns a missing install into a failure instead of a skip.
"""

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from qwen_gptq.hf import load_quantized

from .conftest import EVAL_TEXT, ROOT, TINY, cli, cli_subprocess, make_tiny, quantize_cli

REQUIRED = os.environ.get("QWEN_GPTQ_REQUIRE_ECOSYSTEM") == "1"


def _need(condition, why):
    if not condition:
        if REQUIRED:
            pytest.fail(f"QWEN_GPTQ_REQUIRE_ECOSYSTEM=1 but {why}")
        pytest.skip(why)


@pytest.mark.slow
@pytest.mark.ecosystem
def test_transformers_gptq_path_matches_our_loader(w4):
    _need(importlib.util.find_spec("gptqmodel") and importlib.util.find_spec("optimum"),
          "the gptqmodel extra is not installed")
    out, _ = w4
    r = cli_subprocess("verify", str(out), "--loader", "transformers", "--eval-text", EVAL_TEXT, "--max-new-tokens", "4",
            "--json", "-q")
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    check = {c["name"]: c for c in json.loads(r.stdout)["checks"]}["transformers"]
    assert check["status"] == "pass"
    assert check["figures"]["kernels"], check
    assert check["figures"]["relative_mean_abs_diff"] < 0.02
    assert check["figures"]["top1_agreement"] > 0.9


@pytest.mark.slow
@pytest.mark.ecosystem
def test_autogptq_loads_our_output(w4, tmp_path):
    python = os.environ.get("AUTOGPTQ_PYTHON")
    _need(python and Path(python).exists(), "AUTOGPTQ_PYTHON (a venv with auto-gptq==0.7.1) is not set")
    out, _ = w4
    model, tok = load_quantized(out)
    ids = tok(open(EVAL_TEXT, encoding="utf-8").read()[:2000], add_special_tokens=False,
              return_tensors="pt")["input_ids"][:, :128]
    torch.save(ids, tmp_path / "ids.pt")
    r = subprocess.run([python, str(ROOT / "scripts" / "autogptq_logits.py"), str(out), str(tmp_path / "ids.pt"),
                        str(tmp_path / "logits.pt")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    theirs = torch.load(tmp_path / "logits.pt")
    assert any("auto_gptq" in k for k in theirs["kernels"]), theirs["kernels"]
    with torch.no_grad():
        ours = model(input_ids=ids).logits[0].float()
    rel = ((theirs["logits"] - ours).abs().mean() / ours.std()).item()
    assert rel < 0.02, rel
    assert (theirs["logits"].argmax(-1) == ours.argmax(-1)).float().mean() > 0.9


@pytest.mark.slow
@pytest.mark.ecosystem
def test_qwen1_remote_code_through_transformers(tmp_path):
    """Qwen1's remote code: transformers loads the quantized directory with trust_remote_code."""
    _need(importlib.util.find_spec("gptqmodel"), "the gptqmodel extra is not installed")
    from .fixtures.make_qwen1 import make_qwen1

    src = make_qwen1(TINY, tmp_path / "qwen1")
    out = tmp_path / "q"
    quantize_cli(src, out, "--trust-remote-code", "--num-samples", "16", "--max_len", "128")
    r = cli_subprocess("verify", str(out), "--trust-remote-code", "--loader", "transformers", "--max-new-tokens", "4",
            "--json", "-q")
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.ecosystem
@pytest.mark.parametrize("model_type", ["qwen2_moe", "qwen3_moe"])
def test_moe_through_gptqmodel_and_transformers(tmp_path, model_type):
    """MoE output loads with GPTQModel.load and with transformers' from_pretrained.

    transformers 5 fuses experts into 3-D tensors; verify's transformers loader builds
    one Linear per expert while loading (defuser, as GPTQModel does) and keeps the
    shared-expert gate unquantized, then puts transformers' classes back.
    """
    _need(importlib.util.find_spec("gptqmodel"), "the gptqmodel extra is not installed")
    import transformers.models.qwen2_moe.modeling_qwen2_moe as qwen2_moe

    extra = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=128, decoder_sparse_step=1)
    if model_type == "qwen2_moe":
        extra["shared_expert_intermediate_size"] = 256
    src = make_tiny(tmp_path / "src", model_type, **extra)
    out = tmp_path / "q"
    quantize_cli(src, out, "--num-samples", "16", "--max_len", "128")
    block = qwen2_moe.Qwen2MoeSparseMoeBlock
    for loader in ("gptqmodel", "transformers"):
        r = cli("verify", str(out), "--loader", loader, "--max-new-tokens", "4", "--json", "-q")
        assert r.returncode == 0, r.stdout + r.stderr[-3000:]
        check = {c["name"]: c for c in json.loads(r.stdout)["checks"]}[loader]
        assert check["figures"]["relative_mean_abs_diff"] < 0.02 and check["figures"]["kernels"], check
    assert qwen2_moe.Qwen2MoeSparseMoeBlock is block  # transformers' own class is back


@pytest.mark.slow
@pytest.mark.ecosystem
@pytest.mark.parametrize("model_type,loaders", [
    ("qwen3_next", {"gptqmodel": "pass", "transformers": "pass"}),
    ("qwen3_5_text", {"gptqmodel": "pass", "transformers": "pass"}),
    ("qwen3_5_moe_text", {"gptqmodel": "pass", "transformers": "skip"}),
    ("qwen3_5", {"gptqmodel": "pass" if importlib.util.find_spec("torchvision") else "skip", "transformers": "pass"}),
])
def test_current_families_through_gptqmodel_and_transformers(tmp_path, model_type, loaders):
    """Hybrid Qwen3-Next / Qwen3.5 output loads where the loaders support the family, with
    logits close to our loader's; where one does not (GPTQModel needs torchvision for a
    vision-language checkpoint's processor; defuser cannot split Qwen3.5-MoE experts for
    transformers), the check is skipped and says why."""
    _need(importlib.util.find_spec("gptqmodel"), "the gptqmodel extra is not installed")
    from .fixtures.make_families import make_fixture

    src = make_fixture(tmp_path / "src", model_type)
    out = tmp_path / "q"
    quantize_cli(src, out, "--num-samples", "16", "--max_len", "128")
    for loader, status in loaders.items():
        r = cli("verify", str(out), "--loader", loader, "--max-new-tokens", "4", "--json", "-q")
        check = {c["name"]: c for c in json.loads(r.stdout)["checks"]}[loader]
        assert r.returncode == 0 and check["status"] == status, (loader, check, r.stderr[-2000:])
        if status == "pass":
            assert check["figures"]["relative_mean_abs_diff"] < 0.02 and check["figures"]["kernels"], check
        else:
            assert "cannot load this family here" in check["message"], check
