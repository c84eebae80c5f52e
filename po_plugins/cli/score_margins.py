"""MADPO stage 1.5: score preference pairs with a trained reward model; write r(chosen) − r(rejected).

Two kinds of reward model, told apart by the folder's config.json (or `--rm_kind`): an OpenRLHF reward model
(`openrlhf.cli.train_rm`, `po_plugins.cli.train_rm`) and a Hugging Face sequence-classification model with one label,
as TRL's `RewardTrainer` / `trl.scripts.reward` saves it (`architectures` ending in ForSequenceClassification).

    python -m po_plugins.cli.score_margins --model RM_DIR --data.dataset pairs.jsonl --output scored.jsonl \\
        [--data.prompt_key prompt] [--data.apply_chat_template] [--data.max_len 512] [--margin_key rm_margin] \\
        [--batch_size 16] [--resume] [--ref_model SFT_DIR]
    torchrun --nproc_per_node 8 -m po_plugins.cli.score_margins ...   (the same file: every pair in the same batch)

Then train with `po_plugins.cli.train_dpo --loss madpo --po.margin_key rm_margin --data.dataset scored.jsonl`
(TRL: `po_plugins.cli.trl_dpo --loss madpo --po.margin_key rm_margin --dataset_name <folder of scored splits>`).

Exactness (OpenRLHF reward models). Pairs are formatted by OpenRLHF's own `RewardDataset(is_dpo=False)` with the
`--data.*` flags of stage 1 (prompt/chosen/rejected keys, input template, chat template, max_len, the EOS appended
and forced after truncation), batched with its `collate_fn` (left padding) and scored through the stock
`RewardModelTrainer.concatenated_forward`: the text, tokens and forward the RM saw in training. The reward is
the raw value-head output (`normalize_reward` off, so the `mean`/`std` in config.json are not applied).
Weights are loaded as OpenRLHF does (bf16) and scored in fp32 on CPU, bf16 on CUDA.

Batching. Pairs are sorted by tokenised length (longest first), cut into batches of `--batch_size`, and
batch k goes to rank k mod WORLD_SIZE; the plan does not depend on the number of processes, so every pair is
scored in the same batch under 1 or N processes and the file is identical. Each rank appends
`{"i": row, "<margin_key>": m}` lines to its part file (`OUT.partial.jsonl`, `OUT.partial.rank<r>.jsonl`),
flushed every `--checkpoint_every` batches; rank 0 merges them in input order after a barrier and writes OUT
atomically (`OUT.tmp-<pid>`, then `os.replace`). `--resume` keeps the part files of an interrupted run with
the same inputs and skips the batches they cover; the final file equals an uninterrupted run's.

Output: every input row, column and value in input order, plus the margin column (float64 of the fp32
difference). JSON lines for `.jsonl`/`.json`, parquet for `.parquet`.

`--ref_model PATH` also writes `ref_chosen_logp`/`ref_rejected_logp`: the reference log-probs summed over
response tokens (EOS included, prompt masked), from OpenRLHF's `Actor`, `RewardDataset(is_dpo=True)` and the
stock `DPOTrainer.concatenated_forward`/`_get_batch_logps`, with the reference weights in `--ref_dtype` (default
bf16: the dtype of the training step's reference forward, `--ds.param_dtype`; logits in fp32 as OpenRLHF takes
them), so `--po.ref_logp_keys` reproduces the live reference. Rows that DPO formatting drops (prompt ≥ max_len − 2
tokens) get null there.

TRL / Hugging Face reward models (`--rm_kind hf`, detected automatically). Each pair is formatted as TRL 1.16's
`RewardTrainer` formats it for training (`_prepare_dataset`): the dataset is conversational when its first row's
prompt/chosen/rejected is a list of {"role", "content"} messages; otherwise the EOS token is appended to chosen and
rejected unless they already end with it. An explicit prompt (the `prompt` column, or `--data.prompt_key`) is
prepended to both (prompt + chosen, as strings or message lists); conversational rows are tokenised with the
tokenizer's chat template (`tools`, `chat_template_kwargs` columns honoured), plain rows with `tokenizer(text)`
(special tokens as the tokenizer adds them). Tokenizer and model come from the RM folder (TRL saves the tokenizer with
its pad/EOS settings); the pad token is TRL's (pad, else EOS), batches are chosen + rejected right-padded as TRL's
`DataCollatorForPreference` builds them, and the reward is the one logit at the last non-pad token (the model's own
pooling). Weights load in their saved dtype (fp32 when TRL trained them), fp32 on CPU. TRL's training drops pairs
longer than its `max_length`; here every row is scored in full, and the rows longer than `--data.max_len` (when given)
are counted in the log. The OpenRLHF-only flags (`--data.input_template`, `--data.apply_chat_template`,
`--data.tokenizer_chat_template`, `--data.disable_fast_tokenizer`, `--ref_model`) are refused with this kind. Data:
a .json/.jsonl/.parquet/.csv/.arrow file, a `save_to_disk` folder, or a folder / dataset name that
`datasets.load_dataset` reads (its `--data.dataset_split`: the split TRL's `--dataset_name DIR` trains on). No
OpenRLHF import.

Testing aid: the environment variable PO_PLUGINS_SCORE_STOP_AFTER=<n> makes each rank exit with status 3
after scoring n batches in this run, without flushing what is not yet checkpointed (a simulated crash).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import math
import os
import sys
from pathlib import Path
from types import SimpleNamespace

STOP_ENV = "PO_PLUGINS_SCORE_STOP_AFTER"
REF_COLUMNS = ("ref_chosen_logp", "ref_rejected_logp")
OUTPUT_SUFFIXES = (".jsonl", ".json", ".parquet")
ATTN_CHOICES = ("eager", "sdpa", "flash_attention_2")
RM_KINDS = ("auto", "openrlhf", "hf")
OPENRLHF_MAX_LEN = 512  # --data.max_len default for OpenRLHF reward models (train_rm's)
OPENRLHF_ONLY = (("input_template", "--data.input_template"), ("apply_chat_template", "--data.apply_chat_template"),
                 ("tokenizer_chat_template", "--data.tokenizer_chat_template"),
                 ("disable_fast_tokenizer", "--data.disable_fast_tokenizer"))


def _fail(msg: str):
    raise SystemExit(f"po_plugins: {msg}")


# ----------------------------------------------------------------------------------------------------- arguments
def add_format_flags(p: argparse.ArgumentParser) -> None:
    """The --data.* flags that format a prompt like OpenRLHF's datasets (shared by score_margins, generate and
    label_pairs)."""
    p.add_argument("--data.input_template", dest="data.input_template", default=None)
    p.add_argument("--data.apply_chat_template", dest="data.apply_chat_template", action="store_true", default=False)
    p.add_argument("--data.tokenizer_chat_template", dest="data.tokenizer_chat_template", default=None)
    p.add_argument("--data.disable_fast_tokenizer", dest="data.disable_fast_tokenizer", action="store_true",
                   default=False)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m po_plugins.cli.score_margins",
                                description="Score preference pairs with a reward model (MADPO stage 1.5).")
    p.add_argument("--model", required=True, help="reward-model folder saved by (po_plugins|openrlhf).cli.train_rm, "
                   "or by TRL's RewardTrainer / trl.scripts.reward")
    p.add_argument("--rm_kind", choices=RM_KINDS, default="auto",
                   help="openrlhf or hf (TRL / AutoModelForSequenceClassification); auto: from config.json's "
                   "architectures (…ForSequenceClassification: hf)")
    p.add_argument("--data.dataset", dest="data.dataset", required=True,
                   help="pairs: .json/.jsonl/.parquet/.csv/.arrow file, save_to_disk folder (comma-separated: concat)")
    p.add_argument("--data.dataset_split", dest="data.dataset_split", default="train")
    p.add_argument("--data.prompt_key", dest="data.prompt_key", default=None)
    p.add_argument("--data.chosen_key", dest="data.chosen_key", default="chosen")
    p.add_argument("--data.rejected_key", dest="data.rejected_key", default="rejected")
    add_format_flags(p)
    p.add_argument("--data.max_len", dest="data.max_len", type=int, default=None,
                   help=f"OpenRLHF RM: truncation length (default {OPENRLHF_MAX_LEN}); hf RM: rows longer than this "
                   "are counted (TRL's max_length; nothing is truncated)")
    p.add_argument("--output", required=True, help="output file: .jsonl, .json (JSON lines) or .parquet")
    p.add_argument("--margin_key", default="rm_margin", help="name of the margin column (never 'margin')")
    p.add_argument("--batch_size", type=int, default=16, help="pairs per forward (2x sequences)")
    p.add_argument("--checkpoint_every", type=int, default=32, help="flush finished margins every K batches")
    p.add_argument("--resume", action="store_true", help="continue from OUT.partial*.jsonl of an interrupted run")
    p.add_argument("--ref_model", default=None, help="also write ref_chosen_logp/ref_rejected_logp (DPO reference)")
    p.add_argument("--ref_dtype", default="bf16", choices=["bf16", "fp16", "fp32"],
                   help="weights dtype of the --ref_model forward: the training step's --ds.param_dtype (default bf16)")
    p.add_argument("--attn_implementation", choices=ATTN_CHOICES, default=None,
                   help="default: flash_attention_2 on CUDA, eager on CPU")
    return p


def parse_args(argv=None) -> SimpleNamespace:
    ns = vars(build_parser().parse_args(argv))
    data = SimpleNamespace(**{k[5:]: v for k, v in ns.items() if k.startswith("data.")})
    args = SimpleNamespace(**{k: v for k, v in ns.items() if not k.startswith("data.")}, data=data)
    if args.margin_key == "margin":
        _fail("--margin_key must not be 'margin': OpenRLHF's RewardDataset reads a 'margin' column as the "
              "reward-model margin-loss target; keep the default rm_margin or pick another name")
    if args.margin_key in REF_COLUMNS and args.ref_model:
        _fail(f"--margin_key {args.margin_key} collides with a --ref_model column")
    if args.batch_size < 1 or args.checkpoint_every < 1:
        _fail("--batch_size and --checkpoint_every must be >= 1")
    if Path(args.output).suffix.lower() not in OUTPUT_SUFFIXES:
        _fail(f"--output must end in one of {', '.join(OUTPUT_SUFFIXES)}, got {args.output}")
    # the same rule as openrlhf.cli.train_rm, so the text matches training
    if data.input_template and "{}" not in data.input_template:
        print("[Warning] '{}' not in --data.input_template, set to None (as openrlhf.cli.train_rm does)",
              file=sys.stderr)
        data.input_template = None
    return args


# ---------------------------------------------------------------------------------------------- OpenRLHF pieces
class DataStrategy:
    """The few strategy members OpenRLHF's dataset code reads: ``args.data.*``, ``args.use_ms``, print, rank 0."""

    def __init__(self, data):
        self.args = SimpleNamespace(data=data, use_ms=False)

    @staticmethod
    def is_rank_0() -> bool:
        return int(os.environ.get("RANK", "0")) == 0

    def print(self, *msg):
        if self.is_rank_0():
            print(*msg, file=sys.stderr)


