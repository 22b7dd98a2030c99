#!/usr/bin/env python3
"""Time and compare ways to get GPTQ's Hinv (upper Cholesky factor of H⁻¹) on one device.

    python scripts/bench_inverse.py --n 3584 18944

"potri": Cholesky, cholesky_inverse, Cholesky again (the reference implementation's way).
"flip": one Cholesky of the reversed matrix and one triangular solve against the whole
identity (qwen-gptq until 2026-11-30). "blocked": qwen-gptq's `upper_cholesky_of_inverse`
(the same, the solve in column blocks on K's trailing part). Prints seconds (after a
warm-up) and the largest differences from potri.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qwen_gptq.gptq import upper_cholesky_of_inverse  # noqa: E402


def potri(H):
    L = torch.linalg.cholesky(H)
    return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)


def flip(H):
    K = torch.linalg.cholesky(H.flip(-2, -1))
    Kinv = torch.eye(H.shape[-1], dtype=H.dtype, device=H.device)
    torch.linalg.solve_triangular(K, Kinv, upper=False, out=Kinv)
    return Kinv.flip(-2, -1)


def blocked(H):
    return upper_cholesky_of_inverse(H)[0]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, nargs="+", default=[3584, 18944])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    for n in a.n:
        g = torch.Generator(device=a.device).manual_seed(0)
        X = torch.randn(2 * n, n, device=a.device, generator=g)
        H = X.T @ X / (2 * n)
        H.diagonal().add_(0.01 * H.diagonal().mean())
        del X
        out = {"n": n, "device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu"}
        res = {}
        for name, fn in (("potri", potri), ("flip", flip), ("blocked", blocked)):
            fn(H)
            if a.device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            res[name] = fn(H)
            if a.device == "cuda":
                torch.cuda.synchronize()
            out[f"{name}_s"] = round(time.perf_counter() - t, 4)
        for name in ("flip", "blocked"):
            out[f"{name}_max_rel_diff"] = ((res[name] - res["potri"]).abs().max() / res["potri"].abs().max()).item()
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
