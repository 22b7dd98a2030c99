"""The sequential pipeline's shortcuts must not change what it computes."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from qwen_gptq import calib
from qwen_gptq.families import family_for
from qwen_gptq.gptq import Hessian, QuantConfig
from qwen_gptq.pipeline import Plan, quantize_model

from .conftest import CALIB, TINY


@pytest.mark.parametrize("blocks", [1, 2, 4])
def test_hessian_in_chunks_and_symmetric_blocks_equals_2_over_n_xtx(monkeypatch, blocks):
    g = torch.Generator().manual_seed(0)
    n = 1152
    monkeypatch.setattr(Hessian, "SPLITS", ((1024, blocks),))
    parts = [torch.randn(r, n, generator=g) for r in (100, 3000, 7, 1900, 64)]
    acc = Hessian(n, torch.device("cpu"))
    assert len(acc.blocks) == blocks and acc.blocks[-1].stop == n
    for x in parts:
        acc.add(x)
    X = torch.cat(parts).double()
    expected = (2 * X.T @ X / X.shape[0]).float()
    H = acc.finish()
    assert acc.count == X.shape[0]
    assert torch.equal(H, H.T)
    torch.testing.assert_close(H, expected, rtol=1e-4, atol=1e-2 * 2 / X.shape[0])  # 1e-2 on XᵀX itself


def _two_layer_tiny():
    model = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.bfloat16).eval()
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    return model


def test_memoized_outputs_give_the_same_result_with_one_product_per_linear(monkeypatch):
    tok = AutoTokenizer.from_pretrained(TINY)
    calibration = calib.calibration(calib.read_samples(CALIB)[:6], tok, 128, batch_size=1)
    family = family_for("qwen2")
    cfg = QuantConfig(bits=4, group_size=128)

    calls = {"n": 0}
    linear = torch.nn.functional.linear

    def counting(*args, **kwargs):
        calls["n"] += 1
        return linear(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "linear", counting)
    results = {}
    for budget in (0, 1 << 30):
        calls["n"] = 0
        plan = Plan(cfg, torch.device("cpu"), progress=False, memo_bytes=budget)
        out = quantize_model(_two_layer_tiny(), family, calibration, plan)
        results[budget] = (out.packed, calls["n"])

    (plain, n_plain), (memo, n_memo) = results[0], results[1 << 30]
    assert plain.keys() == memo.keys()
    for name in plain:
        for k in plain[name]:
            assert torch.equal(plain[name][k], memo[name][k]), (name, k)
    # 7 Linears per layer, each computed once per batch (the last layer's down_proj feeds
    # nothing); without memoized outputs the later passes recompute the earlier groups.
    batches = len(calibration.batches)
    assert n_memo == batches * (7 * 2 - 1)
    assert n_plain > n_memo


def test_results_packed_one_lead_at_a_time_or_stacked_are_the_same(monkeypatch):
    """The solved Linears are packed in stacks of one shape, up to PACK_BATCH_BYTES at a
    time: with a limit that flushes after every lead, the packed tensors and the stats are
    the very same (here q, k, v share a Hessian; k and v, and gate and up, share a shape)."""
    from qwen_gptq import pipeline

    tok = AutoTokenizer.from_pretrained(TINY)
    calibration = calib.calibration(calib.read_samples(CALIB)[:2], tok, 32, batch_size=2)
    family = family_for("qwen2")
    model = _two_layer_tiny()
    model.model.layers = model.model.layers[:1]
    runs = {}
    for limit in (1, pipeline.PACK_BATCH_BYTES):
        monkeypatch.setattr(pipeline, "PACK_BATCH_BYTES", limit)
        plan = Plan(QuantConfig(bits=4, group_size=128, mse=False), torch.device("cpu"), progress=False)
        runs[limit] = quantize_model(copy.deepcopy(model), family, calibration, plan)
    one, stacked = runs[1], runs[pipeline.PACK_BATCH_BYTES]
    assert one.packed.keys() == stacked.packed.keys() and len(one.packed) == 7
    for name in one.packed:
        for k in one.packed[name]:
            assert torch.equal(one.packed[name][k], stacked.packed[name][k]), (name, k)
    assert [(s.layer, s.module, s.loss) for s in one.stats] == [(s.layer, s.module, s.loss) for s in stacked.stats]


def test_staging_copies_every_byte_through_two_small_buffers():
    """The mover's pinned staging, run on CPU tensors with stand-in events and 16-byte
    buffers: every dtype and shape (0-dim, sizes not a multiple of the buffer) arrives
    byte for byte both ways, and a buffer is reused only after its last copy's event was
    waited on."""
    from qwen_gptq import runtime

    events = []

    class Event:
        def __init__(self):
            self.waited = False
            events.append(self)

        def record(self):
            pass

        def synchronize(self):
            self.waited = True

    staging = runtime.Staging(Event, stage_bytes=16, pinned=False)
    tensors = [torch.randn(5, 7).to(torch.bfloat16), torch.randint(-2**31, 2**31 - 1, (3, 11), dtype=torch.int32),
               torch.tensor(3.5), torch.rand(13) > 0.5, torch.randint(0, 255, (33,), dtype=torch.uint8),
               torch.randn(2, 3, 4)]
    for t in tensors:
        there = torch.empty_like(t)
        staging.to_device(t, there)
        back = torch.empty_like(t)
        staging.to_host(there, back)
        assert torch.equal(there, t) and torch.equal(back, t), t.dtype
    sizes = [t.numel() * t.element_size() for t in tensors]
    assert len(events) == 2 * sum(-(-n // 16) for n in sizes)
    assert all(e.waited for e in events[:-2])  # all but the last of each buffer: before the buffer's next use


def test_gpu_memo_budget_leaves_the_runs_own_peak():
    """On CUDA, memoized outputs get what the run does not need of the GPU (its
    --max-gpu-memory limit, else all of it): nothing before a layer has shown the run's
    peak, then 90 % of the limit less that peak, never below zero."""
    from qwen_gptq import runtime

    cuda, limit = torch.device("cuda"), 12 * 10**9
    assert runtime.memo_budget(cuda, None, limit) == 0
    assert runtime.memo_budget(cuda, 10 * 10**9, limit) == int(0.9 * limit) - 10 * 10**9
    assert runtime.memo_budget(cuda, 11 * 10**9, limit) == 0
    assert runtime.memo_budget(torch.device("cpu")) > 0  # CPU: a share of the host memory, as before


def test_out_of_gpu_memory_gives_up_the_memoized_outputs_first(monkeypatch):
    """The out-of-memory ladder on CUDA: memoized outputs are dropped first (and no later
    layer keeps any), then the activations move to the host, then cached memory goes, then
    one plain retry; then exit 1 naming the layer and, under --max-gpu-memory, that flag."""
    from qwen_gptq import runtime
    from qwen_gptq.errors import QuantizationFailed
    from qwen_gptq.families import layer_groups
    from qwen_gptq.pipeline import Outcome, _retrying, _Run
    from qwen_gptq.runtime import LayerForwards

    monkeypatch.setattr(runtime, "gpu_memory_figures", lambda device: "(figures)")
    family = family_for("qwen2")
    layer = _two_layer_tiny().model.layers[0]
    forwards = LayerForwards(layer, layer_groups(layer, family), 1 << 20)
    forwards._keep("self_attn.q_proj", ("self_attn.q_proj", 0), torch.zeros(256))  # an output memoized
    cuda = torch.device("cuda")
    plan = Plan(QuantConfig(), cuda, progress=False, gpu_memory=12 * 10**9)
    run = _Run(family, plan, [], cuda, None, None, Outcome(), forwards=forwards)

    def step():
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    with pytest.raises(QuantizationFailed) as failed:
        _retrying(run, 3, "testing", step)
    assert run.degraded == ["memoized outputs dropped", "activations moved to host memory", "cached GPU memory released"]
    assert not forwards._store and run.memo_budget() == 0 and run.store.type == "cpu"
    assert "layer 3" in str(failed.value) and "a larger --max-gpu-memory (now 12.0 GB)" in str(failed.value)
    forwards.remove()


def test_the_forwards_wrap_each_quantized_linear_and_every_module_holding_one():
    """The units whose outputs a layer's forwards may memoize: each quantized Linear and each
    module that holds one (not the router beside the experts), each with the Linears inside
    it; a unit is final once all of those are quantized. Checked against matching every
    module with every Linear, on a layer shaped like an MoE one."""
    from torch import nn

    from qwen_gptq.runtime import LayerForwards

    def block(**children):
        m = nn.Module()
        for k, v in children.items():
            m.add_module(k, v)
        return m

    lin = lambda: nn.Linear(4, 4)  # noqa: E731
    experts = block(**{str(e): block(gate_proj=lin(), up_proj=lin(), down_proj=lin()) for e in range(3)})
    layer = block(self_attn=block(q_proj=lin(), k_proj=lin(), v_proj=lin(), o_proj=lin()),
                  mlp=block(gate=lin(), experts=experts))
    groups = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
              [f"mlp.experts.{e}.{p}" for e in range(3) for p in ("gate_proj", "up_proj")],
              [f"mlp.experts.{e}.down_proj" for e in range(3)]]
    quantized = [n for g in groups for n in g]
    forwards = LayerForwards(layer, groups, 0)
    holders = {name for name, _ in layer.named_modules() if name and any(
        q == name or q.startswith(name + ".") for q in quantized)}
    assert forwards._inside == {u: [q for q in quantized if q == u or q.startswith(u + ".")] for u in holders}
    assert {name for name, m in layer.named_modules() if "forward" in m.__dict__} == holders  # wrapped
    forwards.quantized(groups[0])
    assert forwards._final == set(groups[0])
    forwards.quantized(groups[1])
    assert forwards._final == set(quantized[:4]) | {"self_attn"}
    forwards.quantized(groups[2])
    forwards.quantized(groups[3])
    assert forwards._final == holders
    forwards.remove()
    assert not any("forward" in m.__dict__ for m in layer.modules())


def test_a_modules_output_replaces_its_parts_within_the_memo_budget():
    """self_attn returns o_proj's very output: keeping it frees o_proj's entry, so it needs
    no budget beyond that entry's (counted twice, it was refused under a tight budget)."""
    from qwen_gptq.families import layer_groups
    from qwen_gptq.runtime import LayerForwards

    layer = _two_layer_tiny().model.layers[0]
    forwards = LayerForwards(layer, layer_groups(layer, family_for("qwen2")), 5000)
    y = torch.zeros(1000)  # 4000 bytes
    forwards._keep("self_attn.o_proj", ("self_attn.o_proj", 0), y)
    forwards._keep("self_attn", ("self_attn", 0), (y, None))
    assert list(forwards._store) == [("self_attn", 0)] and forwards.most == 4000
    forwards.remove()