def load_pairs(data):
    """The raw dataset, loaded by OpenRLHF's ``blending_datasets`` as train_rm loads it (all rows, all columns)."""
    from openrlhf.datasets.utils import blending_datasets

    return blending_datasets(data.dataset, None, DataStrategy(data), dataset_split=data.dataset_split)


def check_columns(raw, data) -> None:
    cols = raw.column_names
    for flag, key in (("--data.chosen_key", data.chosen_key), ("--data.rejected_key", data.rejected_key),
                      ("--data.prompt_key", data.prompt_key)):
        if key is not None and key not in cols:
            _fail(f"the dataset has no column '{key}' (set {flag} to the right column); its columns: {cols}")


def reward_dataset(raw, tokenizer, data, is_dpo: bool = False):
    """OpenRLHF's ``RewardDataset`` over ``raw`` with the stage-1 ``--data.*`` formatting (one process).

    Its four processed columns are turned into Python lists (same values): ``__getitem__`` then indexes lists
    instead of Arrow columns, about twice as fast.
    """
    from openrlhf.datasets import RewardDataset

    ds = RewardDataset(raw, tokenizer, data.max_len, DataStrategy(data), input_template=data.input_template,
                       is_dpo=is_dpo, num_processors=1)
    for name in ("prompts", "chosens", "rejects", "extras"):
        setattr(ds, name, list(getattr(ds, name)))
    return ds


