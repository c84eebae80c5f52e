"""OpenRLHF's train_dpo with po_plugins objectives and the disentanglement-band monitor.

    deepspeed --module po_plugins.cli.train_dpo --loss rc_dpo <every stock openrlhf.cli.train_dpo flag>
    (also: torchrun -m po_plugins.cli.train_dpo ..., python -m po_plugins.cli.train_dpo ...)

The plugin's own flags are pre-parsed here; every other flag goes to the real `openrlhf.cli.train_dpo`, which
runs unmodified (its parser, validation, model/dataset construction and saving) with the seams of
po_plugins.hosts.openrlhf patched in.
"""

from __future__ import annotations

import runpy
import sys
from types import SimpleNamespace

from po_plugins.cli._common import user_errors
from po_plugins.options import OPTIONS, OptionError, options_for, parse_plugin_flags

HOST = "openrlhf"


def split_argv(argv: list[str]) -> tuple[SimpleNamespace, list[str]]:
    """Take --loss and --po.* out of argv; return (plugin options, host argv). OptionError for a bad flag."""
    loss, po, hparams, rest = parse_plugin_flags(HOST, argv, default_loss="dpo")
    if po["margin_key"] == "margin":
        raise OptionError("--po.margin_key must not be 'margin' (OpenRLHF reads that column as the reward-model "
                          "margin-loss target); use e.g. rm_margin")
    beta_given = any(a == "--model.beta" or a.startswith("--model.beta=") for a in rest)
    return SimpleNamespace(loss=loss, hparams=hparams, beta_given=beta_given, **po), rest


def plugin_help() -> str:
    from po_plugins.losses import names

    lines = ["po_plugins options (the host's own options follow):",
             "  --loss NAME            one of: " + ", ".join(names()),
             "  --po.<hparam> VALUE    a hyperparameter of the chosen loss (e.g. --po.gamma 1.0); "
             "the temperature is --model.beta"]
    for k in options_for(HOST):
        _kind, default, text = OPTIONS[k]
        lines.append(f"  --po.{k:<17} {text} (default {default})")
    return "\n".join(lines)


def prepare(argv: list[str]) -> list[str]:
    """Parse plugin flags, check the host, apply CPU shims where there is no GPU, patch the seams."""
    from po_plugins.hosts import openrlhf as host

    po, rest = split_argv(argv)
    if "-h" in rest or "--help" in rest:
        print(plugin_help() + "\n")
    host.prepare_process()
    host.install(po)
    return rest


def main(argv: list[str] | None = None, module: str = "openrlhf.cli.train_dpo") -> None:
    with user_errors():  # every po_plugins error, at start or from inside the run: one line and status 1
        rest = prepare(list(sys.argv[1:] if argv is None else argv))
        sys.argv = [module, *rest]
        runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    from po_plugins._dist import finish_process

    main()
    finish_process()
