"""Several processes, one per GPU (torchrun), quantizing one model data-parallel.

Every process (rank) runs the whole pipeline on its own slice of the calibration batches
(balanced by token count). On one host, with QWEN_GPTQ_EXPERT_PARALLEL=1 (the pipeline
decides), an MoE layer's experts are split instead (expert parallelism, ExpertShare):
each rank computes its own experts for every rank's tokens, so that their Hessians are
whole at their owners, which solve them (solve_owned) and send rank 0 the packed tensors
it writes (send_to). Otherwise, per true-sequential group, each distinct Hessian is
summed over the ranks, and the GPTQ problems are spread over them:

- a group with at least as many problems as ranks (MoE experts between hosts, or with
  GPTAQ) gives each problem one owner, assigned by cost (longest first, to the least
  loaded rank): the Hessians are summed at their owners by reduce-scatters of many at a
  time, and each owner solves its problems in batches of one shape, as one process does,
  and sends each batch's results in one broadcast per tensor;
- a group with fewer (a dense layer's q/k/v, o, gate/up, down: one Hessian each) has
  its Hessian all-reduced; from SPLIT_ROWS_FROM weights on, its rows are split over the
  ranks and each rank solves its rows (rows are independent given H); a smaller one
  (an MoE layer's attention) is solved whole by every rank, which is sooner than waiting
  for each other's halves.

Then each result is broadcast from its solver, so that every rank continues with the
same quantized weights (a problem every rank solved whole is checked to have come out
the same bits everywhere instead: a digest of each result, compared; rank 0's is sent
where they differ). Rank 0 alone writes (work directory, output). Per layer the
ranks exchange the Hessians (a sum of columns² × 4 bytes over the layer's distinct
Hessians; twice that with GPTAQ, whose cross products travel the same way) and the
quantized weights (one byte per weight for the codes, plus a scale and zero point per
group and row: the receivers rebuild the weights from them). Activations leave their
rank only for experts split by expert: their routed inputs (tokens × hidden size in the
model's dtype, all-gathered once a layer where kept, else every pass) and, in the
forward, the experts' float32 partial sums (reduce-scattered back).

One process (no torchrun) is a group of one, and every function here is then local.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from . import runtime
from .errors import BadInput
from .gptq import CrossProducts, GPTQResult, Hessian, Shared, dequantized, spread

log = logging.getLogger("qwen_gptq")

TIMEOUT = datetime.timedelta(minutes=30)  # a collective that waits longer means a rank is gone


@dataclass(frozen=True)
class Group:
    """This process's place among the ranks (a group of one without torchrun)."""

    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """Whether torchrun (or its launcher) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: torch.device) -> tuple[Group, torch.device]:
    """Join the process group torchrun set up; on CUDA each rank takes its local GPU
    (NCCL), on CPU the ranks talk over gloo."""
    if not launched():
        return Group(), device
    if not dist.is_initialized():
        cuda = device.type == "cuda"
        if cuda:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            if local >= torch.cuda.device_count():
                raise BadInput(f"rank {os.environ.get('RANK')} wants GPU {local}, but {torch.cuda.device_count()} "
                               "are visible")
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT,
                                device_id=device if cuda else None)
    return Group(dist.get_rank(), dist.get_world_size()), device


def one_host(group: Group) -> bool:
    """Whether every rank runs on this host (torchrun's LOCAL_WORLD_SIZE is all of them)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", group.size)) == group.size


def barrier(group: Group) -> None:
    if group.size > 1:
        dist.barrier()


def launch(gpus: str, argv: list[str]) -> int:
    """`--gpus N`: run `qwen_gptq` with argv in N processes on this machine through
    torchrun's launcher (a rendezvous on a free local port, no restarts); the exit code
    is that of the first process to fail (all of them are stopped then), else 0."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    visible = torch.cuda.device_count()
    n = visible if gpus == "auto" else int(gpus)
    if n < 1 or n > visible:
        raise BadInput(f"--gpus {gpus}: {visible} GPU(s) visible on this machine")
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=n, run_id=f"qwen-gptq-{os.getpid()}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.5)
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "qwen_gptq", *argv)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        log.error("process %d (of %d) failed with exit code %d; all were stopped", rank, n, failure.exitcode)
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0


def finish() -> None:
    """Leave the process group after a run that succeeded: wait for every rank, then tear
    the group down. (Rank 0 is still writing when the others are done, and a gloo group
    torn down under a peer that still holds its connections can abort the process: SIGABRT,
    "terminate called without an active exception", failing a run that succeeded.)

    A run that failed leaves the group as it is, and its process ends through exit_code.
    Tearing the group down waits for the other ranks under NCCL, while they wait in a
    collective for this one: on two H200s a rank that failed hung the job, its error not
    yet reported, until the collective's 30-minute TIMEOUT. Once this process has exited,
    torchrun stops the others.
    """
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def peer_lost(e: BaseException) -> bool:
    """Whether e is a collective failing because another process is gone (it failed, and
    its own message says why, or it was stopped): its connection closed (gloo says so in a
    RuntimeError) or torch.distributed's network error. (Under NCCL the others are stopped
    by torchrun while they wait.)"""
    return (dist.is_initialized() and dist.get_world_size() > 1
            and (isinstance(e, dist.DistNetworkError) or any(s in str(e) for s in ("closed by peer", "reset by peer"))))


def exit_code(code: int) -> int:
    """The process's exit code, returned; or, where a failed run left its group as it was
    (finish), the process ends here with it, at once. (os._exit: the interpreter's own
    teardown would tear the group down after all. Nothing of ours waits for it: outputs
    are flushed here, and cleaning up is done by then.)"""
    if dist.is_initialized():
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            try:
                stream.flush()
            except (AttributeError, OSError, ValueError):
                pass
        os._exit(code)
    return code


def share(group: Group, sizes: list[int]) -> list[int]:
    """The indices of the items (of these sizes) this rank takes (see _owners), in order."""
    return [i for i, r in enumerate(_owners(group, sizes)) if r == group.rank]


def agree(group: Group, owner: dict[str, str]) -> dict[str, str]:
    """The union over the ranks of which Linears share another's input (and so its
    Hessian): a rank that saw no token of an MoE expert in its first batch could not tell."""
    if group.size == 1:
        return owner
    with runtime.phase("agree"):
        every = gathered(group, owner)
    union: dict[str, str] = {}
    for o in every:
        union.update(o)
    return union


def gathered(group: Group, obj: object) -> list:
    """obj (picklable) from every rank, in rank order, on every rank."""
    if group.size == 1:
        return [obj]
    out: list = [None] * group.size
    dist.all_gather_object(out, obj)
    return out


@dataclass
class Problem:
    """One stacked GPTQ problem: the weights of Linears sharing a Hessian."""

    name: str
    weights: list[torch.Tensor]  # [rows_i, columns] each, stacked into one W when solved
    hessian: Hessian | None  # this rank's accumulation (None: it saw no token)
    cross: CrossProducts | None = None  # GPTAQ: this rank's cross products (None: none, or no token)
    paired: bool = True  # GPTAQ: False when this rank's rows did not pair up (then no rank uses D)

    @property
    def shape(self) -> tuple[int, int]:
        return sum(w.shape[0] for w in self.weights), self.weights[0].shape[1]

    def stacked(self) -> torch.Tensor:
        return torch.cat(self.weights)


# A batch of problems of one shape: (names, W [B, rows, columns], H [B, columns, columns]
# or None: no tokens, GPTAQ's D like H or None, and how the ranks share Hinv's work: None,
# or for W this rank's rows of problems every rank holds H of) -> their results
Solve = Callable[[list[str], torch.Tensor, torch.Tensor | None, torch.Tensor | None, Shared | None],
                 list[GPTQResult]]

SOLVE_BATCH_BYTES = 1 << 30  # Hessians (float32) per batched solve; its temporaries take about three times that


def solve_all(group: Group, problems: list[Problem], solve: Solve,
              cross: bool = False) -> Iterator[tuple[GPTQResult, int]]:
    """(result, tokens seen over all ranks) of each problem, in order, the same on every
    rank. Problems of one shape (MoE experts) are solved in batches. cross (GPTAQ): the
    problems carry cross products, summed like the Hessians."""
    if group.size > 1:
        yield from _solve_spread(group, problems, solve, cross)
        return
    counts = [p.hessian.count if p.hessian is not None else 0 for p in problems]
    paired = [p.paired and p.cross is not None for p in problems]
    done: dict[int, GPTQResult] = {}
    following = 0
    for batch in _batches(problems, range(len(problems)), counts, paired):
        # Scaled in place (finish), then stacked: the accumulators go as they are copied.
        H = _stacked([_take(problems[i], "hessian").finish() for i in batch]) if counts[batch[0]] else None
        D = _stacked([_take(problems[i], "cross").finish(counts[i]) for i in batch]) if paired[batch[0]] else None
        for i in batch:  # (cross products not used: unpaired rows)
            problems[i].cross = None
        done.update(zip(batch, _solve_batch(problems, batch, solve, H, D)))
        del H, D
        while following in done:
            yield done.pop(following), counts[following]
            following += 1


def _batches(problems: list[Problem], which, counts: list[int], paired: list[bool]) -> list[list[int]]:
    """The problems (indices `which`) in batches that one solve takes together: the same
    shape, tokens or none, cross products or none; at most SOLVE_BATCH_BYTES of Hessians.
    Ordered by their first problem."""
    kinds: dict[tuple, list[int]] = {}
    for i in which:
        kinds.setdefault((problems[i].shape, counts[i] > 0, paired[i]), []).append(i)
    batches = []
    for (shape, _, _), members in kinds.items():
        size = max(1, SOLVE_BATCH_BYTES // (shape[1] * shape[1] * 4))
        batches += [members[k:k + size] for k in range(0, len(members), size)]
    return sorted(batches)


def _take(p: Problem, name: str):
    """p's Hessian or cross products, no longer held by p."""
    value = getattr(p, name)
    setattr(p, name, None)
    return value


