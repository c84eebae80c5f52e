"""The only module that knows OpenRLHF internals (supported: openrlhf >=0.10.2,<0.12, dotted flags).

It patches four seams, all plain module attributes looked up when `openrlhf.cli.train_dpo` runs:
  openrlhf.trainer.dpo_trainer.DPOTrainer     -> PoDPOTrainer (loss swap, extras, monitor, state)
  openrlhf.datasets.RewardDataset             -> PoRewardDataset (column checks, margin column carried per row)
  openrlhf.utils.config.hierarchize           -> attaches args.po and checks flag contradictions
  DeepspeedStrategy.load_ckpt                 -> keeps the loaded client_states for the plugin's state
`check_host()` verifies the version and that every seam exists before anything is patched.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import math
import os
from types import SimpleNamespace

import torch

from . import incentives
from ._dist import all_reduce
from .band import alert_message, band_stats
from .losses import PairBatch, build
from .scores import ScoreStats, response_positions, score_stats_flat

logger = logging.getLogger("po_plugins")

SUPPORTED = (">=0.10.2", "<0.12")
# (module, attribute, members that must exist, source fragments the plugin relies on)
SEAMS = [
    ("openrlhf.trainer.dpo_trainer", "DPOTrainer",
     ("fit", "concatenated_forward", "concatenated_inputs", "_get_batch_logps", "save_logs_and_checkpoints",
      "evaluate"),
     ("self.loss_fn(", "self.concatenated_forward(", "self.save_logs_and_checkpoints(", "prompt_id_lens = data")),
    ("openrlhf.trainer.dpo_trainer", "DPOLoss", (), ()),
    ("openrlhf.datasets", "RewardDataset", ("process_data", "__getitem__", "collate_fn"), ()),
    ("openrlhf.utils.config", "hierarchize", (), ()),
    ("openrlhf.utils.deepspeed.deepspeed", "DeepspeedStrategy", ("load_ckpt", "save_ckpt", "all_reduce"), ()),
]
STATE_KEY = "po_plugins"


class HostError(RuntimeError):
    """The installed OpenRLHF cannot host the plugin."""


def host_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("openrlhf")
    except PackageNotFoundError:
        return None


def check_host(version: str | None = None) -> str:
    """Fail with one clear message unless a supported OpenRLHF with every seam is installed."""
    from packaging.version import Version

    version = host_version() if version is None else version
    fix = "install a supported release: pip install 'po-plugins[openrlhf]' (openrlhf>=0.10.2,<0.12)"
    if version is None:
        raise HostError(f"OpenRLHF is not installed; {fix}")
    v = Version(version)
    if not (Version("0.10.2") <= v < Version("0.12")):
        raise HostError(f"OpenRLHF {version} is not supported by po_plugins (needs >=0.10.2,<0.12: dotted flags "
                        f"and the DPOTrainer seams); {fix}")
    for mod_name, attr, members, fragments in SEAMS:
        mod = importlib.import_module(mod_name)
        obj = getattr(mod, attr, None)
        if obj is None:
            raise HostError(f"OpenRLHF {version}: seam {mod_name}.{attr} is missing; {fix}")
        for m in members:
            if not hasattr(obj, m):
                raise HostError(f"OpenRLHF {version}: seam {mod_name}.{attr}.{m} is missing; {fix}")
        if fragments:
            src = inspect.getsource(obj)
            for f in fragments:
                if f not in src:
                    raise HostError(f"OpenRLHF {version}: {mod_name}.{attr} no longer contains `{f}`; {fix}")
    return version


def prepare_process() -> str:
    """What every po_plugins CLI does before running an OpenRLHF module: launcher-less env defaults, the CPU
    shims when there is no GPU, then the host check (one clear SystemExit when it fails)."""
    from . import _cpu

    _cpu.ensure_single_process_env()
    _cpu.apply_cpu_shims()
    try:
        return check_host()
    except HostError as e:
        raise SystemExit(f"po_plugins: {e}") from None


# ---- args.po ------------------------------------------------------------------------------------------------
def resolve_loss(po: SimpleNamespace, model_args) -> tuple[str, dict]:
    """Combine --loss/--po.* with the host's --model.{beta,label_smoothing,ipo_enable}; errors on contradictions."""
    from .losses import accepted_hparams

    name = po.loss
    ls = float(getattr(model_args, "label_smoothing", 0.0) or 0.0)
    ipo = bool(getattr(model_args, "ipo_enable", False))
    if name is None:
        name = "ipo" if ipo else ("cdpo" if ls > 0 else "dpo")
    base = name[3:] if name.startswith("rc_") else name
    if ipo and base != "ipo":
        raise SystemExit(f"po_plugins: --model.ipo_enable contradicts --loss {name}; drop one of them "
                         f"(--loss ipo is the same as --model.ipo_enable)")
    if ls > 0:
        if base == "dpo":
            name, base = name.replace("dpo", "cdpo", 1), "cdpo"
        elif base not in ("cdpo", "robust_dpo"):
            raise SystemExit(f"po_plugins: --model.label_smoothing contradicts --loss {name}; label smoothing is "
                             f"cDPO (--loss cdpo) or robust DPO (--loss robust_dpo)")
    hp = dict(po.hparams)
    accepted = accepted_hparams(name)
    if "beta" in hp:
        raise SystemExit("po_plugins: the temperature is --model.beta (not --po.beta)")
    if "beta" in accepted and po.beta_given:
        hp["beta"] = float(model_args.beta)
    if ls > 0 and "label_smoothing" in accepted:
        if "label_smoothing" in hp and float(hp["label_smoothing"]) != ls:
            raise SystemExit("po_plugins: --po.label_smoothing contradicts --model.label_smoothing; give one")
        hp["label_smoothing"] = ls
    return name, hp


