"""The AutoGPTQ v1 ("gptq") checkpoint format: everything about it lives here.

Per quantized Linear with in_features K, out_features N and G groups:

    qweight  int32   [K * bits / 32, N]   codes packed along the input dim
    qzeros   int32   [G, N * bits / 32]   (zero point - 1) packed along the output dim
    scales   float16 [G, N]
    g_idx    int32   [K]                  group of each input column

Packing is an LSB-first bit stream: value k of a run of 32 values occupies bits
[k*bits, (k+1)*bits) of `bits` consecutive int32 words. For 2, 4 and 8 bits that is
the familiar "value j of a word sits at bit j*bits"; for 3 bits values straddle
word boundaries, exactly as AutoGPTQ's 3-bit layout does.

A weight dequantizes as  W[n, k] = scales[g_idx[k], n] * (q[k, n] - (qzeros[g_idx[k], n] + 1)).

Because zeros are stored minus one, a zero point of 0 cannot be stored (a loader would
read it as 2**bits): MIN_ZERO is the smallest zero point the solver may choose. The
writer, the reference loader and `verify` all take tensor names, shapes and the
quantization config block from here, so a second format would be a sibling module.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .errors import BadInput
from .gptq import QuantConfig

SUPPORTED_BITS = (2, 3, 4, 8)
MIN_ZERO = 1  # zeros are stored minus one
TENSORS = ("qweight", "qzeros", "scales", "g_idx")  # the packed tensors of one Linear
FORMAT = "gptq"  # quant_method and checkpoint_format
REJECTED_KEYS = ("is_marlin_format",)  # quantization_config keys current loaders refuse
# Keys whose values must agree between our settings and a --reference-config.
SETTINGS_KEYS = ("bits", "group_size", "desc_act", "sym", "static_groups", "quant_method", "checkpoint_format")


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def safetensors_dtype(self) -> str:
        return {torch.int32: "I32", torch.float16: "F16"}[self.dtype]


def n_groups(in_features: int, group_size: int) -> int:
    return 1 if group_size == -1 else math.ceil(in_features / group_size)


def packed_modules(names: Iterable[str]) -> list[str]:
    """The Linears (module names) whose packed tensors are among these tensor names."""
    return [n.removesuffix(".qweight") for n in names if n.endswith(".qweight")]


def tensor_specs(in_features: int, out_features: int, bits: int, group_size: int) -> dict[str, TensorSpec]:
    """The four packed tensors of one Linear, by leaf name."""
    g = n_groups(in_features, group_size)
    return {
        "qweight": TensorSpec((in_features * bits // 32, out_features), torch.int32),
        "qzeros": TensorSpec((g, out_features * bits // 32), torch.int32),
        "scales": TensorSpec((g, out_features), torch.float16),
        "g_idx": TensorSpec((in_features,), torch.int32),
    }


def packing_problem(name: str, in_features: int, out_features: int, cfg: QuantConfig) -> str | None:
    """Why a Linear of this shape cannot be stored at cfg's settings, or None."""
    unit = 32 if cfg.bits == 3 else 32 // cfg.bits
    if in_features % unit or out_features % unit:
        return (f"{name}: in_features={in_features}, out_features={out_features} cannot be packed at {cfg.bits} bits "
                f"(both must be multiples of {unit})")
    if cfg.group_size > 0 and in_features % cfg.group_size:
        return f"{name}: in_features={in_features} is not a multiple of --group-size {cfg.group_size}"
    return None


# --------------------------------------------------------------------------- the config block


def quantization_config(cfg: QuantConfig, true_sequential: bool, model_name_or_path: str) -> dict:
    """The block written to quantize_config.json and config.json's quantization_config."""
    return {
        "bits": cfg.bits,
        "group_size": cfg.group_size,
        "damp_percent": cfg.damp_percent,
        "desc_act": cfg.desc_act,
        "static_groups": cfg.static_groups,
        "sym": cfg.sym,
        "true_sequential": true_sequential,
        "model_name_or_path": model_name_or_path,
        "model_file_base_name": "model",
        "quant_method": FORMAT,
        "checkpoint_format": FORMAT,
    }


def check_reference_config(reference: dict, ours: dict, path: str) -> None:
    """Exit 2 if an official model's quantization_config contradicts our settings."""
    ref_q = reference.get("quantization_config")
    if not isinstance(ref_q, dict):
        raise BadInput(f"--reference-config {path}: has no quantization_config block")
    bad = [
        f"{k}: reference {ref_q[k]!r}, ours {ours[k]!r}"
        for k in SETTINGS_KEYS
        if k in ref_q and ref_q[k] != ours[k] and not (k == "checkpoint_format" and ref_q[k] in (None, FORMAT))
    ]
    if bad:
        raise BadInput(f"--reference-config {path} contradicts the quantization settings: " + "; ".join(bad))


