#!/usr/bin/env python3
"""Time the Hessian accumulation (gptq.Hessian) at several symmetric block splits, the way
the pipeline feeds it (one 2048-token sample a product, bf16 activations on CUDA):

    python scripts/bench_hessian.py --columns 3584 18944 29568 --rows 65536 --blocks 1 2 4 8

One JSON line per (columns, blocks): milliseconds per 2048-row product (median of 5 runs
over `--rows` rows, after a warm-up), the FLOP rate counted as the full XᵀX, and the largest
difference from the unsplit product relative to its largest entry. On what chose
Hessian.SPLITS_CUDA (figures in docs/benchmarks.md).
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qwen_gptq.gptq import Hessian  # noqa: E402


def accumulate(X: torch.Tensor, blocks: int) -> tuple[float, torch.Tensor]:
    Hessian.SPLITS_CUDA = ((1, blocks),)
    times = []
    for _ in range(6):  # the first is the warm-up
        acc = Hessian(X.shape[1], X.device)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for rows in X.split(Hessian.CHUNK):
            acc.add(rows)
        H = acc.products()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]), H


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--columns", type=int, nargs="+", default=[3584, 18944])
    p.add_argument("--rows", type=int, default=65536)
    p.add_argument("--blocks", type=int, nargs="+", default=[1, 2, 4, 8])
    a = p.parse_args()
    for n in a.columns:
        X = torch.randn(a.rows, n, device="cuda", generator=torch.Generator("cuda").manual_seed(0)).bfloat16()
        reference = None
        for k in a.blocks:
            seconds, H = accumulate(X, k)
            if reference is None:
                reference = H.clone()
            diff = ((H - reference).abs().max() / reference.abs().max()).item()
            products = a.rows // Hessian.CHUNK
            print(json.dumps({"columns": n, "blocks": k, "ms_per_product": round(1e3 * seconds / products, 3),
                              "tflops_full": round(2 * a.rows * n * n / seconds / 1e12, 1),
                              "max_rel_diff_vs_first": diff, "symmetric": bool(torch.equal(H, H.T))}), flush=True)
            del H
        del X, reference
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
