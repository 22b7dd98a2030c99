"""`qwen-gptq verify`: is a quantized directory sound, loadable, and close to its original?

The checks are the table CHECKS, run in order: each has a name, a function that fills
in its Check, the checks it needs to have passed, and when it is wanted at all. Adding
a check is adding a function and a row (and, if it takes a setting, a VerifyOptions
field: the command line makes its flag from the field).

    structure     configs agree; every quantized Linear has the packed tensors of the right
                  shapes and dtypes; scales finite and non-zero; g_idx in range; the shard
                  index and the shards agree; tokenizer and remote-code files present
    generate      load with our reference loader, greedy chat reply to --prompt
    closeness     with --original: perplexity of both, increase, top-1 agreement, KL
    transformers  with --loader transformers: transformers' own GPTQ path (optimum + gptqmodel)
    gptqmodel     with --loader gptqmodel: GPTQModel.load; both compare logits with ours
    serving       without loading: does vLLM load it, at which tensor-parallel sizes (serving.py)
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open

from . import checkpoint, gptq_v1, hf, runtime, serving
from .calib import chatml_prompt_ids, stop_token_ids
from .errors import BadInput
from .evaluate import compare, eval_windows
from .families import decoder_layers, family_for, layer_groups, matches
from .options import Flag, option

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase as Tokenizer

DEFAULT_PROMPT = "你好！Please introduce yourself in one sentence."
LOADERS = ("ours", "transformers", "gptqmodel")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "qwen.tiktoken")
# Logits of an ecosystem loader (float16 kernels) vs our loader (float32) on the same input:
# mean |difference| relative to the logits' standard deviation.
ECOSYSTEM_TOLERANCE = 0.02
ECOSYSTEM_TOKENS = 128  # tokens the ecosystem loaders' logits are compared on
MAX_PROBLEMS_SHOWN = 10  # in a check's one-line message
# Linears vLLM loads as one fused module (its models' stacked_params_mapping): a checkpoint
# must quantize all of a set or none, else vLLM refuses it. `*` is one name component.
FUSED_IN_VLLM = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"),
    ("mlp.experts.*.gate_proj", "mlp.experts.*.up_proj"),
    ("linear_attn.in_proj_qkv", "linear_attn.in_proj_z"),
    ("linear_attn.in_proj_b", "linear_attn.in_proj_a"),
)


@dataclass(frozen=True)
class VerifyOptions:
    path: str = field(metadata={"flag": Flag("the quantized model directory", positional=True)})
    original: str | None = option("the unquantized model, to measure closeness", None, metavar="MODEL")
    eval_text: str | None = option("text for perplexity (needed with --original)", None, metavar="FILE")
    windows: int = option("evaluation windows", 64, metavar="N")
    length: int = option("tokens per evaluation window", 512, metavar="N")
    max_ppl_increase: float = option("fail above this perplexity increase", 5.0, metavar="PCT")
    min_top1: float = option("fail below this top-1 agreement", 0.8, metavar="FRAC")
    prompt: str = option("chat prompt for the generation check", DEFAULT_PROMPT)
    max_new_tokens: int = option("tokens to generate", 32, metavar="N")
    loader: str = option("also load through transformers' GPTQ path (transformers) or GPTQModel.load (gptqmodel) "
                         "and compare logits with ours", "ours", choices=LOADERS)
    device: str = option("cpu, cuda or cuda:N (auto: CUDA when available)", "cpu")
    serve: str | None = option("fail (exit 1) unless this server loads the checkpoint (default: report only)", None,
                               choices=("vllm",))
    tp: int | None = option("with --serve: also fail unless it loads at this tensor-parallel size", None, metavar="N")
    trust_remote_code: bool = option("allow the model's own code to run (Qwen1)", False)


@dataclass
class Check:
    name: str
    status: str = "pass"  # pass | fail | skip
    message: str = ""
    figures: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def fail(self, problem: str) -> None:
        self.status = "fail"
        self.problems.append(problem)

    def skip(self, why: str) -> None:
        self.status, self.message = "skip", f"skipped: {why}"

    def finish(self) -> None:
        """A failed check without a message of its own says what failed."""
        if self.status == "fail" and not self.message:
            shown = self.problems[:MAX_PROBLEMS_SHOWN]
            self.message = shown[0] if len(self.problems) == 1 else f"{len(self.problems)} problems: " + "; ".join(shown)


@dataclass
class State:
    """The checkpoint under verification, and what the checks learn about it."""

    opts: VerifyOptions
    path: Path
    config: dict
    q: dict  # its quantization_config
    device: torch.device
    model: torch.nn.Module | None = None  # loaded by `generate`, through our loader
    tokenizer: Tokenizer | None = None
    windows: torch.Tensor | None = None  # evaluation token windows, once tokenized
    tensors: dict | None = None  # name -> (shard, shape, dtype) as stored, read by `structure`
    reply: str | None = None


@dataclass(frozen=True)
class CheckSpec:
    name: str
    run: Callable[[State, Check], None]
    needs: tuple[str, ...] = ()  # checks that must have passed first
    wanted: Callable[[VerifyOptions], bool] = lambda o: True
    unwanted: str | None = None  # reported as skipped with this reason when not wanted (None: not reported)


# --------------------------------------------------------------------------- structure


def check_structure(s: State, c: Check) -> None:
    """Without loading the model: configs, weight files, quantized tensors, other files."""
    if not _check_config_block(s, c):
        return
    tensors = s.tensors = _read_weight_files(s, c)
    if tensors is None:
        return
    _check_values(s, c, tensors)
    model, _ = hf.empty_model(s.path, s.opts.trust_remote_code)
    rules = checkpoint.prefix_renames(tensors, model.state_dict())  # the checkpoint's names -> the model's
    named = {checkpoint.renamed(k, rules): v for k, v in tensors.items()}
    n_quant = _check_quantized_linears(s, c, model, named)
    _check_fused_sets(s, c, named)
    _check_support_files(s, c)
    shards = len({shard for shard, _, _ in tensors.values()})
    c.figures = {"tensors": len(tensors), "shards": shards, "quantized_linears": n_quant, "bits": s.q["bits"],
                 "group_size": s.q["group_size"]}
    if not c.problems:
        c.message = f"{n_quant} quantized Linears, {len(tensors)} tensors in {shards} file(s)"


def _check_config_block(s: State, c: Check) -> bool:
    """quantize_config.json agrees with config.json, and the settings are ones the format has.
    False when the rest cannot be checked."""
    qc_file = s.path / "quantize_config.json"
    if not qc_file.is_file():
        c.fail("quantize_config.json is missing")
    else:
        try:
            qc = checkpoint.read_json(qc_file)
            for k in sorted(set(qc) | set(s.q)):
                if k != "model_name_or_path" and qc.get(k) != s.q.get(k):
                    c.fail(f"quantize_config.json and config.json disagree on {k}: {qc.get(k)!r} vs {s.q.get(k)!r}")
        except BadInput as e:
            c.fail(f"quantize_config.json: {str(e).split(': ', 1)[-1]}")
    bits, gs = s.q.get("bits"), s.q.get("group_size")
    if bits not in gptq_v1.SUPPORTED_BITS:
        c.fail(f"config.json: bits {bits!r} is not one of {gptq_v1.SUPPORTED_BITS}")
        return False
    if not isinstance(gs, int) or (gs < 1 and gs != -1):
        c.fail(f"config.json: group_size {gs!r} is not -1 or a positive integer")
        return False
    if s.q.get("checkpoint_format", gptq_v1.FORMAT) != gptq_v1.FORMAT:
        c.fail(f"config.json: checkpoint_format {s.q.get('checkpoint_format')!r}; expected {gptq_v1.FORMAT!r}")
    for k in gptq_v1.REJECTED_KEYS:
        if k in s.q:
            c.fail(f"config.json: quantization_config has {k}, which current loaders reject")
    return True


def _read_weight_files(s: State, c: Check) -> dict[str, tuple[str, tuple, str]] | None:
    """name -> (shard, shape, dtype) of every tensor; the index checked against the shards."""
    try:
        shards, weight_map = checkpoint.weight_index(s.path)
    except BadInput as e:
        c.fail(str(e))
        return None
    if weight_map is not None:
        for f in sorted(s.path.glob("model-*.safetensors")):
            if f.name not in shards:
                c.fail(f"{f.name} is not listed in {checkpoint.INDEX_NAME}")
    tensors = {}
    for shard in shards:
        f = s.path / shard
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
            if (s.path / shard).is_file() and k in tensors and tensors[k][0] != shard:
                c.fail(f"{k}: index says {shard}, found in {tensors[k][0]}")
        for k, (shard, _, _) in tensors.items():
            if k not in weight_map:
                c.fail(f"{k} (in {shard}) is not listed in the index")
    return tensors if tensors or c.status != "fail" else None


def _check_quantized_linears(s: State, c: Check, model: torch.nn.Module, tensors: dict) -> int:
    """Every Linear the family quantizes has the format's tensors, in the shapes the
    config's dimensions imply; every other parameter is there. Returns how many.
    (Names as the model has them.)"""
    family = family_for(s.config.get("model_type"))
    bits, gs = s.q["bits"], s.q["group_size"]
    expected, n_quant = set(), 0
    for i, layer in enumerate(decoder_layers(model, family)):
        for names in layer_groups(layer, family):
            for n in names:
                m = layer.get_submodule(n)
                prefix = f"{family.layers}.{i}.{n}"
                for leaf, spec in gptq_v1.tensor_specs(m.in_features, m.out_features, bits, gs).items():
                    key = f"{prefix}.{leaf}"
                    expected.add(key)
                    want = (spec.shape, spec.safetensors_dtype)
                    if key not in tensors:
                        c.fail(f"{key} is missing")
                    elif tensors[key][1:] != want:
                        c.fail(f"{key}: shape {list(tensors[key][1])} {tensors[key][2]}, "
                               f"expected {list(spec.shape)} {spec.safetensors_dtype}")
                if m.bias is not None:
                    expected.add(f"{prefix}.bias")
                    if f"{prefix}.bias" not in tensors:
                        c.fail(f"{prefix}.bias is missing")
                if f"{prefix}.weight" in tensors:
                    c.fail(f"{prefix}.weight is present: the Linear is stored unquantized")
                expected.add(f"{prefix}.weight")
                n_quant += 1
    tied = hf.tied_embeddings(model.config)
    for k in model.state_dict():
        if k in expected or k in tensors or (tied and k.endswith("lm_head.weight")) or k.startswith(family.passthrough):
            continue  # (tensors outside the language model are copied as the source names them)
        c.fail(f"{k} is missing")
    return n_quant


def _check_fused_sets(s: State, c: Check, tensors: dict) -> None:
    """Parts of a module vLLM fuses are all quantized or all not (FUSED_IN_VLLM)."""
    family = family_for(s.config.get("model_type"))
    prefix = family.layers + "."
    linears: dict[str, set[str]] = {}  # layer index -> Linear names stored (quantized or not)
    for k in tensors:
        if k.startswith(prefix) and k.endswith((".qweight", ".weight")):
            index, _, name = k[len(prefix):].partition(".")
            linears.setdefault(index, set()).add(name)
    for index, names in sorted(linears.items(), key=lambda kv: int(kv[0]) if kv[0].isdigit() else -1):
        for fused in FUSED_IN_VLLM:
            sets: dict[str, dict[str, bool]] = {}  # the '*' part -> member -> quantized
            for name in names:
                module, leaf = name.rsplit(".", 1)
                for pattern in fused:
                    if matches(module, pattern):
                        star = ".".join(a for a, b in zip(module.split("."), pattern.split(".")) if b == "*")
                        members = sets.setdefault(star, {})
                        members[module] = members.get(module, False) or leaf == "qweight"
            for members in sets.values():
                if len(set(members.values())) > 1:
                    q = sorted(m for m, v in members.items() if v)
                    u = sorted(m for m, v in members.items() if not v)
                    c.fail(f"{prefix}{index}: {', '.join(q)} quantized but {', '.join(u)} not; vLLM loads them as one "
                           "module and refuses a checkpoint that quantizes only part of it")


def _check_values(s: State, c: Check, tensors: dict) -> None:
    """Scales finite and non-zero, g_idx within the groups, no NaN/Inf in other float tensors."""
    by_shard: dict[str, list[str]] = {}
    for k, (shard, _, _) in tensors.items():
        by_shard.setdefault(shard, []).append(k)
    groups_of = {k[: -len(".scales")]: shape[0] for k, (_, shape, _) in tensors.items() if k.endswith(".scales")}
    for shard, keys in by_shard.items():
        with safe_open(str(s.path / shard), framework="pt") as sf:
            for k in keys:
                if k.endswith(".scales"):
                    t = sf.get_tensor(k)
                    if not torch.isfinite(t).all():
                        c.fail(f"{k}: NaN or Inf scales")
                    elif (t == 0).any():
                        c.fail(f"{k}: zero scales")
                elif k.endswith(".g_idx"):
                    g = sf.get_tensor(k)
                    n = groups_of.get(k[: -len(".g_idx")])
                    if n is not None and (g.min() < 0 or g.max() >= n):
                        c.fail(f"{k}: values outside [0, {n})")
                elif tensors[k][2] in ("F16", "BF16", "F32"):
                    if not torch.isfinite(sf.get_tensor(k)).all():
                        c.fail(f"{k}: NaN or Inf values")


def _check_support_files(s: State, c: Check) -> None:
    """The tokenizer, and every code file auto_map names."""
    if not (s.path / "tokenizer_config.json").is_file():
        c.fail("tokenizer_config.json is missing")
    if not any((s.path / f).is_file() for f in TOKENIZER_FILES) and not list(s.path.glob("*.tiktoken")):
        c.fail(f"no tokenizer vocabulary ({', '.join(TOKENIZER_FILES)})")
    for ref in (s.config.get("auto_map") or {}).values():
        for r in ref if isinstance(ref, list) else [ref]:
            if isinstance(r, str) and "--" not in r and "." in r:
                module_file = r.rsplit(".", 1)[0] + ".py"
                if not (s.path / module_file).is_file():
                    c.fail(f"{module_file} (named by auto_map) is missing")


# --------------------------------------------------------------------------- load, generate, compare


@torch.no_grad()
def greedy_reply(model: torch.nn.Module, tokenizer: Tokenizer, prompt: str, max_new_tokens: int,
                 device: torch.device) -> tuple[str, int]:
    ids = torch.tensor([chatml_prompt_ids(tokenizer, prompt)], device=device)
    stop = stop_token_ids(tokenizer)
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


def check_generate(s: State, c: Check) -> None:
    """Load through our reference loader and generate a chat reply."""
    try:
        s.model, s.tokenizer = hf.load_quantized(s.path, torch.float32, s.device, s.opts.trust_remote_code)
        s.reply, n = greedy_reply(s.model, s.tokenizer, s.opts.prompt, s.opts.max_new_tokens, s.device)
    except Exception as e:  # noqa: BLE001 - any failure to load or run is the finding
        s.model = None
        c.fail(f"loading or running failed: {type(e).__name__}: {e}")
        return
    c.figures = {"new_tokens": n}
    if n == 0:
        c.fail("the model produced no tokens (immediate end of turn)")
    else:
        c.message = f"{n} tokens: {s.reply!r}"


def check_closeness(s: State, c: Check) -> None:
    """Perplexity, top-1 agreement and KL against the original on the evaluation text."""
    if s.model is None:
        return c.skip("the model did not load")
    o = s.opts
    original, _ = hf.load_model(o.original, torch.float32, o.trust_remote_code)
    s.windows = eval_windows(s.tokenizer, Path(o.eval_text).read_text(encoding="utf-8"), o.windows, o.length)
    f = compare(original.to(s.device), s.model, s.windows, s.device)
    del original
    c.figures = {**f, "max_ppl_increase_pct": o.max_ppl_increase, "min_top1": o.min_top1}
    if f["ppl_increase_pct"] > o.max_ppl_increase:
        c.fail(f"perplexity up {f['ppl_increase_pct']:.2f}% (> {o.max_ppl_increase}%)")
    if f["top1_agreement"] < o.min_top1:
        c.fail(f"top-1 agreement {f['top1_agreement']:.3f} (< {o.min_top1})")
    c.message = (f"ppl {f['ppl_original']:.3f} -> {f['ppl_quantized']:.3f} ({f['ppl_increase_pct']:+.2f}%), "
                 f"top-1 {f['top1_agreement']:.3f}, KL {f['mean_kl']:.4f}")
    if c.problems:
        c.message += "; " + "; ".join(c.problems)


def check_ecosystem(s: State, c: Check) -> None:
    """Load with an ecosystem loader (the check's name) and compare its logits with ours:
    transformers' own GPTQ path (optimum + gptqmodel kernels; hf.transformers_from_pretrained
    for MoE), or GPTQModel.load."""
    if s.model is None:
        return c.skip("our loader failed")
    try:
        if c.name == "gptqmodel":
            model = hf.gptqmodel_load(s.path, s.config.get("model_type", ""), s.opts.trust_remote_code)
        else:
            model = hf.transformers_from_pretrained(s.path, s.opts.trust_remote_code)
        model.eval()
    except hf.LoaderUnsupported as e:
        return c.skip(f"{c.name} cannot load this family here: {e}")
    except Exception as e:  # noqa: BLE001 - report any loader failure as a failed check
        return c.fail(f"{c.name} could not load the directory: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
    w = _comparison_tokens(s)
    try:
        with torch.no_grad():
            a = model(input_ids=w, use_cache=False).logits[0].float()
            b = s.model(input_ids=w, use_cache=False).logits[0].float()
    except Exception as e:  # noqa: BLE001 - a loader that loads but cannot run fails the check
        return c.fail(f"{c.name}'s model failed to run: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
    rel = ((a - b).abs().mean() / b.std()).item()
    top1 = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    kinds = sorted({type(m).__name__ for m in model.modules()
                    if type(m).__module__.startswith(("gptqmodel", "auto_gptq")) and hasattr(m, "qweight")})
    c.figures = {"relative_mean_abs_diff": rel, "top1_agreement": top1, "tolerance": ECOSYSTEM_TOLERANCE,
                 "kernels": kinds}
    if rel > ECOSYSTEM_TOLERANCE:
        c.fail(f"logits differ from our loader's: mean |diff| / std = {rel:.4f} > {ECOSYSTEM_TOLERANCE}")
    if not kinds:
        c.fail(f"{c.name} loaded the model without any GPTQ QuantLinear")
    if not c.problems:
        c.message = f"loaded with {', '.join(kinds)}; logits within {rel:.4f} of ours"


def check_serving(s: State, c: Check) -> None:
    """vLLM's loading rules, from the stored names and shapes alone (serving.VLLM)."""
    shape = {k: v[1] for k, v in s.tensors.items()}  # (as the structure check read them)
    linears = [serving.Linear(k[: -len(".g_idx")], shape[k][0], shape[k[: -len(".g_idx")] + ".scales"][1])
               for k in sorted(shape) if k.endswith(".g_idx")]
    text = s.config.get("text_config") or s.config
    report = serving.vllm_report(s.q, linears, text.get("num_key_value_heads"))
    c.figures = {"vllm": report.figures(), "rules": serving.VLLM["source"], "notes": report.notes}
    strict = s.opts.serve == "vllm"
    if not report.loads:
        if strict:
            for p in report.problems:
                c.fail(f"vLLM would not load it: {p}")
        else:
            c.message = (f"vLLM would not load it ({report.problems[0]}); transformers and GPTQModel do. "
                         "--serve vllm makes this a failure")
        return
    c.message = f"vLLM loads it at tensor-parallel sizes {report.tp_sizes}"
    if len(report.tp_sizes) < len(serving.VLLM["tp_sizes"]):
        c.message += f" (not {report.notes[0]})"
    if strict and s.opts.tp and s.opts.tp not in report.tp_sizes:
        why = next((n for n in report.notes if n.startswith(f"TP {s.opts.tp}:")), f"TP {s.opts.tp} is not checked")
        c.fail(f"vLLM would not load it at tensor parallelism {s.opts.tp}: {why}")
        c.message = c.problems[0]


