"""Tests for the band-monitor report (po_plugins.report and python -m po_plugins.cli.report)."""

import json
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
    for cell in ["<td>4</td>", "<td>+0.2</td>", "<td>-0.5</td>", "<td>100.0%</td>", "<td>+0.25</td>"]:
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