def default_device():
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def load_reward_model(path, attn_implementation=None, device=None, use_fast=True):
    """(model, tokenizer): the RM as OpenRLHF loads it (bf16), fp32 on CPU, eval mode, raw rewards; left padding."""
    from openrlhf.models import get_llm_for_sequence_regression
    from openrlhf.utils import get_tokenizer

    device = default_device() if device is None else device
    attn = attn_implementation or ("flash_attention_2" if device.type == "cuda" else "eager")
    cfg = json.loads(Path(path, "config.json").read_text())
    model = get_llm_for_sequence_regression(str(path), "reward", param_dtype="bf16", attn_implementation=attn,
                                            normalize_reward=False,
                                            value_head_prefix=cfg.get("value_head_prefix", "score"))
    model.normalize_reward = False  # raw r(x, y): config.json's mean/std must not enter the margin
    if device.type == "cpu":
        model = model.float()
    model = model.to(device).eval()
    tokenizer = get_tokenizer(str(path), model, "left", None, use_fast=use_fast)
    return model, tokenizer


def load_ref_model(path, attn_implementation=None, device=None, use_fast=True, dtype="bf16"):
    """(actor, tokenizer): OpenRLHF's Actor as train_dpo loads the reference, weights in `dtype` (the training step's
    --ds.param_dtype: then the stored log-probs are the ones training would compute); right padding."""
    from openrlhf.models import Actor
    from openrlhf.utils import get_tokenizer

    device = default_device() if device is None else device
    attn = attn_implementation or ("flash_attention_2" if device.type == "cuda" else "eager")
    actor = Actor(str(path), attn_implementation=attn, param_dtype="fp16" if dtype == "fp16" else "bf16")
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
    """``fn(items) -> (chosen_rewards, rejected_rewards)`` fp32 CPU tensors, via the stock RM trainer's forward."""
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
    """``fn(items) -> (chosen_logps, rejected_logps)``: summed response log-probs, via the stock DPO forward."""
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


