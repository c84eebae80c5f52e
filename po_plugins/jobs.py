"""The runtime of the dataset jobs: scoring pairs, generating samples, labelling them (what each computes:
`po_plugins/cli/score_margins.py`, `po_plugins/cli/generate.py`, `po_plugins/cli/label_pairs.py`).

A job reads a dataset, plans its work in batches, runs this process's share of the batches, checkpoints what it
finished in part files, and rank 0 merges the parts into one output file.

* Plan. `plan_batches` orders the items by length (longest first, ties by index) and cuts batches; batch k runs
  on rank k mod WORLD_SIZE (`my_batches`). The plan does not depend on the number of processes, so every item is
  computed in the same batch under 1 or N processes and the output is the same.
* Part files. Each rank appends `{"i": row, <column>: value, ...}` lines to its part file (`OUT.partial.jsonl` for
  rank 0, `OUT.partial.rank<r>.jsonl` for the others) after a header line `{"fingerprint": fp}`, where `fp`
  (`fingerprint`) hashes what the results depend on. `start_parts(resume=True)` reads the parts of an interrupted
  run back so the job can skip the batches they cover; a torn last line is skipped, and part files written for
  other inputs are refused.
* Output. `publish` writes every input row and column in input order plus the new columns atomically
  (`OUT.tmp-<pid>`, then `os.replace`): JSON lines for .jsonl/.json, parquet for .parquet; then it removes the
  part files.

Errors are the typed errors of `po_plugins.errors`. One deliberate exit: the testing aid of `checkpointed_loop`
(an environment variable asking for a stop after n batches) ends the process with status 3, as a crash would.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

from po_plugins.errors import DataError, OptionError

OUTPUT_SUFFIXES = (".jsonl", ".json", ".parquet")
ATTN_CHOICES = ("eager", "sdpa", "flash_attention_2")
# The --data.* options that format a prompt as OpenRLHF's datasets do, as {name: argparse keywords}; the flag is
# --data.<name>. Shared by the three job commands; a TRL / HF reward model refuses them (reward_models.hf_rm).
FORMAT_FLAGS = {
    "input_template": {"default": None},
    "apply_chat_template": {"action": "store_true", "default": False},
    "tokenizer_chat_template": {"default": None},
    "disable_fast_tokenizer": {"action": "store_true", "default": False},
}


# ------------------------------------------------------------------------------------------------------ options
def nest_options(parsed: dict) -> SimpleNamespace:
    """Parsed options ({dest: value}) as a namespace, the ``data.<name>`` ones nested as ``.data.<name>``."""
    data = SimpleNamespace(**{k[5:]: v for k, v in parsed.items() if k.startswith("data.")})
    return SimpleNamespace(**{k: v for k, v in parsed.items() if not k.startswith("data.")}, data=data)


def check_job_options(output, batch_size, checkpoint_every: int) -> None:
    """The options every job shares: ``batch_size`` (None: a default chosen later) and ``checkpoint_every`` >= 1, an
    output file type that `write_output` writes. Raises OptionError."""
    if checkpoint_every < 1 or (batch_size is not None and batch_size < 1):
        raise OptionError("--batch_size and --checkpoint_every must be >= 1")
    if Path(output).suffix.lower() not in OUTPUT_SUFFIXES:
        raise OptionError(f"--output must end in one of {', '.join(OUTPUT_SUFFIXES)}, got {output}")


def check_input_template(data, command: str) -> None:
    """OpenRLHF's rule for ``data.input_template`` without '{}': a warning, and no template (as
    ``openrlhf.cli.<command>`` does, so the formatted text matches that command's)."""
    if data.input_template and "{}" not in data.input_template:
        print(f"[Warning] '{{}}' not in --data.input_template, set to None (as openrlhf.cli.{command} does)",
              file=sys.stderr)
        data.input_template = None


def require_columns(columns, keys: dict, source: str = "the dataset") -> None:
    """DataError unless every key of ``keys`` ({flag: column or None}) is one of ``columns``."""
    for flag, key in keys.items():
        if key is not None and key not in columns:
            raise DataError(f"{source} has no column '{key}' (set {flag} to the right column); its columns: "
                            f"{columns}", column=key)


