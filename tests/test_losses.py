"""Every objective against an independent float64 formula: values and autograd gradients, fp32 and bf16."""

import math

import pytest
import torch

from po_plugins import losses as L
from po_plugins.losses import PairBatch, build


def sp(x):  # softplus(x) = log(1 + e^x), written independently of F.logsigmoid
    return torch.logaddexp(torch.zeros_like(x), x)


def ls(x):  # log σ(x)
    return -sp(-x)


def relu(x):  # gradient 0 at the kink, as F.relu
    return torch.where(x > 0, x, torch.zeros_like(x))


def sig(x):
    return torch.exp(ls(x))


def madpo_w(h, c_max=2.0, c_min=0.5, lam=1.0, tau=math.log(999)):
    c = c_min + (c_max - c_min) / (1 + (c_max - 1) / (1 - c_min) * torch.exp(lam * (h.abs() - tau)))
    return torch.where(h > -tau, sig(c * h) / sig(h), torch.ones_like(h))


# name -> (hparams, f(zw, zl, rw0, rl0, nw, nl, margins) -> loss), all float64
R = {
    "dpo": ({}, lambda zw, zl, aw, al, nw, nl, mg: -ls(0.1 * ((zw - aw) - (zl - al)))),
    "cdpo": ({}, lambda zw, zl, aw, al, nw, nl, mg: -0.9 * ls(0.1 * ((zw - aw) - (zl - al)))
             - 0.1 * ls(-0.1 * ((zw - aw) - (zl - al)))),
    "robust_dpo": ({}, lambda zw, zl, aw, al, nw, nl, mg: (-0.9 * ls(0.1 * ((zw - aw) - (zl - al)))
                                                         + 0.1 * ls(-0.1 * ((zw - aw) - (zl - al)))) / 0.8),
    "ipo": ({}, lambda zw, zl, aw, al, nw, nl, mg: ((zw - aw) - (zl - al) - 5.0) ** 2),
    "hinge": ({}, lambda zw, zl, aw, al, nw, nl, mg: relu(1 - 0.1 * ((zw - aw) - (zl - al)))),
    "bce": ({}, lambda zw, zl, aw, al, nw, nl, mg: -ls(zw - aw) - ls(al - zl)),
    "nca": ({}, lambda zw, zl, aw, al, nw, nl, mg: -ls(0.1 * (zw - aw)) - 0.5 * ls(-0.1 * (zw - aw))
            - 0.5 * ls(-0.1 * (zl - al))),
    "apo_zero": ({}, lambda zw, zl, aw, al, nw, nl, mg: 1 - sig(0.1 * (zw - aw)) + sig(0.1 * (zl - al))),
    "apo_down": ({}, lambda zw, zl, aw, al, nw, nl, mg: sig(0.1 * (zw - aw)) + 1
                 - sig(0.1 * ((zw - aw) - (zl - al)))),
    "sppo_hard": ({}, lambda zw, zl, aw, al, nw, nl, mg: (zw - aw - 5) ** 2 + (zl - al + 5) ** 2),
    "cal_dpo": ({}, lambda zw, zl, aw, al, nw, nl, mg: -ls((zw - aw) - (zl - al)) + (zw - aw - 5) ** 2
                + (zl - al + 5) ** 2),
    "dpop": ({}, lambda zw, zl, aw, al, nw, nl, mg: -ls(0.1 * ((zw - aw) - (zl - al)
                                                              - 50 * relu(aw - zw)))),
    "exo": ({}, lambda zw, zl, aw, al, nw, nl, mg: (lambda x: torch.exp(ls(x)) * (ls(x) - math.log(1 - 1e-3))
                                                   + torch.exp(ls(-x)) * (ls(-x) - math.log(1e-3)))(
        0.1 * ((zw - aw) - (zl - al)))),
    "discopop": ({}, lambda zw, zl, aw, al, nw, nl, mg: (lambda x: (1 - sig(x / 0.05)) * -ls(x)
                                                        + torch.exp(ls(x / 0.05) - x))(
        0.1 * ((zw - aw) - (zl - al)))),
    "r_dpo": ({}, lambda zw, zl, aw, al, nw, nl, mg: -ls(0.1 * ((zw - aw) - (zl - al)) + 0.01 * (nw - nl))),
    "lsif": ({}, lambda zw, zl, aw, al, nw, nl, mg: -torch.exp(zw - aw) + 0.5 * torch.exp(2 * (zl - al))),
    "ukl": ({}, lambda zw, zl, aw, al, nw, nl, mg: -zw + torch.exp(zl - al)),
    "ddro": ({}, lambda zw, zl, aw, al, nw, nl, mg: math.log(2) - (zw - aw) + math.log(2)
             - torch.log(2 - torch.exp(zl - al))),
    "simpo": ({}, lambda zw, zl, aw, al, nw, nl, mg: -ls(2.0 * (zw / nw - zl / nl) - 1.0)),
    "cpo": ({}, lambda zw, zl, aw, al, nw, nl, mg: -ls(0.1 * (zw - zl)) - zw / nw),
    "slic": ({}, lambda zw, zl, aw, al, nw, nl, mg: relu(1.0 - (zw - zl)) - 0.1 * zw / nw),
    "orpo": ({}, lambda zw, zl, aw, al, nw, nl, mg: -zw / nw - 0.1 * ls(
        (zw / nw - torch.log(1 - torch.exp(zw / nw))) - (zl / nl - torch.log(1 - torch.exp(zl / nl))))),
    "madpo": ({}, lambda zw, zl, aw, al, nw, nl, mg: -madpo_w(mg) * ls(0.1 * ((zw - aw) - (zl - al)))),
    "mi_dpo": ({}, lambda zw, zl, aw, al, nw, nl, mg: -ls(0.1 * ((zw - aw) - (zl - al)))),
}
# exponential objectives overflow fp32 at extreme log-ratios by their own definition: test them moderately
EXPONENTIAL = {"lsif", "ukl", "ddro", "sppo_hard", "cal_dpo"}


