"""OpenRLHF reward models, and the DPO reference, as scorers of preference pairs.

Pairs are formatted by OpenRLHF's own `RewardDataset` (`is_dpo=False` for the reward model, `is_dpo=True` for the
reference) with the `--data.*` options of training, batched by its `collate_fn` and run through the stock
`RewardModelTrainer.concatenated_forward` (raw value-head output) or `DPOTrainer.concatenated_forward` /
`_get_batch_logps` (log-probs summed over response tokens). Details: `po_plugins/cli/score_margins.py`.

Every function that touches OpenRLHF first checks the installed host (`po_plugins.hosts.openrlhf.check_host`:
a supported version with those seams), raising HostError otherwise. On a machine without CUDA the caller applies
the CPU shims first (`po_plugins._cpu.apply_cpu_shims`).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from types import SimpleNamespace

from po_plugins import jobs
from po_plugins.errors import DataError

MAX_LEN = 512  # the --data.max_len default for OpenRLHF reward models (train_rm's)


@functools.cache
def ensure_host() -> str:
    """The installed OpenRLHF version once it passed `po_plugins.hosts.openrlhf.check_host` (checked once per
    process); HostError naming the fix otherwise."""
    from po_plugins.hosts import openrlhf as host

    return host.check_host()


def reward_dataset(raw, tokenizer, data, is_dpo: bool = False):
    """OpenRLHF's ``RewardDataset`` over ``raw`` with the training ``--data.*`` formatting (one process).

    Its four processed columns are turned into Python lists (same values): ``__getitem__`` then indexes lists
    instead of Arrow columns, about twice as fast.

    Args:
        data: the ``--data.*`` options (keys, input_template, apply_chat_template, max_len, ...).
        is_dpo: True for the reference (DPO formatting: prompt masked, over-long prompts dropped).
    """
    ensure_host()
    from openrlhf.datasets import RewardDataset

    ds = RewardDataset(raw, tokenizer, data.max_len, jobs.DataStrategy(data), input_template=data.input_template,
                       is_dpo=is_dpo, num_processors=1)
    for name in ("prompts", "chosens", "rejects", "extras"):
        setattr(ds, name, list(getattr(ds, name)))
    return ds


def _attn(attn_implementation, device) -> str:
    return attn_implementation or ("flash_attention_2" if device.type == "cuda" else "eager")


def load_reward_model(path, attn_implementation=None, device=None, use_fast=True):
    """(model, tokenizer): the RM as OpenRLHF loads it (bf16), fp32 on CPU, eval mode, raw rewards; left padding.

    Args:
        attn_implementation: default flash_attention_2 on CUDA, eager on CPU.
        device: default `po_plugins.jobs.default_device()`.
    """
    ensure_host()
    from openrlhf.models import get_llm_for_sequence_regression
    from openrlhf.utils import get_tokenizer

    device = jobs.default_device() if device is None else device
    cfg = json.loads(Path(path, "config.json").read_text())
    model = get_llm_for_sequence_regression(str(path), "reward", param_dtype="bf16",
                                            attn_implementation=_attn(attn_implementation, device),
                                            normalize_reward=False,
                                            value_head_prefix=cfg.get("value_head_prefix", "score"))
    model.normalize_reward = False  # raw r(x, y): config.json's mean/std must not enter the margin
    if device.type == "cpu":
        model = model.float()
    model = model.to(device).eval()
    tokenizer = get_tokenizer(str(path), model, "left", None, use_fast=use_fast)
    return model, tokenizer


def load_ref_model(path, attn_implementation=None, device=None, use_fast=True, dtype="bf16"):
    """(actor, tokenizer): OpenRLHF's Actor as train_dpo loads the reference; right padding.

    Args:
        dtype: bf16 | fp16 | fp32, the weights' dtype: the training step's --ds.param_dtype, so that the stored
            log-probs are the ones training would compute.
    """
    ensure_host()
    from openrlhf.models import Actor
    from openrlhf.utils import get_tokenizer

    device = jobs.default_device() if device is None else device
    actor = Actor(str(path), attn_implementation=_attn(attn_implementation, device),
                  param_dtype="fp16" if dtype == "fp16" else "bf16")
    if dtype == "fp32":
        actor = actor.float()
    actor = actor.to(device).eval()
    tokenizer = get_tokenizer(str(path), actor.model, "right", None, use_fast=use_fast)
    return actor, tokenizer


def _trainer_view(trainer_cls, tokenizer, *methods):
    """An object on which the stock trainer's forward helpers run unchanged (they read tokenizer, strategy)."""
    view = type(f"{trainer_cls.__name__}View", (), {m: getattr(trainer_cls, m) for m in methods})()
    view.tokenizer = tokenizer
    view.strategy = SimpleNamespace(ring_attn_group=None)
    return view


