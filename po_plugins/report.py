"""Offline report for the disentanglement-band (DB) monitor trace ``<RUN_DIR>/po_band.jsonl``.

The trainer writes one JSON object per optimizer step (keys ``step, loss_name, z_w, z_l, log_r,
log_r_star, rho, band_lower, band_upper, slack, in_band, alpha, ...``), optionally preceded by a
header line ``{"meta": {...}}``. This module reads such traces, summarises them and renders PNG
figures plus a self-contained ``index.html``.

Only :func:`write_report` needs matplotlib; it is imported lazily so that :func:`load_trace` and
:func:`summarize` work in a bare install (``pip install po-plugins[report]`` adds it).

Non-finite values (``null``, ``NaN``, ``Infinity``) are tolerated everywhere: they are excluded from
means and are simply not drawn. A band without edges (rho <= 0: ``band_lower``/``band_upper``/``slack`` null, or
``-inf``/``+inf`` in old traces; every ratio is in band) has no edge to shade: the band plot marks those steps
(``ρ ≤ 0: no edge, every ratio in band``), and the steps where a mean incentive is <= 0 (no ratio, no band).

Held-out pairs. The trace's re-scored changes (``probe_delta_z_*``) are those of the probe batch, a micro-batch the
run trained on. A measurement on pairs the run did not train on can sit next to the trace as ``po_heldout.json``
(:data:`HELDOUT_NAME`, written by :func:`write_heldout`; ``make demo`` writes one per run): the report then shows it,
labelled "held-out pairs (N pairs)", with the numbers formatted as the demo prints them (:func:`fmt_nats`).
"""

from __future__ import annotations

import hashlib
import html
import json
import math
import warnings
from pathlib import Path
from typing import Any

TRACE_NAME = "po_band.jsonl"
HELDOUT_NAME = "po_heldout.json"
INSTALL_HINT = "pip install po-plugins[report]"

# name -> (file name, caption). Order is the order in index.html.
FIGURES: dict[str, tuple[str, str]] = {
    "band": ("band.png", "log r = log(mean d_w / mean d_l) against the disentanglement band "
                         "[log r* + log ρ, log r* − log ρ]; crosses mark out-of-band steps. Where ρ ≤ 0 the band "
                         "has no edges (every ratio is in band): hatched columns; grey columns: a mean incentive "
                         "≤ 0 (no ratio, no band; the verdict is the sign conditions)."),
    "likelihood": ("likelihood.png", "Policy log-likelihoods z_w (solid, chosen) and z_l (dashed, rejected): batch "
                                     "means (top); change since the start on the same pairs: the probe batch "
                                     "(training pairs) re-scored, and stars for the held-out pairs where the run "
                                     "directory has po_heldout.json (bottom)."),
    "in_band": ("in_band.png", "Running fraction of optimizer steps inside the band."),
    "alpha": ("alpha.png", "Calibration factor alpha (1.0 when not calibrating)."),
    "slack": ("slack.png", "Band slack = distance of log r to the nearer band edge (>= 0 means in band)."),
}


class TraceError(ValueError):
    """A ``po_band.jsonl`` file that cannot be read (malformed line in the middle, wrong type, ...)."""


class MissingDependencyError(ImportError):
    """matplotlib is not installed."""


class Trace(list):
    """A list of per-step records (dicts) that also carries the header ``meta``, the source path, the file's
    sha256 and the run's held-out measurement (``heldout``: :func:`load_heldout`'s dict, or None)."""

    def __init__(self, records=(), meta: dict | None = None, path: Path | None = None, sha256: str | None = None,
                 heldout: dict | None = None):
        super().__init__(records)
        self.meta: dict = dict(meta or {})
        self.path: Path | None = path
        self.sha256: str | None = sha256
        self.heldout: dict | None = heldout


# ---------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------

