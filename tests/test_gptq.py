"""The solver on synthetic problems: it must beat round-to-nearest where the paper says it does."""

import pytest
import torch

from qwen_gptq import gptq as solver
from qwen_gptq.gptq import (
    MAX_DAMP,
    CholeskyFailed,
    QuantConfig,
    Shared,
    dequantized,
    find_params,
    gptq,
    gptq_batch,
    inverse_hessians,
    rtn,
    rtn_batch,
    upper_cholesky_of_inverse,
)
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


def test_blocked_inverse_and_its_shares_give_the_cholesky_of_the_inverse(monkeypatch):
    """Hinv from K⁻¹ solved in column blocks (as for a large Hessian) is the upper Cholesky
    factor of H⁻¹ that the reference's three steps give; split over three processes, each
    fills only its own blocks (no entry filled twice, none missing) and their sum is it; a
    Hessian below SHARED_INVERSE_FROM is solved whole by each process, nothing combined."""
    monkeypatch.setattr(solver, "INVERSE_BLOCKS_FROM", 64)
    monkeypatch.setattr(solver, "SHARED_INVERSE_FROM", 64)
    n = 200
    _, _, H = _problem(seed=3, in_f=n)
    H.diagonal().add_(0.01 * H.diagonal().mean())
    H = H.double()
    reference = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    U, ok = upper_cholesky_of_inverse(H)
    assert ok.item() and torch.allclose(U, reference, rtol=0, atol=1e-10 * reference.abs().max())
    assert len(solver.inverse_blocks(n)) == solver.INVERSE_BLOCKS

    partial = []
    for part in range(3):  # (what is combined goes to a collective: it must be contiguous)
        upper_cholesky_of_inverse(H, Shared(part, 3, lambda t: partial.append(t.clone()) if t.is_contiguous() else None))
    assert len(partial) == 3
    filled = torch.stack([p != 0 for p in partial])
    assert filled.sum(0).max() == 1  # each entry from one process only: the sum is exact
    assert torch.equal(filled.any(0), torch.ones(n, n, dtype=torch.bool).tril())
    costs = [sum((n - c0) ** 2 * (c1 - c0) for c0, c1 in solver.inverse_blocks(n, r, 3)) for r in range(3)]
    assert max(costs) < 1.3 * min(costs)  # balanced
    total = sum(partial)
    U3, ok3 = upper_cholesky_of_inverse(H, Shared(0, 3, lambda t: t.copy_(total)))
    assert ok3.item() and torch.allclose(U3, reference, rtol=0, atol=1e-10 * reference.abs().max())
    # Shared, the blocks are SHARED_INVERSE_BLOCKS a process: below INVERSE_BLOCKS_FROM (where
    # one process solves K⁻¹ in one piece) too, from SHARED_INVERSE_FROM on (below: whole).
    assert sum(len(solver.inverse_blocks(n, r, 3)) for r in range(3)) == 3 * solver.SHARED_INVERSE_BLOCKS[1]
    monkeypatch.setattr(solver, "INVERSE_BLOCKS_FROM", 256)
    assert len(solver.inverse_blocks(n)) == 1
    assert sum(len(solver.inverse_blocks(n, r, 3)) for r in range(3)) == 3 * solver.SHARED_INVERSE_BLOCKS[0]
    partial.clear()
    upper_cholesky_of_inverse(H, Shared(0, 3, partial.append))
    assert len(partial) == 1
    monkeypatch.setattr(solver, "SHARED_INVERSE_FROM", 256)
    U4, ok4 = upper_cholesky_of_inverse(H, Shared(0, 3, partial.append))
    assert len(partial) == 1 and ok4.item() and torch.allclose(U4, reference, rtol=0, atol=1e-10 * reference.abs().max())


