"""Reading a checkpoint into its model one decoder layer at a time (streaming).

open_streamed() builds the model as transformers would, with every parameter on the meta
device (hf.skeleton: no memory), reads the tensors outside the decoder layers (embeddings,
final norm, lm_head) and returns a Streamed, which fills a decoder layer with its tensors
when the layer's turn comes and empties it once the layer is written. Tensors are read
from the safetensors files with plain reads, a layer's at once (checkpoint.read_many), so
the host holds a layer or two whatever the model's depth.

The checkpoint's names map to the model's as transformers maps them for the Qwen
families: a prefix rename (older vision-language checkpoints say model.* for
model.language_model.*), and MoE experts, which the model holds as one Linear per expert
(hf.UnfusedExperts) while a checkpoint stores them so (mlp.experts.{e}.gate_proj.weight)
or fused into 3-D tensors: mlp.experts.gate_up_proj [E, 2I, H] and down_proj [E, H, I], or
transposed ([E, H, 2I], [E, I, H]) as Qwen3-VL-MoE checkpoints are. A tensor the model
has and the checkpoint does not (or the reverse) raises NotStreamable, and the caller
loads the model whole instead. That the streamed tensors equal transformers' own loading
is tested for every family (tests/test_stream.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import checkpoint, hf
from .families import Family, decoder_layers

# A per-expert Linear of the model: (experts module).(expert).(projection)_proj.weight
EXPERT = re.compile(r"(?P<experts>.+\.experts)\.(?P<e>\d+)\.(?P<proj>gate|up|down)_proj\.weight")


class NotStreamable(Exception):
    """The checkpoint's tensors do not map onto the model by the rules above."""


class Source:
    """The tensors of a checkpoint directory, by name, each read when asked for."""

    def __init__(self, model_dir: Path):
        files, _ = checkpoint.weight_index(model_dir)
        self.files = [checkpoint.TensorFile(Path(model_dir) / f) for f in files]
        self.where = {name: f for f in self.files for name in f.names()}

    def first_float_dtype(self) -> torch.dtype | None:
        return next((f.dtype(n) for f in self.files for n in f.names() if f.dtype(n).is_floating_point), None)


@dataclass(frozen=True)
class _Read:
    """How to read one model tensor: `name` in `file`, its [index] slice along the first
    dimension (fused experts), transposed, then these rows."""

    file: checkpoint.TensorFile
    name: str
    index: int | None = None
    transpose: bool = False
    rows: slice | None = None

    def __call__(self) -> torch.Tensor:
        return self.shaped(self.file.read(self.name, self.index))

    def shaped(self, t: torch.Tensor) -> torch.Tensor:
        """The model's tensor from what was read."""
        if self.transpose:
            t = t.T
        if self.rows is not None:
            t = t[self.rows]
        return t.contiguous()


class Streamed:
    """A model whose decoder layers are filled from the checkpoint one at a time."""

    def __init__(self, model: nn.Module, family: Family, source: Source):
        self.model, self.source = model, source
        self.prefix = {id(layer): f"{family.layers}.{i}." for i, layer in enumerate(decoder_layers(model, family))}
        self.reads = _plan(model, family, source)
        layers = f"{family.layers}."
        for key, read in self.reads.items():
            if not key.startswith(layers):
                _assign(model, key, read())
        if hf.tied_embeddings(model.config):
            model.tie_weights()

    def fill(self, layer: nn.Module) -> None:
        """Give a decoder layer its tensors from the checkpoint."""
        prefix = self.prefix[id(layer)]
        reads = {key: read for key, read in self.reads.items() if key.startswith(prefix)}
        tensors = checkpoint.read_many([(r.file, r.name, r.index) for r in reads.values()])  # (all at once)
        for (key, read), t in zip(reads.items(), tensors):
            _assign(layer, key[len(prefix):], read.shaped(t))

    def release(self, layer: nn.Module) -> None:
        """Take a decoder layer's tensors away again (back to the meta device)."""
        for m in layer.modules():
            for k, p in m._parameters.items():
                if p is not None:
                    m._parameters[k] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                                                    requires_grad=False)