def load_trace(path: str | Path) -> Trace:
    """Read a monitor trace.

    ``path`` is either a run directory (``<path>/po_band.jsonl`` is read) or the JSONL file itself.
    Returns a :class:`Trace` (a ``list[dict]`` of step records, with ``.meta`` and ``.path``).

    * Blank lines are ignored.
    * ``{"meta": {...}}`` lines are merged into ``.meta`` (normally only the first line is one).
    * An unparsable *last* line (a run that crashed mid-write) is skipped with a warning.
    * An unparsable line anywhere else, or a line that is not a JSON object, raises :class:`TraceError`
      naming the file and the 1-based line number.
    * ``po_heldout.json`` next to the file, written for this very trace, becomes ``.heldout`` (:func:`load_heldout`).
    """
    p = Path(path)
    if p.is_dir():
        p = p / TRACE_NAME
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file")

    raw = p.read_bytes()
    lines = raw.decode("utf-8", errors="replace").splitlines()
    numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]

    records: list[dict] = []
    meta: dict[str, Any] = {}
    for pos, (lineno, line) in enumerate(numbered):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            if pos == len(numbered) - 1:
                warnings.warn(f"{p}:{lineno}: skipping truncated last line ({exc.msg})", stacklevel=2)
                break
            raise TraceError(f"{p}:{lineno}: invalid JSON: {exc.msg} (column {exc.colno})") from exc
        if not isinstance(obj, dict):
            raise TraceError(f"{p}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        if set(obj) == {"meta"}:
            if not isinstance(obj["meta"], dict):
                raise TraceError(f"{p}:{lineno}: 'meta' must be a JSON object")
            meta.update(obj["meta"])
            continue
        records.append(obj)
    sha = hashlib.sha256(raw).hexdigest()
    return Trace(records, meta=meta, path=p, sha256=sha, heldout=load_heldout(p, sha))


# ---------------------------------------------------------------------------------------------------
# Held-out pairs (po_heldout.json)
# ---------------------------------------------------------------------------------------------------

def fmt_nats(value: float) -> str:
    """A log-prob change as the demo prints it and the report shows it: signed, two decimals (``-16.80``)."""
    return f"{value:+.2f}"


def fmt_share(value: float) -> str:
    """A fraction of pairs as the demo prints it and the report shows it (``100%``)."""
    return f"{value:.0%}"


def write_heldout(run_dir: str | Path, *, pairs: int, delta_z_w: float, delta_z_l: float,
                  chosen_down_frac: float | None = None, **about) -> Path:
    """Write ``<run_dir>/po_heldout.json``: the mean change of the summed chosen / rejected response log-probs of
    ``pairs`` held-out pairs (not trained on) between the initial model and the model the run saved, and the
    fraction of those pairs whose chosen log-prob fell. ``about`` adds descriptive keys (dataset, models, who
    measured). The record is tied to the run's current ``po_band.jsonl`` by its sha256 (``trace_sha256``), so the
    report ignores it, with a warning, once a later run has replaced the trace. Returns the path."""
    run_dir = Path(run_dir)
    trace = run_dir / TRACE_NAME
    if not trace.is_file():
        raise FileNotFoundError(f"{trace}: no such file (the held-out record is tied to the run's trace)")
    rec = {"pairs": int(pairs), "delta_z_w": float(delta_z_w), "delta_z_l": float(delta_z_l),
           "chosen_down_frac": None if chosen_down_frac is None else float(chosen_down_frac)}
    rec = {**about, **rec, "trace_sha256": hashlib.sha256(trace.read_bytes()).hexdigest()}
    bad = _heldout_problem(rec)
    if bad:
        raise ValueError(f"write_heldout: {bad}")
    out = run_dir / HELDOUT_NAME
    out.write_text(json.dumps(rec, indent=1) + "\n", encoding="utf-8")
    return out


def _heldout_problem(rec: Any) -> str | None:
    if not isinstance(rec, dict):
        return "not a JSON object"
    n = rec.get("pairs")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        return f"'pairs' must be a positive integer, got {n!r}"
    for key in ("delta_z_w", "delta_z_l"):
        v = rec.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return f"'{key}' must be a finite number, got {v!r}"
    f = rec.get("chosen_down_frac")
    if f is not None and (isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 <= f <= 1.0):
        return f"'chosen_down_frac' must be null or a number in [0, 1], got {f!r}"
    return None


def load_heldout(trace_path: str | Path, trace_sha256: str | None = None) -> dict | None:
    """The held-out record next to a trace (``po_heldout.json`` in its directory), or None when there is none.

    A record that is not valid, or that was written for another version of the trace (its ``trace_sha256`` differs
    from ``trace_sha256``, computed from the file when not given), is ignored with a warning.
    """
    trace_path = Path(trace_path)
    p = trace_path.parent / HELDOUT_NAME
    if not p.is_file():
        return None
    try:
        rec = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        warnings.warn(f"{p}: unreadable held-out record ({exc}): not shown", stacklevel=3)
        return None
    bad = _heldout_problem(rec)
    if bad:
        warnings.warn(f"{p}: not a held-out record ({bad}): not shown", stacklevel=3)
        return None
    if trace_sha256 is None:
        trace_sha256 = hashlib.sha256(trace_path.read_bytes()).hexdigest()
    if rec.get("trace_sha256") != trace_sha256:
        warnings.warn(f"{p}: measured for another {trace_path.name} than the one now in {p.parent} (trace_sha256 "
                      "differs: the trace changed since, e.g. a later run replaced it): not shown; measure the "
                      "held-out pairs again",
                      stacklevel=3)
        return None
    return rec


# ---------------------------------------------------------------------------------------------------
# Numeric helpers (pure Python: no numpy needed for summaries)
# ---------------------------------------------------------------------------------------------------

def _num(value: Any) -> float | None:
    """A finite float, or None for null / NaN / +-inf / non-numeric values."""
    if value is None:
        return None
    if isinstance(value, bool):
        return float(value)
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _flag(value: Any) -> bool | None:
    """in_band as a bool; None when missing/null/NaN."""
    if value is None:
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        low = value.strip().lower()
        if low in ("true", "yes"):
            return True
        if low in ("false", "no"):
            return False
    f = _num(value)
    return None if f is None else f > 0.5


def _series(records: list[dict], key: str) -> list[float | None]:
    return [_num(r.get(key)) for r in records]


def _steps(records: list[dict]) -> list[float]:
    """The ``step`` of each record; its 1-based position where the step is missing or invalid."""
    out = []
    for i, r in enumerate(records):
        s = _num(r.get("step"))
        out.append(float(i + 1) if s is None else s)
    return out


def _first_last(values: list[float | None]) -> tuple[float | None, float | None]:
    finite = [v for v in values if v is not None]
    return (finite[0], finite[-1]) if finite else (None, None)


def _mean(values: list[float | None]) -> float | None:
    finite = [v for v in values if v is not None]
    return sum(finite) / len(finite) if finite else None


def summarize(records: list[dict]) -> dict:
    """Summary numbers for one run.

    Keys: ``steps`` (number of step records), ``first_step``, ``last_step``, ``loss_name``,
    ``delta_z_w`` / ``delta_z_l``: the change of the chosen / rejected log-likelihood on the same pairs, i.e. the
    last finite ``probe_delta_z_w`` / ``probe_delta_z_l`` (the monitor's fixed probe batch re-scored, change since
    the start; None when the trace has no re-score), ``delta_step`` (the step it was measured at),
    ``batch_delta_z_w`` / ``batch_delta_z_l`` (last minus first batch mean: different pairs, a trend only),
    ``in_band_frac`` (over records whose in_band is not null), ``alpha_mean`` and ``slack_mean`` (over finite
    values), ``alarm_step`` (the step the measured-displacement alarm fired, ``probe_alarm``; None: it did not).
    Values that cannot be computed are None.
    """
    steps = _steps(records)
    zw0, zw1 = _first_last(_series(records, "z_w"))
    zl0, zl1 = _first_last(_series(records, "z_l"))
    probe = [(r.get("step"), _num(r.get("probe_delta_z_w")), _num(r.get("probe_delta_z_l"))) for r in records]
    probe = [p for p in probe if p[1] is not None and p[2] is not None]
    flags = [f for f in (_flag(r.get("in_band")) for r in records) if f is not None]
    alarms = [r.get("step") for r in records if _num(r.get("probe_alarm"))]
    loss_names = [r.get("loss_name") for r in records if isinstance(r.get("loss_name"), str)]
    return {
        "steps": len(records),
        "first_step": steps[0] if steps else None,
        "last_step": steps[-1] if steps else None,
        "loss_name": loss_names[-1] if loss_names else None,
        "delta_z_w": probe[-1][1] if probe else None,
        "delta_z_l": probe[-1][2] if probe else None,
        "delta_step": probe[-1][0] if probe else None,
        "batch_delta_z_w": None if zw0 is None else zw1 - zw0,
        "batch_delta_z_l": None if zl0 is None else zl1 - zl0,
        "in_band_frac": sum(flags) / len(flags) if flags else None,
        "alpha_mean": _mean(_series(records, "alpha")),
        "slack_mean": _mean(_series(records, "slack")),
        "alarm_step": alarms[0] if alarms else None,
    }


# ---------------------------------------------------------------------------------------------------
# Plotting
# ---------------------------------------------------------------------------------------------------

def _require_matplotlib():
    try:
        import matplotlib
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise MissingDependencyError(
            f"the po_plugins report needs matplotlib, which is not installed: {INSTALL_HINT}"
        ) from exc
    return matplotlib, Figure


def _arr(values):
    import numpy as np

    return np.array([np.nan if v is None else v for v in values], dtype=float)


def _smooth(y, n: int):
    """Trailing NaN-aware moving average over ``n`` points (identity for n <= 1)."""
    import numpy as np

    if n <= 1 or y.size == 0:
        return y
    ok = np.isfinite(y)
    vals = np.where(ok, y, 0.0)
    csum = np.concatenate([[0.0], np.cumsum(vals)])
    ccnt = np.concatenate([[0], np.cumsum(ok)])
    idx = np.arange(y.size)
    lo = np.maximum(idx + 1 - n, 0)
    s = csum[idx + 1] - csum[lo]
    c = ccnt[idx + 1] - ccnt[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(c > 0, s / np.maximum(c, 1), np.nan)
    # do not invent values where the raw series itself is missing
    return np.where(ok, out, np.nan)


def _colour(i: int) -> str:
    return f"C{i % 10}"


def _marker_kw(n: int) -> dict:
    # lines do not show isolated points between gaps; small markers keep short traces visible
    return {"marker": "o", "markersize": 2.5} if n <= 60 else {}


def _no_data(ax, what: str = "no data") -> None:
    ax.text(0.5, 0.5, what, transform=ax.transAxes, ha="center", va="center", color="0.5")


def _plot_lines(ax, runs, key, smooth, *, style="-", label_fmt="{label}", raw_alpha=0.25) -> bool:
    """One line per run (colour = run). With smoothing the raw series is drawn faintly behind."""
    import numpy as np

    drew = False
    for i, (label, records) in enumerate(runs.items()):
        x = np.array(_steps(records))
        y = _arr(_series(records, key))
        if not np.isfinite(y).any():
            continue
        drew = True
        c = _colour(i)
        if smooth > 1:
            ax.plot(x, y, style, color=c, lw=0.8, alpha=raw_alpha)
        ax.plot(x, _smooth(y, smooth), style, color=c, lw=1.6, label=label_fmt.format(label=label),
                **_marker_kw(len(x)))
    return drew


NO_EDGE_LABEL = "ρ ≤ 0: no edge, every ratio in band"
NO_RATIO_LABEL = "mean incentive ≤ 0: no ratio, no band (verdict from the signs)"
_RHO_EPS = 1e-12  # po_plugins.band.EPS: the monitor writes edges only where ρ exceeds it


def _edgeless(records: list[dict]) -> tuple[list[bool], list[bool]]:
    """Per step: (the band has no edges because ρ ≤ 0, so every ratio is in band; there is no ratio, a mean incentive
    being ≤ 0, and the verdict comes from the sign conditions). Steps without a verdict (non-finite values, no
    statistics) are in neither."""
    no_edge, no_ratio = [], []
    for r in records:
        rho, log_r = _num(r.get("rho")), _num(r.get("log_r"))
        no_edge.append(rho is not None and rho <= _RHO_EPS and log_r is not None)
        no_ratio.append(log_r is None and _flag(r.get("in_band")) is not None)
    return no_edge, no_ratio


def _spans(x, mask) -> list[tuple[float, float]]:
    """Contiguous runs of steps where ``mask`` holds, as (start, end) in step units, half a step either side."""
    import numpy as np

    idx = np.flatnonzero(np.asarray(mask, dtype=bool))
    if not idx.size:
        return []
    half = 0.5 * (float(np.median(np.abs(np.diff(x)))) if x.size > 1 else 1.0) or 0.5
    groups = np.split(idx, np.flatnonzero(np.diff(idx) > 1) + 1)
    return [(float(x[g[0]]) - half, float(x[g[-1]]) + half) for g in groups]


def _mark_edgeless(ax, x, records) -> None:
    """Columns over the steps whose band has no edges to shade, with a legend entry and a short tag on each."""
    from matplotlib.transforms import blended_transform_factory

    top = blended_transform_factory(ax.transData, ax.transAxes)
    no_edge, no_ratio = _edgeless(records)
    for mask, label, tag, colour, hatch in ((no_edge, NO_EDGE_LABEL, "ρ ≤ 0", "tab:green", "//"),
                                            (no_ratio, NO_RATIO_LABEL, "no ratio", "0.5", "..")):
        spans = _spans(x, mask)
        for k, (lo, hi) in enumerate(spans):
            ax.axvspan(lo, hi, facecolor=colour, edgecolor=colour, alpha=0.12, hatch=hatch, lw=0,
                       label=label if k == 0 else "_nolegend_")
            if len(spans) <= 8:
                ax.text((lo + hi) / 2, 0.97, tag, transform=top, ha="center", va="top", fontsize=7, color=colour)


def _fig_band(Figure, runs, smooth):
    import numpy as np

    n = len(runs)
    fig = Figure(figsize=(10, 2.9 * n + 0.6), layout="constrained")
    axes = fig.subplots(n, 1, squeeze=False)[:, 0]
    for i, ((label, records), ax) in enumerate(zip(runs.items(), axes, strict=True)):
        x = np.array(_steps(records))
        log_r = _arr(_series(records, "log_r"))
        centre = _arr(_series(records, "log_r_star"))
        lower = _arr(_series(records, "band_lower"))
        upper = _arr(_series(records, "band_upper"))
        summ = summarize(records)
        frac = summ["in_band_frac"]
        ax.set_title(f"{label}" + ("" if frac is None else f"  (in band: {frac:.0%} of steps)"),
                     loc="left", fontsize=11)
        ax.set_ylabel("log(d_w / d_l)")
        ax.grid(alpha=0.3)
        if not x.size or not (np.isfinite(log_r).any() or np.isfinite(centre).any()):
            _no_data(ax)
            continue
        ax.fill_between(x, _smooth(lower, smooth), _smooth(upper, smooth), color="tab:green", alpha=0.18,
                        lw=0, label="band (log r* ± log ρ)")
        _mark_edgeless(ax, x, records)
        ax.plot(x, _smooth(centre, smooth), "--", color="tab:green", lw=1.3, label="centre log r*")
        if smooth > 1:
            ax.plot(x, log_r, color=_colour(i), lw=0.8, alpha=0.3)
        ax.plot(x, _smooth(log_r, smooth), color=_colour(i), lw=1.6, label="log r", **_marker_kw(len(x)))
        flags = [_flag(r.get("in_band")) for r in records]
        out = np.array([f is False for f in flags]) & np.isfinite(log_r)
        if out.any():
            ax.plot(x[out], log_r[out], "x", color="tab:red", ms=5, mew=1.2, label="out of band")
        ax.legend(loc="best", fontsize=8, ncol=4)
    axes[-1].set_xlabel("optimizer step")
    fig.suptitle("Incentive ratio against the disentanglement band", fontsize=12)
    return fig


def _heldout(records) -> dict | None:
    return getattr(records, "heldout", None)


PROBE_TRAINING = "probe batch (training pairs)"


def probe_label(records) -> str:
    """What the run's probe pairs are: the first training micro-batch, or the held-out pairs of ``--po.probe_file``
    where the trace's header names that file (``meta.probe_file``)."""
    f = (getattr(records, "meta", {}) or {}).get("probe_file")
    return f"probe: held-out pairs ({Path(f).name})" if isinstance(f, str) and f.strip() else PROBE_TRAINING


def probe_title(runs) -> str:
    """The probe's label when every run has the same kind of probe, else 'probe' (each row then says which)."""
    labels = {probe_label(r) for r in runs.values()}
    return labels.pop() if len(labels) == 1 else "probe"


def heldout_title(runs) -> str:
    """'held-out pairs (N pairs)' when every run with a held-out record has the same N, else 'held-out pairs'."""
    counts = {h["pairs"] for h in map(_heldout, runs.values()) if h}
    return f"held-out pairs ({counts.pop()} pairs)" if len(counts) == 1 else "held-out pairs"


def _fig_likelihood(Figure, runs, smooth):
    import numpy as np
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(10, 7.5), layout="constrained")
    ax_z, ax_d = fig.subplots(2, 1, sharex=True)
    title_counts = {h["pairs"] for h in map(_heldout, runs.values()) if h}
    handles = []
    drew = False
    for i, (label, records) in enumerate(runs.items()):
        x = np.array(_steps(records))
        c = _colour(i)
        handles.append(Line2D([], [], color=c, lw=2, label=label))
        for key, style in (("z_w", "-"), ("z_l", "--")):
            y = _arr(_series(records, key))
            if np.isfinite(y).any():
                drew = True
                if smooth > 1:
                    ax_z.plot(x, y, style, color=c, lw=0.8, alpha=0.25)
                ax_z.plot(x, _smooth(y, smooth), style, color=c, lw=1.6, **_marker_kw(len(x)))
            p = _arr(_series(records, "probe_" + key.replace("z_", "delta_z_")))
            ok = np.isfinite(p)
            if ok.any():  # re-scored on the same pairs every recheck_every steps: the points themselves
                drew = True
                ax_d.plot(np.concatenate([[0.0], x[ok]]), np.concatenate([[0.0], p[ok]]), style, color=c, lw=1.6,
                          marker="o", ms=3)
        fired = [r.get("step") for r in records if _num(r.get("probe_alarm"))]
        if fired:  # the measured-displacement alarm: where the probe's chosen fell past the threshold
            ax_d.axvline(fired[0], color=c, lw=1.2, ls=":")
            ax_d.annotate("alarm", (fired[0], 0), color=c, fontsize=8, xytext=(3, 4), textcoords="offset points")
        held = _heldout(records)
        if held and x.size:  # pairs not trained on: initial model -> the model the run saved, at the last step
            drew = True
            end = float(np.nanmax(x))
            n = "" if len(title_counts) == 1 else f" ({held['pairs']} pairs)"
            for key, fill in (("delta_z_w", c), ("delta_z_l", "none")):
                ax_d.plot([end], [held[key]], "*", color=c, mfc=fill, ms=12, mew=1.3)
                ax_d.annotate(f"held-out {fmt_nats(held[key])}{n}", (end, held[key]), color=c, fontsize=8,
                              xytext=(7, -3), textcoords="offset points")
    handles += [Line2D([], [], color="k", ls="-", label="chosen z_w"),
                Line2D([], [], color="k", ls="--", label="rejected z_l")]
    ax_z.set_title("Policy log-likelihoods, batch means (different pairs at every step)", loc="left", fontsize=11)
    ax_z.set_ylabel("z = log π(y|x)")
    ax_d.set_title(f"Change since the start on the same pairs: {probe_title(runs)}, re-scored"
                   + ("\nstars: " + heldout_title(runs) + ", initial → saved model" if title_counts else ""),
                   loc="left", fontsize=11)
    if title_counts:
        ax_d.legend(handles=[Line2D([], [], color="k", ls="-", marker="o", ms=3, label=probe_title(runs)),
                             Line2D([], [], color="k", ls="none", marker="*", ms=10,
                                    label=heldout_title(runs) + ": chosen"),
                             Line2D([], [], color="k", ls="none", marker="*", mfc="none", ms=10,
                                    label=heldout_title(runs) + ": rejected")], loc="best", fontsize=8)
    ax_d.set_ylabel("z(t) − z(start)")
    ax_d.set_xlabel("optimizer step")
    ax_d.axhline(0, color="0.3", lw=0.8)
    for ax in (ax_z, ax_d):
        ax.grid(alpha=0.3)
        if not drew:
            _no_data(ax)
    ax_z.legend(handles=handles, loc="best", fontsize=8, ncol=2)
    return fig


def _fig_in_band(Figure, runs, smooth):
    import numpy as np

    fig = Figure(figsize=(10, 4.2), layout="constrained")
    ax = fig.subplots()
    drew = False
    for i, (label, records) in enumerate(runs.items()):
        x = np.array(_steps(records))
        flags = [_flag(r.get("in_band")) for r in records]
        ok = np.array([f is not None for f in flags], dtype=bool)
        if not ok.any():
            continue
        drew = True
        hits = np.cumsum([1.0 if f else 0.0 for f in flags])
        counts = np.cumsum(ok)
        with np.errstate(invalid="ignore", divide="ignore"):
            frac = np.where(counts > 0, hits / np.maximum(counts, 1), np.nan)
        ax.plot(x, frac, color=_colour(i), lw=1.6, label=label, **_marker_kw(len(x)))
    ax.set_ylim(-0.02, 1.02)
    return _finish(fig, ax, "Running fraction of steps in the band", "fraction in band", drew)


def _finish(fig, ax, title, ylabel, drew):
    """Title, axis labels, grid and legend of a one-panel figure (or the no-data note)."""
    ax.set_title(title, loc="left", fontsize=11)
    ax.set_ylabel(ylabel)
    ax.set_xlabel("optimizer step")
    ax.grid(alpha=0.3)
    if drew:
        ax.legend(loc="best", fontsize=8)
    else:
        _no_data(ax)
    return fig


def _fig_alpha(Figure, runs, smooth):
    import numpy as np

    fig = Figure(figsize=(10, 4.2), layout="constrained")
    ax = fig.subplots()
    drew = _plot_lines(ax, runs, "alpha", smooth)
    ax.axhline(1.0, color="0.3", lw=0.8, ls=":")
    vals = np.concatenate([_arr(_series(r, "alpha")) for r in runs.values()] or [np.array([])])
    vals = vals[np.isfinite(vals)]
    if vals.size and (vals > 0).all() and vals.max() / vals.min() > 20:
        ax.set_yscale("log")
    return _finish(fig, ax, "Calibration factor α (1 = no calibration)", "α", drew)


def _fig_slack(Figure, runs, smooth):
    fig = Figure(figsize=(10, 4.2), layout="constrained")
    ax = fig.subplots()
    drew = _plot_lines(ax, runs, "slack", smooth)
    ax.axhline(0.0, color="tab:red", lw=1.0)
    return _finish(fig, ax, "Band slack (≥ 0: in band; unbounded-band steps are not drawn)", "slack", drew)


_BUILDERS = {
    "band": _fig_band,
    "likelihood": _fig_likelihood,
    "in_band": _fig_in_band,
    "alpha": _fig_alpha,
    "slack": _fig_slack,
}


# ---------------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------------

def _fmt(value: Any, kind: str = "num") -> str:
    if value is None:
        return "—"
    if kind == "int":
        return str(int(value))
    if kind == "pct":
        return f"{100.0 * value:.1f}%"
    if kind == "nats":  # a log-prob change, as the demo prints it
        return fmt_nats(value)
    return f"{value:+.4g}" if kind == "signed" else f"{value:.4g}"


def _html(
    runs: dict[str, list[dict]], summaries: dict[str, dict], figures: dict[str, str], smooth: int
) -> str:
    esc = html.escape
    held_title, pr_title = heldout_title(runs), probe_title(runs)
    per_cell_count = held_title == "held-out pairs"  # runs measured on different numbers of pairs
    rows = []
    for label, records in runs.items():
        s = summaries[label]
        meta = getattr(records, "meta", {}) or {}
        loss = meta.get("loss") or meta.get("loss_name") or s["loss_name"]
        probe_which = "" if pr_title != "probe" else f" ({esc(probe_label(records))})"  # runs differ in probe
        h = _heldout(records)
        if h:  # as the demo prints them (fmt_nats, fmt_share)
            count = f" ({h['pairs']} pairs)" if per_cell_count else ""
            down = "—" if h.get("chosen_down_frac") is None else fmt_share(h["chosen_down_frac"])
            held = (f'<td class="heldout_w">{fmt_nats(h["delta_z_w"])}{count}</td>'
                    f'<td class="heldout_l">{fmt_nats(h["delta_z_l"])}</td><td class="heldout_down">{down}</td>')
        else:
            held = "<td>—</td><td>—</td><td>—</td>"
        rows.append(
            "<tr>"
            f"<td>{esc(str(label))}</td><td>{esc(str(loss)) if loss else '—'}</td>"
            f"<td>{_fmt(s['steps'], 'int')}</td>"
            f"<td>{_fmt(s['delta_z_w'], 'nats')}{probe_which}</td><td>{_fmt(s['delta_z_l'], 'nats')}</td>"
            f"{held}"
            f"<td>{_fmt(s['in_band_frac'], 'pct')}</td>"
            f"<td>{_fmt(s['alpha_mean'])}</td><td>{_fmt(s['slack_mean'], 'signed')}</td>"
            f"<td>{'step ' + _fmt(s['alarm_step'], 'int') if s['alarm_step'] is not None else '—'}</td>"
            "</tr>"
        )
    details = []
    for label, records in runs.items():
        meta = getattr(records, "meta", {}) or {}
        path = getattr(records, "path", None)
        if not meta and path is None:
            continue
        body = ""
        if path is not None:
            body += f"<p>source: <code>{esc(str(path))}</code></p>"
        if meta:
            body += f"<pre>{esc(json.dumps(meta, indent=2, sort_keys=True, default=str))}</pre>"
        details.append(f"<details><summary>{esc(str(label))}: run metadata</summary>{body}</details>")
    figs = []
    for name, fname in figures.items():
        caption = FIGURES[name][1]
        figs.append(
            f'<figure><img src="{esc(fname)}" alt="{esc(name)}">'
            f"<figcaption>{esc(caption)}</figcaption></figure>"
        )
    smooth_note = f" Lines are trailing moving averages over {smooth} steps." if smooth > 1 else ""
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Disentanglement-band report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #ccc; padding: 4px 10px; text-align: right; }}
th:first-child, td:first-child, td:nth-child(2) {{ text-align: left; }}
th {{ background: #f3f3f3; }}
figure {{ margin: 2em 0; }}
img {{ max-width: 100%; border: 1px solid #eee; }}
figcaption {{ color: #555; font-size: 0.9em; }}
pre {{ background: #f7f7f7; padding: 0.6em; overflow-x: auto; }}
</style>
</head>
<body>
<h1>Disentanglement-band report</h1>
<p>Trace: <code>{TRACE_NAME}</code> (one record per optimizer step). Δz is the change of the mean log-likelihood
of a response (summed over its tokens) on the same pairs since the start. <b>Probe batch (training pairs)</b>: the
monitor's probe batch, the first micro-batch the run trained on, re-scored every <code>recheck_every</code> steps; its
last value ("—": no re-score in the trace). A run whose trace header names a <code>--po.probe_file</code>
(<code>probe_file</code>) re-scored those pairs instead: "probe: held-out pairs (its file)".
<b>Held-out pairs</b>: pairs the run did not train on, scored with the
initial model and with the model the run saved (<code>{HELDOUT_NAME}</code> in the run directory: written by
<code>make demo</code> or <code>po_plugins.report.write_heldout</code>; "—": none), shown as the demo prints them;
"chosen falls on": the share of those pairs whose chosen log-prob fell. Trained-on and unseen pairs can move
differently. Means skip null/NaN/±inf; in-band fraction counts steps with a non-null indicator. Alarm: the step
where the probe's chosen log-likelihood was measured to have fallen past <code>--po.probe_alarm_nats</code>
(dotted line on the likelihood plot).{smooth_note}</p>
<table>
<thead><tr><th colspan="3"></th><th colspan="2">{esc(pr_title)}</th><th colspan="3">{esc(held_title)}</th>
<th colspan="4"></th></tr>
<tr><th>run</th><th>loss</th><th>steps</th><th>Δz_w</th><th>Δz_l</th><th>Δz_w</th><th>Δz_l</th><th>chosen falls on</th>
<th>in band</th><th>mean α</th><th>mean slack</th><th>alarm</th></tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody>
</table>
{chr(10).join(details)}
{chr(10).join(figs)}
</body>
</html>
"""


def write_report(
    runs: dict[str, list[dict]], out_dir: str | Path, *, smooth: int = 1, dpi: int = 110
) -> Path:
    """Render the five figures and ``index.html`` into ``out_dir``; return the path of ``index.html``.

    ``runs`` maps a label to the records of one run (e.g. a :class:`Trace` from :func:`load_trace`;
    its ``.meta`` and ``.path`` are shown in the page when present). ``smooth`` > 1 draws trailing
    moving averages over that many steps (the raw series is drawn faintly behind).
    """
    if not runs:
        raise ValueError("write_report: no runs given")
    smooth = max(int(smooth), 1)
    _, Figure = _require_matplotlib()
    from matplotlib.ticker import MaxNLocator
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    figures: dict[str, str] = {}
    for name, builder in _BUILDERS.items():
        fname = FIGURES[name][0]
        fig = builder(Figure, runs, smooth)
        for ax in fig.axes:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        fig.savefig(out / fname, dpi=dpi, format="png")
        figures[name] = fname

    summaries = {label: summarize(records) for label, records in runs.items()}
    index = out / "index.html"
    index.write_text(_html(runs, summaries, figures, smooth), encoding="utf-8")
    return index