def rm_scorer(model, tokenizer, dataset, device=None):
    """``fn(items) -> (chosen_rewards, rejected_rewards)`` fp32 CPU tensors, via the stock RM trainer's forward.

    Args:
        dataset: a `reward_dataset(is_dpo=False)`; ``items`` index it.
    """
    ensure_host()
    import torch
    from openrlhf.trainer.rm_trainer import RewardModelTrainer

    view = _trainer_view(RewardModelTrainer, tokenizer, "concatenated_forward", "concatenated_inputs")
    device = next(model.parameters()).device if device is None else device

    @torch.no_grad()
    def score(items):
        c_ids, c_mask, r_ids, r_mask, _ = dataset.collate_fn([dataset[i] for i in items])
        c, r, _ = view.concatenated_forward(model, c_ids.to(device), c_mask.to(device), r_ids.to(device),
                                            r_mask.to(device))
        return c.float().cpu(), r.float().cpu()

    return score


def ref_scorer(actor, tokenizer, dataset, device=None):
    """``fn(items) -> (chosen_logps, rejected_logps)``: summed response log-probs, via the stock DPO forward.

    Args:
        dataset: a `reward_dataset(is_dpo=True)`; ``items`` index it (see `dpo_rows` for their input rows).
    """
    ensure_host()
    import torch
    from openrlhf.trainer.dpo_trainer import DPOTrainer

    view = _trainer_view(DPOTrainer, tokenizer, "concatenated_forward", "concatenated_inputs", "_get_batch_logps")
    device = next(actor.parameters()).device if device is None else device

    @torch.no_grad()
    def score(items):
        c_ids, c_mask, r_ids, r_mask, prompt_lens = dataset.collate_fn([dataset[i] for i in items])
        c, r, _, _ = view.concatenated_forward(actor, c_ids.to(device), c_mask.to(device), r_ids.to(device),
                                               r_mask.to(device), prompt_lens)
        return c.float().cpu(), r.float().cpu()

    return score


def dpo_rows(raw, dataset) -> list:
    """The input row of each item of a `reward_dataset(is_dpo=True)`: upstream's own process_data decides which rows
    DPO formatting drops."""
    rows = [i for i, row in enumerate(raw) if dataset.process_data(row)["prompt"] is not None]
    if len(rows) != len(dataset):
        raise DataError(f"internal: DPO formatting kept {len(dataset)} rows, expected {len(rows)}")
    return rows


def item_lengths(dataset, items, chunk: int = 1024) -> list:
    """Tokens of the longer sequence of each item, as ``RewardDataset.__getitem__`` builds them, batch-encoded.

    Same text rule as upstream (``(prompt + answer).rstrip("\\n")``, " " + EOS unless it ends with EOS, truncated to
    max_len); only the sort key of the batching, never a score, depends on it.
    """
    tok, eos = dataset.tokenizer, dataset.tokenizer.eos_token

    def text(prompt, answer):
        t = (prompt + answer).rstrip("\n")
        return t if t.endswith(eos) else t + " " + eos

    out = []
    for k in range(0, len(items), chunk):
        part = items[k:k + chunk]
        lens = []
        for answers in (dataset.chosens, dataset.rejects):
            enc = tok([text(dataset.prompts[i], answers[i]) for i in part], max_length=dataset.max_length,
                      truncation=True, padding=False, add_special_tokens=False)["input_ids"]
            lens.append([len(x) for x in enc])
        out += [max(a, b) for a, b in zip(*lens)]
    return out


def score_margins(model, tokenizer, dataset, batch_size: int = 16, bucket: bool = True, progress: bool = False):
    """Margins r(chosen) − r(rejected) for every item of ``dataset`` (a `reward_dataset`), in item order.

    One process, no checkpointing: the core of the scoring job (used by benchmarks/score_margins.py). Raises
    DataError on a non-finite score.
    """
    score = rm_scorer(model, tokenizer, dataset)
    lengths = item_lengths(dataset, list(range(len(dataset)))) if bucket else [0] * len(dataset)
    margins = [None] * len(dataset)
    bar = jobs.progress(len(dataset), progress, "pair", "scoring pairs")
    for items in jobs.plan_batches(lengths, batch_size, bucket):
        c, r = score(items)
        jobs.check_finite({"reward": (c, r)}, items)
        for i, m in zip(items, (c - r).tolist()):
            margins[i] = m
        bar.update(len(items))
    bar.close()
    return margins


__all__ = ["MAX_LEN", "ensure_host", "reward_dataset", "load_reward_model", "load_ref_model", "rm_scorer",
           "ref_scorer", "dpo_rows", "item_lengths", "score_margins"]
