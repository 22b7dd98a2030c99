"""Resume: a run killed after any layer and started again gives the uninterrupted output."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from qwen_gptq import calib, resume

from .conftest import CALIB, TINY, cli

ARGS = ("--model_name_or_path", TINY, "--data_path", CALIB, "--num-samples", "16", "--max_len", "128")
LAYERS = 6


def _quantize(out, *extra):
    """In this process (the kills below need a process of their own; the runs around them do not)."""
    return cli("quantize", *ARGS, "--out_path", out, *extra)


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
    _assert_same_output(out, uninterrupted)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # work and staging directories gone


def _assert_same_output(out, reference):
    names = sorted(p.name for p in reference.iterdir())
    assert sorted(p.name for p in out.iterdir()) == names
    for name in names:
        if name != "quant_log.csv":  # (its seconds column is wall time)
            assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    log = [line.split(",")[:4] + line.split(",")[5:] for line in (out / "quant_log.csv").read_text().splitlines()]
    full = [line.split(",")[:4] + line.split(",")[5:] for line in (reference / "quant_log.csv").read_text().splitlines()]
    assert log == full  # the same rows but for the seconds


def _out_of_memory_at(monkeypatch, target, name, when):
    """Make target.name raise the GPU's out-of-memory error on the calls `when` picks (by count)."""
    real, count = getattr(target, name), {"n": 0}

    def patched(*args, **kwargs):
        count["n"] += 1
        if when(count["n"]):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, patched)


@pytest.mark.slow
def test_out_of_gpu_memory_is_retried_to_the_same_output(uninterrupted, tmp_path, monkeypatch):
    """A pass or a solve that runs out of GPU memory once is retried after giving something
    up (said in the log), and the output is byte for byte the uninterrupted run's."""
    from qwen_gptq import pipeline

    _out_of_memory_at(monkeypatch, pipeline, "_measure", lambda n: n == 10)  # layer 2's first group (after the retry)
    _out_of_memory_at(monkeypatch, pipeline, "gptq_batch", lambda n: n == 6)  # layer 1's second solve
    out = tmp_path / "q"
    r = cli("quantize", *ARGS, "--out_path", out, "-q")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "layer 1: out of GPU memory while quantizing self_attn.o_proj" in r.stderr, r.stderr
    assert "layer 2: out of GPU memory while quantizing self_attn.q_proj" in r.stderr, r.stderr
    _assert_same_output(out, uninterrupted)


@pytest.mark.slow
def test_out_of_gpu_memory_that_persists_is_exit_1_and_resumable(uninterrupted, tmp_path, monkeypatch):
    """When nothing is left to give up: exit 1 naming the layer, the memory and the flags
    that help; no output, the finished layers kept; the same command then finishes the run
    (byte for byte the uninterrupted output)."""
    from qwen_gptq import pipeline

    real = pipeline._measure

    def measure(run, i, *args, **kwargs):
        if i == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return real(run, i, *args, **kwargs)

    monkeypatch.setattr(pipeline, "_measure", measure)
    out = tmp_path / "q"
    r = cli("quantize", *ARGS, "--out_path", out, "-q")
    assert r.returncode == 1
    for said in ("layer 3: the GPU ran out of memory while quantizing self_attn.q_proj", "Tried to allocate 2.00 GiB",
                 "cached GPU memory released", "--num-samples", "--max_len", "continues from layer 3"):
        assert said in r.stderr, (said, r.stderr[-2000:])
    assert "Traceback" not in r.stderr and not out.exists()
    assert sorted(p.name for p in resume.work_path(out).glob("layer-*")) == [f"layer-{k:05d}.safetensors"
                                                                           for k in range(3)]
    monkeypatch.undo()
    r = cli("quantize", *ARGS, "--out_path", out)
    assert r.returncode == 0 and "resuming at layer 3 of 6" in r.stderr, r.stderr[-2000:]
    _assert_same_output(out, uninterrupted)


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
    monkeypatch.setattr(calib, "AUTO_BATCH_TOKENS", 4096)  # a version of the tool with other auto batches
    r = cli("quantize", *small)
    assert r.returncode == 2 and "settings" in r.stderr
    monkeypatch.undo()
    assert (work / "layer-00000.safetensors").is_file()  # refused, not touched

    r = cli("quantize", *small, "--bits", "8", "--no-resume", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["settings"]["bits"] == 8 and not work.exists()


@pytest.mark.slow
def test_gptaq_run_resumes_to_the_same_output(uninterrupted, tmp_path, monkeypatch):
    """GPTAQ carries the full-precision model's activations too: a resumed run recomputes
    them through the finished layers' original weights, and ends byte for byte where an
    uninterrupted run does."""
    flags = ("--gptaq", "--act-group-aware", "--clip-weight", "loss")
    full = tmp_path / "full"
    r = cli("quantize", *ARGS, "--out_path", full, "-q", *flags)
    assert r.returncode == 0, r.stderr[-2000:]
    save = resume.WorkDir.save

    def crash_after_layer_2(self, i, tensors, stats):
        save(self, i, tensors, stats)
        if i == 2:
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(resume.WorkDir, "save", crash_after_layer_2)
    out = tmp_path / "q"
    assert cli("quantize", *ARGS, "--out_path", out, "-q", *flags).returncode == 1
    monkeypatch.undo()
    r = cli("quantize", *ARGS, "--out_path", out, *flags)
    assert r.returncode == 0 and "resuming at layer" in r.stderr, r.stderr[-2000:]
    _assert_same_output(out, full)
    assert (uninterrupted / "model.safetensors").read_bytes() != (full / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_activations_that_do_not_fit_in_host_memory_spill_to_files(uninterrupted, tmp_path, monkeypatch):
    """When the activations would not fit in host memory they live in memory-mapped spill
    files in the work directory (said in the log), gone at the end; same output bytes."""
    from qwen_gptq import runtime

    monkeypatch.setattr(runtime, "available_host_bytes", lambda: 1 << 20)  # "1 MiB available"
    seen = []
    save = resume.WorkDir.save

    def save_and_look(self, i, tensors, stats):
        seen.append(sorted(p.name for p in (self.path / "activations-0").iterdir()))
        save(self, i, tensors, stats)

    monkeypatch.setattr(resume.WorkDir, "save", save_and_look)
    out = tmp_path / "q"
    r = cli("quantize", *ARGS, "--out_path", out)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "do not fit in host memory" in r.stderr and "spill files" in r.stderr, r.stderr[-2000:]
    files = [f"batch-{j:05d}.bin" for j in range(len(seen[0]) if seen else 0)]  # one per calibration batch
    assert files and all(names == files for names in seen), seen
    _assert_same_output(out, uninterrupted)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]
