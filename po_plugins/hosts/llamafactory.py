"""The only module that knows LLaMA-Factory internals (supported: llamafactory >=0.9.5,<0.9.6 with trl 0.24 and
transformers >=4.57.1,<5; its DPO stage, `stage: dpo`).

LLaMA-Factory has no plugin or callback mechanism, so `install(config)` swaps and wraps a few names before its own
`run_exp` runs (po_plugins.cli.llamafactory does that in every process, torchrun's workers included). The seams,
checked by `check_host()`:
  train.dpo.trainer.CustomDPOTrainer   subclassed (PoLFDPOTrainer) and swapped in: run_dpo imports it at call time.
                                       get_batch_loss_metrics: the plugin's objective on LLaMA-Factory's own
                                       concatenated_forward (summed log-probs, its reference model or its adapter-off
                                       PEFT model); an lm_head forward hook, armed for the policy forward only, captures
                                       the head's input and the logits it materialises (the band's score statistics)
  train.tuner.get_train_args           wrapped: the objective is resolved from the parsed arguments (every error before
                                       the model loads) and use_ref_model follows the objective (reference-free: none)
  train.tuner.LogCallback              subclassed: trainer_log.jsonl also carries the po/* scalars
  data.parser.DatasetAttr.join         wrapped: dataset_info.json's columns.margin / columns.weight are kept
  data.loader.align_dataset            wrapped: the margin / weight column travels as _po_margin / _po_weight
  data.processor.pairwise.PairwiseDatasetProcessor.preprocess_dataset   wrapped: the same columns survive tokenising
                                       (its validity filter repeated, checked in its source)
  trainer.data_collator                wrapped: each row's margin / weight becomes a [B] tensor of its batch
  Trainer._save_checkpoint, train()    the plugin state in every checkpoint, restored by resume_from_checkpoint
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import deque
from dataclasses import dataclass, field

import torch

from ..head import final_logits, head_transform
from ..losses import PairBatch, accepted_hparams, build, names
from ..options import (
    OPTIONS,
    OptionError,
    check_loss,
    check_options,
    coerce_hparam,
    nearest,
    options_for,
    parse_value,
    refuse_option,
)
from ..plugin import row_number
from ..scores import response_positions
from . import HostError  # noqa: F401  (re-exported)
from .base import HostSpec, Seam, installed_version
from .base import check_host as check_spec
from .hf_trainer import RowExtras, TrainerPlugin, columns

logger = logging.getLogger("po_plugins")

_PREPROCESS_FILTER = 'len(examples["_prompt"][i]) % 2 != 1 or len(examples["_response"][i]) < 2'
# every place of LLaMA-Factory the plugin patches, subclasses or calls (checked at start by check_host)
SPEC = HostSpec("LLaMA-Factory", "llamafactory", "llamafactory", "0.9.5", "0.9.6",
                "its DPO trainer's seams are checked against that release", (
    Seam("llamafactory.train.dpo.trainer", "CustomDPOTrainer",
     ("concatenated_forward", "compute_reference_log_probs", "get_batch_loss_metrics", "log", "compute_loss"),
     ("self.loss_type = finetuning_args.pref_loss", 'labels = batch.pop("labels")', ".logits.to(torch.float32)",
      "get_batch_logps(", 'self.loss_type in ["ipo", "orpo", "simpo"]', "disable_adapter()",
      "self._stored_metrics[train_eval]")),
    Seam("llamafactory.train.dpo.workflow", "run_dpo", (), ("from .trainer import CustomDPOTrainer",
                                                        "PairwiseDataCollatorWithPadding(")),
    Seam("llamafactory.train.tuner", "_training_function", (),
         ("get_train_args(args)", "callbacks.append(LogCallback())", "run_dpo(")),
    Seam("llamafactory.train.tuner", "run_exp", (), ()),
    Seam("llamafactory.train.callbacks", "LogCallback", ("_write_log", "on_log"),
     ("self.thread_pool.submit(self._write_log", "if not args.should_save")),
    Seam("llamafactory.data.parser", "DatasetAttr", ("join",), ('"columns" in attr',)),
    Seam("llamafactory.data.loader", "_load_single_dataset", (), ("return align_dataset(",)),
    Seam("llamafactory.data.loader", "align_dataset", (), ()),
    Seam("llamafactory.data.processor.pairwise", "PairwiseDatasetProcessor", ("preprocess_dataset",),
     (_PREPROCESS_FILTER,)),
    Seam("llamafactory.hparams", "read_args", (), ()),
    Seam("trl.trainer.dpo_trainer", "DPOTrainer", ("compute_loss", "store_metrics"),
     ("self.get_batch_loss_metrics(model, inputs", "self.store_metrics(metrics")),
))
SUPPORTED = (SPEC.lo, SPEC.hi)  # >=, <
# the plugin's YAML keys: po_<option> (options_for: the one table), po_hparams, po_<hyperparameter>
LF_OPTIONS = options_for("llamafactory")
PLUGIN_KEYS = ("po_margin", "po_weight")
ROW_COLUMNS = {"margin": "_po_margin", "weight": "_po_weight"}

# LLaMA-Factory's own pref_loss names and the po_plugins objectives with the same definition (docs/llamafactory.md)
LF_NAMES = {"sigmoid": "dpo", "hinge": "hinge", "ipo": "ipo", "orpo": "orpo", "simpo": "simpo"}


def host_version() -> str | None:
    return installed_version("llamafactory")


def check_host(version: str | None = None) -> str:
    """Fail with one clear message unless a supported LLaMA-Factory with every seam is installed."""
    from packaging.version import Version

    tv, trv = installed_version("transformers"), installed_version("trl")
    if trv is not None and Version(trv) < Version("0.29") and tv is not None and Version(tv) >= Version("5.3"):
        raise HostError(f"trl {trv} cannot be imported with transformers {tv} (its optional-package check breaks from "
                        "transformers 5.3 on); pip install 'transformers>=4.57.1,<5'")
    version = host_version() if version is None else version
    return check_spec(SPEC, version)


check_host()

from llamafactory.data import loader as _lf_loader  # noqa: E402  (after the version check)
from llamafactory.data.parser import DatasetAttr  # noqa: E402
from llamafactory.data.processor.pairwise import PairwiseDatasetProcessor  # noqa: E402
from llamafactory.train import tuner as _lf_tuner  # noqa: E402
from llamafactory.train.callbacks import LogCallback  # noqa: E402
from llamafactory.train.dpo import trainer as _lf_dpo_trainer  # noqa: E402

CustomDPOTrainer = _lf_dpo_trainer.CustomDPOTrainer


# ---- the YAML's po_* keys ---------------------------------------------------------------------------------------
@dataclass
class PoLFConfig:
    """The plugin's part of a LLaMA-Factory YAML (popped before LLaMA-Factory parses the rest)."""

    hparams: dict = field(default_factory=dict)  # po_hparams and po_<hyperparameter>, by paper name
    options: dict = field(default_factory=lambda: {k: OPTIONS[k][1] for k in LF_OPTIONS})
    given: tuple = ()  # the po_* keys the YAML set
    beta_given: bool = False  # the YAML set pref_beta (else a po_plugins objective trains with its own default β)
    # resolved from the parsed arguments (resolve_loss)
    loss: str | None = None

    def opt(self, key):
        return self.options[key]


