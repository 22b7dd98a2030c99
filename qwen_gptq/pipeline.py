"""When to quantize: the layer-by-layer (sequential) pipeline.

1. Run the model up to its first decoder layer for every calibration batch and
   keep that layer's inputs (hidden states plus whatever else the model passes
   it: rotary embeddings, masks, position ids).
2. For each decoder layer: move it to the device; for each true-sequential group
   of Linears, run the layer forward with hooks that accumulate H = 2/n XᵀX in
   float32, solve GPTQ, and write the dequantized weights back so the next group
   sees quantized inputs; then run the layer once more to produce the next
   layer's inputs; move it back.

Linears that receive the very same input tensor (q/k/v; gate/up) share one
Hessian and are solved as one stacked matrix: their rows are independent given H.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import defaultdict
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
) -> Outcome:
    """Quantize every decoder layer of `model` (on CPU) in place and return the packed tensors."""
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

    bar = tqdm(range(len(layers)), desc="layers", disable=not progress, file=None, dynamic_ncols=True)
    for i in bar:
        layer = layers[i]
        t0 = time.perf_counter()
        layer.to(device=device, dtype=cdtype)
        _sync(device)
        t["move"] += time.perf_counter() - t0
        groups = layer_groups(layer, family)
        if not cfg.true_sequential:
            groups = [[n for g in groups for n in g]]
        for names in groups:
            _quantize_group(layer, i, names, batches, cfg, device, family, outcome)
        if i + 1 < len(layers):  # the last layer's outputs feed nothing
            t0 = time.perf_counter()
            with torch.no_grad():
                for b in batches:
                    b.hidden = _forward(layer, b, device).to(store)
            _sync(device)
            t["forward"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        layer.to(device="cpu", dtype=model_dtype)
        t["move"] += time.perf_counter() - t0
        if progress:
            mean = sum(s.loss for s in outcome.stats if s.layer == i) / max(1, sum(1 for s in outcome.stats if s.layer == i))
            bar.set_postfix(loss=f"{mean:.4g}")
    bar.close()
    clear_graphs()
    return outcome


def _forward(layer: nn.Module, b: _Batch, device) -> torch.Tensor:
    out = layer(b.hidden.to(device), *b.args, **b.kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def _quantize_group(layer, layer_idx, names, batches, cfg, device, family, outcome):
    t = outcome.timings
    modules = {n: get_module(layer, n) for n in names}
    H: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = defaultdict(int)
    owner: dict[str, str] = {}  # module -> module whose Hessian it shares (same input tensor)
    state = {"valid": None, "seen": [], "fired": set(), "first": True}

    def hook(name):
        def fn(module, inputs, output):
            x = inputs[0]
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
                    x2 = x2.float()
                    if name not in H:
                        H[name] = torch.zeros(x2.shape[1], x2.shape[1], device=x2.device, dtype=torch.float32)
                    H[name].addmm_(x2.T, x2)
                    counts[name] += x2.shape[0]
            state["fired"].add(name)
            if len(state["fired"]) == len(modules):
                raise _StopForward()

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    t0 = time.perf_counter()
    try:
        with torch.no_grad(), _tf32(device.type == "cuda" and _half_precision(layer)):
            for b in batches:
                state["valid"], state["fired"], state["seen"] = b.valid, set(), []
                try:
                    _forward(layer, b, device)
                except _StopForward:
                    pass
                state["first"] = False
                state["seen"] = []
    finally:
        for h in handles:
            h.remove()
    _sync(device)
    t["hessian"] += time.perf_counter() - t0

    # Solve: one stacked problem per distinct Hessian.
    solved = [n for n in names if n not in owner]
    for lead in solved:
        members = [lead] + [n for n in names if owner.get(n) == lead]
        t0 = time.perf_counter()
        weights = [modules[n].weight for n in members]
        W = torch.cat([w.data for w in weights], dim=0)
        n_tok = counts.get(lead, 0)
        if n_tok == 0:
            log.warning("layer %d: %s saw no calibration tokens; quantized with round-to-nearest", layer_idx, ", ".join(members))
            res = rtn(W, cfg)
            method = "rtn"
        else:
            Hs = H.pop(lead).mul_(2.0 / n_tok)
            try:
                res = gptq(W, Hs, cfg)
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
            outcome.packed[full] = {k: v.to("cpu") for k, v in packed.items()}
            loss = res.losses[sl].sum().item()
            outcome.stats.append(ModuleStat(layer_idx, n, loss, res.damp, elapsed * rows / W.shape[0], n_tok, method))
            log.debug("layer %d %s: loss %.5g damp %g", layer_idx, n, loss, res.damp)
            row += rows
        _sync(device)
        t["pack"] += time.perf_counter() - t0


def _half_precision(layer) -> bool:
    return next(layer.parameters()).dtype in (torch.bfloat16, torch.float16)


@contextlib.contextmanager
def _tf32(enabled: bool):
    """TF32 for the float32 Hessian products when activations are bf16/fp16.

    Their mantissas (7 and 10 bits) fit TF32's 10 exactly, so the products are exact;
    accumulation stays float32. Nothing is lost, and the matmuls run on tensor cores.
    """
    if not enabled:
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


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
