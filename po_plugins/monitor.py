"""The disentanglement-band monitor and the loss glue every host shares (no host imports).

A host adapter does three things with it:
  * per training micro-batch, `loss_step(loss, batch, monitor, training, recheck_inputs, tokens)` computes the
    per-sample losses and the detached implicit rewards, and hands the micro-batch (and its response tokens,
    `po_plugins.scores.Tokens`) to the monitor;
  * once per optimizer step, `monitor.end_step(global_step)` computes the step's band, writes one JSONL record
    (rank 0), prints the out-of-band alert, and returns the `po/<key>` scalars for the host's logs;
  * with each checkpoint, `plugin_state(loss, monitor)` is saved and `load_plugin_state(...)` restores it.

The band is the band of the optimizer step: its mean incentives over all pairs of the step on all ranks, and the
head scores s_w = ∇_W mean z_w, s_l = ∇_W mean z_l of the step's summed gradient, computed exactly from the head
inputs of every micro-batch of the step (gathered from all ranks; each rank evaluates a slice of the vocabulary),
so the record does not depend on the micro-batch size or the world size. When the host already makes a vocabulary
pass per micro-batch (RC needs each micro-batch's own statistics), that pass adds each side's score matrix to a step
accumulator (`step_acc`, two [V, d] fp32 matrices, summed over ranks at the end of the step) and the step needs no
pass of its own. The verdict is the paper's sign
conditions (ż_w ≥ 0, ż_l ≤ 0), which are the band when both mean incentives are positive. docs/monitor.md lists
every key.
"""

from __future__ import annotations

import inspect
import json
import math
import os
from typing import Callable

import torch

from ._dist import all_gather_rows, all_reduce, rank, world_size
from .band import alert_message, band_stats
from .errors import PluginStateError  # noqa: F401  (re-exported)
from .objective import PairBatch, PairLoss
from .scores import (
    HeadSpec,
    ProbeRows,
    ScoreStats,
    StepGram,
    Tokens,
    matrix_stats,
    partial_lse,
    side_gram,
    step_score_sums,
)

SUM_KEYS = ("n", "z_w", "z_l", "r_w", "r_l", "d_w", "d_l", "alpha", "loss", "w_sum", "w_capped", "micro_scored",
            "micro_in_band", "shared_tok", "resp_tok", "micro", "d_w_m", "d_l_m")
RECHECK_KEYS = ("chosen_up_frac", "rejected_down_frac", "step_delta_z_w", "step_delta_z_l", "probe_delta_z_w",
                "probe_delta_z_l", "probe_chosen_down_frac", "probe_pred_w", "probe_pred_l")
# keys every host's JSONL record has (one test list for all hosts)
JSONL_KEYS = ("step", "loss_name", "z_w", "z_l", "r_w", "r_l", "d_w", "d_l", "log_r", "log_r_star", "rho",
              "band_lower", "band_upper", "slack", "in_band", "pred_sign_w", "pred_sign_l", "edge", "sw_norm",
              "sl_norm", "sw_dot_sl", "score_pairs", "micro_in_band_frac", "alpha", "loss", "alpha_rank_spread",
              *RECHECK_KEYS, "probe_alarm", "shared_frac")
# null on some steps by definition: no positive mean incentive (log r), ρ ≤ 0 (no edges), in band (no edge crossed);
# shared_frac where the host reported no response tokens (Plugin.shared not called)
MAYBE_NULL = ("log_r", "band_lower", "band_upper", "slack", "edge", "micro_in_band_frac", "shared_frac")
LOG_KEYS = ("z_w", "z_l", "log_r", "log_r_star", "rho", "band_lower", "band_upper", "slack", "in_band", "alpha",
            "chosen_up_frac", "step_delta_z_w", "step_delta_z_l", "probe_delta_z_w", "probe_delta_z_l",
            "probe_chosen_down_frac", "probe_pred_w", "probe_pred_l", "probe_alarm", "shared_frac", "w_mean",
            "w_min", "w_max", "w_capped_frac")


STEP_ACC_BYTES = 1 << 30  # the step accumulator's budget: two [V, d] fp32 matrices (beyond it: the token pass)
STEP_GRAM_BYTES = 1 << 28  # the step's held score rows (StepGram, [M, V] fp32) at most


def loss_step(loss: PairLoss, b: PairBatch, monitor: BandMonitor | None = None, training: bool = True,
              recheck_inputs=None, tokens: Tokens | None = None):
    """Per-sample losses [B] of `b`, and the detached implicit rewards (β(z − z_ref), or β·z̄ for reference-free
    objectives) the hosts log; feeds the monitor on training micro-batches (`tokens`: this micro-batch's response
    tokens for the step's head scores, None on micro-batches the host does not score)."""
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
        monitor.add_micro(b, per_sample, recheck_inputs, tokens)
    return per_sample, cr, rr


