"""When to quantize: the layer-by-layer (sequential) pipeline.

1. Run the model up to its first decoder layer for every calibration batch and
   keep that layer's inputs (hidden states plus whatever else the model passes
   it: rotary embeddings, masks, position ids).
2. For each decoder layer: move it to the device; for each true-sequential group
   of Linears, run the layer forward until the group's Linears have seen their
   inputs, accumulating H = 2/n XᵀX in float32; solve GPTQ, and write the
   dequantized weights back so the next group sees quantized inputs; then run the
   layer once more to produce the next layer's inputs; move it back.

A pass never computes the measured Linears' own products, and reuses the memoized
outputs of the modules already quantized (see _LayerRun): each Linear's product runs
about once per layer instead of once per pass.

Linears that receive the very same input tensor (q/k/v; gate/up) share one
Hessian and are solved as one stacked matrix: their rows are independent given H.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import BadInput, QuantizationFailed
from .families import Family, decoder_layers, get_module, layer_groups
from .gptq import CholeskyFailed, QuantConfig, clear_graphs, gptq, rtn
from .packing import pack_linear

log = logging.getLogger("qwen_gptq")


@dataclass
class ModuleStat:
    layer: int
    module: str
    loss: float
    damp: float
    seconds: float
    tokens: int
    method: str  # "gptq", or "rtn" for a Linear that saw no calibration tokens


@dataclass
class Outcome:
    packed: dict[str, dict[str, torch.Tensor]]  # full module name -> qweight/qzeros/scales/g_idx (CPU)
    stats: list[ModuleStat]
    timings: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    tokens: int = 0
    layer_seconds: list[float] = field(default_factory=list)  # wall time of each decoder layer


class _StopForward(Exception):
    pass


@dataclass
class _Batch:
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor | None  # [B, T] or None when nothing is padded
    valid: torch.Tensor | None  # bool [B*T] on the compute device, None when nothing is padded
    hidden: torch.Tensor | None = None  # the current layer's input
    args: tuple = ()
    kwargs: dict | None = None


def make_batches(samples: list[torch.Tensor], batch_size: int, pad_id: int) -> list[_Batch]:
    """Group samples (longest first, to waste little padding) into right-padded batches."""
    order = sorted(range(len(samples)), key=lambda i: -len(samples[i]))
    batches = []
    for start in range(0, len(order), batch_size):
        chunk = [samples[i] for i in order[start:start + batch_size]]
        T = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), T), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), T), dtype=torch.long)
        for r, s in enumerate(chunk):
            ids[r, : len(s)] = s
            mask[r, : len(s)] = 1
        padded = bool((mask == 0).any())
        batches.append(_Batch(ids, mask if padded else None, mask.bool().flatten() if padded else None))
    return batches


def _to(obj, device, dtype=None):
    """Move tensors inside nested tuples/lists/dicts; drop KV caches."""
    if isinstance(obj, torch.Tensor):
        if dtype is not None and obj.is_floating_point():
            return obj.to(device=device, dtype=dtype)
        return obj.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(o, device, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device, dtype) for k, v in obj.items()}
    if type(obj).__name__.endswith("Cache"):
        return None
    return obj


def capture_inputs(model: nn.Module, layers: nn.ModuleList, batches: list[_Batch]) -> None:
    """Fill each batch's hidden/args/kwargs with what the first decoder layer receives."""
    first = layers[0]

    def grab(module, args, kwargs):
        raise _StopForward((args, kwargs))

    handle = first.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for b in batches:
            try:
                model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)
            except _StopForward as stop:
                args, kwargs = stop.args[0]
            else:
                raise QuantizationFailed("the model's forward never reached its first decoder layer")
            kwargs = dict(kwargs)
            if args:
                b.hidden, b.args = args[0], tuple(args[1:])
            else:
                b.hidden, b.args = kwargs.pop("hidden_states"), ()
            for k in ("past_key_value", "past_key_values", "cache", "layer_past"):
                if k in kwargs:
                    kwargs[k] = None
            if "use_cache" in kwargs:
                kwargs["use_cache"] = False
            b.kwargs = kwargs
    finally:
        handle.remove()