def _stacked(parts: list[torch.Tensor]) -> torch.Tensor:
    """[B, n, n] from B matrices, each released from the list once copied (freed then, when
    nothing else holds it: a batch's Hessians are never all there twice)."""
    out = torch.empty(len(parts), *parts[0].shape, device=parts[0].device, dtype=torch.float32)
    for k in range(len(parts)):
        out[k].copy_(parts[k])
        parts[k] = None
    return out


def _solve_batch(problems: list[Problem], batch: list[int], solve: Solve, H: torch.Tensor | None,
                 D: torch.Tensor | None) -> list[GPTQResult]:
    return solve([problems[i].name for i in batch], torch.stack([problems[i].stacked() for i in batch]), H, D, None)


def _cost(p: Problem) -> int:
    rows, columns = p.shape
    return rows * columns * columns + columns**3


def _solve_spread(group: Group, problems: list[Problem], solve: Solve,
                  cross: bool) -> Iterator[tuple[GPTQResult, int]]:
    device = problems[0].weights[0].device
    counts = torch.tensor([p.hessian.count if p.hessian else 0 for p in problems], dtype=torch.int64, device=device)
    dist.all_reduce(counts)
    counts = counts.tolist()
    paired = [True] * len(problems)
    if cross:  # D is used only if every rank's rows paired up
        flags = torch.tensor([int(p.paired) for p in problems], dtype=torch.int64, device=device)
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
        paired = [bool(f) for f in flags.tolist()]
    if len(problems) < group.size:
        yield from _solve_split(group, problems, solve, counts, [cross and use for use in paired])
        return
    # Owners solve their problems in batches (as one process does) and send each batch's
    # results in one go: every rank can tell every rank's batches, all being decided alike.
    # Every rank solves what it owns first, then the results travel in order: a rank never
    # waits for another's solve before starting its own.
    owners = _owners(group, [_cost(p) for p in problems])
    has_d = [cross and use and n > 0 for use, n in zip(paired, counts)]
    batches = [_batches(problems, [i for i, o in enumerate(owners) if o == r], counts, has_d)
               for r in range(group.size)]
    with runtime.phase("to owners"):
        hessians = _summed_at_owners(group, problems, batches, [n > 0 for n in counts], _products, device)
        crosses = _summed_at_owners(group, problems, batches, has_d, _cross_products, device) if cross else {}
    for p in problems:  # (what no rank uses: unpaired cross products)
        p.hessian = p.cross = None
    solved: dict[tuple[int, ...], list[GPTQResult]] = {}
    with runtime.phase("solve owned"):
        for batch in batches[group.rank]:
            scale = torch.tensor([2.0 / counts[i] if counts[i] else 0.0 for i in batch], dtype=torch.float32,
                                 device=device)
            H = hessians.pop(tuple(batch)).mul_(scale[:, None, None]) if counts[batch[0]] else None
            D = crosses.pop(tuple(batch)).mul_(scale[:, None, None]) if has_d[batch[0]] else None
            solved[tuple(batch)] = _solve_batch(problems, batch, solve, H, D)
            del H, D
    results: dict[int, GPTQResult] = {}
    with runtime.phase("results"):
        for r in range(group.size):
            for batch in batches[r]:
                sent = _broadcast(group, problems[batch[0]].shape, r, solved.pop(tuple(batch), None), device,
                                  len(batch))
                results.update(zip(batch, sent))
    for i, n in enumerate(counts):
        yield results.pop(i), n


