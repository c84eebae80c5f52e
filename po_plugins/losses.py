"""Pairwise preference objectives on sequence log-probs, one small class each, and the registry that builds them.

Conventions (docs/losses.md, "Conventions"): z_w, z_l are policy log-probs **summed** over response tokens, z^ref
the reference ones, r = z − z^ref the implicit rewards, Δ = r_w − r_l, m = z_w − z_l, |y| the response token count
and z̄ = z/|y| the token mean. Every loss returns per-sample values [B] (the caller reduces); inputs of any float
dtype are computed in fp32. `PairBatch.weights`, when given, multiply the per-sample losses (detached).

Layers (pictured in po_plugins/objective.py): the base (`PairBatch`, `PairLoss`, `incentives`, re-exported here)
is po_plugins.objective; this module holds the catalogue, the chosen-NLL wrapper `ChosenNLL` and the registry
(`build`, `names`, `accepted_hparams`, `with_chosen_nll`). `build("rc_<name>")` wraps an objective in reward
calibration (po_plugins.rc, which imports only the base).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .madpo import margin_weights, scale_c
from .objective import NEEDS, Diagnostics, PairBatch, PairLoss, _fp32, incentives  # noqa: F401  (re-exported)
from .rc import RC_DEFAULTS, RewardCalibrated

logsig = F.logsigmoid


_REGISTRY: dict[str, type[PairLoss]] = {}


def register(cls: type[PairLoss]) -> type[PairLoss]:
    """Class decorator: add an objective to the catalogue under its `name` (`build`, `names`)."""
    _REGISTRY[cls.name] = cls
    return cls


# ---- shorthands -------------------------------------------------------------------------------------------
def _rw(b):
    return b.policy_chosen - b.ref_chosen


def _rl(b):
    return b.policy_rejected - b.ref_rejected


def _delta(b):
    # (z_w − z_l) − (z_w^ref − z_l^ref): OpenRLHF's DPOLoss order, so `dpo` matches it bit for bit
    return (b.policy_chosen - b.policy_rejected) - (b.ref_chosen - b.ref_rejected)


def _len(t, like):
    return t.to(like).clamp(min=1)


def _mean_w(b):
    return b.policy_chosen / _len(b.chosen_tokens, b.policy_chosen)


def _mean_l(b):
    return b.policy_rejected / _len(b.rejected_tokens, b.policy_rejected)


def _log1mexp(x):
    """log(1 − e^x) for x < 0, stable on both sides of −log 2."""
    x = x.clamp(max=-1e-7)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _in_unit(name, key, value, hi=1.0, hi_open=True):
    if not (0.0 <= value < hi if hi_open else 0.0 <= value <= hi):
        raise ValueError(f"loss '{name}': {key} must be in [0, {hi}{')' if hi_open else ']'}, got {value!r}")


# ---- reference-based logistic family ----------------------------------------------------------------------
@register
class DPO(PairLoss):
    """DPO (Rafailov et al. 2023, arXiv 2305.18290, Eq. 7): −log σ(βΔ)."""

    name, paper, defaults = "dpo", "arXiv 2305.18290 Eq. 7", {"beta": 0.1}

    def forward(self, b):
        return -logsig(self.beta * _delta(b))


@register
class CDPO(PairLoss):
    """Conservative DPO (Mitchell 2023 note; OpenRLHF `--model.label_smoothing`): −(1−ε)log σ(βΔ) − ε log σ(−βΔ)."""

    name, paper, defaults = "cdpo", "cDPO note (Mitchell 2023), Eq. 3", {"beta": 0.1, "label_smoothing": 0.1}
    incentive_sign = "target"

    def validate(self):
        super().validate()
        _in_unit(self.name, "label_smoothing", self.label_smoothing, 0.5)

    def forward(self, b):
        x = self.beta * _delta(b)
        return -(1 - self.label_smoothing) * logsig(x) - self.label_smoothing * logsig(-x)


@register
class RobustDPO(PairLoss):
    """Provably robust DPO (Chowdhury et al. 2024, arXiv 2403.00409, Eq. 8): [−(1−ε)log σ(βΔ) + ε log σ(−βΔ)]/(1−2ε)."""

    name, paper, defaults = "robust_dpo", "arXiv 2403.00409 Eq. 8", {"beta": 0.1, "label_smoothing": 0.1}

    def validate(self):
        super().validate()
        _in_unit(self.name, "label_smoothing", self.label_smoothing, 0.5)

    def forward(self, b):
        x, e = self.beta * _delta(b), self.label_smoothing
        return (-(1 - e) * logsig(x) + e * logsig(-x)) / (1 - 2 * e)


@register
class IPO(PairLoss):
    """IPO (Azar et al. 2023, arXiv 2310.12036, Eq. 17): (Δ − 1/(2β))², summed log-ratios as OpenRLHF's DPOLoss;
    `length_normalize=True` uses per-token log-ratios as TRL does."""

    name, paper, defaults = "ipo", "arXiv 2310.12036 Eq. 17", {"beta": 0.1, "length_normalize": False}
    incentive_sign = "target"

    @property
    def needs(self):
        return ("ref", "tokens") if self.length_normalize else ("ref",)

    def forward(self, b):
        if self.length_normalize:
            d = _rw(b) / _len(b.chosen_tokens, b.policy_chosen) - _rl(b) / _len(b.rejected_tokens, b.policy_chosen)
        else:
            d = _delta(b)
        return (d - 1 / (2 * self.beta)) ** 2


@register
class Hinge(PairLoss):
    """Hinge / RSO (Liu et al. 2023, arXiv 2309.06657, Eq. 9 with ref): max(0, 1 − βΔ)."""

    name, paper, defaults = "hinge", "arXiv 2309.06657 (hinge on βΔ)", {"beta": 0.1}
    incentive_sign = "nonnegative"

    def forward(self, b):
        return F.relu(1 - self.beta * _delta(b))


@register
class BCE(PairLoss):
    """BCE / BCO-pair (Jung et al. 2024, arXiv 2404.04656; RC paper's BCE): −log σ(βr_w) − log σ(−βr_l).
    β = 1 gives the RC paper's table (d_w = σ(−r_w), d_l = σ(r_l))."""

    name, paper, defaults = "bce", "arXiv 2404.04656; arXiv 2604.18239 Table 1", {"beta": 1.0}

    def forward(self, b):
        return -logsig(self.beta * _rw(b)) - logsig(-self.beta * _rl(b))


@register
class NCA(PairLoss):
    """NCA (Chen et al. 2024, arXiv 2402.05369, pairwise): −log σ(βr_w) − ½log σ(−βr_w) − ½log σ(−βr_l)."""

    name, paper, defaults = "nca", "arXiv 2402.05369 Eq. 10", {"beta": 0.1}
    incentive_sign = "target"

    def forward(self, b):
        rw, rl = self.beta * _rw(b), self.beta * _rl(b)
        return -logsig(rw) - 0.5 * logsig(-rw) - 0.5 * logsig(-rl)


@register
class APOZero(PairLoss):
    """APO-zero (D'Oosterlinck et al. 2024, arXiv 2408.06266): (1 − σ(βr_w)) + σ(βr_l)."""

    name, paper, defaults = "apo_zero", "arXiv 2408.06266 Eq. 7", {"beta": 0.1}

    def forward(self, b):
        return 1 - torch.sigmoid(self.beta * _rw(b)) + torch.sigmoid(self.beta * _rl(b))


@register
class APODown(PairLoss):
    """APO-down (D'Oosterlinck et al. 2024, arXiv 2408.06266): σ(βr_w) + (1 − σ(βΔ)); lowers the chosen by design."""

    name, paper, defaults = "apo_down", "arXiv 2408.06266 Eq. 8", {"beta": 0.1}
    incentive_sign = "signed"

    def forward(self, b):
        return torch.sigmoid(self.beta * _rw(b)) + 1 - torch.sigmoid(self.beta * _delta(b))


@register
class SPPOHard(PairLoss):
    """SPPO, hard-label pairwise form (Wu et al. 2024, arXiv 2405.00675, as in TRL):
    (r_w − 1/(2β))² + (r_l + 1/(2β))²."""

    name, paper, defaults = "sppo_hard", "arXiv 2405.00675 Eq. 4 (hard labels)", {"beta": 0.1}
    incentive_sign = "target"

    def forward(self, b):
        t = 1 / (2 * self.beta)
        return (_rw(b) - t) ** 2 + (_rl(b) + t) ** 2


@register
class CalDPO(PairLoss):
    """Cal-DPO (Xiao et al. 2024, arXiv 2412.14516): −log σ(Δ) + (r_w − 1/(2β))² + (r_l + 1/(2β))²."""

    name, paper, defaults = "cal_dpo", "arXiv 2412.14516 Eq. 9", {"beta": 0.1}
    incentive_sign = "target"

    def forward(self, b):
        t = 1 / (2 * self.beta)
        return -logsig(_delta(b)) + (_rw(b) - t) ** 2 + (_rl(b) + t) ** 2


@register
class DPOP(PairLoss):
    """DPO-Positive (Pal et al. 2024, arXiv 2402.13228, Eq. 3): −log σ(β(Δ − λ·max(0, z_w^ref − z_w)))."""

    name, paper, defaults = "dpop", "arXiv 2402.13228 Eq. 3", {"beta": 0.1, "lam": 50.0}

    def forward(self, b):
        penalty = F.relu(b.ref_chosen - b.policy_chosen)
        return -logsig(self.beta * (_delta(b) - self.lam * penalty))


@register
class EXO(PairLoss):
    """EXO, pairwise (Ji et al. 2024, arXiv 2402.00856): KL(σ(βΔ), 1−σ(βΔ) ‖ 1−ε, ε)."""

    name, paper, defaults = "exo", "arXiv 2402.00856 Eq. 11 (K=2)", {"beta": 0.1, "eps": 1e-3}
    incentive_sign = "target"

    def validate(self):
        super().validate()
        if not 0 < self.eps < 0.5:
            raise ValueError(f"loss 'exo': eps must be in (0, 0.5), got {self.eps!r}")

    def forward(self, b):
        x = self.beta * _delta(b)
        lq_w, lq_l = logsig(x), logsig(-x)
        return lq_w.exp() * (lq_w - math.log1p(-self.eps)) + lq_l.exp() * (lq_l - math.log(self.eps))


@register
class DiscoPOP(PairLoss):
    """DiscoPOP / log-ratio modulated loss (Chris Lu et al. 2024, arXiv 2406.08414, Eq. 5):
    (1 − σ(βΔ/τ))·(−log σ(βΔ)) + σ(βΔ/τ)·exp(−βΔ)."""

    name, paper, defaults = "discopop", "arXiv 2406.08414 Eq. 5", {"beta": 0.1, "tau": 0.05}
    incentive_sign = "signed"

    def forward(self, b):
        x = self.beta * _delta(b)
        # σ(x/τ)·e^{−x} in the log domain: finite wherever the product is, even when e^{−x} alone overflows
        return torch.sigmoid(-x / self.tau) * -logsig(x) + torch.exp(logsig(x / self.tau) - x)


@register
class RDPO(PairLoss):
    """R-DPO, length-regularised (Park et al. 2024, arXiv 2403.19159, Eq. 9): −log σ(βΔ + α(|y_w| − |y_l|)).
    A longer chosen response already raises the logit, so length alone earns less push."""

    name, paper, defaults = "r_dpo", "arXiv 2403.19159 Eq. 9", {"beta": 0.1, "alpha": 0.01}
    needs = ("ref", "tokens")

    def forward(self, b):
        return -logsig(self.beta * _delta(b) + self.alpha * (b.chosen_tokens.to(b.policy_chosen)
                                                             - b.rejected_tokens.to(b.policy_chosen)))


# ---- density-ratio family (RC paper Table 1) --------------------------------------------------------------
@register
class LSIF(PairLoss):
    """LSIF (density-ratio matching, Kim et al. 2025; arXiv 2604.18239 Table 1): −e^{r_w} + ½e^{2r_l}."""

    name, paper, defaults = "lsif", "arXiv 2604.18239 Table 1 (LSIF)", {}

    def forward(self, b):
        return -torch.exp(_rw(b)) + 0.5 * torch.exp(2 * _rl(b))


@register
class UKL(PairLoss):
    """UKL (unnormalised KL ratio matching; arXiv 2604.18239 Table 1): −z_w + e^{r_l}."""

    name, paper, defaults = "ukl", "arXiv 2604.18239 Table 1 (UKL)", {}

    def forward(self, b):
        return -b.policy_chosen + torch.exp(_rl(b))


@register
class DDRO(PairLoss):
    """DDRO (arXiv 2604.18239 Table 1): [log 2 − r_w] + [log 2 − log(2 − e^{r_l})], the rejected term continued
    by its tangent line once e^{r_l} ≥ 2 − 1e−6 (as in the authors' code)."""

    name, paper, defaults = "ddro", "arXiv 2604.18239 Table 1 (DDRO)", {}
    _cap = 2.0 - 1e-6

    def forward(self, b):
        rl = _rl(b)
        r0 = math.log(self._cap)
        inside = math.log(2) - torch.log(2 - torch.exp(rl.clamp(max=r0)))
        slope = self._cap / (2 - self._cap)
        tangent = math.log(2) - math.log(2 - self._cap) + slope * (rl - r0)
        return math.log(2) - _rw(b) + torch.where(rl < r0, inside, tangent)


# ---- reference-free family --------------------------------------------------------------------------------
@register
class SimPO(PairLoss):
    """SimPO (Meng et al. 2024, arXiv 2405.14734, Eq. 6): −log σ(β(z̄_w − z̄_l) − γ), reference-free."""

    name, paper, defaults = "simpo", "arXiv 2405.14734 Eq. 6", {"beta": 2.0, "gamma": 1.0}
    needs = ("tokens",)

    def forward(self, b):
        return -logsig(self.beta * (_mean_w(b) - _mean_l(b)) - self.gamma)


@register
class CPO(PairLoss):
    """CPO (Xu et al. 2024, arXiv 2401.08417, Eq. 8): −log σ(β(z_w − z_l)) + λ·NLL(y_w), NLL token-mean."""

    name, paper, defaults = "cpo", "arXiv 2401.08417 Eq. 8", {"beta": 0.1, "lam": 1.0}
    needs = ("tokens",)

    def forward(self, b):
        return -logsig(self.beta * (b.policy_chosen - b.policy_rejected)) - self.lam * _mean_w(b)


@register
class SLiC(PairLoss):
    """SLiC-HF (Zhao et al. 2023, arXiv 2305.10425, Eq. 3): max(0, δ − (z_w − z_l)) + λ·NLL(y_w), NLL token-mean.
    The calibration margin δ is called `gamma` as in the RC authors' code."""

    name, paper, defaults = "slic", "arXiv 2305.10425 Eq. 3", {"gamma": 1.0, "lam": 0.1}
    needs = ("tokens",)
    incentive_sign = "nonnegative"

    def forward(self, b):
        return F.relu(self.gamma - (b.policy_chosen - b.policy_rejected)) - self.lam * _mean_w(b)


@register
class ORPO(PairLoss):
    """ORPO (Hong et al. 2024, arXiv 2403.07691, Eq. 6): NLL(y_w) − λ log σ(log odds(ȳ_w) − log odds(ȳ_l)),
    log odds(y) = z̄ − log(1 − e^{z̄}) on token-mean log-probs."""

    name, paper, defaults = "orpo", "arXiv 2403.07691 Eq. 6", {"lam": 0.1}
    needs = ("tokens",)

    def forward(self, b):
        zw, zl = _mean_w(b), _mean_l(b)
        log_or = (zw - _log1mexp(zw)) - (zl - _log1mexp(zl))
        return -zw - self.lam * logsig(log_or)


# ---- margin- and batch-adaptive ---------------------------------------------------------------------------
@register
class MADPO(PairLoss):
    """MADPO (Rho 2025, arXiv 2510.05342, Eq. 7): −w(ĥ)·log σ(βΔ) with w = po_plugins.madpo.margin_weights
    (docs/losses.md, "MADPO weights")."""

    name, paper = "madpo", "arXiv 2510.05342 Eq. 7"
    defaults = {"beta": 0.1, "c_max": 2.0, "c_min": None, "lam": 1.0, "tau": math.log(999)}
    needs = ("ref", "margins")

    def validate(self):
        super().validate()
        scale_c(torch.zeros(1), self.c_max, self.c_min, self.lam, self.tau)  # raises on bad values

    def forward(self, b):
        w = margin_weights(b.margins, self.c_max, self.c_min, self.lam, self.tau).to(b.policy_chosen)
        return -w * logsig(self.beta * _delta(b))

    def margin_weighting(self, b: PairBatch) -> tuple[torch.Tensor, torch.Tensor] | None:
        """w(ĥ) [B] fp32 as `forward` applies it, and the pairs at the cap ĥ ≤ −τ (weight 1); None without margins."""
        if b.margins is None:
            return None
        return margin_weights(b.margins, self.c_max, self.c_min, self.lam, self.tau), b.margins <= -self.tau


@register
class BetaDPO(PairLoss):
    """β-DPO (Wu et al. 2024, arXiv 2407.08639), batch-adaptive β with Gaussian data filtering, as in the MADPO
    authors' baseline: M_i = β0Δ_i; M_0, σ_M running means (momentum 0.9, init 0 and 1); β_b = β0(1 + α(M̄ − M_0));
    keep ⌊ρB⌋ pairs drawn without replacement ∝ exp(−½((M_i − M_0)/σ_M)²); DPO with β_b on the kept pairs.
    Dropped pairs get loss 0 and kept ones are scaled by B/k so that the batch mean is the mean over kept pairs."""

    name, paper = "beta_dpo", "arXiv 2407.08639 Alg. 1 (MADPO authors' baseline)"
    defaults = {"beta": 0.1, "alpha": 0.6, "rho": 0.8, "momentum": 0.9, "seed": 0}
    incentive_sign = "positive"  # while β_b > 0; the paper's critique is that it can turn negative

    def __init__(self, **hp):
        super().__init__(**hp)
        self.m0, self.sigma = 0.0, 1.0
        self.gen = torch.Generator().manual_seed(int(self.seed))

    def validate(self):
        super().validate()
        if not 0 < self.rho <= 1:
            raise ValueError(f"loss 'beta_dpo': rho must be in (0, 1], got {self.rho!r}")

    def forward(self, b):
        delta = _delta(b)
        m = self.beta * delta.detach()
        mbar = float(m.mean())
        std = float(m.std()) if m.numel() > 1 else 0.0
        m0 = self.momentum * self.m0 + (1 - self.momentum) * mbar
        sigma = self.momentum * self.sigma + (1 - self.momentum) * (std + 1e-6)
        beta_b = self.beta * (1 + self.alpha * (mbar - m0))
        k = max(1, int(self.rho * m.numel()))
        p = torch.exp(-0.5 * ((m - m0) / sigma) ** 2).cpu().double() + 1e-300
        gen_state = self.gen.get_state()
        keep_idx = torch.multinomial(p, k, replacement=False, generator=self.gen)
        if self.update_state:
            self._used = (self.m0, self.sigma, gen_state)  # the state this step used: `diagnostics` replays it
            self.m0, self.sigma, self.beta_batch = m0, sigma, beta_b
        else:
            self.gen.set_state(gen_state)
        keep = torch.zeros_like(delta)
        keep[keep_idx.to(delta.device)] = m.numel() / k
        return -keep * logsig(beta_b * delta)

    def diagnostics(self, b):
        """The incentives of the training forward that just ran on `b`: its running statistics and keep-set are
        replayed from before that forward's update (the monitor calls this after the loss), then restored."""
        used = getattr(self, "_used", None)
        if used is None:
            return super().diagnostics(b)
        now = (self.m0, self.sigma, self.gen.get_state())
        self.m0, self.sigma = used[0], used[1]
        self.gen.set_state(used[2])
        try:
            return super().diagnostics(b)
        finally:
            self.m0, self.sigma = now[0], now[1]
            self.gen.set_state(now[2])

    def state_dict(self):
        return {"m0": self.m0, "sigma": self.sigma, "gen": self.gen.get_state()}

    def load_state_dict(self, state):
        self.m0, self.sigma = float(state["m0"]), float(state["sigma"])
        self.gen.set_state(state["gen"])


# ---- MI-DPO: the general prior form -----------------------------------------------------------------------
def _prior_dpo(z, ref, tokens, chosen, hp):
    return ref


def _prior_r_dpo(z, ref, tokens, chosen, hp):
    return ref - hp["eta"] * tokens.to(z) / hp["beta"]


def _prior_simpo(z, ref, tokens, chosen, hp):
    return (1 - 1 / tokens.to(z).clamp(min=1)) * z + (hp["gamma"] / hp["beta"] if chosen else 0.0)


MI_PRIORS: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "dpo": (_prior_dpo, ("ref",)),
    "r_dpo": (_prior_r_dpo, ("ref", "tokens")),
    "simpo": (_prior_simpo, ("tokens",)),
}


