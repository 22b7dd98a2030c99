"""When to quantize: the layer-by-layer (sequential) pipeline.

1. Run the model up to its first decoder layer for every calibration batch and keep
   that layer's inputs (hidden states plus whatever else the model passes it: rotary
   embeddings, masks, position ids).
2. For each decoder layer, for each true-sequential group of Linears: run the layer
   until the group's Linears have seen their inputs, accumulating their Hessians; solve
   GPTQ and write the dequantized weights back, so the next group sees quantized inputs.
   Then run the layer once more to produce the next layer's inputs.

Linears that receive the very same input tensor (q/k/v; gate/up) share one Hessian and
are solved as one stacked matrix: their rows are independent given H. Where layers and
activations live, and how a pass avoids recomputing what it already has, is runtime's.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed, fastpath, gptq_v1, runtime
from .calib import Calibration
from .errors import QuantizationFailed
from .families import Family, decoder_layers, layer_groups
from .gptq import CholeskyFailed, CrossProducts, GPTQResult, Hessian, QuantConfig, Shared, gptq_batch, rtn_batch
from .resume import WorkDir
from .runtime import LayerForwards, LayerInputs, Mover, StopForward, Weights

log = logging.getLogger("qwen_gptq")
T = TypeVar("T")


@dataclass
class ModuleStat:
    layer: int
    module: str
    loss: float
    damp: float
    seconds: float
    tokens: int
    method: str  # "gptq", or "rtn" for a Linear that saw no calibration tokens

    def numbers(self) -> list[float]:
        """Its measured fields, as one row of a float64 table that crosses ranks (of_numbers)."""
        return [self.loss, self.damp, self.seconds, self.tokens]

    @classmethod
    def of_numbers(cls, layer: int, module: str, numbers: list[float]) -> ModuleStat:
        loss, damp, seconds, tokens = numbers
        return cls(layer, module, loss, damp, seconds, int(tokens), _method(int(tokens)))


def _method(tokens: int) -> str:
    return "gptq" if tokens else "rtn"


@dataclass
class Outcome:
    packed: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # module -> qweight/qzeros/scales/g_idx
    stats: list[ModuleStat] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    layer_seconds: list[float] = field(default_factory=list)  # wall time of each decoder layer


@dataclass(frozen=True)
class Plan:
    """How to run the pipeline."""

    cfg: QuantConfig
    device: torch.device
    true_sequential: bool = True
    progress: bool = True
    memo_bytes: int | None = None  # memory for memoized outputs (None: runtime.memo_budget)
    gpu_memory: int | None = None  # the GPU memory the run may use (--max-gpu-memory; None: all of it)
    # Finished layers' output tensors are saved here (and no longer kept in Outcome.packed),
    # and taken from here on a rerun.
    work: WorkDir | None = None
    weights: Weights = Weights()  # where layers' weights come from and go (streaming)
    group: distributed.Group = distributed.Group()  # this process among several (torchrun)


@dataclass
class _Run:
    """What every layer of one run shares."""

    family: Family
    plan: Plan
    inputs: list[LayerInputs]  # per batch, the current layer's
    store: torch.device  # where hidden states live between layers
    memo_bytes: int | None  # memory for memoized outputs of quantized modules (None: runtime.memo_budget's, per layer)
    mover: Mover
    outcome: Outcome
    # GPTAQ: per batch, the current layer's input hidden states in the full-precision model
    fp_hidden: list[torch.Tensor] | None = None
    degraded: list[str] = field(default_factory=list)  # what out-of-memory retries have given up so far
    spill: runtime.SpillFiles | None = None  # activations in spill files: outputs overwrite inputs in place
    forwards: LayerForwards | None = None  # the current layer's
    memo_most: int = 0  # the most memory memoized outputs have held (to tell the run's own peak)
    needed: int | None = None  # the run's GPU peak without memoized outputs, once a layer has shown it
    experts_shared: bool = False  # MoE experts each on one rank (expert parallelism; see _share_experts)
    shares: list[nn.Module] = field(default_factory=list)  # the current layer's experts modules, so shared
    expert_owner: dict[str, int] = field(default_factory=dict)  # the rank of each of their Linears

    def memo_budget(self) -> int:
        """Memory for the next layer's memoized outputs."""
        if "memoized outputs dropped" in self.degraded:
            return 0
        if self.memo_bytes is not None:
            return self.memo_bytes
        return runtime.memo_budget(self.plan.device, self.needed, self.plan.gpu_memory)

    def layer_done(self) -> None:
        """Note the GPU's peak without memoized outputs (what later layers' budgets leave room for)."""
        if self.forwards is not None:
            self.memo_most = max(self.memo_most, self.forwards.most)
        if self.plan.device.type == "cuda":  # (never less than an earlier layer showed)
            self.needed = max(self.needed or 0, runtime.peak_gpu_bytes(self.plan.device) - self.memo_most)

    def kept(self, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """A batch's new hidden states, where the old ones were kept."""
        return old.copy_(new) if self.spill is not None else new.to(self.store)


# --------------------------------------------------------------------------- out of GPU memory
#
# A step that runs out of GPU memory is retried after giving something up, one rung at a
# time, each said in the log: first the memoized outputs go (the layer's intermediate
# outputs kept in the GPU's spare memory; none are kept after that), then the activations
# move to host memory (the largest thing kept on the GPU between steps), then the cached CUDA graphs and allocator
# blocks go, then one plain retry (a passing peak: another process on the GPU, say). Only
# when nothing is left to give up does the run stop (exit 1), naming the
# layer, the memory figures and the flags that would help; the finished layers stay in the
# work directory, so the same command continues from there. A retried step gives the
# very same result: it recomputes from inputs it did not modify.


def _retrying(run: _Run, i: int, what: str, step: Callable[[], T]) -> T:
    plain_retry = run.plan.group.size == 1  # one retry with nothing more given up (a passing peak)
    while True:
        try:
            return step()
        except torch.OutOfMemoryError as e:
            reason = str(e).splitlines()[0] if str(e) else "out of memory"
        # (outside the except block: the failed attempt's frames, and their tensors, are gone)
        if _give_up_something(run, i, what):
            continue
        if plain_retry:
            plain_retry = False
            runtime.release_cached_memory(run.plan.device)
            log.warning("layer %d: out of GPU memory while %s; retrying once more (%s)", i, what,
                        runtime.gpu_memory_figures(run.plan.device))
            continue
        given_up = "; ".join(run.degraded + ["a retry"]) if run.plan.group.size == 1 else "nothing (several processes)"
        limit = run.plan.gpu_memory
        more = "a GPU with more memory" if limit is None else f"a larger --max-gpu-memory (now {limit / 1e9:.1f} GB)"
        raise QuantizationFailed(
            f"layer {i}: the GPU ran out of memory while {what} ({reason}), even after {given_up}. "
            f"Memory: {runtime.gpu_memory_figures(run.plan.device)}. Fewer or shorter calibration samples "
            f"(--num-samples, --max_len), --batch-size 1, or {more} would help; the finished layers "
            f"are kept, so the same command continues from layer {i}") from None


def _give_up_something(run: _Run, i: int, what: str) -> bool:
    """The next rung of the ladder; False when none is left (or when several processes
    run: the others are already waiting in the step's collectives)."""
    if run.plan.group.size > 1:
        return False
    memoized = run.forwards is not None and run.forwards.most and run.plan.device.type == "cuda"
    if memoized and "memoized outputs dropped" not in run.degraded:
        run.forwards.forget()
        step = "memoized outputs dropped"
    elif run.store.type != "cpu":  # (once moved, the store is the host)
        cpu = torch.device("cpu")
        for x in run.inputs:
            x.hidden = x.hidden.to(cpu)
        if run.fp_hidden is not None:
            run.fp_hidden = [h.to(cpu) for h in run.fp_hidden]
        run.store = cpu
        step = "activations moved to host memory"
    elif "cached GPU memory released" not in run.degraded:
        fastpath.clear_caches()
        step = "cached GPU memory released"
    else:
        return False
    run.degraded.append(step)
    runtime.release_cached_memory(run.plan.device)
    log.warning("layer %d: out of GPU memory while %s; %s, retrying (%s)", i, what, step,
                runtime.gpu_memory_figures(run.plan.device))
    return True


def capture_inputs(model: nn.Module, layers: nn.ModuleList, calibration: Calibration,
                   keep: Callable[[LayerInputs], None] | None = None) -> list[LayerInputs]:
    """For every calibration batch: the first decoder layer's hidden states, and what the
    model passes each decoder layer besides them (each handed to `keep` as it comes, to be
    put where it will live).

    The model runs once per batch with every decoder layer replaced by a stand-in that
    records its call and hands its input on unchanged, so no layer computes anything.
    """
    calls: list = []

    def stand_in(*args, **kwargs):
        calls.append(runtime.split_call(args, kwargs))
        if len(calls) == len(layers):
            raise StopForward()
        # Models index a layer's output ([0], Qwen1) or pass it on as it is (transformers 5):
        # a 1-tuple serves both; what the next stand-in receives as hidden states is not used.
        return (calls[-1][0],)

    captured = []
    for layer in layers:
        layer.forward = stand_in
    try:
        for b in calibration.batches:
            calls.clear()
            try:
                model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)
            except StopForward:
                pass
            if len(calls) != len(layers):
                raise QuantizationFailed(f"the model's forward called {len(calls)} of its {len(layers)} decoder layers")
            captured.append(LayerInputs(calls[0][0], [(a, k) for _, a, k in calls], b.valid))
            if keep is not None:
                keep(captured[-1])
    finally:
        for layer in layers:
            del layer.forward
    return captured


