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
import dataclasses
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qwen_gptq import checkpoint, gptq_v1, hf  # noqa: E402
from qwen_gptq.calib import Calibration, make_batches  # noqa: E402
from qwen_gptq.families import family_for  # noqa: E402
from qwen_gptq.gptq import QuantConfig  # noqa: E402
from qwen_gptq.options import parse_size  # noqa: E402
from qwen_gptq.pipeline import Plan, quantize_model  # noqa: E402


def _dense(mt, hidden, inter, layers, heads, kv, head_dim, vocab, tied):
    return dict(model_type=mt, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim, vocab_size=vocab,
                tie_word_embeddings=tied)


# Published shapes (config.json of each model); random weights.
SHAPES = {
    "qwen2.5-0.5b": _dense("qwen2", 896, 4864, 24, 14, 2, 64, 151936, True),
    "qwen2.5-7b": _dense("qwen2", 3584, 18944, 28, 28, 4, 128, 152064, False),
    "qwen3-8b": _dense("qwen3", 4096, 12288, 36, 32, 8, 128, 151936, False),
    "qwen2.5-72b": _dense("qwen2", 8192, 29568, 80, 64, 8, 128, 152064, False),
    # Qwen3.5-27B's language model (hybrid: three Gated DeltaNet layers, then one gated attention layer)
    "qwen3.5-27b": {**_dense("qwen3_5_text", 5120, 17408, 64, 24, 4, 256, 248320, False),
                    "linear_num_value_heads": 48, "linear_num_key_heads": 16, "linear_key_head_dim": 128,
                    "linear_value_head_dim": 128},
    # Qwen3-30B-A3B: 128 experts, top-8, no shared expert
    "qwen3-30b-a3b": {**_dense("qwen3_moe", 2048, 6144, 48, 32, 4, 128, 151936, False),
                      "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768,
                      "decoder_sparse_step": 1, "norm_topk_prob": True},
    # Qwen3-Next-80B-A3B (transformers' default Qwen3NextConfig): hybrid, 512 experts, top-10, shared expert
    "qwen3-next-80b-a3b": {**_dense("qwen3_next", 2048, 5632, 48, 16, 2, 256, 151936, False),
                           "num_experts": 512, "num_experts_per_tok": 10, "moe_intermediate_size": 512,
                           "shared_expert_intermediate_size": 512, "linear_num_value_heads": 32,
                           "linear_num_key_heads": 16, "linear_key_head_dim": 128, "linear_value_head_dim": 128},
}