# --------------------------------------------------------------------------- packing


def pack(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer values [..., R, C] (each in [0, 2**bits)) along dim -2 into int32
    [..., R*bits/32, C] (leading dimensions: a batch of Linears packed at once)."""
    *lead, R, C = values.shape
    if (R * bits) % 32 or (bits == 3 and R % 32):
        raise ValueError(f"cannot pack {R} rows of {bits}-bit values into 32-bit words")
    if 32 % bits == 0:
        # In int32 directly: the highest field's shift wraps into the sign bit, which is
        # the two's-complement word wanted.
        per_word = 32 // bits
        v = (values.to(torch.int32) & (2**bits - 1)).view(*lead, R // per_word, per_word, C)
        words = v[..., 0, :].clone()
        for k in range(1, per_word):
            words |= v[..., k, :] << (k * bits)
        return words
    # General bit stream (3 bits): 32 values fill `bits` words exactly.
    v = (values.to(torch.int64) & (2**bits - 1)).view(*lead, R // 32, 32, C)
    offset = torch.arange(32, device=v.device, dtype=torch.int64) * bits
    word, shift = (offset // 32).tolist(), (offset % 32).tolist()
    words = torch.zeros(*lead, R // 32, bits, C, dtype=torch.int64, device=v.device)
    for k in range(32):
        words[..., word[k], :] |= (v[..., k, :] << shift[k]) & 0xFFFFFFFF
        spill = shift[k] + bits - 32
        if spill > 0:
            words[..., word[k] + 1, :] |= v[..., k, :] >> (bits - spill)
    words = words.view(*lead, R * bits // 32, C)
    # Reinterpret the low 32 bits as a signed int32 (two's complement).
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def unpack(words: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """Inverse of pack(): int32 [rows*bits/32, C] -> int32 values [rows, C]."""
    C = words.shape[1]
    w = words.to(torch.int64) & 0xFFFFFFFF
    mask = 2**bits - 1
    if 32 % bits == 0:
        per_word = 32 // bits
        shifts = torch.arange(per_word, device=w.device, dtype=torch.int64) * bits
        vals = (w.unsqueeze(1) >> shifts.view(1, -1, 1)) & mask
        return vals.reshape(rows, C).to(torch.int32)
    w = w.view(rows // 32, bits, C)
    offset = torch.arange(32, device=w.device, dtype=torch.int64) * bits
    vals = torch.zeros(rows // 32, 32, C, dtype=torch.int64, device=w.device)
    for k in range(32):
        word, shift = int(offset[k]) // 32, int(offset[k]) % 32
        v = w[:, word] >> shift
        spill = shift + bits - 32
        if spill > 0:
            v = v | (w[:, word + 1] << (bits - spill))
        vals[:, k] = v & mask
    return vals.view(rows, C).to(torch.int32)


def pack_linear(Q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, g_idx: torch.Tensor,
                bits: int) -> dict[str, torch.Tensor]:
    """The four tensors of a quantized Linear.

    Q: codes [out, in]; scale: [groups, out]; zero: real zero points [groups, out];
    g_idx: [in]. Returns a dict with qweight, qzeros, scales, g_idx (on Q's device).
    With a leading batch dimension on all four, those of a batch of Linears, stacked.
    """
    return {
        "qweight": pack(Q.mT.contiguous(), bits),
        "qzeros": pack((zero.to(torch.int64) - MIN_ZERO).mT.contiguous(), bits).mT.contiguous(),
        "scales": scale.to(torch.float16).contiguous(),
        "g_idx": g_idx.to(torch.int32).clone(),
    }


def unpack_linear(qweight: torch.Tensor, qzeros: torch.Tensor, bits: int, in_features: int,
                  out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes [in, out] and real zero points [groups, out] from the packed tensors."""
    q = unpack(qweight, bits, in_features)
    z = unpack(qzeros.T.contiguous(), bits, out_features).T + MIN_ZERO
    return q, z


def dequantize_linear(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                      bits: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight [out, in] a GPTQ loader computes from the packed tensors."""
    in_features = g_idx.shape[0]
    out_features = scales.shape[1]
    q, z = unpack_linear(qweight, qzeros, bits, in_features, out_features)
    g = g_idx.long()
    w = scales.float()[g] * (q.float() - z.float()[g])  # [in, out]
    return w.T.contiguous().to(dtype)
