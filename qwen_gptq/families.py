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
from types import MappingProxyType

from torch import nn

from .errors import BadInput


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    description: str
    layers: str  # dotted path of the ModuleList of decoder layers
    sequential: tuple[tuple[str, ...], ...]  # groups of Linear name patterns, in order
    keep: tuple[str, ...] = ()  # Linear name patterns left unquantized (routers, vLLM's 16-bit modules)
    remote_code: bool = False
    moe: bool = False  # fused expert tensors are split into per-expert Linears (hf.unfuse_experts)
    # Checkpoint tensors outside the language model (vision tower, multi-token prediction):
    # copied to the output byte for byte under their own names, by name prefix.
    passthrough: tuple[str, ...] = ()


_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_ATTN_OUT = ("self_attn.o_proj",)
_DENSE = (_ATTN, _ATTN_OUT, ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))
_MOE_UP = ("mlp.experts.*.gate_proj", "mlp.experts.*.up_proj", "mlp.shared_expert.gate_proj",
           "mlp.shared_expert.up_proj", "mlp.gate_proj", "mlp.up_proj")  # the last two: dense layers of MoE models
_MOE_DOWN = ("mlp.experts.*.down_proj", "mlp.shared_expert.down_proj", "mlp.down_proj")
_MOE = (_ATTN, _ATTN_OUT, _MOE_UP, _MOE_DOWN)
# Gated DeltaNet (linear attention) layers of Qwen3-Next (in_proj_qkvz) and Qwen3.5
# (in_proj_qkv + in_proj_z): their q/k/v/z projections, then out_proj. Full-attention
# layers match _ATTN instead; a layer has one or the other.
_GDN_IN = ("linear_attn.in_proj_qkvz", "linear_attn.in_proj_qkv", "linear_attn.in_proj_z")
_GDN_OUT = ("linear_attn.out_proj",)
_HYBRID = (_ATTN, _ATTN_OUT, _GDN_IN, _GDN_OUT, ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))
_HYBRID_MOE = (_ATTN, _ATTN_OUT, _GDN_IN, _GDN_OUT, _MOE_UP, _MOE_DOWN)
# Kept in 16 bits, as vLLM builds them and every public quantized release ships them:
# the per-head gates b/a (vLLM fuses them into in_proj_ba, which tensor parallelism >= 2
# splits too finely for Marlin), the MoE router and the shared expert's gate (H -> 1).
_GDN_KEEP = ("linear_attn.in_proj_b", "linear_attn.in_proj_a", "linear_attn.in_proj_ba")
_ROUTERS = ("mlp.gate", "mlp.shared_expert_gate")
_VISION = ("model.visual.", "visual.")  # (older Qwen2.5-VL checkpoints: `visual.` at the top)
_MTP = ("mtp.",)
_VL_LAYERS = "model.language_model.layers"

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
        keep=_ROUTERS,
        moe=True,
    ),
    Family(
        name="qwen3_moe",
        model_types=("qwen3_moe",),
        description="Qwen3-MoE",
        layers="model.layers",
        sequential=_MOE,
        keep=_ROUTERS,
        moe=True,
    ),
    Family(
        name="qwen3_next",
        model_types=("qwen3_next",),
        description="Qwen3-Next (hybrid Gated DeltaNet / gated attention, MoE with a shared expert)",
        layers="model.layers",
        sequential=_HYBRID_MOE,
        keep=_GDN_KEEP + _ROUTERS,
        moe=True,
        passthrough=_MTP,
    ),
    Family(
        name="qwen3_5",
        model_types=("qwen3_5",),
        description="Qwen3.5 / Qwen3.6 dense (hybrid; vision-language checkpoint: language model only)",
        layers=_VL_LAYERS,
        sequential=_HYBRID,
        keep=_GDN_KEEP,
        passthrough=_VISION + _MTP,
    ),
    Family(
        name="qwen3_5_text",
        model_types=("qwen3_5_text",),
        description="Qwen3.5 dense, text-only checkpoint",
        layers="model.layers",
        sequential=_HYBRID,
        keep=_GDN_KEEP,
        passthrough=_MTP,
    ),
    Family(
        name="qwen3_5_moe",
        model_types=("qwen3_5_moe",),
        description="Qwen3.5 / Qwen3.6 MoE (hybrid, shared expert; vision-language checkpoint: language model only)",
        layers=_VL_LAYERS,
        sequential=_HYBRID_MOE,
        keep=_GDN_KEEP + _ROUTERS,
        moe=True,
        passthrough=_VISION + _MTP,
    ),
    Family(
        name="qwen3_5_moe_text",
        model_types=("qwen3_5_moe_text",),
        description="Qwen3.5 MoE, text-only checkpoint",
        layers="model.layers",
        sequential=_HYBRID_MOE,
        keep=_GDN_KEEP + _ROUTERS,
        moe=True,
        passthrough=_MTP,
    ),
    Family(
        name="qwen2_5_vl",
        model_types=("qwen2_5_vl",),
        description="Qwen2.5-VL (language model only; the vision tower is kept as it is)",
        layers=_VL_LAYERS,
        sequential=_DENSE,
        passthrough=_VISION,
    ),
    Family(
        name="qwen3_vl",
        model_types=("qwen3_vl",),
        description="Qwen3-VL dense (language model only)",
        layers=_VL_LAYERS,
        sequential=_DENSE,
        passthrough=_VISION,
    ),
    Family(
        name="qwen3_vl_moe",
        model_types=("qwen3_vl_moe",),
        description="Qwen3-VL MoE (language model only; no shared expert)",
        layers=_VL_LAYERS,
        sequential=_MOE,
        keep=_ROUTERS,
        moe=True,
        passthrough=_VISION,
    ),
)

# Qwen model types transformers knows that no serving stack can load quantized yet: refused
# with the reason (any other unknown model_type is refused too, with the supported list).
UNSUPPORTED = MappingProxyType({
    "qwen4_exp": "Qwen3.8-Flash-Next (qwen4_exp) uses hyper-connections and n-gram embeddings, which neither vLLM "
                 "nor GPTQModel supports; a GPTQ checkpoint of it could not be served",
})


def supported_types() -> list[str]:
    return [t for f in FAMILIES for t in f.model_types]


def family_for(model_type: str | None) -> Family:
    for f in FAMILIES:
        if model_type in f.model_types:
            return f
    if model_type in UNSUPPORTED:
        raise BadInput(f"model_type {model_type!r} is not supported: {UNSUPPORTED[model_type]}")
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
    fused = [n for n, p in layer.named_parameters() if p.dim() == 3 and ".experts." in f".{n}"]
    if fused:
        raise BadInput(f"family {family.name}: decoder layer has fused expert tensors ({', '.join(fused[:2])}) that "
                       "were not split into per-expert Linears; they would stay unquantized")
    linears = [n for n, m in layer.named_modules() if isinstance(m, nn.Linear)]
    groups, used = [], set()
    for patterns in family.sequential:
        names = [n for p in patterns for n in linears if matches(n, p) and n not in used]
        used.update(names)
        if names:
            groups.append(names)
    kept = {n for n in linears for p in family.keep if matches(n, p)}
    unknown = [n for n in linears if n not in used and n not in kept]
    if unknown:
        raise BadInput(f"family {family.name}: decoder layer has Linear modules it does not know: {', '.join(unknown)}")
    if not groups:
        raise BadInput(f"family {family.name}: found no Linear modules to quantize in the decoder layer")
    return groups


def matches(name: str, pattern: str) -> bool:
    """Whether a Linear's name (relative to its layer) matches a family pattern."""
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
