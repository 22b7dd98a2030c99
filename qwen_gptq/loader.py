"""Our reference loader for GPTQ checkpoints: independent of optimum/gptqmodel.

QuantLinear keeps the packed tensors and dequantizes them (once, cached) with the
same formula every GPTQ kernel implements; it is slow and simple on purpose, so
that it can serve as the yardstick the ecosystem loaders are compared against.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from .errors import BadInput
from .families import family_for, prepare
from .packing import dequantize_linear


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        groups = in_features // group_size if group_size > 0 else 1
        self.register_buffer("qweight", torch.zeros(in_features * bits // 32, out_features, dtype=torch.int32))
        self.register_buffer("qzeros", torch.zeros(groups, out_features * bits // 32, dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=torch.float16))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self._weight = None

    def dequantized(self, dtype=torch.float32) -> torch.Tensor:
        return dequantize_linear(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, dtype)

    def forward(self, x):
        if self._weight is None or self._weight.dtype != x.dtype or self._weight.device != x.device:
            self._weight = self.dequantized(x.dtype).to(x.device)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self._weight, bias)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}"


def read_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors checkpoint (single file or sharded)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (model_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise BadInput(f"{model_dir}: no model.safetensors or model.safetensors.index.json")
    tensors = {}
    for f in files:
        with safe_open(str(model_dir / f), framework="pt") as sf:
            for k in sf.keys():
                tensors[k] = sf.get_tensor(k)
    return tensors


def empty_model(model_dir: str | Path, trust_remote_code: bool = False, dtype=None):
    """The model a GPTQ directory describes, with weights on the meta device, laid out as
    its family expects (MoE experts split), and its quantization_config as a dict."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    except ValueError as e:
        raise BadInput(f"{model_dir}: cannot read the config ({e}); add --trust-remote-code for remote-code models") from None
    q = getattr(config, "quantization_config", None) or {}
    q = q if isinstance(q, dict) else q.to_dict()
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # build plain Linears; we swap in our own QuantLinear
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, dtype=dtype)
    return prepare(model, family_for(config.model_type)), q


def load_quantized(model_dir: str | Path, dtype=torch.float32, device="cpu", trust_remote_code: bool = False):
    """(model, tokenizer) of a GPTQ directory, through QuantLinear."""
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    model, q = empty_model(model_dir, trust_remote_code, dtype)
    config = model.config
    bits, group_size = int(q["bits"]), int(q["group_size"])
    tensors = read_tensors(model_dir)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and f"{name}.qweight" in tensors:
            parent, _, leaf = name.rpartition(".")
            ql = QuantLinear(module.in_features, module.out_features, bits, group_size, module.bias is not None)
            setattr(model.get_submodule(parent) if parent else model, leaf, ql)
    state = {k: (v.to(dtype) if v.is_floating_point() and not k.endswith(".scales") else v) for k, v in tensors.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
        missing = [k for k in missing if not k.endswith("lm_head.weight")]
    missing = [k for k in missing if "rotary" not in k and not k.endswith("inv_freq")]
    if missing or unexpected:
        raise BadInput(f"{model_dir}: tensors do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    return model, tokenizer


def load_original(model_dir: str | Path, dtype=torch.float32, device="cpu", trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    return model.to(device).eval(), tokenizer
