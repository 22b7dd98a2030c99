"""The checkpoint directory on disk: reading its config and shard index, and writing
the quantized output (the tensors' format is gptq_v1's business).

Output layout:

    config.json                     the model's config plus `quantization_config`
    quantize_config.json            the same block, as AutoGPTQ writes it
    model.safetensors               or model-0000i-of-0000n.safetensors + model.safetensors.index.json
    generation_config.json, tokenizer files, *.py / *.cu / *.cpp (remote code), LICENSE
    quant_log.csv                   layer, module, loss, damp, seconds, tokens, method

Everything is written into a hidden sibling directory which is renamed into place
at the very end, so an interrupted run never leaves a directory that looks complete.
"""

from __future__ import annotations

import csv
import errno
import fnmatch
import functools
import json
import logging
import math
import os
import re
import shutil
import struct
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import torch
from safetensors import safe_open

from .errors import BadInput

log = logging.getLogger("qwen_gptq")

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

# Files copied verbatim from the source model directory.
COPY_PATTERNS = (
    "*.py", "*.cu", "*.cpp", "*.cuh", "*.h",
    "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "*.tiktoken", "tokenizer.model",
    "chat_template.jinja", "chat_template.json", "preprocessor_config.json", "video_preprocessor_config.json",
    "processor_config.json",
    "LICENSE", "LICENSE.*", "NOTICE",
)


def read_json(path: Path) -> dict:
    """A JSON object from a file; BadInput naming the file otherwise."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"{path}: cannot read ({e})") from None
    except json.JSONDecodeError as e:
        raise BadInput(f"{path}: not valid JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise BadInput(f"{path}: not a JSON object")
    return data


def weight_index(model_dir: Path) -> tuple[list[str], dict[str, str] | None]:
    """The weight files of a checkpoint directory and, when sharded, its index's weight map."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_NAME
    if index.is_file():
        try:
            weight_map = read_json(index)["weight_map"]
        except KeyError:
            raise BadInput(f"{index}: malformed (no weight_map)") from None
        return sorted(set(weight_map.values())), weight_map
    if (model_dir / WEIGHTS_NAME).is_file():
        return [WEIGHTS_NAME], None
    raise BadInput(f"{model_dir}: no {WEIGHTS_NAME} or {INDEX_NAME}")


# Tensors each model has once, whose names show under which prefix a checkpoint keeps a
# part of the model (the language model, the vision tower).
RENAME_ANCHORS = ("embed_tokens.weight", "patch_embed.proj.weight")


def prefix_renames(have: Iterable[str], want: Iterable[str]) -> list[tuple[str, str]]:
    """(old prefix, new prefix) rules taking the names in `have` to those in `want`.

    transformers 5 names a vision-language model's parts model.language_model.* and
    model.visual.*, while older checkpoints (Qwen2.5-VL on the hub) say model.* and
    visual.*; transformers renames on load. We write transformers 5's names (GPTQModel
    reads quantized weights only under those) and read back either.
    """
    rules = []
    for anchor in RENAME_ANCHORS:
        a = [k[: -len(anchor)] for k in have if k.endswith(anchor)]
        b = [k[: -len(anchor)] for k in want if k.endswith(anchor)]
        if len(a) == 1 and len(b) == 1 and a[0] != b[0]:
            rules.append((a[0], b[0]))
    return rules


