"""The host-neutral plugin object: everything po_plugins does inside a host's DPO step, written once for every host.

A host adapter (`po_plugins/hosts/<host>.py`) builds one `Plugin` when its trainer starts and calls it at six
points of the host's step (docs/architecture.md):

    plugin = Plugin(loss, options, adapter, RunInfo(accumulation, world_size, output_dir, spell_loss))
    scoring = plugin.scoring(training)            # per micro-batch: score this one? (the score_every cadence)
    tokens = plugin.tokens_from_head(...)         # ... if so, its response tokens and, where needed, its statistics
    per_sample, cr, rr = plugin.loss_step(batch, training, inputs, tokens)   # the objective, and the monitor fed
    plugin.before_optimizer_step()                # at the step's boundary, before the weights change
    logs.update(plugin.end_step(global_step))     # per optimizer step: the band record and the po/* scalars
    state = plugin.state_dict(); plugin.load_state_dict(state, where)        # with the host's checkpoints

The adapter supplies only what it alone can know (`hosts.base.HostAdapter`): the head and its inputs, a re-score of
a micro-batch, where its messages go. The Plugin owns the objective (with a folded chosen-NLL term), the band monitor,
the scoring cadence, the step accumulator decision, the loss call, the step end and the state. A new option is added
here (and in `options.OPTIONS`) and reaches every host.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any

import torch

from .errors import DataError, OptionError, PluginStateError
from .losses import PairBatch, PairLoss, with_chosen_nll
from .monitor import BandMonitor, load_plugin_state, loss_step, plugin_state
from .options import OPTIONS
from .prefix import detach_shared, guard_shared, shared_prefix_mask
from .scores import (
    HeadSpec,
    ReusedStats,
    ScoreStats,
    Tokens,
    head_score_rows,
    matrix_stats,
    score_rows,
    score_stats_flat,
    score_stats_head,
    tokens_of,
)


def micro_stats_needed(calibrating: bool, accumulation: int, world_size: int) -> bool:
    """Per-micro-batch band statistics: RC calibrates on them; a step of one micro-batch on one process reuses them
    as the step's (the monitor then skips its step-level pass)."""
    return calibrating or (accumulation == 1 and world_size == 1)


def step_acc_wanted(calibrating: bool, accumulation: int, world_size: int) -> bool:
    """RC's per-micro-batch vocabulary pass also fills the monitor's step accumulator (BandMonitor(step_acc=...))
    when a step spans several micro-batches or processes; a single micro-batch's own statistics are the step's."""
    return calibrating and not (accumulation == 1 and world_size == 1)


def needs_margins(loss: PairLoss) -> bool:
    return "margins" in loss.needs