def _solve_split(group: Group, problems: list[Problem], solve: Solve, counts: list[int],
                 with_d: list[bool]) -> Iterator[tuple[GPTQResult, int]]:
    """Fewer problems than ranks (a dense layer's groups): each problem's Hessian (and,
    with_d, cross products) summed on every rank (all-reduce), its rows split over the ranks
    (from SPLIT_ROWS_FROM weights on; a smaller problem solved whole by every rank)."""
    device = problems[0].weights[0].device
    hessians: list[torch.Tensor | None] = []
    crosses: list[torch.Tensor | None] = []
    for p, n, use in zip(problems, counts, with_d):
        h, c = _products(p), _cross_products(p)
        if n == 0:
            hessians.append(None)
            crosses.append(None)
            continue
        hessians.append(_all_summed(h, p.shape[1], n, device))
        crosses.append(_all_summed(c, p.shape[1], n, device) if use else None)
    mine: dict[int, GPTQResult] = {}
    for i, p in enumerate(problems):
        H, hessians[i] = hessians[i], None
        D, crosses[i] = crosses[i], None
        if _whole(p):
            with runtime.phase("solve whole"):
                mine[i] = solve([p.name], p.stacked()[None], _one(H), _one(D), None)[0]
            del H, D
            continue
        split_rows = _rows(group, p.shape[0])
        rows = split_rows[group.rank]
        # Hinv, the one step that is the same on every rank, is shared too (its
        # Cholesky in halves and its triangular solve in column blocks, each part summed
        # in an all-reduce: gptq.lower_cholesky, upper_cholesky_of_inverse), where every
        # rank has rows and all ranks share a host (between hosts the all-reduces,
        # 1.5 × columns² × 4 bytes, cost more than the work they split: 72B, 5.2 GB ≈
        # 0.4 s at 100 Gb/s against ≈ 0.25 s of work saved).
        shared = Shared(group.rank, group.size, dist.all_reduce) if one_host(group) and all(
            r.stop > r.start for r in split_rows) and H is not None else None
        if rows.stop > rows.start:
            with runtime.phase("solve rows"):
                mine[i] = solve([p.name], p.stacked()[rows][None], _one(H), _one(D), shared)[0]
        del H, D
    for i, (p, n) in enumerate(zip(problems, counts)):
        if _whole(p):
            yield _the_same_everywhere(group, p, mine.pop(i), device), n
            continue
        with runtime.phase("results"):
            parts = [_broadcast(group, (rows.stop - rows.start, p.shape[1]), r,
                                [mine.pop(i)] if r == group.rank else None, device)[0]
                     for r, rows in enumerate(_rows(group, p.shape[0])) if rows.stop > rows.start]
        yield _joined(parts), n


