"""qwen-gptq: GPTQ quantization of Qwen checkpoints into the AutoGPTQ format."""

__version__ = "0.1.0"
