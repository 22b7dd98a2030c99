#!/usr/bin/env python3
"""On a CUDA GPU: the mover's pinned staging (runtime.Staging) copies every byte, with the
main stream busy meanwhile, as the pipeline uses it: from a worker thread, on a stream
of its own.

    python scripts/check_staging.py

Copies tensors of several dtypes and sizes (up to 3 staging buffers' worth) to the GPU
and back through Staging and compares them with plain copies; prints one JSON line and
exits 1 on any difference. The CPU tests run the same chunking with stand-in events.
"""

import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qwen_gptq import runtime  # noqa: E402


def main():
    device = torch.device("cuda")
    stream = torch.cuda.Stream(device)
    staging = runtime.Staging(torch.cuda.Event)
    g = torch.Generator().manual_seed(0)
    sizes = [1, 7, 4096, 1 << 20, runtime.STAGE_BYTES // 4 + 3, 3 * runtime.STAGE_BYTES // 2 + 5]
    tensors = [torch.randn(n, generator=g).to(dt) for n in sizes for dt in (torch.bfloat16, torch.float32)]
    tensors += [torch.randint(0, 2**31 - 1, (777, 513), generator=g, dtype=torch.int32), torch.tensor(2.5)]
    busy = torch.randn(8192, 8192, device=device)

    def trip(t):
        with torch.cuda.stream(stream):
            there = torch.empty(t.shape, dtype=t.dtype, device=device)
            staging.to_device(t, there)
            back = torch.empty_like(t)
            staging.to_host(there, back)
            stream.synchronize()
        return there, back

    bad = []
    with ThreadPoolExecutor(1) as worker:
        for k, t in enumerate(tensors):
            f = worker.submit(trip, t)
            for _ in range(4):  # the main stream busy meanwhile
                busy = busy @ busy / 8192
            there, back = f.result()
            if not (torch.equal(there.cpu(), t) and torch.equal(back, t)):
                bad.append(k)
    print(json.dumps({"tensors": len(tensors), "bytes": sum(t.numel() * t.element_size() for t in tensors),
                      "different": bad}))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
