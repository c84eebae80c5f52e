"""Throughput of the MADPO stage-1.5 scorer: batched + length-bucketed vs one pair at a time (and unbucketed).

    .venv/bin/python benchmarks/score_margins.py [--quick] [--pairs 256] [--batch_size 16] [--reps 3]

Builds, offline, a small Llama reward model (hidden 64, 2 layers, the tiny BPE vocabulary) with an untrained
value head initialised as OpenRLHF's train_rm does (`get_llm_for_sequence_regression(init_value_head=True)`),
and pairs of varied length (1 to 8 answer sentences). Every mode scores the same RewardDataset with
`po_plugins.reward_models.openrlhf_rm.score_margins` (the scorer's core) on CPU, fp32; modes are interleaved within each
repetition and the median time is reported. The margins of all modes are checked to agree (1e-4).
The last line printed is one JSON object: {"batched_pairs_per_s", "single_pairs_per_s", "speedup"}.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_rm(root: Path) -> Path:
    """A tiny causal LM from po_plugins.tiny turned into an OpenRLHF reward model with a fresh value head."""
    import torch
    from openrlhf.models import get_llm_for_sequence_regression
    from transformers import AutoTokenizer

    from po_plugins.tiny import make_model

    base = make_model(root / "base", hidden_size=64, layers=2, heads=4, seed=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        rm = get_llm_for_sequence_regression(str(base), "reward", param_dtype="bf16", attn_implementation="eager",
                                             init_value_head=True, value_head_prefix="score")
    rm.config.value_head_prefix = "score"
    out = root / "rm"
    rm.save_pretrained(str(out), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(base)).save_pretrained(str(out))
    return out


def pair_rows(n: int, seed: int = 0) -> list:
    """Tiny pairs whose answers repeat 1..8 sentences, so lengths vary several-fold."""
    from po_plugins.tiny import pair_rows as base_rows

    rng = random.Random(seed)
    rows = []
    for row in base_rows(n, seed=seed):
        k = rng.randint(1, 8)
        rows.append({"prompt": row["prompt"], "chosen": " ".join([row["chosen"]] * k),
                     "rejected": " ".join([row["rejected"]] * rng.randint(1, 8))})
    return rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="64 pairs (a smoke run)")
    p.add_argument("--pairs", type=int, default=None)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--max_len", type=int, default=256)
    a = p.parse_args(argv)
    n = a.pairs or (64 if a.quick else 256)

    from po_plugins._cpu import apply_cpu_shims

    apply_cpu_shims()
    import torch
    from datasets import Dataset

    from po_plugins.reward_models.openrlhf_rm import item_lengths, load_reward_model, reward_dataset, score_margins

    with tempfile.TemporaryDirectory() as tmp:
        rm_dir = build_rm(Path(tmp))
        model, tok = load_reward_model(rm_dir, "eager", device=torch.device("cpu"))
        data = argparse.Namespace(prompt_key="prompt", chosen_key="chosen", rejected_key="rejected",
                                  input_template=None, apply_chat_template=False, tokenizer_chat_template=None,
                                  max_len=a.max_len)
        ds = reward_dataset(Dataset.from_list(pair_rows(n)), tok, data)
        lengths = item_lengths(ds, list(range(len(ds))))
        modes = {
            "batched, length-bucketed": dict(batch_size=a.batch_size, bucket=True),
            "batched, input order": dict(batch_size=a.batch_size, bucket=False),
            "one pair at a time": dict(batch_size=1, bucket=False),
        }
        times = {m: [] for m in modes}
        results = {}
        score_margins(model, tok, ds, batch_size=a.batch_size)  # warm-up
        for _ in range(a.reps):
            for mode, kw in modes.items():
                t0 = time.perf_counter()
                results[mode] = score_margins(model, tok, ds, **kw)
                times[mode].append(time.perf_counter() - t0)
    ref = torch.tensor(results["one pair at a time"])
    for mode, margins in results.items():
        err = (torch.tensor(margins) - ref).abs().max().item()
        assert err < 1e-4, f"{mode}: margins differ from one-at-a-time by {err}"

    rate = {m: n / statistics.median(t) for m, t in times.items()}
    print(f"\nscore_margins throughput: {n} pairs, tokens/pair {min(lengths)}..{max(lengths)}, batch {a.batch_size}, "
          f"CPU fp32, {torch.get_num_threads()} threads, median of {a.reps}")
    print(f"{'mode':<28}{'median s':>10}{'pairs/s':>10}{'vs single':>11}")
    single = rate["one pair at a time"]
    for m in modes:
        print(f"{m:<28}{statistics.median(times[m]):>10.3f}{rate[m]:>10.1f}{rate[m] / single:>10.2f}x")
    result = {"batched_pairs_per_s": round(rate["batched, length-bucketed"], 2),
              "single_pairs_per_s": round(single, 2),
              "speedup": round(rate["batched, length-bucketed"] / single, 3)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
