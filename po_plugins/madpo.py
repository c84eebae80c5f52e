"""MADPO margin-adaptive weights (Rho, arXiv 2510.05342; docs/losses.md, "MADPO weights"; as in the authors'
MADPOLoss).

    c(a) = c_min + (c_max − c_min) / (1 + ((c_max − 1)/(1 − c_min)) · exp(λ(a − τ))),   a = |ĥ|
    w(ĥ) = σ(c(|ĥ|)·ĥ) / σ(ĥ)   for ĥ > −τ,       w(ĥ) = 1 for ĥ ≤ −τ

ĥ is the reward-model margin r(y_w) − r(y_l) oriented toward the labelled winner. c(τ) = 1, so w is
continuous at −τ; w(0) = 1; pairs with |ĥ| < τ are amplified (c > 1), pairs beyond τ dampened (c < 1).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _check(c_max: float, c_min: float, lam: float, tau: float) -> None:
    if not c_max > 1.0:
        raise ValueError(f"madpo: c_max must be > 1, got {c_max}")
    if not 0.0 < c_min < 1.0:
        raise ValueError(f"madpo: c_min must be in (0, 1), got {c_min}")
    if not lam > 0.0:
        raise ValueError(f"madpo: lam must be > 0, got {lam}")
    if not tau > 0.0:
        raise ValueError(f"madpo: tau must be > 0, got {tau}")


def scale_c(a: torch.Tensor, c_max: float = 2.0, c_min: float | None = None, lam: float = 1.0,
            tau: float = math.log(999)) -> torch.Tensor:
    """The margin-dependent scale c(a), decreasing from ≈ c_max at a = 0 to c_min, with c(τ) = 1.

    Args:
        a: margin magnitudes |ĥ| (any shape). c_max: > 1. c_min: in (0, 1), None for 1/c_max. lam: slope, > 0.
        tau: the margin where c = 1, > 0 (raw reward-model logit units).

    Returns:
        c(a), same shape as `a`; ValueError on out-of-range hyperparameters.
    """
    c_min = 1.0 / c_max if c_min is None else c_min
    _check(c_max, c_min, lam, tau)
    k = (c_max - 1.0) / (1.0 - c_min)
    return c_min + (c_max - c_min) / (1.0 + k * torch.exp(lam * (a - tau)))


def margin_weights(margins: torch.Tensor, c_max: float = 2.0, c_min: float | None = None, lam: float = 1.0,
                   tau: float = math.log(999)) -> torch.Tensor:
    """Per-pair weights w(ĥ) ≥ 0 for reward-model margins ĥ [B] (oriented toward the labelled winner).

    Args:
        margins: ĥ [B], finite. c_max, c_min, lam, tau: as in `scale_c`.

    Returns:
        w [B], fp32, detached; w = 1 for ĥ ≤ −τ (the cap). ValueError naming the positions of non-finite margins.
    """
    h = torch.as_tensor(margins).detach().float()
    if not torch.isfinite(h).all():
        bad = (~torch.isfinite(h)).nonzero(as_tuple=True)[0].tolist()
        raise ValueError(f"madpo: non-finite reward margins at batch positions {bad[:10]}")
    c = scale_c(h.abs(), c_max, c_min, lam, tau)
    w = torch.exp(F.logsigmoid(c * h) - F.logsigmoid(h))
    return torch.where(h > -tau, w, torch.ones_like(w))