class Plugin:
    """The plugin inside one host run.

    Args:
        loss: the objective, as built by `po_plugins.losses.build` (rc_* included).
        options: the plugin options by their `options.OPTIONS` names (missing ones take their defaults).
        adapter: the host's trainer, providing `po_head_spec()`, `po_rescore(inputs)`, `po_print(msg)` and
            `po_is_rank_0()` (`hosts.base.HostAdapter`).
        run: the host run's `hosts.base.RunInfo` (accumulation window, world size, output dir, loss spelling).
        nll_coef: the host's own chosen-NLL coefficient (OpenRLHF's --model.nll_loss_coef, LLaMA-Factory's
            pref_ftx), folded into the objective so that incentives, RC's α and the band include it (0: none).
    """

    def __init__(self, loss: PairLoss, options: dict[str, Any], adapter, run, nll_coef: float = 0.0):
        self.options = {**{k: d for k, (_t, d, _h) in OPTIONS.items()}, **options}
        self.loss = with_chosen_nll(loss, nll_coef) if nll_coef else loss
        self.calibrating = "score_stats" in self.loss.needs  # reward calibration feeds on the head statistics
        self.adapter, self.run = adapter, run
        self.monitor: BandMonitor | None = None
        # what the band's scores are the gradient of (hosts.band_params; an adapter without it: the head's weight)
        scope = getattr(adapter, "po_band_params", None)
        self.scope = scope() if scope is not None and (self.options["monitor"] or self.calibrating) else {}
        if self.options["monitor"] or self.calibrating:
            path = self.options["jsonl"] or os.path.join(run.output_dir, "po_band.jsonl")
            hint = "" if self.calibrating else f"; consider {run.spell_loss('rc_' + self.loss.name)}"
            self.monitor = BandMonitor(self.loss, path, self.options["alert_steps"], self.options["recheck_every"],
                                       rescore=adapter.po_rescore, log=adapter.po_print, is_rank_0=adapter.po_is_rank_0,
                                       head=adapter.po_head_spec, score_chunk=int(self.options["score_chunk"]),
                                       hint=hint, step_acc=step_acc_wanted(self.calibrating, run.accumulation,
                                                                           run.world_size),
                                       probe_alarm_nats=float(self.options["probe_alarm_nats"]),
                                       probe_alarm_checks=int(self.options["probe_alarm_checks"]),
                                       alarm_hint=self._alarm_hint(run),
                                       shared_hint="" if self.options["shared_prefix"] != "keep"
                                       else run.spell_option("shared_prefix", "guard"),
                                       meta=self._meta(), probe_batches=self._probe_batches(adapter))
        if self.options["band_scope"] == "model" and self.monitor is not None and not hasattr(adapter,
                                                                                           "po_scope_forward"):
            raise OptionError(f"{type(adapter).__name__} cannot run the whole-model band (po_scope_forward): drop the "
                              "band_scope option")
        self.need_scores = self.monitor is not None
        self.micro_stats = micro_stats_needed(self.calibrating, run.accumulation, run.world_size)
        self.every = max(1, int(self.options["score_every"]))
        self.micro = 0
        self.last_scores: ScoreStats | None = None
        # --po.shared_prefix: keep (the paper's), detach (shared starts never carry gradient; the statistics are the
        # differing tokens'), guard (each pair's shared start keeps its gradient unless the pair would lower it)
        self.shared_mode = self.options["shared_prefix"]
        self.detach_shared = self.shared_mode in ("detach", "guard")  # the host detaches, `guard_sums` gives back
        self.stats_without_shared = self.shared_mode == "detach"

    def _meta(self) -> dict:
        """The trace header's lines from the run: the band's scope (`band_params`, `tied_embeddings`, `lora_head`) and,
        with --po.probe_file, that file (the report then labels the probe as held-out pairs)."""
        path = self.options.get("probe_file")
        return {**self.scope, **({"probe_file": os.path.abspath(path)} if path else {})}

    def _probe_batches(self, adapter) -> list | None:
        """--po.probe_file: the held-out pairs the monitor re-scores (probe_delta_*, the alarm, probe_pred_*), as the
        host's micro-batch inputs (`adapter.po_probe_batches(path)`); None: the first training micro-batch."""
        path = self.options.get("probe_file")
        if not path:
            return None
        make = getattr(adapter, "po_probe_batches", None)
        if make is None:
            raise OptionError(f"{type(adapter).__name__} cannot read a probe file (po_probe_batches): drop the "
                              "probe_file option")
        spelled = self.run.spell_option("probe_file", path)
        if not os.path.isfile(path):
            raise DataError(f"the probe file {path} does not exist (set by {spelled}): point it at a preference "
                            "JSONL with the training set's columns", file=path)
        batches = list(make(path))
        if not batches:
            raise DataError(f"the probe file {path} holds no pairs (set by {spelled})", file=path)
        return batches

    @contextlib.contextmanager
    def probe_pass(self):
        """Around a host's re-score of the probe that also returns its response tokens (`rescore(inputs,
        tokens=True)`): the host captures the head input as on a scored training micro-batch (`scoring` is True),
        but nothing of it reaches the objective, the cadence or RC (no statistics, `stats_for` None)."""
        self.probing = True
        try:
            yield
        finally:
            self.probing = False

    probing = False
    _scoped = False

    def _alarm_hint(self, run) -> str:
        """What to try when the chosen responses are measured falling, in the host's terms: for the band-centre
        calibration its do-no-harm target (`rc_target nearest`: never worse than the base objective in the regimes of
        docs/choosing.md), the other side of the calibration (each side displaced where the other did not:
        docs/results_binding_regime.md, docs/demo.md), a lower learning rate, a chosen-NLL term where the host has
        one."""
        name = self.loss.name
        near = ""
        if self.calibrating and getattr(self.loss, "rc_target", "nearest") == "center":
            near = f"{run.spell_option('rc_target', 'nearest')} (calibrates only micro-batches outside their band), "
        other = (f"{near}{run.spell_loss(name[3:])} (uncalibrated)" if self.calibrating
                 else f"{run.spell_loss('rc_' + name)} (calibrated)")
        nll = f", a chosen-NLL term ({run.nll_flag})" if getattr(run, "nll_flag", "") else ""
        return f"{other}, a lower learning rate{nll}"

    # ---- per micro-batch ------------------------------------------------------------------------------------
    def scoring(self, training: bool) -> bool:
        """Whether the host should capture this training micro-batch's head inputs (`score_every` k: every k-th
        micro-batch; the statistics of the last scored one are reused in between). Call once per policy forward."""
        if self.probing:
            return True
        if not (training and self.need_scores):
            return False
        self.micro += 1
        return (self.micro - 1) % self.every == 0

    def shared(self, input_ids, attention_mask, response_mask, n_pairs: int, training: bool):
        """--po.shared_prefix detach, on a training forward: [2B, L] bool of the response tokens each pair's two rows
        share at their start (token indexing: `po_plugins.prefix.shared_prefix_mask`); None otherwise. The host
        stops those tokens' gradient (`prefix.detach_shared`) and leaves them out of the head statistics, so RC and
        the band describe the gradient taken (docs/monitor.md, "Shared prefix"). With the monitor on, the counts
        go to the step's `shared_frac` either way."""
        if not training or not (self.detach_shared or self.monitor is not None):
            return None
        mask = shared_prefix_mask(input_ids, attention_mask, response_mask, n_pairs)
        if self.monitor is not None:  # the step's shared_frac (also under keep: what the band cannot see)
            self.monitor.note_shared(int(mask.sum()), int(response_mask.bool().sum()))
        return mask if self.detach_shared else None

    def guard_sums(self, shared_sums):
        """What the host adds to its sums (shared tokens detached) for `guard`: zero in value, the shared start's
        gradient back for the pairs that would not lower it (`prefix.guard_shared`); 0 for the other modes."""
        return guard_shared(shared_sums) if self.shared_mode == "guard" else 0.0

    def sum_logps(self, per_token, mask, shared):
        """[N] summed response log-probs of a padded layout (per_token and mask [N, T]; `shared` from `shared`,
        shifted to the same indexing, or None): the stock sum's value bit for bit, the gradient of the shared mode."""
        if shared is None:
            return (per_token * mask).sum(-1)
        return (detach_shared(per_token, shared) * mask).sum(-1) + self.guard_sums((per_token * shared).sum(-1))

    def step_acc(self, vocab: int, dim: int, device) -> torch.Tensor | None:
        """The monitor's step accumulator for this micro-batch's vocabulary pass (None: the step makes its own)."""
        return self.monitor.step_acc(vocab, dim, device) if self.monitor is not None else None

    def tokens_from_logits(self, h, logits, y, rows, n_seqs: int, n_pairs: int, scale: float = 1.0,
                           cap: float | None = None, temperature: float = 1.0) -> Tokens:
        """A micro-batch's response tokens from the head's input `h` [M, d] and the final logits [M, V] the
        log-probs were taken from (labels `y`, sequence index `rows`; rows < n_pairs are chosen), with its own head
        statistics where they are needed (RC, or a step of one micro-batch)."""
        stats, acc = None, None
        lse = torch.logsumexp(logits.float(), dim=-1)
        gram = None if self.probing or self.monitor is None else self.monitor.step_gram(
            h.shape[0], logits.shape[-1], h.shape[-1])
        if gram is not None:  # few response tokens: the step holds their score rows (no vocabulary pass)
            own = gram.add(score_rows(logits, y, lse, scale, cap, temperature), h, rows < n_pairs, n_pairs)
            return tokens_of(h, y, rows, n_pairs, lse, own if self.micro_stats else None, in_acc=True)
        if self.probing:  # the probe's score rows for probe_pred_* (BandMonitor._refresh_probe): no rebuild
            from .monitor import STEP_GRAM_BYTES

            fits = 4 * logits.shape[0] * logits.shape[-1] <= STEP_GRAM_BYTES
            return tokens_of(h, y, rows, n_pairs, lse,
                             grad_rows=score_rows(logits, y, lse, scale, cap, temperature) if fits else None)
        if self.micro_stats:
            is_chosen = torch.arange(n_seqs, device=h.device) < n_pairs
            acc = self.step_acc(logits.shape[-1], h.shape[-1], h.device)
            stats = score_stats_flat(h, logits, y, rows, is_chosen, chunk_size=int(self.options["score_chunk"]),
                                     logit_scale=scale, softcap=cap, temperature=temperature, acc=acc)
        return tokens_of(h, y, rows, n_pairs, lse, stats, in_acc=acc is not None)

    def score_sink(self, rows, n_seqs: int, n_pairs: int, vocab: int, dim: int, device, keep=None):
        """For a chunked head that can fill them in its own pass (`head.chunked_logprobs(score_sink=...)`): the
        (weights [M, 2], buffer [2, V, d] fp32) this micro-batch's statistics need, each response token at 1/pairs of
        its side (0 where `keep` is False: detached shared starts); None where no statistics are needed or the
        buffer would exceed the step accumulator's budget (the statistics then make their own pass)."""
        from .monitor import STEP_ACC_BYTES

        if not self.micro_stats or self.probing or 8 * int(vocab) * int(dim) > STEP_ACC_BYTES:
            return None
        chosen = (rows < n_pairs).float()
        w = torch.stack([chosen, 1.0 - chosen], 1) / max(int(n_pairs), 1)
        if keep is not None:
            w = w * keep.float()[:, None]
        return w.to(device), torch.zeros(2, int(vocab), int(dim), dtype=torch.float32, device=device)

    def tokens_from_head(self, h, y, rows, n_seqs: int, n_pairs: int, weight, bias=None, scale: float = 1.0,
                         cap: float | None = None, temperature: float = 1.0, lse=None, chunk: int | None = None,
                         head_dtype=None, sink=None) -> Tokens:
        """As `tokens_from_logits`, where no logits exist (a fused or chunked head): the statistics come from the
        head's `weight` [V, d] (gathered by the caller under ZeRO-3) and `bias`; `lse` the log-normalisers when the
        host's head computed them, `head_dtype` the dtype of the head's own product. `sink`: the `score_sink` the
        chunked head filled in its forward, whose score matrices then give the statistics without a pass."""
        stats, acc = None, None
        if sink is not None:
            mats = sink[1]
            stats = matrix_stats(mats)
            acc = self.step_acc(mats.shape[1], mats.shape[2], mats.device)
            if acc is not None:
                acc.add_(mats)
            return tokens_of(h, y, rows, n_pairs, lse, stats, in_acc=acc is not None)
        gram = None
        if self.micro_stats and not self.probing and self.monitor is not None:
            gram = self.monitor.step_gram(h.shape[0], weight.shape[0], weight.shape[1])
        if gram is not None:  # few response tokens: the logits rebuilt once, the step holds their score rows
            spec = HeadSpec(weight, bias, scale, cap, temperature, head_dtype)
            a, lse = head_score_rows(h.detach().to(weight.device), y.to(weight.device), spec,
                                     None if lse is None else lse.to(weight.device))
            own = gram.add(a, h.detach().to(weight.device), (rows < n_pairs).to(weight.device), n_pairs)
            return tokens_of(h, y, rows, n_pairs, lse, own, in_acc=True)
        if self.micro_stats and not self.probing:
            dev = weight.device
            is_chosen = torch.arange(n_seqs, device=dev) < n_pairs
            acc = self.step_acc(weight.shape[0], weight.shape[1], dev)
            stats = score_stats_head(h.detach().to(dev), weight, y.to(dev), rows.to(dev), is_chosen, bias=bias,
                                     logit_scale=scale, softcap=cap, temperature=temperature, lse=lse,
                                     chunk_size=int(chunk or self.options["score_chunk"]), head_dtype=head_dtype,
                                     acc=acc)
        return tokens_of(h, y, rows, n_pairs, lse, stats, in_acc=acc is not None)

    def stats_for(self, tokens: Tokens | None) -> ScoreStats | None:
        """The head statistics the objective sees on this training micro-batch: its own when it was scored, else
        those of the last scored micro-batch (as `ReusedStats`: RC's score EMAs count each scored micro-batch once)."""
        if self.probing:
            return None
        if tokens is not None and tokens.stats is not None:
            self.last_scores = tokens.stats
            return tokens.stats
        return None if self.last_scores is None else ReusedStats(*self.last_scores)

    def loss_step(self, b: PairBatch, training: bool, recheck_inputs=None, tokens: Tokens | None = None):
        """(per-sample losses [B], detached chosen and rejected implicit rewards [B]) of `b`; on training
        micro-batches the monitor is fed (`tokens`: this micro-batch's, None when it was not scored)."""
        return loss_step(self.loss, b, self.monitor, training, recheck_inputs, tokens)

    def margins_or_unit(self, margins, like: torch.Tensor):
        """Margins for an objective that needs them, where a batch has none (an evaluation set without the column):
        zeros, whose MADPO weight is exactly 1."""
        if margins is None and needs_margins(self.loss):
            return torch.zeros_like(like)
        return margins

    # ---- per optimizer step ---------------------------------------------------------------------------------
    def before_optimizer_step(self) -> None:
        """At the step's boundary, before the optimizer changes the weights (every rank): the monitor closes the
        step's head statistics at the weights the step's forwards used."""
        if self.monitor is not None:
            if self.options["band_scope"] == "model" and (self.monitor.due() or not self._scoped):
                self._scoped = True  # also at the first step: a setting it cannot run with shows at once
                self.monitor.scope = self._model_scope()
            self.monitor.close_scores()

    def _model_scope(self) -> dict | None:
        """--po.band_scope model, on re-check steps before the optimizer step: the step's last micro-batch forwarded
        again with gradients (`adapter.po_scope_forward`), s_w = ∇ mean z_w and s_l = ∇ mean z_l by autograd over every
        trainable parameter (never into .grad), and the closed form's head statistics of the same forward's response
        tokens; both bands with that micro-batch's mean incentives (the `scope_*` keys, docs/monitor.md "Scope")."""
        from .scores import partial_lse, side_gram

        mon = self.monitor
        if mon.last_inputs is None or mon.last_d is None:
            return None
        zw, zl, tokens, params = self.adapter.po_scope_forward(mon.last_inputs)
        n = zw.shape[0]
        params = [p for p in params if p.requires_grad]
        try:
            gw = torch.autograd.grad(zw.float().sum() / n, params, retain_graph=True, allow_unused=True)
            gl = torch.autograd.grad(zl.float().sum() / n, params, allow_unused=True)
        except RuntimeError as e:
            if "use_reentrant" not in str(e):
                raise
            raise OptionError(f"{self.run.spell_option('band_scope', 'model')} takes gradients with "
                              "torch.autograd.grad, which reentrant gradient checkpointing does not support: make it "
                              "non-reentrant (OpenRLHF: drop --model.gradient_checkpointing_reentrant; TRL: "
                              "gradient_checkpointing_kwargs={'use_reentrant': False}; LLaMA-Factory: "
                              "use_reentrant_gc: false) or turn "
                              "gradient checkpointing off for the check") from None
        sums = torch.zeros(3, dtype=torch.float64)
        for a, b in zip(gw, gl):
            a = None if a is None else a.double()
            b = None if b is None else b.double()
            if a is not None:
                sums[0] += float(a.pow(2).sum())
            if b is not None:
                sums[1] += float(b.pow(2).sum())
            if a is not None and b is not None:
                sums[2] += float((a * b).sum())
        del gw, gl
        out = {"scope_pairs": n, "scope_params": sum(p.numel() for p in params),
               "scope_model": [float(sums[0].sqrt()), float(sums[1].sqrt()), float(sums[2])]}
        if tokens is not None and tokens.hidden is not None:
            with self.adapter.po_head_spec() as spec:
                dev = spec.weight.device
                lse = tokens.lse
                if lse is None:
                    lse = partial_lse(tokens, spec, (0, spec.weight.shape[0]))
                side = (~tokens.chosen.bool()).long().to(dev)
                g = side_gram(tokens.hidden.to(dev), tokens.labels.to(dev), side, lse.to(dev), spec,
                              [1.0 / n, 1.0 / n]).double().cpu()
            out["scope_head"] = [float(g[0, 0].clamp(min=0).sqrt()), float(g[1, 1].clamp(min=0).sqrt()),
                                 float(g[0, 1])]
        return out

    def end_step(self, global_step: int) -> dict:
        """Close the optimizer step: the band record (rank 0's JSONL), the alert; returns {'po/<key>': value}."""
        return self.monitor.end_step(global_step) if self.monitor is not None else {}

    def finish(self) -> None:
        """At the end of training: the monitor's one-line summary, printed the host's way (rank 0)."""
        if self.monitor is not None:
            self.adapter.po_print(self.monitor.summary())

    # ---- state ------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return plugin_state(self.loss, self.monitor)

    def load_state_dict(self, state: dict, where: str = "the checkpoint") -> None:
        """Restore `state_dict()`; PluginStateError (one line naming both objectives) for another objective's."""
        load_plugin_state(state, self.loss, self.monitor, where)

    # ---- messages ---------------------------------------------------------------------------------------------
    def banner(self, *notes: str) -> str:
        """The one line a run starts with: the objective, the monitor, and the host's notes."""
        tied = ("band scope: the LM head's use of its weight (tied to the input embedding, whose gradient share "
                "the band leaves out: docs/monitor.md, 'Scope')") if self.scope.get("tied_embeddings") else ""
        detach = (f"shared response prefixes: {self.shared_mode} "
                  f"({self.run.spell_option('shared_prefix', self.shared_mode)})" if self.detach_shared else "")
        parts = [f"[po_plugins] loss {self.loss!r}", f"monitor {'on' if self.monitor else 'off'}", tied, detach, *notes]
        return "; ".join(p for p in parts if p)


def row_number(value, row: int, column: str, where: str, flag: str) -> float | None:
    """A per-row margin or weight as a float (None when the row has none: None or NaN); one DataError naming the row,
    the column, where and the flag for anything that is not a number ("n/a", a list, true)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    try:
        if isinstance(value, bool):
            raise TypeError
        return float(value)
    except (TypeError, ValueError):
        raise DataError(f"row {row} of {where} has a non-numeric value {value!r} in '{column}' ({flag}); margins and "
                        "weights must be numbers (null for a row without one)", row=row, column=column) from None


def require_margins(loss: PairLoss, have_column: bool, fix: str) -> None:
    """One OptionError at start when `loss` weighs pairs by reward-model margins and no margin column is set;
    `fix` says, in the host's terms, how to name the column."""
    if needs_margins(loss) and not have_column:
        raise OptionError(f"loss '{loss.name}' needs reward-model margins: {fix} (po_plugins.cli.score_margins "
                          "writes rm_margin)")


__all__ = ["Plugin", "PluginStateError", "micro_stats_needed", "step_acc_wanted", "require_margins", "row_number"]