def test_cholesky_split_over_processes_is_the_cholesky(monkeypatch):
    """Hinv computed by three processes sharing the work (threads here, with a summing
    collective as torch.distributed's all-reduce): the Cholesky split in halves, the halves'
    own factorizations split again (every entry of each combined part from one process),
    and the blocked solve give every process
    the one-process Hinv; the Schur complement's row blocks cover its lower triangle once
    and are balanced."""
    import threading

    monkeypatch.setattr(solver, "INVERSE_BLOCKS_FROM", 64)
    monkeypatch.setattr(solver, "SHARED_INVERSE_FROM", 64)
    monkeypatch.setattr(solver, "CHOLESKY_SPLIT_FROM", 64)
    n, parts = 201, 3
    _, _, H = _problem(seed=4, in_f=n)
    H.diagonal().add_(0.01 * H.diagonal().mean())
    H = H.double()
    reference = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    K, info = solver.lower_cholesky(H)
    assert info.item() == 0 and torch.allclose(K, torch.linalg.cholesky(H))

    barrier, slots, overlaps = threading.Barrier(parts), [None] * parts, []

    def combine(part):
        def sum_over_processes(t):
            assert t.is_contiguous()  # (a collective's buffer)
            slots[part] = t.clone()
            barrier.wait()
            overlaps.append(int(torch.stack([s != 0 for s in slots]).sum(0).max()))
            t.copy_(sum(slots))
            barrier.wait()
        return sum_over_processes

    results = [None] * parts
    threads = [threading.Thread(target=lambda p=p: results.__setitem__(
        p, upper_cholesky_of_inverse(H.clone(), Shared(p, parts, combine(p))))) for p in range(parts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # L21 and S of the whole, of its leading half and of its Schur complement (both 100 columns, split again),
    # and K⁻¹: each entry from one process
    assert len(overlaps) == 7 * parts and max(overlaps) == 1
    for U, ok in results:
        assert ok.item() and torch.allclose(U, reference, rtol=0, atol=1e-10 * reference.abs().max())
    m = n - n // 2
    covered = torch.zeros(m, m, dtype=torch.int64)
    costs = []
    for p in range(parts):
        blocks = solver.schur_blocks(m, p, parts)
        costs.append(sum((b - a) * b for a, b in blocks))
        for a, b in blocks:
            covered[a:b, :b] += 1
    assert torch.equal(covered.tril(), torch.ones(m, m, dtype=torch.int64).tril())
    assert max(costs) < 1.3 * min(costs)


def test_inverse_in_the_hessians_memory_is_the_same_and_gives_back_what_fails(monkeypatch):
    """consume: Hinv lands in H's own memory with the very bits of the plain path (whole,
    blocked, and split over processes); an H that is not positive definite comes back as it
    was, so that inverse_hessians' retry dampens the original (same Hinv and damps as
    without consume, for a batch where one of three needs more dampening)."""
    monkeypatch.setattr(solver, "INVERSE_BLOCKS_FROM", 64)
    for n in (40, 200):  # one block, in place; column blocks
        _, _, H = _problem(seed=5, in_f=n)
        H.diagonal().add_(0.01 * H.diagonal().mean())
        plain, ok = upper_cholesky_of_inverse(H.clone())
        mine = H.clone()
        U, ok2 = upper_cholesky_of_inverse(mine, consume=True)
        assert ok.item() and ok2.item() and torch.equal(U, plain) and U.data_ptr() == mine.data_ptr()

    bad = -torch.eye(30) + 0.01 * torch.ones(30, 30)
    given = bad.clone()
    _, ok = upper_cholesky_of_inverse(given, consume=True)
    assert not ok.item() and torch.equal(given, bad)

    Hs = []
    for k in range(3):
        _, X, _ = _problem(20 + k, in_f=64, n=256)
        X = X[:24] if k == 1 else X  # rank-deficient
        Hs.append(2 * X.T @ X / X.shape[0] - (0.05 * torch.eye(64) * (X**2).mean() if k == 1 else 0))
    H = torch.stack(Hs)
    Hinv, damps = inverse_hessians(H.clone(), 0.01)
    Hinv2, damps2 = inverse_hessians(H.clone(), 0.01, consume=True)
    assert damps2 == damps and damps[1] > damps[0] and torch.equal(Hinv2, Hinv)

    monkeypatch.setattr(solver, "CHOLESKY_SPLIT_FROM", 64)  # split over two processes (threads), into H
    monkeypatch.setattr(solver, "SHARED_INVERSE_FROM", 64)
    import threading
    _, _, H = _problem(seed=6, in_f=150)
    H.diagonal().add_(0.01 * H.diagonal().mean())
    reference = upper_cholesky_of_inverse(H.clone())[0]
    barrier, slots, results = threading.Barrier(2), [None, None], [None, None]

    def combine(part):
        def sum_over_processes(t):
            slots[part] = t.clone()
            barrier.wait()
            t.copy_(slots[0] + slots[1])
            barrier.wait()
        return sum_over_processes

    threads = [threading.Thread(target=lambda p=p: results.__setitem__(
        p, upper_cholesky_of_inverse(H.clone(), Shared(p, 2, combine(p)), consume=True)[0])) for p in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for U in results:
        assert torch.allclose(U, reference, rtol=0, atol=1e-5 * reference.abs().max())


def test_failed_cholesky_raises_damp_and_logs(caplog):
    # A rank-deficient Hessian with a negative direction: plain damp 0.01 is not enough.
    v = torch.randn(16, 1)
    H = v @ v.T - 0.05 * torch.eye(16) * (v.T @ v).item() / 16
    with caplog.at_level("WARNING", logger="qwen_gptq"):
        Hinv, (damp,) = inverse_hessians(H[None], 0.01)
    assert damp > 0.01
    assert torch.isfinite(Hinv).all()
    assert "Cholesky" in caplog.text and "damp" in caplog.text


@pytest.mark.parametrize("settings", [
    dict(bits=4, group_size=128), dict(bits=3, group_size=32, sym=False, min_zero=MIN_ZERO),
    dict(bits=4, group_size=64, desc_act=True, static_groups=True), dict(bits=8, group_size=-1),
    dict(bits=4, group_size=64, act_group_aware=True, clip_weight="loss"), dict(bits=4, group_size=64, gptaq=True)])
def test_a_batch_solves_each_problem_as_it_would_alone(settings):
    """gptq_batch (MoE experts) gives each problem the very bits gptq gives it alone: dead
    columns, act-order and static groups, clipping weights, GPTAQ, and one Hessian that needs
    more dampening than the others."""
    g = torch.Generator().manual_seed(3)
    cfg = QuantConfig(**settings)
    Ws, Hs, Ds = [], [], []
    for k in range(3):
        W, X, _ = _problem(10 + k, out_f=24, in_f=256, n=512)
        X[:, 7 * k] = 0  # a dead input column, a different one per problem
        if k == 1:
            X = X[:48]  # rank-deficient: needs a larger damp
            H = 2 * X.T @ X / X.shape[0] - 0.05 * torch.eye(256) * (X**2).mean()
        else:
            H = 2 * X.T @ X / X.shape[0]
        X_fp = X + 0.1 * torch.randn(X.shape, generator=g)
        Ws.append(W), Hs.append(H), Ds.append(2 * (X_fp - X).T @ X / X.shape[0])
    D = torch.stack(Ds) if cfg.gptaq else None
    batch = gptq_batch(torch.stack(Ws), torch.stack(Hs), cfg, D=D)
    assert batch[1].damp > batch[0].damp == batch[2].damp == cfg.damp_percent
    for k, res in enumerate(batch):
        alone = gptq(Ws[k], Hs[k], cfg, D=Ds[k] if cfg.gptaq else None)
        for field in ("Q", "scale", "zero", "g_idx", "weight", "losses"):
            assert torch.equal(getattr(res, field), getattr(alone, field)), (k, field)
        assert res.damp == alone.damp


@pytest.mark.parametrize("settings", [
    dict(bits=4, group_size=128), dict(bits=3, group_size=32, sym=False, min_zero=MIN_ZERO),
    dict(bits=4, group_size=64, desc_act=True), dict(bits=4, group_size=64, desc_act=True, static_groups=True),
    dict(bits=8, group_size=-1), dict(bits=4, group_size=64, act_group_aware=True), dict(bits=2, group_size=48)])
def test_the_weight_is_rebuilt_from_the_codes_to_the_bit(settings):
    """What a rank receives instead of the solver's float32 weight (codes, scales, zero points,
    g_idx: the stored types) gives it back exactly, for GPTQ batches and round-to-nearest."""
    cfg = QuantConfig(**settings)
    Ws, Hs = zip(*[_problem(20 + k, out_f=40, in_f=240, n=512)[::2] for k in range(2)])
    results = gptq_batch(torch.stack(Ws), torch.stack(Hs), cfg) + [rtn(Ws[0], cfg)]
    for res in results:
        assert res.Q.dtype == torch.uint8 and res.zero.dtype == torch.int32
        assert torch.equal(dequantized(res.Q, res.scale, res.zero, res.g_idx), res.weight)
    stacked = [torch.stack([getattr(r, f) for r in results[:2]]) for f in ("Q", "scale", "zero", "g_idx")]
    assert torch.equal(dequantized(*stacked), torch.stack([r.weight for r in results[:2]]))


@pytest.mark.parametrize("settings", [dict(bits=4, group_size=64), dict(bits=3, group_size=48, sym=False, min_zero=MIN_ZERO),
                                      dict(bits=4, group_size=-1, mse=False)])
def test_round_to_nearest_in_a_batch_gives_each_weight_its_own_bits(settings):
    cfg = QuantConfig(**settings)
    g = torch.Generator().manual_seed(5)
    W = torch.randn(3, 24, 160, generator=g) * torch.linspace(0.1, 2, 160)  # 160 = 2.5 groups of 64, 3.3 of 48
    for k, res in enumerate(rtn_batch(W, cfg)):
        alone = rtn(W[k], cfg)
        for field in ("Q", "scale", "zero", "g_idx", "weight", "losses"):
            assert torch.equal(getattr(res, field), getattr(alone, field)), (k, field)


def test_a_batch_names_the_problem_whose_cholesky_fails():
    H = torch.stack([torch.eye(8), -torch.eye(8), torch.eye(8)])
    with pytest.raises(CholeskyFailed) as e:
        inverse_hessians(H, 0.01)
    assert e.value.index == 1


def test_cholesky_gives_up_at_the_damp_ceiling_and_says_so(caplog):
    H = -torch.eye(8)  # negative definite: no dampening up to MAX_DAMP rescues it
    with caplog.at_level("WARNING", logger="qwen_gptq"), pytest.raises(CholeskyFailed) as e:
        inverse_hessians(H[None], 0.01)
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


def test_group_aware_order_keeps_g_idx_in_order_and_scales_with_their_groups():
    """--act-group-aware: groups are solved in importance order, yet g_idx stays column // gs
    (no loader permutes anything) and each group's scale is the one its codes were made with."""
    W, X, H = _problem(2, in_f=320)  # 320 = 2 full groups of 128 and a partial one of 64
    perm = torch.randperm(320, generator=torch.Generator().manual_seed(0))
    H = H[perm][:, perm]  # importance no longer grows with the column index
    cfg = QuantConfig(group_size=128, act_group_aware=True)
    res = gptq(W, H, cfg)
    assert torch.equal(res.g_idx.long(), torch.arange(320) // 128)
    g = res.g_idx.long()
    assert torch.equal(res.scale[g].T * (res.Q.float() - res.zero[g].T.float()), res.weight)
    # the solve order really differed from the natural one
    assert not torch.equal(res.Q, gptq(W, H, QuantConfig(group_size=128)).Q)
    # static groups keep theirs too, in the same (original) group order
    static = gptq(W, H, QuantConfig(group_size=128, act_group_aware=True, static_groups=True))
    assert torch.equal(static.g_idx.long(), torch.arange(320) // 128)


def test_weighted_clipping_lowers_the_weighted_error_it_searches():
    """find_params with column weights minimises the weighted error: it is never above the
    unweighted choice's weighted error, and below it somewhere when weights are skewed."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(256, 128, generator=g) * torch.linspace(0.2, 2, 128)
    w = torch.rand(128, generator=g) ** 4 * 10
    cfg = QuantConfig(bits=3, group_size=128)

    def err(scale, zero):
        q = torch.clamp(torch.round(x / scale[:, None]) + zero[:, None], 0, cfg.maxq)
        return ((scale[:, None] * (q - zero[:, None]) - x) ** 2 * w).sum(1)

    weighted, plain = err(*find_params(x, cfg, w)), err(*find_params(x, cfg))
    assert (weighted <= plain + 1e-5).all()
    assert (weighted < plain - 1e-5).any()


def test_gptaq_target_is_the_least_squares_fit_to_full_precision_outputs():
    """asymmetric_target with alpha 1: W* X̃ᵀ is the best fit of W Xᵀ (X full-precision inputs,
    X̃ the quantized model's): the normal equations hold, up to the dampening."""
    from qwen_gptq.gptq import CrossProducts, Hessian, asymmetric_target

    W, X, _ = _problem(4, in_f=64, n=4096)
    Xq = X + 0.3 * torch.randn(X.shape, generator=torch.Generator().manual_seed(5))  # an earlier layer's error
    h, d = Hessian(64, torch.device("cpu")), CrossProducts(64, torch.device("cpu"))
    h.add(Xq)
    d.add(X, Xq)
    D = d.finish(h.count)
    H = h.finish()
    target = asymmetric_target(W, H, D, damp_percent=1e-6, alpha=1.0)
    lstsq = torch.linalg.lstsq(Xq.double(), (X.double() @ W.double().T)).solution.T
    assert torch.allclose(target.double(), lstsq, atol=1e-3, rtol=1e-3)
    assert torch.equal(asymmetric_target(W, H, D, 0.01, alpha=0.0), W)
    # and GPTQ toward it fits the full-precision outputs better than GPTQ toward W
    cfg = QuantConfig(bits=4, group_size=32, gptaq_alpha=1.0)
    err = lambda Wq: ((Xq @ Wq.T - X @ W.T) ** 2).mean().item()  # noqa: E731
    assert err(gptq(W, H, cfg, D=D).weight) < 0.9 * err(gptq(W, H, cfg).weight)
