"""`qwen-gptq bench`: the memory and speed table of Qwen's GPTQ guide, for checkpoints at hand.

For each model (the quantized directory, and with --original the unquantized one):
weights memory on the GPU after loading, peak memory while generating, prefill and decode
tokens per second at batch 1 and at one larger batch (fixed prompt and output lengths,
random prompt tokens, greedy, a warm-up first, the median of several runs). Quantized
models load the way users serve them through transformers: its GPTQ path, with GPTQModel's
kernels (the kernel is named); the original loads in bfloat16. On a CPU only the weights'
memory is measured (GPU kernels are what the speed figures are about).
"""

from __future__ import annotations

import gc
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import hf, runtime
from .errors import BadInput
from .options import Flag, option


@dataclass(frozen=True)
class BenchOptions:
    path: str = field(metadata={"flag": Flag("the quantized model directory", positional=True)})
    original: str | None = option("the unquantized model, measured beside it (in bfloat16)", None, metavar="MODEL")
    batch: int = option("the larger batch size measured besides batch 1", 8, metavar="N")
    prompt_len: int = option("prompt tokens per sequence", 256, metavar="N")
    new_tokens: int = option("tokens generated per sequence", 128, metavar="N")
    runs: int = option("timed runs per figure (the median is reported), after a warm-up", 3, metavar="N")
    kernel: str | None = option("GPTQModel's kernel for the quantized model: marlin, machete, exllama_v2, triton, "
                                "torch (default: GPTQModel's choice for the GPU)", None, metavar="NAME")
    device: str = option("cuda or cuda:N for the full table (auto: CUDA when available); cpu: memory only", "auto")
    plot: str | None = option("also draw the table as bar charts into this PNG (needs the plot extra: matplotlib)",
                              None, metavar="FILE")
    trust_remote_code: bool = option("allow the model's own code to run (Qwen1)", False)

    def validate(self) -> None:
        for name in ("batch", "prompt_len", "new_tokens", "runs"):
            if getattr(self, name) < 1:
                raise BadInput(f"--{name.replace('_', '-')} {getattr(self, name)} must be at least 1")
        for p in (self.path, self.original):
            if p is not None and not (Path(p) / "config.json").is_file():
                raise BadInput(f"{p}: not a model directory (no config.json)")
        if self.plot is not None:
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                raise BadInput("--plot needs matplotlib: pip install 'qwen-gptq[plot]'") from None


def bench(o: BenchOptions) -> dict:
    o.validate()
    device = runtime.resolve_device(o.device)
    models = [(_precision(Path(o.path)), Path(o.path))]
    if o.original:
        models.insert(0, ("bf16", Path(o.original)))
    rows = [_measure(name, path, device, o) for name, path in models]
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "settings": {"batch_sizes": [1, o.batch], "prompt_len": o.prompt_len, "new_tokens": o.new_tokens,
                           "runs": o.runs},
              "versions": _versions(), "models": rows}
    if device.type != "cuda":
        report["note"] = "memory only: speed is measured on a GPU, with the GPU kernels users serve with"
    if o.plot:
        plot(report, Path(o.plot))
        report["plot"] = o.plot
    return report


def _precision(path: Path) -> str:
    q = json.loads((path / "config.json").read_text()).get("quantization_config")
    if not q:
        return "bf16"
    return f"int{q.get('bits')}"


def _versions() -> dict:
    import importlib.metadata as md

    out = {"torch": torch.__version__}
    for pkg in ("transformers", "gptqmodel", "optimum"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _load(path: Path, quantized: bool, device: torch.device, o: BenchOptions) -> torch.nn.Module:
    place = {"device_map": str(device) if device.type == "cuda" else "cpu"}
    if quantized:
        try:
            import gptqmodel  # noqa: F401
        except ImportError:
            raise BadInput("bench loads GPTQ checkpoints through transformers + GPTQModel's kernels: "
                           "pip install 'qwen-gptq[gptqmodel]'") from None
        return hf.transformers_from_pretrained(path, o.trust_remote_code, o.kernel, dtype=torch.float16, **place)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path), trust_remote_code=o.trust_remote_code)
    return hf.auto_class(config).from_pretrained(str(path), dtype=torch.bfloat16, trust_remote_code=o.trust_remote_code,
                                                 **place)


def _measure(name: str, path: Path, device: torch.device, o: BenchOptions) -> dict:
    cuda = device.type == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(device)
    model = _load(path, name != "bf16", device, o).eval()
    kernels = sorted({type(m).__name__ for m in model.modules() if hasattr(m, "qweight")})
    row = {"precision": name, "path": str(path), "kernel": ", ".join(kernels) or "torch (bf16 GEMM)"}
    if cuda:
        row["weights_gb"] = (torch.cuda.memory_allocated(device) - before) / 1e9
        row["batches"] = {str(b): _speed(model, device, b, o) for b in (1, o.batch)}
    else:
        row["weights_gb"] = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) / 1e9
    del model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def _speed(model: torch.nn.Module, device: torch.device, batch: int, o: BenchOptions) -> dict:
    vocab = model.config.get_text_config().vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, vocab - 100, (batch, o.prompt_len), generator=g).to(device)
    gen = {"max_new_tokens": o.new_tokens, "min_new_tokens": o.new_tokens, "do_sample": False,
           "pad_token_id": 0, "eos_token_id": None}

    def timed(fn) -> float:
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    with torch.no_grad():
        model.generate(ids, **{**gen, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
        prefill = statistics.median(timed(lambda: model(input_ids=ids, use_cache=True, logits_to_keep=1)) for _ in range(o.runs))
        torch.cuda.reset_peak_memory_stats(device)
        generate = statistics.median(timed(lambda: model.generate(ids, **gen)) for _ in range(o.runs))
    return {"peak_gb": torch.cuda.max_memory_allocated(device) / 1e9,
            "prefill_tokens_per_s": batch * o.prompt_len / prefill,
            "decode_tokens_per_s": batch * o.new_tokens / max(generate - prefill, 1e-9)}


def plot(report: dict, path: Path) -> None:
    """Bar charts: memory (weights; peak at each batch) and speed (prefill, decode), the
    precisions side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["models"]
    names = [r["precision"] for r in rows]
    batches = [str(b) for b in report["settings"]["batch_sizes"]]
    timed = all("batches" in r for r in rows)
    fig, axes = plt.subplots(1, 3 if timed else 1, figsize=(15 if timed else 5, 4), squeeze=False)
    memory = {"weights": [r["weights_gb"] for r in rows]}
    if timed:
        memory.update({f"peak, batch {b}": [r["batches"][b]["peak_gb"] for r in rows] for b in batches})
    _bars(axes[0][0], names, memory, "GB", "GPU memory" if timed else "weights in memory")
    if timed:
        for ax, key, title in ((axes[0][1], "prefill_tokens_per_s", "prefill"),
                               (axes[0][2], "decode_tokens_per_s", "decode")):
            _bars(ax, names, {f"batch {b}": [r["batches"][b][key] for r in rows] for b in batches}, "tokens/s", title)
    fig.suptitle(f"{report['device']}: prompt {report['settings']['prompt_len']}, "
                 f"{report['settings']['new_tokens']} new tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _bars(ax, names: list[str], series: dict[str, list[float]], unit: str, title: str) -> None:
    width = 0.8 / len(series)
    for k, (label, values) in enumerate(series.items()):
        xs = [i + k * width for i in range(len(names))]
        bars = ax.bar(xs, values, width, label=label)
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
    ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(names))], names)
    ax.set_ylabel(unit)
    ax.set_title(title)
    ax.legend(fontsize=7)
