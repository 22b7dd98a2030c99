#!/usr/bin/env python3
"""Perplexity of a model directory (original or GPTQ) under the project's protocol.

    python scripts/perplexity.py DIR [--eval-text examples/eval.txt] [--windows 64] [--length 512]

GPTQ directories are loaded with qwen-gptq's reference loader; computation is float32.
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from qwen_gptq.evaluate import eval_windows, perplexity
from qwen_gptq.hf import load_model, load_quantized


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--eval-text", default=str(Path(__file__).resolve().parent.parent / "examples" / "eval.txt"))
    p.add_argument("--windows", type=int, default=64)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--trust-remote-code", action="store_true")
    a = p.parse_args()
    t0 = time.perf_counter()
    config = json.loads((Path(a.model) / "config.json").read_text())
    if "quantization_config" in config:
        model, tok = load_quantized(a.model, trust_remote_code=a.trust_remote_code)
    else:
        model, tok = load_model(a.model, torch.float32, a.trust_remote_code)
    windows = eval_windows(tok, Path(a.eval_text).read_text(encoding="utf-8"), a.windows, a.length)
    ppl = perplexity(model, windows)
    print(json.dumps({"model": a.model, "ppl": round(ppl, 3), "windows": int(windows.shape[0]),
                      "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