def build(shape: str, layers: int | None, dtype, device):
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(SHAPES[shape])
    mt, n_layers = kw.pop("model_type"), kw["num_hidden_layers"]
    kw.update(num_hidden_layers=layers or n_layers, max_position_embeddings=32768)
    if "linear_num_value_heads" in kw and layers:  # a cut keeps both layer types, full attention last
        kw["layer_types"] = ["full_attention" if i % 4 == 3 or i == layers - 1 else "linear_attention"
                             for i in range(layers)]
    config = AutoConfig.for_model(mt, **kw)
    torch.manual_seed(0)
    with device:  # random init is fast on a GPU; the model then lives on CPU, as in `quantize`
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    hf.prepare(model, family_for(mt))  # MoE experts as Linears, as `quantize` lays them out
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
    p.add_argument("--no-warmup", action="store_true", help="count one-time costs in the first layer")
    p.add_argument("--profile", metavar="FILE", default=None,
                   help="write torch.profiler's table of the most expensive kernels to FILE")
    p.add_argument("--end-to-end", action="store_true",
                   help="save the random model and a calibration file of SAMPLES texts of SEQ_LEN tokens, then time "
                        "the whole `qwen-gptq quantize` process on them (start, load, quantize, pack, save)")
    p.add_argument("--compare", choices=["gptqmodel"], default=None,
                   help="also quantize the same model, samples and settings with GPTQModel in this run")
    p.add_argument("--packages", nargs="+", metavar="DIR", default=[str(ROOT)],
                   help="with --end-to-end: time the qwen_gptq package found in each DIR (e.g. a copy of another "
                        "commit's package), runs alternating, for before/after figures from one run")
    p.add_argument("--repeat", type=int, default=1, help="with --end-to-end: runs per package")
    p.add_argument("--variants", nargs="+", default=[""], metavar="FLAGS",
                   help="with --end-to-end: extra command-line flags per variant, each timed with each package, "
                        "alternating; start a variant with a space so that it is not read as a flag of this script: "
                        "--variants '' ' --no-stream' ' --gpus 2'")
    p.add_argument("--batch-size", default="1", help="in-process: samples per pass (a number, or auto as the CLI's default)")
    p.add_argument("--memo-gb", type=float, nargs="+", default=[None], metavar="GB",
                   help="in-process: memory for memoized module outputs (the CLI's default: what the run does not "
                        "need of the GPU); several values run one after another, each on a fresh copy of the model, "
                        "each timed and its packed tensors hashed")
    p.add_argument("--build-only", action="store_true",
                   help="with --end-to-end --keep DIR: save the model and calibration file, run nothing")
    p.add_argument("--keep", metavar="DIR", default=None,
                   help="with --end-to-end: save the model, calibration file and output under DIR and keep them")
    a = p.parse_args()
    device = torch.device(a.device)

    t0 = time.perf_counter()
    model, full_layers = build(a.shape, a.layers, torch.bfloat16, device)
    build_s = time.perf_counter() - t0
    if a.end_to_end:
        print(json.dumps(end_to_end(model, a, full_layers, build_s)))
        return
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
    cfg = QuantConfig(bits=a.bits, group_size=a.group_size, mse=not a.no_mse, min_zero=gptq_v1.MIN_ZERO)
    plan = Plan(cfg, device, progress=False)
    # Warm-up, as GPTQModel gets one: a one-layer model of the same shape on two short
    # samples, so that one-time costs (Triton's compile on a machine's first run, CUDA
    # kernels loaded on first use) are reported apart instead of inside the first layer.
    t0 = time.perf_counter()
    if not a.no_warmup:
        warm, _ = build(a.shape, 1, torch.bfloat16, device)
        quantize_model(warm, family, _calibration([s[:64] for s in samples[:2]]), plan)
        del warm
    warmup_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    prof = None
    if a.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        prof = profile(activities=acts)
        prof.__enter__()
    t0 = time.perf_counter()
    batch = None if a.batch_size == "auto" else int(a.batch_size)
    if a.memo_gb != [None]:  # a comparison of memo budgets: per-layer times only, each on a fresh copy
        import copy

        memo = {}
        for gb in a.memo_gb:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            m = copy.deepcopy(model)
            t0 = time.perf_counter()
            o = quantize_model(m, family, _calibration(samples, batch), dataclasses.replace(plan, memo_bytes=int(gb * 1e9)))
            memo[gb] = {"quantize_s": round(time.perf_counter() - t0, 2), "layer_seconds": [round(x, 3) for x in o.layer_seconds],
                        "timings": {k: round(v, 2) for k, v in o.timings.items()},
                        "peak_gpu_gb": round(torch.cuda.max_memory_allocated(device) / 1e9, 2) if device.type == "cuda" else 0,
                        "packed_sha256": _digest(o.packed)}
            del m, o
        print(json.dumps({"shape": a.shape, "batch_size": a.batch_size, "memo": memo}))
        return
    outcome = quantize_model(model, family, _calibration(samples, batch), plan)
    quant_s = time.perf_counter() - t0
    if prof is not None:
        prof.__exit__(None, None, None)
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        Path(a.profile).write_text(prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=60))

    save_s = 0.0
    if not a.no_save:
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            state = checkpoint.outside_layers(model, family.layers, torch.float16, (), False)
            for module, tensors in outcome.packed.items():  # (the CLI takes these from its work directory)
                state.update({f"{module}.{k}": checkpoint.Stored.of(v) for k, v in tensors.items()})
            checkpoint.save_weights(checkpoint.natural_order(state), Path(tmp), parse_size("5GB"))
        save_s = time.perf_counter() - t0

    n = model.config.num_hidden_layers
    per_layer = (quant_s - outcome.timings["capture"]) / n
    ls = outcome.layer_seconds
    later = sum(ls[1:]) / (len(ls) - 1) if len(ls) > 1 else ls[0]
    result = {
        "shape": a.shape, "layers": n, "mse": not a.no_mse, "samples": a.samples, "seq_len": a.seq_len, "bits": a.bits,
        "group_size": a.group_size, "device": str(device),
        "card": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "seconds": {"build": round(build_s, 2), "warmup": round(warmup_s, 2),
                    **{k: round(v, 2) for k, v in outcome.timings.items()},
                    "quantize_total": round(quant_s, 2), "save": round(save_s, 2)},
        "seconds_per_layer": round(per_layer, 3),
        # The first layer also pays one-time costs (CUDA kernels loaded lazily, Triton's
        # compile cache): the full depth is extrapolated from the first and the later ones.
        "layer_seconds": [round(x, 3) for x in ls],
        "seconds_per_later_layer": round(later, 3),
        "extrapolated_all_layers_s": round(outcome.timings["capture"] + ls[0] + later * (full_layers - 1), 1),
        "peak_gpu_gb": round(torch.cuda.max_memory_allocated(device) / 1e9, 2) if device.type == "cuda" else 0,
        "peak_host_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
    }
    if a.compare == "gptqmodel":
        print(json.dumps(result), flush=True)  # ours first: the baseline may run out of time
        try:
            result["gptqmodel"] = g = run_gptqmodel(model_src, samples, a)
            result["speedup_per_layer"] = round(g["seconds_per_layer"] / per_layer, 2)
            result["speedup_quantize"] = round(g["quantize_s"] / quant_s, 2)
        except Exception as e:  # noqa: BLE001 - report ours even when the baseline cannot run this shape
            result["gptqmodel"] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
    print(json.dumps(result))


