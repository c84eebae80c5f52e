"""The incentive catalogue of docs/losses.md, checked against autograd.

For every base objective the closed forms d_w = −∂ℓ/∂z_w and d_l = +∂ℓ/∂z_l written in docs/losses.md are
recomputed here with plain torch maths (no library code) and compared with `po_plugins.incentives`, which
differentiates the implementation. Inputs are fp32 summed log-probs; tolerance rtol 1e-4 (plus a tiny atol for
values that cross zero). Also pinned: each objective's defaults and incentive_sign class as catalogued.
"""

import math

import pytest
import torch

from po_plugins import incentives
from po_plugins.losses import PairBatch, base_names, build, get_class, names

# atol: incentives that are differences of fp32 summed log-probs (≈ −100) carry ≈ 1e-5 absolute rounding
RTOL, ATOL = 1e-4, 5e-5
sig = torch.sigmoid


# ---- inputs -----------------------------------------------------------------------------------------------
def make_batch(seed=0, n=256, scale=5.0, rl_max=None, rl_min=None):
    """Summed log-probs z ≈ −(0.2…2.7)·|y|, implicit rewards r ~ scale·N(0, 1), RM margins ĥ ~ 5·N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    tw = torch.randint(5, 200, (n,), generator=g)
    tl = torch.randint(5, 200, (n,), generator=g)
    zw = -(torch.rand(n, generator=g) * 2.5 + 0.2) * tw
    zl = -(torch.rand(n, generator=g) * 2.5 + 0.2) * tl
    rw = scale * torch.randn(n, generator=g)
    rl = scale * torch.randn(n, generator=g)
    if rl_max is not None or rl_min is not None:
        rl = rl.clamp(min=rl_min, max=rl_max)
    return PairBatch(policy_chosen=zw, policy_rejected=zl, ref_chosen=zw - rw, ref_rejected=zl - rl,
                     chosen_tokens=tw, rejected_tokens=tl, margins=5.0 * torch.randn(n, generator=g))


def fields(b):
    zw, zl = b.policy_chosen, b.policy_rejected
    rw, rl = zw - b.ref_chosen, zl - b.ref_rejected
    nw, nl = b.chosen_tokens.float().clamp(min=1), b.rejected_tokens.float().clamp(min=1)
    return zw, zl, rw, rl, rw - rl, nw, nl


# ---- closed forms (docs/losses.md, "incentives" column) ---------------------------------------------------
def cf_dpo(b, hp):
    *_, D, _, _ = fields(b)
    d = hp["beta"] * sig(-hp["beta"] * D)
    return d, d


def cf_cdpo(b, hp):
    *_, D, _, _ = fields(b)
    d = hp["beta"] * (1 - hp["label_smoothing"] - sig(hp["beta"] * D))
    return d, d


def cf_robust_dpo(b, hp):
    *_, D, _, _ = fields(b)
    e, x = hp["label_smoothing"], hp["beta"] * D
    d = hp["beta"] * ((1 - e) * sig(-x) + e * sig(x)) / (1 - 2 * e)
    return d, d


def cf_ipo(b, hp):
    zw, zl, rw, rl, D, nw, nl = fields(b)
    if hp["length_normalize"]:
        d = 2 * (1 / (2 * hp["beta"]) - (rw / nw - rl / nl))
        return d / nw, d / nl
    d = 1 / hp["beta"] - 2 * D
    return d, d


def cf_hinge(b, hp):
    *_, D, _, _ = fields(b)
    d = hp["beta"] * (hp["beta"] * D < 1).float()
    return d, d


def cf_bce(b, hp):
    _, _, rw, rl, *_ = fields(b)
    return hp["beta"] * sig(-hp["beta"] * rw), hp["beta"] * sig(hp["beta"] * rl)


def cf_nca(b, hp):
    _, _, rw, rl, *_ = fields(b)
    be = hp["beta"]
    return be * sig(-be * rw) - 0.5 * be * sig(be * rw), 0.5 * be * sig(be * rl)


def cf_apo_zero(b, hp):
    _, _, rw, rl, *_ = fields(b)
    be = hp["beta"]
    return be * sig(be * rw) * sig(-be * rw), be * sig(be * rl) * sig(-be * rl)


def cf_apo_down(b, hp):
    _, _, rw, rl, D, _, _ = fields(b)
    be = hp["beta"]
    dd = be * sig(be * D) * sig(-be * D)
    return dd - be * sig(be * rw) * sig(-be * rw), dd


def cf_sppo_hard(b, hp):
    _, _, rw, rl, *_ = fields(b)
    return 1 / hp["beta"] - 2 * rw, 1 / hp["beta"] + 2 * rl


def cf_cal_dpo(b, hp):
    _, _, rw, rl, D, _, _ = fields(b)
    s = sig(-D)
    return s + 1 / hp["beta"] - 2 * rw, s + 1 / hp["beta"] + 2 * rl


def cf_dpop(b, hp):
    _, _, rw, rl, D, _, _ = fields(b)
    be, lam = hp["beta"], hp["lam"]
    below = (rw < 0).float()  # z_w < z_w^ref: the penalty max(0, z_w^ref − z_w) is active
    s = be * sig(-be * (D - lam * torch.clamp(-rw, min=0)))
    return s * (1 + lam * below), s


def cf_exo(b, hp):
    *_, D, _, _ = fields(b)
    x, e = hp["beta"] * D, hp["eps"]
    d = hp["beta"] * sig(x) * sig(-x) * (math.log((1 - e) / e) - x)
    return d, d


def cf_discopop(b, hp):
    *_, D, _, _ = fields(b)
    be, t = hp["beta"], hp["tau"]
    x = be * D
    q = sig(x / t)
    d = be * ((1 - q) * sig(-x) + q * torch.exp(-x)
              - (1 / t) * q * (1 - q) * (torch.log(sig(x)) + torch.exp(-x)))
    return d, d


def cf_r_dpo(b, hp):
    *_, D, nw, nl = fields(b)
    d = hp["beta"] * sig(-(hp["beta"] * D + hp["alpha"] * (nw - nl)))
    return d, d


def cf_lsif(b, hp):
    _, _, rw, rl, *_ = fields(b)
    return torch.exp(rw), torch.exp(2 * rl)


def cf_ukl(b, hp):
    _, _, rw, rl, *_ = fields(b)
    return torch.ones_like(rw), torch.exp(rl)


def cf_ddro(b, hp):
    _, _, rw, rl, *_ = fields(b)
    cap = 2.0 - 1e-6
    e = torch.exp(rl)
    return torch.ones_like(rw), torch.where(rl < math.log(cap), e / (2 - e), torch.full_like(e, cap / (2 - cap)))


def cf_simpo(b, hp):
    zw, zl, *_, nw, nl = fields(b)
    be = hp["beta"]
    s = sig(hp["gamma"] - be * (zw / nw - zl / nl))
    return be * s / nw, be * s / nl


def cf_cpo(b, hp):
    zw, zl, *_, nw, nl = fields(b)
    s = hp["beta"] * sig(-hp["beta"] * (zw - zl))
    return s + hp["lam"] / nw, s


def cf_slic(b, hp):
    zw, zl, *_, nw, nl = fields(b)
    act = (zw - zl < hp["gamma"]).float()
    return act + hp["lam"] / nw, act


def cf_orpo(b, hp):
    zw, zl, *_, nw, nl = fields(b)
    uw, ul = zw / nw, zl / nl
    log_odds = lambda u: u - torch.log(1 - torch.exp(u))
    s = hp["lam"] * sig(-(log_odds(uw) - log_odds(ul)))
    return (1 + s / (1 - torch.exp(uw))) / nw, s / (1 - torch.exp(ul)) / nl


def madpo_weight(h, hp):
    cmax = hp["c_max"]
    cmin = 1 / cmax if hp["c_min"] is None else hp["c_min"]
    a = h.abs()
    c = cmin + (cmax - cmin) / (1 + (cmax - 1) / (1 - cmin) * torch.exp(hp["lam"] * (a - hp["tau"])))
    return torch.where(h > -hp["tau"], sig(c * h) / sig(h), torch.ones_like(h))


def cf_madpo(b, hp):
    *_, D, _, _ = fields(b)
    d = madpo_weight(b.margins, hp) * hp["beta"] * sig(-hp["beta"] * D)
    return d, d


def beta_dpo_beta_b(D, hp, m0_prev=0.0):
    m = hp["beta"] * D
    m0 = hp["momentum"] * m0_prev + (1 - hp["momentum"]) * m.mean()
    return hp["beta"] * (1 + hp["alpha"] * (m.mean() - m0))


def cf_beta_dpo(b, hp, m0_prev=0.0):
    """Before the Gaussian filter: β_b σ(−β_b Δ); kept pairs get B/k times this, dropped pairs 0."""
    *_, D, _, _ = fields(b)
    bb = beta_dpo_beta_b(D, hp, m0_prev)
    d = bb * sig(-bb * D)
    return d, d


def cf_mi_dpo(b, hp):
    zw, zl, *_, D, nw, nl = fields(b)
    be = hp["beta"]
    if hp["prior"] == "dpo":  # ζ = π_ref: DPO
        x = be * D
        return be * sig(-x), be * sig(-x)
    if hp["prior"] == "r_dpo":  # ζ = π_ref·e^{−η|y|/β}: R-DPO with α = η
        x = be * D + hp["eta"] * (nw - nl)
        return be * sig(-x), be * sig(-x)
    # ζ = π_θ^{1−1/|y|}·e^{γ·1[y=y_w]/β}, differentiated through: SimPO
    s = sig(-(be * (zw / nw - zl / nl) - hp["gamma"]))
    return be * s / nw, be * s / nl


CLOSED_FORMS = {
    "dpo": cf_dpo, "cdpo": cf_cdpo, "robust_dpo": cf_robust_dpo, "ipo": cf_ipo, "hinge": cf_hinge,
    "bce": cf_bce, "nca": cf_nca, "apo_zero": cf_apo_zero, "apo_down": cf_apo_down, "sppo_hard": cf_sppo_hard,
    "cal_dpo": cf_cal_dpo, "dpop": cf_dpop, "exo": cf_exo, "discopop": cf_discopop, "r_dpo": cf_r_dpo,
    "lsif": cf_lsif, "ukl": cf_ukl, "ddro": cf_ddro, "simpo": cf_simpo, "cpo": cf_cpo, "slic": cf_slic,
    "orpo": cf_orpo, "madpo": cf_madpo, "beta_dpo": cf_beta_dpo, "mi_dpo": cf_mi_dpo,
}

# catalogue columns: defaults and incentive_sign (docs/losses.md)
CATALOGUE = {
    "dpo": ({"beta": 0.1}, "positive"),
    "cdpo": ({"beta": 0.1, "label_smoothing": 0.1}, "target"),
    "robust_dpo": ({"beta": 0.1, "label_smoothing": 0.1}, "positive"),
    "ipo": ({"beta": 0.1, "length_normalize": False}, "target"),
    "hinge": ({"beta": 0.1}, "nonnegative"),
    "bce": ({"beta": 1.0}, "positive"),
    "nca": ({"beta": 0.1}, "target"),
    "apo_zero": ({"beta": 0.1}, "positive"),
    "apo_down": ({"beta": 0.1}, "signed"),
    "sppo_hard": ({"beta": 0.1}, "target"),
    "cal_dpo": ({"beta": 0.1}, "target"),
    "dpop": ({"beta": 0.1, "lam": 50.0}, "positive"),
    "exo": ({"beta": 0.1, "eps": 1e-3}, "target"),
    "discopop": ({"beta": 0.1, "tau": 0.05}, "signed"),
    "r_dpo": ({"beta": 0.1, "alpha": 0.01}, "positive"),
    "lsif": ({}, "positive"),
    "ukl": ({}, "positive"),
    "ddro": ({}, "positive"),
    "simpo": ({"beta": 2.0, "gamma": 1.0}, "positive"),
    "cpo": ({"beta": 0.1, "lam": 1.0}, "positive"),
    "slic": ({"gamma": 1.0, "lam": 0.1}, "nonnegative"),
    "orpo": ({"lam": 0.1}, "positive"),
    "madpo": ({"beta": 0.1, "c_max": 2.0, "c_min": None, "lam": 1.0, "tau": math.log(999)}, "positive"),
    "beta_dpo": ({"beta": 0.1, "alpha": 0.6, "rho": 0.8, "momentum": 0.9, "seed": 0}, "positive"),
    "mi_dpo": ({"beta": 0.1, "prior": "dpo", "eta": 0.01, "gamma": 1.0}, "positive"),
}

# (name, hyperparameters, batch options): defaults for every objective, then non-default settings
CASES = [(n, {}, {}) for n in CLOSED_FORMS if n != "beta_dpo"] + [
    ("beta_dpo", {"rho": 1.0}, {}),
    ("dpo", {"beta": 0.5}, {}),
    ("cdpo", {"beta": 0.3, "label_smoothing": 0.25}, {}),
    ("robust_dpo", {"label_smoothing": 0.3}, {}),
    ("ipo", {"length_normalize": True}, {"scale": 0.5}),
    ("ipo", {"beta": 1.0}, {}),
    ("hinge", {"beta": 0.3}, {}),
    ("bce", {"beta": 0.3}, {}),
    ("nca", {"beta": 1.0}, {}),
    ("apo_zero", {"beta": 0.5}, {}),
    ("apo_down", {"beta": 0.5}, {}),
    ("sppo_hard", {"beta": 0.5}, {}),
    ("cal_dpo", {"beta": 0.5}, {"scale": 1.0}),
    ("dpop", {"beta": 0.3, "lam": 5.0}, {}),
    ("exo", {"beta": 0.5, "eps": 0.1}, {}),
    ("discopop", {"beta": 0.05, "tau": 0.5}, {}),
    ("r_dpo", {"alpha": 0.05}, {}),
    ("lsif", {}, {"scale": 1.0}),
    ("ukl", {}, {"scale": 1.0}),
    ("ddro", {}, {"scale": 1.0, "rl_max": 0.5}),
    ("ddro", {}, {"scale": 1.0, "rl_min": 0.8}),  # tangent continuation beyond e^{r_l} = 2 − 1e−6
    ("simpo", {"beta": 2.5, "gamma": 1.25}, {}),
    ("cpo", {"beta": 0.05, "lam": 0.5}, {}),
    ("slic", {"gamma": 20.0, "lam": 1.0}, {}),
    ("orpo", {"lam": 1.0}, {}),
    ("madpo", {"c_max": 4.0, "tau": 7.0}, {}),
    ("madpo", {"c_max": 3.0, "c_min": 0.5, "lam": 2.0, "tau": 2.0}, {}),
    ("mi_dpo", {"prior": "r_dpo", "eta": 0.05}, {}),
    ("mi_dpo", {"prior": "simpo", "beta": 2.0, "gamma": 1.0}, {}),
]


def _id(case):
    name, hp, opts = case
    return name + "".join(f"-{k}={v}" for k, v in {**hp, **opts}.items())


def test_catalogue_covers_every_objective():
    assert set(CLOSED_FORMS) == set(base_names()) == set(CATALOGUE)
    assert {n for n, _, _ in CASES} == set(base_names())


@pytest.mark.parametrize("name", sorted(CATALOGUE))
def test_defaults_and_sign_class(name):
    defaults, sign = CATALOGUE[name]
    cls = get_class(name)
    assert cls.defaults == defaults
    assert cls.incentive_sign == sign
    assert (("rc_" + name) in names()) == (sign != "signed")


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_closed_form_matches_autograd(case):
    name, hp, opts = case
    loss = build(name, **hp)
    for seed in (0, 1):
        b = make_batch(seed=seed, **opts)
        assert b.policy_chosen.dtype == torch.float32
        d_w, d_l = incentives(loss, b)
        e_w, e_l = CLOSED_FORMS[name](b, loss.hparams)
        torch.testing.assert_close(d_w, e_w, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(d_l, e_l, rtol=RTOL, atol=ATOL)


def test_closed_forms_see_both_sides_of_kinks():
    """The random batches exercise both branches of every indicator in the closed forms."""
    b = make_batch(0)
    _, _, rw, _, D, _, _ = fields(b)
    assert 0 < (0.1 * D < 1).float().mean() < 1  # hinge
    assert 0 < (rw < 0).float().mean() < 1  # dpop
    assert 0 < (b.margins > -math.log(999)).float().mean() < 1  # madpo cap
    assert 0 < (b.policy_chosen - b.policy_rejected < 20.0).float().mean() < 1  # slic, gamma = 20
    d_w, _ = incentives(build("nca"), b)
    assert (d_w < 0).any() and (d_w > 0).any()  # nca's chosen incentive crosses zero


def test_weights_scale_incentives():
    b = make_batch(3)
    b.weights = torch.rand(b.policy_chosen.shape, generator=torch.Generator().manual_seed(3))
    d_w, d_l = incentives(build("dpo"), b)
    e_w, e_l = cf_dpo(b, {"beta": 0.1})
    torch.testing.assert_close(d_w, b.weights * e_w, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(d_l, b.weights * e_l, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("rho", [0.8, 0.5])
def test_beta_dpo_filtered_incentives(rho):
    """Dropped pairs have zero incentive; the k = ⌊ρB⌋ kept ones (B/k)·β_b σ(−β_b Δ)."""
    loss = build("beta_dpo", rho=rho)
    b = make_batch(4)
    n = b.policy_chosen.numel()
    k = int(rho * n)
    d_w, d_l = incentives(loss, b)
    e, _ = cf_beta_dpo(b, loss.hparams)
    kept = d_w != 0
    assert int(kept.sum()) == k
    torch.testing.assert_close(d_w, d_l)
    torch.testing.assert_close(d_w[kept], (n / k) * e[kept], rtol=RTOL, atol=ATOL)
    d_w2, _ = incentives(loss, b)  # frozen: same draw, no state change
    torch.testing.assert_close(d_w, d_w2)


def test_beta_dpo_running_mean_enters_beta_b():
    loss = build("beta_dpo", rho=1.0)
    b1, b2 = make_batch(5), make_batch(6)
    loss(b1)  # updates M_0
    *_, D1, _, _ = fields(b1)
    m0_1 = (1 - 0.9) * (0.1 * D1).mean()
    d_w, d_l = incentives(loss, b2)
    e_w, e_l = cf_beta_dpo(b2, loss.hparams, m0_prev=m0_1)
    torch.testing.assert_close(d_w, e_w, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(d_l, e_l, rtol=RTOL, atol=ATOL)