def _compute_dtype(model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    # CPUs without bf16 matrix units run bf16/fp16 matmuls slowly and less exactly:
    # on CPU the layer under work runs in float32. On CUDA it runs in the model's dtype.
    return torch.float32 if device.type == "cpu" else model_dtype


def quantize_model(
    model: nn.Module,
    family: Family,
    samples: list[torch.Tensor],
    cfg: QuantConfig,
    device: torch.device,
    batch_size: int = 1,
    pad_id: int = 0,
    progress: bool = True,
    memo_bytes: int | None = None,
) -> Outcome:
    """Quantize every decoder layer of `model` (on CPU) in place and return the packed tensors.

    memo_bytes bounds the memory spent on memoized Linear outputs (None: see _memo_budget).
    """
    outcome = Outcome(packed={}, stats=[])
    t = outcome.timings
    layers = decoder_layers(model, family)
    model_dtype = next(model.parameters()).dtype
    cdtype = _compute_dtype(model_dtype, device)

    t0 = time.perf_counter()
    batches = make_batches(samples, batch_size, pad_id)
    outcome.tokens = sum(len(s) for s in samples)
    with torch.no_grad():
        capture_inputs(model, layers, batches)
    store = _storage_device(batches, device, layers[0], cdtype)
    for b in batches:
        b.hidden = b.hidden.to(store, cdtype)
        b.args = _to(b.args, device, cdtype)
        b.kwargs = _to(b.kwargs, device, cdtype)
        if b.valid is not None:
            b.valid = b.valid.to(device)
    t["capture"] += time.perf_counter() - t0
    log.info("captured %d batch(es), %d tokens; activations kept on %s", len(batches), outcome.tokens, store)

    if memo_bytes is None:
        memo_bytes = _memo_budget(device)
    mover = _Mover(device, cdtype, model_dtype)
    bar = tqdm(range(len(layers)), desc="layers", disable=not progress, file=None, dynamic_ncols=True)
    try:
        _quantize_layers(layers, bar, mover, family, batches, cfg, device, store, memo_bytes, outcome, progress)
    finally:
        mover.close()
    bar.close()
    clear_graphs()
    return outcome


def _quantize_layers(layers, bar, mover, family, batches, cfg, device, store, memo_bytes, outcome, progress):
    t = outcome.timings
    mover.to_device(layers[0])
    for i in bar:
        layer = layers[i]
        start = t0 = time.perf_counter()
        mover.wait(layer)
        if i + 1 < len(layers):
            mover.to_device(layers[i + 1])  # travels while this layer is quantized
        t["move"] += time.perf_counter() - t0
        groups = layer_groups(layer, family)
        if not cfg.true_sequential:
            groups = [[n for g in groups for n in g]]
        run = _LayerRun(layer, groups, memo_bytes)
        try:
            for names in groups:
                _quantize_group(layer, i, names, batches, cfg, device, family, outcome, run, mover)
                run.quantized(names)
            run.storing = False  # the output pass is the last one: nothing more to keep
            if i + 1 < len(layers):  # the last layer's outputs feed nothing
                t0 = time.perf_counter()
                with torch.no_grad():
                    for j, b in enumerate(batches):
                        run.batch = j
                        b.hidden = _forward(layer, b, device).to(store)
                _sync(device)
                t["forward"] += time.perf_counter() - t0
        finally:
            run.remove()
        t0 = time.perf_counter()
        mover.to_host(layer)
        t["move"] += time.perf_counter() - t0
        outcome.layer_seconds.append(time.perf_counter() - start)
        if progress:
            mean = sum(s.loss for s in outcome.stats if s.layer == i) / max(1, sum(1 for s in outcome.stats if s.layer == i))
            bar.set_postfix(loss=f"{mean:.4g}")
    t0 = time.perf_counter()
    mover.wait_all()
    t["move"] += time.perf_counter() - t0


class _Mover:
    """Moves decoder layers to the compute device and back, and results to the host.

    On CUDA a worker thread does it on a stream of its own, so that layer i+1's weights
    travel while layer i is quantized, and layer i's weights and packed tensors travel
    back while i+1 is: the main thread waits only for what is not done yet. Weights go
    back into the very host memory they came from (no fresh pageable allocation to
    fault in). Elsewhere the moves are plain and immediate.
    """

    def __init__(self, device: torch.device, cdtype: torch.dtype, model_dtype: torch.dtype):
        self.device, self.cdtype, self.model_dtype = device, cdtype, model_dtype
        self.pending: dict[int, Future] = {}  # layers on their way to the device
        self.back: list[Future] = []  # copies to the host
        self.homes: dict[int, list] = {}
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.pool = ThreadPoolExecutor(1, thread_name_prefix="qwen-gptq-move")
            self.stream = torch.cuda.Stream(device)

    def to_device(self, layer: nn.Module) -> None:
        if not self.cuda:
            layer.to(device=self.device, dtype=self.cdtype)
            return

        def job():
            homes = []
            with torch.cuda.stream(self.stream):
                for m in layer.modules():
                    for coll in (m._parameters, m._buffers):
                        for k, v in coll.items():
                            if v is None or v.is_cuda:  # (a tensor shared by two modules moves once)
                                continue
                            moved = v.data.to(self.device, self.cdtype if v.is_floating_point() else None,
                                              non_blocking=True)
                            homes.append((coll, k, v.data))
                            _set(coll, k, moved)
            self.stream.synchronize()
            self.homes[id(layer)] = homes

        self.pending[id(layer)] = self.pool.submit(job)

    def wait(self, layer: nn.Module) -> None:
        f = self.pending.pop(id(layer), None)
        if f is not None:
            f.result()

    def _after_main(self, copy) -> None:
        """Run copy() on the worker, on the mover's stream, once the main stream has done
        what it has queued so far (the work that produced the tensors copied)."""
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self.device))

        def job():
            self.stream.wait_event(done)
            with torch.cuda.stream(self.stream):
                copy()

        self.back.append(self.pool.submit(job))

    def to_host(self, layer: nn.Module) -> None:
        if not self.cuda:
            layer.to(device="cpu", dtype=self.model_dtype)
            return

        def copy():
            for coll, k, home in self.homes.pop(id(layer)):
                home.copy_(coll[k].data)  # blocking on this stream: pageable memory, never pinned
                _set(coll, k, home)

        self._after_main(copy)

    def fetch(self, tensors: dict[str, torch.Tensor], into: dict, key: str) -> None:
        """into[key] = tensors, copied to the host."""
        if not self.cuda:
            into[key] = {k: v.to("cpu") for k, v in tensors.items()}
            return

        def copy():
            into[key] = {k: v.to("cpu") for k, v in tensors.items()}

        self._after_main(copy)

    def wait_all(self) -> None:
        for f in [*self.pending.values(), *self.back]:
            f.result()
        self.pending.clear()
        self.back.clear()

    def close(self) -> None:
        if self.cuda:
            self.pool.shutdown(wait=True)


