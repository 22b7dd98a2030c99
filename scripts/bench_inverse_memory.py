#!/usr/bin/env python3
"""Peak memory of Hinv (gptq.upper_cholesky_of_inverse) beyond the Hessian itself, plain and
in the Hessian's own memory (consume=True, as gptq_batch calls it):

    python scripts/bench_inverse_memory.py --n 6144 [--device cuda]

Prints one JSON line per n: the extra peak of each way in bytes and in units of the
Hessian's size (columns² × 4 bytes). On CUDA from the allocator's peak; on CPU each way
runs in a fresh process and the peak is its VmHWM (reset just before) less its resident
memory then.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qwen_gptq import runtime  # noqa: E402
from qwen_gptq.gptq import upper_cholesky_of_inverse  # noqa: E402


def hessian(n: int, device: str) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(0)
    X = torch.randn(2 * n, n, device=device, generator=g)
    H = X.T @ X / (2 * n)
    H.diagonal().add_(0.01 * H.diagonal().mean())
    return H


def worker(n: int, consume: bool) -> None:
    H = hessian(n, "cpu")
    upper_cholesky_of_inverse(hessian(64, "cpu"), consume=consume)  # (libraries' own buffers, first use)
    Path("/proc/self/clear_refs").write_text("5\n")  # (VmHWM restarts from here: building H peaked higher)
    before = runtime.host_bytes()
    U, ok = upper_cholesky_of_inverse(H, consume=consume)
    assert ok.item()
    print(json.dumps({"extra": runtime.peak_host_bytes() - before}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[6144])
    p.add_argument("--device", default="cpu")
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker(int(a.worker[0]), a.worker[1] == "1")
        return
    for n in a.n:
        size = n * n * 4
        row = {"n": n, "device": a.device, "hessian_bytes": size}
        for name, consume in (("plain", False), ("in_h", True)):
            if a.device == "cuda":
                H = hessian(n, "cuda")
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                upper_cholesky_of_inverse(H, consume=consume)
                extra = torch.cuda.max_memory_allocated() - base
                del H
            else:
                out = subprocess.run([sys.executable, __file__, "--worker", str(n), "1" if consume else "0"],
                                     capture_output=True, text=True, check=True).stdout
                extra = json.loads(out.strip().splitlines()[-1])["extra"]
            row[f"{name}_extra_bytes"] = extra
            row[f"{name}_extra_hessians"] = round(extra / size, 2)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