def make_hierarchize(original, po: SimpleNamespace):
    def hierarchize(args):
        out = original(args)
        name, hp = resolve_loss(po, out.model)
        out.po = SimpleNamespace(**{**vars(po), "loss": name, "hparams": hp})
        build(name, **hp)  # validate hyperparameters before any model is built
        return out

    return hierarchize


# ---- dataset --------------------------------------------------------------------------------------------------
class RowInt(int):
    """The 5th collate item (prompt length) carrying its own row's reward margin and stored reference log-probs;
    behaves as the int upstream uses (slicing, zip, list concatenation)."""

    def __new__(cls, value, margin=None, ref=None):
        obj = super().__new__(cls, value)
        obj.margin, obj.ref = margin, ref
        return obj

    def __reduce__(self):
        return (RowInt, (int(self), self.margin, self.ref))


def _reward_dataset_class():
    from openrlhf.datasets.reward_dataset import RewardDataset

    class PoRewardDataset(RewardDataset):
        """RewardDataset that checks its columns first and carries `--po.margin_key` and `--po.ref_logp_keys`
        with their own row (OpenRLHF filters rows, so never by index)."""

        def __init__(self, dataset, tokenizer, max_length, strategy, input_template=None, is_dpo=False,
                     num_processors=None):
            data = strategy.args.data
            po = getattr(strategy.args, "po", None)
            self.margin_key = getattr(po, "margin_key", None) if is_dpo else None
            self.missing_margin = getattr(po, "missing_margin", "error")
            ref_keys = getattr(po, "ref_logp_keys", None) if is_dpo else None
            self.ref_keys = tuple(ref_keys.split(",")) if ref_keys else ()
            if self.ref_keys and len(self.ref_keys) != 2:
                raise SystemExit("po_plugins: --po.ref_logp_keys takes two columns: CHOSEN,REJECTED "
                                 "(e.g. ref_chosen_logp,ref_rejected_logp from score_margins --ref_model)")
            cols = list(getattr(dataset, "column_names", None) or [])
            if cols:
                for flag, key in (("--data.chosen_key", data.chosen_key), ("--data.rejected_key", data.rejected_key),
                                  ("--data.prompt_key", getattr(data, "prompt_key", None)),
                                  ("--po.margin_key", self.margin_key),
                                  *(("--po.ref_logp_keys", k) for k in self.ref_keys)):
                    if key and key not in cols:
                        raise SystemExit(f"po_plugins: the dataset has no column '{key}' (set by {flag}); its "
                                         f"columns are {cols}. Point {flag} at the right column.")
            if num_processors is None:
                num_processors = max(1, min(8, os.cpu_count() or 1))
            RewardDataset.__init__(self, dataset, tokenizer, max_length, strategy, input_template, is_dpo,
                                   num_processors)

        def process_data(self, data):
            out = RewardDataset.process_data(self, data)
            if self.margin_key:
                m = data.get(self.margin_key)
                if m is None or (isinstance(m, float) and not math.isfinite(m)):
                    if self.missing_margin != "unit":
                        raise ValueError(f"po_plugins: a row has no value in '{self.margin_key}' "
                                         f"(prompt starts {str(data.get(self.prompt_key, ''))[:40]!r}); "
                                         f"fill it or pass --po.missing_margin unit to give such rows weight 1")
                    m = None
            if self.margin_key or self.ref_keys:
                ref = [data.get(k) for k in self.ref_keys]
                dropped = out["prompt"] is None  # OpenRLHF filters this row out next
                if self.ref_keys and not dropped and any(v is None or not math.isfinite(float(v)) for v in ref):
                    raise ValueError(f"po_plugins: a row has no finite value in {list(self.ref_keys)} (prompt starts "
                                     f"{str(data.get(self.prompt_key, ''))[:40]!r}); re-run score_margins "
                                     "--ref_model or drop --po.ref_logp_keys")
                out["extra"] = {"len": out["extra"], "margin": m if self.margin_key else None,
                                "ref": [float(v) for v in ref] if ref and not dropped else None}
            return out

        def __getitem__(self, idx):
            item = RewardDataset.__getitem__(self, idx)
            extra = item[4]
            if isinstance(extra, dict):
                extra = RowInt(extra["len"], extra["margin"], extra["ref"])
            return (*item[:4], extra)

    return _module_level(PoRewardDataset)


