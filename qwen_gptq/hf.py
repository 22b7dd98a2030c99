"""The transformers side: loading models and tokenizers, our reference loader, and the
load-time adjustments transformers needs for Qwen's MoE models.

- load_model(): a checkpoint as transformers builds it (for quantizing, or as the
  original to compare with), laid out as its family says (MoE experts split);
  skeleton(): the same model with nothing loaded (stream.py fills it layer by layer).
- QuantLinear / load_quantized(): our reference loader for GPTQ checkpoints, independent
  of optimum/gptqmodel. It dequantizes the packed tensors (once, cached) with the formula
  every GPTQ kernel implements; slow and simple on purpose, the yardstick the ecosystem
  loaders are compared against.
- transformers_from_pretrained() / gptqmodel_load(): the ecosystem's loaders, as a user
  calls them, with transformers' classes restored afterwards.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint, gptq_v1
from .errors import BadInput
from .families import Family, family_for, quantized_module_suffixes

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase as Tokenizer


def auto_class(config: object) -> type:
    """transformers' Auto class that builds a checkpoint's architecture: vision-language
    checkpoints (…ForConditionalGeneration: Qwen2.5-VL, Qwen3-VL, Qwen3.5) are
    image-text-to-text models, whose language model sits at model.language_model."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    archs = getattr(config, "architectures", None) or []
    causal = type(config) in AutoModelForCausalLM._model_mapping or getattr(config, "auto_map", None)
    if any(a.endswith("ForConditionalGeneration") for a in archs) or not causal:
        return AutoModelForImageTextToText
    return AutoModelForCausalLM


def tied_embeddings(config: object) -> bool:
    """Whether lm_head shares the input embedding (set on the text config of VL models)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return bool(getattr(config, "tie_word_embeddings", False) or getattr(text, "tie_word_embeddings", False))


def load_model(model_dir: str | Path, dtype: torch.dtype | str = "auto",
               trust_remote_code: bool = False) -> tuple[nn.Module, Tokenizer]:
    """(model, tokenizer) of an unquantized checkpoint as transformers builds it, in eval
    mode without KV cache (prepare() lays it out as its family describes)."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
        config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
        model = auto_class(config).from_pretrained(str(model_dir), dtype=dtype, trust_remote_code=trust_remote_code,
                                                   low_cpu_mem_usage=True)
    except (OSError, ValueError) as e:
        raise BadInput(f"cannot load the model from {model_dir}: {e}") from None
    model.eval()
    model.config.use_cache = False
    return model, tokenizer