def open_streamed(model_dir: Path, family: Family, trust_remote_code: bool,
                  calibrate_all_experts: bool = False) -> tuple[Streamed, object]:
    """(Streamed, tokenizer) for a checkpoint directory, laid out as hf.prepare() lays it
    out; NotStreamable if its tensors do not map onto the model."""
    source = Source(model_dir)
    model, tokenizer = hf.skeleton(model_dir, trust_remote_code, source.first_float_dtype())
    hf.prepare(model, family, calibrate_all_experts)
    return Streamed(model, family, source), tokenizer


def _assign(root: nn.Module, key: str, value: torch.Tensor) -> None:
    path, _, leaf = key.rpartition(".")
    module = root.get_submodule(path) if path else root
    if leaf in module._parameters:
        old = module._parameters[leaf]
        module._parameters[leaf] = nn.Parameter(value.to(old.dtype), requires_grad=False)
    else:
        module._buffers[leaf] = value.to(module._buffers[leaf].dtype)


def _plan(model: nn.Module, family: Family, source: Source) -> dict[str, _Read]:
    """For every tensor of the model (outside the family's passthrough prefixes), how to
    read it from the checkpoint."""
    params = {n: p for n, p in model.named_parameters(remove_duplicate=False)}
    wanted = {k: v for k, v in model.state_dict(keep_vars=True).items() if not k.startswith(family.passthrough)}
    inverse = [(new, old) for old, new in checkpoint.prefix_renames(source.where, wanted)]
    tied = hf.tied_embeddings(model.config)
    reads: dict[str, _Read] = {}
    used: set[str] = set()
    for key, tensor in wanted.items():
        name = checkpoint.renamed(key, inverse)
        if name in source.where:
            read = _Read(source.where[name], name)
        else:
            read = _expert_read(name, tuple(tensor.shape), source)
            if read is None:
                if key not in params or (tied and key.endswith("lm_head.weight")):
                    continue  # a buffer the model computes itself; lm_head tied to the embeddings
                raise NotStreamable(f"the model's {key} is not in the checkpoint under a name streaming knows")
        if read.index is None and read.file.shape(name) != tuple(tensor.shape):
            raise NotStreamable(f"{key}: {tuple(tensor.shape)} in the model, {read.file.shape(read.name)} on disk")
        reads[key] = read
        used.add(read.name)
    unused = [n for n in source.where if n not in used and not n.startswith(family.passthrough)]
    if unused:
        raise NotStreamable(f"the checkpoint's {unused[0]} (and {len(unused) - 1} more) map to no tensor of the model")
    return reads


def _expert_read(name: str, shape: tuple[int, ...], source: Source) -> _Read | None:
    """A per-expert Linear's weight [out, in] from fused 3-D expert tensors."""
    m = EXPERT.fullmatch(name)
    gate_up, down = (f"{m['experts']}.{p}" for p in ("gate_up_proj", "down_proj")) if m else ("", "")
    if m is None or gate_up not in source.where or down not in source.where:
        return None
    inter, hidden = (shape[1], shape[0]) if m["proj"] == "down" else shape
    g, d = source.where[gate_up].shape(gate_up)[1:], source.where[down].shape(down)[1:]
    plain = g == (2 * inter, hidden) and d == (hidden, inter)
    flipped = g == (hidden, 2 * inter) and d == (inter, hidden)
    if plain == flipped:
        return None
    if m["proj"] == "down":
        return _Read(source.where[down], down, int(m["e"]), flipped)
    rows = slice(0, inter) if m["proj"] == "gate" else slice(inter, 2 * inter)
    return _Read(source.where[gate_up], gate_up, int(m["e"]), flipped, rows)
