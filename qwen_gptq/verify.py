"""`qwen-gptq verify`: is a quantized directory sound, loadable, and close to its original?

Checks, in order (a later check is skipped when an earlier one makes it pointless):

    structure    configs agree; every quantized Linear has qweight/qzeros/scales/g_idx of the
                 right shapes and dtypes; scales finite and non-zero; g_idx in range; the shard
                 index and the shards agree; tokenizer and remote-code files present
    generate     load with our reference loader, greedy chat reply to --prompt
    closeness    with --original: perplexity of both, increase, top-1 agreement, KL
    transformers with --loader transformers: transformers' own GPTQ path (optimum + gptqmodel)
                 loads the directory and its logits match our loader's

Exit 0 when every check passes, 1 when one fails, 2 for bad input.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .calib import chatml_prompt_ids
from .errors import BadInput
from .families import (
    decoder_layers,
    family_for,
    layer_groups,
    per_expert_linears,
    quantized_module_suffixes,
    transformers_classes_restored,
)
from .loader import empty_model
from .packing import SUPPORTED_BITS

log = logging.getLogger("qwen_gptq")

DEFAULT_PROMPT = "你好！Please introduce yourself in one sentence."
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "qwen.tiktoken")
# Logits of an ecosystem loader (float16 kernels) vs our loader (float32) on the same input:
# mean |difference| relative to the logits' standard deviation.
ECOSYSTEM_TOLERANCE = 0.02


@dataclass
class Check:
    name: str
    status: str = "pass"  # pass | fail | skip
    message: str = ""
    figures: dict = field(default_factory=dict)
    problems: list = field(default_factory=list)

    def fail(self, problem: str):
        self.status = "fail"
        self.problems.append(problem)


def add_arguments(p, flag):
    p.add_argument("path", help="the quantized model directory")
    flag(p, "--original", default=None, metavar="MODEL", help="the unquantized model, to measure closeness")
    flag(p, "--eval_text", default=None, metavar="FILE", help="text for perplexity (needed with --original)")
    flag(p, "--windows", type=int, default=64, metavar="N", help="evaluation windows")
    flag(p, "--length", type=int, default=512, metavar="N", help="tokens per evaluation window")
    flag(p, "--max_ppl_increase", type=float, default=5.0, metavar="PCT", help="fail above this perplexity increase")
    flag(p, "--min_top1", type=float, default=0.8, metavar="FRAC", help="fail below this top-1 agreement")
    flag(p, "--prompt", default=DEFAULT_PROMPT, help="chat prompt for the generation check")
    flag(p, "--max_new_tokens", type=int, default=32, metavar="N", help="tokens to generate")
    flag(p, "--loader", default="ours", choices=["ours", "transformers", "gptqmodel"],
         help="also load through transformers' GPTQ path (transformers) or GPTQModel.load (gptqmodel) "
              "and compare logits with ours")
    flag(p, "--device", default="cpu", help="cpu, cuda or cuda:N")
    flag(p, "--trust_remote_code", action="store_true", help="allow the model's own code to run (Qwen1)")
    flag(p, "--json", action="store_true", help="print one JSON object on stdout")


# --------------------------------------------------------------------------- structure


def read_quant_config(path: Path) -> tuple[dict, dict]:
    if not path.is_dir():
        raise BadInput(f"{path}: no such directory")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise BadInput(f"{path}: no config.json; not a model directory")
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise BadInput(f"{cfg_file}: not valid JSON ({e.msg})") from None
    q = config.get("quantization_config")
    if not isinstance(q, dict) or q.get("quant_method") != "gptq":
        raise BadInput(f"{path}: not a GPTQ checkpoint (config.json has no quantization_config with quant_method gptq)")
    return config, q


def check_structure(path: Path, config: dict, q: dict, trust_remote_code: bool) -> Check:
    from safetensors import safe_open

    c = Check("structure")
    qc_file = path / "quantize_config.json"
    if not qc_file.is_file():
        c.fail("quantize_config.json is missing")
    else:
        try:
            qc = json.loads(qc_file.read_text())
            for k in sorted(set(qc) | set(q)):
                if k in ("model_name_or_path",):
                    continue
                if qc.get(k) != q.get(k):
                    c.fail(f"quantize_config.json and config.json disagree on {k}: {qc.get(k)!r} vs {q.get(k)!r}")
        except json.JSONDecodeError as e:
            c.fail(f"quantize_config.json is not valid JSON ({e.msg})")
    bits, gs = q.get("bits"), q.get("group_size")
    if bits not in SUPPORTED_BITS:
        c.fail(f"config.json: bits {bits!r} is not one of {SUPPORTED_BITS}")
        return c
    if not isinstance(gs, int) or (gs < 1 and gs != -1):
        c.fail(f"config.json: group_size {gs!r} is not -1 or a positive integer")
        return c
    if q.get("checkpoint_format", "gptq") != "gptq":
        c.fail(f"config.json: checkpoint_format {q.get('checkpoint_format')!r}; expected 'gptq'")
    if "is_marlin_format" in q:
        c.fail("config.json: quantization_config has is_marlin_format, which current loaders reject")

    # Shards and index.
    index_file = path / "model.safetensors.index.json"
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            c.fail(f"model.safetensors.index.json is malformed ({e})")
            return c
        shards = sorted(set(weight_map.values()))
        listed = set(weight_map.values())
        for f in sorted(path.glob("model-*.safetensors")):
            if f.name not in listed:
                c.fail(f"{f.name} is not listed in model.safetensors.index.json")
    elif (path / "model.safetensors").is_file():
        weight_map, shards = None, ["model.safetensors"]
    else:
        c.fail("no model.safetensors or model.safetensors.index.json")
        return c
    tensors = {}  # name -> (shard, shape, dtype)
    for shard in shards:
        f = path / shard
        if not f.is_file():
            c.fail(f"{shard}: listed in the index but missing")
            continue
        try:
            with safe_open(str(f), framework="pt") as sf:
                for k in sf.keys():
                    sl = sf.get_slice(k)
                    tensors[k] = (shard, tuple(sl.get_shape()), sl.get_dtype())
        except Exception as e:  # noqa: BLE001 - safetensors raises several types for a damaged file
            c.fail(f"{shard}: unreadable ({type(e).__name__}: {str(e).splitlines()[0][:120]}); truncated or corrupt?")
    if weight_map is not None:
        for k, shard in weight_map.items():
            if (path / shard).is_file() and k in tensors and tensors[k][0] != shard:
                c.fail(f"{k}: index says {shard}, found in {tensors[k][0]}")
        for k, (shard, _, _) in tensors.items():
            if k not in weight_map:
                c.fail(f"{k} (in {shard}) is not listed in the index")
    if c.status == "fail" and not tensors:
        return c

    # Every Linear the family quantizes, against the config's dimensions.
    family = family_for(config.get("model_type"))
    model, _ = empty_model(path, trust_remote_code)
    layers = decoder_layers(model, family)
    expected = set()
    n_quant = 0
    for i, layer in enumerate(layers):
        for names in layer_groups(layer, family):
            for n in names:
                m = layer.get_submodule(n)
                prefix = f"{family.layers}.{i}.{n}"
                groups = 1 if gs == -1 else math.ceil(m.in_features / gs)
                want = {
                    "qweight": ((m.in_features * bits // 32, m.out_features), "I32"),
                    "qzeros": ((groups, m.out_features * bits // 32), "I32"),
                    "scales": ((groups, m.out_features), "F16"),
                    "g_idx": ((m.in_features,), "I32"),
                }
                for leaf, (shape, dtype) in want.items():
                    key = f"{prefix}.{leaf}"
                    expected.add(key)
                    if key not in tensors:
                        c.fail(f"{key} is missing")
                    elif tensors[key][1] != shape or tensors[key][2] != dtype:
                        c.fail(f"{key}: shape {list(tensors[key][1])} {tensors[key][2]}, expected {list(shape)} {dtype}")
                if m.bias is not None:
                    expected.add(f"{prefix}.bias")
                    if f"{prefix}.bias" not in tensors:
                        c.fail(f"{prefix}.bias is missing")
                if f"{prefix}.weight" in tensors:
                    c.fail(f"{prefix}.weight is present: the Linear is stored unquantized")
                expected.add(f"{prefix}.weight")
                n_quant += 1
    tied = getattr(model.config, "tie_word_embeddings", False)
    for k in model.state_dict():
        if k in expected or (tied and k.endswith("lm_head.weight")):
            continue
        if k not in tensors:
            c.fail(f"{k} is missing")
    # Contents of the small tensors: scales and g_idx.
    by_shard: dict[str, list[str]] = {}
    for k, (shard, _, _) in tensors.items():
        by_shard.setdefault(shard, []).append(k)
    n_groups_for = {}
    for k, (_, shape, _) in tensors.items():
        if k.endswith(".scales"):
            n_groups_for[k[: -len(".scales")]] = shape[0]
    for shard, keys in by_shard.items():
        with safe_open(str(path / shard), framework="pt") as sf:
            for k in keys:
                if k.endswith(".scales"):
                    s = sf.get_tensor(k)
                    if not torch.isfinite(s).all():
                        c.fail(f"{k}: NaN or Inf scales")
                    elif (s == 0).any():
                        c.fail(f"{k}: zero scales")
                elif k.endswith(".g_idx"):
                    g = sf.get_tensor(k)
                    n = n_groups_for.get(k[: -len(".g_idx")])
                    if n is not None and (g.min() < 0 or g.max() >= n):
                        c.fail(f"{k}: values outside [0, {n})")
                elif tensors[k][2] in ("F16", "BF16", "F32"):
                    t = sf.get_tensor(k)
                    if not torch.isfinite(t).all():
                        c.fail(f"{k}: NaN or Inf values")
    # Tokenizer and remote code.
    if not (path / "tokenizer_config.json").is_file():
        c.fail("tokenizer_config.json is missing")
    if not any((path / f).is_file() for f in TOKENIZER_FILES) and not list(path.glob("*.tiktoken")):
        c.fail(f"no tokenizer vocabulary ({', '.join(TOKENIZER_FILES)})")
    for ref in (config.get("auto_map") or {}).values():
        refs = ref if isinstance(ref, list) else [ref]
        for r in refs:
            if isinstance(r, str) and "--" not in r and "." in r:
                module_file = r.rsplit(".", 1)[0] + ".py"
                if not (path / module_file).is_file():
                    c.fail(f"{module_file} (named by auto_map) is missing")
    c.figures = {"tensors": len(tensors), "shards": len(shards), "quantized_linears": n_quant,
                 "bits": bits, "group_size": gs}
    c.message = f"{n_quant} quantized Linears, {len(tensors)} tensors in {len(shards)} file(s)"
    if c.problems:
        c.message = f"{len(c.problems)} problem(s): " + "; ".join(c.problems[:10])
    return c


# --------------------------------------------------------------------------- load, generate, compare


@torch.no_grad()
def greedy_reply(model, tokenizer, prompt: str, max_new_tokens: int, device) -> tuple[str, int]:
    ids = torch.tensor([chatml_prompt_ids(tokenizer, prompt)], device=device)
    stop = {t for t in (getattr(tokenizer, "eos_token_id", None), getattr(tokenizer, "im_end_id", None),
                        getattr(tokenizer, "eod_id", None)) if isinstance(t, int)}
    stop |= {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")
             if isinstance(tokenizer.convert_tokens_to_ids(t), int)}
    new = []
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids, use_cache=False).logits[0, -1].float()
        if not torch.isfinite(logits).all():
            raise FloatingPointError("non-finite logits")
        nxt = int(logits.argmax())
        if nxt in stop:
            break
        new.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]], device=device)], dim=1)
    return tokenizer.decode(new), len(new)


def transformers_from_pretrained(path: Path, trust_remote_code: bool = False, **kwargs):
    """AutoModelForCausalLM.from_pretrained through transformers' GPTQ path (optimum +
    gptqmodel kernels), as a user would call it.

    MoE models need two things transformers does not do by itself (transformers 5 fuses
    experts into 3-D tensors no GPTQ kernel takes): one Linear per expert while the model
    is built (families.per_expert_linears), and `modules_in_block_to_quantize`, so that
    the router's shared-expert gate stays a plain Linear. Both are load-time settings: the
    checkpoint stays the standard GPTQ v1 layout every loader reads.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {"device_map": "cpu", "dtype": torch.float16, **kwargs}
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    family = family_for(config.model_type)
    if not family.moe:
        return AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=trust_remote_code, **kwargs)
    q = config.quantization_config
    q = q if isinstance(q, dict) else q.to_dict()
    config.quantization_config = {**q, "modules_in_block_to_quantize": quantized_module_suffixes(family)}
    with per_expert_linears(config.model_type):
        return AutoModelForCausalLM.from_pretrained(str(path), config=config, trust_remote_code=trust_remote_code,
                                                    **kwargs)


