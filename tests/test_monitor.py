"""The host-neutral band monitor: window means independent of the micro-batch split, the alert, the re-check, the
JSONL (resume truncation) and its state; every host adapter feeds it the same way."""

import contextlib
import io
import json
import math

import pytest
import torch

from po_plugins import incentives
from po_plugins.band import band_stats
from po_plugins.losses import PairBatch, build
from po_plugins.monitor import JSONL_KEYS, BandMonitor, PluginStateError, load_plugin_state, loss_step, plugin_state
from po_plugins.scores import HeadSpec, ScoreStats, Tokens, tokens_of


def batch(lo, hi, stats=(2.0, 3.0, 1.0)):
    g = torch.Generator().manual_seed(lo)
    n = hi - lo
    zw, zl = -10 - torch.rand(n, generator=g), -11 - torch.rand(n, generator=g)
    ref = torch.full((n,), -10.5)
    st = ScoreStats(*(torch.tensor(x) for x in stats))
    return PairBatch(zw.requires_grad_(), zl.requires_grad_(), ref, ref, score_stats=st)


def stats_only(b: PairBatch) -> Tokens:
    """A micro-batch known only by its own statistics (valid when it is the whole step)."""
    return Tokens(None, None, None, None, int(b.policy_chosen.shape[0]), b.score_stats)


# ---- a real LM head: pairs of sequences, their log-probs, and autograd of the step's summed gradient -------------
V, D, T = 50, 8, 5


