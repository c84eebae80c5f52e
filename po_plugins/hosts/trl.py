"""The only module that knows TRL internals (supported: trl >=1.16,<1.17, the DPOTrainer with the fused LM head).

Seams, all public methods or documented customisation points of TRL's DPOTrainer ("subclass the trainer and
override compute_loss"; "replace the collator after super().__init__"), checked by `check_host()`:
  DPOTrainer.compute_loss            the plugin's objective on TRL's own fused-head log-probs: the policy forward as
                                     TRL runs it, the reference from TRL's precomputed columns, its reference model or
                                     its adapter-off PEFT model (skipped for reference-free objectives)
  DPOTrainer.compute_ref_log_probs   drops the plugin's batch keys before TRL's own reference forward
  DPOTrainer._set_signature_columns_if_needed   keeps the margin / weight columns through remove_unused_columns
  trainer.data_collator              wrapped: each row's margin / weight travels with its own row
  Trainer._save_checkpoint, train()  the plugin state in every checkpoint, restored by resume_from_checkpoint
  model.base_model (the backbone)    a forward hook, armed for the policy forward only, captures the LM head's input;
                                     the head statistics come from it and the head weight, chunked over the vocabulary
                                     (TRL's fused head never calls the lm_head module and never builds logits)
With `po_loss=None` and no monitor, margin or weight column, PoDPOTrainer is TRL's DPOTrainer unchanged.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field

import torch

from ..errors import DataError
from ..head import head_transform
from ..losses import PairBatch, accepted_hparams, build, names
from ..options import OPTIONS, OptionError, check_loss, check_options, options_for
from ..plugin import require_margins, row_number
from ..prefix import detach_shared
from ..scores import Tokens
from . import HostError, effective_head_weight, gathered, lora_params  # noqa: F401  (HostError: re-exported)
from .base import HostSpec, Seam, installed_version
from .base import check_host as check_spec
from .hf_trainer import RowExtras, TrainerPlugin, columns

logger = logging.getLogger("po_plugins")

# every place of TRL the plugin subclasses or calls (checked at import by check_host)
SPEC = HostSpec("TRL", "trl", "trl", "1.16", "1.17", "the DPOTrainer with the fused LM head", (
    Seam("trl.trainer.dpo_trainer", "DPOTrainer",
     ("compute_loss", "compute_ref_log_probs", "_set_signature_columns_if_needed", "log",
      "_compute_loss"),
     ("fused_lm_head=True", "self._metrics", "ref_chosen_logps", "self.precompute_ref_logps", "use_adapter(",
      "completion_mask")),
    Seam("trl.trainer.dpo_trainer", "DataCollatorForPreference", ("torch_call",), ("completion_mask",)),
    Seam("trl.trainer.utils", "add_fused_lm_head", (), ("last_hidden_state", "final_logit_softcapping", "logit_scale",
                                                     "get_output_embeddings")),
    Seam("trl.trainer.utils", "maybe_gather_lm_head_ctx", (), ()),
    Seam("trl.trainer.utils", "use_adapter", (), ()),
    Seam("trl.models.utils", "disable_gradient_checkpointing", (), ()),
    Seam("trl", "DPOConfig", (), ()),
))
SUPPORTED = (SPEC.lo, SPEC.hi)  # >=, <
# the plugin's options as PoDPOConfig fields po_<name>; stored reference log-probs are TRL's own
# precompute_ref_log_probs (its ref_chosen_logps / ref_rejected_logps columns)
TRL_OPTIONS = options_for("trl")
PLUGIN_KEYS = ("po_margin", "po_weight")
NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps", *PLUGIN_KEYS}

# TRL's single loss types and the po_plugins objectives with the same definition (docs/trl.md)
TRL_BETA = 0.1  # DPOConfig's default β
TRL_NAMES = {"sigmoid": "dpo", "hinge": "hinge", "ipo": "ipo", "exo_pair": "exo", "nca_pair": "nca",
             "robust": "robust_dpo", "bco_pair": "bce", "sppo_hard": "sppo_hard", "apo_zero": "apo_zero",
             "apo_down": "apo_down", "discopop": "discopop"}


def host_version() -> str | None:
    return installed_version("trl")


def check_host(version: str | None = None) -> str:
    """Fail with one clear message unless a supported TRL with every seam is installed."""
    version = host_version() if version is None else version
    return check_spec(SPEC, version)


check_host()

from trl import DPOConfig, DPOTrainer  # noqa: E402  (after the version check)
from trl.models.utils import disable_gradient_checkpointing  # noqa: E402
from trl.trainer.utils import maybe_gather_lm_head_ctx, use_adapter  # noqa: E402


def _po_field(key):
    return field(default=OPTIONS[key][1], metadata={"help": "po_plugins: " + OPTIONS[key][2]})


@dataclass
class PoDPOConfig(DPOConfig):
    """TRL's DPOConfig plus the plugin's options (docs/trl.md).

    po_loss: any name of `po_plugins.losses.names()` (rc_* included); None keeps TRL's own `loss_type` (mapped to the
    same po_plugins objective when the monitor, a margin or a weight column needs the plugin's loss path).
    po_hparams: the loss's hyperparameters by their papers' names (a dict or a JSON string); its β is `beta`,
    label smoothing (cdpo, robust_dpo, exo) `label_smoothing`, DiscoPOP's τ `discopop_tau`.
    """

    po_loss: str | None = field(default=None, metadata={"help": "po_plugins objective (any of "
                                                                 "po_plugins.losses.names(), rc_* included)"})
    po_hparams: dict | str | None = field(default=None, metadata={
        "help": "po_plugins: the objective's hyperparameters by paper name, as a dict or JSON ({\"gamma\": 1.0})"})
    po_monitor: bool = _po_field("monitor")
    po_alert_steps: int = _po_field("alert_steps")
    po_recheck_every: int = _po_field("recheck_every")
    po_score_every: int = _po_field("score_every")
    po_score_chunk: int = _po_field("score_chunk")
    po_jsonl: str | None = _po_field("jsonl")
    po_margin_key: str | None = _po_field("margin_key")
    po_missing_margin: str = _po_field("missing_margin")
    po_weight_key: str | None = _po_field("weight_key")
    po_probe_alarm_nats: float = _po_field("probe_alarm_nats")
    po_probe_alarm_checks: int = _po_field("probe_alarm_checks")
    po_probe_file: str | None = _po_field("probe_file")
    po_band_scope: str = _po_field("band_scope")
    po_shared_prefix: str = _po_field("shared_prefix")
    # TRL's β; unset, a po_loss trains with its paper's default (as on every host), TRL's own loss_type with 0.1
    beta: float | None = field(default=None, metadata={
        "help": "β of the loss (default 0.1 for TRL's loss_type; with po_loss, the objective's own default)"})

    def __post_init__(self):
        self._po_beta_given = self.beta is not None
        if self.beta is None:
            self.beta = TRL_BETA
        super().__post_init__()
        if isinstance(self.po_hparams, str):
            try:
                self.po_hparams = json.loads(self.po_hparams) if self.po_hparams.strip() else {}
            except json.JSONDecodeError:
                raise OptionError(f"po_hparams must be a dict or a JSON object, got {self.po_hparams!r}") from None
        self.po_hparams = dict(self.po_hparams or {})
        check_options(self.po_options(), spell=lambda k: f"po_{k}")
        resolve_loss(self)  # every contradiction and bad value, before any model is built

    def po_options(self) -> dict:
        return {k: getattr(self, "po_" + k) for k in TRL_OPTIONS}


def resolve_loss(args) -> tuple[str | None, dict]:
    """The po_plugins objective and hyperparameters a PoDPOConfig asks for (None: TRL's own loss, unchanged)."""
    loss_types = [args.loss_type] if isinstance(args.loss_type, str) else list(args.loss_type)
    default_type = loss_types == ["sigmoid"]
    name = args.po_loss
    mapped = TRL_NAMES.get(loss_types[0]) if len(loss_types) == 1 else None
    needs_plugin = args.po_monitor or args.po_margin_key or args.po_weight_key
    if name is None:
        if not needs_plugin:
            return None, {}
        if mapped is None:
            raise OptionError(f"loss_type={loss_types} has no po_plugins equivalent, and the band monitor, margins and "
                              f"weights need the plugin's loss path: set po_loss (one of po_plugins.losses.names()) "
                              f"or a single loss_type among {sorted(TRL_NAMES)}")
        name = mapped
    check_loss(name, {}, loss_flag="po_loss") if name not in names() else None
    base = name[3:] if name.startswith("rc_") else name
    if not default_type and mapped != base:
        raise OptionError(f"loss_type={loss_types} contradicts po_loss='{name}': leave loss_type at its default when "
                          f"po_loss is set" + (f", or use po_loss='{mapped}'" if mapped else ""))
    if args.loss_weights is not None and list(args.loss_weights) != [1.0]:
        raise OptionError(f"loss_weights={args.loss_weights} mixes TRL losses; po_loss trains one objective: drop "
                          "loss_weights")
    for flag, bad, fix in (("ld_alpha", args.ld_alpha is not None, "drop ld_alpha"),
                           ("use_weighting", bool(args.use_weighting), "drop use_weighting (per-row weights: "
                                                                       "po_weight_key)"),
                           ("f_divergence_type", args.f_divergence_type != "reverse_kl",
                            "keep f_divergence_type='reverse_kl'")):
        if bad:
            raise OptionError(f"{flag} is not supported with a po_plugins objective (po_loss='{name}'): {fix}")
    hp = dict(args.po_hparams or {})
    if "beta" in hp:
        raise OptionError("the objective's β is DPOConfig.beta (beta=...), not po_hparams['beta']")
    ls = float(args.label_smoothing or 0.0)
    if ls > 0:
        if base in ("cdpo", "robust_dpo"):
            hp.setdefault("label_smoothing", ls)
        elif base == "exo":
            hp.setdefault("eps", ls)
        else:
            raise OptionError(f"label_smoothing={ls} contradicts po_loss='{name}' (TRL's own sigmoid ignores it too); "
                              "label smoothing is cDPO (po_loss='cdpo'), robust DPO ('robust_dpo') or EXO's ε ('exo')")
    accepted = accepted_hparams(name)
    if "beta" in accepted and (args.po_loss is None or getattr(args, "_po_beta_given", True)):
        hp["beta"] = float(args.beta)  # TRL's own loss_type keeps TRL's β; a po_loss its own default unless set
    if base == "ipo" and args.po_loss is None:
        hp.setdefault("length_normalize", True)  # TRL's IPO averages log-ratios over completion tokens
    if base == "discopop":
        hp.setdefault("tau", float(args.discopop_tau))
    check_loss(name, hp, loss_flag="po_loss", hparam_spell=lambda k: f"po_hparams['{k}']")
    return name, hp


def _is_peft(model) -> bool:
    from accelerate.utils import is_peft_model

    return is_peft_model(model)


class PoDPOTrainer(TrainerPlugin, DPOTrainer):
    """TRL's DPOTrainer with a po_plugins objective, the band monitor, per-row margins / weights and plugin state.

    Takes exactly DPOTrainer's arguments; `args` must be a PoDPOConfig.
    """

    def __init__(self, model, ref_model=None, args: PoDPOConfig | None = None, data_collator=None,
                 train_dataset=None, eval_dataset=None, *a, **kw):
        if args is None:
            args = PoDPOConfig()
        if not isinstance(args, PoDPOConfig):
            raise TypeError("PoDPOTrainer takes a po_plugins.trl.PoDPOConfig (a DPOConfig with the plugin's options): "
                            f"got {type(args).__name__}")
        name, hp = resolve_loss(args)
        loss = build(name, **hp) if name else None
        self._po_margin_key, self._po_weight_key = args.po_margin_key, args.po_weight_key
        if loss is not None:
            require_margins(loss, bool(args.po_margin_key), "set po_margin_key (--po.margin_key) to the dataset "
                                                              "column that holds them")
        self._po_check_rows(train_dataset, "training", required=True, missing=args.po_missing_margin)
        evals = eval_dataset.items() if isinstance(eval_dataset, dict) else [("eval", eval_dataset)]
        for ename, eds in evals:
            if eds is not None:
                self._po_check_rows(eds, f"evaluation ('{ename}')", required=False, missing=args.po_missing_margin)
        super().__init__(model, ref_model, args, data_collator, train_dataset, eval_dataset, *a, **kw)
        if loss is None:
            return
        carried = {key: (col, default) for key, col, default in (("po_margin", self._po_margin_key, 0.0),
                                                                  ("po_weight", self._po_weight_key, 1.0)) if col}
        if carried:
            self.data_collator = RowExtras(self.data_collator, carried)
        po = self._po_start(loss, args.po_options(), lambda n: f"po_loss='{n}' (--loss {n} with "
                                                                 "po_plugins.cli.trl_dpo)",
                            spell_option=lambda k, v: f"po_{k}='{v}' (--po.{k} {v} with po_plugins.cli.trl_dpo)")
        self._po_capture = False
        self._po_hidden = None
        self._po_said = set()
        if po.need_scores:
            self._po_backbone().register_forward_hook(self._po_hook)
        self.po_print(po.banner("reference-free: reference forward skipped" if loss.reference_free else ""))

    # ---- columns ----------------------------------------------------------------------------------------------
    def _po_check_rows(self, ds, role: str, required: bool, missing: str) -> None:
        """Every column error names the dataset; a margin column must have a finite value in every row unless
        po_missing_margin='unit'. An evaluation set without the column is evaluated unweighted."""
        cols = columns(ds)
        if cols is None:
            return
        for key, flag in ((self._po_margin_key, "po_margin_key"), (self._po_weight_key, "po_weight_key")):
            if not key:
                continue
            if key not in cols:
                if required:
                    raise OptionError(f"the {role} dataset has no column '{key}' (set by {flag}, --po.{flag[3:]} on "
                                      f"the command line); its columns are {cols}. Point it at the right column "
                                      "(score_margins writes rm_margin).")
                logger.warning("[po_plugins] the %s dataset has no column '%s' (%s): it is evaluated unweighted",
                               role, key, flag)
                continue
            values = ds[key]
            for i, v in enumerate(values):
                v = row_number(v, i, key, f"the {role} dataset", flag)
                if v is None or not math.isfinite(v):
                    if flag == "po_margin_key" and missing == "unit":
                        continue
                    fix = ("fill it or set po_missing_margin='unit' to give such rows weight 1"
                           if flag == "po_margin_key" else "fill it")
                    raise OptionError(f"row {i} of the {role} dataset has no finite value in '{key}' ({flag}); {fix}")

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        for key in (self._po_margin_key, self._po_weight_key):
            if key and key not in self._signature_columns:
                self._signature_columns = [*self._signature_columns, key]

    def compute_ref_log_probs(self, model, inputs):
        return super().compute_ref_log_probs(model, {k: v for k, v in inputs.items() if k not in PLUGIN_KEYS})

    # ---- the head's input --------------------------------------------------------------------------------------
    def _po_unwrapped(self):
        """The model under accelerate's and PEFT's wrappers (kept per model object: unwrapping and the PEFT check cost
        ~8 ms a call, twice per micro-batch)."""
        cached = self.__dict__.get("_po_unwrap_cache")
        if cached is None or cached[0] is not self.model:
            m = self.accelerator.unwrap_model(self.model)
            cached = self.__dict__["_po_unwrap_cache"] = (self.model, m.get_base_model() if _is_peft(m) else m)
        return cached[1]

    def _po_backbone(self):
        base = self._po_unwrapped()
        backbone = getattr(base, "base_model", None)
        if backbone is None or backbone is base:
            raise OptionError(f"{type(base).__name__} exposes no backbone (base_model); the band needs the LM head's "
                              "input")
        return backbone

    def _po_hook(self, module, inputs, output):
        if self._po_capture:
            h = getattr(output, "last_hidden_state", None)
            self._po_hidden = (h if h is not None else output[0]).detach()

    def _po_step_metrics(self) -> dict:
        return self._metrics["train"]

    # ---- the step ------------------------------------------------------------------------------------------------
    def _po_logps(self, model, inputs, capture: bool = False):
        """Summed completion log-probs [2B] and token counts [2B], by TRL's own fused-head forward."""
        model_kwargs = {k: v for k, v in inputs.items() if k not in NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        if self.aux_loss_enabled:
            model_kwargs["output_router_logits"] = True
        completion_mask = inputs["completion_mask"]
        shift = completion_mask[..., 1:]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        self._po_capture = capture
        try:
            outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
        finally:
            self._po_capture = False
        seq_len = shift.size(1)
        per_token = outputs.log_probs[:, -seq_len:]
        # --po.shared_prefix detach: the completion tokens both rows of a pair share at their start, label indexing
        self._po_shared = shared = self._po_shared_of(inputs, completion_mask,
                                                      torch.is_grad_enabled() and self.model.training)
        sums = per_token.sum(dim=1) if shared is None else (
            detach_shared(per_token, shared).sum(dim=1) + self.po.guard_sums((per_token * shared).sum(dim=1)))
        return sums, shift.sum(dim=1), outputs, model_kwargs, labels

    _po_shared = None

    def _po_shared_of(self, inputs, completion_mask, training: bool):
        ids = inputs["input_ids"]
        if not (self.po.detach_shared and training):
            return None
        if ids.shape[0] % 2:
            raise OptionError("po_shared_prefix='detach' needs chosen and rejected rows in one padded batch "
                              "(padding_free is not supported with it): drop one of them")
        att = inputs.get("attention_mask")
        shared = self.po.shared(ids, torch.ones_like(ids) if att is None else att, completion_mask,
                                ids.shape[0] // 2, True)
        return shared[:, 1:]

    def _po_ref_logps(self, model_kwargs, labels, seq_len):
        kw = {k: v for k, v in model_kwargs.items() if k != "output_router_logits"}
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            if _is_peft(self.model) and self.ref_model is None:
                unwrapped = self.accelerator.unwrap_model(self.model)
                with use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None):
                    out = self.model(**kw, labels=labels, fused_lm_head=True)
            else:
                out = self.ref_model(**kw, labels=labels, fused_lm_head=True)
        return out.log_probs[:, -seq_len:].sum(dim=1)

    def _po_scores(self, labels, n_pairs) -> Tokens:
        """This micro-batch's response tokens (head inputs from the backbone hook) and, where needed, its own head
        statistics (TRL's fused head builds no logits: from the head weight)."""
        hidden = self._po_hidden
        self._po_hidden = None
        lab = labels[:, 1:]
        hid = hidden[:, :-1][:, -lab.shape[1]:]
        keep = lab != -100
        if self._po_shared is not None and self.po.stats_without_shared:  # detach: not in the scores
            keep = keep & ~self._po_shared
        pos = keep.nonzero(as_tuple=False)
        base = self._po_unwrapped()
        head = base.get_output_embeddings()
        scale, cap = head_transform(base.config)
        h, y, rows = hid[pos[:, 0], pos[:, 1]], lab[pos[:, 0], pos[:, 1]], pos[:, 0]
        bias = getattr(head, "bias", None)
        if not self.po.micro_stats:
            return self.po.tokens_from_head(h, y, rows, lab.shape[0], n_pairs, head.weight, bias, scale, cap)
        with maybe_gather_lm_head_ctx(head.weight, bias), gathered(*lora_params(head)):
            return self.po.tokens_from_head(h, y, rows, lab.shape[0], n_pairs, effective_head_weight(head), bias,
                                            scale, cap)

    def po_rescore(self, inputs, tokens: bool = False):
        if not tokens:
            return self._po_logps(self.model, inputs)[0].chunk(2, dim=0)
        with self.po.probe_pass():
            zs, _, _, _, labels = self._po_logps(self.model, inputs, capture=True)
            got = self._po_scores(labels, zs.shape[0] // 2) if self._po_hidden is not None else None
        zw, zl = zs.chunk(2, dim=0)
        return zw, zl, got

    def po_scope_forward(self, inputs):
        """po_band_scope='model': the micro-batch forwarded again with gradients (TRL's fused-head forward), as (z_w,
        z_l, its response tokens, the trainable parameters); ZeRO-3 is refused at start."""
        with torch.enable_grad(), self.po.probe_pass():
            zs, _, _, _, labels = self._po_logps(self.model, inputs, capture=True)
            got = self._po_scores(labels, zs.shape[0] // 2) if self._po_hidden is not None else None
        zw, zl = zs.chunk(2, dim=0)
        return zw, zl, got, [p for p in self.model.parameters() if p.requires_grad]

    def po_probe_batches(self, path: str) -> list:
        """po_probe_file: its pairs through TRL's own dataset preparation (this run's processing class and
        arguments) and collator, in batches of per_device_train_batch_size, on this process's device."""
        from datasets import load_dataset

        ds = self._prepare_dataset(load_dataset("json", data_files=path, split="train"), self.processing_class,
                                   self.args, "probe")
        keep = [c for c in ("prompt_ids", "chosen_ids", "rejected_ids") if c in ds.column_names]
        for c in ("chosen_ids", "rejected_ids"):
            if c not in keep:
                raise DataError(f"the probe file {path} (po_probe_file) did not give '{c}' through TRL's dataset "
                                f"preparation; its columns are {ds.column_names}: give it the training set's "
                                "prompt/chosen/rejected columns", file=path, column=c)
        collate = getattr(self.data_collator, "inner", self.data_collator)
        size = int(self.args.per_device_train_batch_size)
        rows = [{c: ds[i][c] for c in keep} for i in range(len(ds))]
        out = []
        for i in range(0, len(rows), size):
            batch = collate(rows[i:i + size])
            out.append({k: v.to(self.accelerator.device) if isinstance(v, torch.Tensor) else v
                        for k, v in batch.items()})
        return out

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.po is None:
            inputs = {k: v for k, v in inputs.items() if k not in PLUGIN_KEYS}
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        training = mode == "train" and torch.is_grad_enabled()
        po = self.po
        capture = po.scoring(training)
        logps, counts, outputs, model_kwargs, labels = self._po_logps(model, inputs, capture)
        zw, zl = logps.chunk(2, dim=0)
        nw, nl = counts.chunk(2, dim=0)
        B = zw.shape[0]
        seq_len = inputs["completion_mask"].shape[1] - 1
        if self.precompute_ref_logps:
            rw, rl = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        elif po.loss.reference_free:
            rw = rl = None
        else:
            rw, rl = self._po_ref_logps(model_kwargs, labels, seq_len).chunk(2, dim=0)
        stats = tokens = None
        if training and po.need_scores:
            if capture and self._po_hidden is not None:
                tokens = self._po_scores(labels, B)
            stats = po.stats_for(tokens)
        margins = inputs.get("po_margin")
        if margins is None and "margins" in po.loss.needs:
            self._po_once(f"{mode}: no '{self._po_margin_key}' column", "[po_plugins] a dataset without the "
                          f"'{self._po_margin_key}' column ({mode}) is evaluated unweighted (every pair weight 1)")
        b = PairBatch(zw, zl, rw, rl, nw, nl, weights=inputs.get("po_weight"), margins=po.margins_or_unit(margins, zw),
                      score_stats=stats)
        per_sample, cr, rr = po.loss_step(b, training, inputs if training else None, tokens)
        loss = per_sample.mean()
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss
        self._po_metrics(mode, inputs, outputs, zw, zl, cr, rr)
        if return_outputs:
            with torch.no_grad():
                outputs = model(**model_kwargs)
            return loss, outputs
        return loss

    def _po_once(self, key, msg):
        if key not in self._po_said:
            self._po_said.add(key)
            self.po_print(msg)

    def _po_metrics(self, mode, inputs, outputs, zw, zl, cr, rr):
        """TRL's own metric keys, from the same quantities (rewards: β(z − z_ref), or β·z̄ reference-free)."""
        gather = self.accelerator.gather_for_metrics
        m = self._metrics[mode]
        shift = inputs["completion_mask"][..., 1:]
        seq_len = shift.size(1)
        n_tok = gather(shift.sum()).sum()
        ent = gather((outputs.entropy[:, -seq_len:].detach() * shift).sum()).sum()
        m["entropy"].append((ent / n_tok).item() if n_tok > 0 else 0.0)
        if mode == "train":
            self._total_train_tokens += gather(inputs["attention_mask"].sum()).sum().item() // self._tp_size
        m["num_tokens"] = [self._total_train_tokens]
        cm, rm = shift.chunk(2, dim=0)
        if outputs.mean_logits is not None:
            cl, rl = outputs.mean_logits[:, -seq_len:].detach().chunk(2, dim=0)
            for key, lg, mk in (("logits/chosen", cl, cm), ("logits/rejected", rl, rm)):
                tot, cnt = gather((lg * mk).sum()).sum().item(), gather(mk.sum()).sum().item()
                m[key].append(tot / cnt if cnt > 0 else 0.0)
        if outputs.is_top1 is not None:
            top1, _ = outputs.is_top1[:, -seq_len:].chunk(2, dim=0)
            hit, cnt = gather((top1 & cm.bool()).sum()).sum(), gather(cm.sum()).sum()
            m["mean_token_accuracy"].append((hit / cnt).item() if cnt > 0 else 0.0)
        cr, rr = gather(cr.float()), gather(rr.float())
        m["rewards/chosen"].append(cr.mean().item())
        m["rewards/rejected"].append(rr.mean().item())
        m["rewards/accuracies"].append((cr > rr).float().mean().item())
        m["rewards/margins"].append((cr - rr).mean().item())
        m["logps/chosen"].append(gather(zw.detach()).mean().item())
        m["logps/rejected"].append(gather(zl.detach()).mean().item())


__all__ = ["PoDPOConfig", "PoDPOTrainer", "check_host", "HostError", "TRL_NAMES", "resolve_loss"]
