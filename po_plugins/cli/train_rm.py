"""OpenRLHF's stock reward-model trainer (MADPO stage 1), behind the same host check and CPU handling as train_dpo.

    deepspeed --module po_plugins.cli.train_rm <every stock openrlhf.cli.train_rm flag>
    (also: torchrun -m po_plugins.cli.train_rm ..., python -m po_plugins.cli.train_rm ...)

Nothing is patched: `openrlhf.cli.train_rm` runs unchanged. Then score pairs with `po_plugins.cli.score_margins`.
"""

from __future__ import annotations

import runpy
import sys

MODULE = "openrlhf.cli.train_rm"


def main(argv: list[str] | None = None) -> None:
    from po_plugins.hosts.openrlhf import prepare_process

    rest = list(sys.argv[1:] if argv is None else argv)
    prepare_process()
    sys.argv = [MODULE, *rest]
    runpy.run_module(MODULE, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    from po_plugins._dist import finish_process

    main()
    finish_process()