def all_hparam_names() -> set:
    out = set()
    for n in names():
        out |= set(accepted_hparams(n))
    return out - {"beta"}


def split_args(args: dict) -> tuple[dict, PoLFConfig]:
    """(LLaMA-Factory's arguments, the plugin's) from a YAML dict; unknown po_* keys and bad values raise
    OptionError."""
    import json

    lf, cfg = {}, PoLFConfig()
    raw_hp, given = {}, []
    known_hp = all_hparam_names()
    for key, val in args.items():
        if not (isinstance(key, str) and key.startswith("po_")):
            lf[key] = val
            continue
        given.append(key)
        name = key[3:]
        if name in LF_OPTIONS:
            kind = OPTIONS[name][0]
            cfg.options[name] = None if val is None and OPTIONS[name][1] is None else parse_value(kind, val, key)
        elif name == "hparams":
            if isinstance(val, str):
                try:
                    val = json.loads(val) if val.strip() else {}
                except json.JSONDecodeError:
                    raise OptionError(f"po_hparams must be a mapping (po_hparams: {{gamma: 1.0}}) or a JSON object, "
                                      f"got {val!r}") from None
            if not isinstance(val, dict):
                raise OptionError(f"po_hparams must be a mapping (po_hparams: {{gamma: 1.0}}), got {val!r}")
            for k, v in val.items():
                raw_hp[str(k)] = (v, f"po_hparams.{k}")
        elif name == "beta":
            raise OptionError("po_beta: the objective's β is LLaMA-Factory's pref_beta (pref_beta: 0.1)")
        elif name in OPTIONS:  # another host's option
            refuse_option("llamafactory", name, key)
        elif name in known_hp:
            raw_hp[name] = (val, key)
        else:
            accepted = sorted([f"po_{k}" for k in LF_OPTIONS] + ["po_hparams"])
            hint = nearest(key, [f"po_{k}" for k in (*LF_OPTIONS, "hparams", *known_hp)])
            raise OptionError(f"unknown key '{key}'{hint} in the LLaMA-Factory YAML; po_plugins accepts "
                              f"{', '.join(accepted)}"
                              f" and po_<hyperparameter> of the objective (e.g. po_gamma: 1.0; "
                              f"po_plugins.losses.accepted_hparams(name) lists them); β is pref_beta")
    check_options(cfg.options, spell=lambda k: f"po_{k}")
    cfg.hparams = {k: v for k, (v, _) in raw_hp.items()}
    cfg._raw_hp = raw_hp
    cfg.given = tuple(given)
    cfg.beta_given = "pref_beta" in lf
    return lf, cfg


