"""Developer scripts whose output decisions rest on: checked on inputs with known answers."""

import gzip
import json
import subprocess
import sys

import pytest

from .conftest import ROOT


def test_trace_summary_finds_the_gap_the_held_launch_and_the_collective(tmp_path):
    """A synthetic layer trace: the main stream idles 5 ms between two kernels, a main-thread
    launch overlaps another thread's 4 ms pageable copy for 3 ms, an NCCL kernel runs 1 ms,
    a named span of the main thread twice (2.5 ms together), and one whose operations fill
    3.5 of its 10 ms (6.5 ms between them)."""
    X = "X"
    events = [
        {"ph": X, "cat": "cpu_op", "name": "aten::mm", "tid": 1, "ts": 0, "dur": 10000},
        {"ph": X, "cat": "cpu_op", "name": "aten::cat", "tid": 1, "ts": 5800, "dur": 100},
        {"ph": X, "cat": "cuda_runtime", "name": "cudaMemcpyAsync", "tid": 2, "ts": 1000, "dur": 4000},
        {"ph": X, "cat": "cuda_runtime", "name": "cudaLaunchKernel", "tid": 1, "ts": 1500, "dur": 3000,
         "args": {"correlation": 7}},
        {"ph": X, "cat": "cuda_runtime", "name": "cudaLaunchKernel", "tid": 1, "ts": 5850, "dur": 10,
         "args": {"correlation": 8}},
        {"ph": X, "cat": "kernel", "name": "gemm", "tid": 7, "ts": 0, "dur": 1000, "args": {"correlation": 7}},
        {"ph": X, "cat": "kernel", "name": "cat_kernel", "tid": 7, "ts": 6000, "dur": 1000, "args": {"correlation": 8}},
        {"ph": X, "cat": "kernel", "name": "ncclDevKernel_AllReduce", "tid": 7, "ts": 7000, "dur": 1000, "args": {}},
        {"ph": X, "cat": "user_annotation", "name": "solve q_proj", "tid": 1, "ts": 0, "dur": 2000},
        {"ph": X, "cat": "user_annotation", "name": "solve q_proj", "tid": 1, "ts": 3000, "dur": 500},
        {"ph": X, "cat": "user_annotation", "name": "write back", "tid": 2, "ts": 0, "dur": 900},  # (not the main thread)
        {"ph": X, "cat": "user_annotation", "name": "measure o_proj", "tid": 1, "ts": 20000, "dur": 10000},
        {"ph": X, "cat": "cpu_op", "name": "aten::empty", "tid": 1, "ts": 20000, "dur": 2000},
        {"ph": X, "cat": "cpu_op", "name": "aten::zero_", "tid": 1, "ts": 21000, "dur": 500},  # (inside the last)
        {"ph": X, "cat": "cpu_op", "name": "aten::mm", "tid": 1, "ts": 25000, "dur": 1000},
        {"ph": X, "cat": "cpu_op", "name": "aten::mm", "tid": 1, "ts": 29500, "dur": 1500},  # (half outside)
    ]
    trace = tmp_path / "t.rank0.json.gz"
    with gzip.open(trace, "wt") as f:
        json.dump({"traceEvents": events}, f)
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "trace_summary.py"), str(trace), "--json"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["gaps_ms"] == 5.0 and s["largest_gaps"][0]["launched_from"] == "aten::mm > aten::cat"
    assert s["main_thread_held_by_other_threads_copies_ms"] == 3.0
    assert s["nccl_ms"] == 1.0 and s["busy_s"] == {"7": 0.003} and s["span_s"] == 0.031
    assert s["phase_ms"] == {"solve q_proj": 2.5, "measure o_proj": 10.0}
    assert s["between_ops_ms"] == {"solve q_proj": 0.0, "measure o_proj": 6.5}  # (10 ms, ops 2 + 1 + 0.5 of it)