def renamed(name: str, rules: list[tuple[str, str]]) -> str:
    for old, new in rules:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def read_tensors(model_dir: Path, prefixes: tuple[str, ...] = ("",)) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors (those whose names start with one of `prefixes`), as stored."""
    out: dict[str, torch.Tensor] = {}
    if not prefixes:
        return out
    model_dir = Path(model_dir)
    for f in weight_index(model_dir)[0]:
        with safe_open(str(model_dir / f), framework="pt") as sf:
            for k in sf.keys():
                if k.startswith(prefixes):
                    out[k] = sf.get_tensor(k)
    return out


# --------------------------------------------------------------------------- safetensors, one tensor at a time

# safetensors' dtype names; the format is an 8-byte little-endian header length, a JSON
# header (name -> dtype, shape, data_offsets; "__metadata__"), then the raw bytes.
DTYPE_NAMES = MappingProxyType({
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
})
DTYPES_BY_NAME = MappingProxyType({v: k for k, v in DTYPE_NAMES.items()})
HEADER_ALIGN = 8


class TensorFile:
    """A safetensors file read one tensor (or one slice along the first dimension) at a
    time with plain reads: nothing is mapped, so what was read is freed with the tensor."""

    def __init__(self, path: Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            try:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            except (struct.error, ValueError, UnicodeDecodeError):
                raise BadInput(f"{self.path}: not a safetensors file") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self.base = 8 + n
        self.header = header

    def names(self) -> list[str]:
        return list(self.header)

    def dtype(self, name: str) -> torch.dtype:
        return DTYPES_BY_NAME[self.header[name]["dtype"]]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def read(self, name: str, index: int | None = None) -> torch.Tensor:
        """The tensor `name`, or with `index` its slice [index] along the first dimension."""
        return read_many([(self, name, index)])[0]

    def span(self, name: str, index: int | None = None) -> tuple[int, int, torch.dtype, tuple[int, ...]]:
        """(offset in the file, bytes, dtype, shape) of the tensor or of its slice [index]."""
        dtype, shape = self.dtype(name), self.shape(name)
        start, end = self.header[name]["data_offsets"]
        if index is not None:
            step = (end - start) // shape[0]
            start, end, shape = start + index * step, start + (index + 1) * step, shape[1:]
        return self.base + start, end - start, dtype, shape


READ_CHUNK = 16 << 20  # bytes per read call
READ_THREADS = max(1, min(8, os.cpu_count() or 1))


def read_many(wanted: list[tuple[TensorFile, str, int | None]]) -> list[torch.Tensor]:
    """The tensors (file, name, [index] or None), read with plain reads in chunks of
    READ_CHUNK by READ_THREADS threads (pread releases the GIL).

    Plain reads, not a memory map: what was read is freed with the tensor. Several at
    once: one thread reading a 72B-shaped layer (1.76 GB) from the page cache managed
    1.4 GB/s on the GPU machine (a copy, and faulting in the fresh buffer's pages, one
    page at a time), and 0.7-0.8 GB/s from its disk, which serves a deeper queue faster.
    """
    out, jobs = [], []
    for f, name, index in wanted:
        offset, size, dtype, shape = f.span(name, index)
        buf = torch.empty(size, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        jobs += [(f.path, name, offset + a, view[a:a + READ_CHUNK]) for a in range(0, size, READ_CHUNK)]
        out.append(buf.view(dtype).reshape(shape))
    if len(jobs) <= 1 or READ_THREADS == 1:
        for job in jobs:
            _read_chunk(*job)
        return out
    for _ in _readers().map(lambda job: _read_chunk(*job), jobs):
        pass
    return out


@functools.cache
def _readers() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(READ_THREADS, thread_name_prefix="qwen-gptq-read")


def _read_chunk(path: Path, name: str, offset: int, into: memoryview) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        done = 0
        while done < len(into):
            n = os.preadv(fd, [into[done:]], offset + done)
            if n == 0:
                raise BadInput(f"{path}: truncated (tensor {name})")
            done += n
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Stored:
    """A tensor to write: its dtype and shape now, its values when the writer reaches it
    (`held`: already in host memory)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    read: Callable[[], torch.Tensor]
    held: torch.Tensor | None = None

    @classmethod
    def of(cls, t: torch.Tensor) -> Stored:
        return cls(t.dtype, tuple(t.shape), lambda: t, t if t.device.type == "cpu" and t.is_contiguous() else None)

    @classmethod
    def from_file(cls, f: TensorFile, name: str) -> Stored:
        return cls(f.dtype(name), f.shape(name), lambda: f.read(name))

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def write_safetensors(path: Path, tensors: dict[str, Stored], metadata: dict[str, str]) -> None:
    """A safetensors file written one tensor at a time (widest dtypes first, so every
    tensor is aligned), holding at most one tensor in memory.

    Tensors held in memory that are slices of one block (a stack of MoE experts' packed
    tensors, fetched from the GPU in one copy) go in the block's order, and each run of
    them in one write: a layer's 1,536 packed expert tensors were 1,536 writes and a
    dozen tensor calls each, every one a hand-over of the GIL that the main thread,
    launching kernels, waited for (rank 0, which writes, fell 0.28 s a layer behind the
    other rank). Otherwise by name; the order is the same run to run."""
    group: dict[int, str] = {}  # a block's (storage's) first tensor by name
    for k in sorted(tensors):
        held = tensors[k].held
        if held is not None:
            group.setdefault(held.untyped_storage().data_ptr(), k)

    def place(k: str) -> tuple:
        held = tensors[k].held
        if held is None:
            return -tensors[k].dtype.itemsize, k, 0
        return -tensors[k].dtype.itemsize, group[held.untyped_storage().data_ptr()], held.storage_offset()

    order = sorted(tensors, key=place)
    header: dict = {"__metadata__": metadata}
    offset = 0
    for k in order:
        t = tensors[k]
        header[k] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % HEADER_ALIGN)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        run = None  # (storage, first byte, end byte) of held tensors adjacent in memory, not written yet
        for k in order:
            held = tensors[k].held
            if held is not None:
                storage, start = held.untyped_storage(), held.storage_offset() * held.element_size()
                if run is not None and run[0].data_ptr() == storage.data_ptr() and run[2] == start:
                    run = (run[0], run[1], start + tensors[k].nbytes)
                    continue
                _write_run(f, run)
                run = (storage, start, start + tensors[k].nbytes)
                continue
            _write_run(f, run)
            run = None
            t = tensors[k].read()
            if t.dtype != tensors[k].dtype or tuple(t.shape) != tensors[k].shape:
                raise RuntimeError(f"{k}: expected {tensors[k].dtype} {tensors[k].shape}, got {t.dtype} {tuple(t.shape)}")
            f.write(memoryview(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()))
        _write_run(f, run)


