"""Packing round-trips, checked against an independent bit-by-bit reference."""

import pytest
import torch

from qwen_gptq.gptq import QuantConfig, gptq
from qwen_gptq.gptq_v1 import MIN_ZERO, dequantize_linear, pack, pack_linear, packing_problem, tensor_specs, unpack


def reference_unpack(words: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """Read values out of the int32 words one bit at a time (LSB first, column by column).

    Deliberately naive and written without the implementation's shifts/masks: the
    packed column is a stream of 32-bit little-endian-bit words, value k occupies
    stream bits [k*bits, (k+1)*bits).
    """
    out = torch.zeros(rows, words.shape[1], dtype=torch.int64)
    for c in range(words.shape[1]):
        stream = []
        for w in words[:, c].tolist():
            w &= 0xFFFFFFFF
            stream.extend((w >> b) & 1 for b in range(32))
        for k in range(rows):
            out[k, c] = sum(stream[k * bits + b] << b for b in range(bits))
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_matches_reference(bits):
    g = torch.Generator().manual_seed(bits)
    rows, cols = 64, 5
    values = torch.randint(0, 2**bits, (rows, cols), generator=g)
    values[0, 0] = 2**bits - 1  # the sign bit of the first word gets set for 2/4/8 bits
    words = pack(values, bits)
    assert words.dtype == torch.int32
    assert words.shape == (rows * bits // 32, cols)
    assert torch.equal(reference_unpack(words, bits, rows), values)
    assert torch.equal(unpack(words, bits, rows).long(), values)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_stacked_linears_pack_as_each_alone(bits):
    """The pipeline packs a stack of same-shaped Linears (an MoE layer's experts) at once:
    each slice of the result is what packing that Linear alone gives, bit for bit."""
    g = torch.Generator().manual_seed(10 + bits)
    B, out, cols, groups = 3, 64, 96, 3
    Q = torch.randint(0, 2**bits, (B, out, cols), generator=g, dtype=torch.uint8)
    scale = torch.rand(B, groups, out, generator=g)
    zero = torch.randint(0, 2**bits, (B, groups, out), generator=g).float()
    g_idx = torch.arange(cols).div(32, rounding_mode="floor").expand(B, cols)
    stacked = pack_linear(Q, scale, zero, g_idx, bits)
    for b in range(B):
        alone = pack_linear(Q[b], scale[b], zero[b], g_idx[b], bits)
        assert alone.keys() == stacked.keys()
        for k in alone:
            assert torch.equal(stacked[k][b], alone[k]), k
        assert torch.equal(reference_unpack(alone["qweight"], bits, cols), Q[b].T.long())


def test_known_word_layout():
    # 4-bit: eight values per word, value j at bits 4j..4j+3.
    values = torch.arange(8).view(8, 1)
    assert pack(values, 4).item() == 0x76543210
    # 8-bit: 0xFF in the top byte sets the sign bit.
    values = torch.tensor([[1], [2], [3], [255]])
    assert pack(values, 8).item() == (0xFF030201 - 2**32)


@pytest.mark.parametrize("bits,group_size,desc_act", [(4, 32, False), (3, 32, False), (8, -1, False), (4, 32, True)])
def test_linear_round_trip(bits, group_size, desc_act):
    torch.manual_seed(0)
    out_f, in_f = 64, 128
    W = torch.randn(out_f, in_f)
    X = torch.randn(512, in_f)
    H = 2 * X.T @ X / X.shape[0]
    res = gptq(W, H, QuantConfig(bits=bits, group_size=group_size, desc_act=desc_act, min_zero=MIN_ZERO))
    t = pack_linear(res.Q, res.scale, res.zero, res.g_idx, bits)
    n_groups = 1 if group_size == -1 else in_f // group_size
    for name, spec in tensor_specs(in_f, out_f, bits, group_size).items():  # what the writer, loader and verify expect
        assert t[name].shape == spec.shape and t[name].dtype == spec.dtype, name
    assert t["qweight"].shape == (in_f * bits // 32, out_f) and t["qweight"].dtype == torch.int32
    assert t["qzeros"].shape == (n_groups, out_f * bits // 32) and t["qzeros"].dtype == torch.int32
    assert t["scales"].shape == (n_groups, out_f) and t["scales"].dtype == torch.float16
    assert t["g_idx"].shape == (in_f,) and t["g_idx"].dtype == torch.int32

    # Independent dequantization: bit-level unpack, zeros stored minus one.
    q = reference_unpack(t["qweight"], bits, in_f)  # [in, out]
    z = reference_unpack(t["qzeros"].T.contiguous(), bits, out_f).T + 1  # [groups, out]
    g = t["g_idx"].long()
    W_ref = (t["scales"].float()[g] * (q.float() - z.float()[g])).T
    assert torch.allclose(W_ref, res.weight, atol=1e-6)
    assert torch.allclose(dequantize_linear(**t, bits=bits), res.weight, atol=1e-6)
    # Symmetric: the stored zero is 2**(bits-1) - 1.
    assert (z == 2 ** (bits - 1)).all()
    if desc_act:
        assert not torch.equal(g, torch.arange(in_f) // group_size)
    else:
        assert torch.equal(g, torch.arange(in_f) // (in_f if group_size == -1 else group_size))


def test_packable_shapes_are_the_formats_rule():
    cfg = QuantConfig(bits=3, group_size=128)
    assert packing_problem("x", 256, 96, cfg) is None
    assert "multiples of 32" in packing_problem("mlp.down_proj", 256, 100, cfg)
    assert "not a multiple of --group-size 128" in packing_problem("x", 320, 64, QuantConfig(bits=4, group_size=128))
    assert packing_problem("x", 320, 64, QuantConfig(bits=4, group_size=-1)) is None