def _whole(p: Problem) -> bool:
    """Whether every rank solves p whole (small: see SPLIT_ROWS_FROM)."""
    return p.shape[0] * p.shape[1] < SPLIT_ROWS_FROM


def _the_same_everywhere(group: Group, p: Problem, mine: GPTQResult, device: torch.device) -> GPTQResult:
    """A result every rank computed from the same W and H: the same bits on every rank
    where the kernels are deterministic (the same GPU model, the same libraries), checked
    by a digest of its codes and parameters (one tiny all-gather); where the digests
    differ, every rank takes rank 0's (broadcast), so that all continue with one weight."""
    digest = torch.stack([_digest(mine.Q), _digest(mine.scale.view(torch.int32)), _digest(mine.zero),
                          _digest(mine.g_idx)])
    every = torch.empty(group.size * digest.numel(), dtype=digest.dtype, device=device)
    with runtime.phase("compare"):
        dist.all_gather_into_tensor(every, digest)
        same = bool((every.view(group.size, -1) == digest).all().item())
    if same:
        return mine
    log.warning("%s: the processes solved it to different bits (different GPUs or libraries?); all take process "
                "0's", p.name)
    return _broadcast(group, p.shape, 0, [mine] if group.main else None, device)[0]


def _digest(t: torch.Tensor) -> torch.Tensor:
    """A position-weighted sum of t's integers (int64, wrapping alike everywhere)."""
    flat = t.reshape(-1).to(torch.int64)
    return (flat * (torch.arange(flat.numel(), device=t.device, dtype=torch.int64) % 65521 + 1)).sum()


