"""The MADPO pipeline (arXiv 2510.05342) as one plan of commands: reward model, pair margins, margin-weighted DPO.

`load_config(path)` reads and checks a config (every field is documented in examples/madpo/madpo.yaml and
examples/madpo/madpo_trl.yaml), `check_inputs(cfg)` says which input paths and models the config names are missing,
`plan(cfg)` lists the steps and `execute(...)` runs them as subprocesses, skipping every step whose output is complete.
What differs between the hosts is one record per host (`HOSTS`): its commands, how their flags are spelled, the
config fields it takes and where its scored pairs go. `python -m po_plugins.cli.madpo` is the command line.

Stages (each skipped when its output already exists and is complete):
  1. rm     openrlhf: po_plugins.cli.train_rm (the stock openrlhf.cli.train_rm) on the same --data.* as DPO;
            trl: TRL's own reward script, unmodified (python -m trl.scripts.reward)              -> rm/
  2. score  po_plugins.cli.score_margins: every pair's RM margin in a new column (default rm_margin);
            openrlhf: -> scored.jsonl; trl: each split of data.dataset that exists (train_split, test_split),
            every pair formatted as TRL's RewardTrainer formats it  -> scored/<split>.jsonl and scored/README.md
  3. dpo    --loss madpo (or rc_madpo) --po.margin_key rm_margin on the scored pairs; openrlhf:
            po_plugins.cli.train_dpo; trl: po_plugins.cli.trl_dpo (trl.scripts.dpo with the plugin's trainer) -> policy/

With a `generation` section (on-policy pairs; host: openrlhf) and `rounds: k` (iterative MADPO), after `rm` (when
configured), round i = 0..k-1 runs in workdir/round_<i>/:
  0a. generate  po_plugins.cli.generate: n samples per prompt from the round's policy (round 0: dpo.pretrain,
                round i: round_<i-1>/policy), seed generation.seed + i             -> generated.jsonl
  0b. label     po_plugins.cli.label_pairs: rewards (the pipeline's RM, rm:DIR or fn:module:function) and
                chosen/rejected pairs, seed generation.seed + i                     -> pairs.jsonl
  2.  score     RM margins of those pairs (generation.margins: rm), or the labels' reward_margin is used (label)
  3.  dpo       weighted DPO from the round's policy (reference: the round's policy, or dpo.pretrain with
                dpo.reference: initial)                                             -> policy/
Every round's data and checkpoint are kept; a re-run skips every finished stage of every round.

Paths. A relative path in a config is read from the config's folder when it names something there, starts with
./ ../ or ~, or its first folder is there; any other value is passed on as given (a Hugging Face hub name, or a path
from the current folder). Files the pipeline wrote are read as single-split JSON lines.
Without a visible CUDA device the training stages get the host's CPU flags unless their own flags decide them:
openrlhf --ds.attn_implementation sdpa (flash-attention needs CUDA), trl --use_cpu true --bf16 false.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

from po_plugins.errors import DataError, OptionError

STAGES = ("rm", "generate", "label", "score", "dpo")
DONE = "po_stage_done.json"
SECTIONS = ("host", "workdir", "launcher", "data", "reward_model", "scoring", "dpo", "generation", "rounds")
DATA_KEYS = ("prompt_key", "chosen_key", "rejected_key", "input_template", "apply_chat_template",
             "tokenizer_chat_template", "max_len", "dataset_split")
PROMPT_KEYS = ("prompt_key", "input_template", "apply_chat_template", "tokenizer_chat_template")
GEN_KEYS = ("prompts", "n_samples", "backend", "temperature", "top_p", "top_k", "max_new_tokens", "seed", "batch_size",
            "nproc", "reward", "pairing", "ties", "margins", "flags", "label_flags")
MADPO_HP = ("c_max", "c_min", "lam", "tau")
ROLES = {"data": "the preference pairs", "reward_model": "stage 1, the reward model", "dpo": "stage 3, the policy"}
# the input paths and models a config names: (section, field); generation.reward rm:DIR is one too
INPUTS = (("data", "dataset"), ("data", "eval_dataset"), ("generation", "prompts"), ("reward_model", "pretrain"),
          ("dpo", "pretrain"))
OUTPUTS = (("reward_model", "output"), ("scoring", "output"), ("dpo", "output"))
TRL_RM_MAX_LENGTH = 1024  # RewardConfig.max_length's default (TRL 1.16)


class Step(NamedTuple):
    stage: str  # one of STAGES
    name: str  # what the log calls it ("round 1 score", "score test")
    command: list[str]
    output: Path


# ------------------------------------------------------------------------------------------------ flag spellings
def argparse_flags(flags: dict | None) -> list[str]:
    """argparse (OpenRLHF, po_plugins' own CLIs): {"train.micro_batch_size": 2, "ds.packing_samples": true} ->
    ["--train.micro_batch_size", "2", "--ds.packing_samples"]; false and null are left out."""
    out = []
    for key, value in (flags or {}).items():
        if value is None or value is False:
            continue
        out.append(f"--{key}")
        if value is not True:
            out.append(str(value))
    return out


def hf_flags(flags: dict | None) -> list[str]:
    """HfArgumentParser (TRL): booleans spelled true/false (TRL's bf16 defaults to true), lists as several values,
    mappings as JSON; null is left out."""
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


# ------------------------------------------------------------------------------------------ how a stage reads pairs
def _data_flags(cfg: dict, dataset, keys) -> list[str]:
    flags = {f"data.{k}": cfg["data"][k] for k in keys if k in cfg["data"]}
    if dataset is not None:
        flags["data.dataset"] = str(dataset)
    return argparse_flags(flags)


def _openrlhf_pairs(cfg: dict, dataset, written: bool) -> list[str]:
    """The same --data.* flags for every stage; a file the pipeline wrote is JSON lines whose one split is train,
    whatever data.dataset_split says."""
    return _data_flags(cfg, dataset, [k for k in DATA_KEYS if not (written and k == "dataset_split")])


def _trl_pairs(cfg: dict, dataset, written: bool) -> list[str]:
    data = cfg["data"]
    return ["--dataset_name", str(dataset), "--dataset_train_split", data["train_split"],
            "--dataset_test_split", data["test_split"]]


def _score_inputs(cfg: dict, dataset, written: bool, out: Path) -> list[tuple]:
    """(split or None, the scorer's data flags, output) of each scorer run: one on the pairs a training stage reads,
    or (per_split) one per split of data.dataset, formatted as the host's reward trainer formats it, with the reward
    model's max length."""
    host = host_of(cfg)
    if not host.per_split:
        return [(None, host.pairs(cfg, dataset, written), out)]
    flag, default = host.rm_max_length
    max_len = cfg["reward_model"]["flags"].get(flag, default)
    return [(split, argparse_flags({"data.dataset": dataset, "data.dataset_split": split, "data.max_len": max_len}),
             out / f"{split}.jsonl") for split in data_splits(cfg)]


def data_splits(cfg: dict) -> list[str]:
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
            raise DataError(f"madpo config: data.dataset cannot be read as a dataset folder ({e}); give a folder "
                            "with train.jsonl (and test.jsonl)", file=data["dataset"]) from None
    splits = [data["train_split"]]
    if data["test_split"] != data["train_split"] and (have is None or data["test_split"] in have):
        splits.append(data["test_split"])
    if have is not None and data["train_split"] not in have:
        raise DataError(f"madpo config: data.dataset {data['dataset']} has no split '{data['train_split']}' (its "
                        f"splits: {', '.join(have)}); set data.train_split")
    return splits


# --------------------------------------------------------------------------------------------------- the hosts
@dataclass(frozen=True)
class Host:
    """What the pipeline needs to know of one host; everything else is the same pipeline."""

    name: str
    example: str  # the example config that documents every field
    rm_module: str  # stage 1 (run by `launcher`)
    dpo_module: str  # stage 3 (run by `launcher`)
    spell: Callable  # how the flags of rm and dpo are spelled (argparse_flags, hf_flags)
    model_flag: str  # the initial weights of rm and dpo
    output_flag: str  # the folder rm and dpo write
    launchers: tuple  # the first words `launcher` may start with
    cpu: tuple  # (flags that decide the device, flags added when no CUDA device is visible)
    pairs: Callable  # (cfg, dataset, written) -> the flags naming the pairs a training stage reads
    scored: str  # workdir/<scored>: the scored pairs (a file, or with per_split a folder)
    per_split: bool = False  # score each split (data.train_split, data.test_split): <scored>/<split>.jsonl, README.md
    rm_max_length: tuple = ()  # with per_split: the reward model's flag for its max length, and its default
    score_flags: tuple = ()  # the scorer's flags for this host's reward model
    fields: dict = field(default_factory=dict)  # section -> the fields it takes (a section not named: any)
    data_note: str = ""  # why data fields other than `fields["data"]` are refused
    managed: dict = field(default_factory=dict)  # section -> flags the pipeline sets itself (refused in .flags)
    losses: tuple | None = None  # the dpo.loss values it takes (None: any, checked by the trainer)
    rounds: bool = False  # a generation section and rounds > 1 (on-policy / iterative MADPO)
    multi_dataset: bool = False  # data.dataset may list several: a.jsonl,b@dir


TRL_MANAGED = ("model_name_or_path", "dataset_name", "dataset_train_split", "dataset_test_split", "output_dir",
               "datasets")
HOSTS = {
    "openrlhf": Host(
        name="openrlhf", example="examples/madpo/madpo.yaml",
        rm_module="po_plugins.cli.train_rm", dpo_module="po_plugins.cli.train_dpo", spell=argparse_flags,
        model_flag="--model.model_name_or_path", output_flag="--ckpt.output_dir",
        launchers=("python", "torchrun", "deepspeed"),
        cpu=(("ds.attn_implementation",), {"ds.attn_implementation": "sdpa"}),
        pairs=_openrlhf_pairs, scored="scored.jsonl",
        fields={"generation": GEN_KEYS}, rounds=True, multi_dataset=True),
    "trl": Host(
        name="trl", example="examples/madpo/madpo_trl.yaml",
        rm_module="trl.scripts.reward", dpo_module="po_plugins.cli.trl_dpo", spell=hf_flags,
        model_flag="--model_name_or_path", output_flag="--output_dir",
        launchers=("python", "torchrun", "accelerate"),
        cpu=(("use_cpu", "bf16", "fp16"), {"use_cpu": True, "bf16": False}),
        pairs=_trl_pairs, scored="scored", per_split=True, rm_max_length=("max_length", TRL_RM_MAX_LENGTH),
        score_flags=("--rm_kind", "hf"),
        fields={"data": ("dataset", "train_split", "test_split"), "reward_model": ("pretrain", "output", "flags"),
                "scoring": ("margin_key", "batch_size", "checkpoint_every", "nproc", "attn_implementation",
                            "output"),
                "dpo": ("pretrain", "loss", *MADPO_HP, "output", "flags")},
        data_note="TRL's scripts read the prompt/chosen/rejected columns by those names and apply the tokenizer's "
                  "chat template to conversational rows themselves: rename the columns in your data and remove the "
                  "field(s)",
        managed={"reward_model": TRL_MANAGED,
                 "dpo": (*TRL_MANAGED, "loss", "po.margin_key", "po_loss", "po_margin_key")},
        losses=("madpo", "rc_madpo")),
}


def host_of(cfg: dict) -> Host:
    return HOSTS[cfg["host"]]


def _either(words) -> str:
    words = list(words)
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


# ------------------------------------------------------------------------------------------------------- config
def load_config(path: str | Path) -> dict:
    """Read, check and complete a config: one error per problem (OptionError), naming the fix."""
    import yaml

    if not Path(path).is_file():
        raise OptionError(f"madpo config: {path} is not a file (examples: examples/madpo/madpo.yaml, "
                          "examples/madpo/madpo_trl.yaml)")
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise OptionError(f"madpo config: {path} is not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(cfg, dict):
        raise OptionError(f"madpo config: {path} must be a mapping of section: fields (see examples/madpo/madpo.yaml)")
    unknown = set(cfg) - set(SECTIONS)
    if unknown:
        raise OptionError(f"madpo config: unknown section(s) {sorted(unknown)}; known: {', '.join(SECTIONS)}")
    name = cfg.setdefault("host", "openrlhf")
    if name not in HOSTS:
        raise OptionError(f"madpo config: host must be one of {', '.join(HOSTS)}, got {name!r} ("
                          + "; ".join(f"{h.name}: {h.example}" for h in HOSTS.values()) + ")")
    host = HOSTS[name]
    _check_rounds(cfg, host)
    _check_sections(cfg, host)
    if cfg.get("generation"):
        _check_generation(cfg)
    _check_choices(cfg, host)
    _resolve_paths(cfg, host, Path(path).resolve().parent)
    if host.per_split:
        cfg["data"].setdefault("train_split", "train")
        cfg["data"].setdefault("test_split", "test")
    return cfg


def _check_rounds(cfg: dict, host: Host) -> None:
    if not host.rounds:
        for key in ("generation", "rounds"):
            if key in cfg and not (key == "rounds" and cfg[key] == 1):
                able = _either(h.name for h in HOSTS.values() if h.rounds)
                raise OptionError(f"madpo config: '{key}' (on-policy / iterative MADPO) is not available with "
                                  f"host: {host.name}; remove it, or use host: {able}")
    rounds = cfg.setdefault("rounds", 1)
    if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 1:
        raise OptionError(f"madpo config: rounds must be an integer >= 1, got {rounds!r}")
    if rounds > 1 and not cfg.get("generation"):
        raise OptionError("madpo config: rounds > 1 needs a generation section (each round samples new pairs from "
                          "the previous round's policy)")


def _check_sections(cfg: dict, host: Host) -> None:
    """Every needed section present and a mapping, only known fields, the required ones set, flags a mapping."""
    gen = cfg.get("generation")
    see = f"see {host.example}"
    for section in ("data", "dpo") if gen else ("data", "reward_model", "dpo"):
        if section not in cfg:
            raise OptionError(f"madpo config: section '{section}' is required (host: {host.name} needs the "
                              f"'{section}' section for {ROLES[section]}; {see})")
    if cfg.get("scoring") is None:
        cfg["scoring"] = {}
    for section in ("data", "reward_model", "scoring", "dpo", "generation"):
        if section not in cfg or (section == "generation" and not gen):
            continue
        if not isinstance(cfg[section], dict):
            raise OptionError(f"madpo config: '{section}' must be a mapping of field: value ({see})")
        known = host.fields.get(section)
        bad = sorted(set(cfg[section]) - set(known)) if known is not None else []
        if bad and section == "data" and host.data_note:
            raise OptionError(f"madpo config: data field(s) {bad} are not used with host: {host.name}; "
                              f"{host.data_note}; data takes {', '.join(known)} ({see})")
        if bad:
            rest = f" (other options go under {section}.flags; {see})" if "flags" in known else f" ({see})"
            raise OptionError(f"madpo config: unknown {section} field(s) {bad} for host: {host.name}; known: "
                              f"{', '.join(known)}{rest}")
    if "dataset" not in cfg["data"] and not (gen and gen.get("prompts")):
        raise OptionError(f"madpo config: data.dataset is required with host: {host.name} ({see})")
    for section in ("reward_model", "dpo"):
        if section in cfg and not cfg[section].get("pretrain"):
            raise OptionError(f"madpo config: {section}.pretrain is required with host: {host.name} ({see})")
        if section not in cfg:
            continue
        flags = cfg[section].get("flags") or {}
        if not isinstance(flags, dict):
            raise OptionError(f"madpo config: {section}.flags must be a mapping of option -> value ({see})")
        managed = host.managed.get(section, ())
        clash = sorted(k for k in flags if k in managed or k.replace("-", "_") in managed)
        if clash:
            raise OptionError(f"madpo config: {section}.flags sets {clash}, which the pipeline sets itself: use "
                              f"data.*, {section}.pretrain, {section}.output"
                              + (", dpo.loss and scoring.margin_key" if section == "dpo" else "") + " instead")
        cfg[section]["flags"] = flags


def _check_generation(cfg: dict) -> None:
    gen = cfg["generation"]
    reward = str(gen.get("reward", "rm"))
    if not (reward == "rm" or reward.startswith(("rm:", "fn:"))):
        raise OptionError(f"madpo config: generation.reward must be rm, rm:DIR or fn:module:function, got {reward}")
    gen["reward"] = reward
    gen.setdefault("margins", "rm" if "reward_model" in cfg else "label")
    if gen["margins"] not in ("rm", "label"):
        raise OptionError("madpo config: generation.margins must be rm (score stage) or label (reward_margin)")
    if (reward == "rm" or gen["margins"] == "rm") and "reward_model" not in cfg:
        raise OptionError("madpo config: generation.reward: rm and generation.margins: rm need the reward_model "
                          "section (or use reward: fn:module:function / rm:DIR with margins: label)")
    if cfg["dpo"].get("reference", "previous") not in ("previous", "initial"):
        raise OptionError("madpo config: dpo.reference must be previous or initial")


def _check_choices(cfg: dict, host: Host) -> None:
    loss = cfg["dpo"].setdefault("loss", "madpo")
    if host.losses is not None and loss not in host.losses:
        raise OptionError(f"madpo config: dpo.loss must be {_either(host.losses)}, got {loss!r}")
    if cfg["scoring"].get("margin_key", "rm_margin") == "margin":
        raise OptionError("madpo config: scoring.margin_key must not be 'margin' (TRL's RewardTrainer and OpenRLHF's "
                          "RewardDataset read a 'margin' column as a loss target); keep rm_margin")
    launch = shlex.split(str(cfg.setdefault("launcher", "python")))
    if not launch or launch[0] not in host.launchers:
        raise OptionError(f"madpo config: with host: {host.name}, launcher must start with {_either(host.launchers)}, "
                          f"got {cfg['launcher']!r} (see {host.example})")


def local_path(value, base: Path) -> str:
    """`value` read from the config's folder `base` when it names something there, starts with ./ ../ or ~, or its
    first folder is there; else as given (a hub name such as org/model, or a path from the current folder)."""
    text = os.path.expanduser(str(value))
    if os.path.isabs(text):
        return text
    first = Path(text).parts[0] if Path(text).parts else text
    if text.startswith(("./", "../")) or (base / text).exists() or (first != text and (base / first).is_dir()):
        return str((base / text).resolve())
    return text


def _items(key: str, value: str, host: Host) -> list[tuple[str, str]]:
    """(path, suffix) of each path a field names: a model is one; OpenRLHF reads a comma-separated list of datasets,
    each `path@data_dir`."""
    if key in ("pretrain", "reward") or not host.multi_dataset or ("," not in value and "@" not in value):
        return [(value, "")]
    items = [item.strip().partition("@") for item in value.split(",")]
    return [(path.strip(), sep + rest) for path, sep, rest in items]


def _resolve_paths(cfg: dict, host: Host, base: Path) -> None:
    for section, key in INPUTS:
        if (cfg.get(section) or {}).get(key) is None:
            continue
        items = _items(key, str(cfg[section][key]), host)
        cfg[section][key] = ",".join(local_path(path, base) + suffix for path, suffix in items)
    gen = cfg.get("generation") or {}
    if str(gen.get("reward", "")).startswith("rm:"):
        gen["reward"] = "rm:" + local_path(gen["reward"][3:], base)
    for section, key in OUTPUTS:
        if (cfg.get(section) or {}).get(key):
            cfg[section][key] = str((base / os.path.expanduser(str(cfg[section][key]))).resolve())
    cfg["workdir"] = str((base / os.path.expanduser(str(cfg.get("workdir") or "runs/madpo"))).resolve())
    cfg["_config_dir"] = str(base)


# ------------------------------------------------------------------------------------------------------- inputs
EXAMPLE_MODEL = "path/to/sft-model"
EXAMPLE_PAIRS = {"pairs.jsonl": "train", "pairs_eval.jsonl": "eval", "pairs/train.jsonl": "train",
                 "pairs/test.jsonl": "eval", "prompts.jsonl": "prompts"}
EXAMPLE_NAMES = {EXAMPLE_MODEL, "pairs", *EXAMPLE_PAIRS}


class InputCheck(NamedTuple):
    """What `check_inputs` found: local inputs that do not exist, and values taken as Hugging Face hub names."""

    missing: list  # "field path" of each local input that does not exist
    hub: list  # "field 'name'" of each value taken as a hub name
    base: str  # the config's folder
    examples: bool  # some of them are the names the shipped example configs use

    def notes(self) -> list[str]:
        """One line on the hub names (fetched at run time), one on the example assets; none when all is local."""
        lines = []
        if self.hub:
            lines.append(f"not found next to the config ({self.base}) or in the current folder, so taken as Hugging "
                         "Face hub names and fetched from the hub at run time (this machine may be offline): "
                         + ", ".join(self.hub))
        if self.examples:
            lines.append(f"`python -m po_plugins.cli.madpo --example_assets {self.base}` builds tiny offline "
                         "stand-ins for the inputs the shipped example configs name")
        return lines

    def error(self) -> OptionError:
        return OptionError(f"madpo config: not found: {'; '.join(self.missing)} (relative paths are read from the "
                           f"config's folder, {self.base})")


def _hub_name(text: str) -> bool:
    try:
        from huggingface_hub.utils import validate_repo_id

        validate_repo_id(text)
    except Exception:
        return False
    return True


def check_inputs(cfg: dict) -> InputCheck:
    """Every input path and model the config names: a file or folder that exists is fine; a local path (absolute
    once read, see `local_path`) that does not exist is missing; any other value is a Hugging Face hub name."""
    host, base = host_of(cfg), cfg["_config_dir"]
    named = [(f"{s}.{k}", str(cfg[s][k])) for s, k in INPUTS if (cfg.get(s) or {}).get(k) is not None]
    reward = str((cfg.get("generation") or {}).get("reward", ""))
    if reward.startswith("rm:"):
        named.append(("generation.reward", reward[3:]))
    missing, hub, examples = [], [], False
    for where, value in named:
        for path, _ in _items(where.split(".")[1], value, host):
            if Path(path).exists():
                continue
            if os.path.isabs(path):
                missing.append(f"{where} {path}")
            else:
                examples = examples or path in EXAMPLE_NAMES
                hub.append(f"{where} '{path}'" + ("" if _hub_name(path) else " (not a valid hub name either: name or "
                                                                            "org/name)"))
    return InputCheck(missing, hub, base, examples)


def example_assets(folder) -> list[tuple[Path, bool]]:
    """Tiny offline stand-ins for the inputs the shipped example configs name, written into `folder` (the examples'
    folder, examples/madpo): a random tiny causal LM with its tokenizer (path/to/sft-model/), 64 training and 16
    evaluation pairs (pairs.jsonl, pairs_eval.jsonl; the same as pairs/train.jsonl, pairs/test.jsonl for TRL) and the
    training prompts (prompts.jsonl). What exists is kept. Returns (path, built) per asset."""
    from po_plugins import tiny

    folder = Path(folder)
    rows = {"train": tiny.pair_rows(64, seed=0), "eval": tiny.pair_rows(16, seed=10_000)}
    rows["prompts"] = [{"prompt": r["prompt"]} for r in rows["train"]]
    out = []
    for rel in (EXAMPLE_MODEL, *EXAMPLE_PAIRS):
        path = folder / rel
        out.append((path, not path.exists()))
        if path.exists():
            continue
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        if rel == EXAMPLE_MODEL:
            tiny.make_model(tmp)
        else:
            tmp.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows[EXAMPLE_PAIRS[rel]]))
        os.replace(tmp, path)
    return out


# --------------------------------------------------------------------------------------------------------- plan
LAUNCH = {"python": lambda rest: [sys.executable, *rest, "-m"],
          "torchrun": lambda rest: [sys.executable, "-m", "torch.distributed.run", *rest,
                                    *([] if {"-m", "--module"} & set(rest) else ["-m"])],
          "deepspeed": lambda rest: ["deepspeed", *rest, "--module"],
          "accelerate": lambda rest: ["accelerate", *rest, "-m"]}


def launcher(cfg: dict) -> list[str]:
    """The prefix that runs a training module: python [opts] -m | torchrun ... -m | deepspeed ... --module |
    accelerate launch ... -m."""
    first, *rest = shlex.split(cfg["launcher"])
    return LAUNCH[first](rest)


def module_launch(nproc) -> list[str]:
    """The prefix of po_plugins' own scorer, generator and labeller: python -m, or torchrun on nproc processes."""
    nproc = int(nproc or 1)
    return [sys.executable, "-m"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "-m"]


def cpu_flags(host: Host, flags: dict) -> list[str]:
    """The host's CPU flags when no CUDA device is visible and the stage's flags do not decide them."""
    decide, add = host.cpu
    if any(k in flags for k in decide):
        return []
    import torch

    return [] if torch.cuda.is_available() else host.spell(add)


def outputs(cfg: dict) -> dict[str, Path]:
    w = Path(cfg["workdir"])
    return {"rm": Path((cfg.get("reward_model") or {}).get("output") or w / "rm"),
            "score": Path(cfg["scoring"].get("output") or w / host_of(cfg).scored),
            "dpo": Path(cfg["dpo"].get("output") or w / "policy")}


def margin_key(cfg: dict) -> str:
    return cfg["scoring"].get("margin_key", "rm_margin")


def rm_step(cfg: dict) -> Step:
    host, rm, out = host_of(cfg), cfg["reward_model"], outputs(cfg)["rm"]
    eval_ds = cfg["data"].get("eval_dataset")
    cmd = [*launcher(cfg), host.rm_module, host.model_flag, str(rm["pretrain"]),
           *host.pairs(cfg, cfg["data"]["dataset"], False), host.output_flag, str(out),
           *(["--eval.dataset", str(eval_ds)] if eval_ds else []), *cpu_flags(host, rm["flags"]),
           *host.spell(rm["flags"])]
    return Step("rm", "rm", cmd, out)


def score_steps(cfg: dict, dataset, written: bool, out: Path, prefix: str = "") -> list[Step]:
    """The scorer on `dataset` (one run, or one per split) with the pipeline's reward model."""
    host, sc = host_of(cfg), cfg["scoring"]
    opts = {k: v for k, v in sc.items() if k not in ("output", "margin_key", "nproc")}
    steps = []
    for split, data, path in _score_inputs(cfg, dataset, written, out):
        name = "score" if split in (None, cfg["data"].get("train_split")) else f"score {split}"
        cmd = [*module_launch(sc.get("nproc")), "po_plugins.cli.score_margins", *host.score_flags,
               "--model", str(outputs(cfg)["rm"]), *data, "--output", str(path), "--margin_key", margin_key(cfg),
               "--resume", *argparse_flags(opts)]
        steps.append(Step("score", prefix + name, cmd, path))
    return steps


def dpo_step(cfg: dict, policy, pairs: list[str], key: str, out: Path, ref=None, prefix: str = "") -> Step:
    host, dpo = host_of(cfg), cfg["dpo"]
    cmd = [*launcher(cfg), host.dpo_module, "--loss", dpo["loss"], "--po.margin_key", key,
           *host.spell({f"po.{k}": dpo[k] for k in MADPO_HP if k in dpo}), host.model_flag, str(policy),
           *(["--ref.model_name_or_path", str(ref)] if ref else []), *pairs, host.output_flag, str(out),
           *cpu_flags(host, dpo["flags"]), *host.spell(dpo["flags"])]
    return Step("dpo", prefix + "dpo", cmd, out)


def round_dir(cfg: dict, i: int) -> Path:
    return Path(cfg["workdir"]) / f"round_{i}"


def round_steps(cfg: dict, i: int) -> list[Step]:
    """generate, label, [score,] dpo of round i of iterative MADPO (see the module docstring)."""
    gen, dpo, data, d = cfg["generation"], cfg["dpo"], cfg["data"], round_dir(cfg, i)
    name, seed = f"round {i} ", int(gen.get("seed", 0)) + i
    policy = Path(dpo["pretrain"]) if i == 0 else round_dir(cfg, i - 1) / "policy"
    gen_flags = {k: gen[k] for k in ("n_samples", "backend", "temperature", "top_p", "top_k", "max_new_tokens",
                                     "batch_size") if k in gen}
    split = {"data.dataset_split": data["dataset_split"]} if "dataset_split" in data else {}
    generate = [*module_launch(gen.get("nproc")), "po_plugins.cli.generate", "--model", str(policy),
                *_data_flags(cfg, gen.get("prompts", data.get("dataset")), PROMPT_KEYS), *argparse_flags(split),
                "--output", str(d / "generated.jsonl"), "--seed", str(seed), "--resume", *argparse_flags(gen_flags),
                *argparse_flags(gen.get("flags"))]
    reward = f"rm:{outputs(cfg)['rm']}" if gen["reward"] == "rm" else gen["reward"]
    label = [*module_launch(gen.get("nproc")), "po_plugins.cli.label_pairs", "--input", str(d / "generated.jsonl"),
             "--output", str(d / "pairs.jsonl"), "--reward", reward, "--seed", str(seed),
             *_data_flags(cfg, None, [*PROMPT_KEYS, "max_len"]),
             "--chosen_key", data.get("chosen_key", "chosen"), "--rejected_key", data.get("rejected_key", "rejected"),
             "--resume", *argparse_flags({k: gen[k] for k in ("pairing", "ties") if k in gen}),
             *argparse_flags(gen.get("label_flags"))]
    steps = [Step("generate", name + "generate", generate, d / "generated.jsonl"),
             Step("label", name + "label", label, d / "pairs.jsonl")]
    pairs, key = d / "pairs.jsonl", "reward_margin"
    if gen["margins"] == "rm":
        steps += score_steps(cfg, pairs, True, d / "scored.jsonl", name)
        pairs, key = d / "scored.jsonl", margin_key(cfg)
    ref = dpo["pretrain"] if dpo.get("reference", "previous") == "initial" and i > 0 else None
    steps.append(dpo_step(cfg, policy, host_of(cfg).pairs(cfg, pairs, True), key, d / "policy", ref, name))
    return steps


def plan(cfg: dict) -> list[Step]:
    """Every step in order."""
    steps = [rm_step(cfg)] if "reward_model" in cfg else []
    if cfg.get("generation"):
        for i in range(cfg["rounds"]):
            steps += round_steps(cfg, i)
        return steps
    out = outputs(cfg)
    steps += score_steps(cfg, cfg["data"]["dataset"], False, out["score"])
    pairs = host_of(cfg).pairs(cfg, out["score"], True)
    return [*steps, dpo_step(cfg, cfg["dpo"]["pretrain"], pairs, margin_key(cfg), out["dpo"])]


# ---------------------------------------------------------------------------------------------------------- run
def complete(step: Step) -> bool:
    """A step is complete when its output exists and (for training stages) carries the done marker."""
    if step.stage in ("score", "generate", "label"):
        return step.output.is_file()  # these CLIs write atomically: the final name exists only when complete
    return (step.output / DONE).is_file()


def write_scored_card(folder: Path, steps: list[Step]) -> None:
    """folder/README.md naming each split's file, so `load_dataset(folder)` (TRL's --dataset_name) reads exactly
    those splits under their names (any split name; stray files are ignored).

    The one config is named after the files' content (`scored-<sha256>`): `datasets` keys its cache of a card's
    config by the config and its relative paths only, so under a fixed name a second pipeline (another workdir, or
    the same one re-scored) would silently train on the first one's cached rows."""
    import hashlib

    files = [step.output for step in steps if step.stage == "score" and step.output.parent == folder]
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode() + b"\0" + (f.read_bytes() if f.is_file() else b"") + b"\0")
    lines = ["---", "configs:", f"- config_name: scored-{digest.hexdigest()[:16]}", "  default: true",
             "  data_files:"]
    for f in files:
        lines += [f"  - split: {json.dumps(f.stem)}", f"    path: {json.dumps(f.name)}"]
    lines += ["---", "", "Preference pairs with reward-model margins, written by po_plugins.cli.madpo.", ""]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "README.md").write_text("\n".join(lines))


