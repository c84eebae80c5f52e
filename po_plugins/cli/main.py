"""`po-plugins`: the one console command (pyproject.toml [project.scripts]), with a subcommand per CLI module.

    po-plugins train-dpo --loss rc_dpo ...            = python -m po_plugins.cli.train_dpo --loss rc_dpo ...
    po-plugins llamafactory train cfg.yaml            = python -m po_plugins.cli.llamafactory train cfg.yaml
    po-plugins <command> --help                       that command's flags (a host wrapper's own, then the host's)

Each subcommand calls its module's `main(argv)` with the remaining arguments unchanged; only the chosen module is
imported, so `po-plugins --help` needs no host framework. The `python -m po_plugins.cli.<module>` forms keep working
(the DeepSpeed launcher needs them: `deepspeed --module po_plugins.cli.train_dpo ...`).

Exit status: 0 on success, else the module's own; a typed po_plugins error (`po_plugins.errors.PoError`) ends the
command with one line "po_plugins: ..." on stderr and status 1 (`po_plugins.cli._common.user_errors`). A new command
is one entry of COMMANDS (a module with `main(argv)`).
"""

from __future__ import annotations

import importlib
import sys
from typing import NamedTuple

from po_plugins.cli._common import EXIT_USAGE, user_errors
from po_plugins.errors import OptionError, nearest

PROG = "po-plugins"


class Command(NamedTuple):
    module: str  # imported only when the command runs; it has main(argv)
    summary: str  # the one line of `po-plugins --help`
    finish: bool = False  # a training CLI: end like its `python -m` form (po_plugins._dist.finish_process)


COMMANDS: dict[str, Command] = {
    "train-dpo": Command("po_plugins.cli.train_dpo", "OpenRLHF's train_dpo with a po_plugins objective (--loss, "
                         "--po.*) and the band monitor", True),
    "train-rm": Command("po_plugins.cli.train_rm", "OpenRLHF's stock reward-model trainer (MADPO stage 1)", True),
    "trl-dpo": Command("po_plugins.cli.trl_dpo", "TRL's `trl dpo` script with po_plugins' trainer and options", True),
    "llamafactory": Command("po_plugins.cli.llamafactory", "llamafactory-cli; `train cfg.yaml` runs the DPO stage "
                            "with the plugin's po_* keys", True),
    "score-margins": Command("po_plugins.cli.score_margins", "score preference pairs with a reward model: the "
                             "margin column for MADPO"),
    "generate": Command("po_plugins.cli.generate", "sample responses from a policy for each prompt (on-policy "
                        "pairs)"),
    "label-pairs": Command("po_plugins.cli.label_pairs", "reward sampled responses and pick chosen / rejected "
                           "pairs"),
    "madpo": Command("po_plugins.cli.madpo", "the MADPO pipeline from one YAML: reward model, margins, "
                     "margin-adaptive DPO"),
    "diagnose": Command("po_plugins.cli.diagnose", "check a preference dataset before training: the band at the "
                        "initial model, shared response starts, a recommendation"),
    "report": Command("po_plugins.cli.report", "plot the band monitor traces (po_band.jsonl) of runs as PNGs and "
                      "index.html"),
    "demo": Command("po_plugins.demo", "tiny offline OpenRLHF DPO vs RC-DPO run and its band report (make demo)"),
}


def overview() -> str:
    width = max(map(len, COMMANDS)) + 2
    lines = [f"usage: {PROG} <command> [args ...]", "",
             "Preference optimization for OpenRLHF, TRL and LLaMA-Factory: po_plugins objectives, the "
             "disentanglement-band monitor, MADPO.", "", "commands:"]
    lines += [f"  {name:<{width}}{cmd.summary}" for name, cmd in COMMANDS.items()]
    lines += ["", f"`{PROG} <command> --help` lists a command's flags (train-dpo, train-rm, trl-dpo, llamafactory: "
              "the plugin's,", "then the host's). Each command is also `python -m <module>`, e.g. "
              "python -m po_plugins.cli.train_dpo,", "which the DeepSpeed launcher needs: "
              "deepspeed --module po_plugins.cli.train_dpo --loss rc_dpo ..."]
    return "\n".join(lines)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("po-plugins")
    except PackageNotFoundError:
        return "unknown"


def dispatch(name: str, argv: list[str]) -> int:
    """Run command `name` with `argv` unchanged; returns its exit status."""
    cmd = COMMANDS.get(name)
    if cmd is None:
        raise OptionError(f"unknown command '{name}'{nearest(name, COMMANDS)}; `{PROG} --help` lists the commands: "
                          + ", ".join(COMMANDS))
    module = importlib.import_module(cmd.module)
    sys.argv = [f"{PROG} {name}", *argv]  # argparse's program name in the command's usage line
    status = module.main(list(argv))
    if cmd.finish:
        from po_plugins._dist import finish_process

        finish_process()
    return 0 if status is None else int(status)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(overview(), file=sys.stderr)
        return EXIT_USAGE
    first, rest = argv[0], argv[1:]
    if first in ("-h", "--help"):
        print(overview())
        return 0
    if first == "--version":
        print(f"{PROG} {_version()}")
        return 0
    if first == "help":  # `po-plugins help train-dpo` = `po-plugins train-dpo --help`
        if not rest:
            print(overview())
            return 0
        first, rest = rest[0], ["--help"]
    with user_errors():
        return dispatch(first, rest)


if __name__ == "__main__":
    sys.exit(main())
