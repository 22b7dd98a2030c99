"""Shared test helpers: the shipped example, the CLI in and out of process, tiny models."""

import contextlib
import hashlib
import io
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

# The bits these tests compare (packed digests, two processes against one) are those of
# PyTorch's AVX2 CPU kernels, which the CI machines ran when they were recorded. On a CPU
# with AVX-512 PyTorch picks other kernels, whose float32 sums round differently, and the
# codes drift (qwen2-tiny w4g128: another digest; two processes 0.2 perplexity from one).
# Pinned here, before torch loads, for this process and the CLI processes it starts.
if platform.machine().lower() in ("x86_64", "amd64"):
    os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# The shipped example model (a copy of shared/models/qwen2-tiny) keeps the tests
# runnable without ../shared; calibration and eval data come from examples/ too.
TINY = str(ROOT / "examples" / "qwen2-tiny")
CALIB = str(ROOT / "examples" / "calib.json")
EVAL_TEXT = str(ROOT / "examples" / "eval.txt")
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]
# The packed tensors of qwen2-tiny at fixed settings, as digests (see packed_digest).
DIGESTS = ROOT / "tests" / "data" / "packed_digests.json"


def cli_subprocess(*args):
    """Run the real command line in a subprocess (exit codes and stdout/stderr as a user sees them)."""
    return subprocess.run([sys.executable, "-m", "qwen_gptq", *map(str, args)], capture_output=True, text=True)


def cli(*args):
    """Run the command line in this process (no interpreter start-up per call): the same
    main() the console script runs, with its stdout, stderr and exit code captured."""
    from qwen_gptq.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse's own errors exit 2
            code = e.code if isinstance(e.code, int) else 2
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def quantize_cli(model, out, *extra):
    """`quantize --json -q` in process; the report."""
    r = cli("quantize", "--model_name_or_path", model, "--data_path", CALIB, "--out_path", out, "--json", "-q", *extra)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


def verify_cli(out, *extra):
    """`verify --json -q` in process: (exit code, report or None, stderr)."""
    r = cli("verify", out, "--json", "-q", "--max-new-tokens", "8", *extra)
    report = json.loads(r.stdout) if r.stdout.strip() else None
    return r.returncode, report, r.stderr


def make_tiny(directory, model_type, tied=False, **extra):
    """A small random-weight model of `model_type`, with qwen2-tiny's tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=8192, tie_word_embeddings=tied, max_position_embeddings=512,
              bos_token_id=0, eos_token_id=2, pad_token_id=0)
    if model_type in ("qwen3", "qwen3_moe"):
        kw["head_dim"] = 32
    kw.update(extra)
    config = AutoConfig.for_model(model_type, **kw)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(directory)
    for f in TOKENIZER_FILES:
        shutil.copyfile(ROOT / "examples" / "qwen2-tiny" / f, directory / f)
    return directory


def all_tensors(directory) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint's safetensors files, by name, whatever the sharding."""
    out = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            out.update({k: sf.get_tensor(k) for k in sf.keys()})
    return out


def packed_digest(directory) -> str:
    """sha256 over every packed tensor (qweight/qzeros/scales/g_idx) of a checkpoint:
    name, dtype, shape and bytes, in name order, whatever the sharding."""
    tensors = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                if k.rsplit(".", 1)[-1] in ("qweight", "qzeros", "scales", "g_idx"):
                    tensors[k] = sf.get_tensor(k)
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].contiguous()
        h.update(f"{k} {t.dtype} {tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def assert_packed_digest(directory, name: str) -> None:
    """The packed tensors are bit-identical to the recorded ones for these settings.

    The record (tests/data/packed_digests.json) was made on the CI machine's kind (2-core
    x86 CPU, torch 2.13.0+cpu). A change meant to alter the codes (a new default, a
    better solver) records new digests with QWEN_GPTQ_RECORD_DIGESTS=1 and says so in
    its commit; anything else that moves them is a regression.
    """
    import os

    digest = packed_digest(directory)
    record = json.loads(DIGESTS.read_text())
    if os.environ.get("QWEN_GPTQ_RECORD_DIGESTS") == "1":
        record[name] = digest
        DIGESTS.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    assert digest == record[name], f"{name}: packed tensors changed ({digest} != recorded {record[name]})"


@pytest.fixture(scope="session")
def w4(tmp_path_factory):
    """A w4g128 checkpoint through the CLI, sharded (--max-shard-size 20MB: the work directory's
    files linked as the shards, as a large model's are) to exercise the index."""
    out = tmp_path_factory.mktemp("w4") / "qwen2-tiny-w4"
    r = cli_subprocess("quantize", "--model_name_or_path", TINY, "--data_path", CALIB, "--out_path", str(out),
                       "--bits", "4", "--group-size", "128", "--max_len", "512", "--num-samples", "128",
                       "--max-shard-size", "20MB", "--json")
    assert r.returncode == 0, r.stderr
    return out, json.loads(r.stdout)


@pytest.fixture(scope="session")
def w4_ppl(w4):
    """The perplexity of the w4 checkpoint (the README's protocol)."""
    from qwen_gptq.evaluate import eval_windows, perplexity
    from qwen_gptq.hf import load_quantized

    model, tok = load_quantized(w4[0])
    return perplexity(model, eval_windows(tok, open(EVAL_TEXT, encoding="utf-8").read(), 64, 512))
