"""TRL / Hugging Face reward models (AutoModelForSequenceClassification with one label, as TRL's `RewardTrainer`
saves it) as scorers of preference pairs, with TRL's pair formatting; no OpenRLHF import.

A pair becomes the token ids TRL 1.16's `RewardTrainer` trains on (`_prepare_dataset`): conversational rows (message
lists) through the tokenizer's chat template, plain rows as prompt + completion + EOS through ``tokenizer(text)``;
batches are chosen + rejected, right-padded as `DataCollatorForPreference` pads them, and the reward is the one
logit at the last non-pad token. The full rules: `po_plugins/cli/score_margins.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

from po_plugins import jobs
from po_plugins.errors import DataError, OptionError


def check_flags(data, ref_model, model) -> None:
    """OptionError when OpenRLHF-only options are set for a TRL / HF reward model (the formatting flags of
    `po_plugins.jobs.FORMAT_FLAGS`, a reference model)."""
    bad = [f"--data.{key}" for key in jobs.FORMAT_FLAGS if getattr(data, key)]
    if ref_model:
        bad.append("--ref_model")
    if bad:
        raise OptionError(
            f"{', '.join(bad)}: OpenRLHF reward-model option{'s' if len(bad) > 1 else ''}, but {model} is a TRL / "
            "Hugging Face reward model, whose pairs are formatted as TRL's RewardTrainer formats them "
            "(conversational rows through the tokenizer's chat template, plain rows as prompt + completion + EOS): "
            f"drop {'it' if len(bad) == 1 else 'them'}"
            + (" (TRL's DPO stores reference log-probs itself with --precompute_ref_log_probs)" if ref_model else ""))


def load_pairs(data):
    """The raw dataset with ``datasets`` alone: files by suffix (their single split), a ``save_to_disk`` folder, or
    anything ``load_dataset`` reads (a data folder, a cached hub name) at ``data.dataset_split``. Comma-separated
    entries of ``data.dataset`` are concatenated in order."""
    from datasets import Dataset, DatasetDict, concatenate_datasets, load_dataset, load_from_disk

    builders = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
    parts = []
    for entry in [d.strip() for d in str(data.dataset).split(",") if d.strip()]:
        path = Path(entry)
        try:
            if path.is_file():
                if path.suffix.lower() not in builders:
                    raise DataError(f"--data.dataset {entry}: unknown file type; use one of {', '.join(builders)}")
                ds = load_dataset(builders[path.suffix.lower()], data_files=str(path), split="train")
            elif path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
                ds = load_from_disk(str(path))
                if isinstance(ds, DatasetDict):
                    ds = ds[data.dataset_split]
            else:
                ds = load_dataset(entry, split=data.dataset_split)
        except DataError:
            raise
        except (FileNotFoundError, ValueError, KeyError) as e:
            raise DataError(f"--data.dataset {entry} (split {data.dataset_split}) could not be loaded: {e}") from None
        if not isinstance(ds, Dataset):
            raise DataError(f"--data.dataset {entry}: expected one split, got {type(ds).__name__}")
        parts.append(ds)
    if not parts:
        raise OptionError("--data.dataset is empty")
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


def prompt_key(raw, data):
    """TRL's rule: the `prompt` column is the explicit prompt when present (``data.prompt_key`` names another)."""
    if data.prompt_key is not None:
        return data.prompt_key
    return "prompt" if "prompt" in raw.column_names else None


def _is_messages(value) -> bool:
    return isinstance(value, list) and len(value) > 0 and isinstance(value[0], dict) and "role" in value[0]


def trl_pair_ids(raw, tokenizer, data) -> list:
    """[(chosen_ids, rejected_ids)] per input row, in order: the token ids TRL 1.16's RewardTrainer trains on (see the
    module docstring); nothing is filtered or truncated."""
    key = prompt_key(raw, data)
    keys = [k for k in (key, data.chosen_key, data.rejected_key) if k]
    first = raw[0] if len(raw) else {}
    conversational = any(_is_messages(first.get(k)) for k in keys)
    eos = tokenizer.eos_token
    if not conversational and eos is None:
        raise OptionError("the reward model's tokenizer has no EOS token; TRL appends it to every plain-text "
                          "completion")
    out, plain = [], []
    for i, row in enumerate(raw):
        chosen, rejected = row[data.chosen_key], row[data.rejected_key]
        prompt = row[key] if key else None
        if not conversational:  # TRL decides EOS from the first row, for the whole dataset
            chosen = chosen if chosen.endswith(eos) else chosen + eos
            rejected = rejected if rejected.endswith(eos) else rejected + eos
        if prompt is not None:
            chosen, rejected = prompt + chosen, prompt + rejected
        if _is_messages(chosen):
            tools = row.get("tools")
            kwargs = {"tools": json.loads(tools) if isinstance(tools, str) else tools,
                      **(row.get("chat_template_kwargs") or {})}
            ids = [tokenizer.apply_chat_template(m, tokenize=True, return_dict=True, **kwargs)["input_ids"]
                   for m in (chosen, rejected)]
            out.append((list(ids[0]), list(ids[1])))
        else:
            if not isinstance(chosen, str) or not isinstance(rejected, str):
                raise DataError(f"row {i}: chosen/rejected must both be text or both be message lists", row=i)
            plain.append(i)
            out.append((chosen, rejected))
    for k in range(0, len(plain), 1024):  # batch-encode plain text (the same ids as one call per text)
        part = plain[k:k + 1024]
        enc = tokenizer([out[i][0] for i in part] + [out[i][1] for i in part])["input_ids"]
        for j, i in enumerate(part):
            out[i] = (list(enc[j]), list(enc[len(part) + j]))
    return out


def load_reward_model(path, attn_implementation=None, device=None):
    """(model, tokenizer): the reward model in its saved dtype, fp32 on CPU, eval mode; the tokenizer saved with
    it, its pad token TRL's (pad, else EOS). OptionError unless the model has one label."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    device = jobs.default_device() if device is None else device
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForSequenceClassification.from_pretrained(str(path), dtype="auto", **kwargs)
    if model.config.num_labels != 1:
        raise OptionError(f"--model {path} has num_labels={model.config.num_labels}; a reward model has one output "
                          "(TRL's RewardTrainer saves num_labels=1)")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    text_cfg = model.config.get_text_config()
    if text_cfg.pad_token_id is None:
        text_cfg.pad_token_id = tokenizer.pad_token_id
    if device.type == "cpu":
        model = model.float()
    return model.to(device).eval(), tokenizer


def rm_scorer(model, pad_token_id: int, pair_ids: list, device=None):
    """``fn(items) -> (chosen_rewards, rejected_rewards)`` fp32 CPU tensors: one forward over chosen + rejected,
    right-padded as TRL's DataCollatorForPreference pads them.

    Args:
        pair_ids: `trl_pair_ids`; ``items`` index it.
    """
    import torch

    device = next(model.parameters()).device if device is None else device

    @torch.no_grad()
    def score(items):
        seqs = [pair_ids[i][0] for i in items] + [pair_ids[i][1] for i in items]
        ids = torch.full((len(seqs), max(map(len, seqs))), pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for k, s in enumerate(seqs):
            ids[k, :len(s)] = torch.tensor(s, dtype=torch.long)
            mask[k, :len(s)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        rewards = logits.squeeze(-1).float().cpu()
        return rewards[:len(items)], rewards[len(items):]

    return score


__all__ = ["check_flags", "load_pairs", "prompt_key", "trl_pair_ids", "load_reward_model", "rm_scorer"]
