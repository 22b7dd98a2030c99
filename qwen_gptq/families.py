"""What to quantize: one small definition per Qwen model family.

A family says where the decoder layers live, which Linears of a layer are
quantized in which true-sequential order (names relative to the layer; `*`
matches one name component, for MoE experts), and which Linears stay in full
precision. Adding a family is adding an entry to FAMILIES.
"""

from __future__ import annotations

import contextlib
import fnmatch
from dataclasses import dataclass

import torch
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
    moe: bool = False  # fused expert tensors are split into per-expert Linears (see unfuse_experts)


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


def get_module(root: nn.Module, path: str) -> nn.Module:
    m = root
    for part in path.split("."):
        m = getattr(m, part)
    return m


def decoder_layers(model: nn.Module, family: Family) -> nn.ModuleList:
    try:
        return get_module(model, family.layers)
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


# --------------------------------------------------------------------------- MoE experts


class UnfusedExperts(nn.ModuleList):
    """Per-expert gate_proj/up_proj/down_proj Linears computing what transformers'
    fused experts module computes.

    Recent transformers versions keep an MoE layer's experts as two 3-D tensors
    (gate_up_proj [E, 2I, H], down_proj [E, H, I]); checkpoints on disk, GPTQ kernels
    and every GPTQ loader name one Linear per expert: mlp.experts.{e}.gate_proj, ... .
    This module has those names and the fused module's forward signature.
    """

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor, act_fn):
        experts = []
        E, two_i, H = gate_up.shape
        inter = two_i // 2
        for e in range(E):
            m = nn.Module()
            m.gate_proj = nn.Linear(H, inter, bias=False, device=gate_up.device, dtype=gate_up.dtype)
            m.up_proj = nn.Linear(H, inter, bias=False, device=gate_up.device, dtype=gate_up.dtype)
            m.down_proj = nn.Linear(inter, H, bias=False, device=down.device, dtype=down.dtype)
            if gate_up.device.type != "meta":
                m.gate_proj.weight.data.copy_(gate_up[e, :inter])
                m.up_proj.weight.data.copy_(gate_up[e, inter:])
                m.down_proj.weight.data.copy_(down[e])
            experts.append(m)
        super().__init__(experts)
        self.num_experts = E
        self.act_fn = act_fn

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for e in top_k_index.unique().tolist():
            if not 0 <= e < self.num_experts:
                continue
            token_idx, pos = torch.where(top_k_index == e)
            x = hidden_states[token_idx]
            m = self[e]
            y = m.down_proj(self.act_fn(m.gate_proj(x)) * m.up_proj(x))
            out.index_add_(0, token_idx, (y * top_k_weights[token_idx, pos, None]).to(out.dtype))
        return out


def unfuse_experts(model: nn.Module) -> int:
    """Replace every fused experts module by UnfusedExperts, in place. Returns how many."""
    count = 0
    for name, module in list(model.named_modules()):
        gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
        if isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor) and gate_up.dim() == 3:
            parent, _, leaf = name.rpartition(".")
            new = UnfusedExperts(gate_up.data, down.data, module.act_fn)
            setattr(model.get_submodule(parent) if parent else model, leaf, new)
            count += 1
    return count


def prepare(model: nn.Module, family: Family) -> nn.Module:
    """Bring a loaded model into the module layout the family describes."""
    if family.moe:
        unfuse_experts(model)
    return model


def quantized_module_suffixes(family: Family) -> list[list[str]]:
    """The family's true-sequential groups as name suffixes (`modules_in_block_to_quantize`
    in transformers' GPTQConfig: a Linear whose name ends with none of them stays unquantized)."""
    groups = []
    for patterns in family.sequential:
        names = [p.rsplit("*.", 1)[-1] for p in patterns]
        groups.append(list(dict.fromkeys(names)))
    return groups


@contextlib.contextmanager
def per_expert_linears(model_type: str):
    """While inside, transformers builds MoE layers of `model_type` with one Linear per
    expert (mlp.experts.{e}.gate_proj, ...) instead of fused 3-D expert tensors, so that
    its GPTQ path (optimum) can put a GPTQ kernel on each expert.

    This uses defuser, which GPTQModel installs and uses for the same purpose.
    """
    import defuser

    with transformers_classes_restored(model_type):
        if not defuser.replace_fused_blocks(model_type):
            raise RuntimeError(f"defuser cannot split the experts of {model_type} models")
        yield


@contextlib.contextmanager
def transformers_classes_restored(model_type: str):
    """Put back, on the way out, the MoE block classes and checkpoint-conversion hook of
    transformers that defuser patches (GPTQModel.load patches them and leaves them so)."""
    import importlib

    import transformers
    from transformers import conversion_mapping

    try:
        module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    except ImportError:
        module = None
    missing = object()
    targets = [(module, k) for k in vars(module) if k.endswith("SparseMoeBlock")] if module else []
    targets += [(conversion_mapping, "get_checkpoint_conversion_mapping"),
                (transformers.modeling_utils, "get_checkpoint_conversion_mapping")]
    saved = [(obj, name, getattr(obj, name, missing)) for obj, name in targets]
    try:
        yield
    finally:
        for obj, name, value in saved:
            if value is missing:
                if hasattr(obj, name):
                    delattr(obj, name)
            else:
                setattr(obj, name, value)
