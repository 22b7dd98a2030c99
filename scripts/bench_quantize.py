#!/usr/bin/env python3
"""Time qwen-gptq's quantization on a model with the exact shape of a named Qwen config.

Random weights (the hub is unreachable where this runs; timing does not depend on the
values), random calibration tokens, the same pipeline `qwen-gptq quantize` runs:

    python scripts/bench_quantize.py --shape qwen2.5-7b --layers 4 --samples 128 --seq-len 2048

Prints one JSON object: per-phase wall seconds (build, capture, hessian, solve, pack,
forward, move, save), seconds per decoder layer, peak GPU memory
(torch.cuda.max_memory_allocated) and peak host memory (max RSS), plus the machine.
"""

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qwen_gptq import checkpoint  # noqa: E402
from qwen_gptq.families import family_for  # noqa: E402
from qwen_gptq.gptq import QuantConfig  # noqa: E402
from qwen_gptq.pipeline import quantize_model  # noqa: E402

SHAPES = {
    # model_type, hidden, intermediate, layers, heads, kv heads, head_dim, vocab, tied
    "qwen2.5-0.5b": ("qwen2", 896, 4864, 24, 14, 2, 64, 151936, True),
    "qwen2.5-7b": ("qwen2", 3584, 18944, 28, 28, 4, 128, 152064, False),
    "qwen3-8b": ("qwen3", 4096, 12288, 36, 32, 8, 128, 151936, False),
    "qwen2.5-72b": ("qwen2", 8192, 29568, 80, 64, 8, 128, 152064, False),
}


def build(shape: str, layers: int | None, dtype, device):
    from transformers import AutoConfig, AutoModelForCausalLM

    mt, hidden, inter, n_layers, heads, kv, head_dim, vocab, tied = SHAPES[shape]
    kw = dict(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers or n_layers,
              num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab, tie_word_embeddings=tied,
              max_position_embeddings=32768)
    if mt == "qwen3":
        kw["head_dim"] = head_dim
    config = AutoConfig.for_model(mt, **kw)
    torch.manual_seed(0)
    with device:  # random init is fast on a GPU; the model then lives on CPU, as in `quantize`
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.to("cpu").eval(), n_layers


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-7b")
    p.add_argument("--layers", type=int, default=None, help="cut the model to N decoder layers")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-save", action="store_true", help="skip writing the checkpoint")
    p.add_argument("--no-mse", action="store_true", help="plain min-max scales (qwen-gptq's default is --mse)")
    p.add_argument("--compare", choices=["gptqmodel"], default=None,
                   help="also quantize the same model, samples and settings with GPTQModel in this run")
    a = p.parse_args()
    device = torch.device(a.device)

    t0 = time.perf_counter()
    model, full_layers = build(a.shape, a.layers, torch.bfloat16, device)
    build_s = time.perf_counter() - t0
    model_src = None
    if a.compare:
        # GPTQModel loads from disk: save the same random weights (and a tokenizer it can open).
        import shutil

        model_src = Path(tempfile.mkdtemp()) / "model"
        model.save_pretrained(model_src)
        tiny = Path(__file__).resolve().parent.parent / "examples" / "qwen2-tiny"
        for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            shutil.copyfile(tiny / f, model_src / f)
    family = family_for(model.config.model_type)
    g = torch.Generator().manual_seed(0)
    samples = [torch.randint(3, model.config.vocab_size, (a.seq_len,), generator=g) for _ in range(a.samples)]
    cfg = QuantConfig(bits=a.bits, group_size=a.group_size, mse=not a.no_mse)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    outcome = quantize_model(model, family, samples, cfg, device, progress=False)
    quant_s = time.perf_counter() - t0

    save_s = 0.0
    if not a.no_save:
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            state = checkpoint.build_state_dict(model, outcome.packed, torch.float16)
            checkpoint.save_weights(state, Path(tmp), checkpoint.parse_size("5GB"))
        save_s = time.perf_counter() - t0

    n = model.config.num_hidden_layers
    per_layer = (quant_s - outcome.timings["capture"]) / n
    result = {
        "shape": a.shape, "layers": n, "mse": not a.no_mse, "samples": a.samples, "seq_len": a.seq_len, "bits": a.bits,
        "group_size": a.group_size, "device": str(device),
        "card": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "seconds": {"build": round(build_s, 2), **{k: round(v, 2) for k, v in outcome.timings.items()},
                    "quantize_total": round(quant_s, 2), "save": round(save_s, 2)},
        "seconds_per_layer": round(per_layer, 3),
        "extrapolated_all_layers_s": round(outcome.timings["capture"] + per_layer * full_layers, 1),
        "peak_gpu_gb": round(torch.cuda.max_memory_allocated(device) / 1e9, 2) if device.type == "cuda" else 0,
        "peak_host_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
    }
    if a.compare == "gptqmodel":
        result["gptqmodel"] = run_gptqmodel(model_src, samples, a)
        g = result["gptqmodel"]
        result["speedup_per_layer"] = round(g["seconds_per_layer"] / per_layer, 2)
        result["speedup_quantize"] = round(g["quantize_s"] / quant_s, 2)
    print(json.dumps(result))


def run_gptqmodel(model_dir, samples, a):
    """GPTQModel on the very same weights and token ids, same settings."""
    import logging

    from gptqmodel import GPTQModel, QuantizeConfig

    logging.getLogger("gptqmodel").setLevel(logging.WARNING)
    qcfg = QuantizeConfig(bits=a.bits, group_size=a.group_size, desc_act=False, sym=True, damp_percent=0.01)
    # Warm-up on a throwaway copy with two short samples, so that GPTQModel's one-time
    # kernel compilation is not counted against it.
    warm = GPTQModel.load(str(model_dir), qcfg)
    warm.quantize([{"input_ids": s[:64].tolist(), "attention_mask": [1] * 64} for s in samples[:2]], batch_size=1)
    del warm
    t0 = time.perf_counter()
    model = GPTQModel.load(str(model_dir), qcfg)
    load_s = time.perf_counter() - t0
    data = [{"input_ids": s.tolist(), "attention_mask": [1] * len(s)} for s in samples]
    if a.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model.quantize(data, batch_size=1)
    quant_s = time.perf_counter() - t0
    layers = model.model.config.num_hidden_layers
    return {"version": __import__("gptqmodel").__version__, "load_s": round(load_s, 2),
            "quantize_s": round(quant_s, 2), "seconds_per_layer": round(quant_s / layers, 3),
            "peak_gpu_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if a.device.startswith("cuda") else 0}


if __name__ == "__main__":
    main()
