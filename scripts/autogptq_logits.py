#!/usr/bin/env python3
"""Load a GPTQ directory with AutoGPTQ itself and save its logits for some token ids.

Runs in a separate environment (auto-gptq 0.7.1 pins transformers 4.44):

    .venv-autogptq/bin/python scripts/autogptq_logits.py DIR IDS.pt OUT.pt

IDS.pt holds a LongTensor [1, T]; OUT.pt receives float32 logits [T, vocab].
"""

import sys

import torch
from auto_gptq import AutoGPTQForCausalLM


def main():
    model_dir, ids_file, out_file = sys.argv[1:4]
    model = AutoGPTQForCausalLM.from_quantized(model_dir, device="cpu", use_safetensors=True,
                                               disable_exllama=True, disable_exllamav2=True, use_triton=False,
                                               use_marlin=False)
    ids = torch.load(ids_file)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    kinds = sorted({type(m).__module__ + "." + type(m).__name__ for m in model.modules() if hasattr(m, "qweight")})
    torch.save({"logits": logits, "kernels": kinds}, out_file)
    print(f"loaded with {', '.join(kinds)}; logits {tuple(logits.shape)}")


if __name__ == "__main__":
    main()
