#!/usr/bin/env python3
"""On a CUDA machine: the CUDA-graph solve gives the same result as the eager loop and the CPU.

    python scripts/check_cuda_graphs.py
"""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qwen_gptq import gptq as G  # noqa: E402


def main():
    torch.manual_seed(0)
    cases = [(512, 1024, 128, 4, False), (384, 512, 32, 3, False), (256, 640, -1, 8, False), (256, 512, 256, 4, False),
             (512, 1024, 128, 4, True), (384, 512, 32, 3, True)]
    for rows, cols, gs, bits, mse in cases:
        W = torch.randn(rows, cols)
        X = torch.randn(4096, cols) * torch.linspace(0.1, 3, cols)
        H = 2 * X.T @ X / X.shape[0]
        cfg = G.QuantConfig(bits=bits, group_size=gs, mse=mse)
        ref = G.gptq(W, H, cfg)
        out = {}
        for graphs in ("0", "1"):
            import os

            os.environ["QWEN_GPTQ_CUDA_GRAPHS"] = graphs
            torch.cuda.synchronize()
            t = time.perf_counter()
            r = G.gptq(W.cuda(), H.cuda(), cfg)
            torch.cuda.synchronize()
            out[graphs] = (r, time.perf_counter() - t)
        e, g = out["0"][0], out["1"][0]
        same_codes = (e.Q == g.Q).float().mean().item()
        cpu_codes = (ref.Q == g.Q.cpu()).float().mean().item()
        print(f"{rows}x{cols} g{gs} w{bits} mse={mse}: graph==eager codes {same_codes:.5f}, graph==cpu codes {cpu_codes:.5f}, "
              f"loss eager {e.losses.sum():.4f} graph {g.losses.sum():.4f} cpu {ref.losses.sum():.4f}, "
              f"eager {out['0'][1]:.3f}s graph {out['1'][1]:.3f}s")
        assert same_codes > 0.999 and torch.allclose(e.scale, g.scale)
    print("OK")


if __name__ == "__main__":
    main()