@register
class MIDPO(PairLoss):
    """MI-DPO (Tutnov et al. 2025, arXiv 2501.01544): −log σ(β[(z_w − log ζ(y_w)) − (z_l − log ζ(y_l))]).

    `prior` picks log ζ: "dpo" (ζ = π_ref: DPO), "r_dpo" (π_ref·e^{−η|y|/β}: R-DPO with α = η), "simpo"
    (π_θ^{1−1/|y|}·e^{γ·1[y=y_w]/β}: SimPO), or a callable (z, ref, tokens, is_chosen, hparams) -> log ζ.
    The prior's algebra is derived in docs/losses.md ("MI-DPO priors"), not taken from the paper's text."""

    name, paper = "mi_dpo", "arXiv 2501.01544 Eq. 4"
    defaults = {"beta": 0.1, "prior": "dpo", "eta": 0.01, "gamma": 1.0}

    def validate(self):
        super().validate()
        if not callable(self.prior) and self.prior not in MI_PRIORS:
            raise ValueError(f"loss 'mi_dpo': prior must be one of {sorted(MI_PRIORS)} or a callable, "
                             f"got {self.prior!r}")

    @property
    def needs(self):
        return ("ref", "tokens") if callable(self.prior) else MI_PRIORS[self.prior][1]

    def forward(self, b):
        fn = self.prior if callable(self.prior) else MI_PRIORS[self.prior][0]
        lw = fn(b.policy_chosen, b.ref_chosen, b.chosen_tokens, True, self.hparams)
        ll = fn(b.policy_rejected, b.ref_rejected, b.rejected_tokens, False, self.hparams)
        return -logsig(self.beta * ((b.policy_chosen - lw) - (b.policy_rejected - ll)))


