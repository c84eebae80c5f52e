"""The only module that knows OpenRLHF internals (supported: openrlhf >=0.10.2,<0.12, dotted flags).

It patches four seams, all plain module attributes looked up when `openrlhf.cli.train_dpo` runs:
  openrlhf.trainer.dpo_trainer.DPOTrainer     -> PoDPOTrainer (loss swap, extras, monitor, state)
  openrlhf.datasets.RewardDataset             -> PoRewardDataset (column checks, margin column carried per row)
  openrlhf.utils.config.hierarchize           -> attaches args.po and checks flag contradictions
  DeepspeedStrategy.load_ckpt                 -> keeps the loaded client_states for the plugin's state
`check_host()` verifies the version and that every seam exists before anything is patched.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from types import SimpleNamespace

import torch

from ..errors import DataError, HostError, OptionError, PluginStateError  # noqa: F401  (HostError: re-exported)
from ..head import chunked_logprobs, fused_scores_ok, head_transform
from ..losses import PairBatch, build
from ..plugin import Plugin, require_margins, row_number
from ..prefix import detach_shared
from ..scores import response_positions
from ..share import check_share, pair_layout
from . import band_params, effective_head_weight, gathered, head_spec, lora_params
from .base import HostSpec, RunInfo, Seam, installed_version
from .base import check_host as check_spec

logger = logging.getLogger("po_plugins")

# every place of OpenRLHF the plugin patches, subclasses or calls (checked at start by check_host)
SPEC = HostSpec("OpenRLHF", "openrlhf", "openrlhf", "0.10.2", "0.12", "dotted flags and the DPOTrainer seams", (
    Seam("openrlhf.trainer.dpo_trainer", "DPOTrainer",
         ("fit", "concatenated_forward", "concatenated_inputs", "_get_batch_logps", "save_logs_and_checkpoints",
          "evaluate"),
         ("self.loss_fn(", "self.concatenated_forward(", "self.save_logs_and_checkpoints(", "prompt_id_lens = data",
          "self.strategy.optimizer_step(")),
    Seam("openrlhf.trainer.dpo_trainer", "DPOLoss"),
    Seam("openrlhf.datasets", "RewardDataset", ("process_data", "__getitem__", "collate_fn")),
    Seam("openrlhf.utils.config", "hierarchize"),
    Seam("openrlhf.utils.deepspeed.deepspeed", "DeepspeedStrategy", ("load_ckpt", "save_ckpt", "all_reduce",
                                                                     "optimizer_step")),
    # score_margins' OpenRLHF reward-model backend scores pairs through the stock RM trainer's forward
    Seam("openrlhf.trainer.rm_trainer", "RewardModelTrainer", ("concatenated_forward", "concatenated_inputs")),
))
SUPPORTED = (SPEC.lo, SPEC.hi)  # >=, <
STATE_KEY = "po_plugins"
# why a packed OpenRLHF model runs flash attention (share_prompt's refusal says so; the block mask needs sdpa/eager)
PACKED_FLASH = ("OpenRLHF loads flash_attention_2 whenever --ds.packing_samples is on: drop it, the pair rows already "
                "leave out the repeated prompts")


def host_version() -> str | None:
    return installed_version(SPEC.dist)


def check_host(version: str | None = None) -> str:
    """Fail with one HostError naming the fix unless a supported OpenRLHF with every seam is installed."""
    return check_spec(SPEC, version)


def prepare_process() -> str:
    """What every po_plugins CLI does before running an OpenRLHF module: launcher-less env defaults, the CPU
    shims when there is no GPU, then the host check (one HostError naming the fix when it fails)."""
    from .. import _cpu

    _cpu.ensure_single_process_env()
    _cpu.apply_cpu_shims()
    return check_host()


# ---- args.po ------------------------------------------------------------------------------------------------
def resolve_loss(po: SimpleNamespace, model_args) -> tuple[str, dict]:
    """Combine --loss/--po.* with the host's --model.{beta,label_smoothing,ipo_enable}; errors on contradictions."""
    from ..losses import accepted_hparams

    name = po.loss
    ls = float(getattr(model_args, "label_smoothing", 0.0) or 0.0)
    ipo = bool(getattr(model_args, "ipo_enable", False))
    if name is None:
        name = "ipo" if ipo else ("cdpo" if ls > 0 else "dpo")
    base = name[3:] if name.startswith("rc_") else name
    if ipo and base != "ipo":
        raise OptionError(f"--model.ipo_enable contradicts --loss {name}; drop one of them "
                         f"(--loss ipo is the same as --model.ipo_enable)")
    if ls > 0:
        if base == "dpo":
            name, base = name.replace("dpo", "cdpo", 1), "cdpo"
        elif base not in ("cdpo", "robust_dpo"):
            raise OptionError(f"--model.label_smoothing contradicts --loss {name}; label smoothing is "
                             f"cDPO (--loss cdpo) or robust DPO (--loss robust_dpo)")
    hp = dict(po.hparams)
    accepted = accepted_hparams(name)
    if "beta" in hp:
        raise OptionError("the temperature is --model.beta (not --po.beta)")
    if "beta" in accepted and po.beta_given:
        hp["beta"] = float(model_args.beta)
    if ls > 0 and "label_smoothing" in accepted:
        if "label_smoothing" in hp and float(hp["label_smoothing"]) != ls:
            raise OptionError("--po.label_smoothing contradicts --model.label_smoothing; give one")
        hp["label_smoothing"] = ls
    return name, hp