def resolve_loss(finetuning_args, cfg: PoLFConfig) -> tuple[str, dict]:
    """The po_plugins objective and hyperparameters of a parsed LLaMA-Factory DPO configuration."""
    pref = finetuning_args.pref_loss
    beta = float(finetuning_args.pref_beta)
    if pref == "kto_pair":
        raise OptionError("pref_loss: kto_pair has no po_plugins objective (TRL 0.24 dropped it too); choose one of: "
                          f"{', '.join(list(LF_NAMES) + names())}")
    if pref not in LF_NAMES and pref not in names():
        raise OptionError(f"unknown pref_loss '{pref}'{nearest(pref, [*LF_NAMES, *names()])}; choose one of "
                          f"LLaMA-Factory's {', '.join(LF_NAMES)} or a po_plugins objective: {', '.join(names())}")
    name = LF_NAMES.get(pref, pref)
    hp = {}
    ls = float(finetuning_args.dpo_label_smoothing or 0.0)
    if pref == "sigmoid" and ls > 1e-6:
        name, hp = "cdpo", {"label_smoothing": ls}  # TRL's sigmoid with label smoothing is conservative DPO
    elif pref == "ipo":
        hp["length_normalize"] = True  # LLaMA-Factory's IPO averages log-probs over response tokens
    elif pref == "orpo":
        hp["lam"] = beta  # LLaMA-Factory's ORPO: NLL + pref_beta · odds-ratio term
    elif pref == "simpo":
        hp["gamma"] = float(finetuning_args.simpo_gamma)
    if float(finetuning_args.pref_bco_weight or 0.0) > 1e-6:
        raise OptionError(f"pref_bco_weight mixes LLaMA-Factory's BCO loss into pref_loss '{pref}'; po_plugins trains "
                          "one objective: drop pref_bco_weight (or use pref_loss: bce)")
    if finetuning_args.ld_alpha is not None:
        raise OptionError(f"ld_alpha is not supported with po_plugins (pref_loss '{pref}'): drop ld_alpha")
    raw = getattr(cfg, "_raw_hp", {k: (v, f"po_{k}") for k, v in cfg.hparams.items()})
    accepted = accepted_hparams(name)
    for k, (v, flag) in raw.items():
        if k not in accepted:
            raise OptionError(f"unknown hyperparameter {flag} for pref_loss '{pref}' ({name}); accepted: "
                              + (", ".join(f"po_{a}" for a in sorted(set(accepted) - {"beta"})) or "none")
                              + " (β is pref_beta)")
        hp[k] = v if not isinstance(v, str) else coerce_hparam(accepted[k], v, flag)
    default_beta = {f.name: f.default for f in dataclasses.fields(finetuning_args)}.get("pref_beta")
    if "beta" in accepted and (pref in LF_NAMES or cfg.beta_given or beta != default_beta):
        hp["beta"] = beta  # LLaMA-Factory's own names keep its pref_beta; an objective its own default unless set
    check_loss(name, hp, loss_flag="pref_loss", hparam_spell=lambda k: f"po_{k}")
    return name, hp