# ------------------------------------------------------------------------------- TRL / Hugging Face reward models
def detect_rm_kind(path, requested: str = "auto") -> str:
    """openrlhf | hf: ``requested`` unless auto; auto reads config.json's architectures (…ForSequenceClassification:
    a TRL / Hugging Face reward model; anything else keeps the OpenRLHF path)."""
    if requested != "auto":
        return requested
    cfg_path = Path(path, "config.json")
    if not cfg_path.is_file():
        _fail(f"--model {path}: no config.json there; give the folder of a trained reward model (saved by "
              "po_plugins.cli.train_rm / openrlhf.cli.train_rm, or by TRL's trl.scripts.reward)")
    try:
        archs = json.loads(cfg_path.read_text()).get("architectures") or []
    except (json.JSONDecodeError, AttributeError):
        _fail(f"--model {path}: config.json is not a JSON object")
    return "hf" if any(str(a).endswith("ForSequenceClassification") for a in archs) else "openrlhf"


def check_hf_flags(args) -> None:
    bad = [flag for key, flag in OPENRLHF_ONLY if getattr(args.data, key)]
    if args.ref_model:
        bad.append("--ref_model")
    if bad:
        _fail(f"{', '.join(bad)}: OpenRLHF reward-model option{'s' if len(bad) > 1 else ''}, but {args.model} is a TRL "
              "/ Hugging Face reward model, whose pairs are formatted as TRL's RewardTrainer formats them "
              "(conversational rows through the tokenizer's chat template, plain rows as prompt + completion + EOS): "
              f"drop {'it' if len(bad) == 1 else 'them'}"
              + (" (TRL's DPO stores reference log-probs itself with --precompute_ref_log_probs)"
                 if args.ref_model else ""))


