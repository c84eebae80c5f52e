"""tests/vllm needs vLLM (the opt-in `make test-vllm` venv) and tests/llamafactory needs LLaMA-Factory (the
`make test-lf` venv, .venv-lf); the main suite does not even collect them without those packages."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest

collect_ignore = [] if importlib.util.find_spec("vllm") is not None else ["vllm"]
if importlib.util.find_spec("llamafactory") is None:
    collect_ignore.append("llamafactory")


def _nearest_alpha_counts(recs, margin, tol=1e-4):
    """rc_target nearest, one micro-batch per step: α = 1 exactly where the step's own log r (the trace's calibrated
    log r − 2 log α) lies inside its band shrunk by `margin` of the half-width, and where the band is undefined;
    elsewhere α²r is on the nearest edge of that shrunk band. Returns (steps in band, steps moved)."""
    inside = moved = 0
    for r in recs:
        a = r["alpha"]
        if r["band_lower"] is None or r["log_r"] is None:
            assert a == 1.0, r
            continue
        half = (1 - margin) * (r["band_upper"] - r["band_lower"]) / 2
        lo, hi = r["log_r_star"] - half, r["log_r_star"] + half
        own = r["log_r"] - 2 * math.log(a)
        if lo + tol < own < hi - tol:
            assert a == 1.0, r
            inside += 1
        elif not lo - tol <= own <= hi + tol:
            assert a != 1.0 and min(abs(r["log_r"] - lo), abs(r["log_r"] - hi)) < tol and r["in_band"] == 1.0, r
            moved += 1
    return inside, moved


def _load_benchmark(name: str):
    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    if str(bench) not in sys.path:
        sys.path.insert(0, str(bench))  # the script's own imports (common, band_regimes, ...)
    spec = importlib.util.spec_from_file_location(f"bench_{name}", bench / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def load_benchmark():
    """`load_benchmark("regimes")`: benchmarks/regimes.py as a module, for tests of its functions."""
    return _load_benchmark


@pytest.fixture
def nearest_alpha_counts():
    """The check of an rc_target nearest trace that the OpenRLHF, TRL and LLaMA-Factory end-to-end tests share."""
    return _nearest_alpha_counts
