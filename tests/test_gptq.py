"""The solver on synthetic problems: it must beat round-to-nearest where the paper says it does."""

import pytest
import torch

from qwen_gptq.gptq import MAX_DAMP, CholeskyFailed, QuantConfig, find_params, gptq, inverse_hessian, rtn
from qwen_gptq.gptq_v1 import MIN_ZERO


def _problem(seed=0, out_f=96, in_f=256, n=2048):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g)
    # Correlated, anisotropic inputs: where GPTQ's error compensation pays off.
    A = torch.randn(in_f, in_f, generator=g) / in_f**0.5
    X = torch.randn(n, in_f, generator=g) @ A * torch.linspace(0.1, 3, in_f)
    H = 2 * X.T @ X / n
    return W, X, H


def _output_error(W, Wq, X):
    return ((X @ (W - Wq).T) ** 2).mean().item()


def test_gptq_beats_rtn_on_output_error():
    W, X, H = _problem()
    for bits in (3, 4):
        cfg = QuantConfig(bits=bits, group_size=64)
        e_gptq = _output_error(W, gptq(W, H, cfg).weight, X)
        e_rtn = _output_error(W, rtn(W, cfg).weight, X)
        assert e_gptq < 0.8 * e_rtn, (bits, e_gptq, e_rtn)


def test_desc_act_and_static_groups_are_valid_quantizations():
    W, X, H = _problem(1)
    for cfg in (QuantConfig(desc_act=True, group_size=64), QuantConfig(desc_act=True, static_groups=True, group_size=64)):
        res = gptq(W, H, cfg)
        # Every weight is exactly scale * (q - zero) of its column's group.
        g = res.g_idx.long()
        rebuilt = res.scale[g].T * (res.Q.float() - res.zero[g].T.float())
        assert torch.equal(rebuilt, res.weight)
        assert res.Q.max() <= cfg.maxq
        assert _output_error(W, res.weight, X) < _output_error(W, rtn(W, cfg).weight, X)
        if cfg.static_groups:
            assert torch.equal(g, torch.arange(W.shape[1]) // 64)


def test_asym_zero_point_is_storable_in_v1_format():
    # An all-positive group would want zero point 0, which v1 (zero - 1) cannot store.
    x = torch.rand(4, 32) + 0.5
    scale, zero = find_params(x, QuantConfig(bits=4, sym=False, min_zero=MIN_ZERO, mse=False))
    assert (zero >= 1).all() and (zero <= 15).all()
    # Without the format's constraint the same range would take zero point 0.
    assert (find_params(x, QuantConfig(bits=4, sym=False, mse=False))[1] == 0).all()
    q = torch.clamp(torch.round(x / scale[:, None]) + zero[:, None], 0, 15)
    err = (scale[:, None] * (q - zero[:, None]) - x).abs().max()
    assert err <= scale.max() / 2 + 1e-6


def test_failed_cholesky_raises_damp_and_logs(caplog):
    # A rank-deficient Hessian with a negative direction: plain damp 0.01 is not enough.
    v = torch.randn(16, 1)
    H = v @ v.T - 0.05 * torch.eye(16) * (v.T @ v).item() / 16
    with caplog.at_level("WARNING", logger="qwen_gptq"):
        Hinv, damp = inverse_hessian(H, 0.01)
    assert damp > 0.01
    assert torch.isfinite(Hinv).all()
    assert "Cholesky" in caplog.text and "damp" in caplog.text


def test_cholesky_gives_up_at_the_damp_ceiling_and_says_so(caplog):
    H = -torch.eye(8)  # negative definite: no dampening up to MAX_DAMP rescues it
    with caplog.at_level("WARNING", logger="qwen_gptq"), pytest.raises(CholeskyFailed) as e:
        inverse_hessian(H, 0.01)
    assert f"damp_percent={MAX_DAMP:g}" in str(e.value)
    retries = [r.getMessage() for r in caplog.records]
    assert retries and retries[-1].endswith(f"retrying with {MAX_DAMP:g} (more or longer calibration samples, "
                                            "or a larger --damp-percent, avoid this)")
    assert not any(f"retrying with {2 * MAX_DAMP:g}" in m for m in retries)  # never announces a try it won't make


def test_dead_inputs_and_scales_are_finite():
    W, X, H = _problem(2)
    H[:, 5] = 0
    H[5, :] = 0
    res = gptq(W, H, QuantConfig())
    assert torch.isfinite(res.weight).all() and (res.scale > 0).all()
    assert (res.weight[:, 5] == 0).all()


def test_dead_inputs_do_not_change_the_dampening():
    """Zero-padded inputs (--pad-for-tp) must not move the result for the live columns:
    dead columns do not count in the mean diagonal the dampening is a fraction of."""
    W, X, H = _problem(3, in_f=256)
    cfg = QuantConfig(group_size=128)
    plain = gptq(W, H, cfg)
    Hp = torch.zeros(384, 384)
    Hp[:256, :256] = H
    Wp = torch.cat([W, torch.zeros(W.shape[0], 128)], dim=1)
    padded = gptq(Wp, Hp, cfg)
    assert padded.damp == plain.damp
    assert (padded.Q[:, :256] == plain.Q).float().mean() > 0.999
    torch.testing.assert_close(padded.losses, plain.losses, rtol=1e-4, atol=1e-6)