def load_pairs_hf(data):
    """The raw dataset for a TRL reward model, with ``datasets`` alone (no OpenRLHF): files by suffix (their single
    split), a ``save_to_disk`` folder, or anything ``load_dataset`` reads (a data folder, a cached hub name) at
    ``data.dataset_split``. Comma-separated entries are concatenated in order."""
    from datasets import Dataset, DatasetDict, concatenate_datasets, load_dataset, load_from_disk

    builders = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
    parts = []
    for entry in [d.strip() for d in str(data.dataset).split(",") if d.strip()]:
        path = Path(entry)
        try:
            if path.is_file():
                if path.suffix.lower() not in builders:
                    _fail(f"--data.dataset {entry}: unknown file type; use one of {', '.join(builders)}")
                ds = load_dataset(builders[path.suffix.lower()], data_files=str(path), split="train")
            elif path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
                ds = load_from_disk(str(path))
                if isinstance(ds, DatasetDict):
                    ds = ds[data.dataset_split]
            else:
                ds = load_dataset(entry, split=data.dataset_split)
        except (FileNotFoundError, ValueError, KeyError) as e:
            _fail(f"--data.dataset {entry} (split {data.dataset_split}) could not be loaded: {e}")
        if not isinstance(ds, Dataset):
            _fail(f"--data.dataset {entry}: expected one split, got {type(ds).__name__}")
        parts.append(ds)
    if not parts:
        _fail("--data.dataset is empty")
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


def hf_prompt_key(raw, data):
    """TRL's rule: the `prompt` column is the explicit prompt when present (``--data.prompt_key`` names another)."""
    if data.prompt_key is not None:
        return data.prompt_key
    return "prompt" if "prompt" in raw.column_names else None


def _is_messages(value) -> bool:
    return isinstance(value, list) and len(value) > 0 and isinstance(value[0], dict) and "role" in value[0]


def trl_pair_ids(raw, tokenizer, data) -> list:
    """[(chosen_ids, rejected_ids)] per input row, in order: the token ids TRL 1.16's RewardTrainer trains on (see
    the module docstring); nothing is filtered or truncated."""
    prompt_key = hf_prompt_key(raw, data)
    keys = [k for k in (prompt_key, data.chosen_key, data.rejected_key) if k]
    first = raw[0] if len(raw) else {}
    conversational = any(_is_messages(first.get(k)) for k in keys)
    eos = tokenizer.eos_token
    if not conversational and eos is None:
        _fail("the reward model's tokenizer has no EOS token; TRL appends it to every plain-text completion")
    out, plain = [], []
    for i, row in enumerate(raw):
        chosen, rejected = row[data.chosen_key], row[data.rejected_key]
        prompt = row[prompt_key] if prompt_key else None
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
                _fail(f"row {i}: chosen/rejected must both be text or both be message lists")
            plain.append(i)
            out.append((chosen, rejected))
    for k in range(0, len(plain), 1024):  # batch-encode plain text (the same ids as one call per text)
        part = plain[k:k + 1024]
        enc = tokenizer([out[i][0] for i in part] + [out[i][1] for i in part])["input_ids"]
        for j, i in enumerate(part):
            out[i] = (list(enc[j]), list(enc[len(part) + j]))
    return out


def load_hf_reward_model(path, attn_implementation=None, device=None):
    """(model, tokenizer): the TRL reward model (AutoModelForSequenceClassification, one label) in its saved dtype,
    fp32 on CPU, eval mode; the tokenizer saved with it, its pad token TRL's (pad, else EOS)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    device = default_device() if device is None else device
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForSequenceClassification.from_pretrained(str(path), dtype="auto", **kwargs)
    if model.config.num_labels != 1:
        _fail(f"--model {path} has num_labels={model.config.num_labels}; a reward model has one output (TRL's "
              "RewardTrainer saves num_labels=1)")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    text_cfg = model.config.get_text_config()
    if text_cfg.pad_token_id is None:
        text_cfg.pad_token_id = tokenizer.pad_token_id
    if device.type == "cpu":
        model = model.float()
    return model.to(device).eval(), tokenizer


def hf_scorer(model, pad_token_id: int, pair_ids: list, device=None):
    """``fn(items) -> (chosen_rewards, rejected_rewards)``: one forward over chosen + rejected, right-padded as TRL's
    DataCollatorForPreference pads them."""
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


# ---------------------------------------------------------------------------------------------------- planning
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


def plan_batches(lengths, batch_size: int, bucket: bool = True) -> list:
    """Batches of item indices: by decreasing length (ties by index) when ``bucket``, else in item order."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)) if bucket else list(range(len(lengths)))
    return [order[k:k + batch_size] for k in range(0, len(order), batch_size)]


