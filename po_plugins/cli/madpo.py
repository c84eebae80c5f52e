"""The MADPO pipeline in one command (arXiv 2510.05342): reward model, margin scoring, margin-adaptive DPO.

    python -m po_plugins.cli.madpo --config madpo.yaml [--dry_run] [--force STAGE]

Stages (each skipped when its output already exists and is complete):
  1. rm        the stock openrlhf.cli.train_rm (via po_plugins.cli.train_rm), on the same --data.* as the DPO data
  2. score     po_plugins.cli.score_margins: every pair's RM margin in a new column (default rm_margin)
  3. dpo       po_plugins.cli.train_dpo --loss madpo (or rc_madpo) --po.margin_key rm_margin

With a `generation` section (on-policy pairs) and `rounds: k` (iterative MADPO), after `rm` (when configured),
round i = 0..k-1 runs in workdir/round_<i>/:
  0a. generate  po_plugins.cli.generate: n samples per prompt from the round's policy (round 0: dpo.pretrain,
                round i: round_<i-1>/policy), seed generation.seed + i             -> generated.jsonl
  0b. label     po_plugins.cli.label_pairs: rewards (the pipeline's RM, rm:DIR or fn:module:function) and
                chosen/rejected pairs, seed generation.seed + i                     -> pairs.jsonl
  2.  score     RM margins of those pairs (generation.margins: rm), or the labels' reward_margin is used (label)
  3.  dpo       weighted DPO from the round's policy (reference: the round's policy, or dpo.pretrain with
                dpo.reference: initial)                                             -> policy/
Every round's data and checkpoint are kept; a re-run skips every finished stage of every round.
Every field is documented in examples/madpo/madpo.yaml.

`host: trl` (examples/madpo/madpo_trl.yaml) runs the same three stages on Hugging Face TRL:
  1. rm        TRL's own reward script, unmodified: python -m trl.scripts.reward (RewardTrainer; an
               AutoModelForSequenceClassification with one label)                   -> rm/
  2. score     po_plugins.cli.score_margins --rm_kind hf on each split of data.dataset that exists (train_split,
               test_split), every pair formatted as TRL's RewardTrainer formats it  -> scored/<split>.jsonl
  3. dpo       po_plugins.cli.trl_dpo --loss madpo (or rc_madpo) --po.margin_key rm_margin --dataset_name scored/
               (TRL's own trl.scripts.dpo with the plugin's trainer)               -> policy/
Without a visible CUDA device the training stages get `--use_cpu true --bf16 false` unless their flags set use_cpu,
bf16 or fp16 themselves.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

STAGES = ("rm", "generate", "label", "score", "dpo")
DONE = "po_stage_done.json"
DATA_KEYS = ("prompt_key", "chosen_key", "rejected_key", "input_template", "apply_chat_template",
             "tokenizer_chat_template", "max_len", "dataset_split")
PROMPT_KEYS = ("prompt_key", "input_template", "apply_chat_template", "tokenizer_chat_template")
SECTIONS = ("host", "workdir", "launcher", "data", "reward_model", "scoring", "dpo", "generation", "rounds")
HOSTS = ("openrlhf", "trl")
# host: trl -- the fields of each section (TRL's scripts read the prompt/chosen/rejected columns by those names)
TRL_FIELDS = {"data": ("dataset", "train_split", "test_split"),
              "reward_model": ("pretrain", "output", "flags"),
              "scoring": ("margin_key", "batch_size", "checkpoint_every", "nproc", "attn_implementation", "output"),
              "dpo": ("pretrain", "loss", "c_max", "c_min", "lam", "tau", "output", "flags")}
# flags the pipeline sets itself on the TRL scripts (per stage)
TRL_MANAGED = {"reward_model": ("model_name_or_path", "dataset_name", "dataset_train_split", "dataset_test_split",
                                "output_dir", "datasets"),
               "dpo": ("model_name_or_path", "dataset_name", "dataset_train_split", "dataset_test_split", "output_dir",
                       "datasets", "loss", "po.margin_key", "po_loss", "po_margin_key")}
TRL_CPU_KEYS = ("use_cpu", "bf16", "fp16")
TRL_RM_MAX_LENGTH = 1024  # RewardConfig.max_length's default (TRL 1.16)
GEN_KEYS = ("prompts", "n_samples", "backend", "temperature", "top_p", "top_k", "max_new_tokens", "seed", "batch_size",
            "nproc", "reward", "pairing", "ties", "margins", "flags", "label_flags")


def load_config(path: str | Path) -> dict:
    import yaml

    with open(path) as f:
        cfg = yaml.safe_load(f) or {}
    base = Path(path).resolve().parent
    unknown = set(cfg) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"madpo config: unknown section(s) {sorted(unknown)}; known: {', '.join(SECTIONS)}")
    host = cfg.setdefault("host", "openrlhf")
    if host not in HOSTS:
        raise SystemExit(f"madpo config: host must be one of {', '.join(HOSTS)}, got {host!r} (openrlhf: "
                         "examples/madpo/madpo.yaml; trl: examples/madpo/madpo_trl.yaml)")
    if host == "trl":
        return load_trl_config(cfg, base)
    gen = cfg.get("generation")
    rounds = cfg.setdefault("rounds", 1)
    if not isinstance(rounds, int) or rounds < 1:
        raise SystemExit(f"madpo config: rounds must be an integer >= 1, got {rounds!r}")
    if rounds > 1 and not gen:
        raise SystemExit("madpo config: rounds > 1 needs a generation section (each round samples new pairs from "
                         "the previous round's policy)")
    required = ("data", "dpo") if gen else ("data", "reward_model", "dpo")
    for section in required:
        if section not in cfg:
            raise SystemExit(f"madpo config: section '{section}' is required (see examples/madpo/madpo.yaml)")
    if "dataset" not in cfg["data"] and not (gen and gen.get("prompts")):
        raise SystemExit("madpo config: data.dataset is required")
    if "pretrain" not in cfg["dpo"] or ("reward_model" in cfg and "pretrain" not in cfg["reward_model"]):
        raise SystemExit("madpo config: reward_model.pretrain and dpo.pretrain are required")
    if gen:
        bad = set(gen) - set(GEN_KEYS)
        if bad:
            raise SystemExit(f"madpo config: unknown generation field(s) {sorted(bad)}; known: {', '.join(GEN_KEYS)}")
        reward = str(gen.get("reward", "rm"))
        if not (reward == "rm" or reward.startswith(("rm:", "fn:"))):
            raise SystemExit(f"madpo config: generation.reward must be rm, rm:DIR or fn:module:function, got {reward}")
        gen["reward"] = reward
        gen.setdefault("margins", "rm" if "reward_model" in cfg else "label")
        if gen["margins"] not in ("rm", "label"):
            raise SystemExit("madpo config: generation.margins must be rm (score stage) or label (reward_margin)")
        if (reward == "rm" or gen["margins"] == "rm") and "reward_model" not in cfg:
            raise SystemExit("madpo config: generation.reward: rm and generation.margins: rm need the reward_model "
                             "section (or use reward: fn:module:function / rm:DIR with margins: label)")
        if cfg["dpo"].get("reference", "previous") not in ("previous", "initial"):
            raise SystemExit("madpo config: dpo.reference must be previous or initial")
    cfg.setdefault("workdir", "runs/madpo")
    cfg["workdir"] = str((base / cfg["workdir"]).resolve()) if not os.path.isabs(cfg["workdir"]) else cfg["workdir"]
    cfg.setdefault("launcher", "python")
    cfg.setdefault("scoring", {})
    return cfg


def _local_path(value, base: Path) -> str:
    """A path relative to the config's folder when it names something there (or starts with ./ ../ ~); else as
    given (a hub name such as org/model)."""
    text = os.path.expanduser(str(value))
    if os.path.isabs(text):
        return text
    if text.startswith(("./", "../")) or (base / text).exists():
        return str((base / text).resolve())
    return text


def load_trl_config(cfg: dict, base: Path) -> dict:
    """Validate and complete a `host: trl` config (one clear error per problem, naming the fix)."""
    example = "see examples/madpo/madpo_trl.yaml"
    for key in ("generation", "rounds"):
        if key in cfg and not (key == "rounds" and cfg[key] == 1):
            raise SystemExit(f"madpo config: '{key}' (on-policy / iterative MADPO) is not available with host: trl; "
                             "remove it, or use host: openrlhf")
    cfg["rounds"] = 1
    for section in ("data", "reward_model", "dpo"):
        if not isinstance(cfg.get(section), dict):
            raise SystemExit(f"madpo config: host: trl needs the '{section}' section ({example})")
    if cfg.get("scoring") is None:
        cfg["scoring"] = {}
    for section, known in TRL_FIELDS.items():
        if not isinstance(cfg[section], dict):
            raise SystemExit(f"madpo config: '{section}' must be a mapping ({example})")
        bad = sorted(set(cfg[section]) - set(known))
        if bad and section == "data":
            raise SystemExit(f"madpo config: data field(s) {bad} are not used with host: trl; TRL's scripts read "
                             "the prompt/chosen/rejected columns by those names and apply the tokenizer's chat "
                             "template to conversational rows themselves: rename the columns in your data and remove "
                             f"the field(s); data takes {', '.join(known)} ({example})")
        if bad:
            raise SystemExit(f"madpo config: unknown {section} field(s) {bad} for host: trl; known: "
                             f"{', '.join(known)} (other TRL options go under {section}.flags; {example})")
    for section, key in (("data", "dataset"), ("reward_model", "pretrain"), ("dpo", "pretrain")):
        if not cfg[section].get(key):
            raise SystemExit(f"madpo config: {section}.{key} is required with host: trl ({example})")
    for section in ("reward_model", "dpo"):
        flags = cfg[section].get("flags") or {}
        if not isinstance(flags, dict):
            raise SystemExit(f"madpo config: {section}.flags must be a mapping of TRL option -> value ({example})")
        clash = sorted(k for k in flags if k in TRL_MANAGED[section] or k.replace("-", "_") in TRL_MANAGED[section])
        if clash:
            raise SystemExit(f"madpo config: {section}.flags sets {clash}, which the pipeline sets itself: use "
                             f"data.dataset / data.train_split / data.test_split, {section}.pretrain, {section}.output"
                             + (", dpo.loss and scoring.margin_key" if section == "dpo" else "") + " instead")
        cfg[section]["flags"] = flags
    loss = cfg["dpo"].setdefault("loss", "madpo")
    if loss not in ("madpo", "rc_madpo"):
        raise SystemExit(f"madpo config: dpo.loss must be madpo or rc_madpo, got {loss!r}")
    if cfg["scoring"].get("margin_key", "rm_margin") == "margin":
        raise SystemExit("madpo config: scoring.margin_key must not be 'margin' (TRL's RewardTrainer and OpenRLHF's "
                         "RewardDataset read a 'margin' column as a loss target); keep rm_margin")
    launch = shlex.split(str(cfg.setdefault("launcher", "python")))
    if not launch or launch[0] not in ("python", "torchrun", "accelerate"):
        raise SystemExit(f"madpo config: with host: trl, launcher must start with python, torchrun or accelerate "
                         f"(accelerate launch ...), got {cfg['launcher']!r}")
    cfg.setdefault("workdir", "runs/madpo")
    cfg["workdir"] = str((base / os.path.expanduser(cfg["workdir"])).resolve())
    data = cfg["data"]
    data["dataset"] = _local_path(data["dataset"], base)
    data.setdefault("train_split", "train")
    data.setdefault("test_split", "test")
    for section in ("reward_model", "dpo"):
        cfg[section]["pretrain"] = _local_path(cfg[section]["pretrain"], base)
    for section in ("reward_model", "scoring", "dpo"):
        if cfg[section].get("output"):
            cfg[section]["output"] = str((base / os.path.expanduser(str(cfg[section]["output"]))).resolve())
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


def data_flags(cfg: dict, dataset: str | None = None, keys=DATA_KEYS) -> list[str]:
    d = cfg["data"]
    flags = {f"data.{k}": d[k] for k in keys if k in d}
    flags["data.dataset"] = dataset or d["dataset"]
    return flag_list(flags)


def format_flags(cfg: dict, keys) -> list[str]:
    """--data.* formatting flags only (no dataset)."""
    return flag_list({f"data.{k}": cfg["data"][k] for k in keys if k in cfg["data"]})


def generated_data_flags(cfg: dict, dataset) -> list[str]:
    """--data.* for a file the pipeline wrote (JSON lines: its split is train whatever data.dataset_split says)."""
    return data_flags(cfg, str(dataset), [k for k in DATA_KEYS if k != "dataset_split"])


def paths(cfg: dict) -> dict:
    w = Path(cfg["workdir"])
    return {"rm": Path(cfg["reward_model"].get("output", w / "rm")),
            "score": Path(cfg["scoring"].get("output", w / "scored.jsonl")),
            "dpo": Path(cfg["dpo"].get("output", w / "policy"))}


def _module_launch(nproc) -> list[str]:
    nproc = int(nproc or 1)
    return [sys.executable, "-m"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "-m"]


def rm_command(cfg: dict, out) -> list[str]:
    rm = cfg["reward_model"]
    eval_ds = cfg["data"].get("eval_dataset")
    return [*launcher(cfg), "po_plugins.cli.train_rm", "--model.model_name_or_path", str(rm["pretrain"]),
            *data_flags(cfg), "--ckpt.output_dir", str(out),
            *(["--eval.dataset", str(eval_ds)] if eval_ds else []), *flag_list(rm.get("flags"))]


def score_command(cfg: dict, rm_dir, data: list[str], out) -> list[str]:
    sc = cfg["scoring"]
    return [*_module_launch(sc.get("nproc")), "po_plugins.cli.score_margins", "--model", str(rm_dir), *data,
            "--output", str(out), "--margin_key", sc.get("margin_key", "rm_margin"), "--resume",
            *flag_list({k: v for k, v in sc.items() if k not in ("output", "margin_key", "nproc")})]


def dpo_command(cfg: dict, policy, data: list[str], margin_key: str, out, ref=None) -> list[str]:
    dpo = cfg["dpo"]
    madpo_hp = {f"po.{k}": dpo[k] for k in ("c_max", "c_min", "lam", "tau") if k in dpo}
    return [*launcher(cfg), "po_plugins.cli.train_dpo", "--loss", dpo.get("loss", "madpo"),
            "--model.model_name_or_path", str(policy), *(["--ref.model_name_or_path", str(ref)] if ref else []),
            *data, "--po.margin_key", margin_key, "--ckpt.output_dir", str(out),
            *flag_list(madpo_hp), *flag_list(dpo.get("flags"))]


def commands(cfg: dict) -> dict[str, list[str]]:
    """The three commands of the pipeline without a generation section."""
    p = paths(cfg)
    margin_key = cfg["scoring"].get("margin_key", "rm_margin")
    return {"rm": rm_command(cfg, p["rm"]),
            "score": score_command(cfg, p["rm"], data_flags(cfg), p["score"]),
            "dpo": dpo_command(cfg, cfg["dpo"]["pretrain"], data_flags(cfg, str(p["score"])), margin_key, p["dpo"])}


def round_dir(cfg: dict, i: int) -> Path:
    return Path(cfg["workdir"]) / f"round_{i}"


def round_steps(cfg: dict, i: int) -> list[tuple[str, str, list[str], Path]]:
    """(stage, name, command, output) of round i of iterative MADPO (see the module docstring)."""
    gen, dpo, d = cfg["generation"], cfg["dpo"], round_dir(cfg, i)
    policy = Path(dpo["pretrain"]) if i == 0 else round_dir(cfg, i - 1) / "policy"
    seed = int(gen.get("seed", 0)) + i
    prompts = gen.get("prompts", cfg["data"].get("dataset"))
    gen_flags = {k: gen[k] for k in ("n_samples", "backend", "temperature", "top_p", "top_k", "max_new_tokens",
                                     "batch_size") if k in gen}
    split = {"data.dataset_split": cfg["data"]["dataset_split"]} if "dataset_split" in cfg["data"] else {}
    generate = [*_module_launch(gen.get("nproc")), "po_plugins.cli.generate", "--model", str(policy),
                *data_flags(cfg, str(prompts), PROMPT_KEYS), *flag_list(split), "--output", str(d / "generated.jsonl"),
                "--seed", str(seed), "--resume", *flag_list(gen_flags), *flag_list(gen.get("flags"))]
    reward = gen["reward"]
    if reward == "rm":
        reward = f"rm:{paths(cfg)['rm']}"
    label_flags = {k: gen[k] for k in ("pairing", "ties") if k in gen}
    label = [*_module_launch(gen.get("nproc")), "po_plugins.cli.label_pairs", "--input", str(d / "generated.jsonl"),
             "--output", str(d / "pairs.jsonl"), "--reward", reward, "--seed", str(seed),
             *format_flags(cfg, [*PROMPT_KEYS, "max_len"]),
             "--chosen_key", cfg["data"].get("chosen_key", "chosen"),
             "--rejected_key", cfg["data"].get("rejected_key", "rejected"), "--resume",
             *flag_list(label_flags), *flag_list(gen.get("label_flags"))]
    steps = [("generate", f"round {i} generate", generate, d / "generated.jsonl"),
             ("label", f"round {i} label", label, d / "pairs.jsonl")]
    train_data, margin_key = d / "pairs.jsonl", "reward_margin"
    if gen["margins"] == "rm":
        steps.append(("score", f"round {i} score", score_command(cfg, paths(cfg)["rm"],
                                                                 generated_data_flags(cfg, d / "pairs.jsonl"),
                                                                 d / "scored.jsonl"), d / "scored.jsonl"))
        train_data, margin_key = d / "scored.jsonl", cfg["scoring"].get("margin_key", "rm_margin")
    ref = dpo["pretrain"] if dpo.get("reference", "previous") == "initial" and i > 0 else None
    steps.append(("dpo", f"round {i} dpo", dpo_command(cfg, policy, generated_data_flags(cfg, train_data), margin_key,
                                                      d / "policy", ref), d / "policy"))
    return steps


# ---------------------------------------------------------------------------------------------------- host: trl
def trl_flag_list(flags: dict | None) -> list[str]:
    """TRL (HfArgumentParser) flags: booleans spelled true/false (TRL's bf16 defaults to true), lists as several
    values, mappings as JSON; None is left out."""
    out = []
    for key, value in (flags or {}).items():
        if value is None:
            continue
        out.append(f"--{key}")
        if isinstance(value, bool):
            out.append("true" if value else "false")
        elif isinstance(value, (list, tuple)):
            out += [str(v) for v in value]
        elif isinstance(value, dict):
            out.append(json.dumps(value))
        else:
            out.append(str(value))
    return out


def cpu_flags(flags: dict) -> list[str]:
    """--use_cpu true --bf16 false when no CUDA device is visible and the stage's flags do not decide it."""
    if any(k in flags for k in TRL_CPU_KEYS):
        return []
    import torch

    return [] if torch.cuda.is_available() else ["--use_cpu", "true", "--bf16", "false"]


def trl_launcher(cfg: dict) -> list[str]:
    parts = shlex.split(cfg["launcher"])
    if parts[0] == "python":
        return [sys.executable, *parts[1:], "-m"]
    if parts[0] == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", *parts[1:]]
    return [*parts, "-m"]  # accelerate launch [options] -m module


def trl_splits(cfg: dict) -> list[str]:
    """The splits to score: the train split, and the test split when data.dataset has one (a local folder: read from
    its data files, nothing loaded; a hub name: assumed present)."""
    data = cfg["data"]
    have = None  # unknown (a hub name): decided by the scorer and TRL at run time
    if Path(data["dataset"]).is_file():
        have = ["train"]
    elif Path(data["dataset"]).is_dir():
        try:
            from datasets import load_dataset_builder

            builder = load_dataset_builder(data["dataset"])
            have = [str(k) for k in (builder.config.data_files or builder.info.splits or {})]
        except Exception as e:
            raise SystemExit(f"madpo config: data.dataset {data['dataset']} cannot be read as a dataset folder ({e}); "
                             "give a folder with train.jsonl (and test.jsonl)") from None
    splits = [data["train_split"]]
    if data["test_split"] != data["train_split"] and (have is None or data["test_split"] in have):
        splits.append(data["test_split"])
    if have is not None and data["train_split"] not in have:
        raise SystemExit(f"madpo config: data.dataset {data['dataset']} has no split '{data['train_split']}' (its "
                         f"splits: {', '.join(have)}); set data.train_split")
    return splits


def trl_paths(cfg: dict) -> dict:
    w = Path(cfg["workdir"])
    return {"rm": Path(cfg["reward_model"].get("output") or w / "rm"),
            "scored": Path(cfg["scoring"].get("output") or w / "scored"),
            "dpo": Path(cfg["dpo"].get("output") or w / "policy")}


def trl_steps(cfg: dict) -> list[tuple[str, str, list[str], Path]]:
    """rm (trl.scripts.reward), score (one per split), dpo (po_plugins.cli.trl_dpo)."""
    data, rm, sc, dpo, p = cfg["data"], cfg["reward_model"], cfg["scoring"], cfg["dpo"], trl_paths(cfg)
    split_flags = ["--dataset_train_split", data["train_split"], "--dataset_test_split", data["test_split"]]
    rm_cmd = [*trl_launcher(cfg), "trl.scripts.reward", "--model_name_or_path", rm["pretrain"],
              "--dataset_name", data["dataset"], *split_flags, "--output_dir", str(p["rm"]),
              *cpu_flags(rm["flags"]), *trl_flag_list(rm["flags"])]
    steps = [("rm", "rm", rm_cmd, p["rm"])]
    margin_key = sc.get("margin_key", "rm_margin")
    max_len = rm["flags"].get("max_length", TRL_RM_MAX_LENGTH)
    score_opts = {k: sc[k] for k in ("batch_size", "checkpoint_every", "attn_implementation") if k in sc}
    for split in trl_splits(cfg):
        out = p["scored"] / f"{split}.jsonl"
        cmd = [*_module_launch(sc.get("nproc")), "po_plugins.cli.score_margins", "--rm_kind", "hf",
               "--model", str(p["rm"]), "--data.dataset", data["dataset"], "--data.dataset_split", split,
               *(["--data.max_len", str(max_len)] if max_len is not None else []),
               "--output", str(out), "--margin_key", margin_key, "--resume", *flag_list(score_opts)]
        steps.append(("score", "score" if split == data["train_split"] else f"score {split}", cmd, out))
    madpo_hp = {f"po.{k}": dpo[k] for k in ("c_max", "c_min", "lam", "tau") if k in dpo}
    dpo_cmd = [*trl_launcher(cfg), "po_plugins.cli.trl_dpo", "--loss", dpo["loss"], "--po.margin_key", margin_key,
               *trl_flag_list(madpo_hp), "--model_name_or_path", dpo["pretrain"],
               "--dataset_name", str(p["scored"]), *split_flags, "--output_dir", str(p["dpo"]),
               *cpu_flags(dpo["flags"]), *trl_flag_list(dpo["flags"])]
    steps.append(("dpo", "dpo", dpo_cmd, p["dpo"]))
    return steps


def write_scored_card(cfg: dict, steps) -> None:
    """scored/README.md naming each split's file, so `load_dataset(scored/)` (TRL's --dataset_name) reads exactly
    those splits under their names (any split name; stray files are ignored)."""
    files = [(out.stem, out.name) for stage, _, _, out in steps if stage == "score"]
    lines = ["---", "configs:", "- config_name: default", "  data_files:"]
    for split, name in files:
        lines += [f"  - split: {json.dumps(split)}", f"    path: {json.dumps(name)}"]
    lines += ["---", "", "Preference pairs with reward-model margins, written by po_plugins.cli.madpo (host: trl).",
              ""]
    folder = trl_paths(cfg)["scored"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "README.md").write_text("\n".join(lines))


def plan(cfg: dict) -> list[tuple[str, str, list[str], Path]]:
    """Every step in order: (stage, name, command, output)."""
    if cfg.get("host") == "trl":
        return trl_steps(cfg)
    if not cfg.get("generation"):
        cmds, outs = commands(cfg), paths(cfg)
        return [(s, s, cmds[s], outs[s]) for s in ("rm", "score", "dpo")]
    steps = [("rm", "rm", rm_command(cfg, paths(cfg)["rm"]), paths(cfg)["rm"])] if "reward_model" in cfg else []
    for i in range(cfg["rounds"]):
        steps += round_steps(cfg, i)
    return steps


def complete(stage: str, out: Path) -> bool:
    """A stage is complete when its output exists and (for training stages) carries the done marker."""
    if stage in ("score", "generate", "label"):
        return out.is_file()  # these CLIs write atomically: the final name exists only when complete
    return (out / DONE).is_file()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="MADPO: reward model -> margins -> margin-adaptive DPO")
    ap.add_argument("--config", required=True)
    ap.add_argument("--dry_run", action="store_true", help="print the commands and exit")
    ap.add_argument("--force", choices=STAGES, action="append", default=[],
                    help="re-run this stage (in every round)")
    args = ap.parse_args(argv)
    cfg = load_config(args.config)
    steps = plan(cfg)
    if not args.dry_run:
        Path(cfg["workdir"]).mkdir(parents=True, exist_ok=True)
        if cfg["host"] == "trl":
            write_scored_card(cfg, steps)
    for stage, name, cmd, out in steps:
        if complete(stage, out) and stage not in args.force:
            print(f"[madpo] {name}: done already ({out}), skipped", flush=True)
            continue
        print(f"[madpo] {name}: {shlex.join(cmd)}", flush=True)
        if args.dry_run:
            continue
        rc = subprocess.run(cmd).returncode
        if rc != 0:
            print(f"[madpo] {name} failed (exit {rc}); fix it and run the same command again: finished stages "
                  "are skipped", file=sys.stderr)
            return rc
        if stage in ("rm", "dpo"):
            (out / DONE).write_text(json.dumps({"stage": stage, "command": cmd}) + "\n")
    print(f"[madpo] policy: {steps[-1][3]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
