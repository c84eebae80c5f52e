"""Reward calibration against its invariants and the authors' update rule (docs/losses.md, "Reward calibration")."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

import po_plugins
from po_plugins.band import band_stats
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
    rc = build("rc_bce", ema_decay=0.9, rc_ema_init="first")
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


# ---- targets, the band clamp and the EMA start (docs/losses.md, "Reward calibration") ---------------------------
def shrunk_band(log_r_star, rho, margin=0.1):
    half = (1 - margin) * -math.log(rho)
    return log_r_star - half, log_r_star + half


def base_log_r(name, b, **hp):
    d_w, d_l = po_plugins.incentives(build(name, **hp), b)
    return math.log(float(d_w.double().mean())) - math.log(float(d_l.double().mean()))


def with_stats(b, sw, sl, dot):
    b.score_stats = ScoreStats(*(torch.tensor(x, dtype=torch.float64) for x in (sw, sl, dot)))
    return b


@pytest.mark.parametrize("name", ["dpo", "ipo", "simpo"])
def test_nearest_is_one_inside_the_shrunk_band_and_moves_to_its_nearest_edge_outside(name):
    """rc_target nearest: α = 1 exactly while the micro-batch's own log r is inside its own band shrunk by rc_margin of
    the half-width; otherwise α²·r is the nearest edge of that shrunk band. The offsets are log r* − log r."""
    rc = build("rc_" + name, rc_target="nearest")
    rho, w = 0.9, 0.9 * -math.log(0.9)  # the shrunk half-width at rc_margin 0.1
    for i, (offset, inside) in enumerate([(0.0, True), (0.08, True), (-0.09, True), (0.1, False), (-0.1, False),
                                          (1.0, False), (-1.0, False), (0.0, True), (2.5, False)]):
        b = batch(seed=20 + i)
        log_r = base_log_r(name, b)
        sw = 0.5 + 0.1 * i
        sl = sw * math.exp(log_r + offset)
        rc(with_stats(b, sw, sl, rho * sw * sl))
        lo, hi = shrunk_band(math.log(sl) - math.log(sw), rho)
        assert rc.last["target"] == "nearest" and rc.last["lower"] == pytest.approx(lo) and \
            rc.last["upper"] == pytest.approx(hi)
        assert (abs(offset) <= w) == inside
        if inside:
            assert rc.alpha == 1.0 and rc.last["log_delta"] == 0.0
        else:
            edge = lo if offset > 0 else hi  # r below the band: its lower edge; above: its upper edge
            assert (rc.alpha > 1.0) == (offset > 0)
            assert 2 * math.log(rc.alpha) + log_r == pytest.approx(edge, abs=1e-12)
            # the calibrated incentives are in the monitor's band of this micro-batch
            bw, bl = rc.last_incentives
            st = band_stats(rc.alpha * bw, bl / rc.alpha, sw, sl, rho * sw * sl)
            assert st["in_band"] == 1.0 and st["lower"] < st["log_r"] < st["upper"]
    assert rc.calls == 9 and all(n == 9 for n in rc.ema_n.values())  # the EMAs are still updated


def test_nearest_is_one_where_the_band_is_the_whole_line_or_undefined():
    rc = build("rc_ipo", rc_target="nearest", length_normalize=True)
    rc(with_stats(batch(seed=1), 1.0, 8.0, -0.2 * 8.0))  # ρ < 0: every ratio is in band
    assert rc.alpha == 1.0 and rc.last["lower"] is None
    rc(with_stats(batch(seed=2), 1.0, 8.0, 0.0))  # ρ = 0
    assert rc.alpha == 1.0
    b = batch(seed=3)
    far = with_stats(PairBatch((b.policy_chosen.detach() + 200).requires_grad_(True), b.policy_rejected, b.ref_chosen,
                               b.ref_rejected, b.chosen_tokens, b.rejected_tokens), 1.0, 8.0, 7.0)
    dw, _ = po_plugins.incentives(rc.base, far)
    assert float(dw.mean()) < 0  # IPO past its target: the ratio is undefined
    out = rc(far)
    assert rc.alpha == 1.0 and rc.last["log_r"] is None and torch.isfinite(out).all()
    assert rc.ema_n == {"dw": 2, "dl": 2, "sw": 3, "sl": 3}  # the incentive EMAs skipped that call


def test_nearest_keeps_the_same_emas_as_center():
    """Both targets update the four EMAs alike, so `last["log_delta_center"]` is what the centre target applies."""
    center, nearest = build("rc_simpo"), build("rc_simpo", rc_target="nearest")
    for b in stream()[:12]:
        center(b)
        nearest(b)
        assert nearest.ema == center.ema and nearest.ema_n == center.ema_n
        assert nearest.last["log_delta_center"] == center.last["log_delta"]
        assert center.alpha == math.exp(0.5 * center.last["log_delta"])


MODES = [{}, {"rc_ema_init": "first"}, {"rc_target": "nearest"}, {"clamp_to_band": True},
         {"rc_target": "nearest", "rc_margin": 0.0}, {"rc_target": "nearest", "rc_margin": 1.0}]


@pytest.mark.parametrize("name", ["rc_dpo", "rc_ipo", "rc_simpo"])
@pytest.mark.parametrize("mode", MODES, ids=lambda m: ",".join(f"{k}={v}" for k, v in m.items()) or "default")
def test_every_mode_keeps_the_forward_value_and_scales_the_gradient_paths(name, mode):
    rc, base = build(name, **mode), build(name[3:])
    moved = False
    for i in range(4):
        b = batch(seed=40 + i, sw=1.0, sl=2.0 + i, dot=0.95 * (2.0 + i))
        out, ref = rc(b), base(b)
        assert torch.equal(out, ref)
        gw, gl = torch.autograd.grad(out.sum(), [b.policy_chosen, b.policy_rejected])
        gw0, gl0 = torch.autograd.grad(ref.sum(), [b.policy_chosen, b.policy_rejected])
        a = rc.alpha
        moved |= a != 1.0
        torch.testing.assert_close(gw, a * gw0, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(gl, gl0 / a, rtol=1e-5, atol=1e-7)
    assert moved  # r* well above r: every mode calibrates here


def test_clamp_to_band_keeps_the_calibrated_ratio_inside_the_micro_batch_band():
    """EMAs built on micro-batches with r* = 0.6, then one with r* = 3 and ρ = 0.967 (band [1.065, 1.132]): the
    centre target gives a calibrated log r of −0.48 there (the authors' clamp, on a band around the EMAs' centre,
    lets it through); clamp_to_band puts it on the nearest edge of the micro-batch's band shrunk by rc_margin."""
    def run(**hp):
        rc = build("rc_dpo", rc_ema_init="first", **hp)
        for s in range(10):
            rc(batch(seed=s, sw=1.0, sl=0.6, dot=0.5 * 0.6))
        rc(with_stats(batch(seed=10), 1.0, 3.0, 0.967 * 3.0))
        return rc

    free, clamped = run(), run(clamp_to_band=True)
    log_r = math.log(free.last["d_w"] / free.last["d_l"])  # DPO: r = 1
    assert log_r == pytest.approx(0.0, abs=1e-12)
    assert log_r + free.last["log_delta"] == pytest.approx(-0.48, abs=0.005)
    lower, upper = math.log(3.0) + math.log(0.967), math.log(3.0) - math.log(0.967)
    assert (round(lower, 2), round(upper, 2)) == (1.07, 1.13)
    lo, hi = shrunk_band(math.log(3.0), 0.967)
    calibrated = log_r + clamped.last["log_delta"]
    assert calibrated == pytest.approx(lo, abs=1e-12) and lower < calibrated < upper
    assert clamped.ema == free.ema and clamped.last["log_delta_center"] == free.last["log_delta"]
    bw, bl = clamped.last_incentives
    assert band_stats(clamped.alpha * bw, bl / clamped.alpha, 1.0, 3.0, 0.967 * 3.0)["in_band"] == 1.0
    # on a varied stream the clamp keeps every calibrated micro-batch inside its own band (the monitor's verdict)
    rc = build("rc_simpo", clamp_to_band=True)
    for b in stream():
        rc(b)
        st = b.score_stats
        bw, bl = rc.last_incentives
        assert band_stats(rc.alpha * bw, bl / rc.alpha, *st)["in_band"] == 1.0
        if rc.last["lower"] is not None:
            assert rc.last["lower"] - 1e-12 <= rc.last["log_r"] + rc.last["log_delta"] <= rc.last["upper"] + 1e-12


