"""What the plugin costs per DPO step, against the stock OpenRLHF step measured in the same run.

    python benchmarks/overhead.py [--quick] [--reps 5] [--steps 8]

A. The real CLIs on CPU, interleaved, median over reps: stock `openrlhf.cli.train_dpo` against
   `po_plugins.cli.train_dpo --loss rc_dpo` (monitor on, default settings: exact head statistics on every
   micro-batch) and against `--loss dpo --po.monitor` (the monitor alone).
   Step time = wall time of a whole optimizer step: between consecutive step boundaries, all its micro-batches
   included (first step dropped);
   peak memory = the training loop's peak RSS above the RSS when training starts (VmHWM after a reset).
B. The authors' way of getting the head scores (two extra torch.autograd.grad calls on the head weight per
   micro-batch) cannot run inside DeepSpeed 0.19's engine (it rejects autograd.grad through its graph at ZeRO
   0-2), so it is timed on a plain-torch replica of the same step (same model, batch, AdamW) beside the stock
   replica step and the closed-form statistics.
The model has a 32k vocabulary and a head share of the FLOPs like a ~0.1-0.5B model. The last line is one JSON
object: step_time_ratio, peak_mem_ratio, monitor_step_time_ratio, autograd_step_time_ratio, ...
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


# ---- child: one training run with step timing ---------------------------------------------------------------
def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak() -> int:
    """Reset this process's RSS high-water mark (VmHWM) and return the RSS now: where a training loop starts."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _rss("VmRSS:")


def child(mode: str, out: str, argv: list[str]) -> None:
    import runpy

    if mode == "stock":
        from po_plugins.hosts.openrlhf import prepare_process

        prepare_process()
        rest = argv
    else:
        from po_plugins.cli.train_dpo import prepare

        rest = prepare(argv)
    from openrlhf.utils.deepspeed.deepspeed import DeepspeedStrategy

    stamps, cpu, base = [], [], {}
    original_step, original_backward = DeepspeedStrategy.optimizer_step, DeepspeedStrategy.backward

    def backward(self, *a, **kw):
        if not base:  # first micro-batch: reset the high-water mark, remember where training starts
            base["rss"] = reset_peak()
        return original_backward(self, *a, **kw)

    def optimizer_step(self, *a, **kw):
        r = original_step(self, *a, **kw)
        stamps.append(time.perf_counter())
        cpu.append(time.process_time())
        return r

    DeepspeedStrategy.backward, DeepspeedStrategy.optimizer_step = backward, optimizer_step
    sys.argv = ["openrlhf.cli.train_dpo", *rest]
    runpy.run_module("openrlhf.cli.train_dpo", run_name="__main__", alter_sys=True)
    Path(out).write_text(json.dumps({"stamps": stamps, "cpu": cpu, "peak": _rss("VmHWM:") - base.get("rss", 0)}))


# ---- parent --------------------------------------------------------------------------------------------------
def build(root: Path, quick: bool, steps: int):
    from po_plugins.tiny import make_model, make_pairs

    kw = dict(vocab_size=4096, hidden_size=64, layers=2) if quick else dict(vocab_size=32768, hidden_size=256,
                                                                              layers=24)
    model = make_model(root / "model", **kw)
    data = make_pairs(root / "pairs.jsonl", n=2 * steps)
    return model, data


def flags(model, data, out, accum) -> list[str]:
    return ["--model.model_name_or_path", str(model), "--data.dataset", str(data), "--data.prompt_key", "prompt",
            "--data.chosen_key", "chosen", "--data.rejected_key", "rejected", "--data.max_len", "64",
            "--train.micro_batch_size", "1", "--train.batch_size", str(accum), "--train.max_epochs", "1",
            "--ds.attn_implementation", "eager", "--ds.zero_stage", "2", "--ds.param_dtype", "bf16",
            "--ckpt.output_dir", str(out), "--ckpt.disable_ds", "--lr_warmup_ratio", "0"]


MODES = {"stock": [], "rc_dpo": ["--loss", "rc_dpo"], "dpo_monitor": ["--loss", "dpo", "--po.monitor"],
         # every step a re-check: the re-scores, the probe prediction's forward and vocabulary pass (default: 1 in 10)
         "rc_dpo_recheck1": ["--loss", "rc_dpo", "--po.recheck_every", "1"]}