def _products(p: Problem) -> torch.Tensor | None:
    """p's XᵀX on this rank (unscaled; None: no token here), no longer held by p."""
    h = _take(p, "hessian")
    return h.products() if h is not None else None


def _cross_products(p: Problem) -> torch.Tensor | None:
    c = _take(p, "cross")
    return c.D if c is not None else None


def _all_summed(t: torch.Tensor | None, columns: int, n: int, device: torch.device) -> torch.Tensor:
    """This rank's part (None: zeros) summed over the ranks, scaled by 2/n, on every rank."""
    t = t if t is not None else torch.zeros(columns, columns, device=device, dtype=torch.float32)
    with runtime.phase("all-reduce"):
        dist.all_reduce(t)
    return t.mul_(2.0 / n)


# A dense group's problem is split by rows from this many weights (rows × columns) on; a
# smaller one is solved whole by every rank. Split, a Qwen3-30B-A3B layer's attention (q/k/v
# 10.5 M weights, o 8.4 M) took no less solving on each rank than whole (launches, not
# arithmetic), and the ranks then waited for each other's halves: its layer took 0.88-0.92 s
# on two H200s, 0.67-0.68 s solved whole (one GPU: 1.02-1.16 s). Qwen2.5-72B's (67 M and up)
# still halve when split; Qwen2.5-7B's (12.8 M and up), measured split, stay so.
SPLIT_ROWS_FROM = 12 << 20

REDUCE_PIECE_BYTES = 256 << 20  # each rank's part of one reduce-scatter of owned problems' Hessians, at most


def _summed_at_owners(group: Group, problems: list[Problem], batches: list[list[list[int]]], wanted: list[bool],
                      part: Callable[[Problem], torch.Tensor | None],
                      device: torch.device) -> dict[tuple[int, ...], torch.Tensor]:
    """For each of this rank's batches of `wanted` problems: their part (this rank's
    accumulation; None: none here) summed over the ranks, unscaled, stacked [B, n, n].

    One reduce-scatter per piece (each rank's next problems, up to REDUCE_PIECE_BYTES, in
    its batches' order, padded to the largest rank's), not one reduce per problem: an MoE
    layer's 256 expert Hessians were as many collectives, each a host round trip. Every
    rank's parts are released as they are copied in, and a batch's stack is allocated when
    its first sum arrives: beyond the accumulators, which shrink as they go, the peak is about
    one batch and a piece's two buffers."""
    queues = [[(tuple(b), k, i) for b in bs if wanted[b[0]] for k, i in enumerate(b)] for bs in batches]
    out: dict[tuple[int, ...], torch.Tensor] = {}
    size = lambda i: problems[i].shape[1] ** 2  # noqa: E731
    while any(queues):
        piece = []
        for r, q in enumerate(queues):
            k, total = 0, 0
            while k < len(q) and (k == 0 or (total + size(q[k][2])) * 4 <= REDUCE_PIECE_BYTES):
                total += size(q[k][2])
                k += 1
            piece.append(q[:k])
            queues[r] = q[k:]
        segment = max(sum(size(i) for _, _, i in p) for p in piece)
        send = torch.zeros(group.size * segment, device=device, dtype=torch.float32)
        for r, p in enumerate(piece):
            at = r * segment
            for _, _, i in p:
                t = part(problems[i])
                if t is not None:
                    send[at:at + size(i)].view_as(t).copy_(t)
                del t
                at += size(i)
        got = torch.empty(segment, device=device, dtype=torch.float32)
        with runtime.phase("reduce-scatter"):
            dist.reduce_scatter_tensor(got, send)
        del send
        at = 0
        for key, k, i in piece[group.rank]:
            n = problems[i].shape[1]
            if key not in out:
                out[key] = torch.empty(len(key), n, n, device=device, dtype=torch.float32)
            out[key][k].copy_(got[at:at + size(i)].view(n, n))
            at += size(i)
    return out


