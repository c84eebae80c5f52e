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
``n_samples`` strings per row. Same I/O guarantees as ``po_plugins.cli.score_margins`` (the runtime of both is
``po_plugins/jobs.py``): units (row, sample) are planned in batches by decreasing prompt length, batch k runs on
rank k mod WORLD_SIZE, finished samples go to ``OUT.partial*.jsonl`` every ``--checkpoint_every`` batches, rank 0
writes OUT atomically; ``--resume`` skips the batches an interrupted run with the same inputs finished, and the
final file equals an uninterrupted run's. JSON lines for ``.jsonl``/``.json``, parquet for ``.parquet``.

Testing aid: PO_PLUGINS_GENERATE_STOP_AFTER=<n> exits with status 3 after n batches (a simulated crash).
"""

from __future__ import annotations

import argparse

from po_plugins import generation, jobs
from po_plugins.cli._common import user_errors
from po_plugins.generation import STOP_ENV

__all__ = ["STOP_ENV", "build_parser", "parse_args", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m po_plugins.cli.generate",
                                description="Sample n completions per prompt from a policy (vLLM or HF generate).")
    p.add_argument("--model", required=True, help="policy: an HF model folder (e.g. a train_dpo output)")
    p.add_argument("--data.dataset", dest="data.dataset", required=True,
                   help="prompts: a .json/.jsonl/.parquet/.csv/.arrow file or save_to_disk folder (comma: concat)")
    p.add_argument("--data.dataset_split", dest="data.dataset_split", default="train")
    p.add_argument("--data.prompt_key", dest="data.prompt_key", default="prompt")
    for name, kwargs in jobs.FORMAT_FLAGS.items():
        p.add_argument(f"--data.{name}", dest=f"data.{name}", **kwargs)
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
    p.add_argument("--attn_implementation", choices=jobs.ATTN_CHOICES, default=None,
                   help="hf backend (default: sdpa on CUDA, eager on CPU)")
    p.add_argument("--num_engines", type=int, default=1, help="vllm: >1 uses OpenRLHF's vLLM engines on Ray")
    p.add_argument("--tensor_parallel_size", type=int, default=1, help="vllm: GPUs per engine")
    p.add_argument("--gpu_memory_utilization", type=float, default=0.9, help="vllm")
    p.add_argument("--enforce_eager", action="store_true", help="vllm: no CUDA graphs (always on CPU)")
    p.add_argument("--max_model_len", type=int, default=None,
                   help="vllm: context length (default: longest prompt + max_new_tokens)")
    return p


def parse_args(argv=None):
    """The options as a namespace (``.data``: the ``--data.*`` ones, ``.sampling``: a checked Sampling)."""
    args = jobs.nest_options(vars(build_parser().parse_args(argv)))
    with user_errors():
        args.sampling = generation.sampling_options(args)
        jobs.check_job_options(args.output, args.batch_size, args.checkpoint_every)
    jobs.check_input_template(args.data, "train_dpo")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    with user_errors():
        generation.generate_file(args)


if __name__ == "__main__":
    main()