def quantize_model(model: nn.Module, family: Family, calibration: Calibration, plan: Plan) -> Outcome:
    """Quantize every decoder layer of `model` (on CPU, or on the meta device for
    plan.weights to fill) and return the packed tensors (in plan.work, if given)."""
    outcome = Outcome()
    t = outcome.timings
    layers = decoder_layers(model, family)
    model_dtype = next(model.parameters()).dtype
    cdtype = runtime.compute_dtype(model_dtype, plan.device)

    t0 = time.perf_counter()
    where = _Placement(plan, layers[0], cdtype, calibration)
    try:
        with torch.no_grad():
            inputs = capture_inputs(model, layers, calibration, where.keep)
        fp_hidden = where.second_stream(inputs) if plan.cfg.gptaq else None
    except BaseException:
        where.remove()
        raise
    t["capture"] += time.perf_counter() - t0
    log.info("captured %d batch(es), %d tokens; activations kept %s", len(inputs), calibration.tokens, where.said)

    run = _Run(family, plan, inputs, where.store, plan.memo_bytes, Mover(plan.device, cdtype, model_dtype, plan.weights),
               outcome, fp_hidden, spill=where.spill)
    # Experts on their owners (see distributed's ExpertShare) where every rank shares a host:
    # it moves the experts' inputs (once, where kept; else every pass) and float32 outputs,
    # 3.2 GB a Qwen3-30B-A3B layer at 128 x 2048 tokens, cheap over NVLink; between hosts the
    # Hessians' 2.5 GB cost less. GPTAQ's full-precision passes keep the experts spread by
    # their Hessians.
    # Not yet measured on GPUs: on only with QWEN_GPTQ_EXPERT_PARALLEL=1 (docs/benchmarks.md).
    run.experts_shared = (plan.group.size > 1 and not plan.cfg.gptaq and distributed.one_host(plan.group)
                          and os.environ.get(EXPERT_PARALLEL_ENV) == "1")
    done = plan.work.finished() if plan.work is not None else 0
    if 0 < done < len(layers):
        log.info("resuming at layer %d of %d (layers 0-%d are finished, in %s)", done, len(layers), done - 1,
                 plan.work.path)
    elif done:
        log.info("resuming: all %d layers are finished (in %s); writing the output", done, plan.work.path)
    # A bar on a terminal; one plain line per layer in logs (carriage returns flood them).
    terminal = plan.progress and sys.stderr.isatty()
    bar = tqdm(range(len(layers)), desc="layers", disable=not terminal, dynamic_ncols=True)
    runtime.freeze_heap()  # (what lives now, the model and the calibration data, lives to the end)
    try:
        run.mover.to_device(layers[0])
        for i in bar:
            step = _replay_layer if i < done else _quantize_layer
            with runtime.profiled(i, plan.group.rank), runtime.phase(f"layer {i}"):
                step(run, i, layers[i], layers[i + 1] if i + 1 < len(layers) else None)
            losses = [s.loss for s in outcome.stats if s.layer == i]
            mean = sum(losses) / max(1, len(losses))
            bar.set_postfix(loss=f"{mean:.4g}")
            if plan.progress and not terminal:
                log.info("layer %d/%d done in %.1f s, mean loss %.4g, host memory %.2f GB%s", i + 1, len(layers),
                         outcome.layer_seconds[-1], mean, runtime.host_bytes() / 1e9,
                         " (finished earlier)" if i < done else "")
        t0 = time.perf_counter()
        run.mover.wait_all()
        t["move"] += time.perf_counter() - t0
    finally:
        runtime.thaw_heap()
        run.mover.close()
        bar.close()
        fastpath.clear_caches()
        where.remove()
    return outcome