def check_ecosystem(path: Path, ours, windows: torch.Tensor, loader: str, trust_remote_code: bool) -> Check:
    """Load with an ecosystem loader and compare its logits with our loader's.

    loader "transformers": AutoModelForCausalLM.from_pretrained, i.e. transformers' own
    GPTQ path (optimum + gptqmodel kernels; see transformers_from_pretrained for MoE).
    loader "gptqmodel": GPTQModel.load.
    """
    c = Check(loader)
    try:
        import gptqmodel
        import optimum  # noqa: F401
    except ImportError as e:
        raise BadInput(f"--loader {loader} needs the gptqmodel extra (pip install 'qwen-gptq[gptqmodel]'): {e}") from None
    try:
        if loader == "gptqmodel":
            model_type = json.loads((path / "config.json").read_text()).get("model_type", "")
            with transformers_classes_restored(model_type):
                model = gptqmodel.GPTQModel.load(str(path), device="cpu", trust_remote_code=trust_remote_code)
        else:
            model = transformers_from_pretrained(path, trust_remote_code)
        model.eval()
    except Exception as e:  # noqa: BLE001 - report any loader failure as a failed check
        c.fail(f"{loader} could not load the directory: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
        c.message = c.problems[0]
        return c
    w = windows[:1, :128]
    try:
        with torch.no_grad():
            a = model(input_ids=w, use_cache=False).logits[0].float()
            b = ours(input_ids=w, use_cache=False).logits[0].float()
    except Exception as e:  # noqa: BLE001 - a loader that loads but cannot run fails the check
        c.fail(f"{loader}'s model failed to run: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
        c.message = c.problems[0]
        return c
    rel = ((a - b).abs().mean() / b.std()).item()
    top1 = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    kinds = sorted({type(m).__name__ for m in model.modules()
                    if type(m).__module__.startswith(("gptqmodel", "auto_gptq")) and hasattr(m, "qweight")})
    c.figures = {"relative_mean_abs_diff": rel, "top1_agreement": top1, "tolerance": ECOSYSTEM_TOLERANCE,
                 "kernels": kinds}
    if rel > ECOSYSTEM_TOLERANCE:
        c.fail(f"logits differ from our loader's: mean |diff| / std = {rel:.4f} > {ECOSYSTEM_TOLERANCE}")
    if not kinds:
        c.fail(f"{loader} loaded the model without any GPTQ QuantLinear")
    c.message = c.problems[0] if c.problems else f"loaded with {', '.join(kinds)}; logits within {rel:.4f} of ours"
    return c


def verify(args) -> dict:
    from .evaluate import compare, eval_windows
    from .loader import load_original, load_quantized

    path = Path(args.path)
    config, q = read_quant_config(path)
    if config.get("auto_map") and not args.trust_remote_code:
        raise BadInput(f"{path} carries its own model code (auto_map); add --trust-remote-code if you trust it")
    if args.original and not args.eval_text:
        raise BadInput("--original needs --eval-text FILE (the text to measure perplexity on)")
    if args.eval_text and not Path(args.eval_text).is_file():
        raise BadInput(f"--eval-text {args.eval_text}: no such file")
    if args.original and not Path(args.original).is_dir():
        raise BadInput(f"--original {args.original}: no such directory")
    device = torch.device(args.device)
    checks = []
    t0 = time.perf_counter()
    structure = check_structure(path, config, q, args.trust_remote_code)
    checks.append(structure)
    reply = None
    if structure.status == "fail":
        checks += [Check(n, "skip", "skipped: the structure check failed") for n in ("generate", "closeness")]
        if args.loader != "ours":
            checks.append(Check(args.loader, "skip", "skipped: the structure check failed"))
        return _report(path, checks, reply, t0)

    gen = Check("generate")
    checks.append(gen)
    try:
        model, tok = load_quantized(path, torch.float32, device, args.trust_remote_code)
        reply, n = greedy_reply(model, tok, args.prompt, args.max_new_tokens, device)
        gen.figures = {"new_tokens": n}
        gen.message = f"{n} tokens: {reply!r}"
        if n == 0:
            gen.fail("the model produced no tokens (immediate end of turn)")
            gen.message = gen.problems[0]
    except Exception as e:  # noqa: BLE001 - any failure to load or run is the finding
        gen.fail(f"loading or running failed: {type(e).__name__}: {e}")
        gen.message = gen.problems[0]
        model = None

    windows = None
    if args.original:
        close = Check("closeness")
        checks.append(close)
        if model is None:
            close.status, close.message = "skip", "skipped: the model did not load"
        else:
            orig, _ = load_original(args.original, torch.float32, device, args.trust_remote_code)
            windows = eval_windows(tok, Path(args.eval_text).read_text(encoding="utf-8"), args.windows, args.length)
            f = compare(orig, model, windows, device)
            del orig
            close.figures = {**f, "max_ppl_increase_pct": args.max_ppl_increase, "min_top1": args.min_top1}
            if f["ppl_increase_pct"] > args.max_ppl_increase:
                close.fail(f"perplexity up {f['ppl_increase_pct']:.2f}% (> {args.max_ppl_increase}%)")
            if f["top1_agreement"] < args.min_top1:
                close.fail(f"top-1 agreement {f['top1_agreement']:.3f} (< {args.min_top1})")
            close.message = (f"ppl {f['ppl_original']:.3f} -> {f['ppl_quantized']:.3f} ({f['ppl_increase_pct']:+.2f}%), "
                             f"top-1 {f['top1_agreement']:.3f}, KL {f['mean_kl']:.4f}")
            if close.problems:
                close.message += "; " + "; ".join(close.problems)
    else:
        checks.append(Check("closeness", "skip", "skipped: no --original given"))

    if args.loader != "ours":
        if model is None:
            checks.append(Check(args.loader, "skip", "skipped: our loader failed"))
        else:
            if windows is None:
                text = Path(args.eval_text).read_text(encoding="utf-8") if args.eval_text else (args.prompt + " ") * 64
                windows = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"][:, :128]
            checks.append(check_ecosystem(path, model, windows, args.loader, args.trust_remote_code))
    return _report(path, checks, reply, t0)


def _report(path, checks, reply, t0) -> dict:
    return {
        "path": str(path),
        "ok": all(c.status != "fail" for c in checks),
        "checks": [{"name": c.name, "status": c.status, "message": c.message, "problems": c.problems,
                    "figures": c.figures} for c in checks],
        "reply": reply,
        "seconds": round(time.perf_counter() - t0, 2),
    }


def cmd_verify(args, out) -> int:
    report = verify(args)
    if args.json:
        print(json.dumps(report, ensure_ascii=False), file=out)
    else:
        print(f"verify {report['path']}", file=out)
        for c in report["checks"]:
            print(f"  {c['status'].upper():4s}  {c['name']:12s} {c['message']}", file=out)
            for p in c["problems"][10:]:
                print(f"        {p}", file=out)
        print("OK" if report["ok"] else "FAILED", file=out)
    return 0 if report["ok"] else 1

