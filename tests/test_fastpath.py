"""The solver's fast paths against the PyTorch column loop: the Triton block kernel.

The kernel runs on CUDA in production; here it runs in Triton's CPU interpreter
(TRITON_INTERPRET=1, set before Triton is imported, hence the subprocess) and must give
the very same codes, scales, zero points and losses as the loop.
"""

import json
import subprocess
import sys
import textwrap

import pytest

from .conftest import ROOT

SCRIPT = textwrap.dedent("""
    import json, os
    import torch
    from qwen_gptq import gptq as G, fastpath

    fastpath.ROW_TILE_OVERRIDE = 32  # (the interpreter runs programs one by one: fewer, larger ones are quicker)
    calls = {"n": 0}
    block = fastpath.triton_block
    def counted(*a, **k):
        calls["n"] += 1
        return block(*a, **k)
    fastpath.triton_block = counted

    out = []
    g = torch.Generator().manual_seed(0)
    for rows, cols, bits, gs, sym, mse, clip, gar in [
            (40, 128, 4, 128, True, True, "uniform", False), (24, 256, 3, 32, True, False, "uniform", False),
            (16, 256, 4, 256, False, True, "activation", False), (20, 256, 8, -1, True, False, "uniform", False),
            (8, 128, 2, 64, False, False, "uniform", False), (8, 256, 3, 64, False, True, "loss", True)]:
        W = torch.randn(rows, cols, generator=g)
        X = torch.randn(2 * cols, cols, generator=g) * torch.linspace(0.1, 3, cols)[torch.randperm(cols, generator=g)]
        H = 2 * X.T @ X / X.shape[0]
        cfg = G.QuantConfig(bits=bits, group_size=gs, sym=sym, mse=mse, min_zero=1, clip_weight=clip,
                            act_group_aware=gar)
        before = calls["n"]
        a = G.gptq(W, H, cfg)
        after = calls["n"]
        os.environ["QWEN_GPTQ_TRITON"] = "0"
        b = G.gptq(W, H, cfg)
        os.environ["QWEN_GPTQ_TRITON"] = "1"
        out.append({"case": [rows, cols, bits, gs, sym, mse, clip, gar], "kernel_used": after > before,
                    "loop_used_kernel": calls["n"] > after,
                    "codes": torch.equal(a.Q, b.Q), "scales": torch.equal(a.scale, b.scale), "zeros": torch.equal(a.zero, b.zero),
                    "loss_rel": abs(a.losses.sum().item() / b.losses.sum().item() - 1)})

    # A batch (MoE experts): one launch per block for all problems, each problem's own bits.
    cfg_b = G.QuantConfig(bits=4, group_size=64, clip_weight="loss")
    Ws = torch.randn(3, 8, 128, generator=g)
    Xs = torch.randn(3, 256, 128, generator=g) * torch.linspace(0.1, 3, 128)
    Hs = 2 * Xs.mT @ Xs / 256
    before = calls["n"]
    batch = G.gptq_batch(Ws, Hs, cfg_b)
    launches = calls["n"] - before
    os.environ["QWEN_GPTQ_TRITON"] = "0"
    alone = [G.gptq(Ws[k], Hs[k], cfg_b) for k in range(3)]
    os.environ["QWEN_GPTQ_TRITON"] = "1"
    batched = {"launches": launches, "equal": all(torch.equal(a.Q, b.Q) and torch.equal(a.scale, b.scale)
                                                  for a, b in zip(batch, alone)),
               "loss_rel": max(abs(a.losses.sum().item() / b.losses.sum().item() - 1) for a, b in zip(batch, alone))}

    # Rows per program (fastpath.row_tile, 8 on GPUs, against the 32 above): the same bits.
    fastpath.ROW_TILE_OVERRIDE = None
    W40 = torch.randn(40, 128, generator=g)
    X40 = torch.randn(256, 128, generator=g)
    H40 = 2 * X40.T @ X40 / 256
    cfg_t = G.QuantConfig(bits=4, group_size=64)
    small = G.gptq(W40, H40, cfg_t)
    fastpath.ROW_TILE_OVERRIDE = 32
    large = G.gptq(W40, H40, cfg_t)
    tiles = {"equal": torch.equal(small.Q, large.Q) and torch.equal(small.scale, large.scale)
             and torch.equal(small.losses, large.losses), "default": fastpath.row_tile(128)}

    # A kernel that fails (a GPU Triton cannot build for) hands over to the loop, once.
    def broken(*a, **k):
        raise RuntimeError("no kernel for this GPU")
    fastpath.triton_block = broken
    fallback = G.gptq(W, H, cfg)
    fell_back = {"equal": torch.equal(fallback.Q, b.Q), "disabled": not fastpath.triton_available(W)}
    print(json.dumps({"cases": out, "batched": batched, "tiles": tiles, "fallback": fell_back}))
""")


@pytest.mark.slow  # (19 s of the interpreter: in CI's full run, not in the quick set run while working)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Triton ships for Linux only")
def test_triton_kernel_matches_the_pytorch_loop():
    import os

    env = {**os.environ, "TRITON_INTERPRET": "1", "QWEN_GPTQ_TRITON": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    for case in result["cases"]:
        assert case["kernel_used"] and not case["loop_used_kernel"], case
        assert case["codes"] and case["scales"] and case["zeros"], case
        assert case["loss_rel"] < 1e-6, case
    batched = result["batched"]
    assert batched["launches"] == 1 and batched["equal"] and batched["loss_rel"] < 1e-6, batched  # 128 columns: one block
    assert result["tiles"] == {"equal": True, "default": 8}, result["tiles"]  # 8 rows a program against 32
    assert result["fallback"] == {"equal": True, "disabled": True}
    assert "using the PyTorch loop instead" in r.stderr