# ---------------------------------------------------------------------------------------------------- input
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


def load_rows(data):
    """The raw dataset (all rows, all columns), loaded by OpenRLHF's ``blending_datasets`` as its train_rm /
    train_dpo load it.

    Args:
        data: ``.dataset`` (files or folders, comma-separated: concatenated) and ``.dataset_split``.
    """
    from openrlhf.datasets.utils import blending_datasets

    return blending_datasets(data.dataset, None, DataStrategy(data), dataset_split=data.dataset_split)


# ------------------------------------------------------------------------------------------ devices, processes
def default_device():
    """This process's device: ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def init_dist() -> tuple:
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


def barrier(world: int) -> None:
    """Wait for every rank (nothing to wait for in one process)."""
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def finish_dist(world: int) -> None:
    """The end of a job: the ranks meet, and the process group of a multi-process run is destroyed."""
    barrier(world)
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()


def rank0_say(rank: int):
    """A ``say(*parts)`` that prints ``po_plugins: ...`` to stderr on rank 0 and nothing elsewhere."""
    if rank == 0:
        return lambda *m: print("po_plugins:", *m, file=sys.stderr, flush=True)
    return lambda *m: None


def progress(total: int, enabled: bool, unit: str, desc: str):
    """A tqdm bar (disabled: a silent one with the same methods)."""
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, desc=desc, disable=not enabled, dynamic_ncols=True)


# ------------------------------------------------------------------------------------------------------ planning
def plan_batches(lengths, batch_size: int, bucket: bool = True) -> list:
    """Batches of item indices: by decreasing length (ties by index) when ``bucket``, else in item order."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)) if bucket else list(range(len(lengths)))
    return [order[k:k + batch_size] for k in range(0, len(order), batch_size)]


def my_batches(batches: list, rank: int, world: int, finished=None) -> list:
    """This rank's share of a plan (batch k runs on rank k mod ``world``), less the batches for which
    ``finished(batch)`` is true (checkpointed by an interrupted run)."""
    return [b for k, b in enumerate(batches) if k % world == rank and not (finished and finished(b))]


def gather_lengths(length_of, n: int, rank: int, world: int) -> list:
    """The lengths of items 0..n-1: each rank computes ``length_of(items)`` for a stride, the results are
    all-gathered, so every rank has the whole list."""
    mine = length_of(list(range(rank, n, world)))
    if world == 1:
        return mine
    import torch.distributed as dist

    parts = [None] * world
    dist.all_gather_object(parts, mine)
    out = [0] * n
    for r, part in enumerate(parts):
        out[r::world] = part
    return out


def check_finite(named: dict, rows: list) -> None:
    """DataError naming the input rows when a score is nan/inf.

    Args:
        named: {what: (chosen scores, rejected scores)}, tensors with one value per item of the batch.
        rows: the input row of each item of the batch.
    """
    import torch

    for what, (c, r) in named.items():
        bad = sorted({rows[k] for k in (~torch.isfinite(c) | ~torch.isfinite(r)).nonzero().flatten().tolist()})
        if bad:
            raise DataError(f"non-finite {what} (nan/inf) for {len(bad)} pair(s) of a batch; input rows (0-based): "
                            f"{bad[:10]}{' ...' if len(bad) > 10 else ''}. Check the model weights (and "
                            "--data.max_len).")


# --------------------------------------------------------------------------------------------------- fingerprints
def file_stamp(path) -> list:
    """[name, size, mtime_ns] of the file at ``path``, or of each file directly in the folder at ``path``."""
    out = []
    for p in sorted(Path(path).iterdir()) if Path(path).is_dir() else [Path(path)]:
        if p.is_file():
            st = p.stat()
            out.append([p.name, st.st_size, st.st_mtime_ns])
    return out


def path_stamp(path):
    """[resolved path, file_stamp] of an existing path; anything else (a hub name, None) stands for itself."""
    return [str(Path(path).resolve()), file_stamp(path)] if path and os.path.exists(path) else path


def data_stamp(dataset: str) -> list:
    """`path_stamp` of each comma-separated entry of a dataset option (the part before an '@')."""
    return [path_stamp(d.strip().split("@")[0]) for d in str(dataset).split(",")]


