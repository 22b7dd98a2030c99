"""`qwen-gptq quantize` as a function: check the input, load, calibrate, quantize, write.

Everything a user can get wrong is checked before the model loads (settings, output
path, device, model directory, calibration file); then the pipeline runs and the
output directory is written atomically.
"""

from __future__ import annotations

import copy
import errno
import logging
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from . import calib, checkpoint, distributed, gptq_v1, hf, resume, runtime, serving, stream
from .errors import BadInput, QuantizationFailed
from .families import Family, decoder_layers, family_for, layer_groups
from .gptq import QuantConfig
from .options import QuantizeOptions
from .pipeline import Plan, quantize_model

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase as Tokenizer

log = logging.getLogger("qwen_gptq")


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


def read_source_config(model_dir: Path) -> dict:
    cfg = checkpoint.read_json(model_dir / "config.json")
    if "quantization_config" in cfg:
        raise BadInput(f"{model_dir}: the model is already quantized ({cfg['quantization_config'].get('quant_method')})")
    return cfg


def quantized_linears(layers: nn.ModuleList, family: Family) -> Iterator[tuple[int, str, nn.Linear]]:
    """(layer index, name within the layer, module) of every Linear the family quantizes,
    in every layer (MoE models can mix dense and sparse layers)."""
    for i, layer in enumerate(layers):
        for names in layer_groups(layer, family):
            for n in names:
                yield i, n, layer.get_submodule(n)


def check_packable(layers: nn.ModuleList, family: Family, cfg: QuantConfig) -> None:
    """Exit 2, naming the Linear, if a shape cannot be stored in the checkpoint format."""
    for _, n, m in quantized_linears(layers, family):
        problem = gptq_v1.packing_problem(n, m.in_features, m.out_features, cfg)
        if problem:
            raise BadInput(problem)


def warn_if_not_servable(layers: nn.ModuleList, family: Family, o: QuantizeOptions, config: dict) -> None:
    """Say before the work starts when vLLM will not load the output, or not split it."""
    q = o.quant
    problem = serving.kernel_problem(q.bits, q.sym, q.group_size)
    if problem:
        log.warning("vLLM will not load the output: %s (transformers and GPTQModel will)", problem)
        return
    linears = [serving.Linear(f"{family.layers}.{i}.{n}", m.in_features, m.out_features)
               for i, n, m in quantized_linears(layers, family)]
    kv = config.get("text_config", config).get("num_key_value_heads")
    report = serving.vllm_report({"bits": q.bits, "sym": q.sym, "group_size": q.group_size}, linears, kv)
    if 2 not in report.tp_sizes:
        log.warning("vLLM will load the output at tensor-parallel sizes %s only (%s); --pad-for-tp 2 (or 4, 8) pads "
                    "the MLPs so that they split", report.tp_sizes, report.notes[0] if report.notes else "")


def run(o: QuantizeOptions) -> dict:
    started = time.perf_counter()
    o.validate()
    out = Path(o.out_path)
    checkpoint.prepare_out_path(out, o.overwrite)
    device = runtime.resolve_device(o.device)
    model_dir = resolve_model_dir(o.model_name_or_path)
    src_config = read_source_config(model_dir)
    family = family_for(src_config.get("model_type"))
    if family.remote_code and not o.trust_remote_code:
        raise BadInput(
            f"{o.model_name_or_path} is a {family.name} model whose code ships with the checkpoint; "
            "loading it runs that code, so add --trust-remote-code if you trust it"
        )
    qconfig = o.quantization_config()
    if o.reference_config:
        reference = checkpoint.read_json(Path(o.reference_config))
        gptq_v1.check_reference_config(reference, qconfig, o.reference_config)
        src_config = {**src_config, **{k: v for k, v in reference.items() if k != "quantization_config"}}
        qconfig = {**reference["quantization_config"], **qconfig}
    samples = calib.select(calib.read_samples(o.data_path), o.num_samples, o.seed)
    ranks, device = distributed.init(device)  # (torchrun) after the checks: every rank makes them, and exits 2 alike
    # (from here on, a failure leaves the process group as it is: see distributed.finish)
    if o.max_gpu_memory is not None and device.type == "cuda":
        runtime.limit_gpu_memory(device, o.gpu_memory_bytes)
    with runtime.timeline(ranks.rank):  # (QWEN_GPTQ_TIMELINE: its file opened, or refused, before the loading)
        result = _run_checked(o, _Checked(model_dir, family, src_config, qconfig, device, samples, ranks), started)
    distributed.finish()
    return result


