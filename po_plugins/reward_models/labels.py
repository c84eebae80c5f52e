"""The labelling job: every generated sample rewarded (by an OpenRLHF reward model or a Python function), and one
chosen/rejected pair formed per row, with the checkpointing, resume and multi-process planning of `po_plugins.jobs`.
The pairing rules and the output columns: `po_plugins/cli/label_pairs.py`.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import random
from pathlib import Path
from types import SimpleNamespace

from po_plugins import jobs
from po_plugins.errors import DataError, OptionError
from po_plugins.reward_models import openrlhf_rm

PAIRINGS = ("best_worst", "bradley_terry")
STOP_ENV = "PO_PLUGINS_LABEL_STOP_AFTER"
PARTS_OF_OTHER_INPUTS = "input, --reward, --data.*, --batch_size or --samples_key differ"
_C, _R = "__po_chosen", "__po_rejected"


# -------------------------------------------------------------------------------------------------- options
def parse_reward(spec: str):
    """('rm', path) or ('fn', (module, function)) from ``rm:RM_DIR`` / ``fn:module:function``; OptionError
    otherwise (also for an rm folder without config.json)."""
    kind, _, rest = spec.partition(":")
    if kind == "rm" and rest:
        if not Path(rest, "config.json").is_file():
            raise OptionError(f"--reward rm:{rest}: no config.json there (a folder saved by train_rm is expected)")
        return "rm", rest
    if kind == "fn" and rest.count(":") == 1 and all(rest.split(":")):
        return "fn", tuple(rest.split(":"))
    raise OptionError(f"--reward must be rm:RM_DIR or fn:module:function, got {spec!r}")


def load_function(module: str, function: str):
    """The reward function ``module.function``; OptionError when it cannot be imported or is not callable."""
    try:
        fn = getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError) as e:
        raise OptionError(f"--reward fn:{module}:{function}: cannot import it ({e}); the module must be importable "
                          "from the working directory or PYTHONPATH") from None
    if not callable(fn):
        raise OptionError(f"--reward fn:{module}:{function} is not callable")
    return fn


# -------------------------------------------------------------------------------------------------- pairing
def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def distinct(samples: list) -> tuple:
    """(texts, first): the distinct texts of a row in first-occurrence order and the first sample index of each."""
    texts, first = [], []
    for j, s in enumerate(samples):
        if s not in texts:
            texts.append(s)
            first.append(j)
    return texts, first


def pick_pair(samples: list, rewards: list, pairing: str, seed: int, row: int):
    """(chosen j, rejected j) for one row, or None when the row has no preference.

    Args:
        pairing: best_worst (highest vs lowest reward, ties to the lowest sample index) or bradley_terry (two
            distinct texts drawn uniformly, ordered with P(a ≻ b) = σ(r_a − r_b), seeded by (``seed``, ``row``)).
    """
    texts, first = distinct(samples)
    r = [rewards[j] for j in first]  # one reward per distinct text
    if len(texts) < 2:
        return None
    if pairing == "best_worst":
        hi, lo = max(r), min(r)
        if hi == lo:
            return None
        return first[r.index(hi)], first[r.index(lo)]
    from po_plugins.generation import sample_seed

    rng = random.Random(sample_seed(seed, row, "bradley_terry"))
    a, b = rng.sample(range(len(texts)), 2)
    return (first[a], first[b]) if rng.random() < _sigmoid(r[a] - r[b]) else (first[b], first[a])


def tie_pair(samples: list) -> tuple:
    """The pair of a row kept without a preference: sample 0 and the first sample with another text (else 0)."""
    texts, first = distinct(samples)
    return first[0], first[1] if len(texts) > 1 else first[0]


# -------------------------------------------------------------------------------------------------- scoring
def _prompt_for_rm(value, data):
    return [{"role": "user", "content": value}] if data.apply_chat_template and isinstance(value, str) else value


def _response(text, as_messages: bool):
    return [{"role": "assistant", "content": text}] if as_messages else text


def rm_plan(raw, uniq, args, rank, world):
    """(run, batches, keys) for a reward model: pairs of a row's distinct texts as RewardDataset items (an odd count
    reuses text 0); ``run(batch)`` gives part-file records, ``keys(batch)`` the (row, text) rewards it produces."""
    from datasets import Dataset

    data = args.data
    items, rows = [], []
    prompts = raw[data.prompt_key]
    for i, texts in enumerate(uniq):
        ks = list(range(len(texts))) + ([0] if len(texts) % 2 else [])
        for a in range(0, len(ks), 2):
            items.append((i, ks[a], ks[a + 1]))
            rows.append({data.prompt_key: _prompt_for_rm(prompts[i], data),
                         _C: _response(texts[ks[a]], data.apply_chat_template),
                         _R: _response(texts[ks[a + 1]], data.apply_chat_template)})
    model, tok = openrlhf_rm.load_reward_model(args.target, args.attn_implementation,
                                               use_fast=not data.disable_fast_tokenizer)
    rm_data = SimpleNamespace(**{**vars(data), "chosen_key": _C, "rejected_key": _R})
    ds = openrlhf_rm.reward_dataset(Dataset.from_list(rows), tok, rm_data, is_dpo=False)
    if len(ds) != len(items):
        raise DataError(f"internal: RewardDataset kept {len(ds)} of {len(items)} items")
    score = openrlhf_rm.rm_scorer(model, tok, ds)

    def run(batch):
        c, r = score(batch)
        jobs.check_finite({"reward": (c, r)}, [items[x][0] for x in batch])
        return [{"i": items[x][0], str(items[x][1]): cv, str(items[x][2]): rv}
                for x, cv, rv in zip(batch, c.tolist(), r.tolist())]

    def keys(batch):
        return [(items[x][0], k) for x in batch for k in items[x][1:]]

    lengths = jobs.gather_lengths(lambda part: openrlhf_rm.item_lengths(ds, part), len(ds), rank, world)
    return run, jobs.plan_batches(lengths, args.batch_size), keys


def fn_plan(raw, uniq, args):
    """(run, batches, keys) for a reward function: every distinct (row, text) once, in input order."""
    fn = load_function(*args.target)
    units = [(i, k) for i, texts in enumerate(uniq) for k in range(len(texts))]
    prompts = raw[args.data.prompt_key]

    def run(batch):
        got = fn([prompts[units[u][0]] for u in batch], [uniq[units[u][0]][units[u][1]] for u in batch])
        try:
            got = [float(x) for x in got]
        except (TypeError, ValueError) as e:
            raise DataError(f"--reward {args.reward} returned something that is not a list of floats ({e})") from None
        if len(got) != len(batch):
            raise DataError(f"--reward {args.reward} returned {len(got)} rewards for {len(batch)} responses")
        bad = sorted({units[u][0] for u, x in zip(batch, got) if not math.isfinite(x)})
        if bad:
            raise DataError(f"non-finite reward (nan/inf) from {args.reward} for {len(bad)} input row(s) (0-based): "
                            f"{bad[:10]}{' ...' if len(bad) > 10 else ''}")
        return [{"i": units[u][0], str(units[u][1]): x} for u, x in zip(batch, got)]

    batches = [list(range(k, min(k + args.batch_size, len(units)))) for k in range(0, len(units), args.batch_size)]
    return run, batches, lambda batch: [units[u] for u in batch]


def fingerprint(args, n_rows: int) -> str:
    """What the rewards depend on (input file, reward model files or function source, formatting, batch size)."""
    if args.kind == "rm":
        target = jobs.path_stamp(args.target)
    else:
        spec = importlib.util.find_spec(args.target[0])
        target = [args.target, jobs.path_stamp(spec.origin if spec else None)]
    return jobs.fingerprint({"input": jobs.path_stamp(args.input), "rows": n_rows, "reward": target,
                             "data_args": vars(args.data), "batch_size": args.batch_size,
                             "attn": args.attn_implementation, "samples_key": args.samples_key})


# ------------------------------------------------------------------------------------------------------ the job
def label_file(args) -> None:
    """Reward the samples of ``args.input`` and write the pairs to ``args.output`` (every process of a torchrun job
    calls it; rank 0 writes).

    Args:
        args: the options of `po_plugins.cli.label_pairs` (`.data`: the ``--data.*`` ones; `.kind`, `.target`:
            `parse_reward`). A reward model needs the CPU shims applied first on a machine without CUDA.
    """
    if args.kind == "rm":
        openrlhf_rm.ensure_host()
    rank, world = jobs.init_dist()
    say = jobs.rank0_say(rank)
    raw = jobs.load_rows(SimpleNamespace(dataset=args.input, dataset_split=args.data.dataset_split))
    jobs.require_columns(raw.column_names, {"--data.prompt_key": args.data.prompt_key,
                                            "--samples_key": args.samples_key}, source=args.input)
    samples = raw[args.samples_key]
    for i, s in enumerate(samples):
        if not isinstance(s, list) or not s or not all(isinstance(x, str) for x in s):
            raise DataError(f"input row {i}: '{args.samples_key}' must be a non-empty list of strings", row=i)
    n = len(raw)
    uniq = [distinct(s)[0] for s in samples]

    run, batches, keys = rm_plan(raw, uniq, args, rank, world) if args.kind == "rm" else fn_plan(raw, uniq, args)
    fp = fingerprint(args, n)
    done = jobs.start_parts(args.output, fp, args.resume, rank, world, PARTS_OF_OTHER_INPUTS)
    if args.resume:
        say(f"resuming: {len(done)} of {n} rows have checkpointed rewards")
    todo = jobs.my_batches(batches, rank, world, lambda b: all(str(t) in done.get(i, {}) for i, t in keys(b)))
    bar = jobs.progress(len(todo), rank == 0, "batch", "rewarding samples")
    jobs.checkpointed_loop(todo, run, args.output, fp, rank, world, args.checkpoint_every, STOP_ENV, bar,
                           size=lambda batch: 1)
    if rank == 0:
        done = jobs.read_parts(args.output, fp, PARTS_OF_OTHER_INPUTS)
        rewards = []
        for i in range(n):
            got = done.get(i, {})
            per_text = [got.get(str(k)) for k in range(len(uniq[i]))]
            if any(x is None for x in per_text):
                raise DataError(f"internal: no reward for input row {i} after scoring")
            rewards.append([per_text[uniq[i].index(s)] for s in samples[i]])
        write_pairs(raw, samples, rewards, args, say)
    jobs.finish_dist(world)


def write_pairs(raw, samples, rewards, args, say) -> None:
    """The kept rows with their pair and reward columns, written by `po_plugins.jobs.publish`."""
    keep, cols = [], {k: [] for k in (args.reward_key, args.chosen_key, args.rejected_key, "chosen_reward",
                                      "rejected_reward", "reward_margin", "chosen_sample", "rejected_sample")}
    prompts = raw[args.data.prompt_key]
    ties = 0
    for i in range(len(raw)):
        pair = pick_pair(samples[i], rewards[i], args.pairing, args.seed, i)
        if pair is None:
            ties += 1
            if args.ties == "drop":
                continue
            pair = tie_pair(samples[i])
        c, r = pair
        as_messages = args.response_format == "messages" or (
            args.response_format == "auto" and args.data.apply_chat_template and isinstance(prompts[i], list))
        keep.append(i)
        for key, value in ((args.reward_key, rewards[i]), (args.chosen_key, _response(samples[i][c], as_messages)),
                           (args.rejected_key, _response(samples[i][r], as_messages)),
                           ("chosen_reward", rewards[i][c]), ("rejected_reward", rewards[i][r]),
                           ("reward_margin", rewards[i][c] - rewards[i][r]),
                           ("chosen_sample", c), ("rejected_sample", r)):
            cols[key].append(value)
    replaced = [k for k in cols if k in raw.column_names]
    if replaced:
        say(f"the input's column(s) {replaced} are replaced")
    out = raw.select(keep) if len(keep) < len(raw) else raw
    jobs.publish(out, cols, args.output)
    margins = cols["reward_margin"]
    say(f"wrote {len(keep)} pairs ({args.pairing}) from {len(raw)} rows to {args.output}; {ties} row(s) without a "
        f"preference {'dropped' if args.ties == 'drop' else 'kept with margin 0'}; mean reward_margin "
        f"{sum(margins) / max(len(margins), 1):.4f}")


__all__ = ["PAIRINGS", "STOP_ENV", "parse_reward", "load_function", "distinct", "pick_pair", "tie_pair", "rm_plan",
           "fn_plan", "fingerprint", "label_file", "write_pairs"]