def test_a_modules_outputs_are_memoized_for_every_batch_or_for_none():
    """Under a budget, a module whose outputs for all batches do not fit keeps none (a few
    batches of a large output save little and hold memory through the solves), while one
    whose outputs replace its parts' is admitted on what those free."""
    from qwen_gptq.families import layer_groups
    from qwen_gptq.runtime import LayerForwards

    layer = _two_layer_tiny().model.layers[0]
    forwards = LayerForwards(layer, layer_groups(layer, family_for("qwen2")), 5000, batches=4)
    for j in range(4):  # 4 × 1000 bytes: fits
        forwards.batch(j)
        forwards._keep("self_attn.o_proj", ("self_attn.o_proj", j), torch.zeros(250))
    forwards.batch(0)
    forwards._keep("mlp.gate_proj", ("mlp.gate_proj", 0), torch.zeros(250))  # 4000 more would pass 5000
    assert ("mlp.gate_proj", 0) not in forwards._store and forwards.held == 4000
    for j in range(4):  # each replaces o_proj's entry of its batch
        forwards.batch(j)
        forwards._keep("self_attn", ("self_attn", j), (torch.zeros(250), None))
    assert sorted(forwards._store) == [("self_attn", j) for j in range(4)] and forwards.held == 4000
    forwards.remove()


