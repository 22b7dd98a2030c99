"""Developer scripts whose output decisions rest on: checked on inputs with known answers."""

import gzip
import json
import subprocess
import sys

from .conftest import ROOT


def test_trace_summary_finds_the_gap_the_held_launch_and_the_collective(tmp_path):
    """A synthetic layer trace: the main stream idles 5 ms between two kernels, a main-thread
    launch overlaps another thread's 4 ms pageable copy for 3 ms, an NCCL kernel runs 1 ms."""
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
    assert s["nccl_ms"] == 1.0 and s["busy_s"] == {"7": 0.003} and s["span_s"] == 0.01
