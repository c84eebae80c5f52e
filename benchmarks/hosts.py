"""The same DPO step on each host, stock against the plugin, in one run: what each host costs and what the plugin
costs on each host.

    python benchmarks/hosts.py [--quick] [--reps 3] [--steps 8]

Modes, each a fresh process, interleaved per repetition, median over repetitions:
  trl_stock      TRL 1.16 `DPOTrainer` (its own fused LM head: no logits are materialised)
  trl_rc_dpo     `po_plugins.trl.PoDPOTrainer` with `po_loss="rc_dpo"` (RC and the band monitor at their defaults)
  openrlhf_stock `openrlhf.cli.train_dpo`
  openrlhf_rc_dpo `po_plugins.cli.train_dpo --loss rc_dpo` (RC and the monitor at their defaults)
Same model (benchmarks/overhead.py's: Llama, hidden 256, 24 layers, vocabulary 32,768), same pairs, 1 pair per
micro-batch, 2 micro-batches per optimizer step, responses cut at 64 tokens, fp32 weights on TRL (the Trainer's CPU
default) and bf16 on OpenRLHF (its DeepSpeed default), so compare a host with itself; across hosts the numbers say
what each costs on this machine, not which is faster in general.
Step time: a whole optimizer step (first step dropped), median; peak memory: the training loop's peak RSS above the
RSS when training starts (VmHWM reset at the first step). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = ("trl_stock", "trl_rc_dpo", "openrlhf_stock", "openrlhf_rc_dpo")


def trl_child(mode: str, out: str, model: str, data: str, steps: int, accum: int, max_len: int) -> None:
    """One TRL run: stamps at every optimizer step's end (TrainerCallback), peak RSS over the start."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from benchmarks.overhead import _rss, reset_peak

    stamps, base = [], {}

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if not base:
                base["rss"] = reset_peak()
                stamps.append(time.perf_counter())  # the first step's start

        def on_step_end(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

    torch.manual_seed(0)
    rows = [json.loads(x) for x in Path(data).read_text().splitlines() if x.strip()]
    cfg = dict(output_dir=str(Path(out).parent / f"out_{mode}"), per_device_train_batch_size=1,
               gradient_accumulation_steps=accum, max_steps=steps, learning_rate=1e-6, logging_steps=1, report_to=[],
               use_cpu=True, bf16=False, save_strategy="no", seed=0, disable_tqdm=True, max_length=max_len,
               lr_scheduler_type="constant")
    policy = AutoModelForCausalLM.from_pretrained(model)
    ref = AutoModelForCausalLM.from_pretrained(model)
    tok = AutoTokenizer.from_pretrained(model)
    kw = dict(model=policy, ref_model=ref, train_dataset=Dataset.from_list(rows), processing_class=tok,
              callbacks=[Clock()])
    if mode == "trl_stock":
        from trl import DPOConfig, DPOTrainer

        trainer = DPOTrainer(args=DPOConfig(**cfg), **kw)
    else:
        from po_plugins.trl import PoDPOConfig, PoDPOTrainer

        trainer = PoDPOTrainer(args=PoDPOConfig(po_loss="rc_dpo", **cfg), **kw)
    trainer.train()
    Path(out).write_text(json.dumps({"ends": stamps, "peak": _rss("VmHWM:") - base.get("rss", 0)}))


def run_mode(mode: str, model: Path, data: Path, work: Path, steps: int, accum: int, max_len: int):
    """(median whole-step time, peak memory over start) of one fresh run of `mode`."""
    from po_plugins.tiny import run_module

    out = work / f"{mode}.json"
    env = {"OMP_NUM_THREADS": str(os.cpu_count() or 1)}
    if mode.startswith("trl"):
        args = ["--child", mode, "--child_out", out, "--model", model, "--data", data, "--steps", steps, "--accum",
                accum, "--max_len", max_len]
        res = run_module("benchmarks.hosts", args, ROOT, env_extra=env, timeout=3600)
    else:
        sys.path.insert(0, str(ROOT))
        from benchmarks.overhead import flags

        plugin = ["--loss", "rc_dpo"] if mode == "openrlhf_rc_dpo" else []
        args = ["--child", "plugin" if plugin else "stock", "--child_out", out, "--", *plugin,
                *flags(model, data, work / f"ckpt_{mode}", accum)]
        res = run_module("benchmarks.overhead", args, ROOT, env_extra=env, timeout=3600)
    if res.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{res.stderr[-3000:]}")
    r = json.loads(out.read_text())
    if "ends" in r:  # TRL: the step ends (the first entry is the first step's start)
        ends = r["ends"][1:]
        times = [b - a for a, b in zip(ends, ends[1:])]
    else:
        from benchmarks.overhead import step_times

        times = step_times(r["stamps"], accum)
    return statistics.median(times), r["peak"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, one rep: checks the benchmark runs")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps per run (the first is dropped)")
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--max_len", type=int, default=64)
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES))
    ap.add_argument("--child", choices=["trl_stock", "trl_rc_dpo"])
    ap.add_argument("--child_out")
    ap.add_argument("--model")
    ap.add_argument("--data")
    args = ap.parse_args(argv)
    if args.child:
        trl_child(args.child, args.child_out, args.model, args.data, args.steps, args.accum, args.max_len)
        return 0
    sys.path.insert(0, str(ROOT))
    from benchmarks.overhead import build

    reps = 1 if args.quick else args.reps
    steps = 3 if args.quick else args.steps
    modes = [m for m in MODES if m in args.modes.split(",")]
    res = {m: {"step": [], "peak": []} for m in modes}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model, data = build(work, args.quick, steps * args.accum)
        for rep in range(reps):
            for mode in modes:
                t, peak = run_mode(mode, model, data, work, steps, args.accum, args.max_len)
                res[mode]["step"].append(t)
                res[mode]["peak"].append(peak)
                print(f"rep {rep + 1}/{reps} {mode:>16}: step {t:.3f} s, peak +{peak / 2**20:.1f} MiB", flush=True)
    med = {m: {k: statistics.median(v) for k, v in r.items()} for m, r in res.items()}
    out = {}
    for host in ("trl", "openrlhf"):
        stock, plugin = f"{host}_stock", f"{host}_rc_dpo"
        if stock in med and plugin in med:
            out[f"{host}_plugin_step_time_ratio"] = med[plugin]["step"] / med[stock]["step"]
            out[f"{host}_plugin_paired_step_time_ratio"] = statistics.median(
                a / b for a, b in zip(res[plugin]["step"], res[stock]["step"]))
            out[f"{host}_plugin_peak_mem_ratio"] = med[plugin]["peak"] / max(med[stock]["peak"], 1)
    out.update({**{f"{m}_step_s": med[m]["step"] for m in modes},
                **{f"{m}_peak_MiB": med[m]["peak"] / 2**20 for m in modes},
                "reps": reps, "steps": steps, "quick": args.quick})
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
