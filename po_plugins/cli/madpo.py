"""The MADPO pipeline in one command (arXiv 2510.05342): reward model, margin scoring, margin-adaptive DPO.

    python -m po_plugins.cli.madpo --config madpo.yaml [--dry_run] [--force STAGE]

Stages (each skipped when its output already exists and is complete):
  1. rm     the stock openrlhf.cli.train_rm (via po_plugins.cli.train_rm), on the same --data.* as the DPO data
  2. score  po_plugins.cli.score_margins: every pair's RM margin in a new column (default rm_margin)
  3. dpo    po_plugins.cli.train_dpo --loss madpo (or rc_madpo) --po.margin_key rm_margin
Every field is documented in examples/madpo/madpo.yaml.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

STAGES = ("rm", "score", "dpo")
DONE = "po_stage_done.json"
DATA_KEYS = ("prompt_key", "chosen_key", "rejected_key", "input_template", "apply_chat_template",
             "tokenizer_chat_template", "max_len", "dataset_split")


def load_config(path: str | Path) -> dict:
    import yaml

    with open(path) as f:
        cfg = yaml.safe_load(f) or {}
    base = Path(path).resolve().parent
    unknown = set(cfg) - {"workdir", "launcher", "data", "reward_model", "scoring", "dpo"}
    if unknown:
        raise SystemExit(f"madpo config: unknown section(s) {sorted(unknown)}; "
                         "known: workdir, launcher, data, reward_model, scoring, dpo")
    for section in ("data", "reward_model", "dpo"):
        if section not in cfg:
            raise SystemExit(f"madpo config: section '{section}' is required (see examples/madpo/madpo.yaml)")
    if "dataset" not in cfg["data"]:
        raise SystemExit("madpo config: data.dataset is required")
    if "pretrain" not in cfg["reward_model"] or "pretrain" not in cfg["dpo"]:
        raise SystemExit("madpo config: reward_model.pretrain and dpo.pretrain are required")
    cfg.setdefault("workdir", "runs/madpo")
    cfg["workdir"] = str((base / cfg["workdir"]).resolve()) if not os.path.isabs(cfg["workdir"]) else cfg["workdir"]
    cfg.setdefault("launcher", "python")
    cfg.setdefault("scoring", {})
    return cfg


def flag_list(flags: dict | None) -> list[str]:
    """{"train.micro_batch_size": 2, "ds.packing_samples": true} -> ["--train.micro_batch_size", "2", ...]."""
    out = []
    for key, value in (flags or {}).items():
        if value is None or value is False:
            continue
        out.append(f"--{key}")
        if value is not True:
            out.append(str(value))
    return out


def launcher(cfg: dict) -> list[str]:
    """python | torchrun ... | deepspeed ...: the prefix that runs a module."""
    parts = shlex.split(cfg["launcher"])
    if parts[0] == "python":
        return [sys.executable, *parts[1:], "-m"]
    if parts[0] == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", *parts[1:]]
    if parts[0] == "deepspeed":
        return [*parts, "--module"]
    raise SystemExit(f"madpo config: launcher must start with python, torchrun or deepspeed, got {cfg['launcher']!r}")


def data_flags(cfg: dict, dataset: str | None = None) -> list[str]:
    d = cfg["data"]
    flags = {f"data.{k}": d[k] for k in DATA_KEYS if k in d}
    flags["data.dataset"] = dataset or d["dataset"]
    return flag_list(flags)


def paths(cfg: dict) -> dict:
    w = Path(cfg["workdir"])
    return {"rm": Path(cfg["reward_model"].get("output", w / "rm")),
            "score": Path(cfg["scoring"].get("output", w / "scored.jsonl")),
            "dpo": Path(cfg["dpo"].get("output", w / "policy"))}


def commands(cfg: dict) -> dict[str, list[str]]:
    p = paths(cfg)
    rm, dpo, sc = cfg["reward_model"], cfg["dpo"], cfg["scoring"]
    margin_key = sc.get("margin_key", "rm_margin")
    eval_ds = cfg["data"].get("eval_dataset")
    rm_cmd = [*launcher(cfg), "po_plugins.cli.train_rm", "--model.model_name_or_path", str(rm["pretrain"]),
              *data_flags(cfg), "--ckpt.output_dir", str(p["rm"]),
              *(["--eval.dataset", str(eval_ds)] if eval_ds else []), *flag_list(rm.get("flags"))]
    score_launch = [sys.executable, "-m"] if sc.get("nproc", 1) == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(sc["nproc"]), "-m"]
    score_cmd = [*score_launch, "po_plugins.cli.score_margins", "--model", str(p["rm"]), *data_flags(cfg),
                 "--output", str(p["score"]), "--margin_key", margin_key, "--resume",
                 *flag_list({k: v for k, v in sc.items() if k not in ("output", "margin_key", "nproc")})]
    madpo_hp = {f"po.{k}": dpo[k] for k in ("c_max", "c_min", "lam", "tau") if k in dpo}
    dpo_cmd = [*launcher(cfg), "po_plugins.cli.train_dpo", "--loss", dpo.get("loss", "madpo"),
               "--model.model_name_or_path", str(dpo["pretrain"]), *data_flags(cfg, str(p["score"])),
               "--po.margin_key", margin_key, "--ckpt.output_dir", str(p["dpo"]),
               *flag_list(madpo_hp), *flag_list(dpo.get("flags"))]
    return {"rm": rm_cmd, "score": score_cmd, "dpo": dpo_cmd}


def complete(stage: str, out: Path) -> bool:
    """A stage is complete when its output exists and (for training stages) carries the done marker."""
    if stage == "score":
        return out.is_file()  # score_margins writes atomically: the final name exists only when complete
    return (out / DONE).is_file()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="MADPO: reward model -> margins -> margin-adaptive DPO")
    ap.add_argument("--config", required=True)
    ap.add_argument("--dry_run", action="store_true", help="print the three commands and exit")
    ap.add_argument("--force", choices=STAGES, action="append", default=[], help="re-run this stage")
    args = ap.parse_args(argv)
    cfg = load_config(args.config)
    cmds, outs = commands(cfg), paths(cfg)
    if not args.dry_run:
        Path(cfg["workdir"]).mkdir(parents=True, exist_ok=True)
    for stage in STAGES:
        cmd = cmds[stage]
        if complete(stage, outs[stage]) and stage not in args.force:
            print(f"[madpo] {stage}: done already ({outs[stage]}), skipped", flush=True)
            continue
        print(f"[madpo] {stage}: {shlex.join(cmd)}", flush=True)
        if args.dry_run:
            continue
        rc = subprocess.run(cmd).returncode
        if rc != 0:
            print(f"[madpo] {stage} failed (exit {rc}); fix it and run the same command again: finished stages "
                  "are skipped", file=sys.stderr)
            return rc
        if stage != "score":
            (outs[stage] / DONE).write_text(json.dumps({"stage": stage, "command": cmd}) + "\n")
    print(f"[madpo] policy: {outs['dpo']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
