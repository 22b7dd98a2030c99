#!/usr/bin/env python3
"""Does transformers load a GPTQ checkpoint whose lm_head is quantized? (Why qwen-gptq keeps
lm_head unquantized.)

    python scripts/check_quantized_lm_head.py OUT_OF_QWEN_GPTQ SCRATCH_DIR

Copies a qwen-gptq output (one safetensors file, untied lm_head), replaces lm_head.weight by
its 4-bit round-to-nearest packed tensors with `"lm_head": true` in the quantization config
(as GPTQModel writes it, and vLLM reads it), loads the copy with transformers'
AutoModelForCausalLM (optimum + gptqmodel underneath) and prints what lm_head became. Needs
the `gptqmodel` extra.
"""

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qwen_gptq import gptq_v1  # noqa: E402
from qwen_gptq.gptq import QuantConfig, rtn  # noqa: E402


def main():
    src, out = Path(sys.argv[1]), Path(sys.argv[2])
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(src, out)
    (weights,) = out.glob("*.safetensors")
    tensors = load_file(weights)
    W = tensors.pop("lm_head.weight")  # (a tied lm_head is not in the file: use an untied model)
    r = rtn(W.float(), QuantConfig(bits=4, group_size=128))
    for k, v in gptq_v1.pack_linear(r.Q, r.scale, r.zero, r.g_idx, 4).items():
        tensors[f"lm_head.{k}"] = v.contiguous()
    save_file(tensors, weights, metadata={"format": "pt"})
    for name in ("config.json", "quantize_config.json"):
        path = out / name
        if path.exists():
            cfg = json.loads(path.read_text())
            (cfg["quantization_config"] if name == "config.json" else cfg)["lm_head"] = True
            path.write_text(json.dumps(cfg, indent=2))

    from transformers import AutoModelForCausalLM

    head = AutoModelForCausalLM.from_pretrained(out, device_map="cpu").lm_head
    w = getattr(head, "weight", None)
    print(json.dumps({
        "lm_head_class": type(head).__name__,
        "weight_is_the_quantized_one": None if w is None else bool(torch.allclose(w.float(), r.weight, atol=1e-2)),
        "largest_difference_from_the_original": None if w is None else (w.float() - W.float()).abs().max().item(),
    }))


if __name__ == "__main__":
    main()