# ---- wrapper: + NLL of the chosen response (uses only the base layer) -------------------------------------
class ChosenNLL(PairLoss):
    """`base` + coef·NLL of the chosen response (token mean), per pair: RPO's form (arXiv 2404.19733 Eq. 3),
        ℓ_i = ℓ_base,i − coef·z_w,i / |y_w,i|
    which is what OpenRLHF's --model.nll_loss_coef and LLaMA-Factory's pref_ftx add outside the loss. Folded into
    the objective, the term is part of the incentives (d_w,i gains coef/|y_w,i|), of RC's α (an rc_ objective scales
    it with the chosen path) and of the band. Row weights multiply it like the rest of the row's loss
    (docs/losses.md, "Equivalence with OpenRLHF's DPOLoss").

    Args:
        base: the objective the term is added to. coef: the NLL coefficient, a finite number ≥ 0.
    """

    incentive_sign = "positive"

    def __init__(self, base: PairLoss, coef: float):
        if not (isinstance(coef, (int, float)) and coef >= 0 and math.isfinite(coef)):
            raise ValueError(f"the chosen-NLL coefficient must be a finite number >= 0, got {coef!r}")
        self.base, self.coef = base, float(coef)
        self.name, self.paper = base.name, base.paper + " + chosen NLL (arXiv 2404.19733)"
        self.defaults = {**base.defaults, "nll_coef": 0.0}
        self.hparams = {**base.hparams, "nll_coef": self.coef}
        self.incentive_sign = base.incentive_sign

    @property
    def needs(self):
        return tuple(dict.fromkeys((*self.base.needs, "tokens")))

    def __call__(self, b: PairBatch) -> torch.Tensor:
        self.check(b)
        out = self.base(b)
        nll = -b.policy_chosen.float() / _len(b.chosen_tokens, b.policy_chosen.float())
        if b.weights is not None:
            nll = nll * b.weights.detach().to(nll)
        return out + self.coef * nll

    @contextlib.contextmanager
    def frozen(self):
        with self.base.frozen():
            yield self

    def margin_weighting(self, b: PairBatch) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The base objective's margin weights (the NLL term has none of its own)."""
        return self.base.margin_weighting(b)

    def state_dict(self) -> dict:
        return self.base.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.base.load_state_dict(state)

    def __repr__(self) -> str:
        return f"{self.base!r} + {self.coef}·NLL(chosen)"


