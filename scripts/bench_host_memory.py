#!/usr/bin/env python3
"""Peak host memory of `qwen-gptq quantize` against model depth, streamed and loaded whole.

    python scripts/bench_host_memory.py [--layers 4 16] [--method rtn] [--device cpu]

Builds random Qwen2 checkpoints with Qwen2.5-1.5B's layer shape (hidden 1536,
intermediate 8960; tests/test_stream.py's model) cut to each depth, quantizes each as a
separate process with and without --no-stream, and prints the peak RSS of each run (the
process's own ru_maxrss, from its --json report).
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.test_stream import _wide_qwen2  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, nargs="+", default=[4, 16])
    p.add_argument("--method", default="rtn")
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for n in a.layers:
            src = _wide_qwen2(Path(tmp) / f"m{n}", n)
            for mode in ([], ["--no-stream"]):
                r = subprocess.run([sys.executable, "-m", "qwen_gptq", "quantize", "--model_name_or_path", str(src),
                                    "--data_path", str(ROOT / "examples" / "calib.json"), "--out_path",
                                    str(Path(tmp) / "q"), "--overwrite", "--num-samples", "2", "--max_len", "32",
                                    "--device", a.device, "--method", a.method, "--json", "-q", *mode],
                                   capture_output=True, text=True, check=True)
                report = json.loads(r.stdout)
                print(json.dumps({"layers": n, "mode": "whole" if mode else "streamed", "method": a.method,
                                  "peak_host_gb": round(report["peak_host_bytes"] / 1e9, 3),
                                  "wall_seconds": round(report["wall_seconds"], 1)}), flush=True)


if __name__ == "__main__":
    main()