def make_hierarchize(original, po: SimpleNamespace):
    def hierarchize(args):
        out = original(args)
        name, hp = resolve_loss(po, out.model)
        out.po = SimpleNamespace(**{**vars(po), "loss": name, "hparams": hp})
        ring = int(getattr(out.ds, "ring_attn_size", 1) or 1)
        if ring > 1 and (name.startswith("rc_") or po.monitor):
            who = f"--loss {name}" if name.startswith("rc_") else "--po.monitor"
            raise OptionError(f"the head statistics of {who} do not support ring attention "
                             f"(--ds.ring_attn_size {ring}: each rank holds a slice of every sequence); drop "
                             "--ds.ring_attn_size, or train without rc_ and --po.monitor")
        try:
            loss = build(name, **hp)  # validate hyperparameters before any model is built
        except ValueError as e:
            raise OptionError(str(e)) from None
        require_margins(loss, bool(po.margin_key), "set --po.margin_key to the dataset column that holds them")
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
                raise OptionError("--po.ref_logp_keys takes two columns: CHOSEN,REJECTED "
                                 "(e.g. ref_chosen_logp,ref_rejected_logp from score_margins --ref_model)")
            # OpenRLHF's train_dpo builds the training set first, then the optional --eval.dataset; the trainer builds
            # --po.probe_file's (po_probe_batches)
            probe = getattr(strategy, "_po_probe_path", None) if is_dpo else None
            built = getattr(strategy, "_po_dpo_datasets", 0) if is_dpo else 0
            if is_dpo and not probe:
                strategy._po_dpo_datasets = built + 1
            eval_path = getattr(getattr(strategy.args, "eval", None), "dataset", None)
            role, path = ("evaluation", eval_path) if built and eval_path else ("training", getattr(data, "dataset",
                                                                                                       None))
            where = f"the {role} dataset ({path})" if path else f"the {role} dataset"
            if probe:  # re-scored by the policy only: margins and stored reference log-probs play no part
                role, path, where = "probe", probe, f"the probe file ({probe}, --po.probe_file)"
                self.margin_key, self.ref_keys = None, ()
            cols = list(getattr(dataset, "column_names", None) or [])
            if cols and self.margin_key and self.margin_key not in cols and role == "evaluation":
                strategy.print(f"[po_plugins] {where} has no column '{self.margin_key}' (--po.margin_key): it is "
                               "evaluated unweighted (every pair weight 1)")
                self.margin_key, self.missing_margin = None, "unit"
            if cols:
                for flag, key in (("--data.chosen_key", data.chosen_key), ("--data.rejected_key", data.rejected_key),
                                  ("--data.prompt_key", getattr(data, "prompt_key", None)),
                                  ("--po.margin_key", self.margin_key),
                                  *(("--po.ref_logp_keys", k) for k in self.ref_keys)):
                    if key and key not in cols:
                        raise DataError(f"{where} has no column '{key}' (set by {flag}); its columns are {cols}. "
                                        f"Point {flag} at the right column.", file=path, column=key)
            if cols and self.margin_key:  # every row's margin is a number, or null where --po.missing_margin unit
                for i, v in enumerate(dataset[self.margin_key]):
                    v = row_number(v, i, self.margin_key, where, "--po.margin_key")
                    if (v is None or not math.isfinite(v)) and self.missing_margin != "unit":
                        raise DataError(f"row {i} of {where} has no finite value in '{self.margin_key}' "
                                        "(--po.margin_key); fill it or pass --po.missing_margin unit to give such rows "
                                        "weight 1", file=path, row=i, column=self.margin_key)
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
                else:
                    m = float(m)  # a number, or its text (checked for every row when the dataset was built)
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


