"""Label generated samples with a reward and form preference pairs (chosen/rejected) per prompt.

    python -m po_plugins.cli.label_pairs --input gen.jsonl --output pairs.jsonl \\
        --reward rm:RM_DIR | fn:module:function [--pairing best_worst|bradley_terry] [--seed 0] [--ties drop|keep] \\
        [--data.prompt_key prompt] [--data.input_template T | --data.apply_chat_template] [--data.max_len 512] \\
        [--samples_key samples] [--batch_size 16] [--resume]
    torchrun --nproc_per_node 8 -m po_plugins.cli.label_pairs ...   (reward model on several GPUs)

Rewards. ``rm:DIR``: a reward model saved by (po_plugins|openrlhf).cli.train_rm, scored as
``po_plugins.cli.score_margins`` scores one (``po_plugins/reward_models/openrlhf_rm.py``: OpenRLHF's
``RewardDataset(is_dpo=False)`` formatting with the ``--data.*`` flags, the stock RM forward, raw value-head
output; ``po_plugins/jobs.py``: length-bucketed batches, part files, ``--resume``, several processes).
``fn:module:function``: ``function(prompts, responses) -> floats`` called on batches of ``--batch_size``;
``prompts`` are the raw values of the prompt column (text or a message list), ``responses`` the sample texts;
``module`` must be importable (the working directory is on the path for ``python -m``). The distinct texts of a
row are scored once, so identical samples get identical rewards. A non-finite or missing reward is an error
naming the input rows.

Pairs, per row (``n`` samples with rewards r_0..r_{n-1}):
  best_worst     chosen = the sample with the highest reward, rejected = the one with the lowest; ties between
                 equal rewards go to the lowest sample index.
  bradley_terry  two samples with different texts, drawn uniformly, ordered by a draw with P(a ≻ b) = σ(r_a − r_b)
                 (equal rewards: a fair coin); the draws use a generator seeded by (``--seed``, row), so a row's
                 pair does not depend on the other rows or on the number of processes.
A row *without a preference* (best_worst: every reward equal; both: fewer than two distinct texts) is dropped
by default (``--ties drop``; DPO has nothing to learn from it) or kept with chosen = sample 0, rejected = the
first sample with a different text (else sample 0) and margin 0 (``--ties keep``).

Output: the kept rows, in input order, with every input column, plus ``--reward_key`` (default ``rewards``: the
list of per-sample rewards), ``--chosen_key``/``--rejected_key`` (text; with ``--data.apply_chat_template`` and a
message-list prompt, ``[{"role": "assistant", "content": text}]`` as OpenRLHF's DPO dataset expects),
``chosen_reward``, ``rejected_reward``, ``reward_margin`` (= chosen_reward − rejected_reward; MADPO can use it
as ``--po.margin_key reward_margin`` where the reward is known), ``chosen_sample``/``rejected_sample`` (indices).
Atomic write; JSON lines for ``.jsonl``/``.json``, parquet for ``.parquet``. ``--resume`` skips the batches whose
rewards an interrupted run with the same inputs checkpointed (testing aid: PO_PLUGINS_LABEL_STOP_AFTER=<n> exits
with status 3 after n batches).
"""

from __future__ import annotations

import argparse

from po_plugins import jobs
from po_plugins.cli._common import user_errors
from po_plugins.reward_models import labels
from po_plugins.reward_models.labels import PAIRINGS, STOP_ENV, pick_pair, tie_pair

__all__ = ["STOP_ENV", "build_parser", "parse_args", "pick_pair", "tie_pair", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m po_plugins.cli.label_pairs",
                                description="Reward every generated sample and form chosen/rejected pairs.")
    p.add_argument("--input", required=True, help="output of po_plugins.cli.generate (any format it writes)")
    p.add_argument("--output", required=True, help="pairs: .jsonl, .json (JSON lines) or .parquet")
    p.add_argument("--reward", required=True, help="rm:RM_DIR (OpenRLHF reward model) or fn:module:function")
    p.add_argument("--pairing", choices=PAIRINGS, default="best_worst")
    p.add_argument("--seed", type=int, default=0, help="bradley_terry draws")
    p.add_argument("--ties", choices=("drop", "keep"), default="drop", help="rows without a preference")
    p.add_argument("--samples_key", default="samples")
    p.add_argument("--reward_key", default="rewards")
    p.add_argument("--chosen_key", default="chosen")
    p.add_argument("--rejected_key", default="rejected")
    p.add_argument("--response_format", choices=("auto", "text", "messages"), default="auto",
                   help="chosen/rejected as text or assistant-message lists (auto: messages when "
                        "--data.apply_chat_template and the prompt is a message list)")
    p.add_argument("--data.dataset_split", dest="data.dataset_split", default="train")
    p.add_argument("--data.prompt_key", dest="data.prompt_key", default="prompt")
    for name, kwargs in jobs.FORMAT_FLAGS.items():
        p.add_argument(f"--data.{name}", dest=f"data.{name}", **kwargs)
    p.add_argument("--data.max_len", dest="data.max_len", type=int, default=512)
    p.add_argument("--batch_size", type=int, default=16, help="rm: pairs of samples per forward; fn: samples per call")
    p.add_argument("--checkpoint_every", type=int, default=32)
    p.add_argument("--resume", action="store_true", help="continue from OUT.partial*.jsonl of an interrupted run")
    p.add_argument("--attn_implementation", choices=jobs.ATTN_CHOICES, default=None)
    return p


def parse_args(argv=None):
    """The options as a namespace (``.data``: the ``--data.*`` ones; ``.kind``/``.target``: the parsed --reward)."""
    args = jobs.nest_options(vars(build_parser().parse_args(argv)))
    with user_errors():
        args.kind, args.target = labels.parse_reward(args.reward)
        jobs.check_job_options(args.output, args.batch_size, args.checkpoint_every)
    jobs.check_input_template(args.data, "train_rm")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.kind == "rm":
        from po_plugins import _cpu

        _cpu.apply_cpu_shims()  # before OpenRLHF is imported; nothing changes where CUDA is available
    with user_errors():
        labels.label_file(args)


if __name__ == "__main__":
    main()