def score_margins(model, tokenizer, dataset, batch_size: int = 16, bucket: bool = True, progress: bool = False):
    """Margins r(chosen) − r(rejected) for every item of ``dataset`` (a RewardDataset), in item order.

    One process, no checkpointing: the core of the CLI (used by the benchmark). Raises on a non-finite score.
    """
    score = rm_scorer(model, tokenizer, dataset)
    lengths = item_lengths(dataset, list(range(len(dataset)))) if bucket else [0] * len(dataset)
    margins = [None] * len(dataset)
    batches = plan_batches(lengths, batch_size, bucket)
    bar = _progress(len(dataset), progress)
    for items in batches:
        c, r = score(items)
        _check_finite({"reward": (c, r)}, items)
        for i, m in zip(items, (c - r).tolist()):
            margins[i] = m
        bar.update(len(items))
    bar.close()
    return margins


def _progress(total, enabled):
    from tqdm import tqdm

    return tqdm(total=total, unit="pair", desc="scoring pairs", disable=not enabled, dynamic_ncols=True)


def _check_finite(named, rows) -> None:
    import torch

    for what, (c, r) in named.items():
        bad = sorted({rows[k] for k in (~torch.isfinite(c) | ~torch.isfinite(r)).nonzero().flatten().tolist()})
        if bad:
            _fail(f"non-finite {what} (nan/inf) for {len(bad)} pair(s) of a batch; input rows (0-based): "
                  f"{bad[:10]}{' ...' if len(bad) > 10 else ''}. Check the model weights (and --data.max_len).")


# -------------------------------------------------------------------------------------------- part files/resume
def _file_stamp(path) -> list:
    out = []
    for p in sorted(Path(path).iterdir()) if Path(path).is_dir() else [Path(path)]:
        if p.is_file():
            st = p.stat()
            out.append([p.name, st.st_size, st.st_mtime_ns])
    return out


def fingerprint(args, n_rows: int) -> str:
    """What the scores depend on (model files, data, formatting, batch size); not the number of processes."""
    items = {
        "model": [str(Path(args.model).resolve()), _file_stamp(args.model)],
        "ref_model": [str(Path(args.ref_model).resolve()), _file_stamp(args.ref_model)] if args.ref_model else None,
        "data": [[str(Path(d.strip().split("@")[0]).resolve()), _file_stamp(d.strip().split("@")[0])]
                 if os.path.exists(d.strip().split("@")[0]) else d for d in args.data.dataset.split(",")],
        "data_args": vars(args.data), "rows": n_rows, "batch_size": args.batch_size,
        "margin_key": args.margin_key, "attn": args.attn_implementation,
        "ref_dtype": getattr(args, "ref_dtype", "bf16") if args.ref_model else None,
    }
    return hashlib.sha256(json.dumps(items, sort_keys=True, default=str).encode()).hexdigest()[:16]


def part_path(output, rank: int) -> str:
    return f"{output}.partial.jsonl" if rank == 0 else f"{output}.partial.rank{rank}.jsonl"


def part_files(output) -> list:
    return sorted(set(glob.glob(glob.escape(str(output)) + ".partial.jsonl")
                      + glob.glob(glob.escape(str(output)) + ".partial.rank*.jsonl")))


def start_parts(output, fp: str, resume: bool, rank: int, world: int) -> dict:
    """Checkpointed results of an interrupted run when resuming ({} otherwise, after rank 0 removed stale part
    files); returns once every rank has read them, so nobody appends before that."""
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    done = read_parts(output, fp) if resume else {}
    if not resume and rank == 0:
        for path in part_files(output):
            os.remove(path)
    _barrier(world)
    return done


def checkpointed_loop(todo: list, work, output, fp: str, rank: int, world: int, every: int, stop_env: str,
                      bar, size=len) -> None:
    """Run `work(batch) -> [record dicts]` over this rank's batches, appending the records to its part file
    every `every` batches (and at the end), then wait for all ranks. `stop_env=n` (a testing aid) exits with
    status 3 after n batches, as an interrupted run would."""
    stop_after = int(os.environ.get(stop_env, "0") or 0)
    my_part, buffer = part_path(output, rank), []
    for b, batch in enumerate(todo, 1):
        buffer += [json.dumps(rec, ensure_ascii=False) + "\n" for rec in work(batch)]
        bar.update(size(batch))
        if stop_after and b >= stop_after:
            bar.close()
            print(f"po_plugins: {stop_env}={stop_after}: stopping (rank {rank}) after {b} batches", file=sys.stderr)
            sys.exit(3)
        if b % every == 0:
            append_part(my_part, fp, buffer)
            buffer = []
    bar.close()
    if buffer or not os.path.exists(my_part):
        append_part(my_part, fp, buffer)
    _barrier(world)


