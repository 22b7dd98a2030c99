"""`qwen-gptq quantize` as a function: load, calibrate, quantize, write.

The CLI parses flags into QuantizeOptions and calls run(); this module glues the
calibration data, the family registry, the pipeline and the checkpoint writer.
"""

from __future__ import annotations

import json
import logging
import random
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import calib, checkpoint
from .errors import BadInput
from .families import decoder_layers, family_for, prepare
from .gptq import QuantConfig
from .pipeline import check_dims, quantize_model

log = logging.getLogger("qwen_gptq")


@dataclass
class QuantizeOptions:
    model_name_or_path: str
    data_path: str
    out_path: str
    bits: int = 4
    group_size: int = 128
    max_len: int = 8192
    num_samples: int | None = None
    damp_percent: float = 0.01
    desc_act: bool = False
    sym: bool = True
    true_sequential: bool = True
    static_groups: bool = False
    mse: bool = True
    device: str = "auto"
    batch_size: int = 1
    seed: int | None = None
    trust_remote_code: bool = False
    overwrite: bool = False
    max_shard_size: str = "5GB"
    dtype: str = "float16"
    reference_config: str | None = None
    progress: bool = True


def validate(o: QuantizeOptions) -> None:
    if o.bits not in (2, 3, 4, 8):
        raise BadInput(f"--bits {o.bits}: supported values are 2, 3, 4 and 8")
    if o.group_size == 0 or o.group_size < -1:
        raise BadInput(f"--group-size {o.group_size}: use -1 (per-channel) or a positive integer")
    if o.max_len < 1:
        raise BadInput(f"--max_len {o.max_len} must be at least 1")
    if o.num_samples is not None and o.num_samples < 1:
        raise BadInput(f"--num-samples {o.num_samples} must be at least 1")
    if o.batch_size < 1:
        raise BadInput(f"--batch-size {o.batch_size} must be at least 1")
    if not 0 < o.damp_percent <= 1:
        raise BadInput(f"--damp-percent {o.damp_percent} must be in (0, 1]")
    if o.static_groups and o.group_size == -1:
        raise BadInput("--static-groups needs a group size (not --group-size -1)")
    if o.dtype not in ("float16", "bfloat16"):
        raise BadInput(f"--dtype {o.dtype}: use float16 or bfloat16")
    checkpoint.parse_size(o.max_shard_size)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise BadInput(f"--device {name}: expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BadInput(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    if dev.type not in ("cpu", "cuda"):
        raise BadInput(f"--device {name}: only cpu and cuda are supported")
    return dev


def resolve_model_dir(name: str) -> Path:
    p = Path(name)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise BadInput(f"--model_name_or_path {name}: no config.json in that directory")
        return p
    if p.exists() or name.startswith((".", "/")) or name.count("/") != 1:
        raise BadInput(f"--model_name_or_path {name}: not a model directory")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name))
    except Exception as e:  # noqa: BLE001 - any hub failure means the same to the user
        raise BadInput(f"--model_name_or_path {name}: not a local directory, and downloading it failed ({e})") from None


