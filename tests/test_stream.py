"""Streaming: each decoder layer read from the checkpoint when its turn comes.

The oracle is transformers' own loading (hf.load_model + hf.prepare): every tensor a
streamed model is given must equal it, for every family. The output of a streamed run
must be the output of a run that loads the whole model, byte for byte; and host memory
must not grow with the model's depth.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qwen_gptq import checkpoint, hf, stream
from qwen_gptq.families import decoder_layers, family_for

from .conftest import CALIB, TINY, TOKENIZER_FILES, cli, make_tiny
from .fixtures.make_families import FIXTURES, make_fixture
from .fixtures.make_qwen1 import make_qwen1

MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=128, shared_expert_intermediate_size=128)


def _streamed_equals_loaded(src: Path, trust_remote_code: bool = False) -> None:
    model_type = json.loads((src / "config.json").read_text())["model_type"]
    family = family_for(model_type)
    streamed, _ = stream.open_streamed(src, family, trust_remote_code)
    for layer in decoder_layers(streamed.model, family):
        streamed.fill(layer)
    ours = streamed.model.state_dict()
    loaded, _ = hf.load_model(src, "auto", trust_remote_code)
    hf.prepare(loaded, family)
    theirs = {k: v for k, v in loaded.state_dict().items() if not k.startswith(family.passthrough)}
    assert set(theirs) <= set(ours), set(theirs) - set(ours)
    for k, v in theirs.items():
        assert ours[k].dtype == v.dtype and torch.equal(ours[k], v), k
    # Released layers give their memory back.
    for layer in decoder_layers(streamed.model, family):
        streamed.release(layer)
        assert all(p.is_meta for p in layer.parameters())


def test_a_streamed_model_equals_transformers_loading_it():
    _streamed_equals_loaded(Path(TINY))


@pytest.mark.slow
@pytest.mark.parametrize("model_type", sorted(FIXTURES) + ["qwen2_moe", "qwen3_moe", "qwen3", "qwen", "tied"])
def test_every_family_streams_as_transformers_loads_it(tmp_path, model_type):
    if model_type in FIXTURES:
        src = make_fixture(tmp_path / "m", model_type)
    elif model_type == "qwen":
        src = make_qwen1(Path(TINY), tmp_path / "m")
    else:
        (tmp_path / "m").mkdir()
        kw = MOE if "moe" in model_type else {"head_dim": 32} if model_type == "qwen3" else {}
        src = make_tiny(tmp_path / "m", "qwen2" if model_type == "tied" else model_type, tied=model_type == "tied", **kw)
    _streamed_equals_loaded(src, trust_remote_code=model_type == "qwen")


def _fused_experts(tmp_path: Path, transposed: bool, hidden: int, inter: int) -> Path:
    """A qwen3_moe checkpoint whose experts are stored fused (optionally transposed, as
    Qwen3-VL-MoE's are), from a per-expert one."""
    (tmp_path / "per-expert").mkdir()
    src = make_tiny(tmp_path / "per-expert", "qwen3_moe", hidden_size=hidden, **{**MOE, "moe_intermediate_size": inter})
    with safe_open(str(src / "model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    fused = {}
    for k in list(tensors):
        if ".experts.0.gate_proj." in k:
            p = k.split(".experts.")[0] + ".experts"
            gate_up = torch.stack([torch.cat([tensors[f"{p}.{e}.gate_proj.weight"], tensors[f"{p}.{e}.up_proj.weight"]])
                                   for e in range(4)])
            down = torch.stack([tensors[f"{p}.{e}.down_proj.weight"] for e in range(4)])
            fused[f"{p}.gate_up_proj"] = gate_up.transpose(1, 2).contiguous() if transposed else gate_up
            fused[f"{p}.down_proj"] = down.transpose(1, 2).contiguous() if transposed else down
    tensors = {k: v for k, v in tensors.items() if ".experts." not in k} | fused
    dst = tmp_path / "fused"
    shutil.copytree(src, dst)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return src, dst


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("hidden,inter", [(128, 64), (128, 128)])  # 2I == H, I == H: square either way
def test_fused_expert_tensors_are_read_per_expert(tmp_path, transposed, hidden, inter):
    per_expert, fused = _fused_experts(tmp_path, transposed, hidden, inter)
    family = family_for("qwen3_moe")
    a, _ = stream.open_streamed(per_expert, family, False)
    b, _ = stream.open_streamed(fused, family, False)
    for x, y in zip(decoder_layers(a.model, family), decoder_layers(b.model, family)):
        a.fill(x)
        b.fill(y)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def _with_unknown_tensor(tmp_path: Path) -> Path:
    src = tmp_path / "m"
    shutil.copytree(TINY, src)
    save_file({"model.extra.weight": torch.zeros(4)}, str(src / "extra.safetensors"), metadata={"format": "pt"})
    index = json.loads((src / checkpoint.INDEX_NAME).read_text())
    index["weight_map"]["model.extra.weight"] = "extra.safetensors"
    (src / checkpoint.INDEX_NAME).write_text(json.dumps(index))
    return src


def test_a_tensor_streaming_cannot_place_is_named(tmp_path):
    with pytest.raises(stream.NotStreamable, match="model.extra.weight"):
        stream.open_streamed(_with_unknown_tensor(tmp_path), family_for("qwen2"), False)


@pytest.mark.slow
def test_a_checkpoint_streaming_cannot_map_is_loaded_whole(tmp_path):
    """An unknown tensor in the checkpoint: a warning, the whole model loaded, an output."""
    src = _with_unknown_tensor(tmp_path)
    r = cli("quantize", "--model_name_or_path", src, "--data_path", CALIB, "--out_path", tmp_path / "q",
            "--num-samples", "4", "--max_len", "32", "--device", "cpu", "-q")
    assert r.returncode == 0 and "loading the whole model" in r.stderr, r.stderr[-2000:]
    assert (tmp_path / "q" / "model.safetensors").is_file()


def test_tensor_files_round_trip_through_safetensors(tmp_path):
    """Our one-tensor-at-a-time writer and reader against the safetensors library."""
    g = torch.Generator().manual_seed(0)
    tensors = {"b": torch.randn(3, 5, generator=g).to(torch.bfloat16), "a": torch.randint(0, 9, (7,), dtype=torch.int32),
               "c": torch.tensor(True), "d": torch.randn(2, 2, 2, generator=g, dtype=torch.float64),
               "e": torch.randint(0, 255, (3,), dtype=torch.uint8)}
    path = tmp_path / "t.safetensors"
    checkpoint.write_safetensors(path, {k: checkpoint.Stored.of(v) for k, v in tensors.items()}, {"k": "v"})
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"k": "v"}
        assert set(f.keys()) == set(tensors)
        for k, v in tensors.items():
            assert f.get_tensor(k).dtype == v.dtype and torch.equal(f.get_tensor(k), v), k
    theirs = tmp_path / "s.safetensors"
    save_file({"x": torch.arange(24, dtype=torch.float16).view(2, 3, 4)}, str(theirs))
    tf = checkpoint.TensorFile(theirs)
    assert torch.equal(tf.read("x"), torch.arange(24, dtype=torch.float16).view(2, 3, 4))
    assert torch.equal(tf.read("x", 1), torch.arange(12, 24, dtype=torch.float16).view(3, 4))


@pytest.mark.slow
def test_streamed_and_whole_model_runs_write_the_same_bytes(tmp_path):
    args = ("--data_path", CALIB, "--num-samples", "8", "--max_len", "64", "--device", "cpu", "-q")
    for name, extra in (("streamed", ()), ("whole", ("--no-stream",))):
        r = cli("quantize", "--model_name_or_path", TINY, "--out_path", tmp_path / name, *args, *extra)
        assert r.returncode == 0, r.stderr[-2000:]
    a, b = (tmp_path / name / "model.safetensors" for name in ("streamed", "whole"))
    assert a.read_bytes() == b.read_bytes()


def _wide_qwen2(directory: Path, layers: int) -> Path:
    """A random Qwen2 with Qwen2.5-1.5B's layer shape (hidden 1536, intermediate 8960),
    written one tensor at a time (the test's own memory stays flat too)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=layers,
                                  num_attention_heads=12, num_key_value_heads=2, vocab_size=8192,
                                  max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=0,
                                  eos_token_id=2, pad_token_id=0, dtype="bfloat16")
    directory.mkdir(parents=True)
    config.save_pretrained(directory)
    with init_empty_weights():
        shapes = {k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    shapes.pop("lm_head.weight")

    drawn: dict[tuple, torch.Tensor] = {}  # one random tensor per shape, shared by the layers (values don't matter)

    def random(i: int, shape: tuple) -> torch.Tensor:
        if len(shape) == 1 and "norm" in names[i]:
            return torch.ones(shape, dtype=torch.bfloat16)
        if shape not in drawn:
            drawn[shape] = (torch.randn(shape, generator=torch.Generator().manual_seed(i)) * 0.02).to(torch.bfloat16)
        return drawn[shape]

    names = list(shapes)
    stored = {k: checkpoint.Stored(torch.bfloat16, s, lambda i=i, s=s: random(i, s)) for i, (k, s) in
              enumerate(shapes.items())}
    checkpoint.write_safetensors(directory / "model.safetensors", stored, {"format": "pt"})
    for f in TOKENIZER_FILES:
        shutil.copyfile(Path(TINY) / f, directory / f)
    return directory


@pytest.mark.slow
def test_host_memory_does_not_grow_with_depth(tmp_path):
    """Qwen2.5-1.5B's layer shape cut to 4 and to 16 layers: the quantize process's peak RSS
    within 0.3 GB (the 12 layers more are 1.1 GB of bf16 weights, 2.3 GB packed and unpacked).

    Round-to-nearest (--method rtn) stands in for the GPTQ solve, whose Hessian and inverse
    live and die within one Linear's solve but cost 15 s per layer at this width on two
    cores; the weights' path (read, quantize, pack, work directory, output) is the same."""
    runs = {}
    for n in (4, 16):  # both at once: each process's own peak (VmHWM) is what is compared
        src = _wide_qwen2(tmp_path / f"m{n}", n)
        runs[n] = subprocess.Popen(
            [sys.executable, "-m", "qwen_gptq", "quantize", "--model_name_or_path", str(src), "--data_path", CALIB,
             "--out_path", str(tmp_path / f"q{n}"), "--num-samples", "2", "--max_len", "32", "--device", "cpu",
             "--method", "rtn", "--no-mse", "--json", "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peaks = {}
    for n, p in runs.items():
        stdout, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, stderr[-2000:]
        peaks[n] = json.loads(stdout)["peak_host_bytes"]
    assert abs(peaks[16] - peaks[4]) < 0.3e9, peaks