def make_inputs(B=64, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    nw = torch.randint(1, 60, (B,), generator=g).double()
    nl = torch.randint(1, 60, (B,), generator=g).double()
    aw = -nw * (0.5 + 2 * torch.rand(B, generator=g, dtype=torch.float64))
    al = -nl * (0.5 + 2 * torch.rand(B, generator=g, dtype=torch.float64))
    zw = aw + scale * torch.randn(B, generator=g, dtype=torch.float64)
    zl = al + scale * torch.randn(B, generator=g, dtype=torch.float64)
    mg = 4 * torch.randn(B, generator=g, dtype=torch.float64)
    return zw, zl, aw, al, nw, nl, mg


def test_every_base_objective_has_an_independent_reference():
    assert set(R) | {"beta_dpo"} == set(L.base_names())


@pytest.mark.parametrize("name", sorted(R))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [0.5, 5.0, 300.0])
def test_value_and_gradient_match_reference(name, dtype, scale):
    if name in EXPONENTIAL and scale > 5:
        scale = 2.0
    hp, ref = R[name]
    zw, zl, aw, al, nw, nl, mg = make_inputs(scale=scale)
    if name == "orpo":  # ORPO's odds need token-mean log-probs strictly below 0 (true of any real model)
        zw, zl = torch.minimum(zw, -0.05 * nw), torch.minimum(zl, -0.05 * nl)
    # the low-precision inputs are what both sides see
    q = [t.to(dtype) for t in (zw, zl, aw, al)]
    if name == "ddro":  # stay left of the tangent switch at e^{r_l} = 2 − 1e−6 (tested separately)
        q[1] = torch.minimum(q[1].double(), q[3].double() + 0.2).to(dtype)
    zw64, zl64, aw64, al64 = [t.double().requires_grad_(i < 2) for i, t in enumerate(q)]
    expect = ref(zw64, zl64, aw64, al64, nw, nl, mg)
    gw_e, gl_e = torch.autograd.grad(expect.sum(), [zw64, zl64])
    zwq, zlq = q[0].clone().requires_grad_(True), q[1].clone().requires_grad_(True)
    batch = PairBatch(zwq, zlq, q[2], q[3], nw.long(), nl.long(), margins=mg.float())
    got = build(name, **hp)(batch)
    assert got.shape == (64,) and got.dtype == torch.float32
    gw, gl = torch.autograd.grad(got.sum(), [zwq, zlq])
    tol = dict(rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(got.double(), expect.detach(), **tol)
    # gradients land in the leaves' dtype: bf16 leaves hold them to bf16 precision (8 bits of mantissa)
    gtol = dict(rtol=2e-4, atol=2e-5) if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-5)
    torch.testing.assert_close(gw.double(), gw_e, **gtol)
    torch.testing.assert_close(gl.double(), gl_e, **gtol)
    assert torch.isfinite(got).all()


