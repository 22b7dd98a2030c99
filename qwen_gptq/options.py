"""Every setting of `qwen-gptq quantize`: its name, default, choices and help, once.

The solver's settings are gptq.QuantConfig's fields (defaults there); the rest are
QuantizeOptions' fields. The CLI makes its flags from FLAGS and the fields' metadata
(`--group-size` and `--group_size` both), and quantize_config.json is written from a
QuantizeOptions. Which checkpoint format the output takes is decided here too: its
constraints (gptq_v1.MIN_ZERO) go into the solver's settings.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import MISSING, dataclass, field, fields
from types import MappingProxyType

import torch

from . import gptq_v1
from .errors import BadInput
from .gptq import CLIP_WEIGHTS, QuantConfig

DTYPES = ("float16", "bfloat16")  # of the tensors left unquantized


@dataclass(frozen=True)
class Flag:
    """How a setting appears on the command line."""

    help: str
    metavar: str | None = None
    choices: tuple | None = None
    negative: str | None = None  # for a bool that is on by default: the flag that turns it off
    positional: bool = False
    primary: str | None = None  # the spelling --help shows first, where run_gptq.py has one


# The solver settings a user sets, with their flags (defaults: QuantConfig's).
METHODS = ("gptq", "rtn")
SOLVER_FLAGS = MappingProxyType({
    "method": Flag("gptq; or rtn: round-to-nearest, no Hessians (a quick baseline in the same format)",
                   choices=METHODS),
    "bits": Flag("bits per weight", choices=gptq_v1.SUPPORTED_BITS),
    "group_size": Flag("columns per quantization group; -1 per channel", metavar="N"),
    "damp_percent": Flag("Hessian dampening, fraction of mean diag", metavar="F"),
    "desc_act": Flag("quantize columns in order of decreasing activation (--no-desc-act: off)", negative="--no-desc-act"),
    "sym": Flag("symmetric quantization (default); --asym: a zero point per group", negative="--asym"),
    "static_groups": Flag("fix group parameters before the solve"),
    "mse": Flag("per group, search a clipping range minimising the quantization error (--no-mse: plain min-max "
                "scales)", negative="--no-mse"),
    "clip_weight": Flag("how the clipping search weighs each column's error: uniform; activation (by its inputs' "
                        "mean square, llm-compressor's imatrix); loss (by its weight in GPTQ's loss)",
                        choices=CLIP_WEIGHTS),
    "act_group_aware": Flag("quantize groups in order of importance, and columns by importance inside each "
                            "(GPTQModel's act_group_aware): act-order's gain with g_idx left in order, so no "
                            "loader pays for a permutation (--no-act-group-aware: off)",
                            negative="--no-act-group-aware"),
    "gptaq": Flag("GPTAQ: fit each Linear to the full-precision model's outputs, so that it also corrects the "
                  "error of the layers before (runs a full-precision copy of each layer beside it: more time and "
                  "activation memory)"),
    "gptaq_alpha": Flag("with --gptaq, how far toward its target (0-1)", metavar="F"),
})


def option(help: str, default: typing.Any = None, **kw) -> typing.Any:
    """A dataclass field with its flag."""
    return field(default=default, metadata={"flag": Flag(help, **kw)})


@dataclass(frozen=True)
class QuantizeOptions:
    model_name_or_path: str = field(metadata={"flag": Flag("model directory (or hub id)", metavar="MODEL",
                                                           primary="--model_name_or_path")})
    data_path: str = field(metadata={"flag": Flag("calibration data (JSON list or JSON Lines)", metavar="FILE",
                                                  primary="--data_path")})
    out_path: str = field(metadata={"flag": Flag("output directory", metavar="DIR", primary="--out_path")})
    quant: QuantConfig = field(default_factory=lambda: QuantConfig(min_zero=gptq_v1.MIN_ZERO))
    true_sequential: bool = option("quantize q/k/v, o, gate/up, down one after another (--no-true-sequential: off)", True,
                               negative="--no-true-sequential")
    max_len: int = option("truncate each sample to N tokens", 8192, metavar="N", primary="--max_len")
    num_samples: int | None = option("use the first N samples (default: all)", None, metavar="N")
    device: str = option("auto (CUDA when available), cpu, cuda, cuda:N", "auto")
    gpus: str | None = option("quantize data-parallel on N GPUs of this machine, one process each (auto: every "
                              "visible GPU); the same as torchrun --nproc-per-node N -m qwen_gptq quantize ...",
                              None, metavar="N")
    batch_size: str = option("calibration samples per forward pass: N (padded to the longest; the padding is "
                             "masked out), or auto: samples of one length together, up to 8192 tokens a pass "
                             "(32768 for MoE models; nothing padded)", "auto", metavar="N|auto")
    seed: int | None = option("shuffle the samples with this seed before --num-samples", None, metavar="S")
    trust_remote_code: bool = option("allow the model's own code to run (Qwen1)", False)
    overwrite: bool = option("replace a non-empty --out_path (and start over instead of resuming)", False)
    resume: bool = option("continue an interrupted run of the same command from its finished layers "
                          "(--no-resume: start over)", True, negative="--no-resume")
    max_shard_size: str = option("split weights into shards of at most SIZE", "5GB", metavar="SIZE")
    dtype: str = option("dtype of unquantized tensors", "float16", choices=DTYPES)
    reference_config: str | None = option("config.json of an official quantized model", None, metavar="FILE")
    moe_calibrate_all_experts: bool = option("MoE: every expert sees every calibration token for its Hessian "
                                             "(the layer's output still uses the real routing), so none falls back "
                                             "to round-to-nearest; slower", False)
    pad_for_tp: int | None = option("zero-pad the MLPs' intermediate size so that vLLM splits it over N GPUs (and "
                                    "N's divisors); the padded model computes the same function", None, metavar="N")
    max_gpu_memory: str | None = option("stay under SIZE of GPU memory (default: the whole GPU); what the run does "
                                        "not need of it holds the layer's intermediate outputs, so that later "
                                        "passes reuse them instead of recomputing", None, metavar="SIZE")
    stream: bool = option("read each decoder layer from the checkpoint when its turn comes, so host memory does "
                          "not grow with the model's depth (--no-stream: load the whole model first)", True,
                          negative="--no-stream")
    progress: bool = True  # progress bars and per-layer lines (-q turns them off)

    @classmethod
    def build(cls, **settings) -> QuantizeOptions:
        """Options from flat settings (as the command line has them): the solver's go into
        `quant`, with the checkpoint format's constraints."""
        solver = {k: settings.pop(k) for k in list(settings) if k in SOLVER_FLAGS}
        return cls(quant=QuantConfig(**solver, min_zero=gptq_v1.MIN_ZERO), **settings)

    def validate(self) -> None:
        """BadInput (exit 2) for a value no run could use."""
        q = self.quant
        if q.method not in METHODS:
            raise BadInput(f"--method {q.method}: use {' or '.join(METHODS)}")
        if q.bits not in gptq_v1.SUPPORTED_BITS:
            raise BadInput(f"--bits {q.bits}: supported values are {', '.join(map(str, gptq_v1.SUPPORTED_BITS))}")
        if q.group_size == 0 or q.group_size < -1:
            raise BadInput(f"--group-size {q.group_size}: use -1 (per-channel) or a positive integer")
        if not 0 < q.damp_percent <= 1:
            raise BadInput(f"--damp-percent {q.damp_percent} must be in (0, 1]")
        if q.clip_weight not in CLIP_WEIGHTS:
            raise BadInput(f"--clip-weight {q.clip_weight}: use {', '.join(CLIP_WEIGHTS)}")
        if q.clip_weight != "uniform" and not q.mse:
            raise BadInput(f"--clip-weight {q.clip_weight} weighs the clipping search, which --no-mse turns off")
        if q.desc_act and q.act_group_aware:
            raise BadInput("--desc-act and --act-group-aware are two column orders: choose one "
                           "(--no-act-group-aware with --desc-act)")
        if not 0 <= q.gptaq_alpha <= 1:
            raise BadInput(f"--gptaq-alpha {q.gptaq_alpha} must be in [0, 1]")
        if q.static_groups and q.group_size == -1:
            raise BadInput("--static-groups needs a group size (not --group-size -1)")
        if self.max_len < 1:
            raise BadInput(f"--max_len {self.max_len} must be at least 1")
        if self.num_samples is not None and self.num_samples < 1:
            raise BadInput(f"--num-samples {self.num_samples} must be at least 1")
        if self.batch_size != "auto" and not (str(self.batch_size).isdigit() and int(self.batch_size) >= 1):
            raise BadInput(f"--batch-size {self.batch_size}: expected a number of samples (at least 1) or auto")
        if self.pad_for_tp is not None and self.pad_for_tp < 1:
            raise BadInput(f"--pad-for-tp {self.pad_for_tp} must be at least 1")
        if self.dtype not in DTYPES:
            raise BadInput(f"--dtype {self.dtype}: use {' or '.join(DTYPES)}")
        parse_size(self.max_shard_size)
        if self.max_gpu_memory is not None:
            parse_size(self.max_gpu_memory, "--max-gpu-memory")
        if self.gpus is not None and self.gpus != "auto" and not (self.gpus.isdigit() and int(self.gpus) >= 1):
            raise BadInput(f"--gpus {self.gpus}: expected a number of GPUs (at least 1) or auto")

    @property
    def batch_samples(self) -> int | None:
        """Samples per pass; None: auto (calib.make_batches)."""
        return None if self.batch_size == "auto" else int(self.batch_size)

    @property
    def gpu_memory_bytes(self) -> int | None:
        return None if self.max_gpu_memory is None else parse_size(self.max_gpu_memory, "--max-gpu-memory")

    @property
    def shard_bytes(self) -> int:
        return parse_size(self.max_shard_size)

    @property
    def save_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def quantization_config(self) -> dict:
        """The block written to quantize_config.json and config.json."""
        return gptq_v1.quantization_config(self.quant, self.true_sequential, self.model_name_or_path)

    def fingerprint_settings(self, device_type: str) -> dict:
        """Every setting that decides the quantized layers (for resume.fingerprint); the
        device by its type (CPU and CUDA round differently; cuda and cuda:0 do not)."""
        skip = ("out_path", "overwrite", "progress", "resume", "stream", "gpus", "device", "model_name_or_path", "data_path",
                "max_gpu_memory")
        return {**{k: v for k, v in dataclasses.asdict(self).items() if k not in skip}, "device": device_type}

    def report(self) -> dict:
        """The settings as `--json` reports them."""
        q = self.quant
        return {"method": q.method, "bits": q.bits, "group_size": q.group_size, "sym": q.sym, "damp_percent": q.damp_percent,
                "desc_act": q.desc_act, "static_groups": q.static_groups, "true_sequential": self.true_sequential,
                "mse": q.mse, "clip_weight": q.clip_weight, "act_group_aware": q.act_group_aware,
                "gptaq": q.gptaq, "gptaq_alpha": q.gptaq_alpha}


