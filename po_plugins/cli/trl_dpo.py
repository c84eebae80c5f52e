"""TRL's own DPO script (`trl dpo`, trl/scripts/dpo.py) with po_plugins' trainer and options.

    python -m po_plugins.cli.trl_dpo --loss rc_dpo --po.gamma 1.0 <every `trl dpo` flag, or --config x.yaml>
    accelerate launch -m po_plugins.cli.trl_dpo ...      torchrun --nproc_per_node N -m po_plugins.cli.trl_dpo ...

`--loss NAME` and `--po.<option or hyperparameter> V` are this wrapper's (the same flags as po_plugins.cli.train_dpo
on OpenRLHF); they become PoDPOConfig's po_* fields, which a YAML given with --config may also set (po_loss: rc_dpo,
po_hparams: {gamma: 1.0}, po_monitor: true, ...). Every other flag goes to TRL's parser unchanged, and TRL's script
runs unmodified with `trl.DPOConfig` / `trl.DPOTrainer` pointing at po_plugins.trl's PoDPOConfig / PoDPOTrainer.
"""

from __future__ import annotations

import json
import runpy
import sys

from po_plugins.cli._common import user_errors
from po_plugins.options import OPTIONS, options_for, parse_plugin_flags

MODULE = "trl.scripts.dpo"


def translate(argv: list[str]) -> list[str]:
    """--loss / --po.* -> TRL parser flags for PoDPOConfig (--po_loss, --po_<option>, --po_hparams JSON)."""
    loss, given, hparams, rest = parse_plugin_flags("trl", argv, fill_defaults=False)
    out = list(rest)
    if loss:
        out += ["--po_loss", loss]
    for k, v in given.items():
        out += [f"--po_{k}", str(v)]
    if hparams:
        out += ["--po_hparams", json.dumps(hparams)]
    return out


def plugin_help() -> str:
    from po_plugins.losses import names

    lines = ["po_plugins options (TRL's own options follow):",
             "  --loss NAME            one of: " + ", ".join(names()),
             "  --po.<hparam> VALUE    a hyperparameter of the chosen loss (e.g. --po.gamma 1.0); the temperature "
             "is --beta"]
    for k in options_for("trl"):
        _kind, default, text = OPTIONS[k]
        lines.append(f"  --po.{k:<17} {text} (default {default})")
    lines.append("  (reference log-probs stored ahead: TRL's --precompute_ref_log_probs)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    with user_errors():  # every po_plugins error, at start or from inside TRL's script: one line and status 1
        rest = translate(argv)
        if "-h" in rest or "--help" in rest:
            print(plugin_help() + "\n")
        from po_plugins.hosts import trl as host  # checks the installed TRL (HostError naming the fix)

        trl = sys.modules["trl"]
        trl.DPOConfig = host.PoDPOConfig
        trl.DPOTrainer = host.PoDPOTrainer
        sys.argv = [MODULE, *rest]
        runpy.run_module(MODULE, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    from po_plugins._dist import finish_process

    main()
    finish_process()  # TRL's script leaves the process group open
