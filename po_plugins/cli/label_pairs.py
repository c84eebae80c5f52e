"""Label generated samples with a reward and form preference pairs (chosen/rejected) per prompt.

    python -m po_plugins.cli.label_pairs --input gen.jsonl --output pairs.jsonl \\
        --reward rm:RM_DIR | fn:module:function [--pairing best_worst|bradley_terry] [--seed 0] [--ties drop|keep] \\
        [--data.prompt_key prompt] [--data.input_template T | --data.apply_chat_template] [--data.max_len 512] \\
        [--samples_key samples] [--batch_size 16] [--resume]
    torchrun --nproc_per_node 8 -m po_plugins.cli.label_pairs ...   (reward model on several GPUs)

Rewards. ``rm:DIR``: a reward model saved by (po_plugins|openrlhf).cli.train_rm, scored with the code of
``po_plugins.cli.score_margins`` (OpenRLHF's ``RewardDataset(is_dpo=False)`` formatting with the ``--data.*``
flags, the stock RM forward, raw value-head output, length-bucketed batches, part files, ``--resume``, several
processes). ``fn:module:function``: ``function(prompts, responses) -> floats`` called on batches of
``--batch_size``; ``prompts`` are the raw values of the prompt column (text or a message list), ``responses`` the
sample texts; ``module`` must be importable (the working directory is on the path for ``python -m``). The
distinct texts of a row are scored once, so identical samples get identical rewards. A non-finite or missing
reward is an error naming the input rows.

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
import hashlib
import importlib
import json
import math
import os
import random
import sys
from pathlib import Path
from types import SimpleNamespace

from po_plugins.cli import score_margins as io

PAIRINGS = ("best_worst", "bradley_terry")
STOP_ENV = "PO_PLUGINS_LABEL_STOP_AFTER"
_C, _R = "__po_chosen", "__po_rejected"


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
    io.add_format_flags(p)
    p.add_argument("--data.max_len", dest="data.max_len", type=int, default=512)
    p.add_argument("--batch_size", type=int, default=16, help="rm: pairs of samples per forward; fn: samples per call")
    p.add_argument("--checkpoint_every", type=int, default=32)
    p.add_argument("--resume", action="store_true", help="continue from OUT.partial*.jsonl of an interrupted run")
    p.add_argument("--attn_implementation", choices=io.ATTN_CHOICES, default=None)
    return p


def parse_reward(spec: str):
    """('rm', path) or ('fn', (module, function))."""
    kind, _, rest = spec.partition(":")
    if kind == "rm" and rest:
        if not Path(rest, "config.json").is_file():
            io._fail(f"--reward rm:{rest}: no config.json there (a folder saved by train_rm is expected)")
        return "rm", rest
    if kind == "fn" and rest.count(":") == 1 and all(rest.split(":")):
        return "fn", tuple(rest.split(":"))
    io._fail(f"--reward must be rm:RM_DIR or fn:module:function, got {spec!r}")


def parse_args(argv=None) -> SimpleNamespace:
    ns = vars(build_parser().parse_args(argv))
    data = SimpleNamespace(**{k[5:]: v for k, v in ns.items() if k.startswith("data.")})
    args = SimpleNamespace(**{k: v for k, v in ns.items() if not k.startswith("data.")}, data=data)
    args.kind, args.target = parse_reward(args.reward)
    if args.batch_size < 1 or args.checkpoint_every < 1:
        io._fail("--batch_size and --checkpoint_every must be >= 1")
    if Path(args.output).suffix.lower() not in io.OUTPUT_SUFFIXES:
        io._fail(f"--output must end in one of {', '.join(io.OUTPUT_SUFFIXES)}, got {args.output}")
    if data.input_template and "{}" not in data.input_template:
        print("[Warning] '{}' not in --data.input_template, set to None (as openrlhf.cli.train_rm does)",
              file=sys.stderr)
        data.input_template = None
    return args


def load_function(module: str, function: str):
    try:
        fn = getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError) as e:
        io._fail(f"--reward fn:{module}:{function}: cannot import it ({e}); the module must be importable from the "
              "working directory or PYTHONPATH")
    if not callable(fn):
        io._fail(f"--reward fn:{module}:{function} is not callable")
    return fn


# ------------------------------------------------------------------------------------------------- pairing
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
    """(chosen j, rejected j) for one row, or None when the row has no preference (see the module docstring)."""
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
    texts, first = distinct(samples)
    return first[0], first[1] if len(texts) > 1 else first[0]


# -------------------------------------------------------------------------------------------------- scoring
def _prompt_for_rm(value, data):
    return [{"role": "user", "content": value}] if data.apply_chat_template and isinstance(value, str) else value


def _response(text, as_messages: bool):
    return [{"role": "assistant", "content": text}] if as_messages else text


def rm_plan(raw, uniq, args, rank, world):
    """(run, batches, keys): pairs of a row's distinct texts as RewardDataset items (an odd count reuses text 0);
    ``run(batch)`` gives part-file records, ``keys(batch)`` the (row, text) rewards it produces."""
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
    model, tok = io.load_reward_model(args.target, args.attn_implementation,
                                      use_fast=not data.disable_fast_tokenizer)
    rm_data = SimpleNamespace(**{**vars(data), "chosen_key": _C, "rejected_key": _R})
    ds = io.reward_dataset(Dataset.from_list(rows), tok, rm_data, is_dpo=False)
    if len(ds) != len(items):
        io._fail(f"internal: RewardDataset kept {len(ds)} of {len(items)} items")
    score = io.rm_scorer(model, tok, ds)

    def run(batch):
        c, r = score(batch)
        io._check_finite({"reward": (c, r)}, [items[x][0] for x in batch])
        return [{"i": items[x][0], str(items[x][1]): cv, str(items[x][2]): rv}
                for x, cv, rv in zip(batch, c.tolist(), r.tolist())]

    keys = lambda batch: [(items[x][0], k) for x in batch for k in items[x][1:]]
    return run, io.plan_batches(io._lengths(ds, rank, world), args.batch_size), keys


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
            io._fail(f"--reward {args.reward} returned something that is not a list of floats ({e})")
        if len(got) != len(batch):
            io._fail(f"--reward {args.reward} returned {len(got)} rewards for {len(batch)} responses")
        bad = sorted({units[u][0] for u, x in zip(batch, got) if not math.isfinite(x)})
        if bad:
            io._fail(f"non-finite reward (nan/inf) from {args.reward} for {len(bad)} input row(s) (0-based): "
                  f"{bad[:10]}{' ...' if len(bad) > 10 else ''}")
        return [{"i": units[u][0], str(units[u][1]): x} for u, x in zip(batch, got)]

    batches = [list(range(k, min(k + args.batch_size, len(units)))) for k in range(0, len(units), args.batch_size)]
    return run, batches, lambda batch: [units[u] for u in batch]


def fingerprint(args, n_rows: int) -> str:
    stamp = lambda p: [str(Path(p).resolve()), io._file_stamp(p)] if p and os.path.exists(p) else p
    if args.kind == "rm":
        target = stamp(args.target)
    else:
        spec = importlib.util.find_spec(args.target[0])
        target = [args.target, stamp(spec.origin if spec else None)]
    items = {"input": stamp(args.input), "rows": n_rows, "reward": target, "data_args": vars(args.data),
             "batch_size": args.batch_size, "attn": args.attn_implementation, "samples_key": args.samples_key}
    return hashlib.sha256(json.dumps(items, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------------ main
def main(argv=None) -> None:
    args = parse_args(argv)
    if args.kind == "rm":  # as score_margins: CPU shims, then the host check
        from po_plugins import _cpu
        from po_plugins.hosts import openrlhf as host

        _cpu.apply_cpu_shims()
        try:
            host.check_host()
        except host.HostError as e:
            io._fail(str(e))
    from tqdm import tqdm

    rank, world = io._init_dist()
    say = (lambda *m: print("po_plugins:", *m, file=sys.stderr, flush=True)) if rank == 0 else (lambda *m: None)
    raw = io.load_pairs(SimpleNamespace(dataset=args.input, dataset_split=args.data.dataset_split))
    for flag, key in (("--data.prompt_key", args.data.prompt_key), ("--samples_key", args.samples_key)):
        if key not in raw.column_names:
            io._fail(f"{args.input} has no column '{key}' (set {flag}); its columns: {raw.column_names}")
    samples = raw[args.samples_key]
    for i, s in enumerate(samples):
        if not isinstance(s, list) or not s or not all(isinstance(x, str) for x in s):
            io._fail(f"input row {i}: '{args.samples_key}' must be a non-empty list of strings")
    n = len(raw)
    uniq = [distinct(s)[0] for s in samples]

    run, batches, keys = rm_plan(raw, uniq, args, rank, world) if args.kind == "rm" else fn_plan(raw, uniq, args)
    fp = fingerprint(args, n)
    done = io.start_parts(args.output, fp, args.resume, rank, world)
    if args.resume:
        say(f"resuming: {len(done)} of {n} rows have checkpointed rewards")
    todo = [b for k, b in enumerate(batches)
            if k % world == rank and not all(str(t) in done.get(i, {}) for i, t in keys(b))]
    bar = tqdm(total=len(todo), unit="batch", desc="rewarding samples", disable=rank != 0, dynamic_ncols=True)
    io.checkpointed_loop(todo, run, args.output, fp, rank, world, args.checkpoint_every, STOP_ENV, bar,
                         size=lambda batch: 1)

    if rank == 0:
        done = io.read_parts(args.output, fp)
        rewards = []
        for i in range(n):
            got = done.get(i, {})
            per_text = [got.get(str(k)) for k in range(len(uniq[i]))]
            if any(x is None for x in per_text):
                io._fail(f"internal: no reward for input row {i} after scoring")
            rewards.append([per_text[uniq[i].index(s)] for s in samples[i]])
        write_pairs(raw, samples, rewards, args, say)
        for path in io.part_files(args.output):
            os.remove(path)
    io._barrier(world)
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()


def write_pairs(raw, samples, rewards, args, say) -> None:
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
    io.write_output(out, cols, args.output)
    margins = cols["reward_margin"]
    say(f"wrote {len(keep)} pairs ({args.pairing}) from {len(raw)} rows to {args.output}; {ties} row(s) without a "
        f"preference {'dropped' if args.ties == 'drop' else 'kept with margin 0'}; mean reward_margin "
        f"{sum(margins) / max(len(margins), 1):.4f}")


if __name__ == "__main__":
    main()
