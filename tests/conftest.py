import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("QWEN_GPTQ_SHARED", ROOT.parent / "shared"))
# The shipped example model (a copy of shared/models/qwen2-tiny) keeps the tests
# runnable without ../shared; calibration and eval data come from examples/ too.
TINY = str(ROOT / "examples" / "qwen2-tiny")
CALIB = str(ROOT / "examples" / "calib.json")
EVAL_TEXT = str(ROOT / "examples" / "eval.txt")


def cli(*args, cwd=None):
    """Run the real command line in a subprocess (exit codes and stdout/stderr as a user sees them)."""
    return subprocess.run([sys.executable, "-m", "qwen_gptq", *args], capture_output=True, text=True, cwd=cwd)


@pytest.fixture(scope="session")
def w4(tmp_path_factory):
    """A w4g128 checkpoint through the CLI, sharded (--max-shard-size 10MB) to exercise the index."""
    out = tmp_path_factory.mktemp("w4") / "qwen2-tiny-w4"
    r = cli("quantize", "--model_name_or_path", TINY, "--data_path", CALIB, "--out_path", str(out),
            "--bits", "4", "--group-size", "128", "--max_len", "512", "--num-samples", "128",
            "--max-shard-size", "10MB", "--json")
    assert r.returncode == 0, r.stderr
    return out, json.loads(r.stdout)


