#!/usr/bin/env python3
"""Whole-process wall time of `qwen-gptq quantize` against GPTQModel, same run, same inputs.

    python scripts/bench_whole_process.py                 # qwen2-tiny, w4g128, 128 samples, --max_len 512

Each tool runs as its own process, timed from start to exit (interpreter start, imports,
loading, calibration, quantization, packing, saving): what a user waits for. Both get
the very same token ids (the first N samples of the calibration file in ChatML, cut to
--max-len) and the same settings (bits, group size, sym, desc_act off, damp 0.01,
batch size 1). GPTQModel first runs once untimed on two short samples, so that its
one-time kernel compilation is not counted. GPTQModel loads the model in float32 by
default here, its fastest on a CPU (--gptqmodel-dtype bfloat16 is what it picks by itself
for a bf16 checkpoint, and much slower). With --repeat N each tool runs N times
(alternating) and the median is reported. Every run writes into an empty output path (the
previous run's output is deleted first, outside the timing: replacing an existing output
with --overwrite adds its deletion, 1.5 s for a 7B shape's 5.5 GB). Needs the `gptqmodel` extra.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def gptqmodel_worker(ids_file, model, out, bits, group_size, dtype):
    import torch
    from gptqmodel import GPTQModel, QuantizeConfig

    ids = json.loads(Path(ids_file).read_text())
    qcfg = QuantizeConfig(bits=bits, group_size=group_size, desc_act=False, sym=True, damp_percent=0.01)
    m = GPTQModel.load(model, qcfg, dtype=getattr(torch, dtype))
    m.quantize([{"input_ids": x, "attention_mask": [1] * len(x)} for x in ids], batch_size=1)
    m.save(out)


def timed(cmd, env=None, stdout=None, out_dir=None) -> float:
    if out_dir is not None:
        shutil.rmtree(out_dir, ignore_errors=True)
    t = time.perf_counter()
    with open(stdout, "w") if stdout else open(os.devnull, "w") as out:
        r = subprocess.run(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - t
    if r.returncode != 0:
        sys.exit(f"failed ({r.returncode}): {' '.join(map(str, cmd))}\n{r.stderr[-3000:]}")
    return elapsed


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--gptqmodel-worker":
        gptqmodel_worker(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6]), sys.argv[7])
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "examples" / "qwen2-tiny"))
    p.add_argument("--data", default=str(ROOT / "examples" / "calib.json"))
    p.add_argument("--num-samples", type=int, default=128)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--ours", nargs="+", default=[""], metavar="FLAGS",
                   help="qwen-gptq runs per repeat, each with these extra flags (start each with a space): "
                        "--ours '' ' --max-gpu-memory 12GB' '' times a first run, a limited one and a second plain one")
    p.add_argument("--peaks", action="store_true", help="also report qwen-gptq's peak host and GPU memory (its --json)")
    p.add_argument("--gptqmodel-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="dtype GPTQModel loads the model in: float32 (default) is its fastest on CPUs without bf16 "
                        "matrix units; bfloat16 is what it picks by itself for this bf16 checkpoint (several times slower)")
    a = p.parse_args()

    sys.path.insert(0, str(ROOT))
    from transformers import AutoTokenizer

    from qwen_gptq import calib

    tok = AutoTokenizer.from_pretrained(a.model)
    samples = calib.read_samples(a.data)[: a.num_samples]
    ids = [x.tolist() for x in calib.tokenize_samples(samples, tok, a.max_len)]
    tmp = Path(tempfile.mkdtemp())
    (tmp / "ids.json").write_text(json.dumps(ids))
    (tmp / "warm.json").write_text(json.dumps([x[:32] for x in ids[:2]]))

    ours = [sys.executable, "-m", "qwen_gptq", "quantize", "--model_name_or_path", a.model, "--data_path", a.data,
            "--out_path", str(tmp / "ours"), "--overwrite", "--bits", str(a.bits), "--group-size", str(a.group_size),
            "--max_len", str(a.max_len), "--num-samples", str(a.num_samples), "--quiet"]
    worker = [sys.executable, __file__, "--gptqmodel-worker"]
    theirs = worker + [str(tmp / "ids.json"), a.model, str(tmp / "theirs"), str(a.bits), str(a.group_size),
                       a.gptqmodel_dtype]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    timed(worker + [str(tmp / "warm.json"), a.model, str(tmp / "warm"), str(a.bits), str(a.group_size),
                    a.gptqmodel_dtype], env)

    times: dict[str, list[float]] = {}
    peaks: dict[str, list] = {}
    for _ in range(a.repeat):
        for flags in a.ours:
            name = f"qwen-gptq{flags}".rstrip()
            if a.peaks:
                report = tmp / "ours.json"
                times.setdefault(name, []).append(timed(ours + ["--json"] + flags.split(), env, report, tmp / "ours"))
                r = json.loads(report.read_text())
                later = r.get("layer_seconds", [])[1:] or [0]
                peaks.setdefault(name, []).append({"host_gb": round(r["peak_host_bytes"] / 1e9, 2),
                                                   "gpu_gb": round(r["peak_gpu_bytes"] / 1e9, 2),
                                                   "later_layers_s": [round(min(later), 2), round(max(later), 2)],
                                                   "timings_s": {k: round(v, 2) for k, v in r["timings"].items()}})
            else:
                times.setdefault(name, []).append(timed(ours + flags.split(), env, None, tmp / "ours"))
        times.setdefault("gptqmodel", []).append(timed(theirs, env, None, tmp / "theirs"))
    med = {k: statistics.median(v) for k, v in times.items()}
    import gptqmodel
    import torch

    print(json.dumps({
        "model": a.model, "samples": len(ids), "tokens": sum(map(len, ids)), "max_len": a.max_len, "bits": a.bits,
        "group_size": a.group_size, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "gptqmodel": gptqmodel.__version__, "gptqmodel_dtype": a.gptqmodel_dtype,
        "seconds": {k: [round(x, 2) for x in v] for k, v in times.items()},
        "median_s": {k: round(v, 2) for k, v in med.items()},
        "ratio_ours_to_gptqmodel": round(med[next(iter(med))] / med["gptqmodel"], 3),
        "peaks": peaks,
    }))


if __name__ == "__main__":
    main()
