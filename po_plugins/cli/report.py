"""Render the disentanglement-band monitor trace(s) of one or more runs as PNGs plus ``index.html``.

Usage::

    po-plugins report RUN_DIR [RUN_DIR ...] --out DIR [--labels a,b] [--smooth N]
    (or: python -m po_plugins.cli.report ...)

Each RUN_DIR must contain ``po_band.jsonl`` (written when training runs with ``--po.monitor`` or an
``rc_*`` loss); a path to the ``.jsonl`` file itself is accepted too. A ``po_heldout.json`` next to the trace (a
measurement on held-out pairs, written by ``make demo`` or ``po_plugins.report.write_heldout`` for that very trace) is
shown too, labelled "held-out pairs (N pairs)", apart from the probe batch's numbers; one written for an earlier trace
is left out with a warning. Prints the path of index.html.
Exit codes: 0 ok, 1 unreadable trace or matplotlib missing, 2 usage error / missing run or trace; each error is one
line "po_plugins: ..." on stderr (`main` returns the status; a typed po_plugins error from the library ends the
command through `po_plugins.cli._common.user_errors`, status 1).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from po_plugins.cli._common import EXIT_USAGE, user_errors
from po_plugins.report import HELDOUT_NAME, TRACE_NAME, MissingDependencyError, TraceError, load_trace, write_report

MONITOR_HINT = "the run must be started with the monitor on (--po.monitor or an rc_* loss)"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m po_plugins.cli.report",
        description=f"Plot the disentanglement-band monitor trace ({TRACE_NAME}) of one or more runs, with the "
                    f"held-out measurement ({HELDOUT_NAME}) where a run directory has one.",
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help=f"run output directory holding {TRACE_NAME}")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for the PNGs and index.html")
    p.add_argument("--labels", default=None, help="comma-separated run labels, one per RUN_DIR "
                   "(default: meta.loss from the trace header, else the directory name)")
    p.add_argument("--smooth", type=int, default=1, metavar="N",
                   help="trailing moving average over N steps (default 1: raw)")
    return p


def _trace_path(arg: str) -> Path:
    p = Path(arg)
    if p.is_file() and p.suffix == ".jsonl":
        return p
    return p / TRACE_NAME


def _dir_name(run_arg: str) -> str:
    p = Path(run_arg).resolve()
    return (p.parent.name if p.is_file() else p.name) or str(run_arg)


def _default_label(trace, run_arg: str) -> str:
    meta = getattr(trace, "meta", {}) or {}
    loss = meta.get("loss") or meta.get("loss_name")
    if isinstance(loss, str) and loss.strip():
        return loss.strip()
    return _dir_name(run_arg)


def _unique(labels: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for lab in labels:
        seen[lab] = seen.get(lab, 0) + 1
        out.append(lab if labels.count(lab) == 1 else f"{lab} [{seen[lab]}]")
    return out


def _error(message: str) -> None:
    print(f"po_plugins: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Write the report; returns the exit status (0, 1 or 2, see above)."""
    args = _parser().parse_args(argv)
    with user_errors():
        return _report(args)


def _report(args) -> int:
    err = sys.stderr
    if args.smooth < 1:
        _error(f"--smooth must be >= 1, got {args.smooth}")
        return EXIT_USAGE
    labels = None
    if args.labels is not None:
        labels = [s.strip() for s in args.labels.split(",")]
        if len(labels) != len(args.run_dirs) or not all(labels):
            _error(f"--labels has {len(labels)} entr{'y' if len(labels) == 1 else 'ies'} "
                   f"for {len(args.run_dirs)} RUN_DIR(s); give one non-empty label per run")
            return EXIT_USAGE

    missing = []
    for arg in args.run_dirs:
        run = Path(arg)
        if not run.exists():
            missing.append(f"run directory not found: {run}")
        elif not _trace_path(arg).is_file():
            missing.append(f"no {TRACE_NAME} in {run} (expected {_trace_path(arg)})")
    if missing:
        _error("; ".join(missing) + f" -- {MONITOR_HINT}")
        return EXIT_USAGE

    traces = []
    for arg in args.run_dirs:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                trace = load_trace(_trace_path(arg))
            except (TraceError, OSError) as exc:
                _error(str(exc))
                return 1
        for w in caught:
            print(f"warning: {w.message}", file=err)
        if not trace:
            print(f"warning: {trace.path}: no step records yet", file=err)
        traces.append(trace)

    names = labels or [_default_label(t, a) for t, a in zip(traces, args.run_dirs, strict=True)]
    if labels is None and len(set(names)) < len(names):
        # e.g. two runs of the same loss: fall back to directory names before numbering
        dir_names = [_dir_name(a) for a in args.run_dirs]
        names = [d if names.count(n) > 1 else n for n, d in zip(names, dir_names, strict=True)]
    names = _unique(names)

    try:
        index = write_report(dict(zip(names, traces, strict=True)), args.out, smooth=args.smooth)
    except MissingDependencyError as exc:
        _error(str(exc))
        return 1
    print(index)
    return 0


if __name__ == "__main__":
    sys.exit(main())
