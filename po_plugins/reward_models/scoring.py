"""The scoring job: every pair of a dataset scored by a reward model, r(chosen) − r(rejected) written in a new column
(and, for an OpenRLHF reward model, the DPO reference log-probs), with the checkpointing, resume and multi-process
planning of `po_plugins.jobs`. What is computed, exactly: `po_plugins/cli/score_margins.py`.
"""

from __future__ import annotations

import math
import os
from typing import Callable, NamedTuple

from po_plugins import jobs
from po_plugins.errors import DataError, OptionError
from po_plugins.reward_models import detect_rm_kind, hf_rm, openrlhf_rm

STOP_ENV = "PO_PLUGINS_SCORE_STOP_AFTER"
REF_COLUMNS = ("ref_chosen_logp", "ref_rejected_logp")
PARTS_OF_OTHER_INPUTS = "model, data, --data.*, --batch_size or --margin_key differ"


def check_options(args) -> None:
    """OptionError for options that cannot work together (the margin column's name, batch sizes, output type)."""
    if args.margin_key == "margin":
        raise OptionError("--margin_key must not be 'margin': OpenRLHF's RewardDataset reads a 'margin' column as the "
                          "reward-model margin-loss target; keep the default rm_margin or pick another name")
    if args.margin_key in REF_COLUMNS and args.ref_model:
        raise OptionError(f"--margin_key {args.margin_key} collides with a --ref_model column")
    jobs.check_job_options(args.output, args.batch_size, args.checkpoint_every)


def fingerprint(args, n_rows: int) -> str:
    """What the scores depend on (model files, data, formatting, batch size); not the number of processes."""
    return jobs.fingerprint({
        "model": jobs.path_stamp(args.model),
        "ref_model": jobs.path_stamp(args.ref_model) if args.ref_model else None,
        "data": jobs.data_stamp(args.data.dataset),
        "data_args": vars(args.data), "rows": n_rows, "batch_size": args.batch_size,
        "margin_key": args.margin_key, "attn": args.attn_implementation,
        "ref_dtype": getattr(args, "ref_dtype", "bf16") if args.ref_model else None,
    })


class Pass(NamedTuple):
    """One scoring pass over a dataset of items (the reward model's, the reference's)."""

    columns: tuple  # the output columns it fills
    scorer: Callable  # scorer(items) -> (chosen, rejected) tensors
    rows: list  # rows[item]: the input row of an item
    batches: list  # the batch plan (lists of items)


def openrlhf_passes(args, rank: int, world: int, say):
    """(raw, passes) for an OpenRLHF reward model, and the reference pass when ``args.ref_model`` is set."""
    openrlhf_rm.ensure_host()
    jobs.init_dist()
    raw = jobs.load_rows(args.data)
    jobs.require_columns(raw.column_names, {"--data.chosen_key": args.data.chosen_key,
                                            "--data.rejected_key": args.data.rejected_key,
                                            "--data.prompt_key": args.data.prompt_key})
    n = len(raw)
    use_fast = not args.data.disable_fast_tokenizer
    model, tokenizer = openrlhf_rm.load_reward_model(args.model, args.attn_implementation, use_fast=use_fast)
    rm_ds = openrlhf_rm.reward_dataset(raw, tokenizer, args.data, is_dpo=False)
    if len(rm_ds) != n:
        raise DataError(f"internal: RewardDataset(is_dpo=False) has {len(rm_ds)} rows for {n} input rows")
    lengths = jobs.gather_lengths(lambda items: openrlhf_rm.item_lengths(rm_ds, items), n, rank, world)
    passes = [Pass(columns=(args.margin_key,), scorer=openrlhf_rm.rm_scorer(model, tokenizer, rm_ds),
                   rows=list(range(n)), batches=jobs.plan_batches(lengths, args.batch_size))]
    if args.ref_model:
        actor, ref_tok = openrlhf_rm.load_ref_model(args.ref_model, args.attn_implementation, use_fast=use_fast,
                                                    dtype=args.ref_dtype)
        ref_ds = openrlhf_rm.reward_dataset(raw, ref_tok, args.data, is_dpo=True)
        rows = openrlhf_rm.dpo_rows(raw, ref_ds)
        if len(rows) < n:
            say(f"{n - len(rows)} row(s) have a prompt of >= max_len - 2 tokens; DPO drops them, their "
                f"{'/'.join(REF_COLUMNS)} are null")
        lengths = jobs.gather_lengths(lambda items: openrlhf_rm.item_lengths(ref_ds, items), len(ref_ds), rank,
                                      world)
        passes.append(Pass(columns=REF_COLUMNS, scorer=openrlhf_rm.ref_scorer(actor, ref_tok, ref_ds), rows=rows,
                           batches=jobs.plan_batches(lengths, args.batch_size)))
    return raw, passes


