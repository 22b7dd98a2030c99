#!/usr/bin/env python3
"""Time Hinv (gptq.upper_cholesky_of_inverse) shared by the processes of a torchrun job,
against each computing it alone, for a few CHOLESKY_SPLIT_FROM thresholds (a threshold
at or below half of n splits the halves' factorizations again).

    torchrun --nproc-per-node 2 scripts/bench_shared_inverse.py --sizes 8192 29568 --split-from 16384 12288 0

(0: the Cholesky never split, only the triangular solve.) Rank 0 prints one JSON line per
n and setting: the Cholesky's seconds and the whole Hinv's (median of --repeat, after a
warm-up), and the largest difference from the Hinv computed alone, relative to its largest
entry.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qwen_gptq import gptq  # noqa: E402


def timed(fn, repeat: int, device: torch.device) -> tuple[float, object]:
    out = fn()  # (warm-up)
    times = []
    for _ in range(repeat):
        del out
        sync(device)
        t = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", type=int, nargs="+", default=[8192, 29568])
    p.add_argument("--split-from", type=int, nargs="+", default=[16384, 12288, 0])
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    shared = gptq.Shared(rank, size, dist.all_reduce)
    for n in a.sizes:
        g = torch.Generator(device=device).manual_seed(0)
        X = torch.randn(2 * n, n, device=device, generator=g)
        H = X.T @ X / (2 * n)
        H.diagonal().add_(0.01 * H.diagonal().mean())
        del X
        M = H.flip(-2, -1).contiguous()
        _, alone = timed(lambda H=H: gptq.upper_cholesky_of_inverse(H)[0], 1, device)
        base = gptq.CHOLESKY_SPLIT_FROM
        for split in [None, *a.split_from]:
            gptq.CHOLESKY_SPLIT_FROM = split if split else 1 << 40
            how = shared if split is not None else None
            chol_s, _ = timed(lambda M=M, how=how: gptq.lower_cholesky(M, how)[0], a.repeat, device)
            hinv_s, U = timed(lambda H=H, how=how: gptq.upper_cholesky_of_inverse(H, how)[0], a.repeat, device)
            diff = ((U - alone).abs().max() / alone.abs().max()).item()
            del U
            if rank == 0:
                print(json.dumps({"n": n, "processes": size if how else 1, "cholesky_split_from": split,
                                  "cholesky_s": round(chol_s, 4), "hinv_s": round(hinv_s, 4),
                                  "max_rel_diff_from_alone": diff}), flush=True)
        gptq.CHOLESKY_SPLIT_FROM = base
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
