"""The disentanglement band (DB) of arXiv 2604.18239 (docs/monitor.md, "The band of a step").

With incentives d_w, d_l > 0 and scores s_w, s_l (ρ = cos(s_w, s_l)), gradient flow gives
    ż_w ≥ 0  ⇔  log r ≥ log r* + log ρ        (lower edge)
    ż_l ≤ 0  ⇔  log r ≤ log r* − log ρ        (upper edge)
with r = mean d_w / mean d_l and r* = ‖s_l‖/‖s_w‖. For ρ ≤ 0 both hold for every r: always in band. When a mean
incentive is ≤ 0 the band is undefined; the sign conditions ż_w ≥ 0, ż_l ≤ 0 still decide (`band_stats`).
"""

from __future__ import annotations

import math

import torch

EPS = 1e-12  # the authors' clamp before every log


def _scalar(x) -> float:
    if isinstance(x, torch.Tensor):
        return float(x.detach().float().mean()) if x.numel() != 1 else float(x.detach().float())
    return float(x)


def band_stats(d_w, d_l, sw_norm, sl_norm, sw_dot_sl, eps: float = EPS) -> dict:
    """The band of one optimizer step (or any batch) from its mean incentives and its head scores.

    Args:
        d_w, d_l: per-sample incentives (any shape; their means are used) or scalars.
        sw_norm, sl_norm, sw_dot_sl: ‖s_w‖, ‖s_l‖, ⟨s_w, s_l⟩ (scalars or 0-dim tensors, e.g. a `ScoreStats`).
        eps: floor inside the logs.

    The verdict is the sign conditions of the paper's gradient flow, ż_w ≥ 0 and ż_l ≤ 0 (`predicted_signs`), which
    equal the band when both mean incentives are positive and hold for every r when ρ ≤ 0 (docs/monitor.md, "Keys").

    Returns:
      A dict: rho (cosine of s_w, s_l, in [−1, 1]; None if a score is 0), log_r_star (None if a score norm is 0),
      log_r (None unless both mean incentives are > 0), lower/upper/slack (None where the band is undefined: a mean
      incentive ≤ 0, or ρ ≤ 0 where the band is the whole line), in_band (0/1, always defined),
      pred_sign_w/pred_sign_l (−1, 0, 1) and edge: None in band, else "lower" (the chosen log-likelihood is
      predicted to fall), "upper" (the rejected one to rise) or "both".
    """
    mean_dw, mean_dl = _scalar(d_w), _scalar(d_l)
    sw, sl, dot = _scalar(sw_norm), _scalar(sl_norm), _scalar(sw_dot_sl)
    norms = sw > 0 and sl > 0
    rho = max(-1.0, min(1.0, dot / (sw * sl))) if norms else None
    log_r_star = math.log(sl) - math.log(sw) if norms else None
    positive = mean_dw > 0 and mean_dl > 0 and math.isfinite(mean_dw) and math.isfinite(mean_dl)
    log_r = math.log(max(mean_dw, eps)) - math.log(max(mean_dl, eps)) if positive else None
    lower = upper = slack = None
    if positive and rho is not None and rho > eps:
        log_rho = math.log(rho)
        lower, upper = log_r_star + log_rho, log_r_star - log_rho
        slack = min(log_r - lower, upper - log_r)
    zw = mean_dw * sw * sw - mean_dl * dot  # ∝ ż_w
    zl = mean_dw * dot - mean_dl * sl * sl  # ∝ ż_l
    falls, rises = zw < 0, zl > 0
    return {
        "log_r": log_r,
        "log_r_star": log_r_star,
        "rho": rho,
        "lower": lower,
        "upper": upper,
        "slack": slack,
        "in_band": float(not falls and not rises),
        "pred_sign_w": _sign(zw),
        "pred_sign_l": _sign(zl),
        "edge": ("both" if falls and rises else "lower" if falls else "upper" if rises else None),
    }


def _sign(x: float) -> int:
    return 1 if x > 0 else -1 if x < 0 else 0


def predicted_signs(d_w: float, d_l: float, sw_norm: float, sl_norm: float, sw_dot_sl: float) -> tuple[int, int]:
    """Signs of ż_w and ż_l under gradient flow, ż_w ∝ d_w‖s_w‖² − d_l⟨s_w,s_l⟩, ż_l ∝ d_w⟨s_w,s_l⟩ − d_l‖s_l‖².

    Args:
        d_w, d_l: mean incentives. sw_norm, sl_norm, sw_dot_sl: the head score statistics.

    Returns:
        (sign of ż_w, sign of ż_l), each −1, 0 or 1.
    """
    zw = d_w * sw_norm**2 - d_l * sw_dot_sl
    zl = d_w * sw_dot_sl - d_l * sl_norm**2
    return _sign(zw), _sign(zl)


EDGE_TEXT = {
    "lower": "below the band's lower edge: the chosen log-likelihood is predicted to fall",
    "upper": "above the band's upper edge: the rejected log-likelihood is predicted to rise",
    "both": "the chosen log-likelihood is predicted to fall and the rejected one to rise",
}


def _f(x) -> str:
    return "undefined" if x is None else f"{x:.3f}"


def alert_message(streak: int, alert_steps: int, rec: dict, hint: str | None = None) -> str | None:
    """The training-log warning, once, when a run has been out of the band for `alert_steps` consecutive steps; it
    names the edge crossed at the alerting step and what that predicts (docs/monitor.md, "Alert, NLL terms, state,
    limits").

    Args:
        streak: consecutive out-of-band steps so far. alert_steps: the streak that alerts (≤ 0: never).
        rec: the step's JSONL record. hint: the host's fix ("" for none; None: the calibrated objective's name).

    Returns:
        The message when `streak == alert_steps`, else None.
    """
    if alert_steps <= 0 or streak != alert_steps:
        return None
    name = str(rec.get("loss_name", ""))
    if hint is None:
        hint = "" if name.startswith("rc_") else f"; consider the calibrated objective rc_{name}"
    what = EDGE_TEXT.get(rec.get("edge") or "", "out of band")
    where = (f"log r = {_f(rec.get('log_r'))}, band [{_f(rec.get('band_lower'))}, {_f(rec.get('band_upper'))}]"
             if rec.get("log_r") is not None else
             f"mean incentives d_w = {rec.get('d_w', float('nan')):.3g}, d_l = {rec.get('d_l', float('nan')):.3g}: "
             "the band is undefined, the verdict is the sign conditions")
    return (f"[po_plugins] WARNING: out of the disentanglement band for {streak} consecutive steps (step "
            f"{rec['step']}: {where}); {what}{hint}")
