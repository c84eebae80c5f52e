"""Reward calibration (RC) of arXiv 2604.18239 (docs/losses.md, "Reward calibration"), the authors' algorithm plus
what a multi-rank, resumable trainer needs.

Per training call (one micro-batch), with the base objective's incentives d_w, d_l (exact, by autograd) and the
head score norms ‖s_w‖, ‖s_l‖:
    E_dw ← γ E_dw + (1−γ) log max(mean d_w, ε)       E_dl likewise      (γ = ema_decay = 0.98, init = first value)
    E_sw ← γ E_sw + (1−γ) log max(‖s_w‖, ε)          E_sl likewise      (no bias correction)
    α = exp(½[(E_sl − E_sw) − (E_dw − E_dl)])         so that α²·r_ema = r*_ema, the band centre
    z_w → α z_w + (1−α) sg(z_w),   z_l → α⁻¹ z_l + (1−α⁻¹) sg(z_l)      (forward value unchanged)
Beyond the authors:
  * under torch.distributed the four batch statistics are averaged over ranks first: every rank gets the same α;
  * when a micro-batch's mean incentive is ≤ 0 (SLiC/hinge once satisfied, IPO/cDPO past their target), the
    incentive ratio is undefined, so the incentive EMAs are not updated and α stays what the other EMAs give
    (the authors clamp at ε, which drives E_dl to log 1e-12 and α towards 0 or ∞). α is never NaN or inf;
  * `clamp_to_band=True` clamps log α² so that the calibrated instantaneous ratio stays inside the band, the
    clamp present but commented out in the authors' code;
  * state_dict()/load_state_dict() for checkpoints; `.alpha` is the last α, `.last` the last statistics;
  * `diagnostics(b)` reports the calibrated incentives α·d_w, d_l/α from the base incentives the update computed
    on `b`, without a second autograd pass.
Outside training (no grad, or z not requiring grad) the base loss runs unchanged and nothing is updated.
This module is a wrapper layer: it imports the objectives' base (po_plugins.objective), never the catalogue.
"""

from __future__ import annotations

import dataclasses
import math
import weakref

import torch

from ._dist import all_reduce, world_size
from .objective import Diagnostics, PairBatch, PairLoss, incentives

RC_DEFAULTS = {"ema_decay": 0.98, "eps": 1e-12, "clamp_to_band": False}