def _run_checked(o: QuantizeOptions, c: _Checked, started: float) -> dict:
    out, ranks = Path(o.out_path), c.ranks
    auto_tokens = c.auto_batch_tokens if o.batch_samples is None else None
    print_ = resume.fingerprint(c.model_dir, o.data_path, {**o.fingerprint_settings(c.device.type),
                                                           "processes": ranks.size, "auto_batch_tokens": auto_tokens})
    if ranks.main:
        work = resume.WorkDir.open(out, print_, o.resume and not o.overwrite, o.save_dtype)
    distributed.barrier(ranks)
    if not ranks.main:
        work = resume.WorkDir(resume.work_path(out))  # read (to resume), never written
    try:
        result = _quantize_and_write(o, c, work)
    except BaseException as e:
        if ranks.main and work.finished() == 0:
            work.remove()  # nothing worth keeping
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            where = Path(e.filename or out.parent)
            free = shutil.disk_usage(where if where.exists() else out.parent).free
            raise QuantizationFailed(
                f"{where}: no space left on the device ({getattr(e, 'needed', 'more')} bytes to write, {free} free); "
                f"free some space and run the same command again: the {work.finished()} finished layer(s) are kept "
                f"in {work.path}") from None
        raise
    if ranks.main:
        work.remove()  # the output is whole: nothing to resume
    return {**result, "wall_seconds": time.perf_counter() - started}


@dataclass
class _Checked:
    """What run() checked before loading anything."""

    model_dir: Path
    family: Family
    src_config: dict
    qconfig: dict
    device: torch.device
    samples: list[calib.Sample]
    ranks: distributed.Group

    @property
    def auto_batch_tokens(self) -> int:
        """--batch-size auto's tokens a pass for this model (the fingerprint holds it too: it
        decides how an MoE layer's rows are summed)."""
        return calib.auto_batch_tokens(self.family.moe)


def _load(o: QuantizeOptions, c: _Checked) -> tuple[nn.Module, Tokenizer, runtime.Weights]:
    """The model to quantize, and where its layers' weights come from: streamed from the
    checkpoint one layer at a time (a skeleton on the meta device; host memory does not
    grow with depth), or the whole model loaded when --no-stream or when the checkpoint's
    tensors do not map onto the model by streaming's rules."""
    if o.stream:
        try:
            streamed, tokenizer = stream.open_streamed(c.model_dir, c.family, o.trust_remote_code,
                                                       o.moe_calibrate_all_experts)
            log.info("streaming the decoder layers from %s, one at a time", c.model_dir)
            return streamed.model, tokenizer, runtime.Weights(streamed.fill, streamed.release)
        except stream.NotStreamable as e:
            log.warning("cannot stream this checkpoint (%s); loading the whole model into memory", e)
    model, tokenizer = hf.load_model(c.model_dir, "auto", o.trust_remote_code)
    hf.prepare(model, c.family, o.moe_calibrate_all_experts)
    return model, tokenizer, runtime.Weights()


def _pad(o: QuantizeOptions, c: _Checked, layers: nn.ModuleList, weights: runtime.Weights) -> tuple[
        nn.ModuleList, runtime.Weights]:
    """--pad-for-tp: the layers as they will be quantized (for the checks), and the
    padding done as each streamed layer is filled (a loaded model is padded now)."""
    if not o.pad_for_tp:
        return layers, weights

    def size_for(n: int) -> int:
        return serving.padded_size(n, o.pad_for_tp, o.quant.group_size)

    streamed = weights.release is not None
    shaped = copy.deepcopy(layers) if streamed else layers  # streamed: on the meta device, a copy costs nothing
    changed = hf.pad_mlps(shaped, size_for)
    c.src_config.get("text_config", c.src_config).update(changed)
    log.info("padded for tensor parallelism %d: %s", o.pad_for_tp,
             ", ".join(f"{k} {v}" for k, v in changed.items()) or "nothing needed padding")
    if not streamed:
        return shaped, weights

    def fill(layer: nn.Module) -> None:
        weights.fill(layer)
        hf.pad_mlps(nn.ModuleList([layer]), size_for)

    return shaped, runtime.Weights(fill, weights.release)