class _Placement:
    """Where the activations live, decided when the first batch's hidden states are seen:
    on the GPU when they fit beside a layer, else in host memory when they fit there, else
    in spill files in the work directory (memory-mapped; said in the log)."""

    def __init__(self, plan: Plan, layer: nn.Module, dtype: torch.dtype, calibration: Calibration):
        self.plan, self.layer, self.dtype, self.calibration = plan, layer, dtype, calibration
        self.streams = 2 if plan.cfg.gptaq else 1
        self.store: torch.device | None = None
        self.spill: runtime.SpillFiles | None = None
        self.said = ""
        self.count = 0

    def keep(self, x: LayerInputs) -> None:
        if self.store is None:
            self._decide(x.hidden.shape[-1] * sum(b.input_ids.numel() for b in self.calibration.batches))
        x.place(self.plan.device, self.store, self.dtype)
        if self.spill is not None:
            x.hidden = self.spill.keep(x.hidden, f"batch-{self.count:05d}")
        self.count += 1

    def _decide(self, numel: int) -> None:
        plan = self.plan
        self.store = runtime.activation_device(numel, plan.device, self.layer, self.dtype, self.streams)
        self.said = f"on {self.store}"
        if self.store.type != "cpu":
            return
        fits, need, available = runtime.activations_fit_host(numel, self.dtype, self.streams)
        if fits:
            return
        if plan.work is None:
            log.warning("the activations (%.1f GB) may not fit in host memory (%.1f GB available); no work "
                        "directory to spill them to", need / 1e9, available / 1e9)
            return
        self.spill = runtime.SpillFiles(plan.work.path / f"activations-{plan.group.rank}")
        self.said = f"in spill files in {self.spill.directory}"
        log.warning("the activations (%.1f GB, inputs and outputs) do not fit in host memory (%.1f GB available): "
                    "they go to spill files in %s (memory-mapped; the page cache keeps what fits)", need / 1e9,
                    available / 1e9, self.spill.directory)

    def second_stream(self, inputs: list[LayerInputs]) -> list[torch.Tensor]:
        """GPTAQ's full-precision stream, starting from the same hidden states."""
        if self.spill is None:
            return [x.hidden for x in inputs]
        return [self.spill.keep(x.hidden, f"fp-batch-{j:05d}") for j, x in enumerate(inputs)]

    def remove(self) -> None:
        if self.spill is not None:
            self.spill.remove()


