"""What to quantize: one small definition per Qwen model family.

A family says where the decoder layers live, which Linears of a layer are
quantized in which true-sequential order (names relative to the layer; `*`
matches one name component, for MoE experts), and which Linears stay in full
precision. Adding a family is adding an entry to FAMILIES: nothing else in the package
names a family.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from torch import nn

from .errors import BadInput


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    description: str
    layers: str  # dotted path of the ModuleList of decoder layers
    sequential: tuple[tuple[str, ...], ...]  # groups of Linear name patterns, in order
    keep: tuple[str, ...] = ()  # Linear name patterns left unquantized (MoE routers)
    remote_code: bool = False
    moe: bool = False  # fused expert tensors are split into per-expert Linears (hf.unfuse_experts)


_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_DENSE = (_ATTN, ("self_attn.o_proj",), ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))
_MOE = (
    _ATTN,
    ("self_attn.o_proj",),
    ("mlp.experts.*.gate_proj", "mlp.experts.*.up_proj", "mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj",
     "mlp.gate_proj", "mlp.up_proj"),  # the last two: dense layers of MoE models (mlp_only_layers)
    ("mlp.experts.*.down_proj", "mlp.shared_expert.down_proj", "mlp.down_proj"),
)

FAMILIES: tuple[Family, ...] = (
    Family(
        name="qwen",
        model_types=("qwen",),
        description="Qwen (1st generation, remote code: transformer.h.*.attn.c_attn)",
        layers="transformer.h",
        sequential=(("attn.c_attn",), ("attn.c_proj",), ("mlp.w1", "mlp.w2"), ("mlp.c_proj",)),
        remote_code=True,
    ),
    Family(
        name="qwen2",
        model_types=("qwen2",),
        description="Qwen1.5, Qwen2, Qwen2.5 (model_type qwen2)",
        layers="model.layers",
        sequential=_DENSE,
    ),
    Family(
        name="qwen3",
        model_types=("qwen3",),
        description="Qwen3 dense (q/k RMSNorm, no q/k/v bias)",
        layers="model.layers",
        sequential=_DENSE,
    ),
    Family(
        name="qwen2_moe",
        model_types=("qwen2_moe",),
        description="Qwen1.5-MoE, Qwen2-MoE (experts plus a shared expert)",
        layers="model.layers",
        sequential=_MOE,
        keep=("mlp.gate", "mlp.shared_expert_gate"),
        moe=True,
    ),
    Family(
        name="qwen3_moe",
        model_types=("qwen3_moe",),
        description="Qwen3-MoE",
        layers="model.layers",
        sequential=_MOE,
        keep=("mlp.gate",),
        moe=True,
    ),
)


def supported_types() -> list[str]:
    return [t for f in FAMILIES for t in f.model_types]


def family_for(model_type: str | None) -> Family:
    for f in FAMILIES:
        if model_type in f.model_types:
            return f
    raise BadInput(
        f"model_type {model_type!r} is not supported; supported model types: {', '.join(supported_types())} "
        "(run `qwen-gptq models` for the list)"
    )


def decoder_layers(model: nn.Module, family: Family) -> nn.ModuleList:
    try:
        return model.get_submodule(family.layers)
    except AttributeError:
        raise BadInput(f"the model has no {family.layers!r}: it does not look like a {family.name} model") from None


def layer_groups(layer: nn.Module, family: Family) -> list[list[str]]:
    """The Linears of one decoder layer, resolved to names, in true-sequential groups.

    Every Linear of the layer must be either quantized or explicitly kept: a Linear
    the family does not know about is a bug in the family, not something to skip.
    """
    linears = [n for n, m in layer.named_modules() if isinstance(m, nn.Linear)]
    groups, used = [], set()
    for patterns in family.sequential:
        names = [n for p in patterns for n in linears if _match(n, p) and n not in used]
        used.update(names)
        if names:
            groups.append(names)
    kept = {n for n in linears for p in family.keep if _match(n, p)}
    unknown = [n for n in linears if n not in used and n not in kept]
    if unknown:
        raise BadInput(f"family {family.name}: decoder layer has Linear modules it does not know: {', '.join(unknown)}")
    if not groups:
        raise BadInput(f"family {family.name}: found no Linear modules to quantize in the decoder layer")
    return groups


def _match(name: str, pattern: str) -> bool:
    if "*" not in pattern:
        return name == pattern
    parts, pats = name.split("."), pattern.split(".")
    return len(parts) == len(pats) and all(fnmatch.fnmatchcase(a, b) for a, b in zip(parts, pats))


def quantized_module_suffixes(family: Family) -> list[list[str]]:
    """The family's true-sequential groups as name suffixes (`modules_in_block_to_quantize`
    in transformers' GPTQConfig: a Linear whose name ends with none of them stays unquantized)."""
    groups = []
    for patterns in family.sequential:
        names = [p.rsplit("*.", 1)[-1] for p in patterns]
        groups.append(list(dict.fromkeys(names)))
    return groups