# ---- install / uninstall ----------------------------------------------------------------------------------------
_ORIGINAL: dict = {}
_ACTIVE: dict = {"cfg": None, "name": None, "hparams": None, "missing": {"margin": [], "weight": []}}


def install(cfg: PoLFConfig) -> None:
    """Swap the trainer and wrap the seams for this process's run_exp (idempotent; `uninstall()` restores)."""
    _ACTIVE.update(cfg=cfg, name=None, hparams=None, missing={"margin": [], "weight": []})
    if _ORIGINAL:
        return
    _ORIGINAL.update(trainer=_lf_dpo_trainer.CustomDPOTrainer, get_train_args=_lf_tuner.get_train_args,
                     log_callback=_lf_tuner.LogCallback, join=DatasetAttr.join, align=_lf_loader.align_dataset,
                     preprocess=PairwiseDatasetProcessor.preprocess_dataset)
    _lf_dpo_trainer.CustomDPOTrainer = PoLFDPOTrainer
    _lf_tuner.get_train_args = _get_train_args
    _lf_tuner.LogCallback = PoLogCallback
    DatasetAttr.join = _join
    _lf_loader.align_dataset = _align_dataset
    PairwiseDatasetProcessor.preprocess_dataset = _preprocess_dataset


def uninstall() -> None:
    if not _ORIGINAL:
        return
    _lf_dpo_trainer.CustomDPOTrainer = _ORIGINAL["trainer"]
    _lf_tuner.get_train_args = _ORIGINAL["get_train_args"]
    _lf_tuner.LogCallback = _ORIGINAL["log_callback"]
    DatasetAttr.join = _ORIGINAL["join"]
    _lf_loader.align_dataset = _ORIGINAL["align"]
    PairwiseDatasetProcessor.preprocess_dataset = _ORIGINAL["preprocess"]
    _ORIGINAL.clear()
    _ACTIVE.update(cfg=None, name=None, hparams=None)


def _get_train_args(args=None):
    out = _ORIGINAL["get_train_args"](args)
    finetuning_args, cfg = out[3], _ACTIVE["cfg"]
    if finetuning_args.stage != "dpo":
        if cfg is not None and cfg.given:
            raise OptionError(f"po_plugins acts on LLaMA-Factory's DPO stage (stage: dpo), got stage: "
                              f"{finetuning_args.stage} with {', '.join(cfg.given)}: set stage: dpo or drop the po_* "
                              "keys")
        _ACTIVE["name"] = None
        return out
    if getattr(finetuning_args, "use_mca", False):
        raise OptionError("use_mca (Megatron) runs its own DPO trainer, which po_plugins cannot reach: drop use_mca")
    name, hp = resolve_loss(finetuning_args, cfg)
    _ACTIVE.update(name=name, hparams=hp)
    # the reference forward follows the objective (LLaMA-Factory decides by its own names: orpo and simpo skip it)
    finetuning_args.use_ref_model = not build(name, **hp).reference_free
    return out