def hf_passes(args, rank: int, world: int, say):
    """(raw, passes) for a TRL / Hugging Face reward model: TRL's pair formatting, right-padded batches."""
    hf_rm.check_flags(args.data, args.ref_model, args.model)
    jobs.init_dist()
    raw = hf_rm.load_pairs(args.data)
    jobs.require_columns(raw.column_names, {"--data.chosen_key": args.data.chosen_key,
                                            "--data.rejected_key": args.data.rejected_key,
                                            "--data.prompt_key": args.data.prompt_key})
    model, tokenizer = hf_rm.load_reward_model(args.model, args.attn_implementation)
    pair_ids = hf_rm.trl_pair_ids(raw, tokenizer, args.data)
    lengths = [max(len(c), len(r)) for c, r in pair_ids]
    if args.data.max_len is not None:
        longer = sum(ln > args.data.max_len for ln in lengths)
        if longer:
            say(f"{longer} row(s) are longer than --data.max_len {args.data.max_len} tokens (TRL's reward training "
                "drops pairs longer than its max_length); they are scored in full")
    return raw, [Pass(columns=(args.margin_key,), scorer=hf_rm.rm_scorer(model, tokenizer.pad_token_id, pair_ids),
                      rows=list(range(len(raw))), batches=jobs.plan_batches(lengths, args.batch_size))]


def score_file(args, kind: str | None = None) -> None:
    """Score ``args.data.dataset`` with the reward model ``args.model`` and write ``args.output`` (every process of a
    torchrun job calls it; rank 0 writes).

    Args:
        args: the options of `po_plugins.cli.score_margins` (`.data` holding the ``--data.*`` ones), checked by
            `check_options`.
        kind: openrlhf | hf (default: `detect_rm_kind` with ``args.rm_kind``). An OpenRLHF reward model needs the
            CPU shims applied first on a machine without CUDA (`po_plugins._cpu.apply_cpu_shims`).
    """
    kind = kind or detect_rm_kind(args.model, args.rm_kind)
    if kind == "openrlhf" and args.data.max_len is None:
        args.data.max_len = openrlhf_rm.MAX_LEN
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    say = jobs.rank0_say(rank)
    raw, passes = (hf_passes if kind == "hf" else openrlhf_passes)(args, rank, world, say)
    n = len(raw)
    fp = fingerprint(args, n)
    done = jobs.start_parts(args.output, fp, args.resume, rank, world, PARTS_OF_OTHER_INPUTS)
    if args.resume:
        say(f"resuming: {len(done)} of {n} rows have a checkpointed score")

    def covered(p):
        return lambda items: all(c in done.get(p.rows[i], {}) for i in items for c in p.columns)

    todo = [(p, items) for p in passes for items in jobs.my_batches(p.batches, rank, world, covered(p))]

    def work(task):
        p, items = task
        c, r = p.scorer(items)
        in_rows = [p.rows[i] for i in items]
        jobs.check_finite({"reward" if len(p.columns) == 1 else "reference log-prob": (c, r)}, in_rows)
        values = [(c - r).tolist()] if len(p.columns) == 1 else [c.tolist(), r.tolist()]
        return [{"i": row, **{col: v[k] for col, v in zip(p.columns, values)}} for k, row in enumerate(in_rows)]

    bar = jobs.progress(sum(len(t[1]) for t in todo), rank == 0, "pair", "scoring pairs")
    jobs.checkpointed_loop(todo, work, args.output, fp, rank, world, args.checkpoint_every, STOP_ENV, bar,
                           size=lambda t: len(t[1]))
    if rank == 0:
        done = jobs.read_parts(args.output, fp, PARTS_OF_OTHER_INPUTS)
        columns = {c: [done.get(i, {}).get(c) for i in range(n)] for p in passes for c in p.columns}
        missing = [i for i, m in enumerate(columns[args.margin_key]) if m is None]
        if missing:
            raise DataError(f"internal: no margin for rows {missing[:10]} after scoring")
        if args.margin_key in raw.column_names:
            say(f"the input already has a '{args.margin_key}' column; it is replaced")
        jobs.publish(raw, columns, args.output)
        say(summary(columns[args.margin_key], args.margin_key, args.output))
    jobs.finish_dist(world)


def summary(margins: list, key: str, output) -> str:
    """One line: how many rows were written, the margins' mean, std and share > 0."""
    import torch

    n, m = len(margins), torch.tensor(margins, dtype=torch.float64)
    return (f"wrote {n} rows to {output}: {key} mean {m.mean():.4f}, std {m.std() if n > 1 else math.nan:.4f}, "
            f">0 for {(m > 0).double().mean():.1%}")


__all__ = ["STOP_ENV", "REF_COLUMNS", "check_options", "fingerprint", "openrlhf_passes", "hf_passes", "score_file",
           "summary"]