@pytest.mark.parametrize("calls", [10, 40])
def test_zero_start_does_not_let_an_outlier_first_micro_batch_decide_alpha(calls):
    """An outlier first micro-batch (r* = e⁵ times the ordinary one's) followed by ordinary ones with identical
    statistics: the EMA of log r* carries the outlier with weight γ^(n−1) under "first" (0.83 after 10 calls, 0.45
    after 40 at γ = 0.98) but (1−γ)γ^(n−1)/(1−γⁿ) under "zero" (0.09, 0.016): α is the ordinary one's up to ½ of
    that weight times 5 in log."""
    g, offset = 0.98, 5.0
    ordinary = with_stats(batch(seed=0), 1.0, 2.0, 1.0)
    outlier = with_stats(batch(seed=0), 1.0, 2.0 * math.exp(offset), 1.0)  # same pairs, far-away r*
    alone = build("rc_dpo")
    alone(ordinary)
    log_alpha_ordinary = math.log(alone.alpha)
    shifts = {}
    for init in ("zero", "first"):
        rc = build("rc_dpo", rc_ema_init=init)
        rc(outlier)
        for _ in range(calls - 1):
            rc(ordinary)
        shifts[init] = math.log(rc.alpha) - log_alpha_ordinary
    w_first = g ** (calls - 1)
    w_zero = (1 - g) * g ** (calls - 1) / (1 - g ** calls)
    assert shifts["first"] == pytest.approx(0.5 * w_first * offset, rel=1e-9)
    assert shifts["zero"] == pytest.approx(0.5 * w_zero * offset, rel=1e-9)
    if calls == 40:
        assert w_first == pytest.approx(0.455, abs=1e-3) and shifts["first"] > 1.1  # α still ×3 off
        assert shifts["zero"] < 0.045  # within 5 % of the ordinary α


