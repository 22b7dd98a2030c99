"""`qwen-gptq verify`: a clean checkpoint passes; each kind of damage fails with exit 1 and is named."""

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from qwen_gptq.cli import main

from .conftest import EVAL_TEXT, TINY, cli, cli_subprocess


def run_verify(capsys, *args):
    code = main(["verify", *map(str, args), "--json", "-q"])
    out = capsys.readouterr().out
    return code, (json.loads(out) if out.strip() else None)


def checks(report):
    return {c["name"]: c for c in report["checks"]}


@pytest.fixture
def damaged(w4, tmp_path):
    """A fresh copy of the w4 checkpoint to damage."""
    src, _ = w4
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def _shard_of(directory, key):
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    return directory / index["weight_map"][key]


def _edit_tensor(directory, key, fn):
    shard = _shard_of(directory, key)
    tensors = load_file(str(shard))
    fn(tensors)
    save_file(tensors, str(shard), metadata={"format": "pt"})


@pytest.mark.slow
def test_clean_checkpoint_passes_everything(w4, capsys):
    out, _ = w4
    code, report = run_verify(capsys, out, "--original", TINY, "--eval-text", EVAL_TEXT)
    assert code == 0, report
    c = checks(report)
    assert [x["status"] for x in report["checks"]] == ["pass", "pass", "pass", "pass"]
    assert c["structure"]["figures"]["quantized_linears"] == 42
    assert c["generate"]["figures"]["new_tokens"] > 0 and report["reply"]
    f = c["closeness"]["figures"]
    assert abs(f["ppl_original"] - 49.83) < 0.01
    assert f["ppl_increase_pct"] < 5 and f["top1_agreement"] > 0.8 and 0 < f["mean_kl"] < 0.2


@pytest.mark.slow
def test_strict_bounds_fail_with_exit_1(w4, capsys):
    out, _ = w4
    code, report = run_verify(capsys, out, "--original", TINY, "--eval-text", EVAL_TEXT, "--windows", "4",
                              "--max-ppl-increase", "0.01", "--min-top1", "0.999")
    assert code == 1
    problems = " ".join(checks(report)["closeness"]["problems"])
    assert "perplexity up" in problems and "top-1 agreement" in problems


def _damage_nan_scale(d):
    _edit_tensor(d, "model.layers.2.mlp.up_proj.scales", lambda t: t["model.layers.2.mlp.up_proj.scales"].view(-1)
                 .__setitem__(3, float("nan")))
    return "model.layers.2.mlp.up_proj.scales: NaN or Inf scales"


def _damage_missing_qzeros(d):
    _edit_tensor(d, "model.layers.1.self_attn.o_proj.qzeros", lambda t: t.pop("model.layers.1.self_attn.o_proj.qzeros"))
    index = json.loads((d / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.1.self_attn.o_proj.qzeros"]
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return "model.layers.1.self_attn.o_proj.qzeros is missing"


def _damage_truncated_shard(d):
    shard = _shard_of(d, "model.layers.3.mlp.down_proj.qweight")
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    return f"{shard.name}: unreadable"


def _damage_shard_missing_from_index(d):
    index = json.loads((d / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[-1]
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != victim}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return f"{victim} is not listed in model.safetensors.index.json"


def _damage_bits_in_config_only(d):
    config = json.loads((d / "config.json").read_text())
    config["quantization_config"]["bits"] = 8
    (d / "config.json").write_text(json.dumps(config))
    return "quantize_config.json and config.json disagree on bits: 4 vs 8"


@pytest.mark.slow
@pytest.mark.parametrize("damage", [_damage_nan_scale, _damage_missing_qzeros, _damage_truncated_shard,
                                    _damage_shard_missing_from_index, _damage_bits_in_config_only])
def test_damage_is_found_and_named(damaged, damage, capsys):
    expected = damage(damaged)
    code, report = run_verify(capsys, damaged)
    assert code == 1, report
    structure = checks(report)["structure"]
    assert structure["status"] == "fail"
    assert any(expected in p for p in structure["problems"]), structure["problems"]
    assert checks(report)["generate"]["status"] == "skip"


def test_bad_device_is_bad_input(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2", "quantization_config": {
        "quant_method": "gptq", "bits": 4, "group_size": 128}}))
    r = cli("verify", str(tmp_path), "--device", "tpu")
    assert r.returncode == 2 and "--device tpu" in r.stderr and "internal error" not in r.stderr


@pytest.mark.slow
def test_every_failure_says_what_is_wrong(damaged, capsys):
    """A structure check that stops early still names the problem in its one-line message."""
    config = json.loads((damaged / "config.json").read_text())
    for k in ("config.json", "quantize_config.json"):
        q = json.loads((damaged / k).read_text())
        (q.get("quantization_config", q))["bits"] = 5
        (damaged / k).write_text(json.dumps(q))
    (damaged / "model.safetensors.index.json").unlink()
    for shard in damaged.glob("model-*.safetensors"):
        shard.unlink()
    code, report = run_verify(capsys, damaged)
    assert code == 1
    structure = checks(report)["structure"]
    assert structure["status"] == "fail" and "bits 5 is not one of" in structure["message"]
    config["quantization_config"]["bits"] = 4
    (damaged / "config.json").write_text(json.dumps(config))
    (damaged / "quantize_config.json").write_text(json.dumps(config["quantization_config"]))
    code, report = run_verify(capsys, damaged)
    structure = checks(report)["structure"]
    assert code == 1 and "no model.safetensors or model.safetensors.index.json" in structure["message"]
    r = cli("verify", str(damaged))
    assert "FAIL  structure    " in r.stdout and "model.safetensors" in r.stdout.split("FAIL  structure")[1]


def test_not_a_checkpoint_is_bad_input(tmp_path):
    r = cli_subprocess("verify", str(tmp_path / "missing"))
    assert r.returncode == 2 and "no such directory" in r.stderr
    r = cli("verify", TINY)
    assert r.returncode == 2 and "not a GPTQ checkpoint" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_vllm_reads_what_it_needs(w4):
    """vLLM's GPTQ config parsing reads these keys with these types (vllm/model_executor/layers/quantization),
    and with `lm_head` absent or false it builds lm_head unquantized: so it must be stored as a plain weight."""
    out, _ = w4
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "gptq"
    assert type(q["bits"]) is int and q["bits"] in (4, 8)
    assert type(q["group_size"]) is int
    assert type(q["sym"]) is bool and type(q["desc_act"]) is bool
    assert "is_marlin_format" not in q
    assert q.get("lm_head", False) is False
    keys = set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"])
    assert "lm_head.weight" in keys and not any(k.startswith("lm_head.") and k != "lm_head.weight" for k in keys)


@pytest.mark.slow
def test_human_report_on_stdout(w4):
    out, _ = w4
    r = cli("verify", str(out), "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == f"verify {out}"
    assert "PASS  structure" in r.stdout and r.stdout.strip().endswith("OK")
    assert "qwen-gptq:" not in r.stdout  # logs go to stderr, the report alone to stdout
