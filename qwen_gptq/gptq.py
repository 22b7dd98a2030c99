"""GPTQ (Frantar et al., 2022) and its Hessian, in plain PyTorch.

Pure functions: nothing here knows about files, modules or models. A `Hessian`
accumulates H = 2/n · Σ x xᵀ over a Linear's inputs; `gptq()` takes it with the weight
W [rows = out_features, columns = in_features] and returns the integer codes, the
per-group scale and zero point, g_idx, the dequantized weight and the loss. It is
`gptq_batch()` on a batch of one: problems of one shape (MoE experts) are solved together,
each getting the bits it would get alone. The same code runs on CPU and CUDA; how the
inner loop runs fastest is fastpath's business.

Names follow the paper and IST-DASLab's reference implementation: H, damp, Hinv,
blocksize, Err (the scaled error propagated to the columns not yet quantized).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

from . import fastpath

log = logging.getLogger("qwen_gptq")

MAX_DAMP = 1.0  # dampening is doubled after a failed Cholesky, up to this fraction of mean(diag H)
INVERSE_BLOCKS = 8  # column blocks of K⁻¹ one process solves (upper_cholesky_of_inverse) ...
INVERSE_BLOCKS_FROM = 16384  # ... from this many columns on (an H200: 8192² no faster blocked, 29568² 1.5x)
# Processes sharing K⁻¹'s solve: from SHARED_INVERSE_FROM columns on, each solves this many
# blocks (below INVERSE_BLOCKS_FROM, from it on). Two H200s, Hinv in ms (8192² / 29568²):
# one process 24.9 / 514; shared, 8 blocks each 23.4 / 330, 4 each 19.0 / 315, 2 each 17.6 / 325
# (fewer, wider blocks: more arithmetic, but in wider solves that run faster; scripts/bench_shared_inverse.py).
SHARED_INVERSE_FROM = 8192
SHARED_INVERSE_BLOCKS = (2, 4)
CHOLESKY_SPLIT_FROM = 12288  # processes sharing Hinv split its Cholesky too from this many columns on (72B's 14784² halves too)
SCHUR_BLOCKS = 8  # row blocks of the Schur complement per process (lower_cholesky)


@dataclass(frozen=True)
class QuantConfig:
    """The solver's settings (options.py says which the user sets, and how)."""

    method: str = "gptq"  # or "rtn": round-to-nearest, no Hessians (a baseline)
    bits: int = 4
    group_size: int = 128  # -1: one group per output channel (per-channel)
    sym: bool = True
    damp_percent: float = 0.01
    desc_act: bool = False
    static_groups: bool = False
    mse: bool = True  # search a clipping range per group that minimises the squared error
    clip_weight: str = "uniform"  # the search's error per column: uniform, or weighted (CLIP_WEIGHTS)
    act_group_aware: bool = False  # groups in order of importance, columns by importance inside each
    gptaq: bool = False  # fit the full-precision model's outputs, not the quantized inputs' (asymmetric_target)
    gptaq_alpha: float = 0.5  # how far toward that target (1: all the way; 0.25, 0.5, 1 measured)
    min_zero: int = 0  # the smallest zero point the checkpoint format can store (asym)
    blocksize: int = 128  # columns per lazy-batch block
    mse_steps: int = 10  # the clipping search tries the min-max range shrunk by
    mse_step: float = 0.05  # 1 - mse_step·k for k = 1 … mse_steps (0.95 … 0.50)

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    @property
    def mse_shrinks(self) -> tuple[float, ...]:
        return tuple(round(1 - self.mse_step * k, 6) for k in range(1, self.mse_steps + 1))


SOLVER_SETTINGS = tuple(f.name for f in fields(QuantConfig))

# How the clipping search weighs a column's squared error. uniform: as is. activation:
# by E[x²] of its input, H's diagonal (llm-compressor's imatrix_mse observer). loss: by
# 1/U_cc², U the Cholesky factor of H⁻¹ the solve uses — exactly the weight of the
# column's error in GPTQ's own loss, the rest of the row compensating for it.
CLIP_WEIGHTS = ("uniform", "activation", "loss")


@dataclass
class GPTQResult:
    Q: torch.Tensor  # uint8 [rows, columns], integer codes in [0, maxq]
    scale: torch.Tensor  # float32 [groups, rows] (already rounded to float16)
    zero: torch.Tensor  # int32 [groups, rows], the real zero point
    g_idx: torch.Tensor  # int32 [columns], group of each input column
    weight: torch.Tensor  # dequantized weight, float32 [rows, columns]
    losses: torch.Tensor  # float32 [rows], sum over columns of (w - q)^2 / Hinv_cc^2 / 2
    damp: float  # the damp_percent finally used (higher than asked if Cholesky failed)


class CholeskyFailed(RuntimeError):
    def __init__(self, message: str, index: int = 0):
        super().__init__(message)
        self.index = index  # which problem of a batch


# --------------------------------------------------------------------------- the Hessian


