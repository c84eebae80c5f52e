"""The disentanglement band (DB) of arXiv 2604.18239 (papers.md §1.3–1.4).

With incentives d_w, d_l > 0 and scores s_w, s_l (ρ = cos(s_w, s_l)), gradient flow gives
    ż_w ≥ 0  ⇔  log r ≥ log r* + log ρ        (lower edge)
    ż_l ≤ 0  ⇔  log r ≤ log r* − log ρ        (upper edge)
with r = mean d_w / mean d_l and r* = ‖s_l‖/‖s_w‖. For ρ ≤ 0 both hold for every r: always in band.
"""

from __future__ import annotations

import math

import torch

EPS = 1e-12  # the authors' clamp before every log


def _scalar(x) -> float:
    if isinstance(x, torch.Tensor):
        return float(x.detach().float().mean()) if x.numel() != 1 else float(x.detach().float())
    return float(x)


def band_stats(d_w, d_l, sw_norm, sl_norm, sw_dot_sl, eps: float = EPS) -> dict[str, float]:
    """Band edges, position and slack for one (effective) batch.

    d_w, d_l: per-sample incentives (any shape; their means are used) or scalars.
    Returns floats: log_r, log_r_star, rho, lower, upper, slack (≥ 0 ⇔ in band), in_band (0/1).
    Means of d are clamped at eps before the log, as in the authors' code; ±inf edges when ρ ≤ 0.
    """
    mean_dw, mean_dl = _scalar(d_w), _scalar(d_l)
    sw, sl, dot = _scalar(sw_norm), _scalar(sl_norm), _scalar(sw_dot_sl)
    log_r = math.log(max(mean_dw, eps)) - math.log(max(mean_dl, eps))
    log_r_star = math.log(max(sl, eps)) - math.log(max(sw, eps))
    rho = dot / max(sw * sl, eps)
    if rho > eps:
        log_rho = math.log(min(rho, 1.0))
        lower, upper = log_r_star + log_rho, log_r_star - log_rho
        slack = min(log_r - lower, upper - log_r)
    else:
        lower, upper, slack = -math.inf, math.inf, math.inf
    return {
        "log_r": log_r,
        "log_r_star": log_r_star,
        "rho": rho,
        "lower": lower,
        "upper": upper,
        "slack": slack,
        "in_band": float(slack >= 0.0),
    }


def predicted_signs(d_w: float, d_l: float, sw_norm: float, sl_norm: float, sw_dot_sl: float) -> tuple[int, int]:
    """Signs of ż_w and ż_l under gradient flow, ż_w ∝ d_w‖s_w‖² − d_l⟨s_w,s_l⟩, ż_l ∝ d_w⟨s_w,s_l⟩ − d_l‖s_l‖²."""
    zw = d_w * sw_norm**2 - d_l * sw_dot_sl
    zl = d_w * sw_dot_sl - d_l * sl_norm**2
    return (1 if zw > 0 else -1 if zw < 0 else 0), (1 if zl > 0 else -1 if zl < 0 else 0)


def alert_message(streak: int, alert_steps: int, rec: dict) -> str | None:
    """The training-log warning, once, when a run has been out of the band for `alert_steps` consecutive steps."""
    if alert_steps <= 0 or streak != alert_steps:
        return None
    name = str(rec.get("loss_name", ""))
    hint = "" if name.startswith("rc_") else f"; consider --loss rc_{name}"
    return (f"[po_plugins] WARNING: out of the disentanglement band for {streak} consecutive steps (step "
            f"{rec['step']}: log r = {rec['log_r']:.3f}, band [{rec['band_lower']:.3f}, {rec['band_upper']:.3f}]); "
            f"the chosen log-likelihood is likely falling{hint}")