class _HeadInput(torch.nn.Module):
    """Stands in for the LM head during a --po.fused_head forward: returns its input, the backbone's last hidden
    state, so the engine's forward (and DeepSpeed's hooks on its output) runs without building logits."""

    out = None

    def forward(self, x):
        self.out = x
        return x


def _head_of(engine):
    """(the causal LM, its head module, the head's attribute name) under an engine / PEFT wrapper."""
    net = getattr(engine, "module", engine)
    base = net.get_base_model() if hasattr(net, "get_base_model") else net
    head = base.get_output_embeddings()
    for name, child in base.named_children():
        if child is head:
            return base, head, name
    raise OptionError(f"--po.fused_head: cannot find the LM head among {type(base).__name__}'s modules; "
                     "run without --po.fused_head")


def _trainer_class():
    from openrlhf.trainer.dpo_trainer import DPOTrainer

    class PoDPOTrainer(DPOTrainer):
        """DPOTrainer with a po_plugins objective, per-sample extras, the band monitor and plugin state."""

        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            po = self.args.po
            # --model.nll_loss_coef: folded into the objective (RPO's form) so that the incentives, RC's α and the
            # band include it; OpenRLHF then adds the same term's value only (concatenated_forward returns it
            # detached), so losses, logs and gradients equal the stock step's
            coef = float(getattr(self.args.model, "nll_loss_coef", 0.0) or 0.0)
            self._po_nll = coef > 1e-8
            run = RunInfo(self.strategy.accumulated_gradient, self.strategy.world_size, self.args.ckpt.output_dir,
                          lambda n: f"--loss {n}", nll_flag="--model.nll_loss_coef 0.1")
            self.po = Plugin(build(po.loss, **po.hparams), vars(po), self, run, nll_coef=coef if self._po_nll else 0.0)
            self.loss_fn = HostLoss(self)
            if self.po.options["band_scope"] == "model" and int(getattr(self.strategy, "stage", 0)) == 3:
                raise OptionError("--po.band_scope model takes the gradient of every parameter, which ZeRO-3 shards: "
                                  "use --ds.zero_stage 2 (or 0/1) for the check, or drop --po.band_scope")
            if self.po.monitor is not None:  # the step's statistics before the weights change (Plugin contract)
                step = self.strategy.optimizer_step

                def optimizer_step(optimizer, model, scheduler, *a, **kw):
                    engine = getattr(model, "model", model)
                    if model is self.model and engine.is_gradient_accumulation_boundary():
                        self.po.before_optimizer_step()
                    return step(optimizer, model, scheduler, *a, **kw)

                self.strategy.optimizer_step = optimizer_step
            self._po_extra = {}
            self._po_head_cache = None
            head = _lm_head(self.model)
            if self.po.need_scores and head is None:
                raise OptionError("the band needs the model's LM head (get_output_embeddings())")
            # Scores are those of the LM-head weight, trainable or not: under LoRA the head is frozen and the
            # paper autograds the last block's adapters instead, but DeepSpeed's engine rejects extra
            # autograd.grad calls through its graph; the head statistics stay exact and ZeRO-3 safe.
            # --po.share_prompt: each pair on one row (po_plugins.share), through the chunked head's path
            self._po_share = bool(getattr(po, "share_prompt", False))
            self._po_fused = bool(getattr(po, "fused_head", False)) or self._po_share
            if self._po_fused and self.strategy.ring_attn_group is not None:
                flag = "--po.share_prompt" if self._po_share else "--po.fused_head"
                raise OptionError(f"{flag} does not support ring attention (--ds.ring_attn_size > 1) yet; "
                                  "drop one of them")
            if self._po_share:
                for actor in (self.model, self.ref_model):
                    if actor is not None:
                        packed = bool(getattr(actor, "packing_samples", False))
                        check_share(_head_of(actor.model)[0].config, int(self.args.data.max_len),
                                    flash_hint=PACKED_FLASH if packed else "")
            if self.po.need_scores and not self._po_fused:
                head.register_forward_hook(self._po_hook)
            states = getattr(self.strategy, "_po_client_states", None) or {}
            if STATE_KEY in states:
                try:
                    self.po.load_state_dict(states[STATE_KEY], f"the checkpoint in {self.args.ckpt.path}")
                except PluginStateError as e:
                    raise PluginStateError(f"{e} (--ckpt.path, --ckpt.load_enable)") from None
            interrupt = os.environ.get("PO_PLUGINS_INTERRUPT_AT_STEP")
            self._po_interrupt = int(interrupt) if interrupt else None
            self.po_print(self.po.banner(
                "prompt computed once: pair rows under a block attention mask, chunked LM head (--po.share_prompt)"
                if self._po_share else "chunked LM head (--po.fused_head)" if self._po_fused else "",
                "reference-free: reference forward skipped" if self.po.loss.reference_free
                else "reference log-probs read from the dataset: reference forward skipped"
                if getattr(po, "ref_logp_keys", None) else ""))

        # ---- the host contract (hosts.base.HostAdapter) ----
        def po_print(self, msg: str) -> None:
            self.strategy.print(msg)

        def po_is_rank_0(self) -> bool:
            return self.strategy.is_rank_0()

        def po_head_spec(self):
            base, head, _ = _head_of(self.model.model)
            return head_spec(base, head, float(getattr(self.model, "temperature", 1.0) or 1.0))

        def po_band_params(self) -> dict:
            base, head, _ = _head_of(self.model.model)
            return band_params(base, head)

        def po_rescore(self, inputs, tokens: bool = False):
            saved = self._po_extra
            try:
                with self.po.probe_pass() if tokens else contextlib.nullcontext():
                    zw, zl, _, _ = self.concatenated_forward(self.model, *inputs)
                    got = self._po_extra.get("tokens") if tokens else None
            finally:
                self._po_extra = saved
            return (zw, zl, got) if tokens else (zw, zl)

        def po_scope_forward(self, inputs):
            """--po.band_scope model: the micro-batch forwarded with gradients through the engine's module (the
            engine's own hooks stay out of this extra graph; ZeRO-3 is refused at start), as (z_w, z_l, its response
            tokens, the trainable parameters)."""
            engine = self.model.model
            saved = self._po_extra
            self.model.model = engine.module
            try:
                with torch.enable_grad(), self.po.probe_pass():
                    zw, zl, _, _ = self.concatenated_forward(self.model, *inputs)
                    got = self._po_extra.get("tokens")
            finally:
                self.model.model = engine
                self._po_extra = saved
            return zw, zl, got, [p for p in engine.module.parameters() if p.requires_grad]

        def po_probe_batches(self, path: str) -> list:
            """--po.probe_file: its pairs through OpenRLHF's own dataset code (this run's keys, template and length),
            in micro-batches of --train.micro_batch_size, as the training loop hands them to concatenated_forward."""
            from openrlhf.datasets.utils import blending_datasets

            PoRewardDataset = globals().get("PoRewardDataset") or _reward_dataset_class()
            args = self.args
            data = blending_datasets(path, None, self.strategy, dataset_split="train")
            self.strategy._po_probe_path = path
            try:
                dataset = PoRewardDataset(data, self.tokenizer, args.data.max_len, self.strategy,
                                          input_template=args.data.input_template, is_dpo=True)
            finally:
                self.strategy._po_probe_path = None
            if len(dataset) == 0:
                return []
            size = int(getattr(args.train, "micro_batch_size", 1) or 1)
            items = [dataset[i] for i in range(len(dataset))]
            dev = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
            out = []
            for i in range(0, len(items), size):
                c_ids, c_mask, r_ids, r_mask, extra = dataset.collate_fn(items[i:i + size])
                out.append((c_ids.squeeze(1).to(dev), c_mask.squeeze(1).to(dev), r_ids.squeeze(1).to(dev),
                            r_mask.squeeze(1).to(dev), extra))
            return out

        def _po_hook(self, module, inputs, output):
            if self._po_capture:
                self._po_head_cache = inputs[0].detach()  # the head's input; log-probs come from the Actor's logits

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
            if model is self.ref_model and self.po.loss.reference_free:
                z = torch.zeros(chosen_ids.shape[0], device=chosen_ids.device)
                return z, z, [], z.sum()
            is_policy = model is self.model
            capture = is_policy and self.po.need_scores and (
                (torch.is_grad_enabled() and self.model.training) or self.po.probing)  # probing: Plugin.probe_pass
            # --po.score_every k: fresh statistics on every k-th micro-batch, the last ones in between
            self._po_capture = self.po.scoring(capture)
            input_ids, att_masks, lens2 = self.concatenated_inputs(chosen_ids, c_mask, reject_ids, r_mask,
                                                                   prompt_id_lens)
            loss_masks = att_masks.clone().bool()
            for mask, source_len in zip(loss_masks, lens2):
                mask[:source_len] = False
            loss_masks = loss_masks[:, 1:]
            B = chosen_ids.shape[0]
            # --po.shared_prefix detach: the response tokens both rows of a pair share at their start (label indexing)
            shared = self.po.shared(input_ids, att_masks, torch.cat([loss_masks[:, :1] & False, loss_masks], 1), B,
                                    is_policy and torch.is_grad_enabled())
            shared = None if shared is None else shared[:, 1:]
            if self._po_fused:
                sums, output = self._po_fused_forward(model, input_ids, att_masks, loss_masks, B,
                                                      is_policy and self._po_capture, shared)
                self._po_capture = False
            else:
                try:
                    log_probs, output = model(input_ids, attention_mask=att_masks, return_output=True,
                                              return_logprobs=True, ring_attn_group=self.strategy.ring_attn_group)
                finally:
                    self._po_capture = False
                sums = self.po.sum_logps(log_probs, loss_masks, shared)
            counts = loss_masks.sum(-1)
            means = sums / counts.clamp(min=1)
            if is_policy:
                extra = {"chosen_tokens": counts[:B], "rejected_tokens": counts[B:], "score_stats": None,
                         "margins": None, "inputs": (chosen_ids, c_mask, reject_ids, r_mask, prompt_id_lens),
                         "tokens": None}
                if any(m is not None for m in margins) or getattr(self.args.po, "margin_key", None):
                    extra["margins"] = torch.tensor([0.0 if m is None else float(m) for m in margins],
                                                    device=sums.device)
                if capture:
                    if self._po_fused and self._po_fused_tokens is not None:
                        tokens, self._po_fused_tokens = self._po_fused_tokens, None
                    elif self._po_head_cache is not None:  # shared tokens carry no gradient: not in the scores
                        tokens = self._po_scores(input_ids, att_masks, loss_masks if shared is None or not
                                                 self.po.stats_without_shared else loss_masks & ~shared,
                                                 output["logits"], B)
                    else:
                        tokens = None
                    extra["tokens"] = tokens
                    extra["score_stats"] = self.po.stats_for(tokens)
                self._po_extra = extra
            aux_loss = output.aux_loss if "aux_loss" in output else []
            nll = -means[:B].mean()
            return sums[:B], sums[B:], aux_loss, nll.detach() if self._po_nll else nll

        _po_fused_tokens = None

        def _po_fused_forward(self, actor, input_ids, att_masks, loss_masks, B, want_scores, shared=None):
            """--po.fused_head: the backbone through the engine's own forward (the head swapped for a pass-through,
            so the engine returns the head's input), then log-probs of the response tokens only, by the chunked
            head (po_plugins.head): never the [N, T, V] logits. Padded or packed, as the Actor lays them out."""
            from openrlhf.models.ring_attn_utils import unpad_and_slice_tensor

            engine = actor.model
            base, head, name = _head_of(engine)
            layout = None
            if self._po_share:  # one row per pair (or all pairs on one packed row) under a block mask
                layout = pair_layout(input_ids, att_masks, loss_masks, B, packed=bool(actor.packing_samples),
                                     pad_id=int(self.tokenizer.pad_token_id or 0))
                seqs, fwd_mask, position_ids = layout.input_ids, layout.mask(base.dtype), layout.position_ids
            elif actor.packing_samples:
                seqs, position_ids, _, _, _ = unpad_and_slice_tensor(input_ids, att_masks, None)
                fwd_mask = None
            else:
                seqs, fwd_mask = input_ids, att_masks
                position_ids = att_masks.long().cumsum(-1) - 1
                position_ids.masked_fill_(att_masks == 0, 1)
            scale, cap = head_transform(base.config)
            temperature = float(getattr(actor, "temperature", 1.0) or 1.0)
            text = base.config.get_text_config()
            stand_in = _HeadInput()
            setattr(base, name, stand_in)
            if cap:
                text.final_logit_softcapping = None  # applied by the chunked head instead
            try:
                output = engine(seqs, attention_mask=fwd_mask, position_ids=position_ids)
            finally:
                setattr(base, name, head)
                if cap:
                    text.final_logit_softcapping = cap
            hidden = output["logits"]
            x = stand_in.out
            if hidden is not x and not (x is not None and hidden.shape == x.shape and torch.equal(hidden, x.to(
                    hidden.dtype))):  # the model rescales its head's output in its forward (not from the config)
                raise OptionError(f"--po.fused_head: {type(base).__name__}'s forward transforms its head's "
                                 "output in a way the chunked head does not reproduce; run without --po.fused_head")
            if layout is None:
                h, _, y, rows = response_positions(hidden, None, input_ids, att_masks, loss_masks)
            else:  # the stock order of response tokens (share.pair_layout)
                h, y, rows = hidden.reshape(-1, hidden.shape[-1])[layout.src], layout.labels, layout.rows
            flat = None if shared is None else shared[loss_masks.bool()]  # response_positions' order
            # RC's per-micro-batch statistics from the chunked head's own pass where it can give them (a plain linear
            # head, whole on this process): no second vocabulary pass
            sink = None
            if want_scores and fused_scores_ok(head):
                keep = None if flat is None or not self.po.stats_without_shared else ~flat
                sink = self.po.score_sink(rows, input_ids.shape[0], B, head.weight.shape[0], head.weight.shape[1],
                                          h.device, keep)
            lp, lse = chunked_logprobs(head, h, y, int(self.args.po.head_chunk) or None, scale, cap, temperature,
                                       return_lse=True, score_sink=sink)
            zeros = torch.zeros(input_ids.shape[0], dtype=lp.dtype, device=lp.device)
            sums = zeros.index_add(0, rows, detach_shared(lp, flat))
            if flat is not None:  # guard: the shared start's gradient back where the pair would not lower it
                sums = sums + self.po.guard_sums(zeros.index_add(0, rows, lp * flat))
            if want_scores:
                if flat is not None and self.po.stats_without_shared:  # detach: not in the scores
                    h, y, rows, lse = h[~flat], y[~flat], rows[~flat], lse[~flat]
                bias = getattr(head, "bias", None)
                with gathered(head.weight, bias, *lora_params(head)) if self.po.micro_stats else \
                        contextlib.nullcontext():
                    self._po_fused_tokens = self.po.tokens_from_head(
                        h, y, rows, input_ids.shape[0], B, effective_head_weight(head) if self.po.micro_stats
                        else head.weight, bias, scale, cap, temperature, lse=lse,
                        # at most ~2^22 statistics entries a vocabulary chunk, however many response tokens
                        chunk=max(64, min(int(self.args.po.score_chunk), (1 << 22) // max(1, h.shape[0]))),
                        head_dtype=head.weight.dtype,  # the head's own product and the chunked head's normalisers
                        sink=sink)
            return sums, output

        def _po_scores(self, input_ids, att_masks, loss_masks, logits, B):
            """This micro-batch's response tokens (head inputs from the hook; log-normalisers from the logits the
            log-probs were taken from) and, where needed, its own head statistics."""
            hidden = self._po_head_cache
            self._po_head_cache = None
            h, lg, y, rows = response_positions(hidden, logits, input_ids, att_masks, loss_masks)
            base, _, _ = _head_of(self.model.model)
            scale, cap = head_transform(base.config)
            return self.po.tokens_from_logits(h, lg, y, rows, input_ids.shape[0], B, scale, cap,
                                              float(getattr(self.model, "temperature", 1.0) or 1.0))

        def fit(self, *a, **kw):
            out = super().fit(*a, **kw)
            self.po.finish()  # the run's one-line summary
            return out

        def save_logs_and_checkpoints(self, args, global_step, step_bar, logs_dict=None, client_states=None):
            logs_dict = dict(logs_dict or {})
            client_states = dict(client_states or {})
            logs_dict.update(self.po.end_step(global_step))
            client_states[STATE_KEY] = self.po.state_dict()
            super().save_logs_and_checkpoints(args, global_step, step_bar, logs_dict, client_states)
            if self._po_interrupt is not None and global_step >= self._po_interrupt:
                self.strategy.print(f"[po_plugins] PO_PLUGINS_INTERRUPT_AT_STEP={self._po_interrupt}: stopping")
                raise SystemExit(3)

    return _module_level(PoDPOTrainer)


class HostLoss:
    """The 4-in/3-out contract of OpenRLHF's DPOLoss, backed by a po_plugins objective (po_plugins.monitor glue)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def __call__(self, chosen, rejected, ref_chosen, ref_rejected):
        t = self.trainer
        ex = t._po_extra
        # rows without a margin (--po.missing_margin unit) carry ĥ = 0, whose MADPO weight is exactly 1
        b = PairBatch(chosen, rejected, ref_chosen, ref_rejected, ex.get("chosen_tokens"), ex.get("rejected_tokens"),
                      margins=ex.get("margins"), score_stats=ex.get("score_stats"))
        training = torch.is_grad_enabled() and chosen.requires_grad and t.model.training
        per_sample, cr, rr = t.po.loss_step(b, training, ex.get("inputs"), ex.get("tokens") if training else None)
        loss = per_sample.mean()
        if t._po_nll:  # OpenRLHF logs the preference loss and adds the NLL term's value itself
            loss = loss - t.po.loss.hparams["nll_coef"] * (-chosen.detach().float()
                                                             / ex["chosen_tokens"].clamp(min=1)).mean()
        return loss, cr, rr


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
