#!/usr/bin/env python3
"""The experts' solves of one MoE group, batched (gptq_batch) against one by one (gptq).

    python scripts/bench_moe_solve.py            # 64 problems of each Qwen3-30B-A3B expert shape, on CUDA

Prints per shape the milliseconds of the batched and the looped Cholesky, triangular solve
and whole GPTQ solve (mean of the calls after a first one), then torch.profiler's table of
the batched solve's most expensive kernels.
"""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qwen_gptq import gptq as G  # noqa: E402

BATCH = 64
SHAPES = ((1536, 2048), (2048, 768))  # (rows, columns): gate/up stacked, down


def timed(f, n: int = 3) -> float:
    f()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        f()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n


def measure(rows: int, c: int, dev: torch.device, cfg: G.QuantConfig) -> dict[str, float]:
    X = torch.randn(BATCH, 4 * c, c, device=dev)
    H = X.mT @ X / X.shape[1]
    W = torch.randn(BATCH, rows, c, device=dev)
    flipped = H.flip(-2, -1)
    K = torch.linalg.cholesky_ex(flipped)[0]
    eye = torch.eye(c, device=dev).expand(BATCH, c, c).contiguous()
    seconds = {
        "cholesky_batched": timed(lambda: torch.linalg.cholesky_ex(flipped)),
        "cholesky_loop": timed(lambda: [torch.linalg.cholesky_ex(h) for h in flipped]),
        "triangular_batched": timed(lambda: torch.linalg.solve_triangular(K, eye, upper=False)),
        "triangular_loop": timed(lambda: [torch.linalg.solve_triangular(k, eye[0], upper=False) for k in K]),
        "gptq_batch": timed(lambda: G.gptq_batch(W, H, cfg), 2),
        "gptq_loop": timed(lambda: [G.gptq(W[k], H[k], cfg) for k in range(BATCH)], 1),
    }
    return {k: round(v * 1000, 1) for k, v in seconds.items()}


def main() -> None:
    dev = torch.device("cuda")
    cfg = G.QuantConfig()
    for rows, c in SHAPES:
        print(f"{BATCH} x W {rows}x{c}, ms:", measure(rows, c, dev, cfg), flush=True)

    from torch.profiler import ProfilerActivity, profile

    rows, c = SHAPES[0]
    X = torch.randn(BATCH, 4 * c, c, device=dev)
    H = X.mT @ X / X.shape[1]
    W = torch.randn(BATCH, rows, c, device=dev)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        G.gptq_batch(W, H, cfg)
        torch.cuda.synchronize()
    print(p.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=50))


if __name__ == "__main__":
    main()
