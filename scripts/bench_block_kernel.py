#!/usr/bin/env python3
"""Time the Triton GPTQ block kernel (fastpath.triton_block) for one 128-column block at
several row tiles (rows per program), on the problem sizes the pipeline gives it:

    python scripts/bench_block_kernel.py --rows 1536 4096 5120 8192 10240 --batch 1 32 --tiles 4 8 16 32

One JSON line per (rows, batch, tile): milliseconds per launch (median of 20 after a
warm-up), and whether the codes equal those of the default tile (each row is computed
alone, so they must). On what chose fastpath.row_tile's tile (figures in its docstring
and docs/benchmarks.md).
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qwen_gptq import fastpath  # noqa: E402
from qwen_gptq.gptq import Block, QuantConfig  # noqa: E402


def block(batch: int, rows: int, count: int = 128) -> Block:
    g = torch.Generator(device="cuda").manual_seed(0)
    W = torch.randn(batch, rows, count, device="cuda", generator=g)
    A = torch.randn(batch, count, count, device="cuda", generator=g) / count**0.5
    Hinv = torch.linalg.cholesky(A @ A.mT + torch.eye(count, device="cuda"), upper=True)
    scale = torch.full((batch, rows), 0.1, device="cuda")
    return Block(W=W, Hinv=Hinv, scale=scale, zero=torch.full_like(scale, 8.0), gs_in=128, n_in=1)


def timed(b: Block, cfg: QuantConfig, tile: int | None) -> tuple[float, torch.Tensor]:
    fastpath.ROW_TILE_OVERRIDE = tile
    out = fastpath.triton_block(b, cfg)
    times = []
    for _ in range(20):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fastpath.triton_block(b, cfg)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, out.Q


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[1536, 2048, 4096, 5120, 8192, 10240, 14784, 29568])
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--tiles", type=int, nargs="+", default=[4, 8, 16, 32])
    a = p.parse_args()
    cfg = QuantConfig(bits=4, group_size=128)
    for batch in a.batch:
        for rows in a.rows:
            b = block(batch, rows)
            chosen, ref = timed(b, cfg, None)
            row = {"rows": rows, "batch": batch, "chosen_tile": fastpath.row_tile(128), "chosen_ms": round(chosen, 3)}
            for tile in a.tiles:
                ms, Q = timed(b, cfg, tile)
                row[f"tile{tile}_ms"] = round(ms, 3)
                row[f"tile{tile}_same"] = bool(torch.equal(Q, ref))
            print(json.dumps(row), flush=True)
    fastpath.ROW_TILE_OVERRIDE = None


if __name__ == "__main__":
    main()
