"""The measured-displacement alarm: the monitor's probe pairs re-scored; when their mean chosen log-likelihood has
fallen by `probe_alarm_nats` since the start, one alarm (the step it fires, by how much, what to try), keys
`probe_chosen_down_frac` and `probe_alarm` in the trace, once a run (resume included)."""

import io
import json

import pytest
import torch

from po_plugins.losses import PairBatch, build
from po_plugins.monitor import BandMonitor, load_plugin_state, loss_step, plugin_state
from po_plugins.options import OptionError, check_options
from po_plugins.scores import ScoreStats, Tokens


def batch(seed, n=4):
    g = torch.Generator().manual_seed(seed)
    zw, zl = -10 - torch.rand(n, generator=g), -11 - torch.rand(n, generator=g)
    ref = torch.full((n,), -10.5)
    return PairBatch(zw.requires_grad_(), zl.requires_grad_(), ref, ref,
                     score_stats=ScoreStats(*(torch.tensor(x) for x in (2.0, 3.0, 1.0))))


def run(path, falls, said, mon=None, **kw):
    """One micro-batch per step of `falls` {step: [change of each probe pair's chosen log-prob since the start]}."""
    state = {}

    def rescore(inputs):
        zw, zl = inputs[0].detach().double(), inputs[1].detach().double()
        return zw + torch.tensor(falls[state["step"]], dtype=torch.float64), zl - 1.0

    loss = build("dpo")
    mon = mon or BandMonitor(loss, str(path), alert_steps=0, recheck_every=1, rescore=rescore, log=said.append, **kw)
    mon.rescore = rescore
    logs = []
    for step in sorted(falls):
        state["step"] = step
        b = batch(step)
        loss_step(loss, b, mon, training=True, recheck_inputs=(b.policy_chosen, b.policy_rejected),
                  tokens=Tokens(None, None, None, None, 4, b.score_stats))
        logs.append(mon.end_step(step))
    return mon, logs


def test_alarm_fires_once_when_the_probe_chosen_falls_past_the_threshold(tmp_path):
    # per step, the probe pairs' chosen change since the start (4 pairs): mean 0, -0.5, -1.25 (fires), -3 (no refire)
    falls = {1: [0.0, 0.0, 0.0, 0.0], 2: [-1.0, 0.5, -1.0, -0.5], 3: [-2.0, -2.0, 0.0, -1.0], 4: [-3.0] * 4}
    said = []
    path = tmp_path / "po_band.jsonl"
    mon, logs = run(path, falls, said, alarm_hint="--loss rc_dpo (calibrated), a lower learning rate",
                    probe_alarm_checks=1)
    rec = [json.loads(x) for x in path.read_text().splitlines()[1:]]
    assert [r["probe_delta_z_w"] for r in rec] == pytest.approx([0.0, -0.5, -1.25, -3.0])
    assert [r["probe_chosen_down_frac"] for r in rec] == [0.0, 0.75, 0.75, 1.0]
    assert [r["probe_alarm"] for r in rec] == [0, 0, 1, 0] and mon.alarm_step == 3
    assert [lg["po/probe_alarm"] for lg in logs] == [0, 0, 1, 0]
    alarms = [s for s in said if "ALARM" in s]
    assert len(alarms) == 1 and "(measured)" in alarms[0] and "fallen by 1.25 nats per pair" in alarms[0]
    assert "step 3" in alarms[0] and "75% of the pairs fell" in alarms[0] and "try --loss rc_dpo" in alarms[0]


def test_threshold_is_an_option_and_a_resumed_run_does_not_alarm_again(tmp_path):
    falls = {1: [-0.3] * 4, 2: [-0.6] * 4, 3: [-0.9] * 4}
    said = []
    mon, _ = run(tmp_path / "a.jsonl", falls, said, probe_alarm_nats=-0.5, probe_alarm_checks=1)
    assert mon.alarm_step == 2 and sum("ALARM" in s for s in said) == 1
    quiet, _ = run(tmp_path / "b.jsonl", falls, said, probe_alarm_nats=-5.0, probe_alarm_checks=1)
    assert quiet.alarm_step is None and sum("ALARM" in s for s in said) == 1
    buf = io.BytesIO()
    torch.save(plugin_state(build("dpo"), mon), buf)
    buf.seek(0)
    again = BandMonitor(build("dpo"), str(tmp_path / "a.jsonl"), alert_steps=0, recheck_every=1, log=said.append,
                        probe_alarm_nats=-0.5, probe_alarm_checks=1)
    load_plugin_state(torch.load(buf, weights_only=False), build("dpo"), again)
    assert again.alarm_step == 2
    run(tmp_path / "a.jsonl", {5: [-2.0] * 4}, said, mon=again)
    assert sum("ALARM" in s for s in said) == 1  # fired at step 2 before the checkpoint: never again


def test_a_dip_the_run_recovers_from_is_not_an_alarm(tmp_path):
    """The fall must hold on probe_alarm_checks consecutive re-checks (default 2): make demo's RC-DPO run dipped by
    3 nats at one step and ended +15 nats; DPO's fell at every re-check."""
    dip = {1: [0.4] * 4, 2: [-0.5] * 4, 3: [-3.0] * 4, 4: [0.3] * 4, 5: [6.0] * 4}
    said = []
    assert run(tmp_path / "a.jsonl", dip, said)[0].alarm_step is None and not said
    assert run(tmp_path / "b.jsonl", dip, said, probe_alarm_checks=1)[0].alarm_step == 3
    fall = {1: [-1.9] * 4, 2: [-4.0] * 4, 3: [-5.7] * 4}
    mon, _ = run(tmp_path / "c.jsonl", fall, said)
    assert mon.alarm_step == 2 and "on 2 consecutive re-checks" in said[-1]