def read_parts(output, fp: str) -> dict:
    """{row: {column: value}} from every part file; refuses part files of other inputs; skips a torn last line."""
    done = {}
    for path in part_files(output):
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
        try:
            head = json.loads(lines[0])
        except json.JSONDecodeError:
            head = {}
        if head.get("fingerprint") != fp:
            _fail(f"{path} was written for other inputs (model, data, --data.*, --batch_size or --margin_key "
                  f"differ); delete it or run without --resume")
        for line in lines[1:]:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # an interrupted write
            done.setdefault(rec.pop("i"), {}).update(rec)
    return done


def append_part(path, fp: str, lines: list) -> None:
    new = not os.path.exists(path)
    with open(path, "a", encoding="utf-8") as f:
        if new:
            f.write(json.dumps({"fingerprint": fp}) + "\n")
        f.write("".join(lines))
        f.flush()
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------------------------------- output
def write_output(raw, columns: dict, output) -> None:
    """Every row and column of ``raw`` in order plus ``columns`` ({name: list}); atomic replace of ``output``."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{output}.tmp-{os.getpid()}"
    try:
        if output.suffix.lower() == ".parquet":
            ds = raw.remove_columns([c for c in columns if c in raw.column_names])
            for name, values in columns.items():
                ds = ds.add_column(name, values)
            ds.to_parquet(tmp)
        else:
            with open(tmp, "w", encoding="utf-8") as f:
                for i, row in enumerate(raw):
                    for name, values in columns.items():
                        row[name] = values[i]
                    f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
        os.replace(tmp, output)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# -------------------------------------------------------------------------------------------------------- main
def _init_dist():
    """(rank, world_size); initialises torch.distributed (gloo on CPU, nccl on CUDA) under a launcher."""
    import datetime

    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(hours=12))
    return rank, world


def _barrier(world):
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _lengths(dataset, rank, world) -> list:
    """Tokenised length of every item; each rank computes a stride and the results are all-gathered."""
    mine = item_lengths(dataset, list(range(rank, len(dataset), world)))
    if world == 1:
        return mine
    import torch.distributed as dist

    parts = [None] * world
    dist.all_gather_object(parts, mine)
    out = [0] * len(dataset)
    for r, part in enumerate(parts):
        out[r::world] = part
    return out


def dpo_rows(raw, dataset) -> list:
    """Input row of each item of a RewardDataset(is_dpo=True): upstream's own process_data decides what it drops."""
    rows = [i for i, row in enumerate(raw) if dataset.process_data(row)["prompt"] is not None]
    if len(rows) != len(dataset):
        _fail(f"internal: DPO formatting kept {len(dataset)} rows, expected {len(rows)}")
    return rows


def openrlhf_passes(args, rank: int, world: int, say):
    """(raw, passes) for an OpenRLHF reward model (and the optional --ref_model pass)."""
    from po_plugins import _cpu
    from po_plugins.hosts import openrlhf as host

    _cpu.apply_cpu_shims()
    try:
        host.check_host()
    except host.HostError as e:
        _fail(str(e))
    rank, world = _init_dist()
    raw = load_pairs(args.data)
    check_columns(raw, args.data)
    n = len(raw)
    use_fast = not args.data.disable_fast_tokenizer
    model, tokenizer = load_reward_model(args.model, args.attn_implementation, use_fast=use_fast)
    rm_ds = reward_dataset(raw, tokenizer, args.data, is_dpo=False)
    if len(rm_ds) != n:
        _fail(f"internal: RewardDataset(is_dpo=False) has {len(rm_ds)} rows for {n} input rows")
    # passes: (columns, scorer, item -> input row, batches)
    passes = [((args.margin_key,), rm_scorer(model, tokenizer, rm_ds), list(range(n)),
               plan_batches(_lengths(rm_ds, rank, world), args.batch_size))]
    if args.ref_model:
        actor, ref_tok = load_ref_model(args.ref_model, args.attn_implementation, use_fast=use_fast,
                                        dtype=args.ref_dtype)
        ref_ds = reward_dataset(raw, ref_tok, args.data, is_dpo=True)
        rows = dpo_rows(raw, ref_ds)
        if len(rows) < n:
            say(f"{n - len(rows)} row(s) have a prompt of >= max_len - 2 tokens; DPO drops them, their "
                f"{'/'.join(REF_COLUMNS)} are null")
        passes.append((REF_COLUMNS, ref_scorer(actor, ref_tok, ref_ds), rows,
                       plan_batches(_lengths(ref_ds, rank, world), args.batch_size)))
    return raw, passes


