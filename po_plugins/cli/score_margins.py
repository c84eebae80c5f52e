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

from po_plugins import jobs
from po_plugins.cli._common import user_errors
from po_plugins.jobs import plan_batches
from po_plugins.reward_models import RM_KINDS, openrlhf_rm, scoring
from po_plugins.reward_models import detect_rm_kind as _detect_rm_kind
from po_plugins.reward_models.scoring import STOP_ENV

__all__ = ["STOP_ENV", "build_parser", "parse_args", "detect_rm_kind", "plan_batches", "main"]


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
    for name, kwargs in jobs.FORMAT_FLAGS.items():
        p.add_argument(f"--data.{name}", dest=f"data.{name}", **kwargs)
    p.add_argument("--data.max_len", dest="data.max_len", type=int, default=None,
                   help=f"OpenRLHF RM: truncation length (default {openrlhf_rm.MAX_LEN}); hf RM: rows longer than this "
                   "are counted (TRL's max_length; nothing is truncated)")
    p.add_argument("--output", required=True, help="output file: .jsonl, .json (JSON lines) or .parquet")
    p.add_argument("--margin_key", default="rm_margin", help="name of the margin column (never 'margin')")
    p.add_argument("--batch_size", type=int, default=16, help="pairs per forward (2x sequences)")
    p.add_argument("--checkpoint_every", type=int, default=32, help="flush finished margins every K batches")
    p.add_argument("--resume", action="store_true", help="continue from OUT.partial*.jsonl of an interrupted run")
    p.add_argument("--ref_model", default=None, help="also write ref_chosen_logp/ref_rejected_logp (DPO reference)")
    p.add_argument("--ref_dtype", default="bf16", choices=["bf16", "fp16", "fp32"],
                   help="weights dtype of the --ref_model forward: the training step's --ds.param_dtype (default bf16)")
    p.add_argument("--attn_implementation", choices=jobs.ATTN_CHOICES, default=None,
                   help="default: flash_attention_2 on CUDA, eager on CPU")
    return p


def parse_args(argv=None):
    """The options as a namespace (``.data``: the ``--data.*`` ones), checked; SystemExit on a bad combination."""
    args = jobs.nest_options(vars(build_parser().parse_args(argv)))
    with user_errors():
        scoring.check_options(args)
    jobs.check_input_template(args.data, "train_rm")  # the same rule as training, so the text matches
    return args


def detect_rm_kind(path, requested: str = "auto") -> str:
    """`po_plugins.reward_models.detect_rm_kind`, its errors as the one-line exit of a command."""
    with user_errors():
        return _detect_rm_kind(path, requested)


def main(argv=None) -> None:
    args = parse_args(argv)
    kind = detect_rm_kind(args.model, args.rm_kind)
    if kind == "openrlhf":
        from po_plugins import _cpu

        _cpu.apply_cpu_shims()  # before OpenRLHF is imported; nothing changes where CUDA is available
    with user_errors():
        scoring.score_file(args, kind)


if __name__ == "__main__":
    main()