def _write_run(f, run: tuple | None) -> None:
    if run is not None:
        storage, start, end = run
        f.write(memoryview(torch.empty(0, dtype=torch.uint8).set_(storage, start, (end - start,)).numpy()))


def saved(name: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An unquantized tensor as the output stores it: floats in `dtype`, on the host."""
    if tensor.is_floating_point():
        if dtype == torch.float16 and tensor.abs().max() > torch.finfo(torch.float16).max:
            raise BadInput(f"{name} has values beyond float16's range; save with --dtype bfloat16")
        tensor = tensor.to(dtype)
    return tensor.to("cpu").contiguous()


def stored_tensors(model_dir: Path, prefixes: tuple[str, ...]) -> dict[str, Stored]:
    """The checkpoint's tensors whose names start with one of `prefixes`, as stored."""
    out: dict[str, Stored] = {}
    if not prefixes:
        return out
    for f in weight_index(model_dir)[0]:
        tf = TensorFile(Path(model_dir) / f)
        out.update({k: Stored.from_file(tf, k) for k in tf.names() if k.startswith(prefixes)})
    return out


def outside_layers(model: torch.nn.Module, layers: str, dtype: torch.dtype, outside: tuple[str, ...],
                   tied: bool) -> dict[str, Stored]:
    """The model's tensors outside its decoder layers (embeddings, final norm, lm_head) and
    outside the `outside` prefixes (vision tower, ...: those come verbatim), in `dtype`.
    Tied weights (lm_head tied to the embeddings) are saved once, under the name the
    model's config expects to find."""
    out: dict[str, Stored] = {}
    seen: dict[int, str] = {}
    for name, tensor in model.state_dict(keep_vars=False).items():
        if name.startswith((f"{layers}.", *outside)):
            continue
        ptr = tensor.data_ptr()
        if tied and ptr in seen:
            log.debug("%s is tied to %s; saved once", name, seen[ptr])
            continue
        seen[ptr] = name
        out[name] = Stored.of(saved(name, tensor, dtype))
    return out


def natural_order(tensors: dict[str, Stored]) -> dict[str, Stored]:
    return dict(sorted(tensors.items(), key=lambda kv: _natural_key(kv[0])))


def _natural_key(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def shard(state: dict[str, Stored], max_bytes: int) -> list[dict[str, Stored]]:
    shards, current, size = [], {}, 0
    for k, v in state.items():
        if current and size + v.nbytes > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[k] = v
        size += v.nbytes
    if current:
        shards.append(current)
    return shards


def save_weights(state: dict[str, Stored], out_dir: Path, max_bytes: int) -> list[str]:
    """Write model.safetensors, or shards plus an index, one tensor at a time, in the
    order of `state`. Returns the file names."""
    shards = shard(state, max_bytes)
    meta = {"format": "pt"}
    if len(shards) == 1:
        write_safetensors(out_dir / WEIGHTS_NAME, shards[0], meta)
        return [WEIGHTS_NAME]
    names, weight_map = [], {}
    for i, s in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(out_dir / fname, s, meta)
        names.append(fname)
        weight_map.update({k: fname for k in s})
    total = sum(v.nbytes for v in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return names + [INDEX_NAME]


def linkable(files: list[TensorFile], max_bytes: int) -> bool:
    """Whether these safetensors files can be the output's shards as they are: more than
    one shard's worth in all (a smaller output is one model.safetensors), none over."""
    sizes = [_tensor_bytes(f) for f in files]
    return sum(sizes) > max_bytes and max(sizes) <= max_bytes


def _tensor_bytes(f: TensorFile) -> int:
    return sum(math.prod(f.shape(k)) * f.dtype(k).itemsize for k in f.names())


def link_shards(files: list[TensorFile], out_dir: Path) -> list[str]:
    """The output's shards and index made of finished safetensors files, hard-linked
    (copied where the filesystem has no hard links), none read or rewritten. Returns
    the file names."""
    names, weight_map, total = [], {}, 0
    for i, f in enumerate(files, start=1):
        name = f"model-{i:05d}-of-{len(files):05d}.safetensors"
        try:
            os.link(f.path, out_dir / name)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            shutil.copyfile(f.path, out_dir / name)
        weight_map.update(dict.fromkeys(f.names(), name))
        total += _tensor_bytes(f)
        names.append(name)
    weight_map = dict(sorted(weight_map.items(), key=lambda kv: _natural_key(kv[0])))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return names + [INDEX_NAME]


def copy_model_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for f in sorted(src.iterdir()):
        if f.is_file() and any(fnmatch.fnmatch(f.name, p) for p in COPY_PATTERNS):
            shutil.copyfile(f, dst / f.name)
            copied.append(f.name)
    return copied


def write_config(src_config: dict, qconfig: dict, dtype: torch.dtype, out_dir: Path) -> None:
    config = dict(src_config)
    config.pop("quantization_config", None)
    config["quantization_config"] = qconfig
    dtype_name = str(dtype).removeprefix("torch.")
    for key in ("torch_dtype", "dtype"):
        if key in config or key == "torch_dtype":
            config[key] = dtype_name
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (out_dir / "quantize_config.json").write_text(json.dumps(qconfig, indent=2) + "\n")


def write_quant_log(stats: list, out_dir: Path) -> None:
    with open(out_dir / "quant_log.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["layer", "module", "loss", "damp", "seconds", "tokens", "method"])
        for s in stats:
            w.writerow([s.layer, s.module, f"{s.loss:.6g}", f"{s.damp:g}", f"{s.seconds:.4f}", s.tokens, s.method])


def prepare_out_path(out: Path, overwrite: bool) -> None:
    """Refuse an existing non-empty output directory unless --overwrite (checked before any work)."""
    if out.exists() and not out.is_dir():
        raise BadInput(f"--out_path {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise BadInput(f"--out_path {out} exists and is not empty; pass --overwrite to replace it")
    if not out.parent.exists():
        raise BadInput(f"--out_path {out}: parent directory {out.parent} does not exist")


@contextmanager
def staging_dir(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success, swap it into place at `out`.

    On an exception the staging directory is removed and `out` is untouched.
    """
    out = out.resolve()
    for stale in out.parent.glob(f".{out.name}.partial-*"):  # left by a run that was killed
        if not _alive(stale.name.rsplit("-", 1)[-1]):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        if not overwrite and out.is_dir() and any(out.iterdir()):
            shutil.rmtree(tmp, ignore_errors=True)
            raise BadInput(f"--out_path {out} appeared while quantizing and is not empty; nothing was written")
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:  # another user's process
        return True
    return True


def finalize_permissions(directory: Path) -> None:
    """Plain 0644 files (safetensors writes 0600; copies of read-only sources stay read-only)."""
    for f in directory.iterdir():
        if f.is_file():
            f.chmod(0o644)