def hf_passes(args, rank: int, world: int, say):
    """(raw, passes) for a TRL / Hugging Face reward model: TRL's pair formatting, right-padded batches."""
    check_hf_flags(args)
    _init_dist()
    raw = load_pairs_hf(args.data)
    check_columns(raw, SimpleNamespace(prompt_key=args.data.prompt_key, chosen_key=args.data.chosen_key,
                                       rejected_key=args.data.rejected_key))
    model, tokenizer = load_hf_reward_model(args.model, args.attn_implementation)
    pair_ids = trl_pair_ids(raw, tokenizer, args.data)
    lengths = [max(len(c), len(r)) for c, r in pair_ids]
    if args.data.max_len is not None:
        longer = sum(ln > args.data.max_len for ln in lengths)
        if longer:
            say(f"{longer} row(s) are longer than --data.max_len {args.data.max_len} tokens (TRL's reward training "
                "drops pairs longer than its max_length); they are scored in full")
    return raw, [((args.margin_key,), hf_scorer(model, tokenizer.pad_token_id, pair_ids), list(range(len(raw))),
                  plan_batches(lengths, args.batch_size))]


def main(argv=None) -> None:
    args = parse_args(argv)
    kind = detect_rm_kind(args.model, args.rm_kind)
    if kind == "openrlhf" and args.data.max_len is None:
        args.data.max_len = OPENRLHF_MAX_LEN
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    say = (lambda *m: print("po_plugins:", *m, file=sys.stderr, flush=True)) if rank == 0 else (lambda *m: None)
    raw, passes = (hf_passes if kind == "hf" else openrlhf_passes)(args, rank, world, say)
    n = len(raw)
    import torch

    fp = fingerprint(args, n)
    done = start_parts(args.output, fp, args.resume, rank, world)
    if args.resume:
        say(f"resuming: {len(done)} of {n} rows have a checkpointed score")

    todo = []
    for columns, scorer, rows, batches in passes:
        for k, items in enumerate(batches):
            if k % world == rank and not all(c in done.get(rows[i], {}) for i in items for c in columns):
                todo.append((columns, scorer, rows, items))
    def work(task):
        columns, scorer, rows, items = task
        c, r = scorer(items)
        in_rows = [rows[i] for i in items]
        _check_finite({"reward" if len(columns) == 1 else "reference log-prob": (c, r)}, in_rows)
        values = [(c - r).tolist()] if len(columns) == 1 else [c.tolist(), r.tolist()]
        return [{"i": row, **{col: v[k] for col, v in zip(columns, values)}} for k, row in enumerate(in_rows)]

    checkpointed_loop(todo, work, args.output, fp, rank, world, args.checkpoint_every, STOP_ENV,
                      _progress(sum(len(t[3]) for t in todo), rank == 0), size=lambda t: len(t[3]))

    if rank == 0:
        done = read_parts(args.output, fp)
        columns = {c: [done.get(i, {}).get(c) for i in range(n)] for p in passes for c in p[0]}
        missing = [i for i, m in enumerate(columns[args.margin_key]) if m is None]
        if missing:
            _fail(f"internal: no margin for rows {missing[:10]} after scoring")
        if args.margin_key in raw.column_names:
            say(f"the input already has a '{args.margin_key}' column; it is replaced")
        write_output(raw, columns, args.output)
        for path in part_files(args.output):
            os.remove(path)
        m = torch.tensor(columns[args.margin_key], dtype=torch.float64)
        say(f"wrote {n} rows to {args.output}: {args.margin_key} mean {m.mean():.4f}, std "
            f"{m.std() if n > 1 else math.nan:.4f}, >0 for {(m > 0).double().mean():.1%}")
    _barrier(world)
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()


if __name__ == "__main__":
    main()
