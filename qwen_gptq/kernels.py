"""GPTQ's inner loop over one block of columns as a single Triton kernel (CUDA).

The same arithmetic as `gptq.quantize_block`, in one launch per block instead of a
dozen per column: each program owns a tile of rows, keeps the block's columns of W in
registers, finds each group's scale and zero point (with the clipping search when
asked), quantizes column by column and propagates each column's error to the rest of
the block through the matching row of the inverse Hessian's Cholesky factor.

Rounding matches torch's: round-half-to-even, IEEE division, scales rounded to float16.
Optional: without Triton (or with QWEN_GPTQ_TRITON=0) the solver uses the PyTorch loop.
Under TRITON_INTERPRET=1 the kernel also runs on CPU tensors, which is how the tests
compare it with the PyTorch loop on a machine without a GPU.
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger("qwen_gptq")

try:
    import triton
    import triton.language as tl
except ImportError:  # optional: the PyTorch loop is used instead
    triton = None


_DISABLED: list[str] = []


def available(t: torch.Tensor) -> bool:
    """Whether the kernel can run on this tensor's device."""
    if triton is None or _DISABLED or os.environ.get("QWEN_GPTQ_TRITON", "1") == "0":
        return False
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def disable(error: Exception) -> None:
    """The kernel failed (a GPU or Triton version it cannot be built for): use the PyTorch
    loop from now on, and say so once."""
    if not _DISABLED:
        log.warning("the Triton solver kernel failed (%s: %s); using the PyTorch loop instead (slower)",
                    type(error).__name__, str(error).splitlines()[0][:200] if str(error) else "")
    _DISABLED.append(str(error))


def quantize_block(W1, Hinv1, scale, zero, gs_in: int, n_in: int, bits: int, sym: bool, mse: bool):
    """Returns (Q1, Err1, Losses1, S1, Z1) exactly as `gptq.quantize_block` leaves them."""
    rows, count = W1.shape
    W1 = W1.contiguous()
    Hinv1 = Hinv1.contiguous()
    Q1 = torch.empty_like(W1)
    Err1 = torch.empty_like(W1)
    Losses1 = torch.empty_like(W1)
    S1 = torch.empty(max(n_in, 1), rows, device=W1.device, dtype=torch.float32)
    Z1 = torch.empty_like(S1)
    BC = triton.next_power_of_2(count)
    BR = max(1, min(32, 4096 // BC))
    grid = (triton.cdiv(rows, BR),)
    _block_kernel[grid](
        W1, Hinv1, Q1, Err1, Losses1, S1, Z1, scale.contiguous(), zero.contiguous(),
        rows, count, n_in,
        BR=BR, BC=BC, GS=gs_in, MAXQ=2**bits - 1, SYM=sym, MSE=mse,
        num_warps=4,
    )
    return Q1, Err1, Losses1, S1[:n_in], Z1[:n_in]


if triton is not None:

    @triton.jit
    def _round(x):
        # Round half to even, exactly (|x| < 2**22): the float32 magic-number trick.
        return (x + 12582912.0) - 12582912.0

    @triton.jit
    def _fp16(x):
        x = tl.minimum(tl.maximum(x, 6.103515625e-05), 65504.0)
        return x.to(tl.float16).to(tl.float32)

    @triton.jit
    def _params(lo, hi, MAXQ: tl.constexpr, SYM: tl.constexpr):
        scale = _fp16(tl.math.div_rn(hi - lo, MAXQ * 1.0))
        if SYM:
            zero = tl.zeros_like(scale) + (MAXQ + 1) / 2
        else:
            zero = _round(tl.math.div_rn(-lo, scale))
            low = zero < 1
            scale = tl.where(low, _fp16(tl.math.div_rn(hi, MAXQ - 1.0)), scale)
            zero = tl.minimum(tl.where(low, 1.0, zero), MAXQ * 1.0)
        return scale, zero

    @triton.jit
    def _group_err(W, inside, scale, zero, MAXQ: tl.constexpr):
        q = tl.minimum(tl.maximum(_round(tl.math.div_rn(W, scale[:, None])) + zero[:, None], 0.0), MAXQ * 1.0)
        d = scale[:, None] * (q - zero[:, None]) - W
        return tl.sum(tl.where(inside, d * d, 0.0), axis=1)

    @triton.jit
    def _find_params(W, inside, MAXQ: tl.constexpr, SYM: tl.constexpr, MSE: tl.constexpr):
        xmin = tl.minimum(tl.min(tl.where(inside, W, float("inf")), axis=1), 0.0)
        xmax = tl.maximum(tl.max(tl.where(inside, W, float("-inf")), axis=1), 0.0)
        if SYM:
            xmax = tl.maximum(tl.abs(xmin), xmax)
            xmin = tl.where(xmin < 0, -xmax, xmin)
        both_zero = (xmin == 0) & (xmax == 0)
        xmin = tl.where(both_zero, -1.0, xmin)
        xmax = tl.where(both_zero, 1.0, xmax)
        scale, zero = _params(xmin, xmax, MAXQ, SYM)
        if MSE:
            best = _group_err(W, inside, scale, zero, MAXQ)
            for k in tl.static_range(1, 11):
                shrink = 1.0 - 0.05 * k  # gptq.MSE_GRID
                s, z = _params(xmin * shrink, xmax * shrink, MAXQ, SYM)
                err = _group_err(W, inside, s, z, MAXQ)
                better = err < best
                best = tl.where(better, err, best)
                scale = tl.where(better, s, scale)
                zero = tl.where(better, z, zero)
        return scale, zero

    @triton.jit
    def _block_kernel(W_ptr, Hinv_ptr, Q_ptr, Err_ptr, Loss_ptr, S_ptr, Z_ptr, scale_ptr, zero_ptr,
                      rows, count, n_in,
                      BR: tl.constexpr, BC: tl.constexpr, GS: tl.constexpr, MAXQ: tl.constexpr,
                      SYM: tl.constexpr, MSE: tl.constexpr):
        r = tl.program_id(0) * BR + tl.arange(0, BR)
        c = tl.arange(0, BC)
        rmask = r < rows
        cmask = c < count
        tile = r[:, None] * count + c[None, :]
        m2 = rmask[:, None] & cmask[None, :]
        W = tl.load(W_ptr + tile, mask=m2, other=0.0)
        scale = tl.load(scale_ptr + r, mask=rmask, other=1.0)
        zero = tl.load(zero_ptr + r, mask=rmask, other=0.0)
        for i in range(count):
            if GS > 0:
                if i % GS == 0:
                    inside = ((c >= i) & (c < i + GS) & cmask)[None, :]
                    scale, zero = _find_params(W, inside, MAXQ, SYM, MSE)
                    tl.store(S_ptr + (i // GS) * rows + r, scale, mask=rmask)
                    tl.store(Z_ptr + (i // GS) * rows + r, zero, mask=rmask)
            w = tl.sum(tl.where(c[None, :] == i, W, 0.0), axis=1)
            q = tl.minimum(tl.maximum(_round(tl.math.div_rn(w, scale)) + zero, 0.0), MAXQ * 1.0)
            d = tl.load(Hinv_ptr + i * count + i)
            err = tl.math.div_rn(w - scale * (q - zero), d)
            tl.store(Q_ptr + r * count + i, q, mask=rmask)
            tl.store(Err_ptr + r * count + i, err, mask=rmask)
            tl.store(Loss_ptr + r * count + i, err * err, mask=rmask)
            h = tl.load(Hinv_ptr + i * count + c, mask=cmask & (c >= i), other=0.0)
            W = W - err[:, None] * h[None, :]