def test_extreme_margins_stay_finite_for_logistic_objectives():
    big = torch.tensor([-1e4, -300.0, 0.0, 300.0, 1e4])
    zero = torch.zeros(5)
    n = torch.full((5,), 10)
    for name in ["dpo", "cdpo", "robust_dpo", "nca", "apo_zero", "apo_down", "exo", "discopop", "r_dpo",
                 "simpo", "cpo", "bce", "madpo", "mi_dpo", "hinge", "dpop"]:
        zw = (big - 50).requires_grad_(True)
        b = PairBatch(zw, zero - 50, zero - 50, zero - 50, n, n, margins=big / 100)
        out = build(name)(b)
        (g,) = torch.autograd.grad(out.sum(), [zw])
        assert torch.isfinite(out).all() and torch.isfinite(g).all(), name


def test_beta_dpo_matches_its_algorithm():
    zw, zl, aw, al, nw, nl, _ = make_inputs(B=10, seed=3)
    f = build("beta_dpo", seed=7)
    b = PairBatch(zw.float(), zl.float(), aw.float(), al.float())
    out = f(b)
    m = 0.1 * ((zw - aw) - (zl - al))
    m0 = 0.1 * m.mean()
    sigma = 0.9 + 0.1 * (m.std() + 1e-6)
    beta_b = 0.1 * (1 + 0.6 * (m.mean() - m0))
    kept = out != 0
    assert int(kept.sum()) == 8  # ⌊0.8·10⌋ pairs kept
    expect = -ls(beta_b * ((zw - aw) - (zl - al))) * 10 / 8
    torch.testing.assert_close(out[kept].double(), expect[kept], rtol=1e-5, atol=1e-6)
    assert f.m0 == pytest.approx(float(m0), rel=1e-5) and f.sigma == pytest.approx(float(sigma), rel=1e-5)
    # frozen evaluation neither moves the statistics nor the sampler
    state = f.state_dict()
    with f.frozen():
        f(b)
    assert f.m0 == state["m0"] and torch.equal(f.gen.get_state(), state["gen"])


def test_mi_dpo_priors_reproduce_dpo_r_dpo_and_simpo():
    zw, zl, aw, al, nw, nl, _ = make_inputs(seed=5)
    b = PairBatch(zw.float(), zl.float(), aw.float(), al.float(), nw.long(), nl.long())
    torch.testing.assert_close(build("mi_dpo", prior="dpo", beta=0.3)(b), build("dpo", beta=0.3)(b))
    torch.testing.assert_close(build("mi_dpo", prior="r_dpo", beta=0.3, eta=0.02)(b),
                               build("r_dpo", beta=0.3, alpha=0.02)(b))
    torch.testing.assert_close(build("mi_dpo", prior="simpo", beta=2.5, gamma=1.5)(b),
                               build("simpo", beta=2.5, gamma=1.5)(b), rtol=1e-5, atol=1e-5)
    custom = build("mi_dpo", prior=lambda z, ref, n, chosen, hp: ref, beta=0.3)
    torch.testing.assert_close(custom(b), build("dpo", beta=0.3)(b))


def test_dpo_cdpo_ipo_equal_openrlhf_dpoloss_formula():
    """OpenRLHF 0.11.2 DPOLoss.forward (openrlhf/models/loss.py l.340), restated: summed log-ratios."""
    zw, zl, aw, al, *_ = make_inputs(seed=9)
    zw, zl, aw, al = zw.float(), zl.float(), aw.float(), al.float()

    def openrlhf(beta, ls_, ipo):
        logits = (zw - zl) - (aw - al)
        if ipo:
            return (logits - 1 / (2 * beta)) ** 2
        return -torch.nn.functional.logsigmoid(beta * logits) * (1 - ls_) \
            - torch.nn.functional.logsigmoid(-beta * logits) * ls_

    b = PairBatch(zw, zl, aw, al)
    torch.testing.assert_close(build("dpo", beta=0.2)(b), openrlhf(0.2, 0.0, False))
    torch.testing.assert_close(build("cdpo", beta=0.2, label_smoothing=0.15)(b), openrlhf(0.2, 0.15, False))
    torch.testing.assert_close(build("ipo", beta=0.2)(b), openrlhf(0.2, 0.0, True), rtol=2e-5, atol=1e-5)


