"""Run any stock OpenRLHF CLI module on CPU: ``python -m po_plugins._cpu.run_stock <module> [flags...]``.

Applies :func:`po_plugins._cpu.apply_cpu_shims` (a no-op when CUDA is available) and, when no launcher
set ``RANK``/``WORLD_SIZE``, :func:`po_plugins._cpu.ensure_single_process_env`; then executes ``<module>``
as ``__main__`` with the remaining flags, exactly as ``python -m <module>`` would. Works under
``torchrun --nproc_per_node N -m po_plugins._cpu.run_stock ...`` and ``deepspeed --module ...`` too.
"""

import runpy
import sys

from po_plugins._cpu import apply_cpu_shims, ensure_single_process_env


def main(argv=None) -> None:
    """Shim, then run ``argv[0]`` as ``__main__`` with ``argv[1:]`` as its command line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        raise SystemExit("usage: python -m po_plugins._cpu.run_stock <module> [flags...]")
    module, rest = argv[0], argv[1:]
    ensure_single_process_env()
    apply_cpu_shims()
    sys.argv = [module, *rest]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
