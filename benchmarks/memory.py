"""Peak memory and step time of `--po.fused_head` against the stock OpenRLHF DPO step, measured in the same run.

    python benchmarks/memory.py [--quick] [--reps 3] [--steps 5]

The real CLIs on CPU, interleaved per repetition (stock, then the plugin modes), median over repetitions, with
the measurement of benchmarks/overhead.py (its child process): step time = wall time of a whole optimizer step, all
its micro-batches included (first step dropped); peak memory = the training loop's peak RSS above the RSS when
training starts (VmHWM reset at the first micro-batch), the CPU analogue of torch.cuda.max_memory_allocated.

Modes: stock `openrlhf.cli.train_dpo`; `--loss rc_dpo --po.fused_head` (RC and the monitor on: the statistics come
from the chunked head's input and the head weight); `--loss dpo --po.fused_head`; the same two with
`--po.share_prompt` (each pair on one row, its prompt computed once; the chunked head); rc_dpo with stored reference
log-probs (`score_margins --ref_model`, then `--po.ref_logp_keys`: no reference forward). `--modes` picks a subset.
Shapes (`SHAPES`): a 32k vocabulary with medium responses, a 128k-class vocabulary with long responses, and a
prompt-heavy shape (~2,030-token prompts, ~240-token responses), scaled to fit a 2-core, 24 GiB machine. The last
line printed is one JSON object: per shape, the ratios to stock and the logits bytes the stock step materialises
(policy fp32 logits, their gradient, the reference's fp32 logits).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name: (vocab, hidden, layers, pairs per micro-batch, answer sentences per response, max_len, context sentences
# before each prompt: ~14.5 tokens a sentence with the tiny tokenizer)
SHAPES = {
    "v32k_medium": (32768, 256, 4, 2, 12, 320, 0),
    "v128k_long": (131072, 256, 2, 2, 90, 1024, 0),
    "prompt_heavy": (32768, 256, 6, 1, 16, 2400, 138),  # ~2,030-token prompts, ~240-token responses
}
QUICK = {"quick": (8192, 64, 2, 1, 4, 128, 3)}
REF_KEYS = "ref_chosen_logp,ref_rejected_logp"
MODES = {"stock": [], "rc_dpo_fused": ["--loss", "rc_dpo", "--po.fused_head"],
         "dpo_fused": ["--loss", "dpo", "--po.fused_head"],
         "rc_dpo_share": ["--loss", "rc_dpo", "--po.share_prompt"],
         "dpo_share": ["--loss", "dpo", "--po.share_prompt"],
         # stored reference log-probs (score_margins --ref_model): the reference forward skipped
         "rc_dpo_fused_storedref": ["--loss", "rc_dpo", "--po.fused_head", "--po.ref_logp_keys", REF_KEYS],
         "rc_dpo_share_storedref": ["--loss", "rc_dpo", "--po.share_prompt", "--po.ref_logp_keys", REF_KEYS]}
if os.environ.get("PO_MEMORY_EXTRA_MODES"):  # exploration: e.g. '{"dpo": ["--loss", "dpo"]}'
    MODES.update(json.loads(os.environ["PO_MEMORY_EXTRA_MODES"]))


def build(root: Path, shape, n: int):
    """A tiny-depth Llama with the shape's vocabulary, and pairs whose responses are `sentences` answers long."""
    import random

    from po_plugins.tiny import NEGATIVE, POSITIVE, _answer, make_model, pair_rows

    V, hidden, layers, _, sentences, max_len, context = shape
    model = make_model(root / "model", vocab_size=V, hidden_size=hidden, layers=layers, max_positions=max_len + 8)
    rng = random.Random(0)
    rows = pair_rows(n)
    for r in rows:
        topic = r["prompt"].split()[-1].strip("?.")
        if context:  # a long context before the question (retrieved text, a system prompt, earlier turns)
            text = " ".join(_answer(rng, topic, POSITIVE + NEGATIVE) for _ in range(context))
            r["prompt"] = f"{text} {r['prompt']}"
        r["chosen"] = " ".join(_answer(rng, topic, POSITIVE) for _ in range(sentences))
        r["rejected"] = " ".join(_answer(rng, topic, NEGATIVE) for _ in range(sentences))
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model, data


def stored_refs(work: Path, model: Path, data: Path, shape) -> Path:
    """The pairs with their reference log-probs, as a user makes them: `po_plugins.cli.score_margins --ref_model`
    (OpenRLHF's own dataset, collator and concatenated_forward, bf16 weights), here with a reward model at its
    initialisation (its margins are not used; the benchmark needs the reference columns only)."""
    from po_plugins.tiny import run_module

    rm, out = work / "rm", work / "pairs_ref.jsonl"
    res = run_module("benchmarks.memory", ["--make_rm", model, rm], ROOT, timeout=3600)
    if res.returncode != 0:
        raise SystemExit(f"reward model failed:\n{res.stderr[-3000:]}")
    res = run_module("po_plugins.cli.score_margins", [
        "--model", rm, "--ref_model", model, "--data.dataset", data, "--data.prompt_key", "prompt",
        "--data.max_len", shape[5], "--output", out, "--batch_size", 2], ROOT, timeout=3600)
    if res.returncode != 0:
        raise SystemExit(f"score_margins failed:\n{res.stderr[-3000:]}")
    return out


