"""The base layer of every objective: the batch, the loss contract, incentives and diagnostics.

The maths core is layered, and every import points to a lower layer (tests/test_imports.py checks it):

    monitor                  the band monitor: reads an objective only through `PairLoss.diagnostics`
    losses (registry)        build, names, accepted_hparams, with_chosen_nll
    rc, losses.ChosenNLL     wrappers around any objective
    losses (catalogue)       the objectives
    objective                this module: PairBatch, PairLoss, Diagnostics, incentives
    scores, madpo, band, head, _dist, errors   (torch only)

This module imports nothing of po_plugins but `scores` (for the `ScoreStats` field of a batch).

Conventions (docs/losses.md, "Conventions"): z_w, z_l are policy log-probs summed over response tokens; a loss
returns per-sample values [B] computed in fp32; the incentives are d_w = −∂ℓ/∂z_w and d_l = +∂ℓ/∂z_l.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, ClassVar

import torch

from .scores import ScoreStats


@dataclasses.dataclass
class PairBatch:
    """Per-sample tensors, all [B]."""

    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None
    chosen_tokens: torch.Tensor | None = None
    rejected_tokens: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    margins: torch.Tensor | None = None
    score_stats: ScoreStats | None = None


# field groups a loss may need, and the message naming what supplies them
NEEDS = {
    "ref": (("ref_chosen", "ref_rejected"), "reference log-probs (a reference model forward)"),
    "tokens": (("chosen_tokens", "rejected_tokens"), "response token counts"),
    "margins": (("margins",), "reward-model margins (a margin column, e.g. --po.margin_key rm_margin)"),
    "score_stats": (("score_stats",), "head score statistics (po_plugins.scores.head_score_stats)"),
}


@dataclasses.dataclass(frozen=True)
class Diagnostics:
    """What an objective reports about one micro-batch as it trains on it (`PairLoss.diagnostics`).

    d_w, d_l: per-sample incentives [B] of the objective as trained (RC's α and a folded NLL term included).
    alpha: the reward-calibration factor α applied to this micro-batch (1.0 for uncalibrated objectives).
    margin_weights: per-sample margin weights [B] the objective multiplies its terms by (MADPO; None for
        objectives without margins).
    capped: [B] bool, the pairs whose weight is capped (MADPO: ĥ ≤ −τ, weight 1; None without margins).
    """

    d_w: torch.Tensor
    d_l: torch.Tensor
    alpha: float = 1.0
    margin_weights: torch.Tensor | None = None
    capped: torch.Tensor | None = None


def incentives(loss: PairLoss, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample incentives d_w = −∂ℓ/∂z_w and d_l = +∂ℓ/∂z_l of `loss` on `batch`, exact by autograd.

    Evaluated with the loss's running state frozen (RC keeps its current α, β-DPO its statistics), so calling it
    never changes training (docs/losses.md, "Conventions").

    Args:
        loss: any PairLoss (wrappers included).
        batch: the micro-batch; its policy log-probs are detached and differentiated afresh.

    Returns:
        (d_w, d_l), two fp32 tensors [B].
    """
    zw = batch.policy_chosen.detach().float().requires_grad_(True)
    zl = batch.policy_rejected.detach().float().requires_grad_(True)
    b = dataclasses.replace(batch, policy_chosen=zw, policy_rejected=zl)
    with torch.enable_grad(), loss.frozen():
        per_sample = loss(b)
        gw, gl = torch.autograd.grad(per_sample.sum(), [zw, zl], allow_unused=True)
    gw = torch.zeros_like(zw) if gw is None else gw
    gl = torch.zeros_like(zl) if gl is None else gl
    return -gw.detach(), gl.detach()


class PairLoss:
    """Base class: hyperparameter validation, field checks, fp32 upcast, per-sample weights and diagnostics.

    Subclasses set `name`, `defaults` (paper names and defaults), `needs`, `incentive_sign` and `paper`,
    and implement `forward(b) -> [B]` on an fp32 batch.
    incentive_sign: "positive" (d_w, d_l > 0 everywhere), "nonnegative" (0 once a hinge is satisfied),
    "target" (positive until a target margin is reached, then negative), "signed" (negative by design).
    Objectives with margin weights override `margin_weighting`; wrappers delegate it to their base.
    """

    name: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}
    needs: ClassVar[tuple[str, ...]] = ("ref",)
    incentive_sign: ClassVar[str] = "positive"
    paper: ClassVar[str] = ""
    update_state: bool = True  # stateful losses update their running statistics only when True

    def __init__(self, **hparams):
        unknown = sorted(set(hparams) - set(self.defaults))
        if unknown:
            accepted = ", ".join(sorted(self.defaults)) or "none"
            raise ValueError(f"loss '{self.name}': unknown hyperparameter(s) {unknown}; accepted: {accepted}")
        self.hparams = {**self.defaults, **hparams}
        for key, value in self.hparams.items():
            setattr(self, key, value)
        self.validate()

    def validate(self) -> None:
        beta = self.hparams.get("beta")
        if beta is not None and not (isinstance(beta, (int, float)) and beta > 0):
            raise ValueError(f"loss '{self.name}': beta must be a positive number, got {beta!r}")

    @property
    def reference_free(self) -> bool:
        return "ref" not in self.needs

    def check(self, b: PairBatch) -> None:
        for need in self.needs:
            fields, what = NEEDS[need]
            missing = [f for f in fields if getattr(b, f) is None]
            if missing:
                raise ValueError(f"loss '{self.name}' needs {what}: PairBatch.{', PairBatch.'.join(missing)} is None")

    def __call__(self, b: PairBatch) -> torch.Tensor:
        self.check(b)
        out = self.forward(_fp32(b))
        if b.weights is not None:
            out = out * b.weights.detach().to(out)
        return out

    def forward(self, b: PairBatch) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @contextlib.contextmanager
    def frozen(self):
        """Evaluate without updating running statistics (used by `incentives`)."""
        old, self.update_state = self.update_state, False
        try:
            yield self
        finally:
            self.update_state = old

    def margin_weighting(self, b: PairBatch) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The per-sample margin weights this objective applies to `b` and the mask of those at the cap.

        Returns:
            (weights [B] fp32, capped [B] bool), or None for objectives without margin weights (the default).
        """
        return None

    def diagnostics(self, b: PairBatch) -> Diagnostics:
        """What the objective does to the micro-batch `b` it is training on (docs/monitor.md, "Keys").

        The base class differentiates the objective with its state frozen (`incentives`), so calling it changes
        nothing; reward calibration reuses the incentives it already computed on `b`.

        Args:
            b: the micro-batch, as passed to the loss.

        Returns:
            Diagnostics: per-sample incentives, α (1.0 here) and the margin weights (None without margins).
        """
        d_w, d_l = incentives(self, b)
        return Diagnostics(d_w, d_l, 1.0, *(self.margin_weighting(b) or (None, None)))

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def __repr__(self) -> str:
        hp = ", ".join(f"{k}={v!r}" for k, v in self.hparams.items())
        return f"{self.name}({hp})"


def _fp32(b: PairBatch) -> PairBatch:
    def cast(t):
        return t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64 else t

    return dataclasses.replace(b, **{f.name: cast(getattr(b, f.name)) for f in dataclasses.fields(b)
                                     if f.name != "score_stats"})

