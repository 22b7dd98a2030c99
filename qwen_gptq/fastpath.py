"""The fast paths of the solver, and the only module-level state of the package.

- `block_solver()` picks, once per solve, how GPTQ's inner loop over a block of columns
  runs: one Triton kernel launch per block (CUDA; also Triton's CPU interpreter under
  TRITON_INTERPRET=1), the PyTorch loop captured in a CUDA graph, or the plain loop.
  All give the codes the plain loop gives. A Triton kernel that fails to build (a GPU or
  Triton version it cannot run on) hands over to the next path, with one warning.
- `hessian_addmm()`: H += xᵀy in float32, bf16 activations straight into a tensor-core
  GEMM with float32 output where torch offers it.

Environment switches: QWEN_GPTQ_TRITON=0 (no Triton kernel), QWEN_GPTQ_CUDA_GRAPHS=0
(no CUDA graphs). Caches: captured graphs (dropped by clear_caches()), whether the
kernel failed, whether addmm takes out_dtype.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:
    from .gptq import Block, BlockOut, QuantConfig

log = logging.getLogger("qwen_gptq")

try:
    import triton
    import triton.language as tl
except ImportError:  # optional: the PyTorch loop is used instead
    triton = None

FP16 = torch.finfo(torch.float16)  # scales are stored in float16: clamp them to its range
TRITON_ROW_TILE_ELEMENTS = 1024  # a program's tile: rows × next_pow2(block columns) at most this (see row_tile)
TRITON_MAX_ROW_TILE = 32
ROW_TILE_OVERRIDE: int | None = None  # scripts/bench_block_kernel.py's


@dataclass
class _State:
    triton_failure: str | None = None  # why the kernel was given up, once it failed
    addmm_out_dtype: bool = True  # torch.addmm(..., out_dtype=float32) works here
    graphs: dict = field(default_factory=dict)  # captured block loops, by shape and settings


_state = _State()


def _switch(name: str) -> bool:
    return os.environ.get(name, "1") != "0"


def clear_caches() -> None:
    """Drop the captured CUDA graphs (their static buffers hold GPU memory)."""
    _state.graphs.clear()


# --------------------------------------------------------------------------- choosing a block solver

Loop = Callable[["Block", "BlockOut", "QuantConfig"], None]
Solver = Callable[["Block"], "BlockOut"]


def triton_available(t: torch.Tensor) -> bool:
    """Whether the Triton kernel can run on this tensor's device."""
    if triton is None or _state.triton_failure is not None or not _switch("QWEN_GPTQ_TRITON"):
        return False
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def block_solver(W: torch.Tensor, cfg: QuantConfig, loop: Loop) -> Solver:
    """The fastest way to run `loop` (gptq.quantize_block) on W's device, chosen once.

    Static groups give each column its own parameters: only the plain loop takes them.
    """
    from .gptq import BlockOut

    def eager(b: Block) -> BlockOut:
        out = BlockOut.zeros(b)
        loop(b, out, cfg)
        return out

    if cfg.static_groups:
        return eager
    fallback = (lambda b: _graphed(b, cfg, loop)) if W.is_cuda and _switch("QWEN_GPTQ_CUDA_GRAPHS") else eager
    if not triton_available(W):
        return fallback

    def fused(b: Block) -> BlockOut:
        if _state.triton_failure is None:
            try:
                return triton_block(b, cfg)
            except Exception as e:  # noqa: BLE001 - a GPU or Triton the kernel cannot run on
                _disable_triton(e)
        return fallback(b)

    return fused


def _disable_triton(error: Exception) -> None:
    log.warning("the Triton solver kernel failed (%s: %s); using the PyTorch loop instead (slower)",
                type(error).__name__, str(error).splitlines()[0][:200] if str(error) else "")
    _state.triton_failure = str(error)


# --------------------------------------------------------------------------- CUDA graphs
#
# The column loop launches a dozen small kernels per column: on a GPU it is bound by
# launch overhead, not arithmetic. Captured once per block shape in a CUDA graph and
# replayed, the same kernels run back to back without the host in the way.


def _graphed(b: Block, cfg: QuantConfig, loop: Loop) -> BlockOut:
    from .gptq import Block, BlockOut

    batch, rows, count = b.W.shape
    key = (b.W.device, batch, rows, count, b.gs_in, b.clip_weight is not None, cfg)
    entry = _state.graphs.get(key)
    if entry is None:
        dev = b.W.device
        static = Block(W=torch.zeros(batch, rows, count, device=dev),
                       Hinv=torch.eye(count, device=dev).expand(batch, count, count).contiguous(),
                       scale=torch.ones(batch, rows, device=dev), zero=torch.zeros(batch, rows, device=dev),
                       gs_in=b.gs_in, n_in=b.n_in,
                       clip_weight=None if b.clip_weight is None else torch.ones(batch, count, device=dev))
        out = BlockOut.zeros(static)
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            loop(static, out, cfg)  # warm up (allocator, kernels) outside the capture
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            loop(static, out, cfg)
        entry = _state.graphs[key] = (graph, static, out)
    graph, static, out = entry
    static.W.copy_(b.W)
    static.Hinv.copy_(b.Hinv)
    static.scale.copy_(b.scale)
    static.zero.copy_(b.zero)
    if b.clip_weight is not None:
        static.clip_weight.copy_(b.clip_weight)
    graph.replay()
    return out.clone()


