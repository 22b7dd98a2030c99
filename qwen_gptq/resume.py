"""Resume: the finished layers of a run, kept beside the output until the output is whole.

A run writes each decoder layer's output tensors (packed Linears and the rest of the
layer, as the output stores them) and its quant_log rows into a hidden
work directory `.OUT.work` next to OUT as soon as the layer is done, with a fingerprint
of everything that decides them: the model's files, the calibration data, every setting,
the tool's version. Run the same command again after an interruption (Ctrl-C, SIGKILL,
out of memory, a crash) and it continues at the first unfinished layer: the finished
layers' weights are set from their packed tensors (which dequantize to exactly the
weights the solver wrote back) and run forward to recompute the next layer's inputs, so
the result is the same, bit for bit, as an uninterrupted run's. A work directory whose
fingerprint differs is refused (exit 2) rather than mixed in. The work directory is
removed once the output is in place.

A layer file is an output shard as it stands (unquantized tensors already in the output's
dtype, safetensors metadata format "pt"), and so is `outside.safetensors`, the tensors
outside the decoder layers, written once while the first layers are quantized. When the
output is large enough to be sharded anyway, its shards are these files, linked into the
output directory (checkpoint.link_shards): nothing is copied or held twice on disk.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from . import __version__, checkpoint, gptq_v1
from .errors import BadInput

FINGERPRINT = "fingerprint.json"
OUTSIDE = "outside.safetensors"
HASH_CHUNK = 1 << 20
# 3: a layer file is an output shard (unquantized tensors in the output's dtype, format "pt");
# 2: it held all of the layer's output tensors, unquantized ones in the model's dtype; 1: its packed Linears only
WORK_FORMAT = 3


def work_path(out: Path) -> Path:
    out = out.resolve()
    return out.parent / f".{out.name}.work"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(model_dir: Path, data_path: str, settings: dict) -> dict:
    """What decides a run's layers: the model (config and index hashed, weight files by
    name and size), the calibration file (hashed), the settings, the tool's version."""
    files, _ = checkpoint.weight_index(model_dir)
    model = {"config.json": _sha256(model_dir / "config.json"),
             "weights": {f: (model_dir / f).stat().st_size for f in files}}
    if (model_dir / checkpoint.INDEX_NAME).is_file():
        model[checkpoint.INDEX_NAME] = _sha256(model_dir / checkpoint.INDEX_NAME)
    return {"tool": __version__, "work_format": WORK_FORMAT, "model": model, "data": _sha256(Path(data_path)), "settings": settings}


@dataclasses.dataclass
class WorkDir:
    """The finished layers of one run (see the module's docstring)."""

    path: Path
    dtype: torch.dtype | None = None  # the output's, for unquantized floating-point tensors (None: as given)

    @classmethod
    def open(cls, out: Path, print_: dict, resume: bool, dtype: torch.dtype | None = None) -> WorkDir:
        """The work directory for `out`: an existing one with the same fingerprint is
        continued (resume), a different one refused; without `resume` it starts over."""
        path = work_path(out)
        if path.exists() and not resume:
            shutil.rmtree(path)
        elif path.exists():
            try:
                old = json.loads((path / FINGERPRINT).read_text())
            except (OSError, json.JSONDecodeError):
                old = None
            if old != print_:
                changed = [k for k in print_ if not isinstance(old, dict) or old.get(k) != print_[k]] or ["all"]
                raise BadInput(f"{path} holds the finished layers of an interrupted run with a different "
                               f"{', '.join(changed)}; start over with --no-resume (or --overwrite), or run the "
                               "command that started it")
        path.mkdir(exist_ok=True)
        (path / FINGERPRINT).write_text(json.dumps(print_, indent=2, sort_keys=True) + "\n")
        return cls(path, dtype)

    def _file(self, i: int) -> Path:
        return self.path / f"layer-{i:05d}.safetensors"

    def finished(self) -> int:
        """How many layers, from the first on, are done."""
        k = 0
        while self._file(k).is_file():
            k += 1
        return k

    def save(self, i: int, tensors: dict[str, torch.Tensor], stats: list[dict]) -> None:
        """Layer i's tensors (packed Linears and everything else of the layer, under their
        output names; the rest converted to the output's dtype) and its log rows, written
        atomically."""
        packed = set(gptq_v1.packed_modules(tensors))
        stored = {}
        for k, t in tensors.items():
            module, _, leaf = k.rpartition(".")
            if not (module in packed and leaf in gptq_v1.TENSORS) and self.dtype is not None:
                t = checkpoint.saved(k, t, self.dtype)
            stored[k] = checkpoint.Stored.of(t)
        self._write(self._file(i), stored, {"format": "pt", "stats": json.dumps(stats)})

    def save_outside(self, tensors: dict[str, checkpoint.Stored]) -> None:
        """The output's tensors outside the decoder layers, written atomically (once: a
        resumed run finds them)."""
        if not self.outside().is_file():
            self._write(self.outside(), tensors, {"format": "pt"})

    def outside(self) -> Path:
        return self.path / OUTSIDE

    def files(self, layers: int) -> list[Path]:
        """The output's tensors, every one in exactly one of these files."""
        return [self.outside()] + [self._file(i) for i in range(layers)]

    @staticmethod
    def _write(path: Path, tensors: dict[str, checkpoint.Stored], metadata: dict[str, str]) -> None:
        tmp = path.with_suffix(".tmp")
        checkpoint.write_safetensors(tmp, tensors, metadata)
        os.replace(tmp, path)

    def stats(self, i: int) -> list[dict]:
        """Layer i's log rows."""
        return json.loads(checkpoint.TensorFile(self._file(i)).metadata["stats"])

    def packed(self, i: int) -> dict[str, dict[str, torch.Tensor]]:
        """Layer i's packed Linears: module -> qweight/qzeros/scales/g_idx."""
        f = checkpoint.TensorFile(self._file(i))
        return {m: {leaf: f.read(f"{m}.{leaf}") for leaf in gptq_v1.TENSORS} for m in gptq_v1.packed_modules(f.names())}

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