def _one(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t[None]


def _rows(group: Group, rows: int) -> list[slice]:
    """Each rank's share of a problem's rows."""
    bounds = torch.linspace(0, rows, group.size + 1).round().long().tolist()
    return [slice(bounds[r], bounds[r + 1]) for r in range(group.size)]


def _owners(group: Group, costs: list[int]) -> list[int]:
    """Each item's rank, by cost (gptq.spread: the same assignment on every rank)."""
    return spread(costs, group.size)


def _joined(parts: list[GPTQResult]) -> GPTQResult:
    """One result from the results of consecutive row ranges (the same H: the same g_idx)."""
    return GPTQResult(
        Q=torch.cat([p.Q for p in parts]), scale=torch.cat([p.scale for p in parts], dim=1),
        zero=torch.cat([p.zero for p in parts], dim=1), g_idx=parts[0].g_idx,
        weight=torch.cat([p.weight for p in parts]), losses=torch.cat([p.losses for p in parts]),
        damp=max(p.damp for p in parts))


_RESULT_TENSORS = ("Q", "scale", "zero", "g_idx", "losses")  # (the weight is rebuilt from the first four)


def _broadcast(group: Group, shape: tuple[int, int], src: int, mine: list[GPTQResult] | None,
               device: torch.device, count: int = 1) -> list[GPTQResult]:
    """`src`'s results for `count` problems of W's shape [rows, columns], on every rank: one
    header (the group count and each damp), then each of the results' tensors stacked but
    the weight, which the other ranks rebuild from the codes (gptq.dequantized: the very
    bits; a fifth of the bytes a float32 weight would take to send)."""
    rows, columns = shape
    header = torch.tensor([mine[0].scale.shape[0]] + [r.damp for r in mine] if mine else [0.0] * (count + 1),
                          dtype=torch.float64, device=device)
    with runtime.phase("broadcast header"):  # (tolist waits for the sender)
        dist.broadcast(header, src)
        values = header.tolist()
    groups, damps = int(values[0]), values[1:]
    if mine:
        stacked = {name: torch.stack([getattr(r, name) for r in mine]) for name in _RESULT_TENSORS}
    else:
        stacked = {"Q": torch.empty(count, rows, columns, dtype=torch.uint8, device=device),
                   "scale": torch.empty(count, groups, rows, dtype=torch.float32, device=device),
                   "zero": torch.empty(count, groups, rows, dtype=torch.int32, device=device),
                   "g_idx": torch.empty(count, columns, dtype=torch.int32, device=device),
                   "losses": torch.empty(count, rows, dtype=torch.float32, device=device)}
    for name in _RESULT_TENSORS:
        dist.broadcast(stacked[name], src)
    if mine:
        return mine
    weights = dequantized(stacked["Q"], stacked["scale"], stacked["zero"], stacked["g_idx"])
    return [GPTQResult(**{name: t[k] for name, t in stacked.items()}, weight=weights[k], damp=damps[k])
            for k in range(count)]


# --------------------------------------------------------------------------- experts, each on one rank
#
# An MoE layer's experts under expert parallelism (pipeline: several ranks, not GPTAQ):
# each rank computes its own experts (a contiguous run) for every rank's tokens, so that
# each expert's Hessian is whole at its owner. Per call the experts' routed inputs are
# all-gathered (tokens × hidden size in the model's dtype, from every rank; once a layer
# where kept: see ExpertShare);
# in the forward that makes the next layer's inputs, each rank's partial sums (its
# experts' weighted outputs, float32) are summed back to the token's rank by one
# reduce-scatter. Nothing else travels but the packed experts rank 0 writes (send_to):
# no Hessian is summed, no quantized weight broadcast (a rank runs no expert it does not own).


def expert_owners(group: Group, experts: int) -> list[int]:
    """Each expert's rank: contiguous runs, as even as can be."""
    return [r for r, run in enumerate(_rows(group, experts)) for _ in range(run.start, run.stop)]


@dataclass
class ExpertShare:
    """An MoE experts module's part on this rank (hf.UnfusedExperts.share): experts
    [first, stop), for every rank's tokens. combine: the pass makes the next layer's
    inputs, so the experts' outputs are summed back to each token's rank; while a pass only
    measures, nothing downstream of the experts is used, and zeros stand in.

    Ranks may hold different numbers of batches: every call first all-gathers each rank's
    row count, and a rank past its last batch of a pass takes part in the others' calls
    with no rows of its own (drain), so that its experts still compute their tokens.

    The experts' inputs are the same in every pass that reaches them (everything upstream
    is quantized by then: groups come in dataflow order). Where every rank can keep the
    first such pass's gathered inputs within keep_bytes, later passes use them again:
    nothing is gathered, no row count exchanged, the calls made as in that pass."""

    group: Group
    first: int
    stop: int
    combine: bool = False
    keep_bytes: int = 0
    _joining: list[int] | None = field(default=None, init=False)  # the row counts of the call a draining rank joins
    _empty: tuple[torch.Tensor, ...] = field(default=(), init=False)  # a call's arguments with no rows
    _kept: list[tuple[list[torch.Tensor], int, int]] | None = field(default_factory=list, init=False)  # (gathered, most, own rows)
    _kept_bytes: int = field(default=0, init=False)
    _again: bool = field(default=False, init=False)  # later passes use the kept inputs
    _call: int = field(default=0, init=False)  # the pass's calls so far
    _joins: int = field(default=0, init=False)  # calls joined in the kept pass

    def gathered(self, *tensors: torch.Tensor) -> tuple[list[torch.Tensor], int]:
        """Each tensor [rows, ...] from every rank, rank after rank, each rank's rows padded
        to the most any rank has (floats 0, integers -1: routed to no expert, booleans True:
        padding), and that most."""
        rows = tensors[0].shape[0]
        if self._again:
            out, most, had = self._kept[self._call]
            if had != rows:
                raise RuntimeError(f"the experts' call {self._call} has {rows} rows here, {had} in the kept pass")
            self._call += 1
            return out, most
        sizes = self._joining if self._joining is not None else self._sizes(rows, tensors[0].device)
        self._joining = None
        most = max(sizes)
        out = []
        with runtime.phase("experts' inputs"):
            for t in tensors:
                if t.shape[0] < most:
                    fill = True if t.dtype == torch.bool else 0 if t.is_floating_point() else -1
                    t = torch.cat([t, t.new_full((most - t.shape[0], *t.shape[1:]), fill)])
                gathered = t.new_empty((self.group.size * most, *t.shape[1:]))
                dist.all_gather_into_tensor(gathered, t.contiguous())
                out.append(gathered)
        if self._kept is not None:
            self._kept.append((out, most, rows))
            self._kept_bytes += sum(t.numel() * t.element_size() for t in out)
            if self._kept_bytes > self.keep_bytes:
                self._kept = None  # (said at the pass's end: then no rank keeps them)
        self._call += 1
        return out, most

    def called(self, *args: torch.Tensor) -> None:
        """The module's arguments of a call of this rank's (their shapes past the rows, and
        dtypes, for the calls it joins)."""
        if not self._empty:
            self._empty = tuple(a[:0] for a in args)

    def summed_back(self, partial: torch.Tensor, rows: int, most: int, dtype: torch.dtype) -> torch.Tensor:
        """This rank's rows of the experts' output, from every rank's partial sums (float32
        [ranks × most, hidden], as gathered); zeros while a pass only measures."""
        if not self.combine:
            return partial.new_zeros(rows, partial.shape[1], dtype=dtype)
        mine = partial.new_empty(most, partial.shape[1])
        with runtime.phase("experts' outputs"):
            dist.reduce_scatter_tensor(mine, partial.contiguous())
        return mine[:rows].to(dtype)

    def drain(self, join: Callable[[tuple[torch.Tensor, ...]], None], device: torch.device) -> int:
        """After this rank's last batch of a pass: join(the arguments with no rows) for each
        call another rank still makes, until every rank is done. Returns how many."""
        reached = self._call > 0
        if self._again:  # (a pass that reaches the experts makes the kept pass's calls)
            joined = self._joins if reached else 0
            for _ in range(joined):
                join(self._empty)
            self._call = 0
            return joined
        joined = 0
        while True:
            sizes = self._sizes(-1 if self._kept is not None else -2, device)
            if max(sizes) < 0:
                break
            if not self._empty:
                raise RuntimeError("a rank joined its experts' call before making one")  # (groups come in dataflow order)
            self._joining = [max(0, n) for n in sizes]
            join(self._empty)
            joined += 1
        reached = reached or joined > 0
        if reached and self._kept is not None and all(n == -1 for n in sizes):
            self._again, self._joins = True, joined
        elif reached:
            self._kept = None
        self._call = 0
        return joined

    def _sizes(self, rows: int, device: torch.device) -> list[int]:
        """Every rank's row count for this call (-1: past its last batch; -2: and it could
        not keep the pass's inputs)."""
        mine = torch.tensor([rows], dtype=torch.int64, device=device)
        every = torch.empty(self.group.size, dtype=torch.int64, device=device)
        with runtime.phase("experts' rows"):
            dist.all_gather_into_tensor(every, mine)
            return every.tolist()


def solve_owned(group: Group, problems: list[Problem], owners: list[int],
                solve: Solve) -> Iterator[tuple[int, GPTQResult, int]]:
    """Problems whose Hessian is whole at their owner (ExpertShare's experts): each rank
    solves its own in batches, as one process does (nothing travels). Yields (index,
    result, tokens) of this rank's problems, as solved."""
    counts = [p.hessian.count if p.hessian is not None and o == group.rank else 0 for p, o in zip(problems, owners)]
    none = [False] * len(problems)
    for batch in _batches(problems, [i for i, o in enumerate(owners) if o == group.rank], counts, none):
        H = _stacked([_take(problems[i], "hessian").finish() for i in batch]) if counts[batch[0]] else None
        yield from ((i, r, counts[i]) for i, r in zip(batch, _solve_batch(problems, batch, solve, H, None)))
        del H


_SENT_DTYPES = (torch.int32, torch.int64, torch.float16, torch.float32, torch.float64, torch.uint8)


def send_to(dst: int, tensors: list[torch.Tensor], device: torch.device) -> None:
    """Tensors to rank dst (received_from there), point to point: their count, dtypes
    and shapes first, then each. No tensors: the end of a run of them."""
    header = [len(tensors)] + [x for t in tensors for x in (_SENT_DTYPES.index(t.dtype), t.dim(), *t.shape)]
    dist.send(torch.tensor([len(header)], dtype=torch.int64, device=device), dst)
    dist.send(torch.tensor(header, dtype=torch.int64, device=device), dst)
    for t in tensors:
        dist.send(t.contiguous(), dst)


def received_from(src: int, device: torch.device) -> list[torch.Tensor]:
    """What rank src sent (send_to); waits for it."""
    size = torch.empty(1, dtype=torch.int64, device=device)
    dist.recv(size, src)
    header = torch.empty(int(size.item()), dtype=torch.int64, device=device)
    dist.recv(header, src)
    values, out, at = header.tolist(), [], 1
    for _ in range(values[0]):
        dtype, dim = _SENT_DTYPES[values[at]], values[at + 1]
        out.append(torch.empty(values[at + 2:at + 2 + dim], dtype=dtype, device=device))
        at += 2 + dim
        dist.recv(out[-1], src)
    return out
