"""Helpers shared by the experiment scripts of benchmarks/ (displacement.py, madpo_tiers.py)."""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
from pathlib import Path

T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def cpu_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)))


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def mean_ci(xs: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval (normal quantile from 10 values on); nan for one value."""
    m = statistics.fmean(xs)
    if len(xs) < 2:
        return m, float("nan")
    return m, T975.get(len(xs) - 1, 1.96) * statistics.stdev(xs) / math.sqrt(len(xs))


def run_checked(module: str, args: list, cwd: Path, log: Path, threads: int = 1) -> None:
    """`python -m module args` offline in a fresh process (po_plugins.tiny.run_module); its output goes to `log`;
    a failure ends the experiment with the log's tail."""
    from po_plugins.tiny import run_module

    Path(cwd).mkdir(parents=True, exist_ok=True)
    res = run_module(module, args, cwd, timeout=7200, env_extra={"OMP_NUM_THREADS": str(threads)})
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(res.stdout + res.stderr)
    if res.returncode != 0:
        sys.stderr.write((res.stdout + res.stderr)[-4000:])
        raise RuntimeError(f"{module} failed (exit {res.returncode}); log: {log}")


def save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parser(doc: str, default_out: str):
    """The flags every experiment takes: --quick, --out, --docs."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny synthetic model and data (what the tests run)")
    ap.add_argument("--out", default=default_out)
    ap.add_argument("--docs", default=None, help="write the PNG to DOCS/img/ (default: OUT/img/)")
    return ap
