"""Where things run and live: devices, transfers, activations, and a layer's forwards.

The pipeline says what to compute; this module says where. It resolves the device,
moves decoder layers to it and back (`Mover`, overlapped with compute on CUDA), keeps
each batch's layer inputs (`LayerInputs`, on the GPU when they fit), and intercepts the
forwards of a layer's modules (`LayerForwards`: measured Linears hand their inputs to
the pipeline, quantized modules' outputs are memoized). Streaming weights from disk and
several GPUs plug in here.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import gc
import gzip
import json
import logging
import os
import resource
import shutil
import time
import typing
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import BadInput

log = logging.getLogger("qwen_gptq")

ACTIVATIONS_GPU_FRACTION = 0.7  # activations stay on the GPU if (with the layer's room) they fit this much of it
LAYER_ROOM = 4  # room kept for the layer, its Hessians and the forward's temporaries, in layer sizes
MEMO_HOST_FRACTION = 4  # on CPU, memoized outputs may use 1/this of the available host memory
MEMO_FALLBACK_BYTES = 1 << 30  # when the available memory cannot be read
MEMO_GPU_FRACTION = 0.9  # on CUDA, memoized outputs may fill the GPU's memory up to this share, beside the run's peak
SPILL_HOST_FRACTION = 0.5  # activations beyond this much of the available host memory go to spill files
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
CACHE_ARGS = ("past_key_value", "past_key_values", "cache", "layer_past")  # KV caches: never kept
PROFILE_ENV = "QWEN_GPTQ_PROFILE"  # developers: FILE, torch.profiler's tables and trace of one layer, FILE.rankN.*
PROFILE_LAYER = 2  # the third layer: the first pays one-time costs, the second may still
TIMELINE_ENV = "QWEN_GPTQ_TIMELINE"  # developers: FILE, every phase's edges, wall clock, FILE.rankN.jsonl
TIMELINE = logging.getLogger("qwen_gptq.timeline")  # (handlers only while timeline() writes one)
TIMELINE_SYNC_ENV = "QWEN_GPTQ_TIMELINE_SYNC"  # developers: 1, each stamp first waits for its CUDA stream's work


def resolve_device(name: str) -> torch.device:
    """`--device` (auto, cpu, cuda, cuda:N) as a torch.device; BadInput for anything else."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise BadInput(f"--device {name}: expected auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise BadInput(f"--device {name}: only cpu and cuda are supported")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BadInput(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return dev


def compute_dtype(model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The layer under work runs in float32 on CPU (bf16/fp16 matmuls are slow and less
    exact on CPUs without bf16 matrix units) and in the model's dtype on CUDA."""
    return torch.float32 if device.type == "cpu" else model_dtype


def sync(device: torch.device) -> None:
    """Wait for the main stream (for honest phase timings), not for the mover's copies."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def host_bytes() -> int:
    """This process's resident host memory now (0 where /proc is not there)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE_BYTES
    except (OSError, ValueError, IndexError):
        return 0


def peak_host_bytes() -> int:
    """This process's peak resident host memory: VmHWM, which starts afresh at exec
    (ru_maxrss carries over the parent's peak, e.g. a benchmark that holds a model and
    starts us as a child)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_gpu_bytes(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


def to_device(obj: typing.Any, device: torch.device, dtype: torch.dtype | None = None,
              moved: dict[int, torch.Tensor] | None = None) -> typing.Any:
    """Move the tensors inside nested tuples/lists/dicts (floats to dtype); drop KV caches.
    A tensor met before (by identity, in `moved`) is moved once and shared."""
    if isinstance(obj, torch.Tensor):
        if moved is not None and id(obj) in moved:
            return moved[id(obj)]
        out = obj.to(device=device, dtype=dtype) if dtype is not None and obj.is_floating_point() else obj.to(device)
        if moved is not None:
            moved[id(obj)] = out
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(o, device, dtype, moved) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device, dtype, moved) for k, v in obj.items()}
    if type(obj).__name__.endswith("Cache"):
        return None
    return obj


# --------------------------------------------------------------------------- layer inputs


def split_call(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict]:
    """A decoder layer's call as (hidden states, the other args, kwargs); caches dropped."""
    kwargs = dict(kwargs)
    if args:
        hidden, args = args[0], tuple(args[1:])
    else:
        hidden, args = kwargs.pop("hidden_states"), ()
    for k in CACHE_ARGS:
        if k in kwargs:
            kwargs[k] = None
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    return hidden, args, kwargs


@dataclass
class LayerInputs:
    """What the decoder layers receive for one calibration batch.

    The hidden states change from layer to layer; the rest (rotary embeddings, masks,
    positions) is what the model passes each layer, captured once per layer: hybrid
    models give full- and linear-attention layers different masks.
    """

    hidden: torch.Tensor  # the current layer's input hidden states [B, T, H]
    calls: list[tuple[tuple, dict]]  # per decoder layer, its other args and kwargs
    valid: torch.Tensor | None  # bool [B*T], the unpadded positions (None: nothing padded)

    def place(self, device: torch.device, store: torch.device, dtype: torch.dtype) -> None:
        """Hidden states to `store`, everything else to the compute device, floats in dtype
        (a tensor shared by several layers' calls stays shared)."""
        self.hidden = self.hidden.to(store, dtype)
        moved: dict[int, torch.Tensor] = {}
        self.calls = [(to_device(a, device, dtype, moved), to_device(k, device, dtype, moved)) for a, k in self.calls]
        if self.valid is not None:
            self.valid = self.valid.to(device)


def run_layer(layer: nn.Module, i: int, x: LayerInputs, device: torch.device) -> torch.Tensor:
    """Decoder layer i's output hidden states for one batch. Modules that route tokens
    (hf.UnfusedExperts: a `padded_rows` attribute) are told the batch's padded rows first."""
    padded = None if x.valid is None else ~x.valid.to(device, non_blocking=True)
    for m in layer.modules():
        if hasattr(m, "padded_rows"):
            m.padded_rows = padded
    args, kwargs = x.calls[i]
    out = layer(x.hidden.to(device), *args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def activation_device(numel: int, device: torch.device, layer: nn.Module, dtype: torch.dtype,
                      streams: int = 1) -> torch.device:
    """Keep the activations (numel elements a stream; activation_bytes) on the GPU when
    they fit beside a layer."""
    if device.type != "cuda":
        return device
    need = activation_bytes(numel, dtype, streams)
    layer_bytes = sum(p.numel() * p.element_size() for p in layer.parameters())
    free, _ = torch.cuda.mem_get_info(device)
    return device if need + LAYER_ROOM * layer_bytes < ACTIVATIONS_GPU_FRACTION * free else torch.device("cpu")


def gpu_memory_figures(device: torch.device) -> str:
    """What an out-of-memory message should say about the device's memory."""
    if device.type != "cuda":
        return f"{device} (no GPU memory figures)"
    total = torch.cuda.get_device_properties(device).total_memory
    return (f"{torch.cuda.memory_allocated(device) / 1e9:.1f} GB allocated, {torch.cuda.memory_reserved(device) / 1e9:.1f} GB "
            f"reserved, peak {torch.cuda.max_memory_allocated(device) / 1e9:.1f} GB of {total / 1e9:.1f} GB")


def release_cached_memory(device: torch.device) -> None:
    """Hand cached blocks back, so that a retry starts from what is really in use."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def available_host_bytes() -> int | None:
    """The kernel's estimate of the memory that can be had without swapping (None: unknown)."""
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def memo_budget(device: torch.device, needed: int | None = None, limit: int | None = None) -> int:
    """Memory for memoized outputs: on CPU, where the forwards dominate, a share of the
    available host memory; on CUDA what the run does not need of the GPU's memory (`limit`,
    --max-gpu-memory, else all of it): `needed` is the run's peak without memoized outputs
    so far, None before a layer has shown it (then none)."""
    if device.type == "cpu":
        available = available_host_bytes()
        return MEMO_FALLBACK_BYTES if available is None else available // MEMO_HOST_FRACTION
    if device.type != "cuda" or needed is None:
        return 0
    if limit is None:
        limit = torch.cuda.get_device_properties(_index(device)).total_memory
    return max(0, int(MEMO_GPU_FRACTION * limit) - needed)


def limit_gpu_memory(device: torch.device, limit: int) -> None:
    """Keep this process under `limit` bytes of the GPU's memory (torch's allocator then
    raises out-of-memory past it, which the pipeline's retries handle)."""
    index = _index(device)
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, limit / total), index)


def _index(device: torch.device) -> int:
    index = torch.device(device).index
    return torch.cuda.current_device() if index is None else index


def activation_bytes(numel: int, dtype: torch.dtype, streams: int = 1) -> int:
    """Bytes of the activations of numel elements a stream: input and output, plus one more
    copy per additional stream (GPTAQ's full-precision one)."""
    return (1 + streams) * numel * (torch.finfo(dtype).bits // 8)


def activations_fit_host(numel: int, dtype: torch.dtype, streams: int = 1) -> tuple[bool, int, int | None]:
    """Whether the activations (activation_bytes) fit in SPILL_HOST_FRACTION of the
    available host memory; with the bytes needed and available."""
    need = activation_bytes(numel, dtype, streams)
    available = available_host_bytes()
    return available is None or need <= SPILL_HOST_FRACTION * available, need, available


class SpillFiles:
    """Activations in files of a directory, memory-mapped: the page cache keeps what fits
    and the kernel writes the rest out, so host memory is not what limits them. A layer's
    outputs overwrite its inputs in place (keep() once per batch and stream)."""

    def __init__(self, directory: Path):
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def keep(self, t: torch.Tensor, name: str) -> torch.Tensor:
        """A file-backed copy of t (CPU)."""
        path = self.directory / f"{name}.bin"
        size = t.numel() * t.element_size()
        with open(path, "wb") as f:
            try:  # reserve the blocks now: a full disk is an error here, not a SIGBUS later
                os.posix_fallocate(f.fileno(), 0, size)
            except OSError as e:
                if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                    f.truncate(size)  # (a filesystem without fallocate)
                else:
                    err = OSError(e.errno, os.strerror(e.errno), str(path))
                    err.needed = size
                    raise err from None
        kept = torch.from_file(str(path), shared=True, size=t.numel(), dtype=t.dtype).view(t.shape)
        kept.copy_(t)
        return kept

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


# --------------------------------------------------------------------------- moving layers


def _nothing(layer: nn.Module) -> None:
    pass


STAGE_BYTES = 64 << 20  # each of the two pinned buffers that copies to and from the GPU pass through


class Staging:
    """Copies between pageable host memory and the GPU through two pinned buffers, a chunk
    at a time, for a thread other than the main one (the mover's).

    Why: a copy to or from pageable memory makes the CUDA driver copy synchronously
    through its own staging, and while it does, every other thread's CUDA calls wait
    (kernel launches included). Profiled on a 72B-shaped layer, the main thread's launches
    waited 0.45 s of the layer's 2.5 s for the mover's copies, and on two GPUs the other
    rank waited as long in the next collective. From pinned memory the copy is
    asynchronous; this thread copies between the pageable tensor and one buffer while the
    DMA engine serves the other, and waits on events, which holds nothing.

    `event` makes the events (torch.cuda.Event on the GPU; tests pass stand-ins to run
    the chunking on CPU tensors).
    """

    def __init__(self, event: Callable[[], typing.Any], stage_bytes: int = STAGE_BYTES, pinned: bool = True):
        self.event = event
        self.buffers = [torch.empty(stage_bytes, dtype=torch.uint8, pin_memory=pinned) for _ in range(2)]
        self.done: list = [None, None]  # per buffer, the event after its last DMA
        self.next = 0

    def _buffer(self) -> int:
        k, self.next = self.next, 1 - self.next
        if self.done[k] is not None:
            self.done[k].synchronize()
        return k

    def _chunks(self, n: int) -> Iterator[tuple[int, int]]:
        size = self.buffers[0].numel()
        return ((start, min(n, start + size)) for start in range(0, n, size))

    def to_device(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """dst (on the GPU, src's dtype and shape) = src (host), on the current stream."""
        s, d = _raw(src), _raw(dst)
        for a, b in self._chunks(s.numel()):
            k = self._buffer()
            buf = self.buffers[k][:b - a]
            buf.copy_(s[a:b])
            d[a:b].copy_(buf, non_blocking=True)
            self.done[k] = self.event()
            self.done[k].record()

    def to_host(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """dst (host, src's dtype and shape) = src (GPU), once src's stream reaches the copy;
        returns when dst is written."""
        s, d = _raw(src), _raw(dst)
        previous = None  # (buffer, start, end): the chunk whose DMA runs while the next is queued
        for a, b in self._chunks(s.numel()):
            k = self._buffer()
            self.buffers[k][:b - a].copy_(s[a:b], non_blocking=True)
            self.done[k] = self.event()
            self.done[k].record()
            if previous is not None:
                self._out(*previous, d)
            previous = (k, a, b)
        if previous is not None:
            self._out(*previous, d)

    def _out(self, k: int, a: int, b: int, d: torch.Tensor) -> None:
        self.done[k].synchronize()
        d[a:b].copy_(self.buffers[k][:b - a])


def _raw(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's bytes, as a flat uint8 view."""
    return t.reshape(-1).view(torch.uint8)


@dataclass(frozen=True)
class Weights:
    """Where a decoder layer's weights come from before it runs and go after.

    fill(layer) makes them whole (reads them from disk when streaming; pads them). Once
    the layer's results are written, release(layer) gives a streamed layer's memory back;
    without it (release None, the model loaded whole) its quantized weights go back into
    host memory.
    """

    fill: Callable[[nn.Module], None] = _nothing
    release: Callable[[nn.Module], None] | None = None


class Mover:
    """Moves decoder layers to the compute device and back, and results to the host.

    On CUDA a worker thread does it on a stream of its own, through pinned buffers
    (Staging), so that layer i+1's weights travel while layer i is quantized, and layer
    i's weights and packed tensors travel back while i+1 is: the main thread waits only
    for what is not done yet. Weights go
    back into the very host memory they came from (no fresh pageable allocation to
    fault in), or, streamed, are released. Reading a streamed layer from disk is part
    of its trip to the device, so it too overlaps the previous layer's work. Elsewhere
    the moves are plain and immediate.
    """

    def __init__(self, device: torch.device, cdtype: torch.dtype, model_dtype: torch.dtype,
                 weights: Weights = Weights()):
        self.device, self.cdtype, self.model_dtype, self.weights = device, cdtype, model_dtype, weights
        self.pending: dict[int, Future] = {}  # layers on their way to the device
        self.back: list[Future] = []  # copies to the host
        self.homes: dict[int, list] = {}
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.pool = ThreadPoolExecutor(1, thread_name_prefix="qwen-gptq-move")
            self.stream = torch.cuda.Stream(device)
            self.staging = Staging(torch.cuda.Event)  # (the worker's alone)

    def to_device(self, layer: nn.Module) -> None:
        """Start moving a layer's weights to the device (wait() before using it)."""
        if not self.cuda:
            self.weights.fill(layer)
            layer.to(device=self.device, dtype=self.cdtype)
            return

        def job():
            self.weights.fill(layer)
            homes = []
            with torch.cuda.stream(self.stream):
                for m in layer.modules():
                    for coll in (m._parameters, m._buffers):
                        for k, v in coll.items():
                            if v is None or v.is_cuda:  # (a tensor shared by two modules moves once)
                                continue
                            moved = self._to_device(v.data)
                            homes.append((coll, k, v.data))
                            _set(coll, k, moved)
            self.stream.synchronize()
            self.homes[id(layer)] = homes

        self.pending[id(layer)] = self.pool.submit(job)

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        moved = torch.empty(t.shape, dtype=t.dtype, device=self.device)
        self.staging.to_device(t.contiguous(), moved)
        return moved.to(self.cdtype) if t.is_floating_point() else moved

    def _to_host(self, t: torch.Tensor, into: torch.Tensor | None = None) -> torch.Tensor:
        """t (on the GPU) in host memory: into `into` (its dtype), else a new tensor."""
        if into is None:
            into = torch.empty(t.shape, dtype=t.dtype)
        if not into.is_contiguous():
            into.copy_(self._to_host(t))
            return into
        self.staging.to_host(t.to(into.dtype).contiguous(), into)
        return into

    def wait(self, layer: nn.Module) -> None:
        f = self.pending.pop(id(layer), None)
        if f is not None:
            f.result()

    def _after_main(self, copy: Callable[[], None]) -> None:
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
        """Start moving a layer's (quantized) weights back into host memory, or releasing them."""
        release = self.weights.release
        if not self.cuda:
            if release:
                release(layer)
            else:
                layer.to(device="cpu", dtype=self.model_dtype)
            return

        def copy():
            homes = self.homes.pop(id(layer))
            if release:
                del homes
                release(layer)
                return
            for coll, k, home in homes:
                _set(coll, k, self._to_host(coll[k].data, home))

        self._after_main(copy)

    def fetch_stacked(self, tensors: dict[str, torch.Tensor], into: dict, keys: list[str]) -> None:
        """into[keys[b]] = {name: tensors[name][b]}: a batch's stacked tensors copied to the
        host in one go each, then handed out as views (once the work producing them is done)."""
        def copy(host: Callable[[torch.Tensor], torch.Tensor]):
            on_host = {k: host(v) for k, v in tensors.items()}
            for b, key in enumerate(keys):
                into[key] = {k: v[b] for k, v in on_host.items()}

        if not self.cuda:
            copy(lambda t: t.to("cpu"))
            return
        self._after_main(lambda: copy(self._to_host))

    def then(self, job: Callable[[], None]) -> None:
        """Run job() once every copy started so far is done (on the worker, in order)."""
        if not self.cuda:
            job()
            return
        self.back.append(self.pool.submit(job))

    def wait_all(self) -> None:
        for f in [*self.pending.values(), *self.back]:
            f.result()
        self.pending.clear()
        self.back.clear()

    def close(self) -> None:
        if self.cuda:
            self.pool.shutdown(wait=True)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
MMAP_FROM_BYTES = 16 << 20


def host_memory_returned_on_free() -> None:
    """Have glibc serve every allocation from 16 MiB on with its own mapping, returned to the
    system when freed, and trim the heap's top from 16 MiB free. By default both thresholds
    rise with the sizes freed, and a streamed run's per-layer tensors then come from the
    heap, which keeps what they leave behind, fragmented: host memory crept up by 50 MB per
    Qwen2.5-1.5B-shaped layer instead of staying flat. (From 1 MiB on, the mappings' page
    faults made a CPU run 15-25 % slower; from 16 MiB on, no slower.) Set once when the
    command line starts (set later, the heap already holds free space that keeps being reused and
    fragmented). Elsewhere (not glibc) a no-op."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_FROM_BYTES)
        libc.mallopt(M_TRIM_THRESHOLD, MMAP_FROM_BYTES)  # (raised along with the first, by default)
    except (OSError, AttributeError):
        pass


def freeze_heap() -> None:
    """Exempt every object alive now from Python's cyclic garbage collector's full passes
    (gc.freeze), after one last collection. A full pass walks every tracked object: with a
    model's modules and the calibration data alive, that stalled a Qwen3-30B-A3B-shaped
    layer for 0.2 s once per process, and on two GPUs the other process waited as long
    (each pass at another layer: both layers lost it). What is frozen is still freed by
    reference counting, as nearly everything is; only cycles among it wait for thaw_heap."""
    gc.collect()
    gc.freeze()


def thaw_heap() -> None:
    """Undo freeze_heap (the frozen objects are collected as usual again)."""
    gc.unfreeze()


def phase(name: str) -> contextlib.AbstractContextManager:
    """A named span in the profile's trace (QWEN_GPTQ_PROFILE; scripts/trace_summary.py
    times each) and, with QWEN_GPTQ_TIMELINE, the wall-clock times of its edges (see
    timeline); a few microseconds otherwise, a handful of times per group."""
    if not TIMELINE.handlers:
        return torch.profiler.record_function(name)
    return _stamped(name)


@contextlib.contextmanager
def _stamped(name: str) -> Iterator[None]:
    _stamp(name, "in")
    try:
        with torch.profiler.record_function(name):
            yield
    finally:
        _stamp(name, "out")


def _stamp(name: str, edge: str) -> None:
    if os.environ.get(TIMELINE_SYNC_ENV) == "1" and torch.cuda.is_initialized():
        torch.cuda.current_stream().synchronize()  # (this thread's GPU work counts in its phase; the mover's not)
    TIMELINE.info('{"phase": %s, "edge": "%s", "t": %.6f}', json.dumps(name), edge, time.time())


@contextlib.contextmanager
def timeline(rank: int) -> Iterator[None]:
    """With $QWEN_GPTQ_TIMELINE=FILE, for those who make several GPUs faster: every phase's
    entry and exit (each layer, each group's measuring and solving, the write-back, the
    forward, each collective, the garbage collector's full passes as "gc"), stamped with
    the wall clock, one JSON line each into FILE.rankN.jsonl (scripts/timeline_summary.py
    sets the processes side by side). One
    host's processes share that clock, so where one waits for another shows, to the
    millisecond, and nothing else runs: torch.profiler's own cost fell on process 0's extra
    threads and showed it lagging 0.1 s a 72B layer, where the stamps show 18 ms. A line is
    written as it happens (a process that fails keeps what it wrote). Nothing otherwise.

    The stamps are the host's: a phase that only queues GPU work looks short, and the next
    one that waits for it looks long. With $QWEN_GPTQ_TIMELINE_SYNC=1 each stamp first waits
    for the current stream's queued work, so that every phase holds its own GPU time (and the
    overlaps are gone: for attributing, not for timing the whole)."""
    path = os.environ.get(TIMELINE_ENV)
    if not path:
        yield
        return
    try:
        handler = logging.FileHandler(f"{path}.rank{rank}.jsonl", mode="w", encoding="utf-8")
    except OSError as e:
        raise BadInput(f"{TIMELINE_ENV}={path}: cannot write {path}.rank{rank}.jsonl ({e.strerror})") from None
    handler.setFormatter(logging.Formatter("%(message)s"))
    TIMELINE.setLevel(logging.INFO)
    TIMELINE.propagate = False
    TIMELINE.addHandler(handler)
    gc.callbacks.append(_stamp_full_collection)
    try:
        yield
    finally:
        gc.callbacks.remove(_stamp_full_collection)
        TIMELINE.removeHandler(handler)
        handler.close()


def _stamp_full_collection(edge: str, info: dict) -> None:
    """The garbage collector's full passes, as a phase "gc" (they stall every thread)."""
    if info.get("generation") == 2:
        _stamp("gc", "in" if edge == "start" else "out")


def profiled(i: int, rank: int) -> contextlib.AbstractContextManager:
    """Around layer i's work: torch.profiler's tables (device time and host time per op,
    threads included) into $QWEN_GPTQ_PROFILE.rankN.txt and its timeline (Chrome's trace
    format, gzipped: chrome://tracing or ui.perfetto.dev) into .rankN.json.gz, for layer
    PROFILE_LAYER, for those who make the pipeline faster; nothing otherwise."""
    path = os.environ.get(PROFILE_ENV)
    if not path or i != PROFILE_LAYER:
        return contextlib.nullcontext()
    return _profile(Path(f"{path}.rank{rank}.txt"))


def _all_threads() -> typing.Any:
    """The profiler's setting that records every thread's ops (the mover's too, not only
    the one that started it) and Python's garbage collections, where this torch has it."""
    from torch._C._profiler import _ExperimentalConfig

    for flags in ({"profile_all_threads": True, "record_python_gc_info": True}, {"profile_all_threads": True}):
        try:
            return _ExperimentalConfig(**flags)
        except TypeError:
            continue
    return None  # (the profiler's default)


@contextlib.contextmanager
def _profile(path: Path) -> Iterator[None]:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    t0 = time.perf_counter()
    with profile(activities=activities, experimental_config=_all_threads()) as prof:
        yield
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    table = prof.key_averages()
    sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    path.write_text(f"layer {PROFILE_LAYER}: {wall:.3f} s wall\n\n"
                    + table.table(sort_by=sort, row_limit=45, max_name_column_width=70) + "\n\n"
                    + table.table(sort_by="self_cpu_time_total", row_limit=45, max_name_column_width=70))
    trace = path.with_suffix(".json")
    prof.export_chrome_trace(str(trace))
    with open(trace, "rb") as src, gzip.open(f"{trace}.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    trace.unlink()


def return_free_host_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's malloc_trim), between layers.
    The thresholds above keep large blocks out of the heap, but a layer's many smaller
    allocations still leave free holes inside it, and a streamed 16-layer run of Qwen2.5-1.5B's
    layer shape crept from 0.78 to 1.00 GB (heap in use flat at 174 MB, its free space
    growing); trimmed after each layer it stayed at 0.70 GB. A few milliseconds a layer.
    Elsewhere (not glibc) a no-op."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _set(coll: dict, k: str, value: torch.Tensor) -> None:
    if isinstance(coll[k], nn.Parameter):
        coll[k].data = value
    else:
        coll[k] = value


# --------------------------------------------------------------------------- a layer's forwards


class StopForward(Exception):
    """Raised inside a forward to end it early (the inputs wanted have been seen)."""


InputHook = Callable[[str, torch.Tensor], None]


class LayerForwards:
    """The forwards of one decoder layer while its groups are quantized.

    It wraps the forward of every quantized Linear and of every module containing one:
    - A Linear being measured (see measuring()) hands its input to the pipeline and
      skips its own product (the pass stops once the whole group has been seen, so
      nothing downstream uses it; zeros stand in for it meanwhile).
    - Once a module's Linears are all quantized, its weights and its input (everything
      upstream is quantized too: groups come in dataflow order) no longer change, so
      its output is memoized per batch within a memory budget, and a later pass reuses
      it instead of recomputing it. An output the model modified in place (its version
      counter moved) is recomputed, never reused.
    Each Linear's product then runs once per layer instead of once per pass.

    A module's outputs are kept for every batch or for none: at its first output the
    whole (that output's size times the batches) must fit in the budget, counting what its
    parts' outputs free. Under a tight budget (--max-gpu-memory) a few batches of a large
    output save little and hold memory through the solves that follow, while the outputs
    that replace their parts (self_attn's) fit and save a whole pass of recomputation.
    """

    def __init__(self, layer: nn.Module, groups: list[list[str]], budget: int, batches: int = 1):
        quantized = [n for g in groups for n in g]
        # Each unit (a quantized Linear, or a module containing one, within the layer) and
        # the quantized Linears inside it, found from each Linear's own prefixes: matching
        # every unit against every Linear took 20-30 ms a layer of 128 experts (CPU).
        self._inside: dict[str, list[str]] = {}
        for n in quantized:
            parts = n.split(".")
            for k in range(1, len(parts) + 1):  # (its own name last)
                self._inside.setdefault(".".join(parts[:k]), []).append(n)
        self._final: set[str] = set()  # units whose Linears are all quantized
        self._measured: dict[str, nn.Module] = {}
        self._on_input: InputHook | None = None
        self._batch = 0
        self._storing = budget > 0
        self._budget, self._used = budget, 0
        self._batches = batches
        self._admitted: dict[str, bool] = {}  # unit -> whether its outputs are kept (decided at its first)
        self.most = 0  # the most memory memoized outputs held at once
        self._store: dict = {}
        self._modules = {u: layer.get_submodule(u) for u in self._inside}
        for u, m in self._modules.items():
            m.forward = self._wrap(u, m, m.forward)

    @property
    def held(self) -> int:
        """The memory memoized outputs hold now."""
        return self._used

    @property
    def budget(self) -> int:
        return self._budget

    def batch(self, j: int) -> None:
        """The forwards that follow are for calibration batch j."""
        self._batch = j

    @contextlib.contextmanager
    def measuring(self, modules: dict[str, nn.Module], on_input: InputHook) -> Iterator[None]:
        """While inside, the given Linears call on_input(name, input) instead of computing."""
        self._measured, self._on_input = modules, on_input
        try:
            yield
        finally:
            self._measured, self._on_input = {}, None

    def quantized(self, names: list[str]) -> None:
        """These Linears now hold their final (quantized) weights."""
        done = set(names) | {n for u in self._final for n in self._inside[u]}
        self._final = {u for u, ns in self._inside.items() if all(n in done for n in ns)}

    def last_pass(self) -> None:
        """What follows is the layer's last pass: nothing more needs keeping."""
        self._storing = False

    def forget(self) -> None:
        """Drop the memoized outputs and keep no more (memory is short)."""
        self._store.clear()
        self._used, self._storing = 0, False

    def remove(self) -> None:
        for m in self._modules.values():
            del m.forward
        self._store.clear()

    def _wrap(self, name: str, module: nn.Module, forward: Callable) -> Callable:
        def run(*args, **kwargs):
            if name in self._measured:  # a Linear: forward(input)
                x = args[0] if args else kwargs["input"]
                self._on_input(name, x)
                return x.new_zeros(*x.shape[:-1], module.out_features)
            if name not in self._final:
                return forward(*args, **kwargs)
            key = (name, self._batch)
            hit = self._store.get(key)
            if hit is not None and all(t._version == v for t, v in zip(_tensors(hit[0]), hit[1])):
                return hit[0]
            y = forward(*args, **kwargs)
            if self._storing and hit is None:
                self._keep(name, key, y)
            return y

        return run

    def _keep(self, name: str, key: tuple, y) -> None:
        # The parts' outputs are not needed once the whole's is kept (and are often the
        # very tensor it returns): they make room for it.
        parts = [(n, self._batch) for n in self._inside[name] if n != name and (n, self._batch) in self._store]
        size = _nbytes(y)
        if name not in self._admitted:
            freed = sum(_nbytes(v[0]) for (n, _), v in self._store.items() if n != name and n in self._inside[name])
            self._admitted[name] = self._used - freed + size * self._batches <= self._budget
        if not self._admitted[name]:
            return
        if self._used - sum(_nbytes(self._store[k][0]) for k in parts) + size > self._budget:
            return
        for k in parts:
            self._used -= _nbytes(self._store.pop(k)[0])
        self._store[key] = (y, [t._version for t in _tensors(y)])
        self._used += size
        self.most = max(self.most, self._used)


def _tensors(y) -> list[torch.Tensor]:
    if isinstance(y, torch.Tensor):
        return [y]
    if isinstance(y, (tuple, list)):
        return [t for t in y if isinstance(t, torch.Tensor)]
    return []


def _nbytes(y) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(y))