def _needs_margins() -> bool:
    name = _ACTIVE["name"]
    return bool(name) and "margins" in build(name, **_ACTIVE["hparams"]).needs


def _join(self, attr, *a, **kw):
    _ORIGINAL["join"](self, attr, *a, **kw)
    cols = attr.get("columns") or {}
    self.po_margin = cols.get("margin")
    self.po_weight = cols.get("weight")


def _row_value(v, what, key, i, dataset):
    v = row_number(v, i, key, f"dataset '{dataset}'", f"columns.{what} or po_{what}_key")
    return math.nan if v is None else v


def _align_dataset(dataset, dataset_attr, data_args, training_args):
    """LLaMA-Factory's align_dataset, plus the margin / weight columns the plugin reads (NaN where absent)."""
    aligned = _ORIGINAL["align"](dataset, dataset_attr, data_args, training_args)
    cfg = _ACTIVE["cfg"]
    if cfg is None or _ACTIVE["name"] is None:
        return aligned
    wanted = {}
    if _needs_margins():
        wanted["margin"] = (getattr(dataset_attr, "po_margin", None) or cfg.opt("margin_key"),
                            getattr(dataset_attr, "po_margin", None) is not None)
    if getattr(dataset_attr, "po_weight", None) or cfg.opt("weight_key"):
        wanted["weight"] = (getattr(dataset_attr, "po_weight", None) or cfg.opt("weight_key"),
                            getattr(dataset_attr, "po_weight", None) is not None)
    if not wanted:
        return aligned
    if not hasattr(dataset, "column_names") or not hasattr(aligned, "add_column") or data_args.streaming:
        raise OptionError("po_plugins' margin / weight columns need a map-style dataset: set streaming: false")
    cols = list(dataset.column_names)
    for what, (key, declared) in wanted.items():
        if key is None or key not in cols:
            if declared:
                raise OptionError(f"dataset '{dataset_attr}' declares columns.{what}: '{key}' in dataset_info.json but "
                                  f"its rows have no '{key}' (columns: {cols}); point columns.{what} at the right "
                                  "column")
            _ACTIVE["missing"][what].append((str(dataset_attr), key, cols))
            training = str(dataset_attr) in (data_args.dataset or [])
            if what == "margin" and training and cfg.opt("missing_margin") != "unit":  # refused before the model loads
                raise _missing_margins(_ACTIVE["name"], [(str(dataset_attr), key, cols)])
            values = [math.nan] * len(aligned)
        else:
            values = [_row_value(v, what, key, i, dataset_attr) for i, v in enumerate(dataset[key])]
        aligned = aligned.add_column(ROW_COLUMNS[what], values)
    return aligned


def _missing_margins(loss_name: str, missing: list) -> OptionError:
    """The one error for training datasets without a margin column: (dataset, column or None, its columns)."""
    where = "; ".join(f"dataset '{d}' has no column '{k}' (its columns: {c})" if k else
                      f"dataset '{d}' names no margin column (neither po_margin_key nor columns.margin in "
                      f"dataset_info.json; its columns: {c})" for d, k, c in missing)
    return OptionError(f"loss '{loss_name}' needs a reward-model margin in every training row: {where}. Declare the "
                       "column in dataset_info.json (\"columns\": {\"margin\": \"rm_margin\"}), set po_margin_key, or "
                       "po_missing_margin: unit to give such rows weight 1")


