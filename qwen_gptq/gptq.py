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
import os
from dataclasses import dataclass

import torch

from . import kernels

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
        for shrink in MSE_GRID:
            s, z = params(xmin * shrink, xmax * shrink)
            err = _group_err(x, s, z, maxq)
            better = err < best
            best = torch.where(better, err, best)
            scale = torch.where(better, s, scale)
            zero = torch.where(better, z, zero)
    return scale, zero


# Shrink factors of the clipping search: 0.95, 0.90, ..., 0.50 of the min-max range.
MSE_GRID = tuple(round(1 - 0.05 * k, 2) for k in range(1, 11))


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
    H's diagonal is dampened in place (and left so).
    """
    n = H.shape[0]
    diag = H.diagonal().clone()
    mean_diag = torch.mean(diag).item()
    damp = damp_percent
    for _ in range(max_tries):
        H.diagonal().copy_(diag + damp * mean_diag)
        Hinv = upper_cholesky_of_inverse(H)
        if Hinv is not None:
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


def upper_cholesky_of_inverse(H: torch.Tensor) -> torch.Tensor | None:
    """U upper triangular with UᵀU = H⁻¹, or None if H is not positive definite.

    With J the reversal permutation and K the lower Cholesky factor of JHJ,
    H = (JKJ)(JKJ)ᵀ with JKJ upper triangular, so U = (JKJ)⁻¹ = J K⁻¹ J: one
    Cholesky and one triangular solve, instead of a Cholesky, an inverse from it and
    a second Cholesky. At most three matrices of H's size are alive at once.
    """
    K, info = torch.linalg.cholesky_ex(H.flip(0, 1))
    if info.item() != 0:
        return None
    Kinv = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    torch.linalg.solve_triangular(K, Kinv, upper=False, out=Kinv)
    del K
    U = Kinv.flip(0, 1)
    return U if torch.isfinite(U).all() else None


def _group_params(W: torch.Tensor, gs: int, n_groups: int, cfg: QuantConfig) -> list:
    """(scale, zero) of each group of `gs` columns of W, from W as it is."""
    return [find_params(W[:, g * gs:(g + 1) * gs], cfg.bits, cfg.sym, cfg.mse) for g in range(n_groups)]


def block_size(group_size: int, columns: int, blocksize: int = 128) -> int:
    """Columns per lazy-batch block, chosen so that groups never straddle blocks:
    a multiple of the group size when groups are small, a divisor of it otherwise."""
    gs = group_size if group_size > 0 else columns
    if gs <= blocksize:
        return gs * (blocksize // gs)
    return max(d for d in range(1, blocksize + 1) if gs % d == 0)


def gptq(W: torch.Tensor, H: torch.Tensor, cfg: QuantConfig, overwrite_h: bool = False) -> GPTQResult:
    """Quantize W [rows, columns] column by column, compensating each column's error
    on the columns not yet quantized, weighted by the inverse Hessian.

    H is [columns, columns] float32. It is not modified unless overwrite_h, which
    saves a copy of it (the largest Hessians are over a gigabyte).
    """
    rows, columns = W.shape
    gs = cfg.group_size if cfg.group_size > 0 else columns
    n_groups = math.ceil(columns / gs)
    bs = block_size(cfg.group_size, columns, cfg.blocksize)
    W = W.float().clone()
    H = H.float() if overwrite_h else H.float().clone()

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    static = None
    if cfg.static_groups:
        # Group parameters from the original weights, in the original column order.
        static = _group_params(W, gs, n_groups, cfg)

    perm = None
    if cfg.desc_act:
        perm = torch.argsort(torch.diag(H), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]
        invperm = torch.argsort(perm)
    # Group of each column in quantization order: groups are formed in that order,
    # except static groups, which keep the original column order.
    source = perm if static is not None and perm is not None else torch.arange(columns, device=W.device)
    g_perm = (source // gs).to(torch.int32)

    Hinv, damp = inverse_hessian(H, cfg.damp_percent)
    del H

    Q = torch.zeros_like(W)
    Losses = torch.zeros_like(W)
    scales, zeros = [], []
    scale = torch.zeros(rows, device=W.device)
    zero = torch.zeros(rows, device=W.device)
    gs_in = gs if gs <= bs else 0  # groups start inside blocks (else only at block starts)
    static_cols = g_perm.tolist() if static is not None else None
    fused = static is None and kernels.available(W)
    graphs = not fused and W.is_cuda and static is None and _graphs_enabled()

    for i1 in range(0, columns, bs):
        i2 = min(i1 + bs, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Hinv1 = Hinv[i1:i2, i1:i2]
        n_in = math.ceil(count / gs_in) if gs_in else 0
        if static is None and not gs_in and i1 % gs == 0:
            # A group larger than the block starts here: its parameters come from the
            # current (error-compensated) block and the not yet updated rest of the group.
            scale, zero = find_params(torch.cat([W1, W[:, i2:i1 + gs]], dim=1), cfg.bits, cfg.sym, cfg.mse)
            scales.append(scale)
            zeros.append(zero)
        out = None
        if fused:
            try:
                out = kernels.quantize_block(W1, Hinv1, scale, zero, gs_in, n_in, cfg.bits, cfg.sym, cfg.mse)
            except Exception as e:  # noqa: BLE001 - a GPU or Triton the kernel cannot run on
                kernels.disable(e)
                fused = False
                graphs = W.is_cuda and _graphs_enabled()
        if out is not None:
            Q1, Err1, Losses1, S1, Z1 = out
        elif graphs:
            Q1, Err1, Losses1, S1, Z1 = _block_graphed(W1, Hinv1, scale, zero, gs_in, n_in, cfg.bits, cfg.sym, cfg.mse)
        else:
            Q1, Err1, Losses1 = torch.zeros_like(W1), torch.zeros_like(W1), torch.zeros_like(W1)
            S1 = torch.zeros(n_in, rows, device=W.device)
            Z1 = torch.zeros(n_in, rows, device=W.device)
            per_col = [static[g] for g in static_cols[i1:i2]] if static is not None else None
            quantize_block(W1, Hinv1, Q1, Err1, Losses1, scale, zero, S1, Z1, gs_in, cfg.bits, cfg.sym, cfg.mse,
                           per_col)
        if gs_in and static is None:
            scales.extend(S1)
            zeros.extend(Z1)
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


def quantize_block(W1, Hinv1, Q1, Err1, Losses1, scale, zero, S1, Z1, gs_in, bits, sym, mse=False, per_col=None):
    """The inner loop of GPTQ over one block of columns, in place.

    W1 is updated as columns are quantized; Q1, Err1 and Losses1 receive the codes,
    the scaled errors (w - q) / Hinv_cc and the per-weight losses. When groups start
    inside the block (gs_in > 0) their parameters are computed here and written to
    S1/Z1; otherwise `scale`/`zero` hold the current group's (or, with per_col, each
    column has its own). No host synchronisation: the loop can be captured in a CUDA graph.
    """
    maxq = 2**bits - 1
    for i in range(W1.shape[1]):
        if per_col is not None:
            scale, zero = per_col[i]
        elif gs_in and i % gs_in == 0:
            s, z = find_params(W1[:, i:i + gs_in], bits, sym, mse)
            scale.copy_(s)
            zero.copy_(z)
            S1[i // gs_in].copy_(s)
            Z1[i // gs_in].copy_(z)
        w = W1[:, i]
        q = quantize(w, scale, zero, maxq)
        err = (w - dequantize(q, scale, zero)) / Hinv1[i, i]
        Q1[:, i] = q
        Losses1[:, i] = err**2
        Err1[:, i] = err
        W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1)


# --------------------------------------------------------------------------- CUDA graphs
#
# The column loop launches a dozen small kernels per column: on a GPU it is bound by
# launch overhead, not arithmetic. Captured once per block shape in a CUDA graph and
# replayed, the same kernels run back to back without the host in the way.

_GRAPHS: dict = {}


def _graphs_enabled() -> bool:
    return os.environ.get("QWEN_GPTQ_CUDA_GRAPHS", "1") != "0"


def clear_graphs() -> None:
    _GRAPHS.clear()


def _block_graphed(W1, Hinv1, scale, zero, gs_in, n_in, bits, sym, mse):
    rows, count = W1.shape
    key = (W1.device, rows, count, gs_in, bits, sym, mse)
    entry = _GRAPHS.get(key)
    if entry is None:
        dev = W1.device
        t = {name: torch.zeros(rows, count, device=dev) for name in ("W1", "Q1", "Err1", "Losses1")}
        t["Hinv1"] = torch.zeros(count, count, device=dev)
        t["scale"], t["zero"] = torch.ones(rows, device=dev), torch.zeros(rows, device=dev)
        t["S1"], t["Z1"] = torch.zeros(n_in, rows, device=dev), torch.zeros(n_in, rows, device=dev)
        t["Hinv1"].copy_(torch.eye(count, device=dev))

        def body():
            quantize_block(t["W1"], t["Hinv1"], t["Q1"], t["Err1"], t["Losses1"], t["scale"], t["zero"],
                           t["S1"], t["Z1"], gs_in, bits, sym, mse)

        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            body()  # warm up (allocator, kernels) outside the capture
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            body()
        entry = _GRAPHS[key] = (graph, t)
    graph, t = entry
    t["W1"].copy_(W1)
    t["Hinv1"].copy_(Hinv1)
    t["scale"].copy_(scale)
    t["zero"].copy_(zero)
    graph.replay()
    return (t["Q1"].clone(), t["Err1"].clone(), t["Losses1"].clone(), t["S1"].clone(), t["Z1"].clone())


def rtn(W: torch.Tensor, cfg: QuantConfig) -> GPTQResult:
    """Round-to-nearest with the same output as gptq(): the fallback for a Linear
    that saw no calibration tokens (an MoE expert no token was routed to)."""
    rows, columns = W.shape
    gs = cfg.group_size if cfg.group_size > 0 else columns
    W = W.float()
    g_idx = torch.arange(columns, device=W.device, dtype=torch.int32) // gs
    n_groups = math.ceil(columns / gs)
    params = _group_params(W, gs, n_groups, cfg)
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
