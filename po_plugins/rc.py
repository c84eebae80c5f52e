"""Reward calibration (RC) of arXiv 2604.18239 (docs/losses.md, "Reward calibration"), the authors' algorithm plus
what a multi-rank, resumable trainer needs, and a target that moves the incentive ratio only as far as the band
requires.

Per training call (one micro-batch), with the base objective's incentives d_w, d_l (exact, by autograd) and the
head score norms ‖s_w‖, ‖s_l‖, four EMAs (γ = ema_decay = 0.98):
    x_dw = log max(mean d_w, ε), x_dl likewise, x_sw = log max(‖s_w‖, ε), x_sl likewise
    rc_ema_init "zero":  E ← γ E + (1−γ) x from E = 0, read as Ê = E / (1 − γⁿ), n = that EMA's update count
    rc_ema_init "first": E ← x on its first update, then γ E + (1−γ) x; Ê = E     (the authors' code, bit for bit)
    rc_target "center":  α = exp(½[(Ê_sl − Ê_sw) − (Ê_dw − Ê_dl)])      so that α²·r_ema = r*_ema, the band centre
    rc_target "nearest": with this micro-batch's own band (po_plugins.band.band_stats: log r = log(mean d_w/mean d_l),
        edges log r* ± log ρ) shrunk by rc_margin·(−log ρ) on each side to [lo, hi]:
        α = 1 while lo ≤ log r ≤ hi, else α² = exp(clamp(log r, lo, hi) − log r)   (the nearest shrunk edge)
    z_w → α z_w + (1−α) sg(z_w),   z_l → α⁻¹ z_l + (1−α⁻¹) sg(z_l)      (forward value unchanged)
The EMAs are updated in both targets ("nearest" does not read them), so `last["log_delta_center"]` always shows
what the centre target would apply and a run can switch target on resume.
Beyond the authors:
  * under torch.distributed the five batch statistics are averaged over ranks first: every rank gets the same α;
  * when a micro-batch's mean incentive is ≤ 0 (SLiC/hinge once satisfied, IPO/cDPO past their target), the
    incentive ratio is undefined, so the incentive EMAs are not updated and α stays what the other EMAs give
    (the authors clamp at ε, which drives E_dl to log 1e-12 and α towards 0 or ∞); "nearest" gives α = 1 there,
    and where ρ ≤ 0 (every ratio is in band). α is never NaN or inf;
  * `clamp_to_band=True` (centre target) clamps log α² so that the calibrated instantaneous ratio α²·r lies in
    this micro-batch's band shrunk by rc_margin, the clamp present but commented out in the authors' code
    (theirs measures the band around the EMAs' centre);
  * state_dict()/load_state_dict() for checkpoints (a state without update counts is the authors' "first" EMAs
    and continues as such); `.alpha` is the last α, `.last` the last statistics and the target used;
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
from .band import band_stats
from .objective import Diagnostics, PairBatch, PairLoss, incentives
from .scores import ReusedStats

RC_DEFAULTS = {"ema_decay": 0.98, "eps": 1e-12, "clamp_to_band": False, "rc_target": "center", "rc_margin": 0.1,
               "rc_ema_init": "zero"}
TARGETS = ("center", "nearest")
EMA_INITS = ("zero", "first")
_KEYS = ("dw", "dl", "sw", "sl")


class RewardCalibrated(PairLoss):
    """`base` with reward calibration: forward value unchanged, gradient paths of z_w and z_l scaled by α and 1/α.

    Args:
        base: the objective to calibrate (any PairLoss whose incentives are not negative by design).
        ema_decay: γ of the four EMAs, in [0, 1). eps: floor inside the logs, > 0.
        clamp_to_band: with the centre target, clamp log α² so that the calibrated instantaneous ratio lies inside
            this micro-batch's band shrunk by `rc_margin`.
        rc_target: "center" (α²·r_ema = r*_ema) or "nearest" (α = 1 inside the micro-batch's shrunk band, else its
            nearest edge).
        rc_margin: the fraction of the band's half-width kept clear of each edge by "nearest" and the clamp, in
            [0, 1] (1: the band's centre).
        rc_ema_init: "zero" (zero start, bias-corrected) or "first" (each EMA starts at its first value, the
            authors' code).
    """

    incentive_sign = "positive"

    def __init__(self, base: PairLoss, ema_decay: float = 0.98, eps: float = 1e-12, clamp_to_band: bool = False,
                 rc_target: str = "center", rc_margin: float = 0.1, rc_ema_init: str = "zero"):
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"rc: ema_decay must be in [0, 1), got {ema_decay!r}")
        if not eps > 0:
            raise ValueError(f"rc: eps must be > 0, got {eps!r}")
        if rc_target not in TARGETS:
            raise ValueError(f"rc: rc_target must be one of {', '.join(TARGETS)}, got {rc_target!r}")
        if isinstance(rc_margin, bool) or not isinstance(rc_margin, (int, float)) or not 0.0 <= rc_margin <= 1.0:
            raise ValueError(f"rc: rc_margin must be a number in [0, 1] (the share of the band's half-width kept "
                             f"clear of each edge), got {rc_margin!r}")
        if rc_ema_init not in EMA_INITS:
            raise ValueError(f"rc: rc_ema_init must be one of {', '.join(EMA_INITS)} (first: the authors' code), "
                             f"got {rc_ema_init!r}")
        self.base = base
        self.name = "rc_" + base.name
        self.paper = "arXiv 2604.18239 Alg. 1 (reward calibration) on " + base.paper
        self.ema_decay, self.eps, self.clamp_to_band = float(ema_decay), float(eps), bool(clamp_to_band)
        self.rc_target, self.rc_margin, self.rc_ema_init = rc_target, float(rc_margin), rc_ema_init
        self.hparams = {**base.hparams, "ema_decay": ema_decay, "eps": eps, "clamp_to_band": clamp_to_band,
                        "rc_target": rc_target, "rc_margin": rc_margin, "rc_ema_init": rc_ema_init}
        self.defaults = {**base.defaults, **RC_DEFAULTS}
        # each EMA's accumulator E (None before its first update) and its number of updates n
        self.ema: dict[str, float | None] = dict.fromkeys(_KEYS)
        self.ema_n = dict.fromkeys(_KEYS, 0)
        self.alpha = 1.0
        self.calls = 0
        self.last: dict = {}
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

    def ema_value(self, key: str) -> float | None:
        """The EMA `key` ("dw", "dl", "sw", "sl") as α reads it: bias-corrected under rc_ema_init "zero"; None
        before its first update."""
        e, n = self.ema[key], self.ema_n[key]
        if e is None or self.rc_ema_init == "first":
            return e
        return e / (1.0 - self.ema_decay ** n)

    def _step(self, key: str, value: float) -> None:
        prev, g = self.ema[key], self.ema_decay
        if prev is None:
            self.ema[key] = value if self.rc_ema_init == "first" else (1 - g) * value
        else:
            self.ema[key] = g * prev + (1 - g) * value
        self.ema_n[key] += 1

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
        eps = self.eps

        if mdw > 0 and mdl > 0 and math.isfinite(mdw) and math.isfinite(mdl):
            self._step("dw", math.log(max(mdw, eps)))
            self._step("dl", math.log(max(mdl, eps)))
        fresh = not isinstance(st, ReusedStats)  # an earlier micro-batch's statistics (score_every): counted once
        if fresh and sw > 0 and sl > 0 and math.isfinite(sw) and math.isfinite(sl):
            self._step("sw", math.log(max(sw, eps)))
            self._step("sl", math.log(max(sl, eps)))
        self.calls += 1
        e = {k: self.ema_value(k) for k in _KEYS}
        if None in e.values():
            log_delta_center = 0.0
        else:
            log_r_ema = e["dw"] - e["dl"]
            log_r_star_ema = e["sl"] - e["sw"]
            log_delta_center = log_r_star_ema - log_r_ema
        # this micro-batch's own band, as the monitor defines it, shrunk by rc_margin of its half-width per side
        band = band_stats(mdw, mdl, sw, sl, dot, eps)
        log_r, lo, hi = band["log_r"], None, None
        if band["lower"] is not None:
            half = (1.0 - self.rc_margin) * -math.log(band["rho"])
            lo, hi = band["log_r_star"] - half, band["log_r_star"] + half
        if self.rc_target == "nearest":
            log_delta = 0.0 if lo is None or lo <= log_r <= hi else min(max(log_r, lo), hi) - log_r
        else:
            log_delta = log_delta_center
            if self.clamp_to_band and lo is not None:
                log_delta = min(max(log_delta, lo - log_r), hi - log_r)
        self.alpha = 1.0 if log_delta == 0.0 else math.exp(0.5 * log_delta)
        self.last = {"d_w": mdw, "d_l": mdl, "sw_norm": sw, "sl_norm": sl, "sw_dot_sl": dot, "target": self.rc_target,
                     "log_r": log_r, "lower": lo, "upper": hi, "log_delta_center": log_delta_center,
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
            A new RewardCalibrated with this one's calibrator hyperparameters and running state (EMAs and their
            counts, α, call count, last statistics); its `hparams` are this one's, in their order, followed by
            those `base` adds.
        """
        new = RewardCalibrated(base, **{k: self.hparams[k] for k in RC_DEFAULTS})
        new.hparams = {k: new.hparams[k] for k in (*self.hparams, *new.hparams) if k in new.hparams}
        new.ema, new.ema_n, new.alpha, new.calls, new.last = (dict(self.ema), dict(self.ema_n), self.alpha,
                                                              self.calls, dict(self.last))
        return new

    def state_dict(self) -> dict:
        return {"ema": dict(self.ema), "ema_n": dict(self.ema_n), "ema_init": self.rc_ema_init, "alpha": self.alpha,
                "calls": self.calls, "base": self.base.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`. EMAs that have started continue under the rc_ema_init they started with (the
        state's; a state written before the counts existed is "first"), whatever this run's rc_ema_init says."""
        self.ema = {k: (None if state["ema"][k] is None else float(state["ema"][k])) for k in _KEYS}
        calls = int(state["calls"])
        if "ema_n" in state:
            self.ema_n = {k: int(state["ema_n"][k]) for k in _KEYS}
            rule = state.get("ema_init", "first")
        else:  # the authors' EMAs of an older checkpoint: their counts only matter to "zero", so the call count
            self.ema_n = {k: 0 if self.ema[k] is None else calls for k in _KEYS}
            rule = "first"
        if rule not in EMA_INITS:
            raise ValueError(f"rc: the state's ema_init must be one of {', '.join(EMA_INITS)}, got {rule!r}")
        if "ema_n" not in state or any(self.ema_n.values()):
            self.rc_ema_init = self.hparams["rc_ema_init"] = rule
        self.alpha = float(state["alpha"])
        self.calls = calls
        self.base.load_state_dict(state.get("base", {}))

    def __repr__(self) -> str:
        return (f"rc({self.base!r}, ema_decay={self.ema_decay}, rc_ema_init={self.rc_ema_init!r}, "
                f"rc_target={self.rc_target!r}, rc_margin={self.rc_margin}, clamp_to_band={self.clamp_to_band})")


def _mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    return all_reduce(t, "sum") / world_size()