def _preprocess_dataset(self, examples):
    out = _ORIGINAL["preprocess"](self, examples)
    extra = [c for c in ROW_COLUMNS.values() if c in examples]
    if extra:  # the rows LLaMA-Factory keeps (its own filter, checked in its source by check_host)
        keep = [i for i in range(len(examples["_prompt"]))
                if len(examples["_prompt"][i]) % 2 == 1 and len(examples["_response"][i]) >= 2]
        for c in extra:
            out[c] = [examples[c][i] for i in keep]
    return out


class PoLogCallback(LogCallback):
    """LLaMA-Factory's LogCallback; each trainer_log.jsonl line also carries the po/* scalars of that log."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self._po_queue = deque()

    def on_log(self, args, state, control, **kwargs):
        if args.should_save and self.thread_pool is not None:  # exactly when LogCallback submits a line
            last = state.log_history[-1] if state.log_history else {}
            self._po_queue.append({k: v for k, v in last.items() if k.startswith("po/")})
        return super().on_log(args, state, control, **kwargs)

    def _write_log(self, output_dir, logs):
        extra = self._po_queue.popleft() if self._po_queue else {}
        return super()._write_log(output_dir, {**logs, **extra})


def _guard_logit_grad(g, mask, nxt):
    """po_shared_prefix: guard at the head's output: a shared position's gradient at its label's logit is the row's
    ∂L/∂z times (1 − p) (the same p in both rows of a pair), so the pair's summed label gradient over its shared
    positions has the sign of −d_w + d_l; where it is positive (a descent step would lower the shared text) both
    rows' shared positions get no gradient, as `prefix.guard_shared` does with the sums."""
    n = g.shape[0] // 2
    at_label = g.gather(-1, nxt[..., None]).squeeze(-1).float()
    per_row = (at_label * mask).sum(-1)
    down = (per_row[:n] + per_row[n:]) > 0
    return g.masked_fill((mask & down.repeat(2)[:, None])[..., None], 0)


