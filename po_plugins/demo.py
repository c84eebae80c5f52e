"""`make demo`: a real OpenRLHF DPO run with --loss dpo and --loss rc_dpo on a tiny model made locally, then
the band report. Offline; about a minute on two CPU cores.

    python -m po_plugins.demo [--out runs/demo] [--pairs 64] [--epochs 2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from po_plugins.tiny import run_module


def run_cli(loss: str, assets: dict, out: Path, extra: list[str] | None = None) -> Path:
    run_dir = out / loss
    cmd = ["--loss", loss,
           "--model.model_name_or_path", str(assets["model"]), "--data.dataset", str(assets["train"]),
           "--eval.dataset", str(assets["eval"]), "--eval.split", "train",
           "--data.prompt_key", "prompt", "--data.chosen_key", "chosen", "--data.rejected_key", "rejected",
           "--data.max_len", "96", "--train.micro_batch_size", "4", "--train.batch_size", "8",
           "--ds.attn_implementation", "eager", "--ds.zero_stage", "2", "--ds.param_dtype", "bf16",
           "--adam.lr", "5e-3", "--lr_warmup_ratio", "0", "--model.beta", "0.1",
           "--ckpt.output_dir", str(run_dir), "--logger.tensorboard_dir", str(out / "tensorboard"),
           "--logger.wandb.run_name", loss, *(extra or [])]
    if not loss.startswith("rc_"):
        cmd.append("--po.monitor")
    print(f"[demo] po_plugins.cli.train_dpo --loss {loss} ... --ckpt.output_dir {run_dir}", flush=True)
    res = run_module("po_plugins.cli.train_dpo", cmd, out, timeout=3600)
    log = out / f"{loss}.log"
    log.write_text(res.stdout + res.stderr)
    rc = res.returncode
    if rc != 0:
        sys.stderr.write(log.read_text()[-4000:])
        raise SystemExit(f"[demo] the {loss} run failed (exit {rc}); full log: {log}")
    return run_dir


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="tiny offline OpenRLHF DPO vs RC-DPO run plus its band report")
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--pairs", type=int, default=96)
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args(argv)
    from po_plugins.report import load_trace, summarize
    from po_plugins.tiny import make_assets

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    assets = make_assets(out / "assets", n_train=args.pairs, n_eval=16)
    runs = [run_cli(loss, assets, out, ["--train.max_epochs", str(args.epochs)]) for loss in ("dpo", "rc_dpo")]
    from po_plugins.cli.report import main as report_main

    rc = report_main([str(r) for r in runs] + ["--out", str(out / "report"), "--labels", "dpo,rc_dpo"])
    for r in runs:
        s = summarize(load_trace(r / "po_band.jsonl"))
        print(f"[demo] {r.name:>7}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                  for k, v in s.items()))
    print(f"[demo] band report: {out / 'report' / 'index.html'}")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
