"""Resume: a run killed after any layer and started again gives the uninterrupted output."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from qwen_gptq import resume

from .conftest import CALIB, TINY, cli

ARGS = ("--model_name_or_path", TINY, "--data_path", CALIB, "--num-samples", "16", "--max_len", "128")
LAYERS = 6


def _quantize(out, *extra):
    return subprocess.run([sys.executable, "-m", "qwen_gptq", "quantize", *ARGS, "--out_path", str(out), *extra],
                          capture_output=True, text=True)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "q"
    r = _quantize(out, "-q")
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def _kill_after_layer(out, k):
    """Start a run and SIGKILL it as soon as layer k is in its work directory."""
    proc = subprocess.Popen([sys.executable, "-m", "qwen_gptq", "quantize", *ARGS, "--out_path", str(out), "-q"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = resume.work_path(out) / f"layer-{k:05d}.safetensors"
    deadline = time.monotonic() + 300
    while not done.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"


@pytest.mark.slow
@pytest.mark.parametrize("k", [0, LAYERS // 2, LAYERS - 1])
def test_killed_run_resumes_to_identical_bytes(uninterrupted, tmp_path, k):
    out = tmp_path / "q"
    _kill_after_layer(out, k)
    assert not out.exists()  # nothing that looks complete
    assert resume.work_path(out).is_dir()
    r = _quantize(out)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming at layer" in r.stderr or "resuming: all 6 layers are finished" in r.stderr
    names = sorted(p.name for p in uninterrupted.iterdir())
    assert sorted(p.name for p in out.iterdir()) == names
    for name in names:
        if name != "quant_log.csv":  # (its seconds column is wall time)
            assert (out / name).read_bytes() == (uninterrupted / name).read_bytes(), name
    log = [line.split(",")[:4] + line.split(",")[5:] for line in (out / "quant_log.csv").read_text().splitlines()]
    full = [line.split(",")[:4] + line.split(",")[5:] for line in (uninterrupted / "quant_log.csv").read_text().splitlines()]
    assert log == full  # the same rows but for the seconds
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # work and staging directories gone


@pytest.mark.slow
def test_stale_work_is_refused_and_no_resume_starts_over(tmp_path, monkeypatch):
    """A failure keeps the finished layers; a changed setting or data file is refused
    (exit 2, saying how to start over); --no-resume starts over."""
    save = resume.WorkDir.save

    def fail_after_first_layer(self, i, packed, stats):
        save(self, i, packed, stats)
        raise RuntimeError("simulated crash")

    out = tmp_path / "q"
    small = ("--model_name_or_path", TINY, "--data_path", CALIB, "--num-samples", "2", "--max_len", "32",
             "--out_path", out, "-q")
    monkeypatch.setattr(resume.WorkDir, "save", fail_after_first_layer)
    assert cli("quantize", *small).returncode == 1
    monkeypatch.undo()
    work = resume.work_path(out)
    assert (work / "layer-00000.safetensors").is_file() and not out.exists()

    r = cli("quantize", *small, "--bits", "8")
    assert r.returncode == 2 and "settings" in r.stderr and "--no-resume" in r.stderr
    other = tmp_path / "other.json"
    other.write_text(json.dumps(json.loads(open(CALIB).read())[::-1]))
    r = cli("quantize", *small[:2], "--data_path", other, *small[4:])
    assert r.returncode == 2 and "data" in r.stderr
    assert (work / "layer-00000.safetensors").is_file()  # refused, not touched

    r = cli("quantize", *small, "--bits", "8", "--no-resume", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["settings"]["bits"] == 8 and not work.exists()