def _module_level(cls):
    """Publish a class built against the installed host as a global of this module, so that pickling
    (datasets.map with worker processes) finds it by reference."""
    cls.__module__ = __name__
    cls.__qualname__ = cls.__name__
    globals()[cls.__name__] = cls
    return cls


# ---- the trainer ----------------------------------------------------------------------------------------------
def _lm_head(model):
    net = getattr(model, "model", model)  # Actor -> engine
    net = getattr(net, "module", net)  # engine -> HF (or PEFT) model
    return net.get_output_embeddings()


def _trainer_class():
    from openrlhf.trainer.dpo_trainer import DPOTrainer

    class PoDPOTrainer(DPOTrainer):
        """DPOTrainer with a po_plugins objective, per-sample extras, the band monitor and plugin state."""

        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            po = self.args.po
            self.po_loss = build(po.loss, **po.hparams)
            self.loss_fn = HostLoss(self)
            calibrating = po.loss.startswith("rc_")
            self.po_monitor = BandMonitor(self) if (po.monitor or calibrating) else None
            self._po_need_scores = calibrating or self.po_monitor is not None
            self._po_extra = {}
            self._po_head_cache = None
            self._po_last_scores = None
            self._po_micro = 0
            self._po_every = max(1, int(po.score_every))
            head = _lm_head(self.model)
            if self._po_need_scores and head is None:
                raise SystemExit("po_plugins: the band needs the model's LM head (get_output_embeddings())")
            # Scores are those of the LM-head weight, trainable or not: under LoRA the head is frozen and the
            # paper autograds the last block's adapters instead, but DeepSpeed's engine rejects extra
            # autograd.grad calls through its graph; the head statistics stay exact and ZeRO-3 safe.
            if self._po_need_scores:
                head.register_forward_hook(self._po_hook)
            states = getattr(self.strategy, "_po_client_states", None) or {}
            if STATE_KEY in states:
                self.po_loss.load_state_dict(states[STATE_KEY]["loss"])
                if self.po_monitor is not None:
                    self.po_monitor.load_state_dict(states[STATE_KEY].get("monitor", {}))
            interrupt = os.environ.get("PO_PLUGINS_INTERRUPT_AT_STEP")
            self._po_interrupt = int(interrupt) if interrupt else None
            self.strategy.print(f"[po_plugins] loss {self.po_loss!r}; monitor "
                                f"{'on' if self.po_monitor else 'off'}"
                                + ("; reference-free: reference forward skipped" if self.po_loss.reference_free
                                   else "; reference log-probs read from the dataset: reference forward skipped"
                                   if getattr(po, "ref_logp_keys", None) else ""))

        def _po_hook(self, module, inputs, output):
            if self._po_capture:
                self._po_head_cache = (inputs[0].detach(), output.detach())

        _po_capture = False

        def concatenated_forward(self, model, chosen_ids, c_mask, reject_ids, r_mask, prompt_id_lens):
            margins = [getattr(x, "margin", None) for x in prompt_id_lens]
            refs = [getattr(x, "ref", None) for x in prompt_id_lens]
            prompt_id_lens = [int(x) for x in prompt_id_lens]
            # --po.ref_logp_keys: stored reference log-probs (a reference-free loss ignores them, but the monitor's
            # log-ratios r_w, r_l are then measured against them instead of against zero)
            if model is self.ref_model and refs and all(r is not None for r in refs):
                ref = torch.tensor(refs, dtype=torch.float32, device=chosen_ids.device)
                return ref[:, 0], ref[:, 1], [], ref.new_zeros(())
            if model is self.ref_model and self.po_loss.reference_free:
                z = torch.zeros(chosen_ids.shape[0], device=chosen_ids.device)
                return z, z, [], z.sum()
            is_policy = model is self.model
            capture = is_policy and self._po_need_scores and torch.is_grad_enabled() and self.model.training
            if capture:  # --po.score_every k: fresh statistics on every k-th micro-batch, the last ones between
                self._po_micro += 1
                self._po_capture = self._po_last_scores is None or (self._po_micro - 1) % self._po_every == 0
            try:
                input_ids, att_masks, lens2 = self.concatenated_inputs(chosen_ids, c_mask, reject_ids, r_mask,
                                                                       prompt_id_lens)
                log_probs, output = model(input_ids, attention_mask=att_masks, return_output=True,
                                          return_logprobs=True, ring_attn_group=self.strategy.ring_attn_group)
            finally:
                self._po_capture = False
            loss_masks = att_masks.clone().bool()
            for mask, source_len in zip(loss_masks, lens2):
                mask[:source_len] = False
            loss_masks = loss_masks[:, 1:]
            sums = (log_probs * loss_masks).sum(-1)
            counts = loss_masks.sum(-1)
            means = sums / counts.clamp(min=1)
            B = chosen_ids.shape[0]
            if is_policy:
                extra = {"chosen_tokens": counts[:B], "rejected_tokens": counts[B:], "score_stats": None,
                         "margins": None, "inputs": (chosen_ids, c_mask, reject_ids, r_mask, prompt_id_lens)}
                if any(m is not None for m in margins) or getattr(self.args.po, "margin_key", None):
                    extra["margins"] = torch.tensor([0.0 if m is None else float(m) for m in margins],
                                                    device=sums.device)
                    extra["margin_known"] = torch.tensor([m is not None for m in margins], device=sums.device)
                if capture:
                    if self._po_head_cache is not None:
                        self._po_last_scores = self._po_scores(input_ids, att_masks, loss_masks, sums, B)
                    extra["score_stats"] = self._po_last_scores
                self._po_extra = extra
            aux_loss = output.aux_loss if "aux_loss" in output else []
            return sums[:B], sums[B:], aux_loss, -means[:B].mean()

        def _po_scores(self, input_ids, att_masks, loss_masks, sums, B) -> ScoreStats:
            hidden, logits = self._po_head_cache
            self._po_head_cache = None
            h, lg, y, rows = response_positions(hidden, logits, input_ids, att_masks, loss_masks)
            is_chosen = torch.arange(input_ids.shape[0], device=input_ids.device) < B
            return score_stats_flat(h, lg, y, rows, is_chosen, chunk_size=int(self.args.po.score_chunk))

        def save_logs_and_checkpoints(self, args, global_step, step_bar, logs_dict=None, client_states=None):
            logs_dict = dict(logs_dict or {})
            client_states = dict(client_states or {})
            if self.po_monitor is not None:
                logs_dict.update(self.po_monitor.end_step(global_step))
            client_states[STATE_KEY] = {"loss": self.po_loss.state_dict(),
                                        "monitor": self.po_monitor.state_dict() if self.po_monitor else {}}
            super().save_logs_and_checkpoints(args, global_step, step_bar, logs_dict, client_states)
            if self._po_interrupt is not None and global_step >= self._po_interrupt:
                self.strategy.print(f"[po_plugins] PO_PLUGINS_INTERRUPT_AT_STEP={self._po_interrupt}: stopping")
                raise SystemExit(3)

    return _module_level(PoDPOTrainer)


