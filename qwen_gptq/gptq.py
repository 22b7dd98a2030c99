"""The GPTQ solver (Frantar et al., 2022), in plain PyTorch.

Pure functions: nothing here knows about files, modules or models. The caller
accumulates the Hessian H = 2/n * sum(x x^T) of a Linear's inputs and hands it to
`gptq()` together with the weight W [rows=out_features, columns=in_features];
it gets back the integer codes, the per-group scale and zero point, g_idx, the
dequantized weight and the loss. The same code runs on CPU and CUDA.

Names follow the paper and IST-DASLab's reference implementation: H, damp, Hinv,
blocksize, Err (the scaled error propagated to the columns not yet quantized).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

log = logging.getLogger("qwen_gptq")


@dataclass(frozen=True)
class QuantConfig:
    bits: int = 4
    group_size: int = 128  # -1: one group per output channel (per-channel)
    sym: bool = True
    damp_percent: float = 0.01
    desc_act: bool = False
    static_groups: bool = False
    true_sequential: bool = True
    blocksize: int = 128
    mse: bool = False  # search a clipping ratio per group that minimises the error

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1


@dataclass
class GPTQResult:
    Q: torch.Tensor  # uint8 [rows, columns], integer codes in [0, maxq]
    scale: torch.Tensor  # float32 [groups, rows] (already rounded to float16)
    zero: torch.Tensor  # int32 [groups, rows], the real zero point (not minus one)
    g_idx: torch.Tensor  # int32 [columns], group of each input column
    weight: torch.Tensor  # dequantized weight, W's dtype, [rows, columns]
    losses: torch.Tensor  # float32 [rows], sum over columns of (w - q)^2 / Hinv_cc^2 / 2
    damp: float  # the damp_percent finally used (higher than asked if Cholesky failed)


class CholeskyFailed(RuntimeError):
    pass


# --------------------------------------------------------------------------- quantizer


def find_params(x: torch.Tensor, bits: int, sym: bool, mse: bool = False):
    """Min-max scale and zero point for each row of x [rows, n].

    Returns (scale float32 [rows], zero float32 [rows]). Scales are rounded to
    float16, the precision the checkpoint stores them in, so that what we
    quantize against is exactly what a loader dequantizes with.
    """
    maxq = 2**bits - 1
    x = x.float()
    xmin = x.amin(dim=1).clamp(max=0)
    xmax = x.amax(dim=1).clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    both_zero = (xmin == 0) & (xmax == 0)
    xmin = torch.where(both_zero, -1.0, xmin)
    xmax = torch.where(both_zero, 1.0, xmax)

    def params(lo, hi):
        scale = _fp16_scale((hi - lo) / maxq)
        if sym:
            zero = torch.full_like(scale, (maxq + 1) / 2)
        else:
            # The v1 checkpoint format stores zero-1, so a zero point of 0 cannot be
            # stored: keep zero >= 1, widening the scale when the range is all positive.
            zero = torch.round(-lo / scale)
            low = zero < 1
            scale = torch.where(low, _fp16_scale(hi / (maxq - 1)), scale)
            zero = torch.where(low, torch.ones_like(zero), zero).clamp(max=maxq)
        return scale, zero

    scale, zero = params(xmin, xmax)
    if mse:
        # Grid search over shrunk ranges (the reference implementation's `mse` option):
        # clipping a few outliers often lowers the total error of the group.
        best = _group_err(x, scale, zero, maxq)
        for shrink in torch.arange(0.95, 0.49, -0.05).tolist():
            s, z = params(xmin * shrink, xmax * shrink)
            err = _group_err(x, s, z, maxq)
            better = err < best
            if better.any():
                best = torch.where(better, err, best)
                scale = torch.where(better, s, scale)
                zero = torch.where(better, z, zero)
    return scale, zero


def _fp16_scale(scale: torch.Tensor) -> torch.Tensor:
    tiny = torch.finfo(torch.float16).tiny
    return scale.clamp(min=tiny, max=torch.finfo(torch.float16).max).half().float()


def _group_err(x, scale, zero, maxq):
    q = quantize(x, scale[:, None], zero[:, None], maxq)
    return (dequantize(q, scale[:, None], zero[:, None]) - x).pow(2).sum(dim=1)


def quantize(x, scale, zero, maxq):
    """Integer codes of x for the given (broadcastable) scale and zero point."""
    return torch.clamp(torch.round(x / scale) + zero, 0, maxq)


def dequantize(q, scale, zero):
    return scale * (q - zero)


# --------------------------------------------------------------------------- GPTQ


def inverse_hessian(H: torch.Tensor, damp_percent: float, max_tries: int = 8):
    """Upper Cholesky factor of (H + damp*mean(diag(H))*I)^-1.

    If H is not positive definite even after dampening, damp is doubled up to
    `max_tries` times and the increase is logged. Returns (Hinv, damp used).
    """
    n = H.shape[0]
    mean_diag = torch.mean(torch.diag(H)).item()
    damp = damp_percent
    for _ in range(max_tries):
        Hd = H.clone()
        Hd.diagonal().add_(damp * mean_diag)
        L, info = torch.linalg.cholesky_ex(Hd)
        if info.item() == 0:
            Hinv = torch.cholesky_inverse(L)
            Hinv, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info.item() == 0 and torch.isfinite(Hinv).all():
                return Hinv, damp
        new = min(damp * 2, 1.0) if damp < 1.0 else damp * 2
        log.warning(
            "Cholesky of the %dx%d Hessian failed with damp_percent=%g; retrying with %g "
            "(more or longer calibration samples, or a larger --damp-percent, avoid this)",
            n, n, damp, new,
        )
        damp = new
    raise CholeskyFailed(
        f"the Hessian is not positive definite even with damp_percent={damp:g}; "
        "use more calibration samples (--num-samples) or a larger --damp-percent"
    )


def gptq(W: torch.Tensor, H: torch.Tensor, cfg: QuantConfig) -> GPTQResult:
    """Quantize W [rows, columns] column by column, compensating each column's error
    on the columns not yet quantized, weighted by the inverse Hessian.

    H is [columns, columns] float32 and is not modified.
    """
    rows, columns = W.shape
    maxq = cfg.maxq
    gs = cfg.group_size if cfg.group_size > 0 else columns
    n_groups = math.ceil(columns / gs)
    W = W.float().clone()
    H = H.float().clone()

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    static = None
    if cfg.static_groups:
        # Group parameters from the original weights, in the original column order.
        static = [find_params(W[:, g * gs:(g + 1) * gs], cfg.bits, cfg.sym, cfg.mse) for g in range(n_groups)]

    perm = None
    if cfg.desc_act:
        perm = torch.argsort(torch.diag(H), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]
        invperm = torch.argsort(perm)

    Hinv, damp = inverse_hessian(H, cfg.damp_percent)
    del H

    Q = torch.zeros_like(W)
    Losses = torch.zeros_like(W)
    scales, zeros = [], []
    # g_idx in quantization order; mapped back to the original order at the end.
    g_perm = torch.empty(columns, dtype=torch.int32, device=W.device)
    scale = zero = None

    for i1 in range(0, columns, cfg.blocksize):
        i2 = min(i1 + cfg.blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Losses1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]

        for i in range(count):
            col = i1 + i
            w = W1[:, i]
            d = Hinv1[i, i]
            if static is not None:
                g = (perm[col].item() if perm is not None else col) // gs
                scale, zero = static[g]
            elif col % gs == 0:
                # A new group starts: its parameters come from the current (already
                # error-compensated) weights of the group's columns.
                group = torch.cat([W1[:, i:i + gs], W[:, i2:col + gs]], dim=1) if col + gs > i2 else W1[:, i:i + gs]
                scale, zero = find_params(group, cfg.bits, cfg.sym, cfg.mse)
                scales.append(scale)
                zeros.append(zero)
                g = col // gs
            else:
                g = col // gs
            g_perm[col] = g

            q = quantize(w, scale, zero, maxq)
            dq = dequantize(q, scale, zero)
            Q1[:, i] = q
            Losses1[:, i] = (w - dq) ** 2 / d**2
            err1 = (w - dq) / d
            W1[:, i:] -= err1.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err1

        Q[:, i1:i2] = Q1
        Losses[:, i1:i2] = Losses1 / 2
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    if static is not None:
        scale_t = torch.stack([s for s, _ in static])
        zero_t = torch.stack([z for _, z in static])
    else:
        scale_t = torch.stack(scales)
        zero_t = torch.stack(zeros)

    if perm is not None:
        Q = Q[:, invperm]
        g_idx = g_perm[invperm]
    else:
        g_idx = g_perm

    Qi = Q.to(torch.uint8)
    weight = dequantize(Q, scale_t[g_idx.long()].T, zero_t[g_idx.long()].T)
    return GPTQResult(
        Q=Qi,
        scale=scale_t,
        zero=zero_t.to(torch.int32),
        g_idx=g_idx.to(torch.int32),
        weight=weight,
        losses=Losses.sum(dim=1),
        damp=damp,
    )


def rtn(W: torch.Tensor, cfg: QuantConfig) -> GPTQResult:
    """Round-to-nearest with the same output as gptq(): the fallback for a Linear
    that saw no calibration tokens (an MoE expert no token was routed to)."""
    rows, columns = W.shape
    gs = cfg.group_size if cfg.group_size > 0 else columns
    W = W.float()
    g_idx = torch.arange(columns, device=W.device, dtype=torch.int32) // gs
    n_groups = math.ceil(columns / gs)
    params = [find_params(W[:, g * gs:(g + 1) * gs], cfg.bits, cfg.sym, cfg.mse) for g in range(n_groups)]
    scale_t = torch.stack([s for s, _ in params])
    zero_t = torch.stack([z for _, z in params])
    s = scale_t[g_idx.long()].T
    z = zero_t[g_idx.long()].T
    Q = quantize(W, s, z, cfg.maxq)
    weight = dequantize(Q, s, z)
    return GPTQResult(
        Q=Q.to(torch.uint8), scale=scale_t, zero=zero_t.to(torch.int32), g_idx=g_idx,
        weight=weight, losses=torch.zeros(rows, device=W.device), damp=0.0,
    )