# --------------------------------------------------------------------------- Hessian GEMM


def hessian_addmm(H: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> None:
    """H += xᵀy, accumulated in float32 whatever x's dtype.

    On CUDA, bf16/fp16 activations go straight into one tensor-core GEMM with float32
    output and accumulation (their products are exact in float32), without a float32
    copy of x. Elsewhere x is converted to float32 first.
    """
    half = x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
    if half and _state.addmm_out_dtype:
        try:
            torch.addmm(H, x.T, y, out_dtype=torch.float32, out=H)
            return
        except (RuntimeError, TypeError, NotImplementedError) as e:  # an older torch: no out_dtype
            log.debug("addmm(out_dtype=float32) unavailable (%s); converting activations to float32", e)
            _state.addmm_out_dtype = False
    x, y = x.float(), y.float()
    if half:  # TF32 is exact for bf16/fp16 values (7 and 10 mantissa bits fit its 10)
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            H.addmm_(x.T, y)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old
    else:
        H.addmm_(x.T, y)


# --------------------------------------------------------------------------- the Triton kernel
#
# The same arithmetic as gptq.quantize_block, in one launch per block instead of a dozen
# per column: each program owns a tile of rows, keeps the block's columns of W in
# registers, finds each group's scale and zero point (with the clipping search when
# asked), quantizes column by column and propagates each column's error to the rest of
# the block through the matching row of the inverse Hessian's Cholesky factor.
# Rounding matches torch's: round-half-to-even, IEEE division, scales rounded to float16.


def row_tile(count: int) -> int:
    """Rows per program of the block kernel. A program walks its block's columns one
    after another, so a smaller tile means more programs in flight for the same work:
    on an H200 (scripts/bench_block_kernel.py, 128 columns) 8 rows a program took
    0.7-0.95x the time of 32 for every problem the pipeline gives it, dense halves on
    two GPUs (4096-14784 rows) and MoE batches (64 experts x 768-2048 rows) alike, and 4
    was slower on the large ones. Each row is computed alone: the tile never changes the bits."""
    return max(1, min(TRITON_MAX_ROW_TILE, TRITON_ROW_TILE_ELEMENTS // triton.next_power_of_2(count)))


def triton_block(b: Block, cfg: QuantConfig) -> BlockOut:
    """gptq.quantize_block's result for one block, computed by the Triton kernel."""
    from .gptq import BlockOut

    batch, rows, count = b.W.shape
    W1 = b.W.contiguous()
    n_s = max(b.n_in, 1)
    out = BlockOut(Q=torch.empty_like(W1), Err=torch.empty_like(W1), Losses=torch.empty_like(W1),
                   S=torch.empty(batch, n_s, rows, device=W1.device, dtype=torch.float32),
                   Z=torch.empty(batch, n_s, rows, device=W1.device, dtype=torch.float32))
    BC = triton.next_power_of_2(count)
    BR = ROW_TILE_OVERRIDE or row_tile(count)
    grid = (triton.cdiv(rows, BR), batch)  # (row tiles, problems of the batch)
    weighted = b.clip_weight is not None
    _block_kernel[grid](
        W1, b.Hinv.contiguous(), out.Q, out.Err, out.Losses, out.S, out.Z, b.scale.contiguous(), b.zero.contiguous(),
        b.clip_weight.contiguous() if weighted else W1, rows, count, b.n_in, n_s,
        BR=BR, BC=BC, GS=b.gs_in, MAXQ=cfg.maxq, SYM=cfg.sym, MINZ=cfg.min_zero, MSE=cfg.mse, WEIGHTED=weighted,
        MSE_STEPS=cfg.mse_steps, MSE_STEP=cfg.mse_step, FP16_TINY=FP16.tiny, FP16_MAX=FP16.max,
        num_warps=4,
    )
    out.S, out.Z = out.S[:, :b.n_in], out.Z[:, :b.n_in]
    return out


if triton is not None:

    @triton.jit
    def _round(x):
        # Round half to even, exactly (|x| < 2**22): the float32 magic-number trick.
        return (x + 12582912.0) - 12582912.0

    @triton.jit
    def _fp16(x, FP16_TINY: tl.constexpr, FP16_MAX: tl.constexpr):
        x = tl.minimum(tl.maximum(x, FP16_TINY), FP16_MAX)
        return x.to(tl.float16).to(tl.float32)

    @triton.jit
    def _params(lo, hi, MAXQ: tl.constexpr, SYM: tl.constexpr, MINZ: tl.constexpr,
                FP16_TINY: tl.constexpr, FP16_MAX: tl.constexpr):
        scale = _fp16(tl.math.div_rn(hi - lo, MAXQ * 1.0), FP16_TINY, FP16_MAX)
        if SYM:
            zero = tl.zeros_like(scale) + (MAXQ + 1) / 2
        else:
            zero = _round(tl.math.div_rn(-lo, scale))
            low = zero < MINZ
            scale = tl.where(low, _fp16(tl.math.div_rn(hi, MAXQ - MINZ * 1.0), FP16_TINY, FP16_MAX), scale)
            zero = tl.minimum(tl.where(low, MINZ * 1.0, zero), MAXQ * 1.0)
        return scale, zero

    @triton.jit
    def _group_err(W, inside, cw, scale, zero, MAXQ: tl.constexpr, WEIGHTED: tl.constexpr):
        q = tl.minimum(tl.maximum(_round(tl.math.div_rn(W, scale[:, None])) + zero[:, None], 0.0), MAXQ * 1.0)
        d = scale[:, None] * (q - zero[:, None]) - W
        e = d * d
        if WEIGHTED:
            e = e * cw[None, :]
        return tl.sum(tl.where(inside, e, 0.0), axis=1)

    @triton.jit
    def _find_params(W, inside, cw, MAXQ: tl.constexpr, SYM: tl.constexpr, MINZ: tl.constexpr, MSE: tl.constexpr,
                     MSE_STEPS: tl.constexpr, MSE_STEP: tl.constexpr, WEIGHTED: tl.constexpr,
                     FP16_TINY: tl.constexpr, FP16_MAX: tl.constexpr):
        xmin = tl.minimum(tl.min(tl.where(inside, W, float("inf")), axis=1), 0.0)
        xmax = tl.maximum(tl.max(tl.where(inside, W, float("-inf")), axis=1), 0.0)
        if SYM:
            xmax = tl.maximum(tl.abs(xmin), xmax)
            xmin = tl.where(xmin < 0, -xmax, xmin)
        both_zero = (xmin == 0) & (xmax == 0)
        xmin = tl.where(both_zero, -1.0, xmin)
        xmax = tl.where(both_zero, 1.0, xmax)
        scale, zero = _params(xmin, xmax, MAXQ, SYM, MINZ, FP16_TINY, FP16_MAX)
        if MSE:
            best = _group_err(W, inside, cw, scale, zero, MAXQ, WEIGHTED)
            for k in tl.static_range(1, MSE_STEPS + 1):
                shrink = 1.0 - MSE_STEP * k  # gptq.QuantConfig.mse_shrinks
                s, z = _params(xmin * shrink, xmax * shrink, MAXQ, SYM, MINZ, FP16_TINY, FP16_MAX)
                err = _group_err(W, inside, cw, s, z, MAXQ, WEIGHTED)
                better = err < best
                best = tl.where(better, err, best)
                scale = tl.where(better, s, scale)
                zero = tl.where(better, z, zero)
        return scale, zero

    @triton.jit
    def _block_kernel(W_ptr, Hinv_ptr, Q_ptr, Err_ptr, Loss_ptr, S_ptr, Z_ptr, scale_ptr, zero_ptr, CW_ptr,
                      rows, count, n_in, n_s,
                      BR: tl.constexpr, BC: tl.constexpr, GS: tl.constexpr, MAXQ: tl.constexpr,
                      SYM: tl.constexpr, MINZ: tl.constexpr, MSE: tl.constexpr, WEIGHTED: tl.constexpr,
                      MSE_STEPS: tl.constexpr, MSE_STEP: tl.constexpr, FP16_TINY: tl.constexpr,
                      FP16_MAX: tl.constexpr):
        # (A kernel's launch signature: pointers and compile-time constants, no dataclass.)
        # This program's problem of the batch: every pointer moves to its slice.
        p = tl.program_id(1).to(tl.int64)
        W_ptr += p * rows * count
        Q_ptr += p * rows * count
        Err_ptr += p * rows * count
        Loss_ptr += p * rows * count
        Hinv_ptr += p * count * count
        S_ptr += p * n_s * rows
        Z_ptr += p * n_s * rows
        scale_ptr += p * rows
        zero_ptr += p * rows
        if WEIGHTED:
            CW_ptr += p * count
        r = tl.program_id(0) * BR + tl.arange(0, BR)
        c = tl.arange(0, BC)
        rmask = r < rows
        cmask = c < count
        tile = r[:, None] * count + c[None, :]
        m2 = rmask[:, None] & cmask[None, :]
        W = tl.load(W_ptr + tile, mask=m2, other=0.0)
        scale = tl.load(scale_ptr + r, mask=rmask, other=1.0)
        zero = tl.load(zero_ptr + r, mask=rmask, other=0.0)
        cw = tl.zeros([BC], dtype=tl.float32)  # the clipping search's column weights, when WEIGHTED
        if WEIGHTED:
            cw = tl.load(CW_ptr + c, mask=cmask, other=0.0)
        for i in range(count):
            if GS > 0:
                if i % GS == 0:
                    inside = ((c >= i) & (c < i + GS) & cmask)[None, :]
                    scale, zero = _find_params(W, inside, cw, MAXQ, SYM, MINZ, MSE, MSE_STEPS, MSE_STEP, WEIGHTED,
                                               FP16_TINY, FP16_MAX)
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