def test_weights_multiply_per_sample_losses():
    zw, zl, aw, al, *_ = make_inputs(B=4, seed=2)
    w = torch.tensor([0.0, 1.0, 2.0, 0.5])
    b = PairBatch(zw.float(), zl.float(), aw.float(), al.float())
    base = build("dpo")(b)
    torch.testing.assert_close(build("dpo")(PairBatch(**{**b.__dict__, "weights": w})), base * w)


def test_ddro_tangent_continuation_is_continuous_with_the_right_slope():
    cap = math.log(2 - 1e-6)
    rl = torch.tensor([cap - 1e-4, cap, cap + 1.0], dtype=torch.float64, requires_grad=True)
    z = torch.zeros(3, dtype=torch.float64)
    out = build("ddro")(PairBatch(z, rl, z, z))
    (g,) = torch.autograd.grad(out.sum(), [rl])
    assert torch.isfinite(out).all()
    slope = (2 - 1e-6) / 1e-6
    assert float(g[1]) == pytest.approx(slope, rel=1e-6) and float(g[2]) == pytest.approx(slope, rel=1e-6)
    assert float((out[2] - out[1]).detach()) == pytest.approx(slope, rel=1e-6)


def test_incentives_match_the_rc_papers_table():
    """arXiv 2604.18239 Table 1 (docs/losses.md, incentives), written for token-averaged z: with one-token responses
    (|y| = 1) the summed and averaged log-probs coincide, so the table applies verbatim."""
    from po_plugins import incentives

    zw, zl, aw, al, *_ = make_inputs(B=32, scale=1.0, seed=11)
    zw, zl, aw, al = (t.float() / 40 for t in (zw, zl, aw, al))  # one-token scale log-probs (< 0)
    one = torch.ones(32, dtype=torch.long)
    b = PairBatch(zw, zl, aw, al, one, one)
    rw, rl, m = zw - aw, zl - al, zw - zl
    D = rw - rl
    s = torch.sigmoid
    table = {
        "dpo": ({"beta": 1.0}, s(-D), s(-D)),
        "ipo": ({"beta": 0.1}, 2 * (5.0 - D), 2 * (5.0 - D)),  # ipo_tau = 0.1: target 1/(2τ) = 5
        "simpo": ({"beta": 2.0, "gamma": 1.0}, 2.0 * s(1 - 2.0 * m), 2.0 * s(1 - 2.0 * m)),
        "cpo": ({"beta": 0.1, "lam": 1.0}, 0.1 * s(-0.1 * m) + 1.0, 0.1 * s(-0.1 * m)),
        "slic": ({"gamma": 1.0, "lam": 0.1}, (m < 1).float() + 0.1, (m < 1).float()),
        "bce": ({}, s(-rw), s(rl)),
        "lsif": ({}, torch.exp(rw), torch.exp(2 * rl)),
        "ukl": ({}, torch.ones(32), torch.exp(rl)),
        "ddro": ({}, torch.ones(32), torch.exp(rl) / (2 - torch.exp(rl))),
    }
    for name, (hp, e_w, e_l) in table.items():
        d_w, d_l = incentives(build(name, **hp), b)
        torch.testing.assert_close(d_w, e_w, rtol=1e-4, atol=1e-5, msg=name)
        torch.testing.assert_close(d_l, e_l, rtol=1e-4, atol=1e-5, msg=name)