class Hessian:
    """H = 2/n · XᵀX of one Linear's n input rows, accumulated in float32.

    XᵀX is symmetric: with X's columns split into k blocks, only the products of block a
    with block b ≥ a are computed and the rest mirrored at the end: (k + 1) / 2k of the
    FLOPs (k = 2: 3/4; k = 4: 5/8). Small batches are gathered into chunks of at least
    CHUNK rows first, where matrix products run faster.
    """

    CHUNK = 2048  # rows per product
    SPLITS = ((1024, 2), (8192, 4))  # from this many columns on, split into this many blocks (CPU)
    # On CUDA a block's product has the very bits of the whole's, and fewer FLOPs pay only
    # for large products (H200, ms per 2048-row bf16 sample, whole / 2 blocks / 4 blocks:
    # 3584 columns 0.099 / 0.121 / 0.355, 5120 0.201 / 0.186 / 0.369, 8192 0.469 / 0.385 /
    # 0.365, 18944 2.49 / 1.99 / 1.79; scripts/bench_hessian.py, docs/benchmarks.md)
    SPLITS_CUDA = ((5120, 2), (8192, 4))
    SPLIT_ALIGN = 64  # the split points are multiples of this

    def __init__(self, n: int, device: torch.device):
        self.H = torch.zeros(n, n, device=device, dtype=torch.float32)
        splits = self.SPLITS_CUDA if torch.device(device).type == "cuda" else self.SPLITS
        k = max([parts for least, parts in splits if n >= least], default=1)
        cuts = sorted({n * a // k // self.SPLIT_ALIGN * self.SPLIT_ALIGN for a in range(1, k)} - {0})
        self.blocks = [slice(a, b) for a, b in zip([0] + cuts, cuts + [n])]  # one: no split
        self.count = 0
        self.buf: torch.Tensor | None = None  # rows waiting to be multiplied, copied here
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        """Accumulate the rows of x [n, columns]."""
        self.count += x.shape[0]
        if self.rows + x.shape[0] > self.CHUNK:
            self._flush()
        if x.shape[0] >= self.CHUNK:
            self._product(x)
            return
        if self.buf is None:
            dtype = x.dtype if x.is_cuda else torch.float32
            self.buf = torch.empty(self.CHUNK, x.shape[1], device=x.device, dtype=dtype)
        self.buf[self.rows:self.rows + x.shape[0]].copy_(x)
        self.rows += x.shape[0]

    def _flush(self) -> None:
        if self.rows:
            self._product(self.buf[:self.rows])
            self.rows = 0

    def _product(self, x: torch.Tensor) -> None:
        # (one block: the whole product; a column slice of x is a view, no copy)
        for a, ra in enumerate(self.blocks):
            for rb in self.blocks[a:]:
                fastpath.hessian_addmm(self.H[ra, rb], x[:, ra], x[:, rb])

    def products(self) -> torch.Tensor:
        """XᵀX, unscaled (to be summed over processes), in the accumulator's memory: call once."""
        self._flush()
        for a, ra in enumerate(self.blocks):
            for rb in self.blocks[a + 1:]:
                self.H[rb, ra].copy_(self.H[ra, rb].T)
        return self.H

    def finish(self) -> torch.Tensor:
        """2/n · XᵀX (in the accumulator's memory: call once)."""
        return self.products().mul_(2.0 / self.count)


class CrossProducts:
    """D = 2/n · (X - X̃)ᵀX̃ for GPTAQ: X a Linear's inputs in the full-precision model, X̃
    the same tokens' inputs in the model being quantized (rows paired), in float32."""

    def __init__(self, n: int, device: torch.device):
        self.D = torch.zeros(n, n, device=device, dtype=torch.float32)

    def add(self, x_fp: torch.Tensor, x: torch.Tensor) -> None:
        if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16):
            # The difference rounded to the activations' dtype (a correction term: its
            # relative error 2^-8 is harmless) keeps the product on the tensor cores, at
            # the Hessian's cost instead of 16 times it in float32.
            fastpath.hessian_addmm(self.D, x_fp.to(x.dtype) - x, x)
            return
        x = x.float()
        fastpath.hessian_addmm(self.D, x_fp.float() - x, x)

    def finish(self, count: int) -> torch.Tensor:
        """Scaled as Hessian.finish scales H over the same `count` rows (call once)."""
        return self.D.mul_(2.0 / count)


def asymmetric_target(W: torch.Tensor, H: torch.Tensor, D: torch.Tensor, damp_percent: float,
                      alpha: float) -> torch.Tensor:
    """GPTAQ's target (Li et al., 2025, "asymmetric calibration"): the weight whose outputs on
    the quantized model's inputs X̃ best match the full-precision model's, W·XᵀX̃·(X̃ᵀX̃)⁻¹
    = W + W·D·H⁻¹. ‖Q X̃ᵀ − W Xᵀ‖² is ‖(Q − W*) X̃ᵀ‖² plus a constant, so GPTQ run on W* with
    H minimises the error against the full-precision outputs, correcting what the layers
    before have already lost. Moved alpha of the way (H dampened as the solve dampens it);
    unchanged if that H has no Cholesky factor (the solve then reports it). W [..., rows,
    columns], H and D [..., columns, columns]: a batch of problems works each on its own."""
    Hd = H.clone()
    for h in Hd.view(-1, *Hd.shape[-2:]):
        h.diagonal().add_(damp_percent * h.diagonal().mean())
    L, info = torch.linalg.cholesky_ex(Hd)
    del Hd
    shift = torch.cholesky_solve(D.mT @ W.mT, L).mT
    good = (info == 0) & torch.isfinite(shift).flatten(-2).all(-1)
    return torch.where(good[..., None, None], W + alpha * shift, W)


# --------------------------------------------------------------------------- the quantization grid


def find_params(x: torch.Tensor, cfg: QuantConfig, weight: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point (float32 [..., rows] each) for each row of x [..., rows, n].

    Min-max, or with cfg.mse the shrunk range with the least squared error (each column's
    error times weight [..., n], when given). Scales are
    rounded to float16, the precision a checkpoint stores them in, so that what we
    quantize against is exactly what a loader dequantizes with. Asymmetric zero points
    stay >= cfg.min_zero: a range that would want a smaller one widens its scale instead.
    """
    maxq = cfg.maxq
    x = x.float()
    xmin = x.amin(dim=-1).clamp(max=0)
    xmax = x.amax(dim=-1).clamp(min=0)
    if cfg.sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    both_zero = (xmin == 0) & (xmax == 0)
    xmin = torch.where(both_zero, -1.0, xmin)
    xmax = torch.where(both_zero, 1.0, xmax)

    def params(lo, hi):
        scale = _fp16_scale((hi - lo) / maxq)
        if cfg.sym:
            return scale, torch.full_like(scale, (maxq + 1) / 2)
        zero = torch.round(-lo / scale)
        low = zero < cfg.min_zero
        scale = torch.where(low, _fp16_scale(hi / (maxq - cfg.min_zero)), scale)
        zero = torch.where(low, torch.full_like(zero, cfg.min_zero), zero).clamp(max=maxq)
        return scale, zero

    scale, zero = params(xmin, xmax)
    if cfg.mse:
        # Clipping a few outliers often lowers the total error of the group.
        best = _group_err(x, scale, zero, maxq, weight)
        for shrink in cfg.mse_shrinks:
            s, z = params(xmin * shrink, xmax * shrink)
            err = _group_err(x, s, z, maxq, weight)
            better = err < best
            best = torch.where(better, err, best)
            scale = torch.where(better, s, scale)
            zero = torch.where(better, z, zero)
    return scale, zero


def _fp16_scale(scale: torch.Tensor) -> torch.Tensor:
    return scale.clamp(min=fastpath.FP16.tiny, max=fastpath.FP16.max).half().float()


def _group_err(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int,
               weight: torch.Tensor | None) -> torch.Tensor:
    q = quantize(x, scale[..., None], zero[..., None], maxq)
    err = (dequantize(q, scale[..., None], zero[..., None]) - x).pow(2)
    return (err if weight is None else err * weight[..., None, :]).sum(dim=-1)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes of x for the given (broadcastable) scale and zero point."""
    return torch.clamp(torch.round(x / scale) + zero, 0, maxq)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (q - zero)


def dequantized(Q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    """The float32 weight [..., rows, columns] that codes Q (any dtype), scale and zero
    [..., groups, rows] and g_idx [..., columns] stand for: a GPTQResult's weight, to the
    bit (gptq_batch computes it here), so that it can be rebuilt instead of sent."""
    by_column = g_idx.long()[..., None].expand(*g_idx.shape, Q.shape[-2])
    return dequantize(Q.float(), scale.gather(-2, by_column).mT, zero.float().gather(-2, by_column).mT)


# --------------------------------------------------------------------------- GPTQ


@dataclass(frozen=True)
class Shared:
    """Several processes computing the same Hinv (identical H on each): this one solves
    its `part` of `parts` of the work, and `combine` sums a tensor over them in place."""

    part: int
    parts: int
    combine: Callable[[torch.Tensor], None]


def inverse_hessians(H: torch.Tensor, damp_percent: float, shared: Shared | None = None,
                     consume: bool = False) -> tuple[torch.Tensor, list[float]]:
    """Upper Cholesky factors of (H + damp·mean(diag H)·I)⁻¹ for a batch H [B, n, n], and
    the damp each used.

    If an H is not positive definite even after dampening, its damp is doubled, up to
    MAX_DAMP, and each increase is logged (the others keep theirs). H's diagonals are
    dampened in place (and left so). shared, consume: see upper_cholesky_of_inverse (with
    consume, the result is H's memory, and H is gone).
    """
    B, n = H.shape[0], H.shape[-1]
    diag = H.diagonal(dim1=-2, dim2=-1).clone()
    mean_diag = torch.stack([d.mean() for d in diag]).tolist()
    damps = [damp_percent] * B
    todo = list(range(B))
    Hinv = None
    while True:
        shift = torch.tensor([damps[k] * mean_diag[k] for k in todo], dtype=H.dtype, device=H.device)
        H.diagonal(dim1=-2, dim2=-1)[todo] = diag[todo] + shift[:, None]  # (one copy for the batch)
        U, ok = upper_cholesky_of_inverse(H if len(todo) == B else H[todo], shared, consume)
        if len(todo) == B:  # (the whole batch: with consume, U is H's memory, already Hinv's)
            Hinv = U
        else:
            Hinv[todo] = U
        del U
        failed = [k for k, good in zip(todo, ok.tolist()) if not good]
        if not failed:
            return Hinv, damps
        for k in failed:
            if damps[k] >= MAX_DAMP:
                raise CholeskyFailed(
                    f"the Hessian is not positive definite even with damp_percent={damps[k]:g} (the most tried); "
                    "use more calibration samples (--num-samples) or longer ones (--max_len)", index=k)
            new = min(damps[k] * 2, MAX_DAMP)
            log.warning("Cholesky of the %dx%d Hessian failed with damp_percent=%g; retrying with %g "
                        "(more or longer calibration samples, or a larger --damp-percent, avoid this)", n, n,
                        damps[k], new)
            damps[k] = new
        todo = failed


def upper_cholesky_of_inverse(H: torch.Tensor, shared: Shared | None = None,
                              consume: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """U upper triangular with UᵀU = H⁻¹ for each H [..., n, n], and whether it is one
    (False: H is not positive definite; U is then garbage).

    With J the reversal permutation and K the lower Cholesky factor of JHJ,
    H = (JKJ)(JKJ)ᵀ with JKJ upper triangular, so U = (JKJ)⁻¹ = J K⁻¹ J: one
    Cholesky and one triangular solve, instead of a Cholesky, an inverse from it and
    a second Cholesky.

    K⁻¹ is lower triangular: its columns c0..c1 are zero above row c0 and solve
    K[c0:, c0:] X = I[c0:, c0:c1], the trailing part of K only. In INVERSE_BLOCKS such
    column blocks the solve does about 40 % of the arithmetic of one against the whole
    identity (Qwen2.5-72B's 29568² down_proj Hessian: most of the solve's time). shared:
    this process solves only the blocks it owns (balanced by cost), the others are left
    zero, and the sum over the processes is K⁻¹ (exactly: each entry is one process's);
    K itself is computed in shares too (lower_cholesky).

    consume: H's memory holds K, then U (returned), instead of each getting its own
    (scripts/bench_inverse_memory.py, CPU, n = 6144: the peak beyond H went from 3.77 to
    2.02 times H's size; H is 1.4 GB at a Qwen2.5-7B down_proj's 18944 columns, 3.5 GB at
    72B's 29568). An H that is not positive
    definite is given back as it was (from its flipped copy, kept until that is known), so
    that a retry can dampen it more.
    """
    M = H.flip(-2, -1)
    if not consume:
        K, info = lower_cholesky(M, shared)
        del M
    else:
        K, info = lower_cholesky(M, shared, out=H.mT)  # (column-major, as cholesky's own: the same kernels after)
        failed = (info != 0).flatten().tolist()
        if not any(failed):
            del M
    n = H.shape[-1]
    if n < SHARED_INVERSE_FROM:
        shared = None  # (small: each process solves it whole, sooner than they could combine it)
    part, parts = (shared.part, shared.parts) if shared is not None else (0, 1)
    blocks = inverse_blocks(n, part, parts)
    if blocks == [(0, n)]:  # one block: in place
        Kinv = torch.eye(n, dtype=H.dtype, device=H.device).expand_as(K).contiguous()
        torch.linalg.solve_triangular(K, Kinv, upper=False, out=Kinv)
    else:
        Kinv = torch.zeros(K.shape, dtype=K.dtype, device=K.device)  # (row-major: K is column-major)
        for c0, c1 in blocks:
            rhs = torch.zeros(*K.shape[:-2], n - c0, c1 - c0, dtype=K.dtype, device=K.device)
            rhs.diagonal(dim1=-2, dim2=-1).fill_(1)
            Kinv[..., c0:, c0:c1] = torch.linalg.solve_triangular(K[..., c0:, c0:], rhs, upper=False)
            del rhs
    del K
    if shared is not None and parts > 1:
        shared.combine(Kinv)
    if not consume:
        U = Kinv.flip(-2, -1)
    else:
        U = _flipped_into(H, Kinv)
        del Kinv
        for k, bad in enumerate(failed):  # (M is still there)
            if bad:
                _flipped_into(H.view(-1, n, n)[k], M.view(-1, n, n)[k])
    return U, (info == 0) & torch.isfinite(U).flatten(-2).all(-1)


def _flipped_into(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """dst = src.flip(-2, -1), [..., n, n], a band of rows at a time (temporaries of an
    eighth of src, not a whole copy); dst and src must not overlap."""
    n = src.shape[-1]
    step = max(1, -(-n // 8))
    for a in range(0, n, step):
        b = min(n, a + step)
        dst[..., a:b, :] = src[..., n - b:n - a, :].flip(-2, -1)
    return dst


def lower_cholesky(M: torch.Tensor, shared: Shared | None = None,
                   out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The lower Cholesky factor of each M [..., n, n] (into `out`, if given: M's shape,
    not overlapping it) and cholesky_ex's info (0 where it is one).

    shared, from CHOLESKY_SPLIT_FROM columns on: the processes split the work, by
    M = [[A, Bᵀ], [B, C]] = [[L11, 0], [L21, L22]] [[L11ᵀ, L21ᵀ], [0, L22ᵀ]] with A half of
    M. Every process factors A (L11, an eighth of the whole's work), solves its rows of
    L21 = B L11⁻ᵀ and its row blocks of the lower triangle of S = C - L21 L21ᵀ (each summed
    over the processes: exact, every entry from one), and factors S (L22, another eighth);
    A and S are themselves factored so when they are large enough. For two processes one
    split leaves each about 5/8 of the whole's work, two about 0.55: a 72B-shaped layer's
    29568² down_proj Hessian took 0.228 s whole, 0.163 s split once (halves of 14784) and
    0.149 s split twice, and its Hinv 0.514, 0.344 and 0.330 s (two H200s,
    scripts/bench_shared_inverse.py). Each split costs two all-reduces: 8192² Hessians
    stay whole (split, 1 ms of 9 faster in isolation, no faster in a whole run).
    """
    n = M.shape[-1]
    if shared is None or shared.parts == 1 or n < CHOLESKY_SPLIT_FROM:
        if out is None:
            return torch.linalg.cholesky_ex(M)
        info = torch.empty(M.shape[:-2], dtype=torch.int32, device=M.device)
        return torch.linalg.cholesky_ex(M, out=(out, info))
    n1 = n // 2
    m = n - n1
    batch, like = M.shape[:-2], {"dtype": M.dtype, "device": M.device}
    L11, info = lower_cholesky(M[..., :n1, :n1], shared)  # (itself split, if large enough)
    L21 = torch.zeros(*batch, m, n1, **like)
    r0, r1 = (round(k * m / shared.parts) for k in (shared.part, shared.part + 1))
    if r1 > r0:
        L21[..., r0:r1, :] = torch.linalg.solve_triangular(L11.mT, M[..., n1 + r0:n1 + r1, :n1], upper=True, left=False)
    shared.combine(L21)
    S = torch.zeros(*batch, m, m, **like)
    for a, b in schur_blocks(m, shared.part, shared.parts):  # (rows a..b, columns up to b: their lower triangle)
        S[..., a:b, :b] = M[..., n1 + a:n1 + b, n1:n1 + b] - L21[..., a:b, :] @ L21[..., :b, :].mT
    shared.combine(S)
    L22, info2 = lower_cholesky(S, shared)
    del S
    K = torch.zeros_like(M) if out is None else out
    K[..., :n1, n1:] = 0
    K[..., :n1, :n1] = L11
    K[..., n1:, :n1] = L21
    K[..., n1:, n1:] = L22
    return K, info + info2


def schur_blocks(m: int, part: int, parts: int) -> list[tuple[int, int]]:
    """The row blocks (a, b) of an m×m Schur complement's lower triangle that process
    `part` of `parts` computes (each costing (b - a)·b), balanced by spread."""
    count = SCHUR_BLOCKS * parts
    bounds = [round(k * m / count) for k in range(count + 1)]
    blocks = list(zip(bounds, bounds[1:]))
    owners = spread([(b - a) * b for a, b in blocks], parts)
    return [ab for ab, r in zip(blocks, owners) if r == part]


def inverse_blocks(n: int, part: int = 0, parts: int = 1) -> list[tuple[int, int]]:
    """The column blocks (c0, c1) of K⁻¹ that process `part` of `parts` solves (each
    costing (n - c0)² (c1 - c0)), balanced by spread."""
    if parts == 1:
        count = 1 if n < INVERSE_BLOCKS_FROM else INVERSE_BLOCKS
    else:
        count = parts * SHARED_INVERSE_BLOCKS[n >= INVERSE_BLOCKS_FROM]
    bounds = [round(k * n / count) for k in range(count + 1)]
    blocks = list(zip(bounds, bounds[1:]))
    owners = spread([(n - c0) ** 2 * (c1 - c0) for c0, c1 in blocks], parts)
    return [c for c, r in zip(blocks, owners) if r == part]


def spread(costs: list[int], parts: int) -> list[int]:
    """Each item's part (of `parts`): largest first, each to the least loaded part so far
    (ties: the lower index, the lower part), so that every process computes the same
    assignment. (distributed spreads problems over ranks by it too.)"""
    load = [0] * parts
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(parts), key=lambda r: (load[r], r))
        load[r] += costs[i]
        owners[i] = r
    return owners


def block_size(group_size: int, columns: int, blocksize: int = 128) -> int:
    """Columns per lazy-batch block, chosen so that groups never straddle blocks:
    a multiple of the group size when groups are small, a divisor of it otherwise."""
    gs = group_size if group_size > 0 else columns
    if gs <= blocksize:
        return gs * (blocksize // gs)
    return max(d for d in range(1, blocksize + 1) if gs % d == 0)


@dataclass
class Block:
    """One lazy-batch block of columns of a batch of B problems, handed to the inner loop."""

    W: torch.Tensor  # [B, rows, count], error-compensated so far; updated in place
    Hinv: torch.Tensor  # [B, count, count], the block's part of the upper Cholesky factor of H⁻¹
    scale: torch.Tensor  # [B, rows] the current group's, when no group starts inside the block
    zero: torch.Tensor  # [B, rows]
    gs_in: int  # the group size when groups start inside the block, else 0
    n_in: int  # how many groups start inside the block
    per_col: list | None = None  # static groups: (scale, zero) of each column, [B, rows] each
    clip_weight: torch.Tensor | None = None  # [B, count] the clipping search's column weights (None: uniform)


@dataclass
class BlockOut:
    Q: torch.Tensor  # [B, rows, count] codes
    Err: torch.Tensor  # [B, rows, count] scaled errors (w - q) / Hinv_cc
    Losses: torch.Tensor  # [B, rows, count] Err²
    S: torch.Tensor  # [B, n_in, rows] scales of the groups starting inside the block
    Z: torch.Tensor  # [B, n_in, rows] their zero points

    @classmethod
    def zeros(cls, b: Block) -> BlockOut:
        batch, rows, _ = b.W.shape
        return cls(Q=torch.zeros_like(b.W), Err=torch.zeros_like(b.W), Losses=torch.zeros_like(b.W),
                   S=torch.zeros(batch, b.n_in, rows, device=b.W.device),
                   Z=torch.zeros(batch, b.n_in, rows, device=b.W.device))

    def clone(self) -> BlockOut:
        return BlockOut(self.Q.clone(), self.Err.clone(), self.Losses.clone(), self.S.clone(), self.Z.clone())


def quantize_block(b: Block, out: BlockOut, cfg: QuantConfig) -> None:
    """GPTQ's inner loop over one block of columns, in place (the reference for fastpath).

    Each column is quantized with its group's parameters (found here when a group starts
    inside the block), and its scaled error is propagated to the block's later columns.
    No host synchronisation: the loop can be captured in a CUDA graph.
    """
    scale, zero = b.scale, b.zero
    for i in range(b.W.shape[-1]):
        if b.per_col is not None:
            scale, zero = b.per_col[i]
        elif b.gs_in and i % b.gs_in == 0:
            s, z = find_params(b.W[..., i:i + b.gs_in], cfg, _part(b.clip_weight, i, i + b.gs_in))
            scale.copy_(s)
            zero.copy_(z)
            out.S[:, i // b.gs_in].copy_(s)
            out.Z[:, i // b.gs_in].copy_(z)
        w = b.W[..., i]
        q = quantize(w, scale, zero, cfg.maxq)
        err = (w - dequantize(q, scale, zero)) / b.Hinv[:, i, i, None]
        out.Q[..., i] = q
        out.Losses[..., i] = err**2
        out.Err[..., i] = err
        for k in range(b.W.shape[0]):  # (addr_ per problem: one fused multiply-add, as the kernel does it)
            b.W[k, :, i:].addr_(err[k], b.Hinv[k, i, i:], alpha=-1)


def gptq(W: torch.Tensor, H: torch.Tensor, cfg: QuantConfig, overwrite_h: bool = False,
         D: torch.Tensor | None = None) -> GPTQResult:
    """Quantize W [rows, columns] column by column, compensating each column's error
    on the columns not yet quantized, weighted by the inverse Hessian.

    H is [columns, columns] float32. It is not modified unless overwrite_h, which
    saves a copy of it (the largest Hessians are over a gigabyte): its memory then holds
    the inverse's factors, and its values are gone. D (GPTAQ's cross
    products, CrossProducts) moves the target toward the full-precision model's outputs.
    """
    return gptq_batch(W[None], H[None], cfg, overwrite_h, None if D is None else D[None])[0]


def gptq_batch(W: torch.Tensor, H: torch.Tensor, cfg: QuantConfig, overwrite_h: bool = False,
               D: torch.Tensor | None = None, shared: Shared | None = None) -> list[GPTQResult]:
    """gptq() for B problems of the same shape at once — W [B, rows, columns], H (and D)
    [B, columns, columns] — each result as gptq() would give it alone: every step runs
    batched (one Cholesky, one kernel launch per block for all B; MoE experts). shared:
    W is this process's rows of problems whose H every process holds, and the processes
    compute Hinv together (see upper_cholesky_of_inverse)."""
    B, rows, columns = W.shape
    gs = cfg.group_size if cfg.group_size > 0 else columns
    n_groups = math.ceil(columns / gs)
    bs = block_size(cfg.group_size, columns, cfg.blocksize)
    W = W.float().clone()
    H = H.float() if overwrite_h else H.float().clone()

    # Inputs that never fire (padding, say): nothing to fit. Their diagonal gets the live
    # columns' mean, so that they leave the dampening (a fraction of the mean) as it was.
    diag = H.diagonal(dim1=-2, dim2=-1)
    dead = diag == 0
    for k in dead.any(dim=-1).nonzero().flatten().tolist():  # (one host sync for the batch, one per such problem)
        live = diag[k][~dead[k]]
        diag[k].copy_(torch.where(dead[k], live.mean() if live.numel() else 1.0, diag[k]))
    if D is not None:
        W = asymmetric_target(W, H, D, cfg.damp_percent, cfg.gptaq_alpha)
    W.masked_fill_(dead[:, None, :], 0)

    imp = diag.clone()  # each input column's importance: E[x²], up to a factor
    perm = None
    if cfg.desc_act:  # act-order: the columns with the largest inputs first
        perm = torch.stack([torch.argsort(v, descending=True) for v in imp])
    elif cfg.act_group_aware:
        perm = torch.stack([group_aware_order(v, gs) for v in imp])
    if perm is not None:
        W = W.gather(2, perm[:, None, :].expand_as(W))
        H = H.gather(1, perm[:, :, None].expand_as(H)).gather(2, perm[:, None, :].expand_as(H))
        imp = imp.gather(1, perm)

    Hinv, damps = inverse_hessians(H, cfg.damp_percent, shared, consume=True)  # (H is this function's own)
    del H, diag
    clip = _clip_weights(cfg, imp, Hinv)  # in quantization order; None: uniform

    # Static groups: parameters from the original weights, in the original column order.
    static = None
    if cfg.static_groups:
        back = torch.argsort(perm, dim=-1) if perm is not None else None
        W0 = W if back is None else W.gather(2, back[:, None, :].expand_as(W))
        clip0 = clip if back is None or clip is None else clip.gather(1, back)
        static = _group_params(W0, gs, n_groups, cfg, clip0)
        del W0
    # Group of each column in quantization order: groups are formed in that order
    # (act-order), except static groups and group-aware order, which keep the original ones.
    keep = perm is not None and (static is not None or cfg.act_group_aware)
    source = perm if keep else torch.arange(columns, device=W.device).expand(B, columns)
    g_perm = (source // gs).to(torch.int32)
    if static is not None:  # [B, groups, rows], looked up per column below
        static_scale = torch.stack([s for s, _ in static], dim=1)
        static_zero = torch.stack([z for _, z in static], dim=1)
        batch = torch.arange(B, device=W.device)
        g_cols = g_perm.long()

    Q = torch.zeros_like(W)
    Losses = torch.zeros_like(W)
    scales, zeros = [], []
    scale = torch.zeros(B, rows, device=W.device)
    zero = torch.zeros(B, rows, device=W.device)
    gs_in = gs if gs <= bs else 0  # groups start inside blocks (else only at block starts)
    solve_block = fastpath.block_solver(W, cfg, quantize_block)

    for i1 in range(0, columns, bs):
        i2 = min(i1 + bs, columns)
        if static is None and not gs_in and i1 % gs == 0:
            # A group larger than the block starts here: its parameters come from the
            # current (error-compensated) block and the not yet updated rest of the group.
            scale, zero = find_params(W[..., i1:i1 + gs].contiguous(), cfg, _part(clip, i1, i1 + gs))
            scales.append(scale)
            zeros.append(zero)
        per_col = None
        if static is not None:
            per_col = [(static_scale[batch, g_cols[:, c]], static_zero[batch, g_cols[:, c]]) for c in range(i1, i2)]
        block = Block(W=W[..., i1:i2].clone(), Hinv=Hinv[:, i1:i2, i1:i2], scale=scale, zero=zero, gs_in=gs_in,
                      n_in=math.ceil((i2 - i1) / gs_in) if gs_in else 0, per_col=per_col,
                      clip_weight=_part(clip, i1, i2))
        out = solve_block(block)
        if gs_in and static is None:
            scales.extend(out.S.unbind(1))
            zeros.extend(out.Z.unbind(1))
        Q[..., i1:i2] = out.Q
        Losses[..., i1:i2] = out.Losses / 2
        W[..., i2:] -= _matmul(out.Err, Hinv[:, i1:i2, i2:])  # the lazy batch update of the later columns

    if static is not None:
        scale_t, zero_t = static_scale, static_zero
    else:
        scale_t = torch.stack(scales, dim=1)  # [B, groups, rows]
        zero_t = torch.stack(zeros, dim=1)
        if cfg.act_group_aware and perm is not None:  # formed in importance order: back to group order
            order = g_perm[:, ::gs].long()[..., None].expand_as(scale_t)
            scale_t = torch.empty_like(scale_t).scatter_(1, order, scale_t)
            zero_t = torch.empty_like(zero_t).scatter_(1, order, zero_t)
    g_idx = g_perm
    if perm is not None:
        invperm = torch.argsort(perm, dim=-1)
        Q = Q.gather(2, invperm[:, None, :].expand_as(Q))
        g_idx = g_perm.gather(1, invperm)
    weight = dequantized(Q, scale_t, zero_t, g_idx)
    Q, zero_t, losses = Q.to(torch.uint8), zero_t.to(torch.int32), Losses.sum(dim=-1)
    return [GPTQResult(Q=Q[k], scale=scale_t[k], zero=zero_t[k], g_idx=g_idx[k], weight=weight[k], losses=losses[k],
                       damp=damps[k]) for k in range(B)]


def _matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for batches; a batch of one as a plain matrix product (the same kernel, so the
    same bits, as a single problem's)."""
    return (a[0] @ b[0])[None] if a.shape[0] == 1 else torch.bmm(a, b)


def group_aware_order(imp: torch.Tensor, gs: int) -> torch.Tensor:
    """A column order that keeps groups whole (GPTQModel's group-aware act-order, llm-
    compressor's static actorder): groups by their most important column, descending, and
    inside each group its columns by importance. A last, partial group stays last, so that
    every group is gs consecutive columns of the order and g_idx stays column // gs."""
    full = imp.numel() // gs * gs
    groups = imp[:full].view(-1, gs)
    inside = torch.argsort(groups, dim=1, descending=True, stable=True)
    order = torch.argsort(groups.amax(dim=1), descending=True, stable=True)
    starts = torch.arange(0, full, gs, device=imp.device)[:, None]
    tail = full + torch.argsort(imp[full:], descending=True, stable=True)
    return torch.cat([(inside + starts)[order].flatten(), tail])


def _clip_weights(cfg: QuantConfig, imp: torch.Tensor, Hinv: torch.Tensor) -> torch.Tensor | None:
    """The clipping search's column weights [..., columns] (CLIP_WEIGHTS), scaled to mean 1
    per problem; None: uniform."""
    if not cfg.mse or cfg.clip_weight == "uniform":
        return None
    w = imp if cfg.clip_weight == "activation" else Hinv.diagonal(dim1=-2, dim2=-1).pow(-2)
    return torch.stack([v / v.mean() for v in w.reshape(-1, w.shape[-1])]).view(w.shape)


def _part(t: torch.Tensor | None, i1: int, i2: int) -> torch.Tensor | None:
    return None if t is None else t[..., i1:i2]


def _group_params(W: torch.Tensor, gs: int, n_groups: int, cfg: QuantConfig,
                  weight: torch.Tensor | None = None) -> list:
    """(scale, zero) of each group of `gs` columns of W [..., rows, columns], from W as it is."""
    return [find_params(W[..., g * gs:(g + 1) * gs], cfg, _part(weight, g * gs, (g + 1) * gs))
            for g in range(n_groups)]


def rtn(W: torch.Tensor, cfg: QuantConfig) -> GPTQResult:
    """Round-to-nearest with the same output as gptq(): the fallback for a Linear
    that saw no calibration tokens (an MoE expert no token was routed to)."""
    return rtn_batch(W[None], cfg)[0]


def rtn_batch(W: torch.Tensor, cfg: QuantConfig) -> list[GPTQResult]:
    """rtn() for B weights of one shape, W [B, rows, columns], at once (an MoE layer's
    experts without tokens: one by one, each took a few hundred small operations)."""
    B, rows, columns = W.shape
    gs = cfg.group_size if cfg.group_size > 0 else columns
    W = W.float()
    g_idx = torch.arange(columns, device=W.device, dtype=torch.int32) // gs
    n_groups = math.ceil(columns / gs)
    if columns % gs == 0:  # all groups at once: W as [B, groups, rows, gs]
        Wg = W.view(B, rows, n_groups, gs)
        scale_t, zero_t = find_params(Wg.transpose(1, 2), cfg)  # [B, groups, rows]
        s, z = scale_t.mT.contiguous()[..., None], zero_t.mT.contiguous()[..., None]
        Q = quantize(Wg, s, z, cfg.maxq)
        weight = dequantize(Q, s, z).view(B, rows, columns)
        Q = Q.view(B, rows, columns)
    else:
        params = _group_params(W, gs, n_groups, cfg)
        scale_t = torch.stack([s for s, _ in params], dim=1)  # [B, groups, rows]
        zero_t = torch.stack([z for _, z in params], dim=1)
        s = scale_t[:, g_idx.long()].mT
        z = zero_t[:, g_idx.long()].mT
        Q = quantize(W, s, z, cfg.maxq)
        weight = dequantize(Q, s, z)
    Q, zero_t, losses = Q.to(torch.uint8), zero_t.to(torch.int32), torch.zeros(B, rows, device=W.device)
    return [GPTQResult(Q=Q[k], scale=scale_t[k], zero=zero_t[k], g_idx=g_idx, weight=weight[k], losses=losses[k],
                       damp=0.0) for k in range(B)]