class HostLoss:
    """The 4-in/3-out contract of OpenRLHF's DPOLoss, backed by a po_plugins objective."""

    def __init__(self, trainer):
        self.trainer = trainer

    def __call__(self, chosen, rejected, ref_chosen, ref_rejected):
        t = self.trainer
        loss = t.po_loss
        ex = t._po_extra
        b = PairBatch(chosen, rejected, ref_chosen, ref_rejected, ex.get("chosen_tokens"), ex.get("rejected_tokens"),
                      margins=ex.get("margins"), score_stats=ex.get("score_stats"))
        # rows without a margin (--po.missing_margin unit) carry ĥ = 0, whose MADPO weight is exactly 1
        per_sample = loss(b)
        beta = float(loss.hparams.get("beta", 1.0))
        if loss.reference_free:
            n_w = b.chosen_tokens.clamp(min=1) if b.chosen_tokens is not None else 1
            n_l = b.rejected_tokens.clamp(min=1) if b.rejected_tokens is not None else 1
            cr, rr = beta * chosen.detach() / n_w, beta * rejected.detach() / n_l
        else:
            cr, rr = beta * (chosen - ref_chosen).detach(), beta * (rejected - ref_rejected).detach()
        training = torch.is_grad_enabled() and chosen.requires_grad and t.model.training
        if training and t.po_monitor is not None:
            t.po_monitor.add_micro(b, loss, per_sample)
        return per_sample.mean(), cr, rr