def _digest(packed: dict[str, dict[str, torch.Tensor]]) -> str:
    """sha256 over every packed tensor, in name order (equal digests: the same codes and scales)."""
    import hashlib

    h = hashlib.sha256()
    for module in sorted(packed):
        for leaf in sorted(packed[module]):
            t = packed[module][leaf].contiguous().cpu()
            h.update(f"{module}.{leaf}".encode())
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _calibration(samples: list[torch.Tensor], batch_size: int | None = 1) -> Calibration:
    return Calibration(make_batches(samples, batch_size, 0), len(samples))


def end_to_end(model, a, full_layers, build_s):
    """Time `python -m qwen_gptq quantize` as a user runs it, on the saved random model."""
    import shutil
    import subprocess

    from transformers import AutoTokenizer

    root = ROOT
    tmp = Path(a.keep) if a.keep else Path(tempfile.mkdtemp())
    tmp.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model.save_pretrained(tmp / "model")
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copyfile(root / "examples" / "qwen2-tiny" / f, tmp / "model" / f)
    # Calibration texts long enough for SEQ_LEN tokens each, from the example's held-out text.
    tok = AutoTokenizer.from_pretrained(tmp / "model")
    ids = tok((root / "examples" / "eval.txt").read_text(), add_special_tokens=False)["input_ids"]
    step = a.seq_len + 64
    texts = [tok.decode(ids[(i * step) % (len(ids) - step):][:step]) for i in range(a.samples)]
    data = [{"id": str(i), "conversations": [{"from": "user", "value": t[: len(t) // 2]},
                                             {"from": "assistant", "value": t[len(t) // 2:]}]} for i, t in enumerate(texts)]
    (tmp / "calib.json").write_text(json.dumps(data, ensure_ascii=False))
    prepare_s = time.perf_counter() - t0
    if a.build_only:
        return {"shape": a.shape, "dir": str(tmp), "build_s": round(build_s, 1), "prepare_s": round(prepare_s, 1)}
    cmd = [sys.executable, "-m", "qwen_gptq", "quantize", "--model_name_or_path", str(tmp / "model"),
           "--data_path", str(tmp / "calib.json"), "--out_path", str(tmp / "out"), "--bits", str(a.bits),
           "--group-size", str(a.group_size), "--max_len", str(a.seq_len), "--num-samples", str(a.samples),
           "--device", a.device, "--json", "--quiet", "--overwrite"] + (["--no-mse"] if a.no_mse else [])
    runs: dict[str, list] = {}
    for _ in range(a.repeat):
        for package in a.packages:  # alternating, so that drift in the machine hits all alike
            for variant in a.variants:
                t0 = time.perf_counter()
                r = subprocess.run(cmd + variant.split(), cwd=package, capture_output=True, text=True)
                wall = time.perf_counter() - t0
                if r.returncode != 0:
                    sys.exit(f"qwen-gptq quantize ({package} {variant}) failed ({r.returncode}):\n{r.stderr[-3000:]}")
                cli = json.loads(r.stdout)
                runs.setdefault(f"{package} {variant}".strip(), []).append({
                    "end_to_end_s": round(wall, 2), "cli_timings": cli["timings"],
                    "layer_seconds": [round(x, 2) for x in cli.get("layer_seconds", [])],
                    "peak_gpu_gb": round(cli["peak_gpu_bytes"] / 1e9, 2),
                    "peak_host_gb": round(cli["peak_host_bytes"] / 1e9, 2)})
    size = sum(f.stat().st_size for f in (tmp / "out").iterdir())
    if not a.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"shape": a.shape, "layers": len(cli["layers"]), "full_layers": full_layers, "samples": a.samples,
            "seq_len": a.seq_len, "tokens": cli["tokens"], "bits": a.bits, "group_size": a.group_size,
            "card": torch.cuda.get_device_name() if a.device.startswith("cuda") else platform.processor() or "cpu",
            "torch": torch.__version__, "transformers": __import__("transformers").__version__,
            "build_s": round(build_s, 1), "prepare_s": round(prepare_s, 1), "output_gb": round(size / 1e9, 2),
            "runs": runs}


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