class BandMonitor:
    """Per optimizer step: the band of the step from its incentives and its head scores, over the accumulation
    window and all ranks; returned as `po/*` scalars and appended to rank 0's JSONL.

    loss: the objective being trained; the monitor reads it only through `loss.diagnostics(b)` (po_plugins.objective).
    path: JSONL file. alert_steps: warn once after this many consecutive out-of-band steps (0: never).
    recheck_every: every N steps call `rescore(inputs)` -> (z_w, z_l) (no grad) on the step's last micro-batch and
    on the probe pairs (the first micro-batch trained on, or `probe_batches`) for per-pair changes on the same pairs,
    and, before that step's optimizer step, `rescore(inputs, tokens=True)` -> (z_w, z_l, Tokens) on the probe for
    `probe_pred_w` / `probe_pred_l` (where the host's rescore takes `tokens`) (0: never).
    probe_batches: held-out pairs as the host's micro-batch inputs (--po.probe_file); their start is scored before the
    first optimizer step. None: the probe is the first training micro-batch.
    head: a callable returning a context manager that yields the `HeadSpec` (weight gathered if sharded); every
    rank enters it at the same step. score_chunk: vocabulary chunk. log: the host's rank-aware print.
    is_rank_0: who writes. hint: the alert's suggested fix (None: the calibrated objective's name).
    """

    def __init__(self, loss: PairLoss, path: str, alert_steps: int = 20, recheck_every: int = 10,
                 rescore: Callable | None = None, log: Callable[[str], None] = print,
                 is_rank_0: Callable[[], bool] = lambda: True, head: Callable | None = None, score_chunk: int = 4096,
                 hint: str | None = None, step_acc: bool = False, probe_alarm_nats: float = -1.0,
                 alarm_hint: str = "", probe_alarm_checks: int = 2, shared_hint: str = "", meta: dict | None = None,
                 probe_batches: list | None = None):
        self.loss = loss
        self.path = path
        self.alert_steps = int(alert_steps)
        self.recheck_every = int(recheck_every)
        self.rescore = rescore
        self.log = log
        self.is_rank_0 = is_rank_0
        self.head = head
        self.score_chunk = int(score_chunk)
        self.hint = hint
        self.step_acc_on = bool(step_acc)
        self._step_acc = None
        self._gram = StepGram()  # the step's score rows while few (step_gram)
        self._gram_off = False  # this step outgrew the held rows: the rest of it goes the other way
        self.gram_tokens = None  # the held rows' token limit (None: 2·d, where the token Gram stops being cheaper)
        self.out_streak = 0
        self.acc = None
        self.tokens: list[Tokens] = []
        self.last_inputs = None
        self.last_z = None
        self.last_alpha = 1.0
        self.probe = None  # {"batches": [host inputs], "z_w": [P], "z_l": [P]}: the probe pairs and their start
        self.probe_batches = list(probe_batches) if probe_batches else None  # --po.probe_file, as the host's inputs
        self.next_step = 1  # the optimizer step being accumulated (the last end_step's + 1)
        self._pred = None  # this step's probe cross products (close_scores), for probe_pred_w / probe_pred_l
        self._prows = None  # the probe's score rows from its last re-score (ProbeRows), for probe_pred_w / probe_pred_l
        self.scope = None  # --po.band_scope model: this step's whole-model and head statistics (Plugin._model_scope)
        self.last_d = None  # the last training micro-batch's mean incentives (d_w, d_l)
        self._rescore_tokens = rescore is not None and "tokens" in inspect.signature(rescore).parameters
        self.probe_alarm_nats = float(probe_alarm_nats)
        self.probe_alarm_checks = max(1, int(probe_alarm_checks))
        self.alarm_hint = alarm_hint
        self.shared_hint = shared_hint  # how to guard shared response starts ("" when a shared_prefix mode is on)
        self.meta = dict(meta or {})  # the host's lines for the trace header (band_params, tied_embeddings)
        self._shared = (0.0, 0.0)  # (shared, response) tokens of the coming micro-batch (note_shared)
        self.alarm_streak = 0  # consecutive re-checks with the probe's chosen at or below the threshold
        self.alarm_step = None  # the step the measured-displacement alarm fired (once a run)
        self.alert_step = None  # the step the out-of-band alert was printed (this process)
        # for the end-of-run summary (this process's steps)
        self.tally = {"steps": 0, "verdicts": 0, "in_band": 0, "edges": {}, "probe_w": None, "probe_l": None,
                      "probe_step": None, "shared_tok": 0.0, "resp_tok": 0.0}
        self._resumed = False  # load_state_dict was called: the trace continues (else a fresh run replaces it)
        self._truncated = False

    def note_shared(self, shared: float, total: float) -> None:
        """The coming training micro-batch's response tokens that its pairs share at their start, and all its response
        tokens (Plugin.shared): the step's `shared_frac`."""
        self._shared = (float(shared), float(total))

    def add_micro(self, b: PairBatch, per_sample: torch.Tensor, recheck_inputs=None,
                  tokens: Tokens | None = None) -> None:
        """Add one training micro-batch to the step: its per-sample losses, the objective's diagnostics on it
        (`PairLoss.diagnostics`: incentives, α, margin weights) and, when scored, its response tokens."""
        diag = self.loss.diagnostics(b)
        alpha, d_w, d_l = float(diag.alpha), diag.d_w, diag.d_l
        zw, zl = b.policy_chosen.detach().double(), b.policy_rejected.detach().double()
        refw = b.ref_chosen.detach().double() if b.ref_chosen is not None else torch.zeros_like(zw)
        refl = b.ref_rejected.detach().double() if b.ref_rejected is not None else torch.zeros_like(zl)
        n = torch.tensor(float(zw.numel()), dtype=torch.float64, device=zw.device)
        if diag.margin_weights is None:
            w = torch.zeros(1, dtype=torch.float64, device=zw.device)
            capped = w.sum()
        else:
            w = diag.margin_weights.double().to(zw.device)
            capped = diag.capped.double().sum().to(zw.device)
        # the micro-batch's own band (what RC calibrates on): its mean incentives and its own statistics
        scored, inside = torch.zeros((), dtype=torch.float64, device=n.device), torch.zeros_like(n)
        if tokens is not None and tokens.stats is not None:
            sw, sl, dot = (torch.as_tensor(x).detach().double().reshape(()).to(n.device) for x in tokens.stats)
            mw, ml = d_w.double().mean().to(n), d_l.double().mean().to(n)
            scored = scored + 1
            inside = ((mw * sw * sw - ml * dot >= 0) & (mw * dot - ml * sl * sl <= 0)).double()
        # kept on the device: no host sync per micro-batch; reduced once per optimizer step
        sums = torch.stack([n, zw.sum(), zl.sum(), (zw - refw).sum(), (zl - refl).sum(), d_w.double().sum().to(n),
                            d_l.double().sum().to(n), n * alpha, per_sample.detach().double().sum(), w.sum(), capped,
                            scored, inside, *(n * 0 + x for x in self._shared), n * 0 + 1,
                            d_w.double().mean().to(n), d_l.double().mean().to(n)])
        self._shared = (0.0, 0.0)
        maxes = torch.stack([w.max(), -w.min()])
        self.acc = (sums, maxes) if self.acc is None else (self.acc[0] + sums, torch.maximum(self.acc[1], maxes))
        if tokens is not None:
            self.tokens.append(tokens)
        self.last_alpha = alpha
        self.last_d = (d_w.detach().double().mean(), d_l.detach().double().mean())  # on the device: no sync here
        self.last_inputs = recheck_inputs
        self.last_z = (zw, zl)
        if self.probe is None and self.probe_batches is None and recheck_inputs is not None and self.recheck_every > 0:
            self.probe = {"batches": [recheck_inputs], "z_w": zw.clone(), "z_l": zl.clone()}

    def step_acc(self, vocab: int, dim: int, device) -> torch.Tensor | None:
        """The [2, V, d] fp32 step accumulator a host's per-micro-batch vocabulary pass adds each side's score
        matrix Σ_t (onehot − softmax)_tᵀ h_t to (`score_stats_head(acc=...)`; the host then marks the micro-batch's
        Tokens `in_acc`); None when the host did not ask for one (`step_acc=True`) or it exceeds STEP_ACC_BYTES."""
        if not self.step_acc_on or 8 * int(vocab) * int(dim) > STEP_ACC_BYTES:
            return None
        if self._step_acc is None or tuple(self._step_acc.shape) != (2, int(vocab), int(dim)):
            self._step_acc = torch.zeros(2, int(vocab), int(dim), dtype=torch.float32, device=device)
        self._gram_off = True  # the step continues in the accumulator: rows held so far go into it
        if self._gram.a:
            self._gram.flush(self._step_acc)
        return self._step_acc

    def step_gram(self, tokens: int, vocab: int, dim: int) -> StepGram | None:
        """Where a host has a micro-batch's final logits: the step's `StepGram` to hold its score rows, while the step's
        response tokens (with these `tokens`) stay under 2·dim (where the token Gram costs less than a vocabulary pass)
        and STEP_GRAM_BYTES, on one process; else None (the first micro-batch beyond it moves the held ones into the
        step accumulator when there is one, and the rest of the step takes the accumulator or the token pass)."""
        if self._gram_off or world_size() > 1:
            return None
        g = self._gram
        limit = self.gram_tokens or 2 * int(dim)
        if g.tokens + int(tokens) < limit and g.nbytes + 4 * int(tokens) * int(vocab) <= STEP_GRAM_BYTES:
            return g
        self._gram_off = True
        if g.a:  # into the step accumulator where there is one (else the step takes the token pass)
            self.step_acc(vocab, dim, g.a[0].device)
        return None

    def _reduce(self, acc) -> dict:
        sums, maxes = all_reduce(acc[0], "sum").cpu(), all_reduce(acc[1], "max").cpu()
        out = {k: float(v) for k, v in zip(SUM_KEYS, sums)}
        out.update(w_max=float(maxes[0]), w_min=-float(maxes[1]))
        return out

    def _step_scores(self, probe: list[Tokens] | None = None):
        """(the step's ‖s_w‖, ‖s_l‖, ⟨s_w, s_l⟩ (None when no micro-batch of the step was scored), how many pairs they
        cover, the probe cross products or None): exact, from the response tokens of every scored micro-batch on
        every rank. `probe`: this rank's probe pairs' response tokens at the step's weights; then the token pass also
        gives ⟨s_w, s_pw⟩, ⟨s_l, s_pw⟩, ⟨s_w, s_pl⟩, ⟨s_l, s_pl⟩ (s_p: the probe pairs' mean scores)."""
        toks, self.tokens = self.tokens, []
        gram = self._gram if self._gram.a else None
        try:
            return self._step_scores_of(toks, gram, probe or [])
        finally:
            self._gram.clear()
            self._gram_off = False

    def _step_scores_of(self, toks: list[Tokens], gram: StepGram | None, probe: list[Tokens]):
        dev = self.last_z[0].device
        acc = self._step_acc
        # a rank that scored nothing this step has nothing outside the accumulator (or the held rows)
        unaccumulated = bool(toks) and not all(t.in_acc for t in toks)
        counts = all_reduce(torch.tensor([float(len(toks)), float(sum(t.pairs for t in toks)), float(unaccumulated),
                                          float(sum(t.pairs for t in probe))], dtype=torch.float64, device=dev),
                            "sum").cpu()
        n_micro, n_pairs, n_probe = int(counts[0]), int(counts[1]), int(counts[3])
        if acc is not None and counts[2]:  # a micro-batch passed it by: the token pass from now on
            self._step_acc, self.step_acc_on, acc = None, False, None
        if n_micro == 0:
            return None, 0, None
        # one micro-batch on one process is the step: its own statistics (on several processes the rank that scored
        # it would skip the collectives below that the others enter)
        if not n_probe and gram is None and n_micro == 1 and world_size() == 1 and toks and toks[0].stats is not None:
            if acc is not None:
                acc.zero_()
            return toks[0].stats, n_pairs, None
        if counts[2] == 0 and gram is not None:  # the step's rows are held (one process): its token Gram
            pred = gram.probe_dots(n_micro, self._prows) if self._prows is not None else None
            return gram.stats(n_micro), n_pairs, pred
        if counts[2] == 0:  # every scored micro-batch on every rank added its score matrices to the accumulator
            if acc is None:  # this rank scored nothing yet: its share is zeros of the accumulator's shape
                with self.head() as spec:
                    acc = self.step_acc(spec.weight.shape[0], spec.weight.shape[1], dev)
            total = all_reduce(acc, "sum", inplace=True)  # zeroed below: no copy
            # each micro-batch added its pairs' mean: the step weighs micro-batches equally
            out = matrix_stats(total, 1.0 / max(n_micro, 1))
            pred = None
            if self._prows is not None:  # this rank's probe pairs' scores against the step's; summed over ranks
                local = self._prows.dots_acc(total, 1.0 / max(n_micro, 1))
                pred = tuple(float(x) for x in all_reduce(local.to(dev), "sum").cpu())
            acc.zero_()
            return out, n_pairs, pred
        if self.head is None or any(t.hidden is None for t in toks):
            raise ValueError("band monitor: the step's head statistics need each scored micro-batch's response "
                             "tokens (Tokens.hidden) and the head (BandMonitor(head=...))")
        ws, r = world_size(), rank()
        with self.head() as spec:
            spec: HeadSpec
            wdev = spec.weight.device
            d = spec.weight.shape[1]
            groups = [(t, 0) for t in toks] + [(t, 2) for t in probe]  # side = base + (0 chosen, 1 rejected)
            if groups:
                # each pair as the optimizer weighs it: 1/(micro-batches · its micro-batch's pairs); the probe's 1/P
                weights = torch.cat([torch.full((t.hidden.shape[0],), 1.0 / (max(t.pairs, 1) * n_micro) if base == 0
                                                else 1.0 / n_probe, device=wdev) for t, base in groups])
                hidden = torch.cat([t.hidden.to(wdev) for t, _ in groups])
                labels = torch.cat([t.labels.to(wdev) for t, _ in groups])
                side = torch.cat([base + (~t.chosen.to(wdev).bool()).long() for t, base in groups])
                have_lse = all(t.lse is not None for t, _ in groups)
                lse = torch.cat([t.lse.float().to(wdev) for t, _ in groups]) if have_lse else None
            else:
                hidden, labels = torch.zeros(0, d, device=wdev), torch.zeros(0, dtype=torch.long, device=wdev)
                side = torch.zeros(0, dtype=torch.long, device=wdev)
                weights = torch.zeros(0, device=wdev)
                have_lse, lse = True, torch.zeros(0, device=wdev)
            have_lse = bool(all_reduce(torch.tensor([0.0 if have_lse else 1.0], device=dev), "max").item() == 0)
            if ws > 1:
                hidden = all_gather_rows(hidden.float())
                labels = all_gather_rows(labels.long())
                side = all_gather_rows(side.long())
                weights = all_gather_rows(weights.float())
                lse = all_gather_rows(lse) if have_lse else None
            elif not have_lse:
                lse = None
            V = spec.weight.shape[0]
            vocab = (r * V // ws, (r + 1) * V // ws)
            chunk = max(64, min(self.score_chunk, (1 << 22) // max(1, hidden.shape[0])))
            all_toks = Tokens(hidden, labels, side == 0, lse, n_pairs)
            if lse is None:  # a log-sum-exp over the ranks' vocabulary slices
                part = partial_lse(all_toks, spec, vocab, chunk)
                top = all_reduce(part, "max")
                top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
                lse = top + all_reduce((part - top).exp(), "sum").log()
                all_toks = all_toks._replace(lse=lse)
            if n_probe:
                g = all_reduce(side_gram(hidden, labels, side, lse, spec, [1.0] * 4, vocab, chunk, weights).double(),
                               "sum").cpu()
                stats = ScoreStats(g[0, 0].clamp(min=0).sqrt(), g[1, 1].clamp(min=0).sqrt(), g[0, 1])
                return stats, n_pairs, tuple(float(g[i, j]) for i, j in ((0, 2), (1, 2), (0, 3), (1, 3)))
            sums = all_reduce(step_score_sums(all_toks, spec, n_pairs, vocab, chunk, weights=weights).double(),
                              "sum").cpu()
        return ScoreStats(sums[0].clamp(min=0).sqrt(), sums[1].clamp(min=0).sqrt(), sums[2]), n_pairs, None

    def _alpha_spread(self) -> float:
        """max − min over ranks of the last micro-batch's α (0 when every rank calibrates identically)."""
        v = all_reduce(torch.tensor([self.last_alpha, -self.last_alpha], dtype=torch.float64), "max")
        return float(v[0] + v[1])

    def _recheck(self, global_step: int) -> dict:
        """Per-pair changes of z on the same pairs, every `recheck_every` steps (null on the other steps): the
        step's last micro-batch re-scored after the update (its change over this one step), and the probe
        micro-batch (the first trained on) re-scored (its change since the start of training). Every rank calls it
        at the same steps (ZeRO-3 forwards are collective)."""
        due = self.recheck_every > 0 and global_step % self.recheck_every == 0
        if not due or self.last_inputs is None or self.rescore is None:
            return dict.fromkeys(RECHECK_KEYS)
        dev = self.last_z[0].device
        with torch.no_grad():
            zw2, zl2 = self.rescore(self.last_inputs)
            pw = pl = None
            if self.probe:
                pw, pl = (torch.cat(z) for z in zip(*(self.rescore(_to_device(x, dev))[:2]
                                                       for x in self.probe["batches"])))
        dw, dl = zw2.double() - self.last_z[0].to(zw2.device), zl2.double() - self.last_z[1].to(zl2.device)
        one = torch.tensor(1.0, dtype=torch.float64, device=dw.device)
        vec = [(dw > 0).double().sum(), (dl < 0).double().sum(), one * dw.numel(), dw.sum(), dl.sum()]
        if pw is not None:
            pdw = pw.double() - self.probe["z_w"].to(pw.device)
            vec += [one * pw.numel(), pdw.sum().to(one), (pl.double() - self.probe["z_l"].to(pl.device)).sum().to(one),
                    (pdw < 0).double().sum().to(one)]
        else:
            vec += [one * 0, one * 0, one * 0, one * 0]
        up, down, n, sdw, sdl, pn, pdw, pdl, pdown = (float(x) for x in all_reduce(torch.stack(vec), "sum").cpu())
        out = {"chosen_up_frac": up / n, "rejected_down_frac": down / n, "step_delta_z_w": sdw / n,
               "step_delta_z_l": sdl / n, "probe_delta_z_w": None, "probe_delta_z_l": None,
               "probe_chosen_down_frac": None, "probe_pred_w": None, "probe_pred_l": None}
        if pn > 0:
            out.update(probe_delta_z_w=pdw / pn, probe_delta_z_l=pdl / pn, probe_chosen_down_frac=pdown / pn)
        return out

    def _alarm(self, rec: dict) -> int:
        """The measured-displacement alarm: 1 on the step where the probe pairs' mean chosen log-likelihood change
        since the start has been at or below `probe_alarm_nats` on `probe_alarm_checks` consecutive re-checks (a
        measurement on the same pairs, not a prediction; one re-check alone can catch a dip the run recovers from),
        printed once with what to try; 0 otherwise (docs/monitor.md, "Alarm")."""
        delta = rec.get("probe_delta_z_w")
        if delta is None or not math.isfinite(delta):  # no re-check this step: the streak waits for the next one
            return 0
        self.alarm_streak = self.alarm_streak + 1 if delta <= self.probe_alarm_nats else 0
        if self.alarm_step is not None or self.alarm_streak < self.probe_alarm_checks:
            return 0
        self.alarm_step = rec["step"]
        down = rec.get("probe_chosen_down_frac")
        self.log(f"[po_plugins] ALARM (measured): the probe pairs' chosen log-likelihood has fallen by {-delta:.3g} "
                 f"nats per pair since the start of training (step {rec['step']}, at or below "
                 f"{self.probe_alarm_nats:g} on {self.alarm_streak} consecutive re-checks"
                 + (f"; {down:.0%} of the pairs fell" if down is not None else "")
                 + "): the chosen responses are being displaced"
                 + self._shared_note(", which any incentive ratio below 1 pushes down in both; try {hint} first")
                 + (f"; try {self.alarm_hint}" if self.alarm_hint else ""))
        return 1

    def _shared_note(self, then: str) -> str:
        """'; N% of the response tokens so far are text a pair's two responses start with' + `then` (formatted with
        the host's spelling of the detach option), when that share is at least 5% and shared starts are not
        detached; else ''."""
        t = self.tally
        frac = t["shared_tok"] / t["resp_tok"] if t["resp_tok"] else 0.0
        if frac < 0.05 or not self.shared_hint:
            return ""
        return (f"; {frac:.0%} of the response tokens so far are text a pair's two responses start with"
                + then.format(hint=self.shared_hint))

    def close_scores(self) -> None:
        """Before the optimizer step (every rank, at the step's boundary): the step's head statistics, computed while
        the head still holds the weights its forwards used (the token pass rebuilds logits from the head weight and
        pairs them with the forwards' hidden states and log-normalisers); `end_step` then uses them."""
        if self.acc is not None and self._closed is None:
            if self.probe is None and self.probe_batches and self.rescore is not None:  # at the initial weights
                with torch.no_grad():
                    zs = [self.rescore(_to_device(x, self.last_z[0].device))[:2] for x in self.probe_batches]
                self.probe = {"batches": self.probe_batches, "z_w": torch.cat([z[0] for z in zs]).double(),
                              "z_l": torch.cat([z[1] for z in zs]).double()}
            stats, pairs, self._pred = self._step_scores(self._refresh_probe())
            self._closed = (stats, pairs)

    def due(self) -> bool:
        """Whether the step being accumulated is a re-check step (every `recheck_every` steps)."""
        return self.recheck_every > 0 and self.next_step % self.recheck_every == 0

    def _refresh_probe(self) -> list[Tokens] | None:
        """On re-check steps and at the first step: the probe pairs' response tokens at the step's weights (the host's
        re-score with `tokens=True`), kept as `ProbeRows` (within STEP_GRAM_BYTES) for `probe_pred_*` on every step
        until the next re-check; returned on re-check steps, where a step without held rows or accumulator takes them
        through its token pass. None on other steps or where the host cannot give them."""
        if not (self.probe and self._rescore_tokens) or not (self.due() or self._prows is None):
            return None
        dev = self.last_z[0].device
        out = []
        with torch.no_grad():
            for x in self.probe["batches"]:
                got = self.rescore(_to_device(x, dev), tokens=True)
                if got[2] is None:
                    return None
                out.append(got[2])
        n_probe = int(all_reduce(torch.tensor([float(sum(t.pairs for t in out))], dtype=torch.float64, device=dev),
                                 "sum").item())
        self._prows = None
        with self.head() as spec:
            big = sum(int(t.hidden.shape[0]) for t in out) * int(spec.weight.shape[0]) * 4 > STEP_GRAM_BYTES
            if float(all_reduce(torch.tensor([float(big)], dtype=torch.float64, device=dev), "max").item()) == 0:
                self._prows = ProbeRows.build(out, spec, n_probe, self.score_chunk)
        return out if self.due() else None

    _closed = None

    def end_step(self, global_step: int) -> dict:
        """Close the optimizer step: the JSONL record (rank 0), the alert, and {'po/<key>': value} for the logs."""
        if self.acc is None:
            return {}
        self.close_scores()  # where the host did not call it before the optimizer step (every host here does)
        s = self._reduce(self.acc)
        self.acc = None
        n = s["n"]
        rec = {"step": int(global_step), "loss_name": self.loss.name}
        for k in ("z_w", "z_l", "r_w", "r_l", "d_w", "d_l"):
            rec[k] = s[k] / n
        # the band's incentives as the optimizer weighs the pairs: each micro-batch's mean, micro-batches equally
        # (= d_w, d_l when the micro-batches are equal; an epoch's smaller last micro-batch weighs its pairs more)
        step_dw, step_dl = s["d_w_m"] / s["micro"], s["d_l_m"] / s["micro"]
        (st, scored), self._closed = self._closed, None
        pred, self._pred = self._pred, None
        self.next_step = int(global_step) + 1
        if st is None:
            rec.update(dict.fromkeys(("log_r", "log_r_star", "rho", "band_lower", "band_upper", "slack", "in_band",
                                      "pred_sign_w", "pred_sign_l", "edge", "sw_norm", "sl_norm", "sw_dot_sl")))
        else:
            sw, sl, dot = (float(x) for x in st)
            band = band_stats(step_dw, step_dl, sw, sl, dot)
            if not all(math.isfinite(v) for v in (step_dw, step_dl, sw, sl, dot)):
                # a non-finite incentive or score: no verdict (null), and the alert streak is left as it was
                band = {**band, **dict.fromkeys(("in_band", "pred_sign_w", "pred_sign_l", "edge", "slack"))}
            rec.update(log_r=band["log_r"], log_r_star=band["log_r_star"], rho=band["rho"],
                       band_lower=band["lower"], band_upper=band["upper"], slack=band["slack"],
                       in_band=band["in_band"], pred_sign_w=band["pred_sign_w"], pred_sign_l=band["pred_sign_l"],
                       edge=band["edge"], sw_norm=sw, sl_norm=sl, sw_dot_sl=dot)
        rec["score_pairs"] = scored
        rec["micro_in_band_frac"] = s["micro_in_band"] / s["micro_scored"] if s["micro_scored"] else None
        rec["alpha"] = s["alpha"] / n
        rec["loss"] = s["loss"] / n
        rec["alpha_rank_spread"] = self._alpha_spread()
        rec["shared_frac"] = s["shared_tok"] / s["resp_tok"] if s["resp_tok"] else None
        self.tally["shared_tok"] += s["shared_tok"]
        self.tally["resp_tok"] += s["resp_tok"]
        rec.update(self._recheck(global_step))
        if pred is not None:  # the step's first-order change of the probe pairs' mean chosen / rejected log-likelihood
            # per unit learning rate of a gradient step on the head weight: d_w⟨s_w, s_p⟩ − d_l⟨s_l, s_p⟩
            rec["probe_pred_w"] = step_dw * pred[0] - step_dl * pred[1]
            rec["probe_pred_l"] = step_dw * pred[2] - step_dl * pred[3]
        rec["probe_alarm"] = self._alarm(rec)
        rec.update(self._scope())
        if "margins" in self.loss.needs:
            rec.update(w_mean=s["w_sum"] / n, w_min=s["w_min"], w_max=s["w_max"], w_capped_frac=s["w_capped"] / n)
        rec = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in rec.items()}
        if rec["in_band"] is not None:
            self.out_streak = 0 if rec["in_band"] else self.out_streak + 1
        msg = alert_message(self.out_streak, self.alert_steps, rec, self.hint)
        if msg:
            self.log(msg)
            self.alert_step = rec["step"]
        self._tally(rec)
        if self.is_rank_0():
            self._write(rec)
        return {f"po/{k}": rec[k] for k in LOG_KEYS if rec.get(k) is not None}

    def _scope(self) -> dict:
        """--po.band_scope model: the step's last micro-batch's band with its mean incentives, from the scores of every
        trainable parameter (`scope_model_*`) and from the head's closed form on the same pairs (`scope_head_*`)."""
        sc, self.scope = self.scope, None
        if sc is None or self.last_d is None:
            return {}
        out = {"scope_pairs": sc["scope_pairs"], "scope_params": sc["scope_params"]}
        for name in ("model", "head"):
            if f"scope_{name}" not in sc:
                continue
            sw, sl, dot = sc[f"scope_{name}"]
            band = band_stats(float(self.last_d[0]), float(self.last_d[1]), sw, sl, dot)
            out.update({f"scope_{name}_sw_norm": sw, f"scope_{name}_sl_norm": sl, f"scope_{name}_rho": band["rho"],
                        f"scope_{name}_log_r_star": band["log_r_star"], f"scope_{name}_in_band": band["in_band"]})
        return out

    def _tally(self, rec: dict) -> None:
        t = self.tally
        t["steps"] += 1
        if rec.get("in_band") is not None:
            t["verdicts"] += 1
            t["in_band"] += int(bool(rec["in_band"]))
        if rec.get("edge"):
            t["edges"][rec["edge"]] = t["edges"].get(rec["edge"], 0) + 1
        if rec.get("probe_delta_z_w") is not None:
            t.update(probe_w=rec["probe_delta_z_w"], probe_l=rec.get("probe_delta_z_l"), probe_step=rec["step"])

    def summary(self) -> str:
        """The one line a run ends with (every host prints it, rank 0): steps in band, the edge crossed most, the
        alert and the alarm with their steps, the probe pairs' chosen and rejected change since the start, where the
        trace is and the report command (docs/monitor.md, "End of run")."""
        t = self.tally
        band = (f"in band {t['in_band']}/{t['verdicts']} steps" if t["verdicts"] else "no band verdict")
        if t["edges"]:
            edge, n = max(t["edges"].items(), key=lambda kv: kv[1])
            band += f", {edge} edge crossed most ({n} steps)"
        alert = f"alert at step {self.alert_step}" if self.alert_step is not None else "no alert"
        alarm = (f"displacement alarm at step {self.alarm_step}" if self.alarm_step is not None
                 else "no displacement alarm")
        probe = ("" if t["probe_w"] is None else
                 f"; probe pairs since the start (step {t['probe_step']}): chosen {t['probe_w']:+.3g}, rejected "
                 f"{t['probe_l']:+.3g} nats")
        shared = self._shared_note(" (an incentive ratio below 1 pushes it down in both responses; {hint} stops that "
                                   "where it would)")
        return (f"[po_plugins] end of run ({self.loss.name}, {t['steps']} steps): {band}; {alert}; {alarm}{probe}"
                f"{shared}; trace {self.path}; report: po-plugins report "
                f"{os.path.dirname(os.path.abspath(self.path))}")

    def _write(self, rec: dict) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        if not self._truncated:  # the run's first record: a fresh run replaces the trace, a resumed one truncates it
            self._truncated = True
            keep = []
            if self._resumed and os.path.exists(self.path):  # the records before its checkpoint's step
                with open(self.path) as f:
                    for line in f:
                        try:
                            obj = json.loads(line)
                        except json.JSONDecodeError:
                            continue
                        if "meta" not in obj and obj.get("step", 0) < rec["step"]:
                            keep.append(line if line.endswith("\n") else line + "\n")
            meta = {"loss": self.loss.name, "hparams": _jsonable(self.loss.hparams), **self.meta}
            with open(self.path, "w") as f:
                f.write(json.dumps({"meta": meta}, allow_nan=False) + "\n")
                f.writelines(keep)
        with open(self.path, "a") as f:
            f.write(json.dumps(rec, allow_nan=False) + "\n")
            f.flush()

    def state_dict(self) -> dict:
        probe = None
        if self.probe is not None:
            probe = {k: _to_device(v, "cpu") for k, v in self.probe.items()}
        return {"out_streak": self.out_streak, "probe": probe, "alarm_step": self.alarm_step,
                "alarm_streak": self.alarm_streak, "next_step": self.next_step}

    def load_state_dict(self, state: dict) -> None:
        self.out_streak = int(state.get("out_streak", 0))
        self.probe = state.get("probe")
        if self.probe is not None and "batches" not in self.probe:  # a checkpoint of an earlier version
            self.probe = {"batches": [self.probe["inputs"]], "z_w": self.probe["z_w"], "z_l": self.probe["z_l"]}
        self.next_step = int(state.get("next_step", self.next_step))
        self.alarm_step = state.get("alarm_step")
        self.alarm_streak = int(state.get("alarm_streak", 0))
        self._resumed = True


def _to_device(obj, device):
    """Tensors inside tuples, lists and dicts moved to `device` (other objects, e.g. the hosts' ints, as they are)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def plugin_state(loss: PairLoss, monitor: BandMonitor | None) -> dict:
    """What a checkpoint carries for the plugin: the objective's name and running state (RC's EMAs and α, β-DPO's
    statistics) and the monitor's, so that a resumed run continues the identical α sequence."""
    return {"loss_name": loss.name, "loss": loss.state_dict(),
            "monitor": monitor.state_dict() if monitor is not None else {}}


def load_plugin_state(state: dict, loss: PairLoss, monitor: BandMonitor | None, where: str = "the checkpoint") -> None:
    """Restore `plugin_state`; PluginStateError (one line, naming both objectives) when the checkpoint was
    trained with another objective."""
    saved = state.get("loss_name")
    if saved is not None and saved != loss.name:
        raise PluginStateError(f"{where} was trained with the objective '{saved}', this run uses '{loss.name}': "
                               f"resume with the loss '{saved}', or start a fresh run in a new output directory")
    try:
        loss.load_state_dict(state["loss"])
    except (KeyError, TypeError) as e:
        raise PluginStateError(f"{where} holds the state of another objective (missing {e}); this run uses "
                               f"'{loss.name}': resume with the loss the checkpoint was trained with, or start a "
                               "fresh run in a new output directory") from None
    if monitor is not None:
        monitor.load_state_dict(state.get("monitor", {}))


def _jsonable(d):
    return {k: (v if isinstance(v, (int, float, str, bool, type(None))) else repr(v)) for k, v in d.items()}
