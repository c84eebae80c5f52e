"""Reward calibration against its invariants and the authors' update rule (papers.md §1.5)."""

import math

import pytest
import torch
import torch.nn.functional as F

import po_plugins
from po_plugins.losses import PairBatch, build, names
from po_plugins.scores import ScoreStats


def batch(seed=0, B=8, sw=1.0, sl=3.0, dot=0.5, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    aw, al = -20 - 5 * torch.rand(B, generator=g), -25 - 5 * torch.rand(B, generator=g)
    zw = (aw + torch.randn(B, generator=g)).requires_grad_(requires_grad)
    zl = (al + torch.randn(B, generator=g)).requires_grad_(requires_grad)
    n = torch.randint(5, 30, (B,), generator=g)
    return PairBatch(zw, zl, aw, al, n, n + 3, margins=torch.randn(B, generator=g),
                     score_stats=ScoreStats(torch.tensor(sw), torch.tensor(sl), torch.tensor(dot)))


CALIBRATED = [n for n in names() if n.startswith("rc_")]


@pytest.mark.parametrize("name", CALIBRATED)
def test_forward_unchanged_and_paths_scaled_by_alpha(name):
    b = batch()
    rc, base = build(name), build(name[3:])
    if name == "rc_beta_dpo":  # same sampler seed and statistics on both sides
        rc.base.load_state_dict(base.state_dict())
    out = rc(b)
    ref = base(b)
    assert torch.equal(out, ref)  # bit-identical forward
    gw, gl = torch.autograd.grad(out.sum(), [b.policy_chosen, b.policy_rejected])
    gw0, gl0 = torch.autograd.grad(ref.sum(), [b.policy_chosen, b.policy_rejected])
    a = rc.alpha
    assert math.isfinite(a) and a > 0
    torch.testing.assert_close(gw, a * gw0, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gl, gl0 / a, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["rc_dpo", "rc_simpo", "rc_bce", "rc_cpo", "rc_lsif", "rc_madpo"])
def test_alpha_squared_is_rstar_over_r_on_first_call(name):
    b = batch(sw=0.7, sl=2.1)
    rc = build(name)
    d_w, d_l = po_plugins.incentives(build(name[3:]), b)
    rc(b)
    r = float(d_w.double().mean() / d_l.double().mean())
    assert rc.alpha ** 2 == pytest.approx((2.1 / 0.7) / r, rel=1e-6)


def test_ema_follows_the_authors_update():
    rc = build("rc_bce", ema_decay=0.9)
    stats = [(1.0, 2.0), (1.5, 1.0), (0.5, 4.0)]
    e = None
    for i, (sw, sl) in enumerate(stats):
        b = batch(seed=i, sw=sw, sl=sl, dot=0.1)
        d_w, d_l = po_plugins.incentives(rc.base, b)
        x = [math.log(float(d_w.double().mean())), math.log(float(d_l.double().mean())), math.log(sw), math.log(sl)]
        e = x if e is None else [0.9 * p + 0.1 * v for p, v in zip(e, x)]
        rc(b)
        assert rc.alpha == pytest.approx(math.exp(0.5 * ((e[3] - e[2]) - (e[0] - e[1]))), rel=1e-9)


def test_state_dict_resume_gives_identical_alpha_sequence():
    seq = [batch(seed=s, sw=1 + s, sl=2 + 0.5 * s) for s in range(6)]
    full = build("rc_dpo")
    alphas = [(full(b), full.alpha)[1] for b in seq]
    first = build("rc_dpo")
    for b in seq[:3]:
        first(b)
    resumed = build("rc_dpo")
    resumed.load_state_dict(first.state_dict())
    assert [(resumed(b), resumed.alpha)[1] for b in seq[3:]] == alphas[3:]


def test_no_update_outside_training():
    rc = build("rc_dpo")
    b = batch(requires_grad=False)
    torch.testing.assert_close(rc(b), build("dpo")(b))
    assert rc.calls == 0 and rc.alpha == 1.0
    with torch.no_grad():
        rc(batch())
    assert rc.calls == 0


@pytest.mark.parametrize("name", ["rc_slic", "rc_hinge", "rc_ipo", "rc_cdpo"])
def test_non_positive_incentives_never_give_nan(name):
    rc = build(name)
    # first a normal batch, then batches where the hinge is satisfied / IPO is past its target
    b0 = batch()
    # a first batch where every objective is active (m < γ, Δ below the targets)
    b0 = PairBatch(b0.policy_chosen, (b0.policy_chosen.detach() + 0.5).requires_grad_(True), b0.ref_chosen,
                   b0.ref_chosen, b0.chosen_tokens, b0.chosen_tokens, score_stats=b0.score_stats)
    rc(b0)
    b = batch(seed=1)
    far = PairBatch((b.policy_chosen.detach() + 200).requires_grad_(True), b.policy_rejected, b.ref_chosen,
                    b.ref_rejected, b.chosen_tokens, b.rejected_tokens, score_stats=b.score_stats)
    alpha_before = rc.alpha
    dw, dl = po_plugins.incentives(rc.base, far)
    assert float(dl.mean()) <= 0 or float(dw.mean()) <= 0
    out = rc(far)
    (g,) = torch.autograd.grad(out.sum(), [far.policy_chosen])
    assert torch.isfinite(out).all() and torch.isfinite(g).all() and math.isfinite(rc.alpha)
    assert rc.ema["dw"] is not None
    # the incentive EMAs were held; only the score EMAs moved (same scores here, so α is unchanged)
    assert rc.alpha == pytest.approx(alpha_before, rel=1e-9)


def test_rc_needs_score_stats():
    b = batch()
    b.score_stats = None
    with pytest.raises(ValueError, match="score_stats"):
        build("rc_dpo")(b)


def test_clamp_to_band_keeps_calibrated_ratio_inside_the_instantaneous_band():
    rc = build("rc_dpo", clamp_to_band=True)
    for s in range(5):
        rc(batch(seed=s, sw=1.0, sl=1.0 + 4 * (s % 2), dot=0.9 * (1.0 + 4 * (s % 2))))
        st = rc.last
        log_r = math.log(st["d_w"] / st["d_l"]) + st["log_delta"]
        rho = st["sw_dot_sl"] / (st["sw_norm"] * st["sl_norm"])
        centre = rc.ema["sl"] - rc.ema["sw"]
        assert centre + math.log(rho) - 1e-9 <= log_r <= centre - math.log(rho) + 1e-9


def test_signed_objectives_refuse_calibration_with_the_list():
    with pytest.raises(ValueError, match="rc_dpo"):
        build("rc_apo_down")


def test_last_incentives_scaled_by_alpha_are_the_calibrated_incentives():
    rc = build("rc_simpo")
    b = batch(sw=0.5, sl=2.0)
    rc(b)
    d_w, d_l = po_plugins.incentives(rc, b)
    base_w, base_l = rc.last_incentives
    torch.testing.assert_close(d_w, rc.alpha * base_w, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(d_l, base_l / rc.alpha, rtol=1e-6, atol=1e-9)


def test_chosen_nll_folded_into_the_objective_incentives_and_rc():
    """RPO's form of --model.nll_loss_coef / pref_ftx: the term is in the per-sample loss, in the incentives (against
    autograd of the full loss) and inside RC's calibration (gradient paths α and 1/α, forward value unchanged)."""
    from po_plugins import incentives
    from po_plugins.losses import ChosenNLL, PairBatch, build, with_chosen_nll
    from po_plugins.scores import ScoreStats

    g = torch.Generator().manual_seed(3)
    zw, zl = -20 - 5 * torch.rand(6, generator=g), -22 - 5 * torch.rand(6, generator=g)
    rw, rl = zw + torch.randn(6, generator=g), zl + torch.randn(6, generator=g)
    nw, nl = torch.randint(3, 30, (6,), generator=g), torch.randint(3, 30, (6,), generator=g)
    c = 0.7

    def pb(a, b):
        return PairBatch(a, b, rw, rl, nw, nl, score_stats=ScoreStats(*(torch.tensor(x) for x in (1.0, 4.0, 3.0))))

    folded = with_chosen_nll(build("dpo", beta=0.1), c)
    assert isinstance(folded, ChosenNLL) and folded.name == "dpo" and folded.hparams["nll_coef"] == c
    a, b = zw.clone().requires_grad_(), zl.clone().requires_grad_()
    full = -F.logsigmoid(0.1 * ((a - rw) - (b - rl))) - c * a / nw  # independent formula
    torch.testing.assert_close(folded(pb(a, b)), full.detach())
    gw, gl = torch.autograd.grad(full.sum(), [a, b])
    d_w, d_l = incentives(folded, pb(zw, zl))
    torch.testing.assert_close(d_w, -gw)
    torch.testing.assert_close(d_l, gl)
    assert float((d_w - incentives(build("dpo", beta=0.1), pb(zw, zl))[0] - c / nw).abs().max()) < 1e-6

    rc = with_chosen_nll(build("rc_dpo", beta=0.1), c)
    assert rc.name == "rc_dpo" and isinstance(rc.base, ChosenNLL) and rc.hparams["nll_coef"] == c
    for _ in range(3):  # move α away from 1
        rc(pb(zw.clone().requires_grad_(), zl.clone().requires_grad_()))
    a, b = zw.clone().requires_grad_(), zl.clone().requires_grad_()
    out = rc(pb(a, b))
    alpha = rc.alpha
    assert alpha != 1.0
    torch.testing.assert_close(out.detach(), full.detach())  # forward value unchanged
    gw2, gl2 = torch.autograd.grad(out.sum(), [a, b])
    torch.testing.assert_close(gw2, alpha * gw)  # the NLL's push is calibrated with the chosen path
    torch.testing.assert_close(gl2, gl / alpha)
    with pytest.raises(ValueError, match="finite number >= 0"):
        with_chosen_nll(build("dpo"), -1.0)


def test_diagnostics_reuse_the_base_incentives_of_the_same_micro_batch(monkeypatch):
    """On the micro-batch it calibrated on, RC reports α·d_w, d_l/α from the update's own autograd pass (no second
    one); on any other micro-batch it differentiates with the state frozen, like any objective."""
    import po_plugins.objective as objective
    import po_plugins.rc as rc_mod

    rc = build("rc_simpo")
    for s in range(3):  # move α away from 1
        rc(batch(seed=s, sw=0.5 + s, sl=2.0))
    b = batch(seed=7, sw=0.6, sl=2.5)
    rc(b)
    assert rc.alpha != 1.0
    calls = []
    monkeypatch.setattr(rc_mod, "incentives", lambda *a: calls.append(a) or objective.incentives(*a))
    diag = rc.diagnostics(b)
    assert calls == []  # reused
    assert diag.alpha == rc.alpha and diag.margin_weights is None and diag.capped is None
    assert torch.equal(diag.d_w, rc.alpha * rc.last_incentives[0]) and torch.equal(diag.d_l,
                                                                                   rc.last_incentives[1] / rc.alpha)
    d_w, d_l = po_plugins.incentives(rc, b)  # the same numbers by autograd of the calibrated loss
    torch.testing.assert_close(diag.d_w, d_w, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(diag.d_l, d_l, rtol=1e-6, atol=1e-9)
    other = batch(seed=8)  # not calibrated on: autograd with α frozen, nothing updated
    calls_before, alpha = rc.calls, rc.alpha
    diag2 = rc.diagnostics(other)
    assert len(calls) == 1 and rc.calls == calls_before and rc.alpha == alpha
    d_w, d_l = po_plugins.incentives(rc, other)
    assert torch.equal(diag2.d_w, d_w) and torch.equal(diag2.d_l, d_l)


def test_with_base_keeps_the_calibrator_and_leaves_self_unchanged():
    from po_plugins.rc import RewardCalibrated

    rc = build("rc_dpo", ema_decay=0.9, clamp_to_band=True)
    for s in range(2):
        rc(batch(seed=s))
    state = rc.state_dict()
    new = rc.with_base(build("bce", beta=0.5))
    assert isinstance(new, RewardCalibrated) and new.name == "rc_bce" and new.base is not rc.base
    assert new.ema == rc.ema and new.ema is not rc.ema and new.alpha == rc.alpha and new.calls == rc.calls == 2
    assert new.ema_decay == 0.9 and new.clamp_to_band and new.hparams["beta"] == 0.5
    assert new.last_incentives is None  # the old base's incentives are not the new one's
    assert rc.state_dict() == state and rc.base.name == "dpo"