# ---- registry ---------------------------------------------------------------------------------------------
RC_PREFIX = "rc_"


def with_chosen_nll(loss: PairLoss, coef: float) -> PairLoss:
    """`loss` with coef·NLL of the chosen response folded in (`ChosenNLL`).

    A reward-calibrated objective calibrates the whole objective, so there the term goes inside the calibration:
    the result is the same calibrator around `ChosenNLL(loss.base, coef)` (`RewardCalibrated.with_base`).

    Args:
        loss: the objective, as `build` returns it. coef: the NLL coefficient, a finite number ≥ 0 (0: none).

    Returns:
        `loss` itself when coef is 0, else a new objective (`loss` is left unchanged); ValueError on a bad coef.
    """
    if not coef:
        return loss
    if isinstance(loss, RewardCalibrated):
        return loss.with_base(ChosenNLL(loss.base, coef))
    return ChosenNLL(loss, coef)


def base_names() -> list[str]:
    """The catalogue's objective names, in registration order (docs/losses.md, "Catalogue")."""
    return list(_REGISTRY)


def calibratable(name: str) -> bool:
    """RC is offered where the incentives are positive in the objective's working regime (all but "signed").

    Args:
        name: a catalogue name (`base_names()`).

    Returns:
        True when `build("rc_" + name)` exists.
    """
    return _REGISTRY[name].incentive_sign != "signed"