def test_the_timeline_stamps_every_layer_and_phase_and_is_gone_after_the_run(tmp_path, monkeypatch):
    """QWEN_GPTQ_TIMELINE=FILE: FILE.rank0.jsonl holds, for each of qwen2-tiny's 6 layers, the
    layer's edges around its groups' measuring and solving and the forward, and the garbage
    collector's full passes, every edge in time order and paired; after the run nothing
    stamps (no handler or callback left, no file without the variable); a FILE that cannot
    be written is exit 2, naming the variable, no output."""
    import gc
    import json

    from qwen_gptq import runtime

    from .conftest import cli

    args = ("--model_name_or_path", TINY, "--data_path", CALIB, "--num-samples", "8", "--max_len", "64",
            "--device", "cpu", "-q")
    monkeypatch.setenv(runtime.TIMELINE_ENV, str(tmp_path / "tl"))
    r = cli("quantize", *args, "--out_path", tmp_path / "a")
    assert r.returncode == 0, r.stderr[-2000:]
    events = [json.loads(x) for x in (tmp_path / "tl.rank0.jsonl").read_text().splitlines()]
    assert [e["t"] for e in events] == sorted(e["t"] for e in events)
    open_ = []
    for e in events:  # properly nested: each "out" closes the latest "in"
        if e["edge"] == "in":
            open_.append(e["phase"])
        else:
            assert open_.pop() == e["phase"], e
    assert not open_
    tops = [e["phase"] for e in events if e["phase"].startswith("layer ") and e["edge"] == "in"]
    assert tops == [f"layer {i}" for i in range(6)]
    names = {e["phase"] for e in events}
    assert {"measure self_attn.q_proj", "solve self_attn.q_proj", "solve mlp.down_proj", "forward"} <= names
    assert "gc" in names  # (the full pass before the layers: runtime.freeze_heap)
    assert not runtime.TIMELINE.handlers and runtime._stamp_full_collection not in gc.callbacks
    monkeypatch.delenv(runtime.TIMELINE_ENV)
    r = cli("quantize", *args, "--out_path", tmp_path / "b")
    assert r.returncode == 0 and sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "tl.rank0.jsonl"]
    monkeypatch.setenv(runtime.TIMELINE_ENV, str(tmp_path / "missing" / "tl"))  # a directory that is not there
    r = cli("quantize", *args, "--out_path", tmp_path / "c")
    assert r.returncode == 2 and "QWEN_GPTQ_TIMELINE" in r.stderr and not (tmp_path / "c").exists(), r.stderr[-2000:]