def run_mode(mode, model, data, work, accum):
    from po_plugins.tiny import run_module

    out = work / f"{mode}.json"
    args = ["--child", "stock" if mode == "stock" else "plugin", "--child_out", out, "--",
            *MODES[mode], *flags(model, data, work / f"ckpt_{mode}", accum)]
    res = run_module("benchmarks.overhead", args, ROOT, env_extra={"OMP_NUM_THREADS": str(os.cpu_count() or 1)},
                     timeout=1800)
    if res.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{res.stderr[-3000:]}")
    r = json.loads(out.read_text())
    return statistics.median(step_times(r["stamps"], accum)), r["peak"], statistics.median(step_times(r["cpu"], accum))


def step_times(stamps: list[float], accum: int) -> list[float]:
    """Whole optimizer steps from the stamps OpenRLHF's strategy.optimizer_step leaves after every micro-batch (the
    engine steps on every `accum`-th): the time between consecutive step boundaries, each covering the step's
    `accum` forwards and backwards, the plugin's per-step work and the optimizer step (the first step dropped)."""
    ends = stamps[accum - 1::accum]
    return [b - a for a, b in zip(ends, ends[1:])]


def replica(quick: bool, reps: int) -> dict:
    """Plain-torch step: policy fwd+bwd, reference fwd, AdamW; plus closed-form or autograd head scores."""
    import torch

    from po_plugins.losses import PairBatch, build
    from po_plugins.scores import head_score_stats

    torch.manual_seed(0)
    from transformers import LlamaConfig, LlamaForCausalLM

    h, L, V = (64, 2, 4096) if quick else (256, 24, 32768)
    cfg = LlamaConfig(vocab_size=V, hidden_size=h, intermediate_size=2 * h, num_hidden_layers=L,
                      num_attention_heads=4, num_key_value_heads=4)
    pol, ref = LlamaForCausalLM(cfg), LlamaForCausalLM(cfg)
    ref.load_state_dict(pol.state_dict())
    opt = torch.optim.AdamW(pol.parameters(), lr=1e-5)
    T = 48
    ids = torch.randint(0, V, (2, T))
    mask = torch.ones(2, T - 1, dtype=torch.bool)
    mask[:, :16] = False
    loss_fn = build("dpo")
    W = pol.get_output_embeddings().weight
    cache = {}
    pol.get_output_embeddings().register_forward_hook(lambda m, i, o: cache.update(h=i[0].detach(), lg=o.detach()))

    def logps(model, x):
        lg = model(x).logits[:, :-1].float()
        return (lg.log_softmax(-1).gather(-1, x[:, 1:, None]).squeeze(-1) * mask).sum(-1)

    def step(kind):
        z = logps(pol, ids)
        with torch.no_grad():
            zr = logps(ref, ids)
        if kind == "closed_form":
            head_score_stats(cache["h"][:, :-1], cache["lg"][:, :-1], ids[:, 1:], mask, torch.tensor([True, False]))
        elif kind == "autograd":
            torch.autograd.grad(z[:1].mean(), [W], retain_graph=True)
            torch.autograd.grad(z[1:].mean(), [W], retain_graph=True)
        loss = loss_fn(PairBatch(z[:1], z[1:], zr[:1], zr[1:])).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    kinds = ("stock", "closed_form", "autograd")
    for k in kinds:
        step(k)  # warm-up
    times = {k: [] for k in kinds}
    for _ in range(3 if quick else max(reps, 5)):
        for k in kinds:
            t0 = time.perf_counter()
            step(k)
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    head_share = h * V / (h * V + L * 10 * h * h)  # attention 4h², MLP 3·h·2h per layer
    return {"replica_step_s": med, "head_flop_share": head_share}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, one rep: checks the benchmark runs")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps per run (the first is dropped)")
    ap.add_argument("--accum", type=int, default=2, help="micro-batches per optimizer step")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES))
    ap.add_argument("--child", choices=["stock", "plugin"])
    ap.add_argument("--child_out")
    args, rest = ap.parse_known_args(argv)
    if args.child:
        child(args.child, args.child_out, [a for a in rest if a != "--"])
        return 0
    reps = 1 if args.quick else args.reps
    steps = 3 if args.quick else args.steps
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model, data = build(work, args.quick, steps * args.accum)
        modes = [m for m in MODES if m in args.modes.split(",")]
        res = {m: {"step": [], "peak": [], "cpu": []} for m in modes}
        for rep in range(reps):
            for mode in modes:  # interleaved: drift hits every mode alike
                t, peak, c = run_mode(mode, model, data, work, args.accum)
                res[mode]["step"].append(t)
                res[mode]["peak"].append(peak)
                res[mode]["cpu"].append(c)
                print(f"rep {rep + 1}/{reps} {mode:>13}: step {t:.3f} s (CPU {c:.3f} s), peak +{peak / 2**20:.1f} MiB",
                      flush=True)
    med = {m: {k: statistics.median(v) for k, v in r.items()} for m, r in res.items()}
    # each repetition's ratio to the stock run just before it (drift between repetitions cancels), median over reps;
    # and the same on process CPU time, which time the VM's other tenants take from this process does not inflate
    paired = {m: statistics.median(a / b for a, b in zip(res[m]["step"], res["stock"]["step"])) for m in modes}
    paired_cpu = {m: statistics.median(a / b for a, b in zip(res[m]["cpu"], res["stock"]["cpu"])) for m in modes}
    if modes != list(MODES):  # a subset (--modes): each mode's ratios to stock, and each repetition's
        print(json.dumps({**{f"{m}_paired_step_time_ratio": paired[m] for m in modes},
                          **{f"{m}_step_time_ratio": med[m]["step"] / med["stock"]["step"] for m in modes},
                          **{f"{m}_per_rep_ratios": [a / b for a, b in zip(res[m]["step"], res["stock"]["step"])]
                             for m in modes}, "stock_step_s": med["stock"]["step"], "reps": reps}))
        return 0
    rep_ = replica(args.quick, reps)
    rs = rep_["replica_step_s"]
    out = {
        "step_time_ratio": med["rc_dpo"]["step"] / med["stock"]["step"],
        "peak_mem_ratio": med["rc_dpo"]["peak"] / max(med["stock"]["peak"], 1),
        "monitor_step_time_ratio": med["dpo_monitor"]["step"] / med["stock"]["step"],
        "monitor_peak_mem_ratio": med["dpo_monitor"]["peak"] / max(med["stock"]["peak"], 1),
        # a re-check (re-scores, probe prediction) on every step; the default recheck_every 10 pays a tenth of the extra
        "recheck_every_step_time_ratio": med["rc_dpo_recheck1"]["step"] / med["stock"]["step"],
        "recheck_default_step_time_ratio": (0.9 * med["rc_dpo"]["step"] + 0.1 * med["rc_dpo_recheck1"]["step"])
        / med["stock"]["step"],
        "recheck_peak_mem_ratio": med["rc_dpo_recheck1"]["peak"] / max(med["stock"]["peak"], 1),
        "paired_step_time_ratio": paired["rc_dpo"], "paired_monitor_step_time_ratio": paired["dpo_monitor"],
        "paired_recheck_every_step_time_ratio": paired["rc_dpo_recheck1"],
        "cpu_step_time_ratio": paired_cpu["rc_dpo"], "cpu_monitor_step_time_ratio": paired_cpu["dpo_monitor"],
        "cpu_recheck_every_step_time_ratio": paired_cpu["rc_dpo_recheck1"],
        "cpu_recheck_default_step_time_ratio": 0.9 * paired_cpu["rc_dpo"] + 0.1 * paired_cpu["rc_dpo_recheck1"],
        "autograd_step_time_ratio": rs["autograd"] / rs["stock"],
        "replica_closed_form_step_time_ratio": rs["closed_form"] / rs["stock"],
        "stock_step_s": med["stock"]["step"], "head_flop_share": rep_["head_flop_share"],
        "reps": reps, "quick": args.quick,
    }
    print(f"\nmedian step: stock {med['stock']['step']:.3f} s, rc_dpo {med['rc_dpo']['step']:.3f} s, "
          f"dpo + monitor {med['dpo_monitor']['step']:.3f} s, rc_dpo re-checking every step "
          f"{med['rc_dpo_recheck1']['step']:.3f} s")
    print(f"replica step: stock {rs['stock']:.3f} s, closed form {rs['closed_form']:.3f} s, "
          f"authors' autograd {rs['autograd']:.3f} s")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
