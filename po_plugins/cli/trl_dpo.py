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
from po_plugins.options import (
    OPTIONS,
    OptionError,
    check_loss,
    check_options,
    coerce_hparam,
    nearest,
    options_for,
    parse_value,
    refuse_option,
    split_plugin_argv,
)

MODULE = "trl.scripts.dpo"


def translate(argv: list[str]) -> list[str]:
    """--loss / --po.* -> TRL parser flags for PoDPOConfig (--po_loss, --po_<option>, --po_hparams JSON)."""
    from po_plugins.losses import accepted_hparams, names

    loss, raw, rest = split_plugin_argv(argv)
    if loss is not None and loss not in names():
        raise OptionError(f"unknown loss '{loss}' (--loss){nearest(loss, names())}; choose one of: "
                          f"{', '.join(names())}")
    options = options_for("trl")
    accepted = accepted_hparams(loss) if loss else {}
    po, hparams = {}, {}
    for name, (val, flag) in raw.items():
        if name in options:
            po[name] = parse_value(OPTIONS[name][0], val, flag)
        elif name == "beta":
            raise OptionError("the temperature is TRL's --beta (not --po.beta)")
        elif name in accepted:
            hparams[name] = coerce_hparam(accepted[name], val, flag)
        elif name in OPTIONS:
            refuse_option("trl", name, flag)
        else:
            raise OptionError(f"unknown flag {flag}{nearest(name, set(options) | set(accepted) - {'beta'})} for "
                              f"--loss {loss}; accepted --po.* flags: "
                              f"{', '.join(sorted(set(options) | set(accepted) - {'beta'}))} (the temperature is "
                              "--beta)" if loss else f"unknown flag {flag}: give --loss NAME for a hyperparameter, or "
                              f"one of {', '.join('--po.' + k for k in options)}")
    check_options({**{k: OPTIONS[k][1] for k in options}, **po})
    if loss:
        check_loss(loss, hparams)
    out = list(rest)
    if loss:
        out += ["--po_loss", loss]
    for k, v in po.items():
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