class BandMonitor:
    """Per optimizer step: the band from the incentives and head scores, aggregated over the accumulation
    window and all-reduced over ranks; written to train/po/* logs and rank 0's JSONL."""

    def __init__(self, trainer):
        self.trainer = trainer
        args = trainer.args
        self.path = getattr(args.po, "jsonl", None) or os.path.join(args.ckpt.output_dir, "po_band.jsonl")
        self.alert_steps = int(args.po.alert_steps)
        self.recheck_every = int(args.po.recheck_every)
        self.prev = None
        self.out_streak = 0
        self.acc = None
        self.last_inputs = None
        self.last_z = None
        self.last_alpha = 1.0
        self._truncated = False

    def add_micro(self, b: PairBatch, loss, per_sample):
        alpha = float(getattr(loss, "alpha", 1.0))
        base_d = getattr(loss, "last_incentives", None)
        if base_d is not None:  # RC already differentiated its base objective on this micro-batch
            d_w, d_l = alpha * base_d[0], base_d[1] / alpha
        else:
            d_w, d_l = incentives(loss, b)
        st = b.score_stats
        zw, zl = b.policy_chosen.detach().double(), b.policy_rejected.detach().double()
        refw = b.ref_chosen.double() if b.ref_chosen is not None else torch.zeros_like(zw)
        refl = b.ref_rejected.double() if b.ref_rejected is not None else torch.zeros_like(zl)
        n = torch.tensor(float(zw.numel()), dtype=torch.float64, device=zw.device)
        w = self._weights(b, loss)
        if w is None:
            w = torch.zeros(1, dtype=torch.float64, device=zw.device)
            capped = w.sum()
        else:
            capped = (b.margins <= -loss.hparams["tau"]).double().sum()
        # kept on the device: no host sync per micro-batch; reduced once per optimizer step
        sums = torch.stack([n, zw.sum(), zl.sum(), (zw - refw).sum(), (zl - refl).sum(), d_w.double().sum(),
                            d_l.double().sum(), n * st.sw_norm.double(), n * st.sl_norm.double(),
                            n * st.sw_dot_sl.double(), n * alpha, per_sample.detach().double().sum(), w.sum(),
                            capped])
        maxes = torch.stack([w.max(), -w.min()])
        self.acc = (sums, maxes) if self.acc is None else (self.acc[0] + sums, torch.maximum(self.acc[1], maxes))
        self.last_alpha = alpha
        self.last_inputs = self.trainer._po_extra.get("inputs")
        self.last_z = (zw, zl)

    SUM_KEYS = ("n", "z_w", "z_l", "r_w", "r_l", "d_w", "d_l", "sw_norm", "sl_norm", "sw_dot_sl", "alpha", "loss",
                "w_sum", "w_capped")

    @staticmethod
    def _weights(b: PairBatch, loss):
        if b.margins is None or "margins" not in loss.needs:
            return None
        from .madpo import margin_weights

        hp = loss.hparams
        return margin_weights(b.margins, hp["c_max"], hp["c_min"], hp["lam"], hp["tau"]).double()

    def _reduce(self, acc) -> dict:
        sums, maxes = all_reduce(acc[0], "sum").cpu(), all_reduce(acc[1], "max").cpu()
        out = {k: float(v) for k, v in zip(self.SUM_KEYS, sums)}
        out.update(w_max=float(maxes[0]), w_min=-float(maxes[1]))
        return out

    def _alpha_spread(self) -> float:
        """max − min over ranks of the last micro-batch's α (0 when every rank calibrates identically)."""
        v = all_reduce(torch.tensor([self.last_alpha, -self.last_alpha], dtype=torch.float64), "max")
        return float(v[0] + v[1])

    RECHECK_KEYS = ("chosen_up_frac", "rejected_down_frac", "step_delta_z_w", "step_delta_z_l")

    def _recheck(self, global_step: int) -> dict:
        """Exact per-pair change of z over this optimizer step: re-score the last micro-batch (no grad), every
        `--po.recheck_every` steps (one forward of a micro-batch each time); null on the other steps."""
        t = self.trainer
        due = self.recheck_every > 0 and global_step % self.recheck_every == 0
        if not due or self.last_inputs is None:
            return dict.fromkeys(self.RECHECK_KEYS)
        with torch.no_grad():
            saved = t._po_extra
            zw2, zl2, _, _ = t.concatenated_forward(t.model, *self.last_inputs)
            t._po_extra = saved
        dw, dl = zw2.double() - self.last_z[0], zl2.double() - self.last_z[1]
        vec = torch.stack([(dw > 0).double().sum(), (dl < 0).double().sum(),
                           torch.tensor(float(dw.numel()), dtype=torch.float64, device=dw.device), dw.sum(), dl.sum()])
        up, down, n, sdw, sdl = (float(x) for x in all_reduce(vec, "sum").cpu())
        return {"chosen_up_frac": up / n, "rejected_down_frac": down / n, "step_delta_z_w": sdw / n,
                "step_delta_z_l": sdl / n}

    def end_step(self, global_step: int) -> dict:
        if self.acc is None:
            return {}
        s = self._reduce(self.acc)
        self.acc = None
        n = s["n"]
        rec = {"step": global_step, "loss_name": self.trainer.po_loss.name}
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
        if "margins" in self.trainer.po_loss.needs:
            rec.update(w_mean=s["w_sum"] / n, w_min=s["w_min"], w_max=s["w_max"], w_capped_frac=s["w_capped"] / n)
        self.prev = {"z_w": rec["z_w"], "z_l": rec["z_l"]}
        self.out_streak = 0 if rec["in_band"] else self.out_streak + 1
        msg = alert_message(self.out_streak, self.alert_steps, rec)
        if msg:
            self.trainer.strategy.print(msg)
        if self.trainer.strategy.is_rank_0():
            self._write(rec)
        logs = {}
        for k in ("z_w", "z_l", "delta_z_w", "delta_z_l", "log_r", "log_r_star", "rho", "band_lower", "band_upper",
                  "slack", "in_band", "alpha", "chosen_up_frac", "w_mean", "w_min", "w_max", "w_capped_frac"):
            if rec.get(k) is not None and math.isfinite(rec[k]):
                logs[f"po/{k}"] = rec[k]
        return logs

    def _write(self, rec):
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
                    loss = self.trainer.po_loss
                    f.write(json.dumps({"meta": {"loss": loss.name, "hparams": _jsonable(loss.hparams)}}) + "\n")
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()

    def state_dict(self):
        return {"prev": self.prev, "out_streak": self.out_streak}

    def load_state_dict(self, state):
        self.prev = state.get("prev")
        self.out_streak = int(state.get("out_streak", 0))