def skeleton(model_dir: str | Path, trust_remote_code: bool = False,
             fallback_dtype: torch.dtype | None = None) -> tuple[nn.Module, Tokenizer]:
    """(model, tokenizer) of an unquantized checkpoint as load_model() builds it, but with
    every parameter on the meta device (buffers computed as usual) and nothing read: in
    the checkpoint's dtype (its config's, else `fallback_dtype`, as from_pretrained's
    dtype="auto" takes it), for stream.Streamed to fill."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
        config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or fallback_dtype
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        with init_empty_weights(include_buffers=False):
            model = auto_class(config).from_config(config, trust_remote_code=trust_remote_code, dtype=dtype)
    except (OSError, ValueError) as e:
        raise BadInput(f"cannot load the model from {model_dir}: {e}") from None
    model.eval()
    model.config.use_cache = False
    return model, tokenizer


def prepare(model: nn.Module, family: Family, calibrate_all_experts: bool = False) -> nn.Module:
    """Bring a model transformers built into the module layout the family describes
    (with calibrate_all_experts, every expert sees every calibration token)."""
    if family.moe:
        unfuse_experts(model)
    for m in model.modules():
        if isinstance(m, UnfusedExperts):
            m.calibrate_all = calibrate_all_experts
    return model


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
        # Calibration only: every expert computes every token (so that its Hessian sees them
        # all), while the output still combines just the routed ones, as the model does.
        self.calibrate_all = False
        # Calibration only: the current batch's padded rows (bool [tokens]; runtime.run_layer
        # sets it), routed to no expert so that they stay out of the experts' Hessians.
        self.padded_rows: torch.Tensor | None = None
        # Calibration by several processes (distributed.ExpertShare, set by the pipeline):
        # this process computes its own experts for every process's tokens.
        self.share = None

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        tokens = hidden_states.shape[0]
        padded = self.padded_rows if self.padded_rows is not None and self.padded_rows.shape[0] == tokens else None
        if padded is not None:
            top_k_index = top_k_index.masked_fill(padded[:, None], -1)
        share = self.share
        if share is None:
            return self._computed(hidden_states, top_k_index, top_k_weights, padded, range(self.num_experts), None)
        # Every process's rows (its padding rows routed to no expert), computed by this
        # process's experts alone; its partial sums, in float32, summed back.
        share.called(hidden_states, top_k_index, top_k_weights)
        if padded is None:
            padded = torch.zeros(tokens, dtype=torch.bool, device=hidden_states.device)
        (x, index, weights, padded), most = share.gathered(hidden_states, top_k_index, top_k_weights, padded)
        partial = self._computed(x, index, weights, padded, range(share.first, share.stop), torch.float32)
        return share.summed_back(partial, tokens, most, hidden_states.dtype)

    def _computed(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                  padded: torch.Tensor | None, experts: range, dtype: torch.dtype | None) -> torch.Tensor:
        """The output of the given experts (top_k_index: -1 where a row goes to no expert),
        in dtype (None: the hidden states')."""
        if self.calibrate_all:
            return self._every_expert(hidden_states, top_k_index, top_k_weights, padded, experts, dtype)
        # The routed rows sorted by expert (one host synchronisation for the counts), each
        # expert's a contiguous slice; the weighted results back in routing order, summed
        # over each token's top-k (deterministic: no atomic additions on a GPU).
        # Only the given experts' rows are gathered (a process sharing the experts computes
        # its own for every process's tokens: half of them, or less).
        tokens, k = top_k_index.shape
        flat = top_k_index.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat.clamp(-1, self.num_experts) + 1, minlength=self.num_experts + 2).tolist()
        starts = list(itertools.accumulate(counts[:-1]))  # where expert e's rows start (rows to no expert first)
        first, stop = (starts[experts.start], starts[experts.stop]) if len(experts) else (0, 0)
        mine = order[first:stop]
        xs = hidden_states[mine // k]
        ys = torch.zeros_like(xs)
        for e in experts:
            n, start = counts[e + 1], starts[e] - first
            if n:
                m, x = self[e], xs[start:start + n]
                ys[start:start + n] = m.down_proj(self.act_fn(m.gate_proj(x)) * m.up_proj(x))
        every = mine.shape[0] == tokens * k  # (else the rows of other experts, or of none, are zeros)
        routed = (hidden_states.new_empty if every else hidden_states.new_zeros)(tokens * k, hidden_states.shape[1])
        routed[mine] = (ys * top_k_weights.reshape(-1)[mine, None]).to(ys.dtype)
        return routed.view(tokens, k, -1).sum(dim=1, dtype=dtype)

    def _every_expert(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                      padded: torch.Tensor | None, experts: range, dtype: torch.dtype | None) -> torch.Tensor:
        out = torch.zeros(hidden_states.shape, dtype=dtype or hidden_states.dtype, device=hidden_states.device)
        x, row = hidden_states, None  # row: a token's row of x (padding left out)
        if padded is not None:
            x, row = hidden_states[~padded], torch.cumsum(~padded, 0) - 1
        for e in experts:
            token_idx, pos = torch.where(top_k_index == e)
            m = self[e]
            y = m.down_proj(self.act_fn(m.gate_proj(x)) * m.up_proj(x))
            y = y[token_idx if row is None else row[token_idx]]
            # (each expert's share rounded to the model's dtype, as the routed path rounds it, then summed in out's)
            out.index_add_(0, token_idx, (y * top_k_weights[token_idx, pos, None]).to(hidden_states.dtype).to(out.dtype))
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


# --------------------------------------------------------------------------- padding for tensor parallelism


def pad_mlps(layers: nn.ModuleList, size_for: Callable[[int], int]) -> dict[str, int]:
    """Zero-pad the intermediate dimension of every gate/up/down MLP in the decoder layers
    (dense MLPs, each expert, the shared expert) to size_for(its size): zero output rows in
    gate/up, zero input columns in down, so the model computes exactly the same function.
    Returns the config keys to change (intermediate_size, moe_intermediate_size,
    shared_expert_intermediate_size) and their new values."""
    changed: dict[str, int] = {}
    for layer in layers:
        for name, m in layer.named_modules():
            if not all(isinstance(getattr(m, p, None), nn.Linear) for p in ("gate_proj", "up_proj", "down_proj")):
                continue
            size = m.gate_proj.out_features
            new = size_for(size)
            if new == size:
                continue
            for proj in (m.gate_proj, m.up_proj):
                _pad(proj, rows=new - size)
            _pad(m.down_proj, columns=new - size)
            key = ("moe_intermediate_size" if ".experts." in f".{name}." else
                   "shared_expert_intermediate_size" if "shared_expert" in name else "intermediate_size")
            changed[key] = new
    return changed


def _pad(linear: nn.Linear, rows: int = 0, columns: int = 0) -> None:
    w = linear.weight.data
    padded = w.new_zeros(w.shape[0] + rows, w.shape[1] + columns)
    padded[: w.shape[0], : w.shape[1]] = w
    linear.weight = nn.Parameter(padded, requires_grad=False)
    if linear.bias is not None and rows:
        linear.bias = nn.Parameter(torch.cat([linear.bias.data, linear.bias.data.new_zeros(rows)]), requires_grad=False)
    linear.out_features, linear.in_features = padded.shape


# --------------------------------------------------------------------------- our reference loader


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        for name, spec in gptq_v1.tensor_specs(in_features, out_features, bits, group_size).items():
            self.register_buffer(name, torch.zeros(spec.shape, dtype=spec.dtype))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self._weight = None

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return gptq_v1.dequantize_linear(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._weight is None or self._weight.dtype != x.dtype or self._weight.device != x.device:
            self._weight = self.dequantized(x.dtype).to(x.device)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self._weight, bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}"


def empty_model(model_dir: str | Path, trust_remote_code: bool = False,
                dtype: torch.dtype | None = None) -> tuple[nn.Module, dict]:
    """The model a GPTQ directory describes, with weights on the meta device, laid out as
    its family expects (MoE experts split), and its quantization_config as a dict."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    except ValueError as e:
        raise BadInput(f"{model_dir}: cannot read the config ({e}); add --trust-remote-code for remote-code models") from None
    q = getattr(config, "quantization_config", None) or {}
    q = q if isinstance(q, dict) else q.to_dict()
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # build plain Linears; we swap in our own QuantLinear
    with init_empty_weights(include_buffers=False):
        model = auto_class(config).from_config(config, trust_remote_code=trust_remote_code, dtype=dtype)
    return prepare(model, family_for(config.model_type)), q


def load_quantized(model_dir: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                   trust_remote_code: bool = False) -> tuple[nn.Module, Tokenizer]:
    """(model, tokenizer) of a GPTQ directory, through QuantLinear."""
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    model, q = empty_model(model_dir, trust_remote_code, dtype)
    config = model.config
    bits, group_size = int(q["bits"]), int(q["group_size"])
    tensors = checkpoint.read_tensors(model_dir)
    rules = checkpoint.prefix_renames(tensors, model.state_dict())
    tensors = {checkpoint.renamed(k, rules): v for k, v in tensors.items()}
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and f"{name}.qweight" in tensors:
            parent, _, leaf = name.rpartition(".")
            ql = QuantLinear(module.in_features, module.out_features, bits, group_size, module.bias is not None)
            setattr(model.get_submodule(parent) if parent else model, leaf, ql)
    state = {k: (v.to(dtype) if v.is_floating_point() and not k.endswith(".scales") else v) for k, v in tensors.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if tied_embeddings(config):
        model.tie_weights()
        missing = [k for k in missing if not k.endswith("lm_head.weight")]
    outside = family_for(config.model_type).passthrough  # e.g. mtp.*: kept in the checkpoint, not in the model
    unexpected = [k for k in unexpected if not k.startswith(outside)]
    missing = [k for k in missing if "rotary" not in k and not k.endswith("inv_freq")]
    if missing or unexpected:
        raise BadInput(f"{model_dir}: tensors do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    return model, tokenizer


# --------------------------------------------------------------------------- the ecosystem's loaders


def transformers_from_pretrained(path: Path, trust_remote_code: bool = False, backend: str | None = None,
                                 **kwargs) -> nn.Module:
    """AutoModelForCausalLM.from_pretrained through transformers' GPTQ path (optimum +
    gptqmodel kernels), as a user would call it; `backend` picks GPTQModel's kernel
    (marlin, machete, exllama_v2, triton, torch; default: its own choice).

    Two things transformers does not do by itself: for families that keep Linears in 16
    bits (MoE routers' shared-expert gate, Qwen3.5's in_proj_a/b),
    `modules_in_block_to_quantize`, so that those stay plain Linears; and for MoE models
    (transformers 5 fuses experts into 3-D tensors no GPTQ kernel takes), one Linear per
    expert while the model is built (per_expert_linears). Both are load-time settings: the
    checkpoint stays the standard GPTQ v1 layout every loader reads.
    """
    from transformers import AutoConfig

    kwargs = {"device_map": "cpu", "dtype": torch.float16, **kwargs}
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    family = family_for(config.model_type)
    q = config.quantization_config
    q = q if isinstance(q, dict) else q.to_dict()
    if backend:
        q = {**q, "backend": backend}
    if family.moe or family.keep:
        q = {**q, "modules_in_block_to_quantize": quantized_module_suffixes(family)}
    config.quantization_config = q
    with per_expert_linears(config.model_type) if family.moe else contextlib.nullcontext():
        return auto_class(config).from_pretrained(str(path), config=config, trust_remote_code=trust_remote_code,
                                                  **kwargs)


class LoaderUnsupported(Exception):
    """An ecosystem loader cannot load this family (not a fault of the checkpoint)."""


def gptqmodel_load(path: Path, model_type: str, trust_remote_code: bool = False) -> nn.Module:
    """GPTQModel.load, with transformers' classes put back afterwards."""
    import gptqmodel

    with transformers_classes_restored(model_type):
        try:
            return gptqmodel.GPTQModel.load(str(path), device="cpu", trust_remote_code=trust_remote_code)
        except ImportError as e:
            if "torchvision" in str(e).lower():  # it loads a vision-language model's processor too
                raise LoaderUnsupported(f"GPTQModel loads {model_type} models with their image/video processor, "
                                        "which needs torchvision (not installed here)") from None
            raise


@contextlib.contextmanager
def per_expert_linears(model_type: str) -> Iterator[None]:
    """While inside, transformers builds MoE layers of `model_type` with one Linear per
    expert (mlp.experts.{e}.gate_proj, ...) instead of fused 3-D expert tensors, so that
    its GPTQ path (optimum) can put a GPTQ kernel on each expert.

    This uses defuser, which GPTQModel installs and uses for the same purpose.
    """
    import defuser

    with transformers_classes_restored(model_type):
        if not defuser.replace_fused_blocks(model_type):
            version = importlib.metadata.version("defuser")
            raise LoaderUnsupported(f"transformers' GPTQ path needs one Linear per expert, and defuser {version} "
                                    f"cannot split the experts of {model_type} models")
        yield


@contextlib.contextmanager
def transformers_classes_restored(model_type: str) -> Iterator[None]:
    """Put back, on the way out, the MoE block classes and checkpoint-conversion hook of
    transformers that defuser patches (GPTQModel.load patches them and leaves them so)."""
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