def read_config(model_dir: Path) -> dict:
    try:
        cfg = json.loads((model_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BadInput(f"{model_dir / 'config.json'}: cannot read ({e})") from None
    if not isinstance(cfg, dict):
        raise BadInput(f"{model_dir / 'config.json'}: not a JSON object")
    if "quantization_config" in cfg:
        raise BadInput(f"{model_dir}: the model is already quantized ({cfg['quantization_config'].get('quant_method')})")
    return cfg


def load_model(model_dir: Path, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype="auto", trust_remote_code=trust_remote_code, low_cpu_mem_usage=True
        )
    except (OSError, ValueError) as e:
        raise BadInput(f"cannot load the model from {model_dir}: {e}") from None
    model.eval()
    model.config.use_cache = False
    return model, tokenizer


def pad_token_id(tokenizer) -> int:
    for attr in ("pad_token_id", "eod_id", "eos_token_id"):
        v = getattr(tokenizer, attr, None)
        if isinstance(v, int):
            return v
    return 0


def run(o: QuantizeOptions) -> dict:
    started = time.perf_counter()
    validate(o)
    out = Path(o.out_path)
    checkpoint.prepare_out_path(out, o.overwrite)
    device = resolve_device(o.device)
    model_dir = resolve_model_dir(o.model_name_or_path)
    src_config = read_config(model_dir)
    family = family_for(src_config.get("model_type"))
    if family.remote_code and not o.trust_remote_code:
        raise BadInput(
            f"{o.model_name_or_path} is a {family.name} model whose code ships with the checkpoint; "
            "loading it runs that code, so add --trust-remote-code if you trust it"
        )
    cfg = QuantConfig(
        bits=o.bits, group_size=o.group_size, sym=o.sym, damp_percent=o.damp_percent, desc_act=o.desc_act,
        static_groups=o.static_groups, true_sequential=o.true_sequential, mse=o.mse,
    )
    qconfig = checkpoint.quantization_config(cfg, o.model_name_or_path)
    if o.reference_config:
        try:
            reference = json.loads(Path(o.reference_config).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise BadInput(f"--reference-config {o.reference_config}: cannot read ({e})") from None
        checkpoint.check_reference_config(reference, qconfig, o.reference_config)
        src_config = {**src_config, **{k: v for k, v in reference.items() if k != "quantization_config"}}
        qconfig = {**reference["quantization_config"], **qconfig}

    samples = calib.read_samples(o.data_path)
    if o.seed is not None:
        random.Random(o.seed).shuffle(samples)
    if o.num_samples is not None:
        samples = samples[: o.num_samples]

    t0 = time.perf_counter()
    model, tokenizer = load_model(model_dir, o.trust_remote_code)
    prepare(model, family)
    load_seconds = time.perf_counter() - t0
    layers = decoder_layers(model, family)
    for layer in layers:  # MoE models can mix dense and sparse layers
        check_dims(layer, family, o.bits, o.group_size)
    ids = calib.tokenize_samples(samples, tokenizer, o.max_len)
    n_tokens = sum(len(x) for x in ids)
    log.info(
        "quantizing %s (%s, %d layers) to %d-bit, group %d on %s with %d samples, %d tokens",
        o.model_name_or_path, family.name, len(layers), o.bits, o.group_size, device, len(ids), n_tokens,
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    outcome = quantize_model(model, family, ids, cfg, device, o.batch_size, pad_token_id(tokenizer), o.progress)

    t0 = time.perf_counter()
    dtype = getattr(torch, o.dtype)
    state = checkpoint.build_state_dict(model, outcome.packed, dtype)
    with checkpoint.staging_dir(out, o.overwrite) as tmp:
        files = checkpoint.save_weights(state, tmp, checkpoint.parse_size(o.max_shard_size))
        files += checkpoint.copy_model_files(model_dir, tmp)
        checkpoint.write_config(src_config, qconfig, dtype, tmp)
        checkpoint.write_quant_log(outcome.stats, tmp)
        files += ["config.json", "quantize_config.json", "quant_log.csv"]
        checkpoint.finalize_permissions(tmp)
    save_seconds = time.perf_counter() - t0

    timings = {"load": load_seconds, **outcome.timings, "save": save_seconds}
    per_layer = {}
    for s in outcome.stats:
        per_layer.setdefault(s.layer, []).append(s.loss)
    return {
        "out_path": str(out),
        "model": o.model_name_or_path,
        "family": family.name,
        "settings": {k: v for k, v in asdict(cfg).items() if k != "blocksize"},
        "device": str(device),
        "samples": len(ids),
        "tokens": n_tokens,
        "layers": [{"layer": k, "mean_loss": sum(v) / len(v)} for k, v in sorted(per_layer.items())],
        "rtn_fallbacks": [f"{s.layer}.{s.module}" for s in outcome.stats if s.method == "rtn"],
        "files": sorted(files),
        "wall_seconds": time.perf_counter() - started,
        "timings": {k: round(v, 4) for k, v in timings.items()},
        "peak_gpu_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0,
        "peak_host_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
