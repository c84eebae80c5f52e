"""MADPO stage 1.5: score preference pairs with a trained OpenRLHF reward model; write r(chosen) − r(rejected).

    python -m po_plugins.cli.score_margins --model RM_DIR --data.dataset pairs.jsonl --output scored.jsonl \\
        [--data.prompt_key prompt] [--data.apply_chat_template] [--data.max_len 512] [--margin_key rm_margin] \\
        [--batch_size 16] [--resume] [--ref_model SFT_DIR]
    torchrun --nproc_per_node 8 -m po_plugins.cli.score_margins ...   (the same file: every pair in the same batch)

Then train with `po_plugins.cli.train_dpo --loss madpo --po.margin_key rm_margin --data.dataset scored.jsonl`.

Exactness. Pairs are formatted by OpenRLHF's own `RewardDataset(is_dpo=False)` with the `--data.*` flags of
stage 1 (prompt/chosen/rejected keys, input template, chat template, max_len, the EOS appended and forced
after truncation), batched with its `collate_fn` (left padding) and scored through the stock
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
stock `DPOTrainer.concatenated_forward`/`_get_batch_logps`, in fp32 (training computes them at
`--ds.param_dtype`). Rows that DPO formatting drops (prompt ≥ max_len − 2 tokens) get null there.

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
                                description="Score preference pairs with an OpenRLHF reward model (MADPO stage 1.5).")
    p.add_argument("--model", required=True, help="reward-model folder saved by (po_plugins|openrlhf).cli.train_rm")
    p.add_argument("--data.dataset", dest="data.dataset", required=True,
                   help="pairs: .json/.jsonl/.parquet/.csv/.arrow file, save_to_disk folder (comma-separated: concat)")
    p.add_argument("--data.dataset_split", dest="data.dataset_split", default="train")
    p.add_argument("--data.prompt_key", dest="data.prompt_key", default=None)
    p.add_argument("--data.chosen_key", dest="data.chosen_key", default="chosen")
    p.add_argument("--data.rejected_key", dest="data.rejected_key", default="rejected")
    add_format_flags(p)
    p.add_argument("--data.max_len", dest="data.max_len", type=int, default=512)
    p.add_argument("--output", required=True, help="output file: .jsonl, .json (JSON lines) or .parquet")
    p.add_argument("--margin_key", default="rm_margin", help="name of the margin column (never 'margin')")
    p.add_argument("--batch_size", type=int, default=16, help="pairs per forward (2x sequences)")
    p.add_argument("--checkpoint_every", type=int, default=32, help="flush finished margins every K batches")
    p.add_argument("--resume", action="store_true", help="continue from OUT.partial*.jsonl of an interrupted run")
    p.add_argument("--ref_model", default=None, help="also write ref_chosen_logp/ref_rejected_logp (DPO reference)")
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


def load_ref_model(path, attn_implementation=None, device=None, use_fast=True):
    """(actor, tokenizer): OpenRLHF's Actor as train_dpo loads the reference (bf16; fp32 on CPU); right padding."""
    from openrlhf.models import Actor
    from openrlhf.utils import get_tokenizer

    device = default_device() if device is None else device
    attn = attn_implementation or ("flash_attention_2" if device.type == "cuda" else "eager")
    actor = Actor(str(path), attn_implementation=attn, param_dtype="bf16")
    if device.type == "cpu":
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


def main(argv=None) -> None:
    args = parse_args(argv)
    from po_plugins import _cpu
    from po_plugins.hosts import openrlhf as host

    _cpu.apply_cpu_shims()
    try:
        host.check_host()
    except host.HostError as e:
        _fail(str(e))
    import torch

    rank, world = _init_dist()
    say = (lambda *m: print("po_plugins:", *m, file=sys.stderr, flush=True)) if rank == 0 else (lambda *m: None)

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
        actor, ref_tok = load_ref_model(args.ref_model, args.attn_implementation, use_fast=use_fast)
        ref_ds = reward_dataset(raw, ref_tok, args.data, is_dpo=True)
        rows = dpo_rows(raw, ref_ds)
        if len(rows) < n:
            say(f"{n - len(rows)} row(s) have a prompt of >= max_len - 2 tokens; DPO drops them, their "
                f"{'/'.join(REF_COLUMNS)} are null")
        passes.append((REF_COLUMNS, ref_scorer(actor, ref_tok, ref_ds), rows,
                       plan_batches(_lengths(ref_ds, rank, world), args.batch_size)))

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