def _comparison_tokens(s: State) -> torch.Tensor:
    if s.windows is not None:
        return s.windows[:1, :ECOSYSTEM_TOKENS]
    o = s.opts
    text = Path(o.eval_text).read_text(encoding="utf-8") if o.eval_text else (o.prompt + " ") * 64
    return s.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][:1, :ECOSYSTEM_TOKENS]


CHECKS: tuple[CheckSpec, ...] = (
    CheckSpec("structure", check_structure),
    CheckSpec("generate", check_generate, needs=("structure",)),
    CheckSpec("closeness", check_closeness, needs=("structure",), wanted=lambda o: o.original is not None,
              unwanted="no --original given"),
    CheckSpec("transformers", check_ecosystem, needs=("structure",), wanted=lambda o: o.loader == "transformers"),
    CheckSpec("gptqmodel", check_ecosystem, needs=("structure",), wanted=lambda o: o.loader == "gptqmodel"),
    CheckSpec("serving", check_serving, needs=("structure",)),
)


# --------------------------------------------------------------------------- running them


def read_quant_config(path: Path) -> tuple[dict, dict]:
    """config.json and its quantization_config; BadInput if this is no GPTQ checkpoint."""
    if not path.is_dir():
        raise BadInput(f"{path}: no such directory")
    if not (path / "config.json").is_file():
        raise BadInput(f"{path}: no config.json; not a model directory")
    config = checkpoint.read_json(path / "config.json")
    q = config.get("quantization_config")
    if not isinstance(q, dict) or q.get("quant_method") != gptq_v1.FORMAT:
        raise BadInput(f"{path}: not a GPTQ checkpoint (config.json has no quantization_config with quant_method gptq)")
    return config, q