def stream(n=30, seed=11):
    """Micro-batches with random head statistics (ρ from −0.3 to 0.95); on every 7th from the 6th the chosen
    log-probs are 200 higher, where IPO is past its target."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        sw, sl = 0.3 + 3 * float(torch.rand((), generator=g)), 0.3 + 3 * float(torch.rand((), generator=g))
        rho = -0.3 + 1.25 * float(torch.rand((), generator=g))
        b = batch(seed=100 + i, sw=sw, sl=sl, dot=rho * sw * sl)
        if i % 7 == 5:
            b.policy_chosen = (b.policy_chosen.detach() + 200).requires_grad_(True)
        out.append(b)
    return out


# α on `stream()` recorded with the calibrator before rc_target / rc_ema_init existed (the authors' EMAs)
RECORDED = {
    ("rc_simpo", ()): [
        1.3260856939611052, 1.3275169638959758, 1.3024926839348954, 1.278528038057551, 1.2728553609718076,
        1.2516827341248238, 1.2434162545838676, 1.237534598507263, 1.2068948161277062, 1.193811760622058,
        1.1713287217847843, 1.1737102479185568, 1.1534906887977638, 1.1443814723349086, 1.1316385509829434,
        1.1262885473969877, 1.1104712542464432, 1.1016357454974532, 1.0997232725478756, 1.1008192066421836,
        1.0763789823944743, 1.08171741001355, 1.0902052949493641, 1.0890360048703949, 1.0878546699771834,
        1.0890069426891673, 1.086596242179586, 1.0977381175987406, 1.0931987562750796, 1.071976648748315],
    ("rc_cpo", ()): [
        0.8379776904725743, 0.8394714367778895, 0.8246561802574275, 0.8102445850608773, 0.8066326055372186,
        0.6552761195254786, 0.6552300907567846, 0.656039060516153, 0.642396711333847, 0.6377540907628245,
        0.6282640002305749, 0.632471645155704, 0.515342863437251, 0.5152342542529623, 0.5137704632576987,
        0.5147319172883552, 0.5108641186604155, 0.5107387829948327, 0.5131347694673974, 0.42867456377336816,
        0.4232873441359814, 0.4299911555644096, 0.43721700107003053, 0.4403493819370841, 0.4444245477635608,
        0.44886966904937053, 0.3746202364044234, 0.38366388351626024, 0.3863682508256453, 0.3836455077098371],
    ("rc_ipo", (("length_normalize", True),)): [  # the incentive EMAs skip calls 5, 12, 19, 26
        1.3348282716343405, 1.336223772670896, 1.3110713351045236, 1.2870180106110962, 1.2813762148479364,
        1.257697276807583, 1.2493737313604758, 1.243387537017038, 1.2126713988234883, 1.199638049431352,
        1.17695556451218, 1.1794594568116068, 1.1571068949232945, 1.1479495529238237, 1.1351084112859997,
        1.1298587673775862, 1.114139479529919, 1.105264950718927, 1.1033929950165926, 1.102573422394154,
        1.078066302112019, 1.0834111636188954, 1.0919367023530937, 1.090828312721965, 1.0896465983629413,
        1.090841374929437, 1.0866819213016046, 1.0978717123413488, 1.0933387482453318, 1.0721462424934682],
}
# rc_cpo's state after the first 10 micro-batches of `stream()`, as that calibrator saved it
LEGACY_STATE = {"ema": {"dw": -2.104981931106264, "dl": -3.6438506027324413, "sw": -0.13531002837760606,
                        "sl": 0.5039536280218422}, "alpha": 0.6377540907628245, "calls": 10, "base": {}}


@pytest.mark.parametrize("key", list(RECORDED), ids=lambda k: k[0])
def test_first_start_reproduces_the_authors_alpha_sequence_bit_for_bit(key):
    name, hp = key
    rc = build(name, rc_ema_init="first", **dict(hp))
    assert [(rc(b), rc.alpha)[1] for b in stream()] == RECORDED[key]
    zero = build(name, **dict(hp))  # the default start differs (and is not bit-identical) from the second call on
    alphas = [(zero(b), zero.alpha)[1] for b in stream()]
    assert alphas[0] == pytest.approx(RECORDED[key][0], rel=1e-12) and alphas[1:] != RECORDED[key][1:]


def test_a_state_saved_before_the_ema_counts_continues_as_first():
    rc = build("rc_cpo")  # rc_ema_init "zero" by default: the checkpoint's EMAs keep their own start
    rc.load_state_dict(json.loads(json.dumps(LEGACY_STATE)))
    assert rc.rc_ema_init == rc.hparams["rc_ema_init"] == "first" and "rc_ema_init='first'" in repr(rc)
    assert [(rc(b), rc.alpha)[1] for b in stream()[10:]] == RECORDED[("rc_cpo", ())][10:]
    state = rc.state_dict()
    assert state["ema_init"] == "first" and state["ema_n"] == dict.fromkeys(("dw", "dl", "sw", "sl"), 30)


def test_state_round_trip_carries_counts_and_start():
    seq = stream()
    for hp in ({}, {"rc_target": "nearest"}, {"rc_ema_init": "first", "clamp_to_band": True}):
        full = build("rc_ipo", length_normalize=True, **hp)
        alphas = [(full(b), full.alpha)[1] for b in seq]
        first = build("rc_ipo", length_normalize=True, **hp)
        for b in seq[:12]:
            first(b)
        state = json.loads(json.dumps(first.state_dict()))
        assert state["ema_n"] == {"dw": 11, "dl": 11, "sw": 12, "sl": 12}  # one call past IPO's target
        resumed = build("rc_ipo", length_normalize=True, **hp)
        resumed.load_state_dict(state)
        assert [(resumed(b), resumed.alpha)[1] for b in seq[12:]] == alphas[12:]
    # started EMAs keep their start whatever the resumed run asks; a state with none started takes the run's own
    zero = build("rc_dpo")
    zero(batch())
    other = build("rc_dpo", rc_ema_init="first")
    other.load_state_dict(zero.state_dict())
    assert other.rc_ema_init == "zero"
    fresh = build("rc_dpo", rc_ema_init="first")
    fresh.load_state_dict(build("rc_dpo").state_dict())
    assert fresh.rc_ema_init == "first"


def test_repr_and_last_show_the_settings():
    rc = build("rc_dpo", rc_target="nearest", rc_margin=0.25)
    assert "rc_target='nearest'" in repr(rc) and "rc_margin=0.25" in repr(rc) and "rc_ema_init='zero'" in repr(rc)
    rc(batch())
    assert rc.last["target"] == "nearest"
    rc2 = build("rc_dpo")
    rc2(batch())
    assert rc2.last["target"] == "center" and "rc_target='center'" in repr(rc2)
    assert po_plugins.losses.accepted_hparams("rc_dpo")["rc_ema_init"] == "zero"


@pytest.mark.parametrize("hp,msg", [({"rc_target": "middle"}, "rc_target must be one of center, nearest"),
                                    ({"rc_margin": 1.5}, r"rc_margin must be a number in \[0, 1\]"),
                                    ({"rc_margin": -0.1}, r"rc_margin must be a number in \[0, 1\]"),
                                    ({"rc_margin": "wide"}, r"rc_margin must be a number in \[0, 1\]"),
                                    ({"rc_ema_init": "x"}, "rc_ema_init must be one of zero, first")])
def test_bad_settings_are_one_value_error_naming_the_choices(hp, msg):
    from po_plugins.errors import OptionError
    from po_plugins.options import parse_plugin_flags

    with pytest.raises(ValueError, match=msg) as e:
        build("rc_simpo", **hp)
    assert "\n" not in str(e.value)
    (key, val), = hp.items()
    with pytest.raises(OptionError, match=msg if val != "wide" else "takes a number"):
        parse_plugin_flags("openrlhf", ["--loss", "rc_dpo", f"--po.{key}", str(val)])


def test_reused_statistics_are_not_counted_again_in_the_score_emas(tmp_path):
    """--po.score_every k: a micro-batch that was not scored gets the last scored one's statistics (ReusedStats); RC
    calibrates with them but its score EMAs count each scored micro-batch once, while its incentive EMAs count every
    micro-batch."""
    from po_plugins.hosts.base import RunInfo
    from po_plugins.plugin import Plugin
    from po_plugins.scores import ReusedStats, ScoreStats, tokens_of

    class Host:
        def po_head_spec(self):  # pragma: no cover
            raise AssertionError

        po_rescore = po_head_spec

        def po_print(self, msg):
            pass

        def po_is_rank_0(self):
            return True

    po = Plugin(build("rc_dpo"), {"score_every": 3, "recheck_every": 0}, Host(),
                RunInfo(1, 1, str(tmp_path), lambda n: f"--loss {n}"))
    g = torch.Generator().manual_seed(0)
    scored = 0
    for i in range(7):
        fresh = po.scoring(True)
        scored += fresh
        st = ScoreStats(torch.tensor(1.0 + i), torch.tensor(2.0 + i), torch.tensor(0.5))
        tok = tokens_of(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), torch.arange(2), 1, stats=st) \
            if fresh else None
        stats = po.stats_for(tok)
        assert isinstance(stats, ReusedStats) != fresh
        z = torch.randn(2, generator=g, requires_grad=True)
        po.loss_step(PairBatch(z[:1], z[1:], torch.zeros(1), torch.zeros(1), score_stats=stats), True, None, tok)
        po.end_step(i + 1)
    assert scored == 3 and po.loss.ema_n["sw"] == 3 and po.loss.ema_n["sl"] == 3 and po.loss.ema_n["dw"] == 7
