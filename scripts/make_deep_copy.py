#!/usr/bin/env python3
"""A deep model for whole-process timing, made from a 1-layer one in seconds: every decoder
layer is a copy of layer 0's tensors, in one safetensors file.

    python scripts/bench_quantize.py --shape qwen3-30b-a3b --layers 1 --end-to-end --keep /tmp/m1 --build-only
    python scripts/make_deep_copy.py /tmp/m1/model /tmp/m48 48
    python -m qwen_gptq quantize --model_name_or_path /tmp/m48 --data_path /tmp/m1/calib.json ...

Building 48 random layers of a Qwen3-30B-A3B shape takes minutes; writing copies is bound by
the disk (57 GB in 27 s on the H200 machine). The copies are for timing only: in a deep stack
of identical random layers the hidden states drift, and an MoE router then sends most tokens
to a few experts (docs/benchmarks.md says what that did to the figures).
"""

import json
import shutil
import sys
from pathlib import Path

from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qwen_gptq import checkpoint  # noqa: E402


def main() -> None:
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    src, dst, layers = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    config = json.loads((src / "config.json").read_text())
    if config.get("num_hidden_layers") != 1:
        sys.exit(f"{src}: expected a 1-layer model, found num_hidden_layers {config.get('num_hidden_layers')}")
    dst.mkdir(parents=True)
    config["num_hidden_layers"] = layers
    for key in ("layer_types", "mlp_only_layers"):
        if isinstance(config.get(key), list) and len(config[key]) == 1:
            config[key] = config[key] * layers
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copyfile(f, dst / f.name)
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        with safe_open(f, "pt") as s:
            for k in s.keys():
                tensors[k] = s.get_tensor(k)
    stored = {}
    for k, t in tensors.items():
        copies = [k.replace("model.layers.0.", f"model.layers.{i}.", 1) for i in range(layers)] \
            if k.startswith("model.layers.0.") else [k]
        for name in copies:
            stored[name] = checkpoint.Stored.of(t)
    checkpoint.write_safetensors(dst / "model.safetensors", stored, {"format": "pt"})
    print(f"{dst}: {len(stored)} tensors, {layers} layers")


if __name__ == "__main__":
    main()