def execute(cfg: dict, steps: list[Step], say: Callable, force=(), dry_run: bool = False) -> int:
    """Run every step that is not complete (or whose stage is in `force`) in order; `say(line, err=False)` reports
    each. Returns the first failing exit status, else 0. A dry run only says the commands."""
    if not dry_run:
        Path(cfg["workdir"]).mkdir(parents=True, exist_ok=True)
    for step in steps:
        if step.stage == "dpo" and host_of(cfg).per_split and not dry_run:  # after scoring: named by its content
            write_scored_card(outputs(cfg)["score"], steps)
        if complete(step) and step.stage not in force:
            say(f"[madpo] {step.name}: done already ({step.output}), skipped")
            continue
        say(f"[madpo] {step.name}: {shlex.join(step.command)}")
        if dry_run:
            continue
        rc = subprocess.run(step.command).returncode
        if rc != 0:
            say(f"[madpo] {step.name} failed (exit {rc}); fix it and run the same command again: finished stages "
                "are skipped", err=True)
            return rc
        if step.stage in ("rm", "dpo"):
            (step.output / DONE).write_text(json.dumps({"stage": step.stage, "command": step.command}) + "\n")
    return 0


__all__ = ["HOSTS", "Host", "Step", "STAGES", "InputCheck", "load_config", "check_inputs", "plan",
           "execute", "example_assets", "argparse_flags", "hf_flags"]