def _quantize_and_write(o: QuantizeOptions, c: _Checked, work: resume.WorkDir) -> dict:
    model_dir, family, device = c.model_dir, c.family, c.device
    out = Path(o.out_path)
    t0 = time.perf_counter()
    model, tokenizer, weights = _load(o, c)
    load_seconds = time.perf_counter() - t0
    layers = decoder_layers(model, family)
    shaped, weights = _pad(o, c, layers, weights)
    check_packable(shaped, family, o.quant)
    warn_if_not_servable(shaped, family, o, c.src_config)
    calibration = calib.calibration(c.samples, tokenizer, o.max_len, o.batch_samples, c.auto_batch_tokens)
    samples, tokens = calibration.samples, calibration.tokens
    log.info(
        "quantizing %s (%s, %d layers) to %d-bit, group %d on %s with %d samples, %d tokens%s",
        o.model_name_or_path, family.name, len(layers), o.quant.bits, o.quant.group_size, device, samples, tokens,
        f", data-parallel over {c.ranks.size} processes" if c.ranks.size > 1 else "",
    )
    calibration = _my_share(c.ranks, calibration)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    plan = Plan(o.quant, device, o.true_sequential, o.progress and c.ranks.main, work=work, weights=weights,
                group=c.ranks, gpu_memory=o.gpu_memory_bytes)
    # Rank 0 writes the tensors outside the decoder layers into the work directory while
    # the layers are quantized (the pool's exit waits for it, also when quantizing fails).
    # They are converted to --dtype here: torch's parallel CPU kernels run from a second
    # thread slowed every CPU run by a third, for the whole run, even after they ended.
    with ThreadPoolExecutor(1, thread_name_prefix="qwen-gptq-outside") as writer:
        outside = writer.submit(work.save_outside, _outside_tensors(o, c, model)) if c.ranks.main else None
        outcome = quantize_model(model, family, calibration, plan)
    # Each process's own timings (a slow one shows as waits in the others' solves).
    ranks = distributed.gathered(c.ranks, {"layer_seconds": [round(x, 3) for x in outcome.layer_seconds],
                                           "timings": {k: round(v, 4) for k, v in outcome.timings.items()}})
    if not c.ranks.main:
        return {"rank": c.ranks.rank}  # rank 0 writes
    outside.result()

    t0 = time.perf_counter()
    shards = [checkpoint.TensorFile(p) for p in work.files(len(layers))]  # (headers read once)
    linked = checkpoint.linkable(shards, o.shard_bytes)
    state = {} if linked else _output_tensors(shards)
    try:
        with checkpoint.staging_dir(out, o.overwrite) as tmp:
            files = checkpoint.link_shards(shards, tmp) if linked else checkpoint.save_weights(state, tmp, o.shard_bytes)
            files += checkpoint.copy_model_files(model_dir, tmp)
            checkpoint.write_config(c.src_config, c.qconfig, o.save_dtype, tmp)
            checkpoint.write_quant_log(outcome.stats, tmp)
            files += ["config.json", "quantize_config.json", "quant_log.csv"]
            checkpoint.finalize_permissions(tmp)
    except OSError as e:
        e.needed = sum(t.nbytes for t in state.values()) or "more"  # for the message
        raise
    save_seconds = time.perf_counter() - t0

    timings = {"load": load_seconds, **outcome.timings, "save": save_seconds}
    per_layer: dict[int, list[float]] = {}
    for s in outcome.stats:
        per_layer.setdefault(s.layer, []).append(s.loss)
    return {
        "out_path": str(out),
        "model": o.model_name_or_path,
        "family": family.name,
        "settings": o.report(),
        "device": str(device),
        "samples": samples,
        "tokens": tokens,
        "processes": c.ranks.size,
        "layers": [{"layer": k, "mean_loss": sum(v) / len(v)} for k, v in sorted(per_layer.items())],
        "layer_seconds": [round(x, 3) for x in outcome.layer_seconds],
        "rtn_fallbacks": [f"{s.layer}.{s.module}" for s in outcome.stats if s.method == "rtn" and o.quant.method == "gptq"],
        "files": sorted(files),
        "timings": {k: round(v, 4) for k, v in timings.items()},
        **({"ranks": ranks} if c.ranks.size > 1 else {}),
        "peak_gpu_bytes": runtime.peak_gpu_bytes(device),
        "peak_host_bytes": runtime.peak_host_bytes(),
    }


def _my_share(ranks: distributed.Group, calibration: calib.Calibration) -> calib.Calibration:
    """This process's calibration batches (all of them in a single process)."""
    if ranks.size == 1:
        return calibration
    if len(calibration.batches) < ranks.size:
        raise BadInput(f"{len(calibration.batches)} calibration batch(es) for {ranks.size} processes: use more "
                       "samples, a smaller --batch-size or fewer processes")
    mine = distributed.share(ranks, [b.tokens for b in calibration.batches])
    return calib.Calibration([calibration.batches[j] for j in mine], calibration.samples)


def _outside_tensors(o: QuantizeOptions, c: _Checked, model: nn.Module) -> dict[str, checkpoint.Stored]:
    """The output's tensors outside the decoder layers: the model's own (embeddings, final
    norm, lm_head; in --dtype) and those outside the language model as stored (vision
    tower, ...; under transformers' names), each read when the writer reaches it."""
    family = c.family
    state = checkpoint.outside_layers(model, family.layers, o.save_dtype, family.passthrough,
                                      hf.tied_embeddings(model.config))
    verbatim = checkpoint.stored_tensors(c.model_dir, family.passthrough)
    rules = checkpoint.prefix_renames(verbatim, model.state_dict())
    state.update({checkpoint.renamed(k, rules): v for k, v in verbatim.items()})
    return state


def _output_tensors(files: list[checkpoint.TensorFile]) -> dict[str, checkpoint.Stored]:
    """Every tensor of the output, from the work directory's files, each read when the
    writer reaches it, in natural order."""
    state = {}
    for f in files:
        state.update({k: checkpoint.Stored.from_file(f, k) for k in f.names()})
    return checkpoint.natural_order(state)
