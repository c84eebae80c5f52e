"""The host-neutral band monitor: window means independent of the micro-batch split, the alert, the re-check, the
JSONL (resume truncation) and its state; every host adapter feeds it the same way."""

import json
import math

import pytest
import torch

from po_plugins import incentives
from po_plugins.band import band_stats
from po_plugins.losses import PairBatch, build
from po_plugins.monitor import JSONL_KEYS, BandMonitor, load_plugin_state, loss_step, plugin_state
from po_plugins.scores import ScoreStats


def batch(lo, hi, stats=(2.0, 3.0, 1.0)):
    g = torch.Generator().manual_seed(lo)
    n = hi - lo
    zw, zl = -10 - torch.rand(n, generator=g), -11 - torch.rand(n, generator=g)
    ref = torch.full((n,), -10.5)
    st = ScoreStats(*(torch.tensor(x) for x in stats))
    return PairBatch(zw.requires_grad_(), zl.requires_grad_(), ref, ref, score_stats=st)


def test_window_means_do_not_depend_on_the_micro_batch_split(tmp_path):
    loss = build("dpo")
    full = [batch(0, 4)]
    split = [PairBatch(*(t[a:b] if isinstance(t, torch.Tensor) else t for t in (
        full[0].policy_chosen, full[0].policy_rejected, full[0].ref_chosen, full[0].ref_rejected)),
        score_stats=full[0].score_stats) for a, b in ((0, 1), (1, 4))]
    recs = []
    for parts, name in ((full, "a"), (split, "b")):
        mon = BandMonitor(loss, str(tmp_path / name / "po_band.jsonl"), recheck_every=0)
        for b in parts:
            loss_step(loss, b, mon, training=True)
        mon.end_step(1)
        recs.append(json.loads((tmp_path / name / "po_band.jsonl").read_text().splitlines()[1]))
    a, b = recs
    for k in ("z_w", "z_l", "r_w", "r_l", "d_w", "d_l", "log_r", "loss"):
        assert a[k] == pytest.approx(b[k], rel=1e-9), k
    d_w, d_l = incentives(loss, full[0])
    assert a["d_w"] == pytest.approx(float(d_w.double().mean()), rel=1e-9)  # means over pairs, not micro-batches
    assert a["z_w"] == pytest.approx(float(full[0].policy_chosen.detach().double().mean()), rel=1e-9)
    ref = band_stats(d_w, d_l, 2.0, 3.0, 1.0)
    assert a["log_r"] == pytest.approx(ref["log_r"]) and a["band_lower"] == pytest.approx(ref["lower"])
    assert set(JSONL_KEYS) <= set(a)


def test_alert_once_recheck_and_resume(tmp_path):
    loss = build("dpo")
    said = []
    path = tmp_path / "po_band.jsonl"
    # ρ ≈ 1 and r* = 20: a DPO incentive ratio near 1 is far below the band on every step
    stats = (1.0, 20.0, 0.999 * 20.0)
    rescored = []

    def rescore(inputs):
        rescored.append(inputs)
        return inputs[0].detach() + 1.0, inputs[1].detach() - 1.0  # chosen up, rejected down by one nat

    mon = BandMonitor(loss, str(path), alert_steps=2, recheck_every=2, rescore=rescore, log=said.append)
    for step in (1, 2, 3, 4):
        b = batch(step, step + 3, stats)
        loss_step(loss, b, mon, training=True, recheck_inputs=(b.policy_chosen, b.policy_rejected))
        logs = mon.end_step(step)
        assert logs["po/alpha"] == 1.0 and logs["po/in_band"] == 0.0
    assert len(said) == 1 and "out of the disentanglement band for 2 consecutive steps" in said[0]
    rec = [json.loads(x) for x in path.read_text().splitlines()[1:]]
    assert [r["in_band"] for r in rec] == [0.0] * 4
    assert [r["chosen_up_frac"] for r in rec] == [None, 1.0, None, 1.0] and len(rescored) == 2
    assert rec[1]["step_delta_z_w"] == pytest.approx(1.0) and rec[1]["step_delta_z_l"] == pytest.approx(-1.0)
    # a resumed run from step 2 continues the streak and the α statistics, and drops the trace past its checkpoint
    state = plugin_state(loss, mon)
    loss2 = build("dpo")
    mon2 = BandMonitor(loss2, str(path), alert_steps=2, recheck_every=0, log=said.append)
    load_plugin_state(json.loads(json.dumps(state)), loss2, mon2)
    assert mon2.out_streak == 4 and mon2.prev == mon.prev
    b = batch(9, 12, stats)
    loss_step(loss2, b, mon2, training=True)
    mon2.end_step(3)
    steps = [json.loads(x).get("step") for x in path.read_text().splitlines()]
    assert steps == [None, 1, 2, 3] and len(said) == 1  # the streak went on past the threshold: no second alert


def test_rc_state_round_trip_continues_the_alpha_sequence(tmp_path):
    stats = (1.0, 20.0, 0.5 * 20.0)
    a, b = build("rc_dpo"), build("rc_dpo")
    for i in range(3):
        loss_step(a, batch(i, i + 2, stats), None, training=True)
    load_plugin_state(json.loads(json.dumps(plugin_state(a, None))), b, None)
    nxt = batch(7, 9, stats)
    loss_step(a, nxt, None, training=True)
    loss_step(b, nxt, None, training=True)
    assert a.alpha == b.alpha != 1.0 and a.ema == b.ema


def test_eval_micro_batches_do_not_reach_the_monitor(tmp_path):
    loss = build("dpo")
    mon = BandMonitor(loss, str(tmp_path / "t.jsonl"))
    per_sample, cr, rr = loss_step(loss, batch(0, 3), mon, training=False)
    assert mon.acc is None and mon.end_step(1) == {}
    b = batch(0, 3)
    torch.testing.assert_close(cr, 0.1 * (b.policy_chosen - b.ref_chosen).detach())
    assert per_sample.shape == (3,) and math.isfinite(float(per_sample.sum()))
