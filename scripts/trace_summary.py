#!/usr/bin/env python3
"""Summarize the Chrome traces QWEN_GPTQ_PROFILE writes (FILE.rankN.json.gz), one layer of
one process each: what the GPU did, where it waited, and what held the main thread.

    python scripts/trace_summary.py p72_2.rank0.json.gz p72_2.rank1.json.gz [--json]

For each trace: the layer's span, each stream's busy time, the main stream's gaps over
2 ms (with the op that launched the kernel after each), the time the main thread's CUDA
calls overlapped another thread's long cudaMemcpyAsync (a pageable copy holds the driver),
and the NCCL kernels' time (a rank waiting for the other shows as long NCCL kernels). Then
the host time of each named span (runtime.phase: each group's measuring and solving, the
write-back, the forward; distributed's collectives) with how much of it the main thread
spent outside any operation (Python, or waiting for the GIL: how process 0's lag on two
GPUs showed), and the GPU time per kernel name, one column per trace. This is how the 2026-11-30 profiles
were read (docs/benchmarks.md).
"""

import argparse
import bisect
import collections
import gzip
import json
import sys

GAP_US = 2000
HELD_US = 2000


def load(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]


def summary(events: list[dict]) -> dict:
    cpu = [e for e in events if e.get("cat") == "cpu_op"]
    t0 = min(e["ts"] for e in cpu)
    end = max(e["ts"] + e["dur"] for e in events)
    gpu = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    streams = collections.defaultdict(list)
    for e in gpu:
        streams[e["tid"]].append(e)
    main_stream = max(streams, key=lambda s: len(streams[s])) if streams else None
    main_thread = collections.Counter(e["tid"] for e in cpu).most_common(1)[0][0]
    launches = {e.get("args", {}).get("correlation"): e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver")}
    ops = sorted((e for e in cpu if e["tid"] == main_thread), key=lambda e: e["ts"])

    def launched_from(kernel: dict) -> str:
        call = launches.get(kernel.get("args", {}).get("correlation"))
        if call is None:
            return "?"
        inside = [e["name"] for e in ops if e["ts"] <= call["ts"] <= e["ts"] + e["dur"]]
        return " > ".join(inside[:3]) or call["name"]

    gaps = []
    if main_stream is not None:
        last = t0
        for e in sorted(streams[main_stream], key=lambda e: e["ts"]):
            if e["ts"] - last > GAP_US:
                gaps.append({"at_s": round((last - t0) / 1e6, 3), "ms": round((e["ts"] - last) / 1e3, 1),
                             "before": e["name"][:60], "launched_from": launched_from(e)})
            last = max(last, e["ts"] + e["dur"])
    runtime = [e for e in events if e.get("cat") == "cuda_runtime"]
    copies = [e for e in runtime if e["tid"] != main_thread and e["name"] == "cudaMemcpyAsync" and e["dur"] > HELD_US]
    held = 0
    for c in copies:
        for e in runtime:
            if e["tid"] == main_thread and e["name"] != "cudaStreamSynchronize" and e["dur"] > 1000:
                held += max(0, min(c["ts"] + c["dur"], e["ts"] + e["dur"]) - max(c["ts"], e["ts"]))
    phases = collections.defaultdict(float)  # runtime.phase's and distributed's named spans, host time
    between = collections.defaultdict(float)  # ... of it outside any operation: Python, or waiting for the GIL
    covered = _merged([(e["ts"], e["ts"] + e["dur"]) for e in ops])
    for e in events:
        if e.get("cat") == "user_annotation" and e["tid"] == main_thread:
            phases[e["name"]] += e["dur"] / 1e3
            between[e["name"]] += (e["dur"] - _overlap(covered, e["ts"], e["ts"] + e["dur"])) / 1e3
    kernels = collections.defaultdict(float)
    for e in gpu:
        kernels[e["name"][:70]] += e["dur"] / 1e3
    return {
        "span_s": round((end - t0) / 1e6, 3),
        "busy_s": {str(s): round(sum(e["dur"] for e in es) / 1e6, 3) for s, es in streams.items()},
        "main_stream": str(main_stream),
        "gaps_ms": round(sum(g["ms"] for g in gaps), 1),
        "largest_gaps": sorted(gaps, key=lambda g: -g["ms"])[:10],
        "main_thread_held_by_other_threads_copies_ms": round(held / 1e3, 1),
        "nccl_ms": round(sum(v for k, v in kernels.items() if "nccl" in k.lower()), 1),
        "phase_ms": dict(phases),
        "between_ops_ms": {k: round(v, 3) for k, v in between.items()},
        "kernel_ms": dict(kernels),
    }


def _merged(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _overlap(merged: list[tuple[float, float]], a: float, b: float) -> float:
    """How much of [a, b] the disjoint, sorted intervals cover."""
    k = bisect.bisect_right(merged, (a, float("inf"))) - 1
    total = 0.0
    for x, y in merged[max(k, 0):]:
        if x >= b:
            break
        total += max(0.0, min(y, b) - max(x, a))
    return total


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("traces", nargs="+")
    p.add_argument("--top", type=int, default=25, help="kernels listed (by the largest time in any trace)")
    p.add_argument("--json", action="store_true", help="one JSON object per trace instead of the tables")
    a = p.parse_args()
    results = [summary(load(t)) for t in a.traces]
    if a.json:
        for t, r in zip(a.traces, results):
            print(json.dumps({"trace": t, **r}))
        return
    for t, r in zip(a.traces, results):
        print(f"{t}: span {r['span_s']} s, busy {r['busy_s']} (main stream {r['main_stream']}), "
              f"gaps {r['gaps_ms']} ms, main thread held by copies {r['main_thread_held_by_other_threads_copies_ms']} ms, "
              f"NCCL {r['nccl_ms']} ms")
        for g in r["largest_gaps"][:5]:
            print(f"  gap {g['ms']:7.1f} ms at {g['at_s']:.3f} s before {g['before']} ({g['launched_from']})")
    columns = "".join(f"  [{i}]" for i in range(len(results)))
    print("\nHost ms per named span (measure/solve: each group's, by its first Linear), and of it outside any"
          " operation (Python, or waiting for the GIL):" + columns)
    for k in sorted({k for r in results for k in r["phase_ms"]}):
        print(f"{k:60s}" + "".join(f"{r['phase_ms'].get(k, 0):9.1f} ({r['between_ops_ms'].get(k, 0):6.1f})"
                                   for r in results))
    names = sorted({k for r in results for k in r["kernel_ms"]},
                   key=lambda k: -max(r["kernel_ms"].get(k, 0) for r in results))
    print("\nGPU ms per kernel:" + "".join(f"  [{i}]" for i in range(len(results))))
    for k in names[:a.top]:
        print(f"{k:70s}" + "".join(f"{r['kernel_ms'].get(k, 0):9.1f}" for r in results))
    print(f"{'total':70s}" + "".join(f"{sum(r['kernel_ms'].values()):9.1f}" for r in results))


if __name__ == "__main__":
    sys.exit(main())
