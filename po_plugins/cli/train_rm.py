"""OpenRLHF's stock reward-model trainer (MADPO stage 1), behind the same host check and CPU handling as train_dpo.

    deepspeed --module po_plugins.cli.train_rm <every stock openrlhf.cli.train_rm flag>
    (also: po-plugins train-rm ..., torchrun -m po_plugins.cli.train_rm ..., python -m po_plugins.cli.train_rm ...)

Nothing is patched: `openrlhf.cli.train_rm` runs unchanged. Then score pairs with `po-plugins score-margins`
(po_plugins.cli.score_margins).
"""

from __future__ import annotations

import runpy
import sys

from po_plugins.cli._common import user_errors

MODULE = "openrlhf.cli.train_rm"


def plugin_help() -> str:
    return ("po_plugins: OpenRLHF's stock reward-model trainer, run unchanged (MADPO stage 1); it has no po_plugins "
            "flags.\nThen score the pairs with `po-plugins score-margins --model <its --ckpt.output_dir> ...`. "
            "OpenRLHF's own options follow:")


def main(argv: list[str] | None = None) -> None:
    rest = list(sys.argv[1:] if argv is None else argv)
    if "-h" in rest or "--help" in rest:
        print(plugin_help() + "\n", flush=True)
    with user_errors():
        from po_plugins.hosts.openrlhf import prepare_process

        prepare_process()
        sys.argv = [MODULE, *rest]
        runpy.run_module(MODULE, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    from po_plugins._dist import finish_process

    main()
    finish_process()
