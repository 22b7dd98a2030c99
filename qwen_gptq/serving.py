"""Will vLLM serve this checkpoint, and at which tensor-parallel sizes? Its rules, in one table.

Read from vLLM's source (model_executor/layers/quantization/auto_gptq.py and
utils/marlin_utils.py) as of PR #38288 (2026-03), which made Marlin the only GPTQ path
(the exllama `gptq.py` was removed in #45051). Update VLLM when vLLM changes them.

Everything here works from shapes and names alone: nothing is loaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import MappingProxyType

VLLM = MappingProxyType({
    "source": "vLLM auto_gptq.py / marlin_utils.py, PR #38288 (2026-03)",
    "types": ((4, True), (8, True)),  # (bits, sym) Marlin takes; others: "Unsupported quantization config"
    "group_sizes": (-1, 32, 64, 128),
    "min_thread_n": 64,  # a partition's output width must be a multiple of this
    "min_thread_k": 128,  # a partition's input width must be a multiple of this (and of the group size)
    "tp_sizes": (1, 2, 4, 8),  # the tensor-parallel sizes reported
    # Linears vLLM splits by input (row-parallel); all others are split by output.
    "row_parallel": ("o_proj", "down_proj", "out_proj", "c_proj"),
    # Built without a quantization method: a quantized one fails (KeyError ...mlp.gate.g_idx, vLLM #25029).
    "never_quantized": ("mlp.gate", "mlp.shared_expert_gate"),
    "kv_projections": ("k_proj", "v_proj"),  # replicated across ranks when there are fewer KV heads than ranks
})


@dataclass(frozen=True)
class Linear:
    """A quantized Linear as stored: its name and full (unsplit) shape."""

    name: str
    in_features: int
    out_features: int


@dataclass
class Report:
    loads: bool
    tp_sizes: list[int]
    problems: list[str] = field(default_factory=list)  # why it does not load at all
    notes: list[str] = field(default_factory=list)  # why some tensor-parallel sizes are out, and slower paths

    def figures(self) -> dict:
        return {"loads": self.loads, "tp_sizes": self.tp_sizes}


def kernel_problem(bits: int, sym: bool, group_size: int) -> str | None:
    """Why vLLM refuses these settings outright, or None."""
    if (bits, sym) not in VLLM["types"]:
        kinds = " and ".join(f"{b}-bit {'sym' if s else 'asym'}" for b, s in VLLM["types"])
        return f"vLLM serves GPTQ only through Marlin, which takes {kinds}; this is {bits}-bit {'sym' if sym else 'asym'}"
    if group_size not in VLLM["group_sizes"]:
        return f"vLLM's Marlin takes group sizes {VLLM['group_sizes']}; this is {group_size}"
    return None


def _partition(lin: Linear, tp: int, kv_heads: int | None) -> tuple[int, int] | None:
    """(input, output) width of one rank's share, or None if it does not split evenly."""
    leaf = lin.name.rsplit(".", 1)[-1]
    if leaf in VLLM["row_parallel"]:
        return (lin.in_features // tp, lin.out_features) if lin.in_features % tp == 0 else None
    if leaf in VLLM["kv_projections"] and kv_heads and kv_heads < tp:
        if tp % kv_heads:
            return None
        return lin.in_features, lin.out_features // kv_heads  # one head per rank, replicated
    return (lin.in_features, lin.out_features // tp) if lin.out_features % tp == 0 else None


def shape_problem(lin: Linear, tp: int, group_size: int, kv_heads: int | None = None) -> str | None:
    """Why this Linear cannot be split for Marlin at tensor parallelism tp, or None."""
    part = _partition(lin, tp, kv_heads)
    if part is None:
        return f"{lin.name}: {lin.in_features}x{lin.out_features} does not split evenly over {tp} GPUs"
    k, n = part
    unit = VLLM["min_thread_k"] if group_size == -1 else math.lcm(VLLM["min_thread_k"], group_size)
    if k % unit:
        return f"{lin.name}: input {k} per GPU at TP {tp} is not a multiple of {unit}"
    if n % VLLM["min_thread_n"]:
        return f"{lin.name}: output {n} per GPU at TP {tp} is not a multiple of {VLLM['min_thread_n']}"
    return None


def vllm_report(q: dict, linears: list[Linear], kv_heads: int | None = None) -> Report:
    """Whether vLLM loads a GPTQ checkpoint with this quantization config and these
    quantized Linears, and at which tensor-parallel sizes every Linear meets Marlin's
    shape rules."""
    problems = []
    kernel = kernel_problem(q.get("bits"), q.get("sym", True), q.get("group_size"))
    if kernel:
        problems.append(kernel)
    for lin in linears:
        module = lin.name.split(".", 3)[-1] if ".layers." in lin.name else lin.name
        if any(module.endswith(n) for n in VLLM["never_quantized"]):
            problems.append(f"{lin.name} is quantized, but vLLM builds it unquantized (a quantized router fails "
                            "with KeyError ...g_idx)")
    if problems:
        return Report(False, [], problems)
    tp_sizes, notes = [], []
    for tp in VLLM["tp_sizes"]:
        issue = next((p for lin in linears if (p := shape_problem(lin, tp, q["group_size"], kv_heads))), None)
        if issue is None:
            tp_sizes.append(tp)
        else:
            notes.append(f"TP {tp}: {issue}")
    if not tp_sizes:
        problems.append(notes[0])
    return Report(bool(tp_sizes), tp_sizes, problems, notes)


def padded_size(size: int, tp: int, group_size: int) -> int:
    """The smallest width >= size that splits over tp (and each of its divisors) into
    shares Marlin takes as inputs and outputs."""
    unit = math.lcm(VLLM["min_thread_k"], VLLM["min_thread_n"], group_size if group_size > 0 else 1) * tp
    return math.ceil(size / unit) * unit
