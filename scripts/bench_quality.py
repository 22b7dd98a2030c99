#!/usr/bin/env python3
"""Perplexity over several calibration subsets: the measuring stick for quality levers.

    python scripts/bench_quality.py --bits 4 3 8 --seeds 1 2 3 [--extra ' --desc-act']

For each bit width and seed: `qwen-gptq quantize` qwen2-tiny (examples/) with `--seed S
--num-samples 128 --max_len 512` (a different 128-sample subset of examples/calib.json per
seed) plus the extra flags, as its own process, then the perplexity of the output under
the README's protocol (examples/eval.txt, first 64 windows of 512 tokens, float32). Prints
a JSON line per run (with quantize wall time and peak host memory) and one summary line per
bit width: mean, spread (max - min) and each value.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "examples" / "qwen2-tiny"))
    p.add_argument("--data", default=str(ROOT / "examples" / "calib.json"))
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3, 8])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--extra", default="", help="extra quantize flags (start with a space: ' --desc-act')")
    p.add_argument("--device", default="cpu")
    a = p.parse_args()

    from qwen_gptq.evaluate import eval_windows, perplexity
    from qwen_gptq.hf import load_quantized

    text = (ROOT / "examples" / "eval.txt").read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory() as tmp:
        for bits in a.bits:
            values = []
            for seed in a.seeds:
                out = Path(tmp) / f"w{bits}s{seed}"
                r = subprocess.run([sys.executable, "-m", "qwen_gptq", "quantize", "--model_name_or_path", a.model,
                                    "--data_path", a.data, "--out_path", str(out), "--bits", str(bits), "--seed",
                                    str(seed), "--num-samples", "128", "--max_len", "512", "--device", a.device,
                                    "--json", "-q", *a.extra.split()], capture_output=True, text=True, check=True)
                report = json.loads(r.stdout)
                model, tok = load_quantized(out, device=a.device)
                ppl = perplexity(model, eval_windows(tok, text, 64, 512), a.device)
                values.append(ppl)
                print(json.dumps({"bits": bits, "seed": seed, "extra": a.extra.strip(), "ppl": round(ppl, 3),
                                  "quantize_s": round(report["wall_seconds"], 1),
                                  "peak_host_gb": round(report["peak_host_bytes"] / 1e9, 2)}), flush=True)
            print(json.dumps({"bits": bits, "extra": a.extra.strip(), "mean": round(statistics.mean(values), 3),
                              "spread": round(max(values) - min(values), 3),
                              "values": [round(v, 3) for v in values]}), flush=True)


if __name__ == "__main__":
    main()