class RewardCalibrated(PairLoss):
    """`base` with reward calibration: forward value unchanged, gradient paths of z_w and z_l scaled by α and 1/α.

    Args:
        base: the objective to calibrate (any PairLoss whose incentives are not negative by design).
        ema_decay: γ of the four EMAs, in [0, 1). eps: floor inside the logs, > 0.
        clamp_to_band: clamp log α² so that the calibrated instantaneous ratio stays inside the band.
    """

    incentive_sign = "positive"

    def __init__(self, base: PairLoss, ema_decay: float = 0.98, eps: float = 1e-12, clamp_to_band: bool = False):
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"rc: ema_decay must be in [0, 1), got {ema_decay!r}")
        if not eps > 0:
            raise ValueError(f"rc: eps must be > 0, got {eps!r}")
        self.base = base
        self.name = "rc_" + base.name
        self.paper = "arXiv 2604.18239 Alg. 1 (reward calibration) on " + base.paper
        self.ema_decay, self.eps, self.clamp_to_band = float(ema_decay), float(eps), bool(clamp_to_band)
        self.hparams = {**base.hparams, "ema_decay": ema_decay, "eps": eps, "clamp_to_band": clamp_to_band}
        self.defaults = {**base.defaults, **RC_DEFAULTS}
        self.ema = {"dw": None, "dl": None, "sw": None, "sl": None}
        self.alpha = 1.0
        self.calls = 0
        self.last: dict[str, float] = {}
        self.last_incentives = None
        self._incentives_of = None  # weak reference to the z_w tensor of the micro-batch `last_incentives` belong to

    @property
    def needs(self):
        return tuple(self.base.needs) + ("score_stats",)

    def __call__(self, b: PairBatch) -> torch.Tensor:
        training = torch.is_grad_enabled() and b.policy_chosen.requires_grad and b.policy_rejected.requires_grad
        if not training:
            return self.base(b)
        self.check(b)
        alpha = self.update(b) if self.update_state else self.alpha
        zw, zl = b.policy_chosen, b.policy_rejected
        # = α z + (1−α) sg(z) of the paper, written so the forward value is bit-identical to z
        zw_rc = zw.detach() + alpha * (zw - zw.detach())
        zl_rc = zl.detach() + (1.0 / alpha) * (zl - zl.detach())
        return self.base(dataclasses.replace(b, policy_chosen=zw_rc, policy_rejected=zl_rc))

    def update(self, b: PairBatch) -> float:
        """One calibrator step on a micro-batch.

        Args:
            b: the micro-batch (with `score_stats`); the base objective's incentives on it are computed by autograd
                and kept in `last_incentives`.

        Returns:
            The new α.
        """
        d_w, d_l = incentives(self.base, b)
        self.last_incentives = (d_w, d_l)  # per-sample base incentives of this micro-batch (for `diagnostics`)
        self._incentives_of = weakref.ref(b.policy_chosen)
        st = b.score_stats
        stats = torch.stack([d_w.double().mean(), d_l.double().mean(),
                             torch.as_tensor(st.sw_norm).double().reshape(()).to(d_w.device),
                             torch.as_tensor(st.sl_norm).double().reshape(()).to(d_w.device),
                             torch.as_tensor(st.sw_dot_sl).double().reshape(()).to(d_w.device)])
        stats = _mean_over_ranks(stats)
        mdw, mdl, sw, sl, dot = (float(x) for x in stats.cpu())
        g, eps = self.ema_decay, self.eps

        def step(key, value):
            prev = self.ema[key]
            self.ema[key] = value if prev is None else g * prev + (1 - g) * value

        if mdw > 0 and mdl > 0 and math.isfinite(mdw) and math.isfinite(mdl):
            step("dw", math.log(max(mdw, eps)))
            step("dl", math.log(max(mdl, eps)))
        if sw > 0 and sl > 0 and math.isfinite(sw) and math.isfinite(sl):
            step("sw", math.log(max(sw, eps)))
            step("sl", math.log(max(sl, eps)))
        self.calls += 1
        if None in self.ema.values():
            log_delta = 0.0
        else:
            log_r_ema = self.ema["dw"] - self.ema["dl"]
            log_r_star_ema = self.ema["sl"] - self.ema["sw"]
            log_delta = log_r_star_ema - log_r_ema
            if self.clamp_to_band and mdw > 0 and mdl > 0:
                rho = dot / max(sw * sl, eps)
                log_rho = math.log(min(max(rho, eps), 1.0))
                log_r = math.log(mdw) - math.log(mdl)
                lo, hi = log_r_star_ema + log_rho - log_r, log_r_star_ema - log_rho - log_r
                log_delta = min(max(log_delta, lo), hi)
        self.alpha = math.exp(0.5 * log_delta)
        self.last = {"d_w": mdw, "d_l": mdl, "sw_norm": sw, "sl_norm": sl, "sw_dot_sl": dot,
                     "log_delta": log_delta, "alpha": self.alpha}
        return self.alpha

    def margin_weighting(self, b: PairBatch) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The base objective's margin weights (calibration leaves them as they are)."""
        return self.base.margin_weighting(b)

    def diagnostics(self, b: PairBatch) -> Diagnostics:
        """The calibrated objective's incentives on the micro-batch `b` it trained on, its α and the base's margin
        weights (docs/monitor.md, "Keys").

        When `update` ran on this very micro-batch, the incentives are its base incentives scaled by the α of the
        call, α·d_w and d_l/α (the calibrated incentives, docs/losses.md "Reward calibration"), with no second
        autograd pass; otherwise they are differentiated with the state frozen, as for any objective.

        Args:
            b: the micro-batch, as passed to the loss.

        Returns:
            Diagnostics with alpha = the current α.
        """
        alpha = float(self.alpha)
        of = self._incentives_of() if self._incentives_of is not None else None
        if self.last_incentives is not None and of is not None and of is b.policy_chosen:
            base_w, base_l = self.last_incentives
            d_w, d_l = alpha * base_w, base_l / alpha
        else:
            d_w, d_l = incentives(self, b)
        return Diagnostics(d_w, d_l, alpha, *(self.margin_weighting(b) or (None, None)))

    def with_base(self, base: PairLoss) -> RewardCalibrated:
        """This calibrator around another base objective, e.g. the same base with a chosen-NLL term folded in
        (`po_plugins.losses.with_chosen_nll`). `self` is left unchanged.

        Args:
            base: the new base objective.

        Returns:
            A new RewardCalibrated with this one's calibrator hyperparameters and running state (EMAs, α, call
            count, last statistics); its `hparams` are this one's, in their order, followed by those `base` adds.
        """
        new = RewardCalibrated(base, **{k: self.hparams[k] for k in RC_DEFAULTS})
        new.hparams = {k: new.hparams[k] for k in (*self.hparams, *new.hparams) if k in new.hparams}
        new.ema, new.alpha, new.calls, new.last = dict(self.ema), self.alpha, self.calls, dict(self.last)
        return new

    def state_dict(self) -> dict:
        return {"ema": dict(self.ema), "alpha": self.alpha, "calls": self.calls, "base": self.base.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.ema = dict(state["ema"])
        self.alpha = float(state["alpha"])
        self.calls = int(state["calls"])
        self.base.load_state_dict(state.get("base", {}))

    def __repr__(self) -> str:
        return f"rc({self.base!r}, ema_decay={self.ema_decay}, clamp_to_band={self.clamp_to_band})"


def _mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    return all_reduce(t, "sum") / world_size()
