"""Tests for the band-monitor report (po_plugins.report and python -m po_plugins.cli.report)."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from po_plugins.cli.report import main
from po_plugins.report import (
    MissingDependencyError,
    TraceError,
    load_trace,
    summarize,
    write_report,
)

REPO = Path(__file__).resolve().parents[1]
PNG_SIG = b"\x89PNG\r\n\x1a\n"
PNGS = ["band.png", "likelihood.png", "in_band.png", "alpha.png", "slack.png"]

# Run A: rc loss with a header, out-of-band steps, nulls, NaN, an unbounded band (rho <= 0) and a
# trailing line cut off mid-write. Written as raw text so that NaN / Infinity / null appear literally.
RUN_A_LINES = [
    '{"meta": {"loss": "rc_dpo", "beta": 0.1, "db_beta": 0.9}}',
    '{"step": 1, "loss_name": "rc_dpo", "z_w": -1.0, "z_l": -1.2, "log_r": 0.1, "log_r_star": 0.0,'
    ' "rho": 0.8, "band_lower": -0.2231, "band_upper": 0.2231, "slack": 0.12, "in_band": 1, "alpha": 1.5}',
    '{"step": 2, "loss_name": "rc_dpo", "z_w": null, "z_l": -1.3, "log_r": 0.5, "log_r_star": 0.0,'
    ' "rho": 0.8, "band_lower": -0.2231, "band_upper": 0.2231, "slack": -0.28, "in_band": 0, "alpha": 1.2}',
    '{"step": 3, "loss_name": "rc_dpo", "z_w": -0.95, "z_l": -1.4, "log_r": 0.3, "log_r_star": 0.1,'
    ' "rho": -0.1, "band_lower": -Infinity, "band_upper": Infinity, "slack": Infinity, "in_band": true,'
    ' "alpha": NaN}',
    '{"step": 4, "loss_name": "rc_dpo", "z_w": -0.9, "z_l": NaN, "log_r": null, "log_r_star": 0.1,'
    ' "rho": 0.5, "band_lower": null, "band_upper": null, "slack": null, "in_band": null, "alpha": 0.8}',
    '{"step": 5, "loss_name": "rc_dpo", "z_w": -0.8, "z_l": -1.6, "log_r": -0.4, "log_r_star": 0.0,'
    ' "rho": 0.9, "band_lower": -0.1054, "band_upper": 0.1054, "slack": -0.05, "in_band": false,'
    ' "alpha": 1.0, "w_mean": 0.7}',
    '{"step": 6, "loss_name": "rc_dpo", "z_w": -0.7, "z_l": null, "log_r": 0.05, "log_r_star": 0.0,'
    ' "rho": 0.9, "band_lower": -0.1054, "band_upper": 0.1054, "slack": 0.01, "in_band": 1, "alpha": 0.5}',
    '{"step": 7, "loss_name": "rc_dpo", "z_w": -0.6, "z_',
]


def _run_b_records():
    zw = [-2.0, -1.9, -1.85, -1.8]
    zl = [-2.0, -2.2, -2.4, -2.5]
    slack = [0.1, 0.2, 0.3, 0.4]
    return [
        {"step": i + 1, "loss_name": "dpo", "z_w": zw[i], "z_l": zl[i], "delta_z_w": 0.0, "delta_z_l": 0.0,
         "r_w": 0.0, "r_l": 0.0, "d_w": 0.5, "d_l": 0.5, "log_r": 0.0, "log_r_star": 0.05, "rho": 0.6,
         "band_lower": 0.05 - 0.5108, "band_upper": 0.05 + 0.5108, "slack": slack[i], "in_band": True,
         "alpha": 1.0, "chosen_up_frac": 0.5, "probe_delta_z_w": [None, 0.1, None, 0.2][i],
         "probe_delta_z_l": [None, -0.3, None, -0.5][i]}
        for i in range(4)
    ]


@pytest.fixture
def runs(tmp_path):
    a = tmp_path / "run_a"
    b = tmp_path / "run_b"
    a.mkdir()
    b.mkdir()
    (a / "po_band.jsonl").write_text("\n".join(RUN_A_LINES))  # no newline after the truncated line
    (b / "po_band.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _run_b_records()))
    return a, b


# Hand-computed from the records above.
# A: z_w finite -1.0 ... -0.7 -> +0.3; z_l finite -1.2, -1.3, -1.4, -1.6 -> -0.4;
#    in_band non-null 1,0,true,false,1 -> 3/5; alpha finite 1.5,1.2,0.8,1.0,0.5 -> 1.0;
#    slack finite 0.12,-0.28,-0.05,0.01 -> -0.05.
# B: the probe's last re-score (step 4) gives Δz on the same pairs; A has no re-score: its Δz is unknown, and only the
#    batch-mean trend is there.
EXPECTED_A = {"steps": 6, "batch_delta_z_w": 0.3, "batch_delta_z_l": -0.4, "in_band_frac": 0.6, "alpha_mean": 1.0,
              "slack_mean": -0.05}
EXPECTED_B = {"steps": 4, "delta_z_w": 0.2, "delta_z_l": -0.5, "delta_step": 4, "batch_delta_z_w": 0.2,
              "batch_delta_z_l": -0.5, "in_band_frac": 1.0, "alpha_mean": 1.0, "slack_mean": 0.25}


def _check_summary(summary, expected):
    for key, value in expected.items():
        assert summary[key] == pytest.approx(value), key


def test_load_trace_skips_truncated_last_line_and_reads_meta(runs):
    a, _ = runs
    with pytest.warns(UserWarning, match=r"po_band\.jsonl:8: skipping truncated last line"):
        trace = load_trace(a)
    assert len(trace) == 6
    assert [r["step"] for r in trace] == [1, 2, 3, 4, 5, 6]
    assert trace.meta == {"loss": "rc_dpo", "beta": 0.1, "db_beta": 0.9}
    assert trace.path == a / "po_band.jsonl"
    assert trace[4]["w_mean"] == 0.7  # unknown keys are kept, and ignored by the report


def test_summarize_matches_hand_computed(runs):
    a, b = runs
    with pytest.warns(UserWarning):
        trace_a = load_trace(a / "po_band.jsonl")
    sa = summarize(trace_a)
    _check_summary(sa, EXPECTED_A)
    assert sa["delta_z_w"] is None and sa["delta_z_l"] is None
    assert sa["first_step"] == 1 and sa["last_step"] == 6 and sa["loss_name"] == "rc_dpo"
    _check_summary(summarize(load_trace(b)), EXPECTED_B)


def test_summarize_empty():
    s = summarize([])
    assert s["steps"] == 0
    assert s["delta_z_w"] is None and s["in_band_frac"] is None and s["alpha_mean"] is None


def test_bad_line_in_the_middle_raises_with_line_number(tmp_path):
    lines = [json.dumps(r) for r in _run_b_records()]
    lines[2] = '{"step": 3, "z_w": -1.85,,}'
    path = tmp_path / "po_band.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(TraceError, match=r"po_band\.jsonl:3: invalid JSON"):
        load_trace(path)


def test_non_object_line_raises(tmp_path):
    path = tmp_path / "po_band.jsonl"
    path.write_text('[1, 2]\n{"step": 1}\n')
    with pytest.raises(TraceError, match=r":1: expected a JSON object"):
        load_trace(path)


def test_cli_writes_pngs_and_index(runs, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    a, b = runs
    out = tmp_path / "report"
    assert main([str(a), str(b), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    index = out / "index.html"
    assert captured.out.strip() == str(index)
    assert "skipping truncated last line" in captured.err

    page = index.read_text()
    for name in PNGS:
        data = (out / name).read_bytes()
        assert data[:8] == PNG_SIG, name
        assert len(data) > 5000, name
        assert f'src="{name}"' in page
    assert str(tmp_path) not in page.split("<table>")[0]  # image paths are relative
    # labels: meta.loss for run A, directory name for run B
    assert "<td>rc_dpo</td>" in page and "<td>run_b</td>" in page
    # summary row of run A, formatted (no re-score in its trace: Δz unknown, not the batch-mean trend)
    assert "<td>+0.3</td>" not in page
    for cell in ["<td>6</td>", "<td>—</td>", "<td>60.0%</td>", "<td>1</td>", "<td>-0.05</td>"]:
        assert cell in page, cell
    for cell in ["<td>4</td>", "<td>+0.20</td>", "<td>-0.50</td>", "<td>100.0%</td>", "<td>+0.25</td>"]:
        assert cell in page, cell
    assert "db_beta" in page  # run metadata is shown


def test_cli_labels_and_smoothing(runs, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    a, b = runs
    out = tmp_path / "smoothed"
    assert main([str(a), str(b / "po_band.jsonl"), "--out", str(out), "--labels", "calib,base",
                 "--smooth", "3"]) == 0
    page = (out / "index.html").read_text()
    assert "<td>calib</td>" in page and "<td>base</td>" in page
    assert "moving averages over 3 steps" in page
    for name in PNGS:
        assert (out / name).read_bytes()[:8] == PNG_SIG


def test_cli_bad_labels_count(runs, tmp_path, capsys):
    a, b = runs
    assert main([str(a), str(b), "--out", str(tmp_path / "o"), "--labels", "only_one"]) == 2
    assert "--labels" in capsys.readouterr().err


def test_cli_missing_run_dir(tmp_path, capsys):
    missing = tmp_path / "no_such_run"
    assert main([str(missing), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err
    assert "--po.monitor" in err and "rc_*" in err
    assert not (tmp_path / "o").exists()


def test_cli_missing_trace_file(tmp_path, capsys):
    run = tmp_path / "run_without_monitor"
    run.mkdir()
    assert main([str(run), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert str(run) in err and "po_band.jsonl" in err and "--po.monitor" in err


def test_cli_bad_middle_line_reports_line(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "po_band.jsonl").write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    assert main([str(run), "--out", str(tmp_path / "o")]) == 1
    assert "po_band.jsonl:2:" in capsys.readouterr().err


def test_empty_trace_still_renders(tmp_path):
    pytest.importorskip("matplotlib")
    run = tmp_path / "empty"
    run.mkdir()
    (run / "po_band.jsonl").write_text('{"meta": {"loss": "rc_ipo"}}\n')
    trace = load_trace(run)
    assert len(trace) == 0 and trace.meta["loss"] == "rc_ipo"
    index = write_report({"rc_ipo": trace}, tmp_path / "o")
    assert index.is_file()
    assert all((tmp_path / "o" / n).read_bytes()[:8] == PNG_SIG for n in PNGS)


def test_missing_matplotlib_gives_install_hint(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(MissingDependencyError, match=r"pip install po-plugins\[report\]"):
        write_report({"x": _run_b_records()}, tmp_path / "o")


def test_report_module_does_not_import_matplotlib():
    code = "import sys, po_plugins.report, po_plugins.cli.report; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


# ---------------------------------------------------------------------------------------------------
# Steps whose band has no edges, on the band plot
# ---------------------------------------------------------------------------------------------------

def _band_texts(runs):
    """Every text on the band figure: legend entries, tags on the axes, titles."""
    from matplotlib.figure import Figure

    from po_plugins.report import _fig_band

    fig = _fig_band(Figure, runs, 1)
    legend = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
    tags = [t.get_text() for ax in fig.axes for t in ax.texts]
    return fig, fig.axes, legend, tags


def _spans_of(ax, facecolour):
    from matplotlib.colors import to_rgb

    return sorted((round(p.get_x(), 6), round(p.get_x() + p.get_width(), 6)) for p in ax.patches
                  if hasattr(p, "get_width") and to_rgb(p.get_facecolor()) == to_rgb(facecolour))


def test_band_plot_says_where_rho_le_0_leaves_no_edge(runs):
    """ρ ≤ 0: the band is the whole line, the monitor writes no edges and the shading stops; the plot says why over
    exactly those steps (and over the steps without a ratio, a mean incentive ≤ 0), and says nothing on a trace
    without such steps."""
    pytest.importorskip("matplotlib")
    from po_plugins.report import NO_EDGE_LABEL, NO_RATIO_LABEL

    recs = [{"step": s, "log_r": 0.0, "log_r_star": 0.3, "rho": rho, "in_band": 1.0,
             "band_lower": None if rho <= 0 else 0.3 + math.log(rho),
             "band_upper": None if rho <= 0 else 0.3 - math.log(rho)}
            for s, rho in zip(range(1, 9), [0.5, -0.2, -0.1, 0.6, 0.0, 0.7, 0.4, 0.3], strict=True)]
    recs[6].update(log_r=None, band_lower=None, band_upper=None)  # step 7: a mean incentive ≤ 0, verdict by signs
    recs[7].update(in_band=None, log_r=None, band_lower=None, band_upper=None)  # step 8: no verdict: neither mark
    fig, (ax,), legend, tags = _band_texts({"rc_dpo": recs})
    assert NO_EDGE_LABEL == "ρ ≤ 0: no edge, every ratio in band"
    assert legend.count(NO_EDGE_LABEL) == 1 and legend.count(NO_RATIO_LABEL) == 1, legend
    assert tags.count("ρ ≤ 0") == 2 and tags.count("no ratio") == 1, tags
    assert _spans_of(ax, "tab:green") == [(1.5, 3.5), (4.5, 5.5)]  # steps 2–3 and 5, half a step either side
    assert _spans_of(ax, "0.5") == [(6.5, 7.5)]

    _, _, legend_b, tags_b = _band_texts({"dpo": _run_b_records()})  # ρ 0.6 at every step
    assert NO_EDGE_LABEL not in legend_b and NO_RATIO_LABEL not in legend_b and not tags_b

    a, _ = runs  # the fixture's old-style trace: step 3 has ρ −0.1 and ±Infinity edges
    with pytest.warns(UserWarning):
        trace = load_trace(a)
    _, (ax_a,), legend_a, _ = _band_texts({"rc_dpo": trace})
    assert NO_EDGE_LABEL in legend_a and _spans_of(ax_a, "tab:green") == [(2.5, 3.5)]


# ---------------------------------------------------------------------------------------------------
# Held-out pairs (po_heldout.json): the numbers the demo prints, labelled apart from the probe's
# ---------------------------------------------------------------------------------------------------

def _demo_outcome(pairs=16, dw=-16.8049, dl=-60.1251, down=1.0):
    return {"eval_pairs": pairs, "steps": 4, "band_steps": 4, "out_of_band": 0, "in_band_frac": 1.0, "alert": False,
            "eval_delta_z_w": dw, "eval_delta_z_l": dl, "eval_chosen_down_frac": down,
            "recheck_delta_z_w_sum": 0.3, "recheck_chosen_down_steps": 1, "probe_delta_z_w": 0.2, "alarm": False,
            "alarm_step": None}


HELDOUT_PRINTED = re.compile(r"held-out chosen log-prob (\S+) nats \(falls on (\S+) of (\d+) pairs\), rejected (\S+);")
HELDOUT_CELLS = re.compile(r'<td class="heldout_w">([^<]*)</td><td class="heldout_l">([^<]*)</td>'
                           r'<td class="heldout_down">([^<]*)</td>')


def printed_heldout(line: str) -> tuple[str, str, str, str]:
    """(chosen, rejected, falls-on share, pairs) as the demo's line prints them."""
    m = HELDOUT_PRINTED.search(line)
    assert m, line
    return m[1], m[4], m[2], m[3]