# ---- the trainer ------------------------------------------------------------------------------------------------
class PoLFDPOTrainer(TrainerPlugin, CustomDPOTrainer):
    """LLaMA-Factory's CustomDPOTrainer with a po_plugins objective, the band monitor, per-row margins / weights and
    plugin state. Same constructor; the objective and options come from `install(cfg)` and the parsed arguments."""

    _po_replaces = CustomDPOTrainer

    def __init__(self, model, ref_model, finetuning_args, processor, disable_dropout: bool = True, **kwargs):
        cfg, name, hp = _ACTIVE["cfg"], _ACTIVE["name"], _ACTIVE["hparams"]
        if cfg is None or name is None:
            raise OptionError("PoLFDPOTrainer runs under po_plugins.cli.llamafactory (install() was not called)")
        self.po_cfg = cfg
        loss = build(name, **hp)
        super().__init__(model, ref_model, finetuning_args, processor, disable_dropout, **kwargs)
        self.loss_type = "po_plugins"  # LLaMA-Factory's concatenated_forward then returns summed log-probs
        if "margins" in loss.needs:
            self._po_check_margins(loss)
        if any(c in (columns(self.train_dataset) or []) for c in ROW_COLUMNS.values()) or any(
                c in (columns(d) or []) for d in _evals(self.eval_dataset) for c in ROW_COLUMNS.values()):
            self.data_collator = RowExtras(self.data_collator, {"po_margin": (ROW_COLUMNS["margin"], 0.0),
                                                                "po_weight": (ROW_COLUMNS["weight"], 1.0)})
        # pref_ftx: + γ·NLL of the chosen response, folded into the objective (RPO's form)
        po = self._po_start(loss, cfg.options, lambda n: f"pref_loss: {n}",
                            nll_coef=float(self.ftx_gamma) if self.ftx_gamma > 1e-6 else 0.0, nll_flag="pref_ftx: 0.1",
                            spell_option=lambda k, v: f"po_{k}: {v}")
        self._po_armed = False
        self._po_captured = None
        self._po_shared_logits = None
        if po.need_scores or po.detach_shared:
            self._po_head().register_forward_hook(self._po_hook)
        self.po_print(po.banner(f"pref_loss: {finetuning_args.pref_loss}",
                                "reference-free: no reference forward" if loss.reference_free else ""))

    # ---- columns -------------------------------------------------------------------------------------------------
    def _po_check_margins(self, loss):
        cols = columns(self.train_dataset)
        if cols is None:
            return
        if "_po_margin" not in cols:
            raise OptionError(f"loss '{loss.name}' needs reward-model margins: declare the margin column of "
                              "each dataset in dataset_info.json (\"columns\": {\"margin\": \"rm_margin\"}) or set "
                              "po_margin_key: rm_margin (po_plugins.cli.score_margins writes rm_margin)")
        if self.po_cfg.opt("missing_margin") == "unit":
            return
        missing = {d: (k, c) for d, k, c in _ACTIVE["missing"]["margin"]}
        for i, v in enumerate(self.train_dataset["_po_margin"]):
            if v is None or not math.isfinite(v):
                if missing:
                    raise _missing_margins(loss.name, [(d, k, c) for d, (k, c) in missing.items()])
                raise OptionError(f"row {i} of the training dataset has no finite margin; fill it or set "
                                  "po_missing_margin: unit to give such rows weight 1")

    # ---- the head's forward --------------------------------------------------------------------------------------
    def _po_unwrapped(self):
        m = self.accelerator.unwrap_model(self.model)
        return m.get_base_model() if hasattr(m, "get_base_model") else m

    def _po_head(self):
        head = self._po_unwrapped().get_output_embeddings()
        if head is None:
            raise OptionError(f"{type(self._po_unwrapped()).__name__} has no output embeddings (lm_head); the band "
                              "needs the LM head's forward")
        return head

    def _po_hook(self, module, inputs, output):
        mask = self._po_shared_logits
        if mask is not None and output.requires_grad:
            # --po.shared_prefix detach: the head output's gradient is zero at the positions that predict a shared
            # token; each position's logits feed that token's log-prob only, so this is the token's stopped gradient
            if tuple(output.shape[:2]) != tuple(mask.shape):
                raise OptionError(f"po_shared_prefix: the LM head's output {tuple(output.shape)} is not laid out "
                                  f"like the batch {tuple(mask.shape)} (packed rows?); use po_shared_prefix: keep")
            if self.po.shared_mode == "guard":
                nxt = self._po_next_tokens
                output.register_hook(lambda g: _guard_logit_grad(g, mask.to(g.device), nxt.to(g.device)))
            else:
                output.register_hook(lambda g: g.masked_fill(mask[..., None].to(g.device), 0))
        if self._po_armed:
            self._po_captured = (inputs[0].detach(), output.detach())

    def _po_step_metrics(self) -> dict:
        return self._stored_metrics["train"]

    def _po_scores(self, batch, labels, n_pairs, shared=None):
        """This micro-batch's response tokens (the head's input and raw output from the hook) and, where needed,
        its own head statistics (`shared`: the detached shared tokens, token indexing, left out)."""
        hidden, logits = self._po_captured
        self._po_captured = None
        mask = labels[:, 1:] != -100
        if shared is not None and self.po.stats_without_shared:
            mask = mask & ~shared[:, 1:]
        h, lg, y, rows = response_positions(hidden, logits, batch["input_ids"], batch["attention_mask"], mask)
        scale, cap = head_transform(self._po_unwrapped().config)
        return self.po.tokens_from_logits(h, final_logits(lg, scale, cap), y, rows, labels.shape[0], n_pairs, scale,
                                          cap)

    def po_scope_forward(self, inputs):
        """po_band_scope: model: the micro-batch forwarded again with gradients, as (z_w, z_l, its response tokens,
        the trainable parameters); ZeRO-3 is refused at start."""
        with torch.enable_grad():
            zw, zl, got = self.po_rescore(inputs, tokens=True)
        return zw, zl, got, [p for p in self.model.parameters() if p.requires_grad]

    def po_rescore(self, inputs, tokens: bool = False):
        batch = dict(inputs)
        if not tokens:
            out = self.concatenated_forward(self.model, batch)
            return out["chosen_logps"], out["rejected_logps"]
        with self.po.probe_pass():  # the head hook captures as on a scored micro-batch
            self._po_armed = True
            try:
                out = self.concatenated_forward(self.model, dict(batch))  # LLaMA-Factory pops its labels
            finally:
                self._po_armed = False
            zw = out["chosen_logps"]
            got = self._po_scores(batch, batch["labels"], zw.shape[0]) if self._po_captured is not None else None
        return zw, out["rejected_logps"], got

    # ---- the step ------------------------------------------------------------------------------------------------
    def get_batch_loss_metrics(self, model, batch, train_eval="train"):
        extras = {k: batch[k] for k in PLUGIN_KEYS if k in batch}
        batch = {k: v for k, v in batch.items() if k not in PLUGIN_KEYS}
        labels = batch["labels"]
        training = train_eval == "train" and torch.is_grad_enabled()
        po = self.po
        self._po_armed = capture = po.scoring(training)
        shared = po.shared(batch["input_ids"], batch["attention_mask"], labels != -100, labels.shape[0] // 2, training)
        if shared is not None:  # the head output at position t predicts token t + 1
            self._po_shared_logits = torch.cat([shared[:, 1:], shared[:, :1] & False], 1)
            ids = batch["input_ids"]
            self._po_next_tokens = torch.cat([ids[:, 1:], ids[:, :1]], 1)
        try:
            out = self.concatenated_forward(model, dict(batch))
        finally:
            self._po_armed = False
            self._po_shared_logits = None
        zw, zl = out["chosen_logps"], out["rejected_logps"]
        B = zw.shape[0]
        counts = (labels[:, 1:] != -100).sum(-1)
        nw, nl = counts[:B], counts[B:]
        if po.loss.reference_free:
            rw = rl = None
        else:
            rw, rl = self.compute_reference_log_probs(model, dict(batch))
        stats = tokens = None
        if training and po.need_scores:
            if capture and self._po_captured is not None:
                tokens = self._po_scores(batch, labels, B, shared)
            stats = po.stats_for(tokens)
        margins = po.margins_or_unit(extras.get("po_margin"), zw)  # an evaluation set without margins: weight 1
        weights = extras.get("po_weight")
        b = PairBatch(zw, zl, rw, rl, nw, nl, weights=weights.to(zw.device) if weights is not None else None,
                      margins=margins.to(zw.device) if margins is not None else None, score_stats=stats)
        per_sample, cr, rr = po.loss_step(b, training, batch if training else None, tokens)
        prefix = "eval_" if train_eval == "eval" else ""
        metrics = {
            f"{prefix}rewards/chosen": cr.mean().item(),
            f"{prefix}rewards/rejected": rr.mean().item(),
            f"{prefix}rewards/accuracies": (cr > rr).float().mean().item(),
            f"{prefix}rewards/margins": (cr - rr).mean().item(),
            f"{prefix}logps/chosen": zw.detach().mean().item(),
            f"{prefix}logps/rejected": zl.detach().mean().item(),
            f"{prefix}logits/chosen": out["chosen_logits"].detach().mean().item(),
            f"{prefix}logits/rejected": out["rejected_logits"].detach().mean().item(),
        }
        return per_sample.mean(), metrics


def _evals(ds):
    if ds is None:
        return []
    return list(ds.values()) if isinstance(ds, dict) else [ds]


__all__ = ["PoLFConfig", "PoLFDPOTrainer", "check_host", "HostError", "LF_NAMES", "split_args", "resolve_loss",
           "install", "uninstall"]