def _arrive(run: _Run, layer: nn.Module, next_layer: nn.Module | None) -> float:
    """Wait for the layer's weights on the device; send the next layer on its way."""
    start = time.perf_counter()
    run.mover.wait(layer)
    if next_layer is not None:
        run.mover.to_device(next_layer)  # travels while this layer is quantized
    run.outcome.timings["move"] += time.perf_counter() - start
    return start


def _leave(run: _Run, layer: nn.Module, start: float) -> None:
    t0 = time.perf_counter()
    run.mover.to_host(layer)
    runtime.return_free_host_memory()  # (host memory flat with depth)
    run.outcome.timings["move"] += time.perf_counter() - t0
    run.outcome.layer_seconds.append(time.perf_counter() - start)


def _forward_all(run: _Run, i: int, layer: nn.Module, forwards: LayerForwards | None) -> None:
    """The next layer's inputs: this layer's outputs for every batch."""
    for m in run.shares:  # (the experts' outputs summed back to each token's rank)
        m.share.combine = True
    t0 = time.perf_counter()
    with torch.no_grad(), runtime.phase("forward"):
        for j, x in enumerate(run.inputs):
            def step(j=j, x=x):
                if forwards is not None:
                    forwards.batch(j)
                return run.kept(x.hidden, runtime.run_layer(layer, i, x, run.plan.device))

            x.hidden = _retrying(run, i, "computing the next layer's inputs", step)
        _join_others(run, forwards, None)
    runtime.sync(run.plan.device)
    run.outcome.timings["forward"] += time.perf_counter() - t0


def _forward_full_precision(run: _Run, i: int, fp_layer: nn.Module) -> None:
    """GPTAQ: the next layer's inputs in the full-precision model."""
    t0 = time.perf_counter()
    with torch.no_grad():
        for j in range(len(run.inputs)):
            run.fp_hidden[j] = _retrying(run, i, "computing the next layer's full-precision inputs", lambda j=j: (
                run.kept(run.fp_hidden[j], runtime.run_layer(fp_layer, i, _fp_inputs(run, j), run.plan.device))))
    runtime.sync(run.plan.device)
    run.outcome.timings["forward"] += time.perf_counter() - t0


def _fp_inputs(run: _Run, j: int) -> LayerInputs:
    x = run.inputs[j]
    return LayerInputs(run.fp_hidden[j], x.calls, x.valid)


def _replay_layer(run: _Run, i: int, layer: nn.Module, next_layer: nn.Module | None) -> None:
    """A layer an interrupted run finished: its weights from the saved packed tensors
    (they dequantize to exactly what the solver wrote back), then its outputs."""
    start = _arrive(run, layer, next_layer)
    if run.fp_hidden is not None and next_layer is not None:
        _forward_full_precision(run, i, layer)  # before its weights are replaced
    prefix = f"{run.family.layers}.{i}."
    for full, tensors in run.plan.work.packed(i).items():
        w = layer.get_submodule(full[len(prefix):]).weight
        w.data.copy_(gptq_v1.dequantize_linear(**tensors, bits=run.plan.cfg.bits).to(w.device, w.dtype))
    run.outcome.stats += [ModuleStat(**s) for s in run.plan.work.stats(i)]
    _share_experts(run, layer)  # (the very sums of the run that wrote the layer)
    try:
        if next_layer is not None:
            _forward_all(run, i, layer, None)
    finally:
        _unshare_experts(run)
    _leave(run, layer, start)


def _say_memory(run: _Run, i: int, after: str) -> None:
    """--verbose: the GPU's peak so far and the memoized outputs held, after a step (the
    step where the peak grows is what the run's memory needs)."""
    if run.plan.device.type == "cuda" and log.isEnabledFor(logging.DEBUG):
        held = run.forwards.held if run.forwards is not None else 0
        log.debug("layer %d after %s: GPU peak %.2f GB, now %.2f GB, memoized %.2f GB of a budget of %.2f GB", i, after,
                  runtime.peak_gpu_bytes(run.plan.device) / 1e9, torch.cuda.memory_allocated(run.plan.device) / 1e9,
                  held / 1e9, run.forwards.budget / 1e9 if run.forwards is not None else 0)


