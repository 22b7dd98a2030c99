import contextlib
import io
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


def cli_subprocess(*args):
    """Run the real command line in a subprocess (exit codes and stdout/stderr as a user sees them)."""
    return subprocess.run([sys.executable, "-m", "qwen_gptq", *args], capture_output=True, text=True)


def cli(*args):
    """Run the command line in this process (no interpreter start-up per call): the same
    main() the console script runs, with its stdout, stderr and exit code captured."""
    from qwen_gptq.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse's own errors exit 2
            code = e.code if isinstance(e.code, int) else 2
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def w4(tmp_path_factory):
    """A w4g128 checkpoint through the CLI, sharded (--max-shard-size 10MB) to exercise the index."""
    out = tmp_path_factory.mktemp("w4") / "qwen2-tiny-w4"
    r = cli_subprocess("quantize", "--model_name_or_path", TINY, "--data_path", CALIB, "--out_path", str(out),
            "--bits", "4", "--group-size", "128", "--max_len", "512", "--num-samples", "128",
            "--max-shard-size", "10MB", "--json")
    assert r.returncode == 0, r.stderr
    return out, json.loads(r.stdout)