def _check_input(o: VerifyOptions, config: dict) -> torch.device:
    """BadInput (exit 2) for anything the checks could not use, before any of them runs."""
    if config.get("auto_map") and not o.trust_remote_code:
        raise BadInput(f"{o.path} carries its own model code (auto_map); add --trust-remote-code if you trust it")
    if o.original and not o.eval_text:
        raise BadInput("--original needs --eval-text FILE (the text to measure perplexity on)")
    if o.eval_text and not Path(o.eval_text).is_file():
        raise BadInput(f"--eval-text {o.eval_text}: no such file")
    if o.original and not Path(o.original).is_dir():
        raise BadInput(f"--original {o.original}: no such directory")
    if o.tp is not None and (o.serve is None or o.tp < 1):
        raise BadInput("--tp N goes with --serve vllm (N >= 1): the tensor-parallel size the checkpoint must load at")
    if o.loader not in LOADERS:
        raise BadInput(f"--loader {o.loader}: use one of {', '.join(LOADERS)}")
    if o.loader != "ours":
        missing = [m for m in ("gptqmodel", "optimum") if importlib.util.find_spec(m) is None]
        if missing:
            raise BadInput(f"--loader {o.loader} needs the gptqmodel extra (pip install 'qwen-gptq[gptqmodel]'): "
                           f"{', '.join(missing)} not installed")
    return runtime.resolve_device(o.device)


def verify(o: VerifyOptions) -> dict:
    """Run every wanted check; the report as `--json` prints it."""
    t0 = time.perf_counter()
    path = Path(o.path)
    config, q = read_quant_config(path)
    state = State(o, path, config, q, _check_input(o, config))
    checks: dict[str, Check] = {}
    for spec in CHECKS:
        c = Check(spec.name)
        if not spec.wanted(o):
            if spec.unwanted is None:
                continue
            c.skip(spec.unwanted)
        elif any(checks[n].status != "pass" for n in spec.needs):
            c.skip(f"the {' and '.join(spec.needs)} check failed")
        else:
            spec.run(state, c)
        c.finish()
        checks[spec.name] = c
    return {
        "path": str(path),
        "ok": all(c.status != "fail" for c in checks.values()),
        "checks": [{"name": c.name, "status": c.status, "message": c.message, "problems": c.problems,
                    "figures": c.figures} for c in checks.values()],
        "reply": state.reply,
        "seconds": round(time.perf_counter() - t0, 2),
    }
