"""What the hosts built on transformers' Trainer (TRL, LLaMA-Factory) share: the monitor's step-end callback, the
plugin state in every Trainer checkpoint, rank-0 printing, and row columns carried into the batch by the collator.

A host's trainer class mixes `TrainerPlugin` in before the host's own trainer and provides `po_loss`, `po_monitor`
and `_po_step_metrics()` (the dict of lists its `log()` averages, where the `po/*` scalars go).
"""

from __future__ import annotations

import math
import os

import torch
from transformers import TrainerCallback

from ..monitor import BandMonitor, PluginStateError, load_plugin_state, plugin_state
from . import head_spec, micro_stats_needed, step_acc_wanted

STATE_FILE = "po_plugins_state_rank{}.pt"


class TrainerPlugin:
    po_loss = None
    po_monitor = None

    def _po_step_metrics(self) -> dict:  # pragma: no cover - each host says where its train metrics live
        raise NotImplementedError

    def _po_print(self, msg: str) -> None:
        if self.args.process_index == 0:
            print(msg, flush=True)

    def _po_start_monitor(self, on: bool, jsonl: str | None, alert_steps: int, recheck_every: int,
                          score_chunk: int = 4096, hint: str | None = None) -> None:
        """The band monitor (on for rc_* objectives too), writing `<output_dir>/po_band.jsonl` by default."""
        self.po_monitor = None
        calibrating = self.po_loss.name.startswith("rc_")
        self._po_micro_stats = micro_stats_needed(calibrating, self.args.gradient_accumulation_steps,
                                                  self.args.world_size)
        if on or calibrating:
            path = jsonl or os.path.join(self.args.output_dir, "po_band.jsonl")
            self.po_monitor = BandMonitor(self.po_loss, path, alert_steps, recheck_every, rescore=self._po_rescore,
                                          log=self._po_print, is_rank_0=lambda: self.args.process_index == 0,
                                          head=self._po_head_spec, score_chunk=score_chunk,
                                          hint="" if calibrating else hint,
                                          step_acc=step_acc_wanted(calibrating,
                                                                   self.args.gradient_accumulation_steps,
                                                                   self.args.world_size))
            self.add_callback(StepEnd(self))

    def _po_step_acc(self, vocab: int, dim: int, device):
        """The monitor's step accumulator for this micro-batch's vocabulary pass (None: the step makes its own)."""
        return self.po_monitor.step_acc(vocab, dim, device) if self.po_monitor is not None else None

    def _po_head_spec(self):
        m = self.accelerator.unwrap_model(self.model)
        base = m.get_base_model() if hasattr(m, "get_base_model") else m
        return head_spec(base, base.get_output_embeddings())

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.po_loss is None:
            return
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        out = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        os.makedirs(out, exist_ok=True)
        torch.save(plugin_state(self.po_loss, self.po_monitor),
                   os.path.join(out, STATE_FILE.format(self.args.process_index)))

    def train(self, resume_from_checkpoint=None, *a, **kw):
        path = resume_from_checkpoint
        if isinstance(path, bool) and path:
            from transformers.trainer_utils import get_last_checkpoint

            path = get_last_checkpoint(self.args.output_dir)
        if path and self.po_loss is not None:
            mine = os.path.join(path, STATE_FILE.format(self.args.process_index))
            first = os.path.join(path, STATE_FILE.format(0))
            found = mine if os.path.exists(mine) else first if os.path.exists(first) else None
            if found is None:
                self._po_print(f"[po_plugins] WARNING: {path} holds no po_plugins state; the objective's running "
                               "statistics (RC's α) start afresh")
            else:
                try:
                    load_plugin_state(torch.load(found, weights_only=False), self.po_loss, self.po_monitor,
                                      f"the checkpoint {path}")
                except PluginStateError as e:
                    raise SystemExit(f"po_plugins: {e}") from None
                self._po_print(f"[po_plugins] restored the plugin state from {found}")
        return super().train(resume_from_checkpoint, *a, **kw)


class StepEnd(TrainerCallback):
    """Closes each optimizer step for the monitor; its po/* scalars join the host's own metrics (averaged per log,
    then into every report_to backend)."""

    def __init__(self, trainer: TrainerPlugin):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        t = self.trainer
        for k, v in t.po_monitor.end_step(state.global_step).items():
            t._po_step_metrics()[k].append(v)


class RowExtras:
    """Wraps a host's collator: per-row columns become [B] float tensors of the same batch, in the batch's row
    order. `columns`: {batch key: (row column, value for a missing or non-finite entry)}; a column is carried only
    when every row of the batch has it (an evaluation set without it gets none: unweighted)."""

    def __init__(self, inner, columns: dict[str, tuple[str, float]]):
        self.inner, self.columns = inner, columns

    def __call__(self, examples, *a, **kw):
        names = {c for c, _ in self.columns.values()}
        vals = {c: [ex.get(c) for ex in examples] for c in names if examples and all(c in ex for ex in examples)}
        out = self.inner([{k: v for k, v in ex.items() if k not in names} for ex in examples], *a, **kw)
        for key, (col, default) in self.columns.items():
            if col in vals:
                out[key] = torch.tensor([finite_or(v, default) for v in vals[col]], dtype=torch.float32)
        return out

    def __getattr__(self, name):  # the collator's own attributes (pad_token_id, max_length, ...)
        return getattr(self.inner, name)


def finite_or(v, default: float) -> float:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return default
    return v if math.isfinite(v) else default


def columns(ds) -> list | None:
    cols = getattr(ds, "column_names", None)
    return list(cols) if isinstance(cols, (list, tuple)) else None
