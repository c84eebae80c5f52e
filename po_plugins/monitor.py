"""The disentanglement-band monitor and the loss glue every host shares (no host imports).

A host adapter does three things with it:
  * per training micro-batch, `loss_step(loss, batch, monitor, training, recheck_inputs)` computes the per-sample
    losses and the detached implicit rewards, and hands the micro-batch to the monitor;
  * once per optimizer step, `monitor.end_step(global_step)` reduces the window over micro-batches and ranks, writes
    one JSONL record (rank 0), prints the out-of-band alert, and returns the `po/<key>` scalars for the host's logs;
  * with each checkpoint, `plugin_state(loss, monitor)` is saved and `load_plugin_state(...)` restores it.

JSONL record keys (one object per optimizer step, after a `{"meta": ...}` line; docs/monitor.md):
  step, loss_name, z_w, z_l (mean summed log-probs), r_w, r_l (mean z − z_ref), d_w, d_l (mean incentives, after RC's
  α), log_r, log_r_star, rho, band_lower, band_upper, slack, in_band, sw_norm, sl_norm, sw_dot_sl, alpha,
  delta_z_w, delta_z_l (change of the window means since the previous step), loss, alpha_rank_spread,
  chosen_up_frac, rejected_down_frac, step_delta_z_w, step_delta_z_l (exact re-score every `recheck_every` steps,
  null otherwise) and, for margin-weighted losses, w_mean, w_min, w_max, w_capped_frac.
Every mean is over all pairs of the optimizer step on all ranks (pairs weigh equally whatever the micro-batch size
and world size); the score statistics are averaged per pair of the window.
"""

from __future__ import annotations

import json
import math
import os
from typing import Callable

import torch

from . import incentives
from ._dist import all_reduce
from .band import alert_message, band_stats
from .losses import PairBatch, PairLoss

SUM_KEYS = ("n", "z_w", "z_l", "r_w", "r_l", "d_w", "d_l", "sw_norm", "sl_norm", "sw_dot_sl", "alpha", "loss",
            "w_sum", "w_capped")
RECHECK_KEYS = ("chosen_up_frac", "rejected_down_frac", "step_delta_z_w", "step_delta_z_l")
# keys every host's JSONL record has (one test list for all hosts)
JSONL_KEYS = ("step", "loss_name", "z_w", "z_l", "delta_z_w", "delta_z_l", "r_w", "r_l", "d_w", "d_l", "log_r",
              "log_r_star", "rho", "band_lower", "band_upper", "slack", "in_band", "sw_norm", "sl_norm", "sw_dot_sl",
              "alpha", "loss", "alpha_rank_spread", *RECHECK_KEYS)
LOG_KEYS = ("z_w", "z_l", "delta_z_w", "delta_z_l", "log_r", "log_r_star", "rho", "band_lower", "band_upper", "slack",
            "in_band", "alpha", "chosen_up_frac", "w_mean", "w_min", "w_max", "w_capped_frac")


def loss_step(loss: PairLoss, b: PairBatch, monitor: BandMonitor | None = None, training: bool = True,
              recheck_inputs=None):
    """Per-sample losses [B] of `b`, and the detached implicit rewards (β(z − z_ref), or β·z̄ for reference-free
    objectives) the hosts log; feeds the monitor on training micro-batches."""
    per_sample = loss(b)
    beta = float(loss.hparams.get("beta", 1.0))
    zw, zl = b.policy_chosen.detach(), b.policy_rejected.detach()
    if loss.reference_free or b.ref_chosen is None:
        n_w = b.chosen_tokens.clamp(min=1) if b.chosen_tokens is not None else 1
        n_l = b.rejected_tokens.clamp(min=1) if b.rejected_tokens is not None else 1
        cr, rr = beta * zw / n_w, beta * zl / n_l
    else:
        cr, rr = beta * (zw - b.ref_chosen.detach()), beta * (zl - b.ref_rejected.detach())
    if training and monitor is not None:
        monitor.add_micro(b, per_sample, recheck_inputs)
    return per_sample, cr, rr


def margin_weights_of(b: PairBatch, loss: PairLoss) -> torch.Tensor | None:
    """The MADPO weights the loss applies to this batch (None for objectives without margins)."""
    if b.margins is None or "margins" not in loss.needs:
        return None
    from .madpo import margin_weights

    hp = loss.hparams
    return margin_weights(b.margins, hp["c_max"], hp["c_min"], hp["lam"], hp["tau"]).double()


