"""`qwen-gptq bench`: on a CPU, the weights' memory of each precision (speed needs a GPU)."""

import importlib.util
import json

import pytest

from .conftest import CALIB, TINY, cli
from .test_ecosystem import _need


@pytest.mark.slow
def test_bench_reports_memory_per_precision_and_plots_it(tmp_path):
    _need(importlib.util.find_spec("gptqmodel") is not None, "gptqmodel is not installed")
    _need(importlib.util.find_spec("matplotlib") is not None, "matplotlib (the plot extra) is not installed")
    out = tmp_path / "int4"
    r = cli("quantize", "--model_name_or_path", TINY, "--data_path", CALIB, "--out_path", out, "--method", "rtn",
            "--num-samples", "2", "--max_len", "16", "--device", "cpu", "-q")
    assert r.returncode == 0, r.stderr[-2000:]
    png = tmp_path / "table.png"
    r = cli("bench", out, "--original", TINY, "--device", "cpu", "--plot", png, "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(r.stdout)
    rows = {m["precision"]: m for m in report["models"]}
    assert set(rows) == {"bf16", "int4"}
    # qwen2-tiny: 6 layers of 4-bit Linears plus 16-bit embeddings, lm_head and norms.
    assert 0.3 < rows["int4"]["weights_gb"] / rows["bf16"]["weights_gb"] < 0.7, rows
    assert "QuantLinear" in rows["int4"]["kernel"] or "Linear" in rows["int4"]["kernel"], rows["int4"]
    assert "memory only" in report["note"] and "batches" not in rows["int4"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_refuses_bad_input(tmp_path):
    r = cli("bench", tmp_path / "nothing")
    assert r.returncode == 2 and "not a model directory" in r.stderr, r.stderr
    r = cli("bench", TINY, "--batch", "0")
    assert r.returncode == 2 and "--batch 0" in r.stderr, r.stderr