def names() -> list[str]:
    """Every accepted loss name: the objectives, then rc_<name> for each calibratable one."""
    return base_names() + [RC_PREFIX + n for n in base_names() if calibratable(n)]


def get_class(name: str) -> type[PairLoss]:
    """The catalogue class of an objective name (no rc_ prefix); ValueError listing the choices when unknown."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown loss '{name}'; choose one of: {', '.join(names())}")
    return _REGISTRY[name]


def build(name: str, **hparams) -> PairLoss:
    """Build a loss by name.

    Args:
        name: one of `names()`; `rc_<name>` wraps the objective in reward calibration (po_plugins.rc).
        **hparams: the objective's hyperparameters by their papers' names (`accepted_hparams(name)`); `rc_<name>`
            also accepts the calibrator's (`ema_decay`, `eps`, `clamp_to_band`).

    Returns:
        The objective, a PairLoss. ValueError naming the accepted choices on an unknown name or hyperparameter.
    """
    if name.startswith(RC_PREFIX) and name[len(RC_PREFIX):] in _REGISTRY:
        base_name = name[len(RC_PREFIX):]
        if not calibratable(base_name):
            raise ValueError(f"loss '{name}': '{base_name}' has incentives that are negative by design, so reward "
                             f"calibration is undefined for it; calibratable: "
                             f"{', '.join(n for n in names() if n.startswith(RC_PREFIX))}")
        unknown = sorted(set(hparams) - set(get_class(base_name).defaults) - set(RC_DEFAULTS))
        if unknown:
            raise ValueError(f"loss '{name}': unknown hyperparameter(s) {unknown}; accepted: "
                             f"{', '.join(sorted(accepted_hparams(name)))}")
        rc_hp = {k: hparams.pop(k) for k in list(hparams) if k in RC_DEFAULTS}
        return RewardCalibrated(get_class(base_name)(**hparams), **rc_hp)
    if name not in _REGISTRY:
        raise ValueError(f"unknown loss '{name}'; choose one of: {', '.join(names())}")
    return _REGISTRY[name](**hparams)


def accepted_hparams(name: str) -> dict[str, Any]:
    """Defaults of every hyperparameter `build(name, ...)` accepts.

    Args:
        name: one of `names()`.

    Returns:
        {hyperparameter: default}; ValueError listing the choices when the name is unknown.
    """
    if name.startswith(RC_PREFIX) and name[len(RC_PREFIX):] in _REGISTRY:
        return {**get_class(name[len(RC_PREFIX):]).defaults, **RC_DEFAULTS}
    return dict(get_class(name).defaults)