def test_no_probe_no_alarm_and_bad_thresholds_are_refused(tmp_path):
    said = []
    mon = BandMonitor(build("dpo"), str(tmp_path / "c.jsonl"), alert_steps=0, recheck_every=0, log=said.append)
    b = batch(0)
    loss_step(mon.loss, b, mon, training=True, tokens=Tokens(None, None, None, None, 4, b.score_stats))
    out = mon.end_step(1)
    assert out["po/probe_alarm"] == 0 and "po/probe_chosen_down_frac" not in out and not said
    for bad in (0.5, float("nan"), True):
        with pytest.raises(OptionError, match="probe_alarm_nats must be a number <= 0"):
            check_options({"probe_alarm_nats": bad})


def test_the_report_marks_the_alarm(tmp_path):
    from po_plugins.report import load_trace, summarize, write_report

    falls = {1: [0.0] * 4, 2: [-0.5] * 4, 3: [-2.0] * 4, 4: [-2.5] * 4}
    run(tmp_path / "run" / "po_band.jsonl", falls, [], probe_alarm_checks=1)
    trace = load_trace(tmp_path / "run")
    assert summarize(trace)["alarm_step"] == 3
    page = write_report({"dpo": trace}, tmp_path / "report").read_text()
    assert "<th>alarm</th>" in page and "<td>step 3</td>" in page


def test_non_finite_incentives_or_scores_give_no_verdict_and_keep_the_streak(tmp_path):
    """A NaN incentive or score is no evidence either way: the step's verdict is null (not in band) and the alert
    streak is neither reset nor advanced."""
    said = []
    mon = BandMonitor(build("dpo"), str(tmp_path / "n.jsonl"), alert_steps=3, recheck_every=0, log=said.append)
    out_of_band = (1.0, 3.0, 2.9)  # aligned scores, rejected larger: DPO's r = 1 lies below the band
    for step, stats in enumerate([out_of_band, out_of_band, (float("nan"), 3.0, 2.9), out_of_band], start=1):
        b = batch(step)
        b.score_stats = ScoreStats(*(torch.tensor(x) for x in stats))
        loss_step(mon.loss, b, mon, training=True, tokens=Tokens(None, None, None, None, 4, b.score_stats))
        mon.end_step(step)
    rec = [json.loads(x) for x in (tmp_path / "n.jsonl").read_text().splitlines()[1:]]
    assert [r["in_band"] for r in rec] == [0.0, 0.0, None, 0.0] and rec[2]["edge"] is None
    assert mon.out_streak == 3 and sum("out of the disentanglement band for 3" in s for s in said) == 1


def test_a_fresh_run_replaces_an_old_trace_and_a_resumed_one_continues_it(tmp_path):
    """An output directory that holds another run's trace: a fresh run's trace starts anew with its own meta line
    (the report had labelled an rc_simpo run 'dpo' from the stale header); a resumed run keeps the records before
    its checkpoint."""
    path = tmp_path / "po_band.jsonl"
    path.write_text(json.dumps({"meta": {"loss": "dpo", "hparams": {}}}) + "\n"
                    + "".join(json.dumps({"step": i, "loss_name": "dpo"}) + "\n" for i in (1, 2, 3)))
    fresh = BandMonitor(build("rc_ipo"), str(path), alert_steps=0, recheck_every=0)
    b = batch(1)
    loss_step(fresh.loss, b, fresh, training=True, tokens=Tokens(None, None, None, None, 4, b.score_stats))
    fresh.end_step(1)
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert lines[0]["meta"]["loss"] == "rc_ipo" and [r["step"] for r in lines[1:]] == [1]
    assert lines[1]["loss_name"] == "rc_ipo"
    resumed = BandMonitor(build("rc_ipo"), str(path), alert_steps=0, recheck_every=0)
    load_plugin_state(plugin_state(fresh.loss, fresh), resumed.loss, resumed)
    for step in (2, 3):
        b = batch(step)
        loss_step(resumed.loss, b, resumed, training=True, tokens=Tokens(None, None, None, None, 4, b.score_stats))
        resumed.end_step(step)
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert lines[0]["meta"]["loss"] == "rc_ipo" and [r["step"] for r in lines[1:]] == [1, 2, 3]


def test_margins_given_as_text_are_refused_at_start_naming_row_and_column():
    """A margin column of "n/a" used to train to the end as unweighted DPO on TRL and to die at the last step on
    OpenRLHF; both hosts now read every row's margin as a number when the dataset is built (numbers given as text
    are read as numbers; null is a missing margin)."""
    from po_plugins.errors import DataError
    from po_plugins.plugin import row_number

    assert row_number("1.5", 0, "m", "x", "f") == 1.5 and row_number(None, 0, "m", "x", "f") is None
    assert row_number(float("nan"), 0, "m", "x", "f") is None and row_number(2, 0, "m", "x", "f") == 2.0
    for bad in ("n/a", [1.0], True):
        with pytest.raises(DataError, match=r"row 3 of the training dataset has a non-numeric value .* in 'rm_margin' "
                                            r"\(po_margin_key\)"):
            row_number(bad, 3, "rm_margin", "the training dataset", "po_margin_key")