def _save_layer(run: _Run, i: int, layer: nn.Module) -> None:
    """Once its packed tensors are on the host, write layer i's output tensors into the
    work directory: the packed Linears and the rest of the layer (in the model's dtype)."""
    prefix = f"{run.family.layers}.{i}."
    stats = [dataclasses.asdict(s) for s in run.outcome.stats if s.layer == i]
    dtype = run.mover.model_dtype

    def job() -> None:
        packed = {k: run.outcome.packed.pop(k) for k in [k for k in run.outcome.packed if k.startswith(prefix)]}
        tensors = {f"{m}.{leaf}": t for m, ts in packed.items() for leaf, t in ts.items()}
        quantized = {f"{m[len(prefix):]}.weight" for m in packed}
        for name, t in layer.state_dict(keep_vars=True).items():  # (no detached copy of every quantized weight)
            if name not in quantized:
                tensors[prefix + name] = t.detach().to("cpu", dtype if t.is_floating_point() else t.dtype)
        run.plan.work.save(i, tensors, stats)

    run.mover.then(job)


def _quantize_layer(run: _Run, i: int, layer: nn.Module, next_layer: nn.Module | None) -> None:
    start = _arrive(run, layer, next_layer)
    groups = layer_groups(layer, run.family)
    if not run.plan.true_sequential:
        groups = [[n for g in groups for n in g]]
    fp_layer = copy.deepcopy(layer) if run.fp_hidden is not None else None  # GPTAQ's reference
    budget = run.memo_budget()  # (experts shared: half of it for their gathered inputs)
    shares = _share_experts(run, layer, budget // 2)
    forwards = run.forwards = LayerForwards(layer, groups, budget - budget // 2 if shares else budget,
                                            len(run.inputs))
    try:
        for names in groups:
            modules = {n: layer.get_submodule(n) for n in names}
            done: set[str] = set()  # solved and written back (a retry leaves them)

            def step(modules=modules, done=done, first=names[0]):  # (run now, within this iteration)
                rtn_only = run.plan.cfg.method == "rtn"
                with runtime.phase(f"measure {first}"):
                    measured = _GroupInputs(modules) if rtn_only else _measure(run, i, layer, forwards, modules, fp_layer)
                _say_memory(run, i, f"measuring {first}…")
                with runtime.phase(f"solve {first}"):
                    _solve(run, i, modules, measured, done)
                _say_memory(run, i, f"solving {first}…")

            _retrying(run, i, f"quantizing {', '.join(names)}", step)
            forwards.quantized(names)
        forwards.last_pass()
        if next_layer is not None:  # the last layer's outputs feed nothing
            if fp_layer is not None:
                _forward_full_precision(run, i, fp_layer)
            _forward_all(run, i, layer, forwards)
        _say_memory(run, i, "the forward")
    finally:
        _unshare_experts(run)
        forwards.remove()
        run.layer_done()
        run.forwards = None
        fp_layer = None  # (GPTAQ's copy of the layer, freed now)
    if run.plan.work is not None and run.plan.group.main:
        _save_layer(run, i, layer)
    _leave(run, layer, start)


def _share_experts(run: _Run, layer: nn.Module, keep_bytes: int = 0) -> list[nn.Module]:
    """Several ranks (run.experts_shared): the layer's MoE experts module computes each
    expert on its owner alone, for every rank's tokens (distributed.ExpertShare; its
    gathered inputs kept for later passes within keep_bytes), so that an expert's Hessian
    is whole there; run.expert_owner names the rank of each of its Linears. Returns the
    modules so shared (run.shares): none, or the layer's one."""
    run.shares, run.expert_owner = [], {}
    if not run.experts_shared:
        return []
    found = [(prefix, m) for prefix, m in layer.named_modules()
             if getattr(m, "share", False) is None and hasattr(m, "num_experts")]  # (hf.UnfusedExperts)
    if len(found) != 1:  # (two in a layer would need their calls told apart)
        return []
    group = run.plan.group
    prefix, m = found[0]
    owners = distributed.expert_owners(group, m.num_experts)
    first = owners.index(group.rank) if group.rank in owners else 0  # (a contiguous run; none: empty)
    m.share = distributed.ExpertShare(group, first, first + owners.count(group.rank), keep_bytes=keep_bytes)
    for e, expert in enumerate(m):
        for name, sub in expert.named_modules():
            if isinstance(sub, nn.Linear):
                run.expert_owner[f"{prefix}.{e}.{name}"] = owners[e]
    run.shares = [m]
    return run.shares


def _unshare_experts(run: _Run) -> None:
    for m in run.shares:
        m.share = None
    run.shares, run.expert_owner = [], {}


def _join_others(run: _Run, forwards: LayerForwards | None, group: _GroupInputs | None) -> None:
    """After this rank's last batch of a pass, with the experts shared: its experts take
    part in the other ranks' remaining calls (their tokens are theirs to compute), as
    further batches of this rank's with no rows, until every rank is done."""
    device = run.plan.device
    for m in run.shares:
        j = len(run.inputs)

        def join(empty: tuple[torch.Tensor, ...], m: nn.Module = m) -> None:
            nonlocal j
            if forwards is not None:
                forwards.batch(j)
            if group is not None:
                group.start_batch(None)
            m.padded_rows = None
            m(*empty)
            if group is not None:
                group.end_batch()
            j += 1

        m.share.drain(join, device)


class _GroupInputs:
    """Receives the inputs of one group's Linears, pass by pass, into their Hessians.

    Linears fed the very same tensor in the first batch share the first one's Hessian
    (`owner`). A pass ends (StopForward) once every Linear of the group has been seen.
    """

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules = modules
        self.hessians: dict[str, Hessian] = {}
        # GPTAQ: each Linear's input in the full-precision model for the current batch, and
        # the cross products accumulated from them (dropped for a Linear whose rows do not
        # pair up: an MoE expert routed other tokens in the two models)
        self.fp: dict[str, torch.Tensor] | None = None
        self.cross: dict[str, CrossProducts] = {}
        self.unpaired: set[str] = set()
        self.owner: dict[str, str] = {}  # module -> module whose Hessian it shares
        self.first_batch = True
        self.valid: torch.Tensor | None = None
        self.fired: set[str] = set()
        self.seen: list[tuple[torch.Tensor, str]] = []

    def start_batch(self, valid: torch.Tensor | None) -> None:
        self.valid, self.fired, self.seen = valid, set(), []

    def end_batch(self) -> None:
        self.first_batch, self.seen = False, []

    def __call__(self, name: str, x: torch.Tensor) -> None:
        if self.first_batch:
            for other_x, other in self.seen:
                if other_x is x:
                    self.owner[name] = self.owner.get(other, other)
                    break
            else:
                self.seen.append((x, name))
        if name not in self.owner:
            x2 = x.reshape(-1, x.shape[-1])
            if self.valid is not None and x2.shape[0] == self.valid.shape[0]:
                x2 = x2[self.valid]  # padded positions carry no information
            if x2.shape[0]:
                if name not in self.hessians:
                    self.hessians[name] = Hessian(x2.shape[1], x2.device)
                # Sample by sample when nothing is padded: the Hessian then gathers and
                # multiplies the very rows it would one sample a pass (--batch-size auto
                # gives the same bits as 1).
                unpadded = self.valid is None and x.dim() == 3
                for rows in x2.split(x.shape[1]) if unpadded else (x2,):
                    self.hessians[name].add(rows)
            if self.fp is not None:
                self._pair(name, x2)
        self.fired.add(name)
        if len(self.fired) == len(self.modules):
            raise StopForward()

    def _pair(self, name: str, x2: torch.Tensor) -> None:
        if name in self.unpaired:
            return
        xf = self.fp.get(name)
        if xf is not None:
            xf = xf.reshape(-1, x2.shape[-1])
            if self.valid is not None and xf.shape[0] == self.valid.shape[0]:
                xf = xf[self.valid]
        if xf is None or xf.shape != x2.shape:
            self.unpaired.add(name)
            self.cross.pop(name, None)
            return
        if name not in self.cross:
            self.cross[name] = CrossProducts(x2.shape[1], x2.device)
        self.cross[name].add(xf, x2)


def _capture_fp(fp_layer: nn.Module, i: int, names: list[str], x: LayerInputs, device: torch.device
                ) -> dict[str, torch.Tensor]:
    """GPTAQ: the inputs of the named Linears in the full-precision copy of the layer, for one
    batch (the pass stops once all have been seen)."""
    seen: dict[str, torch.Tensor] = {}

    def hook(name):
        def pre(_module, args):
            seen[name] = args[0]
            if len(seen) == len(names):
                raise StopForward()
        return pre

    handles = [fp_layer.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        runtime.run_layer(fp_layer, i, x, device)
    except StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    return seen


def _measure(run: _Run, i: int, layer: nn.Module, forwards: LayerForwards,
             modules: dict[str, nn.Module], fp_layer: nn.Module | None = None) -> _GroupInputs:
    """Run the layer over every batch until the group's Linears have seen their inputs
    (GPTAQ: first the full-precision copy of the layer, on the full-precision inputs)."""
    t0 = time.perf_counter()
    group = _GroupInputs(modules)
    with torch.no_grad(), forwards.measuring(modules, group):
        for j, x in enumerate(run.inputs):
            if fp_layer is not None:
                group.fp = _capture_fp(fp_layer, i, list(modules), _fp_inputs(run, j), run.plan.device)
            forwards.batch(j)
            group.start_batch(x.valid)
            try:
                runtime.run_layer(layer, i, x, run.plan.device)
            except StopForward:
                pass
            group.end_batch()
        _join_others(run, forwards, group)
    runtime.sync(run.plan.device)
    run.outcome.timings["hessian"] += time.perf_counter() - t0
    return group


EXPERT_PARALLEL_ENV = "QWEN_GPTQ_EXPERT_PARALLEL"  # 1: MoE experts split by expert on one host (_share_experts)
PACK_BATCH_BYTES = 1 << 30  # solved weights (float32) packed and written back together, at most


@dataclass
class _Solved:
    """One lead's result, waiting to be packed and written back."""

    lead: str
    res: GPTQResult
    tokens: int
    seconds: float


def _write_back(run: _Run, i: int, modules: dict[str, nn.Module], members: dict[str, list[str]],
                solved: list[_Solved], position: dict[str, int]) -> None:
    """The solved leads' Linears: packed in stacks of one shape and fetched a stack at a
    time by rank 0, which writes (another rank packs the experts it owns and sends them
    there, with their stats and `position`s), quantized weights written back, stats noted.
    A stack instead of one Linear at a time: an MoE layer has hundreds of small Linears, and
    their launches and copies one by one cost more than the packing itself. Everything
    that allocates comes first, then the write-back: a lead is written whole or not at all."""
    parts = []  # (Linear, its result, its rows in the result)
    for s in solved:
        row = 0
        for n in members[s.lead]:
            rows = modules[n].weight.shape[0]
            parts.append((n, s, slice(row, row + rows)))
            row += rows
    stacks: dict[tuple, list[int]] = {}
    for k, (_, s, sl) in enumerate(parts):
        stacks.setdefault((sl.stop - sl.start, *s.res.Q.shape[1:], s.res.scale.shape[0]), []).append(k)
    packed = []
    main = run.plan.group.main
    for ks in stacks.values():
        ks = ks if main else [k for k in ks if parts[k][1].lead in run.expert_owner]
        if ks:
            picked = [parts[k] for k in ks]
            packed.append((ks, gptq_v1.pack_linear(_stack([s.res.Q[sl] for _, s, sl in picked]),
                                                   _stack([s.res.scale[:, sl] for _, s, sl in picked]),
                                                   _stack([s.res.zero[:, sl] for _, s, sl in picked]),
                                                   _stack([s.res.g_idx for _, s, _ in picked]), run.plan.cfg.bits)))
    losses = torch.stack([s.res.losses[sl].sum() for _, s, sl in parts]).tolist()
    noted = {}
    for (n, s, sl), loss in zip(parts, losses):
        w = modules[n].weight
        w.data.copy_(s.res.weight[sl].to(w.dtype))
        share = s.seconds * w.shape[0] / s.res.Q.shape[0]
        noted[n] = ModuleStat(i, n, loss, s.res.damp, share, s.tokens, _method(s.tokens))
        log.debug("layer %d %s: loss %.5g damp %g", i, n, loss, s.res.damp)
    run.outcome.stats += noted.values()
    prefix = f"{run.family.layers}.{i}."
    for ks, tensors in packed:
        names = [parts[k][0] for k in ks]
        if main:
            run.mover.fetch_stacked(tensors, run.outcome.packed, [prefix + n for n in names])
            continue
        stats = torch.tensor([noted[n].numbers() for n in names],
                             dtype=torch.float64, device=tensors["qweight"].device)
        place = torch.tensor([position[n] for n in names], dtype=torch.int64, device=stats.device)
        with runtime.phase("packed to rank 0"):
            distributed.send_to(0, [tensors[t] for t in gptq_v1.TENSORS] + [place, stats], stats.device)


def _receive_experts(run: _Run, i: int, names: list[str]) -> list[str]:
    """Rank 0: the experts the other ranks own, packed there, with their stats (their
    positions among `names`); the Linears of them that saw no calibration token."""
    prefix, unseen = f"{run.family.layers}.{i}.", []
    for r in range(1, run.plan.group.size):
        while True:
            with runtime.phase("packed from a rank"):  # (waits for its solves and packing)
                got = distributed.received_from(r, run.plan.device)
            if not got:
                break
            *tensors, place, stats = got
            linears = [names[k] for k in place.tolist()]
            for n, numbers in zip(linears, stats.tolist()):
                run.outcome.stats.append(ModuleStat.of_numbers(i, n, numbers))
                if not run.outcome.stats[-1].tokens and run.plan.cfg.method == "gptq":
                    unseen.append(n)
            run.mover.fetch_stacked(dict(zip(gptq_v1.TENSORS, tensors)), run.outcome.packed, [prefix + n for n in linears])
    return unseen


def _stack(ts: list[torch.Tensor]) -> torch.Tensor:
    """[B, ...] from B tensors (one: a view, no copy)."""
    return ts[0][None] if len(ts) == 1 else torch.stack(ts)


def _solve(run: _Run, i: int, modules: dict[str, nn.Module], group: _GroupInputs, done: set[str]) -> None:
    """One stacked GPTQ problem per distinct Hessian (spread over the ranks when there are
    several); weights written back, packed tensors fetched (by rank 0, which writes). Leads
    in `done` (solved before a retry) are left as they are; each solved lead joins it."""
    t, cfg, device, ranks = run.outcome.timings, run.plan.cfg, run.plan.device, run.plan.group
    t0 = time.perf_counter()
    owner = distributed.agree(ranks, group.owner)  # (the first collective: waits for slower ranks' passes)
    t["solve"] += time.perf_counter() - t0
    leads = [n for n in modules if n not in owner and n not in done]
    members = {lead: [lead] + [n for n in modules if owner.get(n) == lead] for lead in leads}
    problems = {lead: distributed.Problem(lead, [modules[n].weight.data for n in members[lead]],
                                          group.hessians.pop(lead, None), group.cross.pop(lead, None),
                                          lead not in group.unpaired)
                for lead in leads}
    group.hessians.clear()  # a member's own (a rank that could not tell it shares the lead's input): the same
    group.cross.clear()
    # Experts computed on one rank alone (expert parallelism) are solved there; the rest
    # (every Linear of one process; a dense layer's, a shared expert's) by their Hessians.
    alone = [lead for lead in leads if lead in run.expert_owner]
    summed = [lead for lead in leads if lead not in run.expert_owner]

    def solve(names: list[str], W: torch.Tensor, H: torch.Tensor | None, D: torch.Tensor | None,
              shared: Shared | None) -> list[GPTQResult]:
        if H is None:
            return rtn_batch(W, cfg)
        try:
            results = gptq_batch(W, H, cfg, overwrite_h=True, D=D, shared=shared)
        except CholeskyFailed as e:
            raise QuantizationFailed(f"layer {i} {names[e.index]}: {e}") from None
        finite = torch.stack([torch.isfinite(r.weight).all() for r in results]).tolist()
        if not all(finite):
            raise QuantizationFailed(f"layer {i} {names[finite.index(False)]}: quantization produced NaN/Inf weights")
        return results

    def solved() -> Iterator[tuple[str, GPTQResult, int]]:
        if summed:
            for lead, (res, n_tok) in zip(summed, distributed.solve_all(ranks, [problems[n] for n in summed], solve,
                                                                          cross=cfg.gptaq)):
                yield lead, res, n_tok
        if alone:
            for k, res, n_tok in distributed.solve_owned(ranks, [problems[n] for n in alone],
                                                         [run.expert_owner[n] for n in alone], solve):
                yield alone[k], res, n_tok

    pending: list[_Solved] = []  # results waiting to be packed and written back together
    unseen: list[str] = []  # Linears that saw no calibration token
    noted = len(run.outcome.stats)
    order = {n: k for k, n in enumerate(n for lead in leads for n in members[lead])}
    left = len(summed) + sum(run.expert_owner[n] == ranks.rank for n in alone)
    t0 = time.perf_counter()
    for lead, res, n_tok in solved():
        left -= 1
        if not n_tok and cfg.method == "gptq":
            unseen += members[lead]
        elapsed = time.perf_counter() - t0
        t["solve"] += elapsed
        pending.append(_Solved(lead, res, n_tok, elapsed))
        if not left or sum(p.res.Q.numel() * 4 for p in pending) >= PACK_BATCH_BYTES:
            t0 = time.perf_counter()
            with runtime.phase("write back"):
                _write_back(run, i, modules, members, pending, order)
            done.update(p.lead for p in pending)
            pending.clear()
            runtime.sync(device)
            t["pack"] += time.perf_counter() - t0
        t0 = time.perf_counter()
    if alone and ranks.main:
        unseen += _receive_experts(run, i, list(order))
    elif alone:
        distributed.send_to(0, [], device)  # (the end of this rank's)
    # In the leads' order, each with its members, whoever solved them (rank 0 notes its own
    # experts' first, then those it receives): the log and report list them as one process does.
    run.outcome.stats[noted:] = sorted(run.outcome.stats[noted:], key=lambda s: order[s.module])
    unseen.sort(key=order.__getitem__)
    if unseen:
        _say_unseen(i, unseen)


UNSEEN_NAMED = 6  # Linears named in the warning about those that saw no token (all of them with --verbose)


def _say_unseen(i: int, names: list[str]) -> None:
    """One warning for a group's Linears that saw no calibration token (an MoE layer can
    have hundreds: one line each buried the log), naming the first few; every one is in
    quant_log.csv, the report's rtn_fallbacks and, with --verbose, the log."""
    more = f" and {len(names) - UNSEEN_NAMED} more" if len(names) > UNSEEN_NAMED else ""
    log.warning("layer %d: %d Linear%s saw no calibration tokens and %s quantized with round-to-nearest: %s%s", i,
                len(names), "s" if len(names) > 1 else "", "were" if len(names) > 1 else "was",
                ", ".join(names[:UNSEEN_NAMED]), more)
    if more:
        log.debug("layer %d: all that saw no calibration tokens: %s", i, ", ".join(names))