def make_rm(model: str, out: str) -> None:
    """An OpenRLHF reward model (value head at its initialisation) on the benchmark's model, for score_margins."""
    from po_plugins._cpu import apply_cpu_shims

    apply_cpu_shims()
    import torch
    from openrlhf.models import get_llm_for_sequence_regression
    from transformers import AutoTokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        rm = get_llm_for_sequence_regression(model, "reward", param_dtype="bf16", attn_implementation="eager",
                                             init_value_head=True)
    rm.config.value_head_prefix = "score"
    rm.save_pretrained(out)
    AutoTokenizer.from_pretrained(model).save_pretrained(out)


def flags(model, data, out, shape, accum) -> list[str]:
    micro, max_len = shape[3], shape[5]
    return ["--model.model_name_or_path", str(model), "--data.dataset", str(data), "--data.prompt_key", "prompt",
            "--data.chosen_key", "chosen", "--data.rejected_key", "rejected", "--data.max_len", str(max_len),
            "--train.micro_batch_size", str(micro), "--train.batch_size", str(micro * accum), "--train.max_epochs",
            "1", "--ds.attn_implementation", "sdpa", "--ds.zero_stage", "2", "--ds.param_dtype", "bf16",
            "--ckpt.output_dir", str(out), "--ckpt.disable_ds", "--lr_warmup_ratio", "0"]


def run_mode(mode, model, data, work, shape, accum, ref_data: Path | None = None):
    """One mode's child run; the modes with stored reference log-probs read `ref_data` (stored_refs' file)."""
    from po_plugins.tiny import run_module

    if "--po.ref_logp_keys" in MODES[mode]:
        data = ref_data

    out = work / f"{mode}.json"
    args = ["--child", "stock" if mode == "stock" else "plugin", "--child_out", out, "--",
            *MODES[mode], *flags(model, data, work / f"ckpt_{mode}", shape, accum)]
    # a fixed glibc mmap threshold: freed large buffers go back to the OS, so the RSS high-water mark follows the
    # live tensors (glibc otherwise raises the threshold after the first large free and keeps later ones in its heap)
    env = {"OMP_NUM_THREADS": str(os.cpu_count() or 1), "MALLOC_MMAP_THRESHOLD_": "131072"}
    res = run_module("benchmarks.overhead", args, ROOT, env_extra=env, timeout=3600)
    if res.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{res.stderr[-3000:]}")
    r = json.loads(out.read_text())
    import sys

    sys.path.insert(0, str(ROOT))
    from benchmarks.overhead import step_times

    return statistics.median(step_times(r["stamps"], accum)), r["peak"]


def logits_bytes(shape) -> dict:
    """What the stock step holds for the logits of one micro-batch (2·pairs sequences of max_len tokens)."""
    V, _, _, micro, _, T, _ = shape
    n = 2 * micro * T * V
    return {"policy_fp32_logits_GiB": 4 * n / 2**30, "with_grad_and_reference_GiB": 3 * 4 * n / 2**30}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one small shape, one rep: checks the benchmark runs")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5, help="optimizer steps per run (the first is dropped)")
    ap.add_argument("--accum", type=int, default=2, help="micro-batches per optimizer step")
    ap.add_argument("--shapes", default=None, help="comma-separated subset of " + ",".join(SHAPES))
    ap.add_argument("--modes", default=None, help="comma-separated subset of " + ",".join(MODES) + " (stock always)")
    ap.add_argument("--make_rm", nargs=2, metavar=("MODEL", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.make_rm:
        make_rm(*args.make_rm)
        return 0
    modes = ["stock", *[m for m in (args.modes.split(",") if args.modes else MODES) if m != "stock"]]
    for m in modes:
        if m not in MODES:
            ap.error(f"--modes: unknown mode {m!r}; modes: {', '.join(MODES)}")
    shapes = QUICK if args.quick else {k: SHAPES[k] for k in (args.shapes.split(",") if args.shapes else SHAPES)}
    reps = 1 if args.quick else args.reps
    steps = 3 if args.quick else args.steps
    out = {}
    for name, shape in shapes.items():
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            model, data = build(work, shape, steps * args.accum * shape[3])
            ref_data = (stored_refs(work, model, data, shape)
                        if any("--po.ref_logp_keys" in MODES[m] for m in modes) else None)
            res = {m: {"step": [], "peak": []} for m in modes}
            for rep in range(reps):
                for mode in modes:  # interleaved: drift hits every mode alike
                    t, peak = run_mode(mode, model, data, work, shape, args.accum, ref_data)
                    res[mode]["step"].append(t)
                    res[mode]["peak"].append(peak)
                    print(f"{name} rep {rep + 1}/{reps} {mode:>13}: step {t:.3f} s, peak +{peak / 2**20:.0f} MiB",
                          flush=True)
        med = {m: {k: statistics.median(v) for k, v in r.items()} for m, r in res.items()}
        s = med["stock"]
        out[name] = {"vocab": shape[0], "max_len": shape[5], "pairs_per_micro_batch": shape[3],
                     "stock_step_s": s["step"], "stock_peak_MiB": s["peak"] / 2**20,
                     **{f"{m}_{k}_ratio": med[m][k2] / max(s[k2], 1e-12) for m in modes if m != "stock"
                        for k, k2 in (("peak_mem", "peak"), ("step_time", "step"))},
                     **logits_bytes(shape)}
    print(json.dumps({"shapes": out, "reps": reps, "steps": steps, "quick": args.quick}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