def head_problem(n_pairs=8, seed=0, bias=False, cap=None, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(V, D, generator=g) * 0.7
    b = torch.randn(V, generator=g) * 0.3 if bias else None
    # chosen and rejected share a prefix of hidden states (aligned scores, like edited / continued responses)
    h = torch.randn(2 * n_pairs, T, D, generator=g)
    h[n_pairs:, :3] = h[:n_pairs, :3] + 0.1 * torch.randn(n_pairs, 3, D, generator=g)
    y = torch.randint(0, V, (2 * n_pairs, T), generator=g)
    y[n_pairs:, :3] = y[:n_pairs, :3]
    lens = torch.randint(2, T + 1, (2 * n_pairs,), generator=g)
    mask = torch.arange(T)[None] < lens[:, None]
    return W, b, h, y, mask, HeadSpec(W, b, scale, cap, 1.0, None)


def seq_logps(W, b, h, y, mask, spec):
    u = h @ W.T + (b if b is not None else 0)
    z = u * spec.logit_scale
    if spec.softcap:
        z = spec.softcap * torch.tanh(z / spec.softcap)
    lp = torch.log_softmax(z, -1).gather(-1, y[..., None]).squeeze(-1)
    return (lp * mask).sum(-1), torch.logsumexp(z, -1)


def micro_inputs(W, b, h, y, mask, spec, rows):
    """PairBatch and Tokens of the pairs `rows` (chosen i, rejected n + i)."""
    n = h.shape[0] // 2
    idx = torch.cat([rows, rows + n])
    z, lse = seq_logps(W, b, h[idx], y[idx], mask[idx], spec)
    k = len(rows)
    ref = z.detach() - 0.3 * torch.arange(2 * k).float() / (2 * k)
    pb = PairBatch(z[:k].detach().requires_grad_(), z[k:].detach().requires_grad_(), ref[:k], ref[k:],
                   mask[idx][:k].sum(-1), mask[idx][k:].sum(-1))
    m = mask[idx]
    pos = m.nonzero(as_tuple=False)
    tok = tokens_of(h[idx][pos[:, 0], pos[:, 1]], y[idx][pos[:, 0], pos[:, 1]], pos[:, 0], k, lse[pos[:, 0], pos[:, 1]])
    return pb, tok


def autograd_step_band(loss, W, b, h, y, mask, spec):
    """The reference: s_w, s_l = ∇_W of the step's mean z_w, z_l (one autograd call over all pairs), and the step's
    mean incentives."""
    Wg = W.clone().requires_grad_(True)
    z, _ = seq_logps(Wg, b, h, y, mask, spec)
    n = h.shape[0] // 2
    (sw,) = torch.autograd.grad(z[:n].mean(), [Wg], retain_graph=True)
    (sl,) = torch.autograd.grad(z[n:].mean(), [Wg])
    pb, _ = micro_inputs(W, b, h, y, mask, spec, torch.arange(n))
    d_w, d_l = incentives(loss, pb)
    return band_stats(d_w, d_l, sw.norm(), sl.norm(), (sw * sl).sum()), sw, sl


def with_micro_stats(mon, tok, spec, chunk=7):
    """What a calibrating host does: the micro-batch's own statistics from a vocabulary pass, which also adds its
    score matrices to the monitor's step accumulator."""
    from po_plugins.scores import score_stats_head

    V_, d = spec.weight.shape
    acc = mon.step_acc(V_, d, tok.hidden.device)
    k = tok.pairs  # k chosen and k rejected sequences: each side's mean over the pairs (which row a token sits in
    rows = torch.where(tok.chosen, 0, k)  # does not change a side's sum)
    st = score_stats_head(tok.hidden, spec.weight, tok.labels, rows, torch.arange(2 * k) < k, bias=spec.bias,
                          logit_scale=spec.logit_scale, softcap=spec.softcap, lse=tok.lse, chunk_size=chunk, acc=acc)
    # without its hidden states, a micro-batch the accumulator missed would fail the step (the token pass needs them)
    return tok._replace(stats=st, in_acc=acc is not None, hidden=None if acc is not None else tok.hidden)


def with_held_rows(mon, tok, spec, rebuild=False):
    """What a host with the micro-batch's final logits does while the step's tokens are few: the step holds the
    tokens' score rows (BandMonitor.step_gram); None where the monitor declines them. `rebuild`: a host without logits
    (TRL's fused head), whose rows come from the head's weight (`head_score_rows`)."""
    from po_plugins.scores import head_score_rows, score_rows

    gram = mon.step_gram(tok.hidden.shape[0], spec.weight.shape[0], spec.weight.shape[1])
    if gram is None:
        return None
    if rebuild:
        a, lse = head_score_rows(tok.hidden, tok.labels, spec)
        torch.testing.assert_close(lse, tok.lse)
        return tok._replace(stats=gram.add(a, tok.hidden, tok.chosen, tok.pairs), in_acc=True)
    u = tok.hidden @ spec.weight.T + (spec.bias if spec.bias is not None else 0)
    z = u * spec.logit_scale
    if spec.softcap:
        z = spec.softcap * torch.tanh(z / spec.softcap)
    own = gram.add(score_rows(z, tok.labels, tok.lse, spec.logit_scale, spec.softcap), tok.hidden, tok.chosen,
                   tok.pairs)
    return tok._replace(stats=own, in_acc=True)


def run_monitor(tmp_path, loss, problem, micro, name="m", step_acc=False, held=None, rebuild=False):
    """`held`: the monitor's held-rows token limit (None: no micro-batch offers its rows)."""
    W, b, h, y, mask, spec = problem
    n = h.shape[0] // 2
    mon = BandMonitor(loss, str(tmp_path / name / "po_band.jsonl"), recheck_every=0,
                      head=lambda: contextlib.nullcontext(spec), step_acc=step_acc)
    mon.gram_tokens = held
    for a in range(0, n, micro):
        pb, tok = micro_inputs(W, b, h, y, mask, spec, torch.arange(a, min(a + micro, n)))
        got = with_held_rows(mon, tok, spec, rebuild) if held is not None else None
        if got is not None:
            tok = got
        elif step_acc:
            tok = with_micro_stats(mon, tok, spec)
            assert tok.in_acc
        loss_step(loss, pb, mon, training=True, tokens=tok)
    mon.end_step(1)
    return json.loads((tmp_path / name / "po_band.jsonl").read_text().splitlines()[1])


@pytest.mark.parametrize("step_acc", [False, True])
@pytest.mark.parametrize("kw", [{}, {"bias": True}, {"cap": 3.0, "scale": 0.7}])
def test_step_band_equals_autograd_of_the_step_for_every_micro_batch_size(tmp_path, kw, step_acc):
    """The token pass (step_acc=False) and the step accumulator the micro-batches' own vocabulary passes fill
    (step_acc=True, what a calibrating host uses) both give the step's statistics."""
    loss = build("dpo", beta=0.5)
    problem = head_problem(**kw)
    ref, sw, sl = autograd_step_band(loss, *problem)
    for micro in (1, 2, 4, 8):
        rec = run_monitor(tmp_path, loss, problem, micro, f"m{micro}", step_acc=step_acc)
        assert rec["sw_norm"] == pytest.approx(float(sw.norm()), rel=1e-4), micro
        assert rec["sl_norm"] == pytest.approx(float(sl.norm()), rel=1e-4), micro
        assert rec["sw_dot_sl"] == pytest.approx(float((sw * sl).sum()), rel=1e-4, abs=1e-7), micro
        assert -1 <= rec["rho"] <= 1 and rec["rho"] == pytest.approx(ref["rho"], rel=1e-4, abs=1e-6)
        assert rec["in_band"] == ref["in_band"] and rec["edge"] == ref["edge"]
        for k, r in (("log_r", "log_r"), ("log_r_star", "log_r_star"), ("band_lower", "lower"), ("slack", "slack")):
            assert rec[k] == pytest.approx(ref[r], rel=1e-4, abs=1e-6), (micro, k)
        assert rec["score_pairs"] == 8
    # the old average of micro-batch norms is not the step's: at micro-batch 1 it differs (this test can fail)
    W, b, h, y, mask, spec = problem
    per = [micro_inputs(W, b, h, y, mask, spec, torch.tensor([i]))[1] for i in range(8)]
    from po_plugins.scores import step_score_sums

    avg = sum(float(step_score_sums(t, spec, 1)[0].sqrt()) for t in per) / 8
    assert abs(avg - float(sw.norm())) > 0.05 * float(sw.norm())


@pytest.mark.parametrize("rebuild", [False, True])
@pytest.mark.parametrize("step_acc", [False, True])
@pytest.mark.parametrize("kw", [{}, {"bias": True}, {"cap": 3.0, "scale": 0.7}])
def test_held_score_rows_give_the_step_band_of_autograd(tmp_path, kw, step_acc, rebuild):
    """The step's score rows held (StepGram: a host with the logits, or rebuilt from the head weight where there are
    none, and few response tokens), alone and when the step outgrows them part way (the held rows then move into the
    step accumulator, step_acc=True, or the step takes the token pass): the step's statistics equal autograd's."""
    loss = build("dpo", beta=0.5)
    problem = head_problem(**kw)
    _, sw, sl = autograd_step_band(loss, *problem)
    ntok = int(problem[4].sum())  # every response token of the step
    for micro, held in ((1, 10**6), (2, 10**6), (8, 10**6), (1, ntok // 3), (2, ntok // 2)):
        rec = run_monitor(tmp_path, loss, problem, micro, f"g{micro}_{held}", step_acc=step_acc, held=held,
                          rebuild=rebuild)
        assert rec["sw_norm"] == pytest.approx(float(sw.norm()), rel=1e-4), (micro, held)
        assert rec["sl_norm"] == pytest.approx(float(sl.norm()), rel=1e-4), (micro, held)
        assert rec["sw_dot_sl"] == pytest.approx(float((sw * sl).sum()), rel=1e-4, abs=1e-7), (micro, held)
        assert rec["score_pairs"] == 8


def test_held_rows_give_each_micro_batch_its_own_statistics():
    """A micro-batch's own statistics from its held rows (what RC calibrates on) equal the vocabulary pass's."""
    from po_plugins.scores import score_stats_head

    W, b, h, y, mask, spec = head_problem(bias=True, cap=3.0, scale=0.7)
    mon = BandMonitor(build("rc_dpo"), "/dev/null", recheck_every=0)
    mon.gram_tokens = 10**6
    for rows in (torch.arange(0, 3), torch.arange(3, 8)):
        _, tok = micro_inputs(W, b, h, y, mask, spec, rows)
        k = tok.pairs
        want = score_stats_head(tok.hidden, W, tok.labels, torch.where(tok.chosen, 0, k), torch.arange(2 * k) < k,
                                bias=b, logit_scale=0.7, softcap=3.0, lse=tok.lse, chunk_size=7)
        got = with_held_rows(mon, tok, spec).stats
        for g_, w_ in zip(got, want):
            assert float(g_) == pytest.approx(float(w_), rel=1e-5, abs=1e-7)


def test_step_band_gram_and_vocab_paths_and_vocabulary_slices_agree():
    from po_plugins.scores import step_score_sums

    W, b, h, y, mask, spec = head_problem(bias=True)
    _, tok = micro_inputs(W, b, h, y, mask, spec, torch.arange(8))
    full = step_score_sums(tok, spec, 8, method="vocab", chunk_size=7)
    gram = step_score_sums(tok, spec, 8, method="gram", chunk_size=13)
    sliced = sum(step_score_sums(tok, spec, 8, (a, min(a + 17, V)), chunk_size=5) for a in range(0, V, 17))
    torch.testing.assert_close(gram, full, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(sliced, full, rtol=1e-4, atol=1e-7)


def _two_rank_worker(r, port, path, out, step_acc=False, alone=False):
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=r, world_size=2)
    try:
        W, b, h, y, mask, spec = problem = head_problem(bias=True)
        loss = build("dpo", beta=0.5)
        mon = BandMonitor(loss, path, recheck_every=0, head=lambda: contextlib.nullcontext(spec),
                          is_rank_0=lambda: r == 0, step_acc=step_acc)
        if alone:  # rank 0 scores the step's one scored micro-batch (all 8 pairs, its own statistics); rank 1 none
            pb, tok = micro_inputs(W, b, h, y, mask, spec, torch.arange(8))
            tok = with_micro_stats(mon, tok, spec) if r == 0 else None
            loss_step(loss, pb, mon, training=True, tokens=tok)
            mon.end_step(1)
            return
        # two micro-batches of two pairs on each rank (as DeepSpeed and the Trainer run them: every rank the same
        # accumulation); their response tokens differ in number: variable-size gathers
        for rows in ([[0, 1], [2, 3]] if r == 0 else [[4, 5], [6, 7]]):
            pb, tok = micro_inputs(W, b, h, y, mask, spec, torch.tensor(rows))
            if step_acc:
                tok = with_micro_stats(mon, tok, spec)
            loss_step(loss, pb, mon, training=True, tokens=tok)
        mon.end_step(1)
        del problem
    finally:
        torch.distributed.destroy_process_group()


def _two_ranks(path, step_acc, alone=False) -> dict:
    """Run `_two_rank_worker` as two gloo processes; the first record of rank 0's trace."""
    import subprocess
    import sys

    from po_plugins.tiny import free_port

    port = free_port()
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('tm', sys.argv[1]); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
            "m._two_rank_worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], None, sys.argv[5] == '1', "
            "sys.argv[6] == '1')")
    procs = [subprocess.Popen([sys.executable, "-c", code, __file__, str(r), str(port), path, str(int(step_acc)),
                               str(int(alone))]) for r in (0, 1)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    return json.loads(open(path).read().splitlines()[1])


@pytest.mark.parametrize("step_acc", [False, True])
def test_one_scored_micro_batch_on_one_of_two_processes(tmp_path, step_acc):
    """The step's only scored micro-batch lives on rank 0 (rank 1 scored none): both ranks take the same path through
    the collectives (no deadlock) and the record's statistics are that micro-batch's."""


    path = str(tmp_path / "alone" / "po_band.jsonl")
    two = _two_ranks(path, step_acc, alone=True)
    one = run_monitor(tmp_path, build("dpo", beta=0.5), head_problem(bias=True), 8, "one")
    for k in ("sw_norm", "sl_norm", "sw_dot_sl", "rho"):
        assert two[k] == pytest.approx(one[k], rel=1e-4, abs=1e-7), k
    assert two["score_pairs"] == 8


@pytest.mark.parametrize("step_acc", [False, True])
def test_step_band_is_the_same_on_two_processes(tmp_path, step_acc):


    two = _two_ranks(str(tmp_path / "two" / "po_band.jsonl"), step_acc)
    one = run_monitor(tmp_path, build("dpo", beta=0.5), head_problem(bias=True), 8, "one")
    for k in ("z_w", "d_w", "d_l", "log_r", "sw_norm", "sl_norm", "sw_dot_sl", "rho", "slack", "in_band"):
        assert two[k] == pytest.approx(one[k], rel=1e-4, abs=1e-7), k
    assert two["score_pairs"] == 8


def test_window_means_do_not_depend_on_the_micro_batch_split(tmp_path):
    loss = build("dpo")
    full = [batch(0, 4)]
    split = [PairBatch(*(t[a:b] if isinstance(t, torch.Tensor) else t for t in (
        full[0].policy_chosen, full[0].policy_rejected, full[0].ref_chosen, full[0].ref_rejected)),
        score_stats=full[0].score_stats) for a, b in ((0, 1), (1, 4))]
    recs = []
    for parts, name in ((full, "a"), (split, "b")):
        mon = BandMonitor(loss, str(tmp_path / name / "po_band.jsonl"), recheck_every=0)
        for b in parts:  # statistics only in run a (one micro-batch, its own); run b has none: a null band
            loss_step(loss, b, mon, training=True, tokens=stats_only(b) if name == "a" else None)
        mon.end_step(1)
        recs.append(json.loads((tmp_path / name / "po_band.jsonl").read_text().splitlines()[1]))
    a, b = recs
    for k in ("z_w", "z_l", "r_w", "r_l", "d_w", "d_l", "loss"):
        assert a[k] == pytest.approx(b[k], rel=1e-9), k
    d_w, d_l = incentives(loss, full[0])
    assert a["d_w"] == pytest.approx(float(d_w.double().mean()), rel=1e-9)  # means over pairs, not micro-batches
    assert a["z_w"] == pytest.approx(float(full[0].policy_chosen.detach().double().mean()), rel=1e-9)
    ref = band_stats(d_w, d_l, 2.0, 3.0, 1.0)
    assert a["log_r"] == pytest.approx(ref["log_r"]) and a["band_lower"] == pytest.approx(ref["lower"])
    assert set(JSONL_KEYS) <= set(a) and set(JSONL_KEYS) <= set(b)
    assert b["in_band"] is None and b["sw_norm"] is None and b["score_pairs"] == 0  # no scored micro-batch


def test_two_micro_batches_without_tokens_is_an_error(tmp_path):
    loss = build("dpo")
    mon = BandMonitor(loss, str(tmp_path / "t.jsonl"), recheck_every=0)
    for lo in (0, 2):
        b = batch(lo, lo + 2)
        loss_step(loss, b, mon, training=True, tokens=stats_only(b))
    with pytest.raises(ValueError, match="response tokens"):
        mon.end_step(1)


def test_jsonl_is_strict_json_when_rho_is_not_positive(tmp_path):
    loss = build("dpo")
    path = tmp_path / "po_band.jsonl"
    mon = BandMonitor(loss, str(path), recheck_every=0)
    b = batch(0, 3, stats=(1.0, 2.0, -1.5))  # ρ < 0: the band is the whole line
    loss_step(loss, b, mon, training=True, tokens=stats_only(b))
    logs = mon.end_step(1)
    rec = [json.loads(x, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
           for x in path.read_text().splitlines()]
    assert rec[1]["in_band"] == 1.0 and rec[1]["band_lower"] is None and rec[1]["slack"] is None
    assert rec[1]["rho"] == pytest.approx(-0.75)
    assert "po/band_lower" not in logs and logs["po/in_band"] == 1.0


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
    first = None
    for step in (1, 2, 3, 4):
        b = batch(step, step + 3, stats)
        first = first or b
        loss_step(loss, b, mon, training=True, recheck_inputs=(b.policy_chosen, b.policy_rejected),
                  tokens=stats_only(b))
        logs = mon.end_step(step)
        assert logs["po/alpha"] == 1.0 and logs["po/in_band"] == 0.0
    assert len(said) == 1 and "out of the disentanglement band for 2 consecutive steps" in said[0]
    assert "lower edge" in said[0] and "chosen log-likelihood is predicted to fall" in said[0]
    rec = [json.loads(x) for x in path.read_text().splitlines()[1:]]
    assert [r["in_band"] for r in rec] == [0.0] * 4 and [r["edge"] for r in rec] == ["lower"] * 4
    assert [r["chosen_up_frac"] for r in rec] == [None, 1.0, None, 1.0] and len(rescored) == 4
    assert rec[1]["step_delta_z_w"] == pytest.approx(1.0) and rec[1]["step_delta_z_l"] == pytest.approx(-1.0)
    # the probe is the first micro-batch, re-scored at the same steps: its change since the start, same pairs
    assert rescored[1][0] is first.policy_chosen and rescored[3][0] is first.policy_chosen
    assert [r["probe_delta_z_w"] for r in rec] == [None, pytest.approx(1.0), None, pytest.approx(1.0)]
    assert rec[3]["probe_delta_z_l"] == pytest.approx(-1.0)
    # a resumed run from step 2 continues the streak, the probe and the α statistics, and drops the trace past
    # its checkpoint
    buf = io.BytesIO()
    torch.save(plugin_state(loss, mon), buf)
    buf.seek(0)
    loss2 = build("dpo")
    mon2 = BandMonitor(loss2, str(path), alert_steps=2, recheck_every=1, rescore=rescore, log=said.append)
    load_plugin_state(torch.load(buf, weights_only=False), loss2, mon2)
    assert mon2.out_streak == 4
    torch.testing.assert_close(mon2.probe["z_w"], mon.probe["z_w"])
    b = batch(9, 12, stats)
    loss_step(loss2, b, mon2, training=True, recheck_inputs=(b.policy_chosen, b.policy_rejected),
              tokens=stats_only(b))
    assert mon2.end_step(3)["po/probe_delta_z_w"] == pytest.approx(1.0)
    steps = [json.loads(x).get("step") for x in path.read_text().splitlines()]
    assert steps == [None, 1, 2, 3] and len(said) == 1  # the streak went on past the threshold: no second alert


def test_resuming_with_another_objective_is_one_clear_error():
    state = plugin_state(build("rc_dpo"), None)
    with pytest.raises(PluginStateError, match="trained with the objective 'rc_dpo', this run uses 'dpo'"):
        load_plugin_state(state, build("dpo"), None)
    legacy = {"loss": {}, "monitor": {}}  # a checkpoint written before the name was stored
    with pytest.raises(PluginStateError, match="another objective.*'rc_simpo'"):
        load_plugin_state(legacy, build("rc_simpo"), None)


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


def test_micro_batch_view_is_the_band_rc_calibrates_on(tmp_path):
    """micro_in_band_frac: each micro-batch's own band (its effective mean incentives, its own statistics)."""
    from po_plugins.scores import step_score_sums

    W, b, h, y, mask, spec = head_problem(bias=True)
    loss = build("rc_dpo", beta=0.5)
    mon = BandMonitor(loss, str(tmp_path / "po_band.jsonl"), recheck_every=0, head=lambda: contextlib.nullcontext(spec))
    expect = []
    for a in range(0, 8, 2):
        pb, tok = micro_inputs(W, b, h, y, mask, spec, torch.arange(a, a + 2))
        sums = step_score_sums(tok, spec, 2)
        st = ScoreStats(sums[0].sqrt(), sums[1].sqrt(), sums[2])
        pb.score_stats = st
        loss_step(loss, pb, mon, training=True, tokens=tok._replace(stats=st))
        d_w, d_l = loss.alpha * loss.last_incentives[0], loss.last_incentives[1] / loss.alpha
        expect.append(band_stats(d_w, d_l, *st)["in_band"])
    mon.end_step(1)
    line = json.loads((tmp_path / "po_band.jsonl").read_text().splitlines()[1])
    assert line["micro_in_band_frac"] == pytest.approx(sum(expect) / 4)
    assert line["score_pairs"] == 8  # the step's band still covers all four micro-batches


def test_the_monitor_reads_an_objective_only_through_its_diagnostics(tmp_path):
    """Incentives, α and margin weights come from `loss.diagnostics(b)`: an objective that reports its own is
    recorded as it reports, with no attribute of RC or MADPO looked up."""
    from po_plugins.losses import DPO
    from po_plugins.objective import Diagnostics

    class Reporting(DPO):
        needs = ("ref", "margins")

        def diagnostics(self, b):
            n = b.policy_chosen.shape[0]
            return Diagnostics(torch.full((n,), 2.0), torch.full((n,), 0.5), 0.25, torch.tensor([0.5, 1.0, 3.0]),
                               torch.tensor([False, True, False]))

    loss = Reporting()
    path = tmp_path / "po_band.jsonl"
    mon = BandMonitor(loss, str(path), recheck_every=0)
    b = batch(0, 3)
    b.margins = torch.zeros(3)
    loss_step(loss, b, mon, training=True, tokens=stats_only(b))
    logs = mon.end_step(1)
    rec = json.loads(path.read_text().splitlines()[1])
    assert rec["d_w"] == 2.0 and rec["d_l"] == 0.5 and rec["alpha"] == 0.25
    assert rec["log_r"] == pytest.approx(math.log(4.0))
    assert logs["po/w_mean"] == pytest.approx(1.5) and logs["po/w_min"] == 0.5 and logs["po/w_max"] == 3.0
    assert logs["po/w_capped_frac"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("name", ["r_dpo", "beta_dpo"])
def test_alpha_is_one_for_objectives_with_a_hyperparameter_called_alpha(tmp_path, name):
    """RC's α only: R-DPO's and β-DPO's own `alpha` hyperparameters are not the calibration factor."""
    loss = build(name)
    path = tmp_path / "po_band.jsonl"
    mon = BandMonitor(loss, str(path), recheck_every=0)
    b = batch(0, 4)
    b.chosen_tokens = b.rejected_tokens = torch.full((4,), 5)
    loss_step(loss, b, mon, training=True, tokens=stats_only(b))
    mon.end_step(1)
    assert json.loads(path.read_text().splitlines()[1])["alpha"] == 1.0


def test_rc_record_uses_the_incentives_of_the_calibrated_micro_batch(tmp_path):
    """The monitor's d_w, d_l of an rc_ objective are α·d_w, d_l/α of the base on the very micro-batch RC
    calibrated on (bit for bit), and its α is RC's."""
    loss = build("rc_dpo")
    path = tmp_path / "po_band.jsonl"
    mon = BandMonitor(loss, str(path), recheck_every=0)
    for lo in (0, 3):  # a first step moves α away from 1
        b = batch(lo, lo + 3, stats=(1.0 + lo, 3.0, 0.5))
        loss_step(loss, b, mon, training=True, tokens=stats_only(b))
        mon.end_step(lo + 1)
    rec = json.loads(path.read_text().splitlines()[2])
    d_w = loss.alpha * loss.last_incentives[0]
    assert loss.alpha != 1.0 and rec["alpha"] == loss.alpha
    assert rec["d_w"] == float(d_w.double().sum()) / 3
