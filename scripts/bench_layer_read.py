#!/usr/bin/env python3
"""Time reading each decoder layer of a saved checkpoint into the model, as a streamed
`qwen-gptq quantize` reads it (stream.open_streamed, then Streamed.fill per layer):

    python scripts/bench_layer_read.py MODEL_DIR [--cold]

Prints one JSON line per layer (bytes, seconds, GB/s) and a summary. --cold drops the
page cache before each layer (Linux, root: writes /proc/sys/vm/drop_caches), so the bytes
come from the disk; without it they come from wherever the system has them (a checkpoint
just written is in the page cache). The issue's bar: a layer in at most its bytes / 2 GB/s.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qwen_gptq import stream  # noqa: E402
from qwen_gptq.families import decoder_layers, family_for  # noqa: E402


def drop_page_cache() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("1\n")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", type=Path)
    p.add_argument("--cold", action="store_true", help="drop the page cache before each layer (root)")
    a = p.parse_args()
    model_type = json.loads((a.model_dir / "config.json").read_text()).get("model_type")
    family = family_for(model_type)
    t0 = time.perf_counter()
    streamed, _ = stream.open_streamed(a.model_dir, family, trust_remote_code=False)
    opened = time.perf_counter() - t0
    rows = []
    for i, layer in enumerate(decoder_layers(streamed.model, family)):
        if a.cold:
            drop_page_cache()
        t = time.perf_counter()
        streamed.fill(layer)
        seconds = time.perf_counter() - t
        size = sum(x.numel() * x.element_size() for x in [*layer.parameters(), *layer.buffers()])
        rows.append({"layer": i, "bytes": size, "seconds": round(seconds, 3), "gb_per_s": round(size / seconds / 1e9, 2)})
        print(json.dumps(rows[-1]), flush=True)
        streamed.release(layer)
    print(json.dumps({"model_type": model_type, "cold": a.cold, "open_s": round(opened, 2),
                      "slowest_gb_per_s": min(r["gb_per_s"] for r in rows), "cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()
