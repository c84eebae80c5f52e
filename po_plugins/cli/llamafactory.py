"""LLaMA-Factory's own training (`llamafactory-cli train`) with po_plugins' objectives, band monitor and margins.

    po-plugins llamafactory train cfg.yaml [key=value ...]       (or: python -m po_plugins.cli.llamafactory train ...)

The YAML is LLaMA-Factory's (stage: dpo), with `pref_loss:` any po_plugins objective (rc_* included) or one of
LLaMA-Factory's own names (sigmoid, hinge, ipo, orpo, simpo: they train what their names say), and the plugin's
`po_*` keys: po_<hyperparameter> or po_hparams (the loss's hyperparameters by paper name; β is pref_beta),
po_monitor, po_alert_steps, po_recheck_every, po_score_every, po_score_chunk, po_jsonl, po_margin_key,
po_missing_margin, po_weight_key (`--help` lists them with their meaning and defaults; docs/llamafactory.md).
Per-dataset margin / weight columns go in dataset_info.json ("columns": {"margin": "rm_margin", "weight": "w"}).
`key=value` overrides work as with llamafactory-cli.

With FORCE_TORCHRUN=1 or several GPUs, LLaMA-Factory re-launches its own launcher under torchrun (which would lose
this wrapper); this wrapper launches torchrun on itself instead (NNODES, NODE_RANK, NPROC_PER_NODE, MASTER_ADDR,
MASTER_PORT as LLaMA-Factory reads them), so every worker installs the plugin. Supported: llamafactory>=0.9.5,<0.9.6
(checked at start). Every other command (`version`, `env`, ...) goes to llamafactory-cli unchanged.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

from po_plugins.cli._common import user_errors
from po_plugins.options import OPTIONS, OptionError, options_for

USAGE = ("usage: po-plugins llamafactory train cfg.yaml [key=value ...]\n"
         "       po-plugins llamafactory <other llamafactory-cli command> ...   (version, env, chat, export, ...)\n"
         "  (python -m po_plugins.cli.llamafactory ... is the same command)\n"
         "  a LLaMA-Factory DPO YAML (stage: dpo) with pref_loss: <po_plugins objective, or sigmoid,\n"
         "  hinge, ipo, orpo, simpo> and po_* keys (docs/llamafactory.md)")
_DIST_ENV = ("LOCAL_RANK", "TORCHELASTIC_RUN_ID")
# the YAML keys that are not options.OPTIONS entries: (key, meaning, default); po_weight_key only where OPTIONS lacks it
_HPARAM_KEYS = (
    ("po_<hyperparameter>", "a hyperparameter of the objective by its paper's name (e.g. po_gamma: 1.0); the "
                            "objective's β is LLaMA-Factory's pref_beta", "the objective's own"),
    ("po_hparams", "the same as one mapping (po_hparams: {gamma: 1.0}) or a JSON object", "{}"),
)
_WEIGHT_KEY = ("po_weight_key", "a dataset column of per-row loss weights (each pair's loss times its weight)", None)
NO_HOST = ("LLaMA-Factory's own options: LLaMA-Factory is not installed in this environment; run this help in "
           "LLaMA-Factory's environment (pip install 'po-plugins[llamafactory]') to list them, or see "
           "`llamafactory-cli train --help` there.")


def _yaml_value(value) -> str:
    return "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def plugin_help() -> str:
    """USAGE and the plugin's YAML keys with their meaning and defaults (no LLaMA-Factory import)."""
    from po_plugins.losses import names

    objectives = ", ".join(names())
    lines = [USAGE, "", "po_plugins YAML keys (LLaMA-Factory's own options follow):",
             f"  {'pref_loss':<22} a po_plugins objective ({objectives}) or LLaMA-Factory's own sigmoid, hinge, ipo, "
             "orpo, simpo (they train what their names say)"]
    for key, text, default in _HPARAM_KEYS:
        lines.append(f"  {key:<22} {text} (default {default})")
    keys = [("po_" + k, OPTIONS[k][2], OPTIONS[k][1]) for k in options_for("llamafactory")]
    if _WEIGHT_KEY[0] not in {k for k, _, _ in keys}:
        keys.append(_WEIGHT_KEY)
    for key, text, default in keys:
        lines.append(f"  {key:<22} {text}" + ("" if default is None else f" (default {_yaml_value(default)})"))
    lines.append('  dataset_info.json: "columns": {"margin": "rm_margin", "weight": "w"} names a dataset\'s own margin '
                 "and weight columns (they take precedence over po_margin_key / po_weight_key)")
    return "\n".join(lines)


def print_help(command: str = "help") -> None:
    """The plugin's keys, then LLaMA-Factory's own help (train: its training arguments; else its command list), or a
    line saying where that help is when LLaMA-Factory is not installed here."""
    print(plugin_help() + "\n", flush=True)
    if importlib.util.find_spec("llamafactory") is None:
        print(NO_HOST)
        return
    _prepare()
    if command != "train":
        _llamafactory_cli(["help"])
        return
    from llamafactory.hparams import get_train_args

    saved = sys.argv
    sys.argv = ["po-plugins llamafactory train"]  # the usage line's program name
    try:
        get_train_args(["--help"])  # LLaMA-Factory's HfArgumentParser prints its help and exits
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    finally:
        sys.argv = saved