@dataclass(frozen=True)
class Setting:
    """One flag, for the command line to declare."""

    name: str
    type: type
    default: typing.Any
    flag: Flag
    required: bool


def settings(options: type) -> list[Setting]:
    """Every setting of an options dataclass that has a flag, in --help order (for
    QuantizeOptions, the solver's settings stand where its `quant` field does)."""
    out = []
    types = typing.get_type_hints(options)
    for f in fields(options):
        if types[f.name] is QuantConfig:
            solver = {s.name: s for s in fields(QuantConfig)}
            solver_types = typing.get_type_hints(QuantConfig)
            out += [Setting(n, solver_types[n], solver[n].default, flag, False) for n, flag in SOLVER_FLAGS.items()]
        elif "flag" in f.metadata:
            required = f.default is MISSING and f.default_factory is MISSING
            out.append(Setting(f.name, _base(types[f.name]), f.default, f.metadata["flag"], required))
    return out


def _base(t) -> type:
    """int for `int | None`."""
    args = [a for a in typing.get_args(t) if a is not type(None)]
    return args[0] if args else t


def parse_size(text: str, flag: str = "--max-shard-size") -> int:
    """'5GB', '500MB', '2GiB', '1000000' -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)?\s*", text.upper())
    if not m:
        raise BadInput(f"{flag} {text!r}: expected a size such as 5GB, 500MB or 2GiB")
    number, unit = float(m.group(1)), (m.group(2) or "B")
    base = 1024 if "I" in unit else 1000
    power = {"": 0, "B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit.rstrip("B").rstrip("I") or ""]
    size = int(number * base**power)
    if size <= 0:
        raise BadInput(f"{flag} {text!r} must be positive")
    return size