def test_the_heap_is_frozen_while_layers_are_quantized_and_thawed_after(monkeypatch):
    """No full garbage-collection pass walks the model and the calibration data between
    layers (one stalled a Qwen3-30B-A3B layer 0.2 s, on every process): while a layer is
    quantized the objects alive before the loop, the model's layers among them, are frozen
    (gc.freeze); afterwards nothing is, also when quantizing fails."""
    import gc

    from qwen_gptq import pipeline

    tok = AutoTokenizer.from_pretrained(TINY)
    calibration = calib.calibration(calib.read_samples(CALIB)[:2], tok, 64, batch_size=1)
    model = _two_layer_tiny()
    seen = []
    quantize_layer = pipeline._quantize_layer

    def watched(run, i, layer, next_layer):
        tracked = {id(o) for o in gc.get_objects()}  # (the generations the collector walks)
        seen.append((gc.get_freeze_count(), id(layer) in tracked))
        quantize_layer(run, i, layer, next_layer)
        if i == 1 and fail:
            raise RuntimeError("stop")

    monkeypatch.setattr(pipeline, "_quantize_layer", watched)
    plan = Plan(QuantConfig(bits=4, group_size=128), torch.device("cpu"), progress=False)
    fail = False
    quantize_model(model, family_for("qwen2"), calibration, plan)
    assert len(seen) == 2 and all(count > 1000 and not walked for count, walked in seen), seen
    assert gc.get_freeze_count() == 0
    fail = True
    with pytest.raises(RuntimeError, match="stop"):
        quantize_model(_two_layer_tiny(), family_for("qwen2"), calibration, plan)
    assert gc.get_freeze_count() == 0
