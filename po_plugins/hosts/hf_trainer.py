"""What the hosts built on transformers' Trainer (TRL, LLaMA-Factory) share: building the `Plugin` with the Trainer's
run facts, the monitor's step end and the plugin state through public Trainer callbacks (`on_step_end`, `on_save`),
resuming it in `train()`, rank-0 printing, and row columns carried into the batch by the collator.

A host's trainer class mixes `TrainerPlugin` in before the host's own trainer and provides `_po_step_metrics()` (the
dict of lists its `log()` averages, where the `po/*` scalars go) and `po_rescore(inputs)`; the other duties of
`hosts.base.HostAdapter` (head spec, printing, rank 0) are the mixin's.
"""

from __future__ import annotations

import math
import os

import torch
from transformers import TrainerCallback

from ..errors import OptionError
from ..plugin import Plugin
from . import band_params, head_spec
from .base import RunInfo

STATE_FILE = "po_plugins_state_rank{}.pt"


class TrainerPlugin:
    """The Trainer side of the host contract (hosts.base.HostAdapter) and the Plugin's life in a Trainer."""

    po: Plugin | None = None

    @property
    def po_loss(self):
        return self.po.loss if self.po is not None else None

    @property
    def po_monitor(self):
        return self.po.monitor if self.po is not None else None

    def _po_step_metrics(self) -> dict:  # pragma: no cover - each host says where its train metrics live
        raise NotImplementedError

    def po_print(self, msg: str) -> None:
        if self.args.process_index == 0:
            print(msg, flush=True)

    def po_is_rank_0(self) -> bool:
        return self.args.process_index == 0

    def _po_start(self, loss, options: dict, spell_loss, nll_coef: float = 0.0, nll_flag: str = "",
                  spell_option=None) -> Plugin:
        """The Plugin of this run (its monitor writes `<output_dir>/po_band.jsonl` by default); the step end and the
        state ride on the Trainer's own callbacks."""
        run = RunInfo(self.args.gradient_accumulation_steps, self.args.world_size, self.args.output_dir, spell_loss,
                      nll_flag, spell_option)
        self.po = Plugin(loss, options, self, run, nll_coef=nll_coef)
        ds = getattr(self.accelerator.state, "deepspeed_plugin", None)
        if self.po.options["band_scope"] == "model" and ds is not None and int(ds.zero_stage) == 3:
            raise OptionError("band_scope 'model' takes the gradient of every parameter, which ZeRO-3 shards: run the "
                              "check at ZeRO stage 0-2, or drop the band_scope option")
        self.add_callback(PluginCallback(self))
        return self.po

    def po_head_spec(self):
        m = self.accelerator.unwrap_model(self.model)
        base = m.get_base_model() if hasattr(m, "get_base_model") else m
        return head_spec(base, base.get_output_embeddings())

    def po_band_params(self) -> dict:
        m = self.accelerator.unwrap_model(self.model)
        base = m.get_base_model() if hasattr(m, "get_base_model") else m
        return band_params(base, base.get_output_embeddings())

    def train(self, resume_from_checkpoint=None, *a, **kw):
        path = resume_from_checkpoint
        if isinstance(path, bool) and path:
            from transformers.trainer_utils import get_last_checkpoint

            path = get_last_checkpoint(self.args.output_dir)
        if path and self.po is not None:
            mine = os.path.join(path, STATE_FILE.format(self.args.process_index))
            first = os.path.join(path, STATE_FILE.format(0))
            found = mine if os.path.exists(mine) else first if os.path.exists(first) else None
            if found is None:
                self.po_print(f"[po_plugins] WARNING: {path} holds no po_plugins state; the objective's running "
                              "statistics (RC's α) start afresh")
            else:
                self.po.load_state_dict(torch.load(found, weights_only=False), f"the checkpoint {path}")
                self.po_print(f"[po_plugins] restored the plugin state from {found}")
        return super().train(resume_from_checkpoint, *a, **kw)


class PluginCallback(TrainerCallback):
    """Closes each optimizer step for the monitor (its po/* scalars join the host's own metrics, averaged per log,
    then into every report_to backend), writes the plugin state into every checkpoint folder and prints the run's
    summary when training ends."""

    def __init__(self, trainer: TrainerPlugin):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.trainer.po.before_optimizer_step()

    def on_step_end(self, args, state, control, **kwargs):
        t = self.trainer
        for k, v in t.po.end_step(state.global_step).items():
            t._po_step_metrics()[k].append(v)

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer.po.finish()

    def on_save(self, args, state, control, **kwargs):
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        out = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        os.makedirs(out, exist_ok=True)
        torch.save(self.trainer.po.state_dict(), os.path.join(out, STATE_FILE.format(args.process_index)))


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