def _prepare() -> None:
    """CPU stand-ins before LLaMA-Factory is imported (only when no GPU is present)."""
    from po_plugins._cpu.lf import apply_lf_cpu_shims

    apply_lf_cpu_shims()


def _host():
    """The LLaMA-Factory adapter, after its host check (HostError: missing or unsupported LLaMA-Factory)."""
    _prepare()
    from po_plugins.hosts import llamafactory as host

    host.check_host()
    return host


def _under_launcher() -> bool:
    return any(k in os.environ for k in _DIST_ENV)


def _wants_torchrun() -> bool:
    from llamafactory.extras.misc import get_device_count, is_env_enabled

    if _under_launcher():
        return False
    if is_env_enabled("USE_MCA"):
        raise OptionError("USE_MCA (Megatron) runs its own DPO trainer, which po_plugins cannot reach: unset USE_MCA")
    return is_env_enabled("FORCE_TORCHRUN") or get_device_count() > 1


def _torchrun(argv: list[str]) -> int:
    """torchrun on this module (LLaMA-Factory's launcher would re-exec its own file and lose the plugin)."""
    from llamafactory.extras.misc import find_available_port, get_device_count

    nproc = os.getenv("NPROC_PER_NODE", str(max(get_device_count(), 1)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", os.getenv("NNODES", "1"),
           "--nproc_per_node", nproc]
    master_addr = os.getenv("MASTER_ADDR", "127.0.0.1")
    master_port = os.getenv("MASTER_PORT", str(find_available_port()))
    if os.getenv("RDZV_ID") is not None:
        nnodes = os.getenv("NNODES", "1")
        if os.getenv("MIN_NNODES") and os.getenv("MAX_NNODES"):
            nnodes = f"{os.environ['MIN_NNODES']}:{os.environ['MAX_NNODES']}"
        cmd[cmd.index("--nnodes") + 1] = nnodes
        cmd += ["--rdzv-id", os.environ["RDZV_ID"], "--rdzv-backend", "c10d", "--rdzv-endpoint",
                f"{master_addr}:{master_port}", "--max-restarts", os.getenv("MAX_RESTARTS", "0")]
    else:
        cmd += ["--node_rank", os.getenv("NODE_RANK", "0"), "--master_addr", master_addr, "--master_port", master_port]
    env = dict(os.environ)  # each worker runs this module, so it applies the CPU stand-in and the plugin itself
    print(f"[po_plugins] launching {nproc} workers under torchrun", flush=True)
    return subprocess.run(cmd + ["-m", "po_plugins.cli.llamafactory", "train", *argv], env=env).returncode


def read_config(argv: list[str]) -> dict:
    """The YAML / JSON config and its key=value overrides, merged by LLaMA-Factory's own read_args."""
    from llamafactory.hparams import read_args

    saved = sys.argv
    sys.argv = [saved[0], *argv]
    try:
        args = read_args()
    finally:
        sys.argv = saved
    if not isinstance(args, dict):
        raise OptionError("give a YAML or JSON config: po-plugins llamafactory train cfg.yaml [key=value ...]")
    return args


def run(args: dict, callbacks=None) -> None:
    """LLaMA-Factory's run_exp on `args` (a parsed YAML dict, po_* keys included) with the plugin installed."""
    host = _host()
    lf_args, cfg = host.split_args(args)
    if lf_args.get("use_ray"):
        raise OptionError("use_ray runs LLaMA-Factory's workers in Ray actors that this wrapper cannot reach: drop "
                          "use_ray (multi-GPU: FORCE_TORCHRUN=1 / NPROC_PER_NODE)")
    host.install(cfg)
    import torch.distributed as dist
    from llamafactory.train.tuner import run_exp

    destroy = dist.destroy_process_group

    def synced_destroy(*a, **kw):
        # LLaMA-Factory tears the process group down at the end of training on each rank as it gets there; rank 0
        # still saves the model then, and a gloo peer leaving early was seen to abort at exit: meet first
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()
        return destroy(*a, **kw)

    dist.destroy_process_group = synced_destroy
    try:
        run_exp(args=lf_args, callbacks=list(callbacks or []))
    finally:
        dist.destroy_process_group = destroy


def train(argv: list[str]) -> int:
    """`train cfg.yaml [key=value ...]`; typed errors (OptionError, HostError) propagate to main."""
    if not argv or argv[0] in ("-h", "--help"):
        print_help("train")
        return 0
    _host()
    if _wants_torchrun():
        return _torchrun(argv)
    args = read_config(argv)
    run(args)
    return 0


def _llamafactory_cli(argv: list[str]) -> None:
    from llamafactory.cli import main as lf_main

    sys.argv = [sys.argv[0], *argv]
    lf_main()


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else "help"
    with user_errors():
        if command == "train":
            rc = train(argv[1:])
            if rc:
                raise SystemExit(rc)
            return
        if command in ("help", "-h", "--help"):
            print_help()
            return
        _prepare()
        _llamafactory_cli(argv)


if __name__ == "__main__":
    from po_plugins._dist import finish_process

    main()
    finish_process()