class BandMonitor:
    """Per optimizer step: the band from the incentives and head scores, aggregated over the accumulation window and
    all-reduced over ranks; returned as `po/*` scalars and appended to rank 0's JSONL.

    loss: the objective being trained (RC objectives expose their α and base incentives).
    path: JSONL file. alert_steps: warn once after this many consecutive out-of-band steps (0: never).
    recheck_every: every N steps call `rescore(recheck_inputs)` -> (z_w, z_l) on the last micro-batch after the update
    (no grad) for exact per-pair changes (0: never). log: the host's rank-aware print. is_rank_0: who writes.
    """

    def __init__(self, loss: PairLoss, path: str, alert_steps: int = 20, recheck_every: int = 10,
                 rescore: Callable | None = None, log: Callable[[str], None] = print,
                 is_rank_0: Callable[[], bool] = lambda: True):
        self.loss = loss
        self.path = path
        self.alert_steps = int(alert_steps)
        self.recheck_every = int(recheck_every)
        self.rescore = rescore
        self.log = log
        self.is_rank_0 = is_rank_0
        self.prev = None
        self.out_streak = 0
        self.acc = None
        self.last_inputs = None
        self.last_z = None
        self.last_alpha = 1.0
        self._truncated = False

    def add_micro(self, b: PairBatch, per_sample: torch.Tensor, recheck_inputs=None) -> None:
        loss = self.loss
        if b.score_stats is None:
            raise ValueError("the band monitor needs head score statistics on every training micro-batch")
        alpha = float(getattr(loss, "alpha", 1.0))
        base_d = getattr(loss, "last_incentives", None)
        if base_d is not None:  # RC already differentiated its base objective on this micro-batch
            d_w, d_l = alpha * base_d[0], base_d[1] / alpha
        else:
            d_w, d_l = incentives(loss, b)
        st = b.score_stats
        zw, zl = b.policy_chosen.detach().double(), b.policy_rejected.detach().double()
        refw = b.ref_chosen.detach().double() if b.ref_chosen is not None else torch.zeros_like(zw)
        refl = b.ref_rejected.detach().double() if b.ref_rejected is not None else torch.zeros_like(zl)
        n = torch.tensor(float(zw.numel()), dtype=torch.float64, device=zw.device)
        w = margin_weights_of(b, loss)
        if w is None:
            w = torch.zeros(1, dtype=torch.float64, device=zw.device)
            capped = w.sum()
        else:
            w = w.to(zw.device)
            capped = (b.margins <= -loss.hparams["tau"]).double().sum().to(zw.device)

        def dev(x):
            return torch.as_tensor(x).detach().double().reshape(()).to(zw.device)

        # kept on the device: no host sync per micro-batch; reduced once per optimizer step
        sums = torch.stack([n, zw.sum(), zl.sum(), (zw - refw).sum(), (zl - refl).sum(), d_w.double().sum().to(n),
                            d_l.double().sum().to(n), n * dev(st.sw_norm), n * dev(st.sl_norm), n * dev(st.sw_dot_sl),
                            n * alpha, per_sample.detach().double().sum(), w.sum(), capped])
        maxes = torch.stack([w.max(), -w.min()])
        self.acc = (sums, maxes) if self.acc is None else (self.acc[0] + sums, torch.maximum(self.acc[1], maxes))
        self.last_alpha = alpha
        self.last_inputs = recheck_inputs
        self.last_z = (zw, zl)

    def _reduce(self, acc) -> dict:
        sums, maxes = all_reduce(acc[0], "sum").cpu(), all_reduce(acc[1], "max").cpu()
        out = {k: float(v) for k, v in zip(SUM_KEYS, sums)}
        out.update(w_max=float(maxes[0]), w_min=-float(maxes[1]))
        return out

    def _alpha_spread(self) -> float:
        """max − min over ranks of the last micro-batch's α (0 when every rank calibrates identically)."""
        v = all_reduce(torch.tensor([self.last_alpha, -self.last_alpha], dtype=torch.float64), "max")
        return float(v[0] + v[1])

    def _recheck(self, global_step: int) -> dict:
        """Exact per-pair change of z over this optimizer step: re-score the last micro-batch (no grad) every
        `recheck_every` steps (one forward of a micro-batch each time); null on the other steps. Every rank calls
        it at the same steps (ZeRO-3 forwards are collective)."""
        due = self.recheck_every > 0 and global_step % self.recheck_every == 0
        if not due or self.last_inputs is None or self.rescore is None:
            return dict.fromkeys(RECHECK_KEYS)
        with torch.no_grad():
            zw2, zl2 = self.rescore(self.last_inputs)
        dw, dl = zw2.double() - self.last_z[0].to(zw2.device), zl2.double() - self.last_z[1].to(zl2.device)
        vec = torch.stack([(dw > 0).double().sum(), (dl < 0).double().sum(),
                           torch.tensor(float(dw.numel()), dtype=torch.float64, device=dw.device), dw.sum(), dl.sum()])
        up, down, n, sdw, sdl = (float(x) for x in all_reduce(vec, "sum").cpu())
        return {"chosen_up_frac": up / n, "rejected_down_frac": down / n, "step_delta_z_w": sdw / n,
                "step_delta_z_l": sdl / n}

    def end_step(self, global_step: int) -> dict:
        """Close the optimizer step: the JSONL record (rank 0), the alert, and {'po/<key>': value} for the logs."""
        if self.acc is None:
            return {}
        s = self._reduce(self.acc)
        self.acc = None
        n = s["n"]
        rec = {"step": int(global_step), "loss_name": self.loss.name}
        for k in ("z_w", "z_l", "r_w", "r_l", "d_w", "d_l"):
            rec[k] = s[k] / n
        sw, sl, dot = s["sw_norm"] / n, s["sl_norm"] / n, s["sw_dot_sl"] / n
        band = band_stats(rec["d_w"], rec["d_l"], sw, sl, dot)
        rec.update(log_r=band["log_r"], log_r_star=band["log_r_star"], rho=band["rho"], band_lower=band["lower"],
                   band_upper=band["upper"], slack=band["slack"], in_band=band["in_band"],
                   sw_norm=sw, sl_norm=sl, sw_dot_sl=dot, alpha=s["alpha"] / n)
        rec["delta_z_w"] = rec["z_w"] - self.prev["z_w"] if self.prev else 0.0
        rec["delta_z_l"] = rec["z_l"] - self.prev["z_l"] if self.prev else 0.0
        rec["loss"] = s["loss"] / n
        rec["alpha_rank_spread"] = self._alpha_spread()
        rec.update(self._recheck(global_step))
        if "margins" in self.loss.needs:
            rec.update(w_mean=s["w_sum"] / n, w_min=s["w_min"], w_max=s["w_max"], w_capped_frac=s["w_capped"] / n)
        self.prev = {"z_w": rec["z_w"], "z_l": rec["z_l"]}
        self.out_streak = 0 if rec["in_band"] else self.out_streak + 1
        msg = alert_message(self.out_streak, self.alert_steps, rec)
        if msg:
            self.log(msg)
        if self.is_rank_0():
            self._write(rec)
        return {f"po/{k}": rec[k] for k in LOG_KEYS if rec.get(k) is not None and math.isfinite(rec[k])}

    def _write(self, rec: dict) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        if not self._truncated:  # a resumed run drops the records past its checkpoint
            self._truncated = True
            if os.path.exists(self.path):
                keep = []
                with open(self.path) as f:
                    for line in f:
                        try:
                            obj = json.loads(line)
                        except json.JSONDecodeError:
                            continue
                        if "meta" in obj or obj.get("step", 0) < rec["step"]:
                            keep.append(line if line.endswith("\n") else line + "\n")
                with open(self.path, "w") as f:
                    f.writelines(keep)
            if not os.path.exists(self.path) or os.path.getsize(self.path) == 0:
                with open(self.path, "w") as f:
                    meta = {"loss": self.loss.name, "hparams": _jsonable(self.loss.hparams)}
                    f.write(json.dumps({"meta": meta}) + "\n")
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()

    def state_dict(self) -> dict:
        return {"prev": self.prev, "out_streak": self.out_streak}

    def load_state_dict(self, state: dict) -> None:
        self.prev = state.get("prev")
        self.out_streak = int(state.get("out_streak", 0))


def plugin_state(loss: PairLoss, monitor: BandMonitor | None) -> dict:
    """What a checkpoint carries for the plugin: the objective's running state (RC's EMAs and α, β-DPO's
    statistics) and the monitor's, so that a resumed run continues the identical α sequence."""
    return {"loss": loss.state_dict(), "monitor": monitor.state_dict() if monitor is not None else {}}


def load_plugin_state(state: dict, loss: PairLoss, monitor: BandMonitor | None) -> None:
    loss.load_state_dict(state["loss"])
    if monitor is not None:
        monitor.load_state_dict(state.get("monitor", {}))


def _jsonable(d):
    return {k: (v if isinstance(v, (int, float, str, bool, type(None))) else repr(v)) for k, v in d.items()}