@pytest.mark.slow  # (two interpreters importing torch: 6 s)
def test_make_deep_copy_repeats_layer_zero_and_refuses_a_deeper_source(tmp_path):
    """scripts/make_deep_copy.py: a 1-layer model becomes 3 layers, each with layer 0's very
    bytes, the config saying 3; a model of more than one layer is refused."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from .conftest import TINY

    src = tmp_path / "one"
    src.mkdir()
    config = json.loads((ROOT / TINY / "config.json").read_text())
    config["num_hidden_layers"] = 1
    (src / "config.json").write_text(json.dumps(config))
    kept = {}
    for shard in sorted((ROOT / TINY).glob("*.safetensors")):  # (the example is sharded)
        with safe_open(str(shard), "pt") as f:
            kept.update({k: f.get_tensor(k) for k in f.keys()
                         if not k.startswith("model.layers.") or k.startswith("model.layers.0.")})
    save_file(kept, str(src / "model.safetensors"), metadata={"format": "pt"})
    script = str(ROOT / "scripts" / "make_deep_copy.py")
    r = subprocess.run([sys.executable, script, str(src), str(tmp_path / "three"), "3"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "three" / "config.json").read_text())["num_hidden_layers"] == 3
    with safe_open(str(tmp_path / "three" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        for k, t in kept.items():
            copies = [k.replace(".0.", f".{i}.", 1) for i in range(3)] if k.startswith("model.layers.0.") else [k]
            for c in copies:
                assert torch.equal(f.get_tensor(c), t), c
    assert len(names) == len(kept) + 2 * sum(k.startswith("model.layers.0.") for k in kept)
    r = subprocess.run([sys.executable, script, TINY, str(tmp_path / "x"), "3"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0 and "expected a 1-layer model" in r.stderr and not (tmp_path / "x").exists()


@pytest.mark.slow
def test_bench_shared_inverse_reports_every_setting_and_the_shared_hinv_is_the_one_alone():
    """scripts/bench_shared_inverse.py under torchrun (2 gloo processes, sizes that split
    once and twice): a line per size and setting, and the Hinv the processes share equals
    the one computed alone to float32 rounding, at every setting."""
    import os

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                        str(ROOT / "scripts" / "bench_shared_inverse.py"), "--sizes", "300", "700",
                        "--split-from", "512", "256", "0", "--repeat", "1"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [json.loads(x) for x in p.stdout.splitlines() if x.startswith("{")]
    assert [(x["n"], x["cholesky_split_from"]) for x in lines] == [
        (n, s) for n in (300, 700) for s in (None, 512, 256, 0)]
    assert all(x["max_rel_diff_from_alone"] < 1e-5 and x["hinv_s"] > 0 for x in lines), lines


def test_timeline_summary_sets_two_processes_side_by_side(tmp_path):
    """Two processes' phase edges (runtime.timeline's lines), layer 1 known to the
    millisecond: process 1 starts 5 ms later; process 0 waits 30 ms in `agree` for it, then
    process 1 waits 4 ms in a broadcast's header; a phase that runs twice is summed."""
    def lines(events):
        return "\n".join(json.dumps({"phase": p, "edge": e, "t": 100 + t / 1000}) for p, e, t in events) + "\n"

    zero = [("layer 0", "in", -50), ("measure a", "in", -49), ("measure a", "out", -20), ("layer 0", "out", -10)]
    rank0 = zero + [("layer 1", "in", 0), ("measure a", "in", 1), ("measure a", "out", 20), ("agree", "in", 20),
                    ("agree", "out", 50), ("solve a", "in", 50), ("broadcast header", "in", 60),
                    ("broadcast header", "out", 61), ("solve a", "out", 70), ("forward", "in", 70),
                    ("forward", "out", 80), ("forward", "in", 80), ("forward", "out", 85), ("layer 1", "out", 90)]
    rank1 = zero + [("layer 1", "in", 5), ("measure a", "in", 6), ("measure a", "out", 49), ("agree", "in", 49),
                    ("agree", "out", 50), ("solve a", "in", 50), ("broadcast header", "in", 56),
                    ("broadcast header", "out", 60), ("solve a", "out", 70), ("forward", "in", 70),
                    ("forward", "out", 90), ("layer 1", "out", 91)]
    files = []
    for r, events in enumerate((rank0, rank1)):
        files.append(tmp_path / f"tl.rank{r}.jsonl")
        files[-1].write_text(lines(events))
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "timeline_summary.py"), *map(str, files), "--layer", "1",
                        "--json"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    s = json.loads(p.stdout)
    close = lambda a, b: all(abs(x - y) < 1e-3 for x, y in zip(a, b, strict=True))  # noqa: E731
    assert s["layer_index"] == 1 and close(s["start"], [0, 5]) and close(s["layer"], [90, 86])
    assert close(s["collectives"], [31, 5])
    assert list(s["phases"]) == ["measure a", "agree", "solve a", "broadcast header", "forward"]
    assert close(s["phases"]["agree"], [30, 1]) and close(s["phases"]["forward"], [15, 20])
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "timeline_summary.py"), *map(str, files), "--layer", "1",
                        "--json", "--nested"], capture_output=True, text=True)
    s = json.loads(p.stdout)  # the header's broadcast named by its group; the waits counted as before
    assert list(s["phases"]) == ["measure a", "agree", "solve a", "solve a / broadcast header", "forward"]
    assert close(s["phases"]["solve a / broadcast header"], [1, 4]) and close(s["collectives"], [31, 5])
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "timeline_summary.py"), *map(str, files), "--layer", "7"],
                       capture_output=True, text=True)
    assert p.returncode != 0 and "layer 7" in p.stderr