def _set(coll: dict, k: str, value: torch.Tensor) -> None:
    if isinstance(coll[k], nn.Parameter):
        coll[k].data = value
    else:
        coll[k] = value


def _forward(layer: nn.Module, b: _Batch, device) -> torch.Tensor:
    out = layer(b.hidden.to(device), *b.args, **b.kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _sync(device):
    """Wait for the main stream (for honest phase timings), not for the mover's copies."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def _storage_device(batches, device, layer, dtype) -> torch.device:
    """Keep activations on the GPU when they (twice, input and output) fit beside a layer."""
    if device.type != "cuda":
        return device
    itemsize = torch.finfo(dtype).bits // 8
    need = 2 * sum(b.hidden.numel() for b in batches) * itemsize
    layer_bytes = sum(p.numel() * p.element_size() for p in layer.parameters())
    free, _ = torch.cuda.mem_get_info(device)
    # Leave room for the layer, its Hessians and the forward's temporaries.
    return device if need + 4 * layer_bytes < 0.7 * free else torch.device("cpu")


class _LayerRun:
    """The forwards of one decoder layer while its groups are quantized.

    It wraps the forward of every quantized Linear and of every module containing one:
    - A Linear of the group being measured adds its input to the Hessian and skips its
      own product (the pass stops as soon as the whole group has been seen, so nothing
      downstream uses it; zeros stand in for it meanwhile).
    - Once a module's Linears are all quantized, its weights and its input (everything
      upstream is quantized too: groups come in dataflow order) no longer change, so
      its output is memoized per batch within a memory budget, and a later pass reuses
      it instead of recomputing it. An output the model modified in place (its version
      counter moved) is recomputed, never reused.
    Each Linear's product then runs once per layer instead of once per pass.
    """

    def __init__(self, layer: nn.Module, groups: list[list[str]], budget: int):
        quantized = [n for g in groups for n in g]
        units = dict.fromkeys(quantized)
        for n in quantized:  # the modules containing a quantized Linear, within the layer
            parts = n.split(".")
            units.update(dict.fromkeys(".".join(parts[:k]) for k in range(1, len(parts))))
        self.inside = {u: [n for n in quantized if n == u or n.startswith(u + ".")] for u in units}
        self.final: set[str] = set()  # units whose Linears are all quantized
        self.group: dict[str, nn.Module] = {}  # the Linears being measured
        self.on_input = None  # fn(name, x) called for each measured Linear's input
        self.batch = 0
        self.storing = budget > 0
        self.budget, self.used = budget, 0
        self.store: dict = {}
        self.modules = {u: get_module(layer, u) for u in units}
        for u, m in self.modules.items():
            m.forward = self._wrap(u, m, m.forward)

    def quantized(self, names) -> None:
        done = set(names) | {n for u in self.final for n in self.inside[u]}
        self.final = {u for u, ns in self.inside.items() if all(n in done for n in ns)}

    def _wrap(self, name, module, forward):
        def run(*args, **kwargs):
            if name in self.group:  # a Linear: forward(input)
                x = args[0] if args else kwargs["input"]
                self.on_input(name, x)
                return x.new_zeros(*x.shape[:-1], module.out_features)
            if name not in self.final:
                return forward(*args, **kwargs)
            key = (name, self.batch)
            hit = self.store.get(key)
            if hit is not None and all(t._version == v for t, v in zip(_tensors(hit[0]), hit[1])):
                return hit[0]
            y = forward(*args, **kwargs)
            if self.storing and hit is None:
                self._keep(name, key, y)
            return y

        return run

    def _keep(self, name, key, y):
        size = _nbytes(y)
        if self.used + size > self.budget:
            return
        self.store[key] = (y, [t._version for t in _tensors(y)])
        self.used += size
        for inner in self.inside[name]:  # the parts' outputs are not needed any more
            if inner != name and (inner, self.batch) in self.store:
                self.used -= _nbytes(self.store.pop((inner, self.batch))[0])

    def remove(self):
        for m in self.modules.values():
            del m.forward
        self.store.clear()


def _tensors(y) -> list[torch.Tensor]:
    if isinstance(y, torch.Tensor):
        return [y]
    if isinstance(y, (tuple, list)):
        return [t for t in y if isinstance(t, torch.Tensor)]
    return []


def _nbytes(y) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(y))


def _memo_budget(device: torch.device) -> int:
    """Memory for memoized outputs: on CPU, where the forwards dominate, a quarter of the
    available host memory; on CUDA none (recomputing is cheap there, and GPU memory is
    kept for activations and Hessians)."""
    if device.type != "cpu":
        return 0
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024 // 4
    except (OSError, KeyError, ValueError):
        return 1 << 30


def _quantize_group(layer, layer_idx, names, batches, cfg, device, family, outcome, run: "_LayerRun", mover: "_Mover"):
    t = outcome.timings
    modules = {n: get_module(layer, n) for n in names}
    H: dict[str, Hessian] = {}
    owner: dict[str, str] = {}  # module -> module whose Hessian it shares (same input tensor)
    state = {"valid": None, "seen": [], "fired": set(), "first": True}

    def on_input(name, x):
        if state["first"]:
            for other_x, other in state["seen"]:
                if other_x is x:
                    owner[name] = owner.get(other, other)
                    break
            else:
                state["seen"].append((x, name))
        if name not in owner:
            x2 = x.reshape(-1, x.shape[-1])
            valid = state["valid"]
            if valid is not None and x2.shape[0] == valid.shape[0]:
                x2 = x2[valid]
            if x2.shape[0]:
                if name not in H:
                    H[name] = Hessian(x2.shape[1], x2.device)
                H[name].add(x2)
        state["fired"].add(name)
        if len(state["fired"]) == len(modules):
            raise _StopForward()

    run.group, run.on_input = modules, on_input
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            for j, b in enumerate(batches):
                run.batch = j
                state["valid"], state["fired"], state["seen"] = b.valid, set(), []
                try:
                    _forward(layer, b, device)
                except _StopForward:
                    pass
                state["first"] = False
                state["seen"] = []
    finally:
        run.group, run.on_input = {}, None
    _sync(device)
    t["hessian"] += time.perf_counter() - t0

    # Solve: one stacked problem per distinct Hessian.
    solved = [n for n in names if n not in owner]
    for lead in solved:
        members = [lead] + [n for n in names if owner.get(n) == lead]
        t0 = time.perf_counter()
        weights = [modules[n].weight for n in members]
        W = torch.cat([w.data for w in weights], dim=0)
        n_tok = H[lead].count if lead in H else 0
        if n_tok == 0:
            log.warning("layer %d: %s saw no calibration tokens; quantized with round-to-nearest", layer_idx, ", ".join(members))
            res = rtn(W, cfg)
            method = "rtn"
        else:
            Hs = H.pop(lead).finish().mul_(2.0 / n_tok)
            try:
                res = gptq(W, Hs, cfg, overwrite_h=True)
            except CholeskyFailed as e:
                raise QuantizationFailed(f"layer {layer_idx} {lead}: {e}") from None
            del Hs
            method = "gptq"
            if not torch.isfinite(res.weight).all():
                raise QuantizationFailed(f"layer {layer_idx} {lead}: quantization produced NaN/Inf weights")
        _sync(device)
        elapsed = time.perf_counter() - t0
        t["solve"] += elapsed
        t0 = time.perf_counter()
        row = 0
        for n, w in zip(members, weights):
            rows = w.shape[0]
            sl = slice(row, row + rows)
            w.data.copy_(res.weight[sl].to(w.dtype))
            packed = pack_linear(res.Q[sl], res.scale[:, sl], res.zero[:, sl], res.g_idx, cfg.bits)
            full = f"{family.layers}.{layer_idx}.{n}"
            mover.fetch(packed, outcome.packed, full)
            loss = res.losses[sl].sum().item()
            outcome.stats.append(ModuleStat(layer_idx, n, loss, res.damp, elapsed * rows / W.shape[0], n_tok, method))
            log.debug("layer %d %s: loss %.5g damp %g", layer_idx, n, loss, res.damp)
            row += rows
        _sync(device)
        t["pack"] += time.perf_counter() - t0


class Hessian:
    """XᵀX of one Linear's inputs, accumulated in float32.

    XᵀX is symmetric: with X = [A B] split by columns, only AᵀA, AᵀB and BᵀB are
    computed and BᵀA is mirrored at the end, a quarter fewer FLOPs. Small batches are
    gathered into chunks of at least CHUNK rows first, where matrix products run faster.
    """

    CHUNK = 2048

    def __init__(self, n: int, device: torch.device):
        self.H = torch.zeros(n, n, device=device, dtype=torch.float32)
        self.h = n // 2 // 64 * 64 if n >= 1024 else 0  # split point (0: no split for small H)
        self.count = 0
        self.buf: torch.Tensor | None = None  # rows waiting to be multiplied, copied here
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
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
        h, H = self.h, self.H
        if not h:
            accumulate_hessian(H, x, x)
            return
        a, b = x[:, :h], x[:, h:]
        accumulate_hessian(H[:h, :h], a, a)
        accumulate_hessian(H[:h, h:], a, b)
        accumulate_hessian(H[h:, h:], b, b)

    def finish(self) -> torch.Tensor:
        """The accumulated XᵀX (not yet divided by the token count)."""
        self._flush()
        if self.h:
            self.H[self.h:, :self.h].copy_(self.H[:self.h, self.h:].T)
        return self.H


def accumulate_hessian(H: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> None:
    """H += xᵀy, accumulated in float32 whatever x's dtype.

    On CUDA, bf16/fp16 activations go straight into one tensor-core GEMM with float32
    output and accumulation (their products are exact in float32), without a float32
    copy of x. Elsewhere x is converted to float32 first.
    """
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and _OUT_DTYPE[0]:
        try:
            torch.addmm(H, x.T, y, out_dtype=torch.float32, out=H)
            return
        except (RuntimeError, TypeError, NotImplementedError) as e:  # an older torch: no out_dtype
            log.debug("addmm(out_dtype=float32) unavailable (%s); converting activations to float32", e)
            _OUT_DTYPE[0] = False
    half = x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
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


_OUT_DTYPE = [True]


def check_dims(layer: nn.Module, family: Family, bits: int, group_size: int) -> None:
    """Fail early, naming the Linear, if a shape cannot be packed in the GPTQ format."""
    for names in layer_groups(layer, family):
        for n in names:
            m = get_module(layer, n)
            k, o = m.in_features, m.out_features
            unit = 32 if bits == 3 else 32 // bits
            if k % unit or o % unit:
                raise BadInput(
                    f"{n}: in_features={k}, out_features={o} cannot be packed at {bits} bits "
                    f"(both must be multiples of {unit})"
                )
            if group_size > 0 and k % group_size:
                raise BadInput(f"{n}: in_features={k} is not a multiple of --group-size {group_size}")