def test_toy_band_example_runs_and_reports_both_runs(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "toy_band.py"
    spec = importlib.util.spec_from_file_location("toy_band", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--steps", "30", "--every", "10"]) == 0
    out = capsys.readouterr().out
    dpo = next(line for line in out.splitlines() if line.strip().startswith("dpo:"))
    rc = next(line for line in out.splitlines() if line.strip().startswith("rc_dpo:"))
    assert "Δz_w = -" in dpo and "in-band 0%" in dpo and "30/30" in dpo
    assert "Δz_w = +" in rc and "in-band 100%" in rc and "30/30" in rc


# ---- diagnostics (po_plugins.objective.Diagnostics) ---------------------------------------------------------
def _diag_batch(B=6, seed=5):
    g = torch.Generator().manual_seed(seed)
    zw, zl = -20 - 5 * torch.rand(B, generator=g), -24 - 5 * torch.rand(B, generator=g)
    n = torch.randint(3, 20, (B,), generator=g)
    margins = torch.tensor([-9.0, -2.0, 0.0, 1.5, 4.0, 12.0])[:B]
    from po_plugins.scores import ScoreStats

    return PairBatch(zw.requires_grad_(), zl.requires_grad_(), zw.detach() + torch.randn(B, generator=g),
                     zl.detach() + torch.randn(B, generator=g), n, n + 2, margins=margins,
                     score_stats=ScoreStats(torch.tensor(1.0), torch.tensor(2.0), torch.tensor(0.5)))


@pytest.mark.parametrize("name", ["dpo", "simpo", "ipo", "beta_dpo", "r_dpo", "orpo"])
def test_diagnostics_of_an_objective_are_its_incentives_with_alpha_one_and_no_weights(name):
    from po_plugins import incentives
    from po_plugins.objective import Diagnostics

    loss, b = build(name), _diag_batch()
    before = repr(loss.state_dict())
    diag = loss.diagnostics(b)
    assert isinstance(diag, Diagnostics)
    d_w, d_l = incentives(loss, b)
    assert torch.equal(diag.d_w, d_w) and torch.equal(diag.d_l, d_l) and diag.d_w.shape == (6,)
    assert diag.alpha == 1.0  # r_dpo and beta_dpo have a hyperparameter called alpha: it is not RC's α
    assert diag.margin_weights is None and diag.capped is None
    assert repr(loss.state_dict()) == before  # the state is frozen while differentiating


def test_madpo_diagnostics_report_its_weights_and_cap_also_through_wrappers():
    from po_plugins.losses import with_chosen_nll
    from po_plugins.madpo import margin_weights

    b = _diag_batch()
    w = margin_weights(b.margins, 2.0, None, 1.0, 3.0)
    for loss in (build("madpo", tau=3.0), build("rc_madpo", tau=3.0), with_chosen_nll(build("madpo", tau=3.0), 0.5),
                 with_chosen_nll(build("rc_madpo", tau=3.0), 0.5)):
        diag = loss.diagnostics(b)
        assert torch.equal(diag.margin_weights, w), loss
        assert diag.capped.tolist() == [True, False, False, False, False, False], loss
    # the weights are those forward applies: MADPO's loss is w times DPO's
    torch.testing.assert_close(build("madpo", tau=3.0)(b), w * build("dpo")(b))
    assert build("madpo").margin_weighting(PairBatch(b.policy_chosen, b.policy_rejected)) is None  # no margins


def test_with_chosen_nll_leaves_its_argument_unchanged():
    from po_plugins.losses import ChosenNLL, with_chosen_nll
    from po_plugins.rc import RewardCalibrated

    rc = build("rc_dpo", beta=0.2, ema_decay=0.9)
    hp = dict(rc.hparams)
    folded = with_chosen_nll(rc, 0.5)
    assert folded is not rc and isinstance(folded, RewardCalibrated) and isinstance(folded.base, ChosenNLL)
    assert rc.hparams == hp and not isinstance(rc.base, ChosenNLL)  # the original is untouched
    assert list(folded.hparams) == [*hp, "nll_coef"] and folded.hparams["nll_coef"] == 0.5
    assert folded.ema_decay == 0.9 and folded.name == "rc_dpo" and folded.base.base is rc.base
    assert with_chosen_nll(rc, 0.0) is rc


def test_beta_dpo_diagnostics_after_its_forward_are_that_forwards_incentives():
    """The monitor asks for the incentives after the training forward has updated β-DPO's running statistics and
    drawn its keep-set: they must be that forward's (its β_b, its kept pairs: autograd of what was trained), not
    those of another draw at updated statistics; and asking changes no state."""
    loss = build("beta_dpo", seed=3)
    for _ in range(3):
        b = _diag_batch()
        b.policy_chosen.grad = b.policy_rejected.grad = None
        per_sample = loss(b)
        gw, gl = torch.autograd.grad(per_sample.sum(), [b.policy_chosen, b.policy_rejected])
        state = repr(loss.state_dict())
        diag = loss.diagnostics(b)
        torch.testing.assert_close(diag.d_w, -gw.float(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(diag.d_l, gl.float(), rtol=1e-6, atol=1e-7)
        assert repr(loss.state_dict()) == state
        assert int((diag.d_w == 0).sum()) == 6 - max(1, int(0.8 * 6))  # the pairs that forward dropped