def fingerprint(items: dict) -> str:
    """16 hex digits of the SHA-256 of ``items`` (JSON, sorted keys): the header of a job's part files."""
    return hashlib.sha256(json.dumps(items, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------- part files
def part_path(output, rank: int) -> str:
    """The part file of ``rank``: ``OUT.partial.jsonl`` (rank 0), ``OUT.partial.rank<r>.jsonl``."""
    return f"{output}.partial.jsonl" if rank == 0 else f"{output}.partial.rank{rank}.jsonl"


def part_files(output) -> list:
    """The part files of ``output`` that exist, every rank's, sorted."""
    return sorted(set(glob.glob(glob.escape(str(output)) + ".partial.jsonl")
                      + glob.glob(glob.escape(str(output)) + ".partial.rank*.jsonl")))


def append_part(path, fp: str, lines: list) -> None:
    """Append ``lines`` to a part file (the fingerprint header first when it is new), flushed to disk."""
    new = not os.path.exists(path)
    with open(path, "a", encoding="utf-8") as f:
        if new:
            f.write(json.dumps({"fingerprint": fp}) + "\n")
        f.write("".join(lines))
        f.flush()
        os.fsync(f.fileno())


def read_parts(output, fp: str, differs: str) -> dict:
    """{row: {column: value}} from every part file of ``output``.

    Args:
        fp: the fingerprint the parts must carry; a part file with another one raises DataError.
        differs: what the error says differs (the options that enter the fingerprint).
    """
    done = {}
    for path in part_files(output):
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
        try:
            head = json.loads(lines[0])
        except json.JSONDecodeError:
            head = {}
        if head.get("fingerprint") != fp:
            raise DataError(f"{path} was written for other inputs ({differs}); delete it or run without --resume")
        for line in lines[1:]:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # an interrupted write
            done.setdefault(rec.pop("i"), {}).update(rec)
    return done


def start_parts(output, fp: str, resume: bool, rank: int, world: int, differs: str) -> dict:
    """The checkpointed results of an interrupted run when ``resume`` (`read_parts`, which names ``differs`` when
    the parts are of other inputs), else {} after rank 0 removed stale part files; returns once every rank got
    there, so no rank appends before the others read."""
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    done = read_parts(output, fp, differs) if resume else {}
    if not resume and rank == 0:
        for path in part_files(output):
            os.remove(path)
    barrier(world)
    return done


def checkpointed_loop(todo: list, work, output, fp: str, rank: int, world: int, every: int, stop_env: str,
                      bar, size=len) -> None:
    """Run this rank's batches and checkpoint their records, then wait for every rank.

    Args:
        todo: this rank's batches (`my_batches`).
        work: ``work(batch) -> [record]``, each record a dict ``{"i": input row, column: value, ...}``.
        every: append the finished records to this rank's part file every ``every`` batches (and at the end).
        stop_env: an environment variable; ``stop_env=n`` (a testing aid) stops the process with status 3 after n
            batches, without flushing what is not yet checkpointed, as an interrupted run would.
        bar: a progress bar, advanced by ``size(batch)`` per batch and closed at the end.
    """
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
    barrier(world)


# --------------------------------------------------------------------------------------------------------- output
def write_output(raw, columns: dict, output) -> None:
    """Every row and column of ``raw`` (a datasets.Dataset) in order plus ``columns`` ({name: list}, replacing
    columns of the same name); atomic replace of ``output``."""
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


def publish(raw, columns: dict, output) -> None:
    """`write_output`, then the part files of ``output`` are removed (the job is done)."""
    write_output(raw, columns, output)
    for path in part_files(output):
        os.remove(path)


__all__ = [
    "OUTPUT_SUFFIXES", "ATTN_CHOICES", "FORMAT_FLAGS", "nest_options", "check_job_options", "check_input_template",
    "require_columns", "DataStrategy", "load_rows", "default_device", "init_dist", "barrier", "finish_dist",
    "rank0_say", "progress", "plan_batches", "my_batches", "gather_lengths", "check_finite", "file_stamp",
    "path_stamp", "data_stamp", "fingerprint", "part_path", "part_files", "append_part", "read_parts",
    "start_parts", "checkpointed_loop", "write_output", "publish",
]