def test_report_shows_the_held_out_numbers_the_demo_prints(runs, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from po_plugins import demo
    from po_plugins.report import HELDOUT_NAME

    _, b = runs
    assets = {"eval": str(tmp_path / "eval.jsonl"), "model": str(tmp_path / "model")}
    o = _demo_outcome()
    path = demo.save_heldout(b, assets, o)
    assert path == b / HELDOUT_NAME
    rec = json.loads(path.read_text())
    assert rec["pairs"] == 16 and rec["delta_z_w"] == o["eval_delta_z_w"] and rec["measured_by"] == "po_plugins.demo"
    line = demo.describe("dpo", o)
    chosen, rejected, share, pairs = printed_heldout(line)
    assert (chosen, rejected, share, pairs) == ("-16.80", "-60.13", "100%", "16")  # rounding, not truncation

    trace = load_trace(b)
    assert trace.heldout == rec
    out = tmp_path / "report"
    assert main([str(b), "--out", str(out)]) == 0
    page = (out / "index.html").read_text()
    assert HELDOUT_CELLS.findall(page) == [(chosen, rejected, share)]
    # labelled apart: the trace's probe numbers (+0.2, −0.5) under "probe batch (training pairs)", the held-out ones
    # under "held-out pairs (16 pairs)"; both as the demo prints them
    head = page.split("<thead>")[1].split("</thead>")[0]
    assert head.index("probe batch (training pairs)") < head.index("held-out pairs (16 pairs)")
    assert "<td>+0.20</td><td>-0.50</td>" + '<td class="heldout_w">-16.80</td>' in page


def test_held_out_numbers_on_the_likelihood_plot(runs):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from po_plugins import demo
    from po_plugins.report import _fig_likelihood

    _, b = runs
    o = _demo_outcome(pairs=8, dw=3.14159, dl=-2.5)
    demo.save_heldout(b, {"eval": "e.jsonl", "model": "m"}, o)
    fig = _fig_likelihood(Figure, {"dpo": load_trace(b)}, 1)
    ax_d = fig.axes[1]
    assert "probe batch (training pairs)" in ax_d.get_title("left")
    assert "held-out pairs (8 pairs)" in ax_d.get_title("left")
    assert [t.get_text() for t in ax_d.get_legend().get_texts()] == [
        "probe batch (training pairs)", "held-out pairs (8 pairs): chosen", "held-out pairs (8 pairs): rejected"]
    assert sorted(t.get_text() for t in ax_d.texts) == ["held-out +3.14", "held-out -2.50"]
    stars = [ln for ln in ax_d.get_lines() if ln.get_marker() == "*"]
    assert sorted((float(ln.get_xdata()[0]), float(ln.get_ydata()[0])) for ln in stars) == [(4, -2.5), (4, 3.14159)]


def test_held_out_counts_that_differ_are_given_per_run(runs, tmp_path):
    pytest.importorskip("matplotlib")
    from po_plugins import demo

    a, b = runs
    demo.save_heldout(a, {"eval": "e", "model": "m"}, _demo_outcome(pairs=8, dw=1.0, dl=-2.0, down=0.25))
    demo.save_heldout(b, {"eval": "e", "model": "m"}, _demo_outcome(pairs=16))
    with pytest.warns(UserWarning):
        trace_a = load_trace(a)
    page = write_report({"a": trace_a, "b": load_trace(b)}, tmp_path / "o").read_text()
    assert "held-out pairs (" not in page.split("<thead>")[1].split("</thead>")[0]
    assert HELDOUT_CELLS.findall(page) == [("+1.00 (8 pairs)", "-2.00", "25%"), ("-16.80 (16 pairs)", "-60.13", "100%")]


def test_a_held_out_record_of_another_trace_or_malformed_is_not_shown(runs, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from po_plugins import demo
    from po_plugins.report import HELDOUT_NAME, load_heldout, write_heldout

    _, b = runs
    demo.save_heldout(b, {"eval": "e", "model": "m"}, _demo_outcome())
    with open(b / "po_band.jsonl", "a") as f:  # a later run (or more steps) replaced the trace it was measured for
        f.write(json.dumps({"step": 5, "z_w": -1.7}) + "\n")
    with pytest.warns(UserWarning, match="measured for another po_band.jsonl"):
        assert load_trace(b).heldout is None
    out = tmp_path / "o"
    assert main([str(b), "--out", str(out)]) == 0
    assert "measured for another po_band.jsonl" in capsys.readouterr().err
    assert not HELDOUT_CELLS.findall((out / "index.html").read_text())

    (b / HELDOUT_NAME).write_text(json.dumps({"pairs": 0, "delta_z_w": 1.0, "delta_z_l": 1.0}))
    with pytest.warns(UserWarning, match="'pairs' must be a positive integer"):
        assert load_heldout(b / "po_band.jsonl") is None
    (b / HELDOUT_NAME).write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable held-out record"):
        assert load_heldout(b / "po_band.jsonl") is None
    (b / HELDOUT_NAME).unlink()
    assert load_heldout(b / "po_band.jsonl") is None  # none: nothing to say
    with pytest.raises(ValueError, match="delta_z_w"):
        write_heldout(b, pairs=4, delta_z_w=float("nan"), delta_z_l=0.0)
    with pytest.raises(FileNotFoundError, match="po_band.jsonl"):
        write_heldout(tmp_path, pairs=4, delta_z_w=0.0, delta_z_l=0.0)


def test_a_probe_file_named_in_the_header_is_labelled_as_such(runs, tmp_path):
    """--po.probe_file makes the probe held-out pairs: where the trace's header names the file (meta.probe_file) the
    probe's columns say so instead of "training pairs"; runs of both kinds: each row says which."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from po_plugins.report import _fig_likelihood, probe_label

    _, b = runs
    c = tmp_path / "run_c"
    c.mkdir()
    (c / "po_band.jsonl").write_text(json.dumps({"meta": {"loss": "dpo", "probe_file": "/data/heldout.jsonl"}}) + "\n"
                                     + "".join(json.dumps(r) + "\n" for r in _run_b_records()))
    trace_b, trace_c = load_trace(b), load_trace(c)
    assert probe_label(trace_b) == "probe batch (training pairs)"
    assert probe_label(trace_c) == "probe: held-out pairs (heldout.jsonl)"
    page = write_report({"c": trace_c}, tmp_path / "o1").read_text()
    head = page.split("<thead>")[1].split("</thead>")[0]
    assert "probe: held-out pairs (heldout.jsonl)" in head and "training pairs" not in head
    fig = _fig_likelihood(Figure, {"c": trace_c}, 1)
    assert "probe: held-out pairs (heldout.jsonl)" in fig.axes[1].get_title("left")
    page = write_report({"b": trace_b, "c": trace_c}, tmp_path / "o2").read_text()
    assert '<th colspan="2">probe</th>' in page
    assert "<td>+0.20 (probe batch (training pairs))</td>" in page
    assert "<td>+0.20 (probe: held-out pairs (heldout.jsonl))</td>" in page