def _jsonable(d):
    return {k: (v if isinstance(v, (int, float, str, bool, type(None))) else repr(v)) for k, v in d.items()}


# ---- patching -------------------------------------------------------------------------------------------------
def install(po: SimpleNamespace) -> None:
    """Patch the seams (call after check_host, before running openrlhf.cli.train_dpo)."""
    import openrlhf.datasets as ods
    import openrlhf.trainer.dpo_trainer as dt
    import openrlhf.utils.config as cfg
    from openrlhf.utils.deepspeed.deepspeed import DeepspeedStrategy

    dt.DPOTrainer = _trainer_class()
    ods.RewardDataset = _reward_dataset_class()
    if not getattr(cfg.hierarchize, "_po_plugins", False):
        wrapped = make_hierarchize(cfg.hierarchize, po)
        wrapped._po_plugins = True
        cfg.hierarchize = wrapped
    if not getattr(DeepspeedStrategy.load_ckpt, "_po_plugins", False):
        original = DeepspeedStrategy.load_ckpt

        def load_ckpt(self, *a, **kw):
            path, states = original(self, *a, **kw)
            self._po_client_states = states or {}
            return path, states

        load_ckpt._po_plugins = True
        DeepspeedStrategy.load_ckpt = load_ckpt


# ---- vLLM engines (po_plugins.generation, several engines/GPUs) ------------------------------------------------
def vllm_engines(model: str, num_engines: int, tensor_parallel_size: int = 1, seed: int = 0,
                 max_model_len: int = 2048, gpu_memory_utilization: float = 0.9, enforce_eager: bool = False):
    """OpenRLHF's own ``create_vllm_engines``: ``num_engines`` Ray actors (``RolloutRayActor``, a vLLM
    ``AsyncLLMEngine`` each, bf16, ``tensor_parallel_size`` GPUs each, packed in one placement group), starting a
    local Ray instance when none is running. Each actor's ``generate.remote(prompt_token_ids, sampling_params)``
    returns a vLLM ``RequestOutput``. Needs vllm and ray; imported here only."""
    import ray
    from openrlhf.trainer.ray.vllm_engine import create_vllm_engines

    if not ray.is_initialized():
        ray.init(include_dashboard=False)
    return create_vllm_engines(num_engines, tensor_parallel_size, model, seed, full_determinism=False,
                               enable_prefix_caching=True, enforce_eager=enforce_eager, max_model_len=max_model_len,
                               gpu_memory_utilization=gpu_memory_utilization)
