"""probe_pred_w / probe_pred_l: the first-order change the step's gradient gives the probe pairs' mean chosen and
rejected log-likelihoods, d_w⟨s_w, s_pw⟩ − d_l⟨s_l, s_pw⟩ (and the rejected analogue), in the band's closed form and
head scope; tested against autograd on the head weight and against the change a small gradient step makes."""

from __future__ import annotations

import json
import math

import pytest
import torch

from po_plugins.band import band_stats
from po_plugins.losses import PairBatch, build
from po_plugins.monitor import BandMonitor, loss_step
from po_plugins.scores import HeadSpec, Tokens, score_rows, score_stats_flat, side_gram

V, D, T = 13, 6, 3  # vocabulary, width, response tokens per sequence


def logps(W, h, y):
    """[N] summed response log-probs of sequences with head inputs h [N, T, d] and labels y [N, T]."""
    return torch.log_softmax(h @ W.T, -1).gather(-1, y[..., None]).squeeze(-1).sum(-1)


def tokens(h, y, n_pairs):
    N = h.shape[0]
    rows = torch.arange(N).repeat_interleave(T)
    return Tokens(h.reshape(-1, D), y.reshape(-1), rows < n_pairs, None, n_pairs)


def micro(g, pairs):
    return torch.randn(2 * pairs, T, D, generator=g), torch.randint(0, V, (2 * pairs, T), generator=g)


class Host:
    """A head-only model: the monitor's rescore (with tokens) and head, as an adapter provides them."""

    def __init__(self, W):
        self.W = W

    def head(self):
        import contextlib

        return contextlib.nullcontext(HeadSpec(self.W.detach()))

    def rescore(self, inputs, tokens=False):
        h, y = inputs
        z = logps(self.W.detach(), h, y)
        zw, zl = z.chunk(2)
        return (zw, zl, globals()["tokens"](h, y, h.shape[0] // 2)) if tokens else (zw, zl)


def setup(tmp_path, seed, loss_name, recheck_every, held=False):
    """(generator, head weight, objective, monitor on a head-only host; RC runs fill the step accumulator; `held`:
    every micro-batch offers the step its score rows, as a host with the logits does)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(V, D, generator=g, requires_grad=True)
    host = Host(W)
    loss = build(loss_name)
    mon = BandMonitor(loss, str(tmp_path / "t.jsonl"), recheck_every=recheck_every, rescore=host.rescore,
                      head=host.head, step_acc=loss_name.startswith("rc_"))
    mon.gram_tokens = 10**6 if held else None
    return g, W, loss, mon


def feed(mon, loss, W, ref, h, y):
    pairs = h.shape[0] // 2
    z = logps(W, h, y)
    rw, rl = ref
    tok = tokens(h, y, pairs)
    gram = mon.step_gram(h.shape[0] * T, V, D) if mon.gram_tokens else None
    if gram is not None:  # the step holds the micro-batch's score rows (StepGram)
        hf, yf = h.reshape(-1, D), y.reshape(-1)
        logits = hf @ W.detach().T
        lse = torch.logsumexp(logits, -1)
        own = gram.add(score_rows(logits, yf, lse), hf, tok.chosen, pairs)
        tok = tok._replace(lse=lse, stats=own if "score_stats" in loss.needs else None, in_acc=True)
    elif "score_stats" in loss.needs:  # as a host's RC pass does: the micro-batch's statistics, the step accumulator
        acc = mon.step_acc(V, D, "cpu")
        hf = h.reshape(-1, D)
        stats = score_stats_flat(hf, hf @ W.detach().T, y.reshape(-1), torch.arange(2 * pairs).repeat_interleave(T),
                                 torch.arange(2 * pairs) < pairs, acc=acc)
        tok = tok._replace(stats=stats, in_acc=acc is not None)
    n = torch.full((pairs,), float(T))
    b = PairBatch(z[:pairs], z[pairs:], rw, rl, n, n, score_stats=tok.stats)
    per_sample, _, _ = loss_step(loss, b, mon, True, (h, y), tok)
    feed.last = b
    return per_sample


def test_side_gram_is_the_gram_of_autograd_scores():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(V, D, generator=g, requires_grad=True)
    h, y = micro(g, 3)
    side = torch.tensor([0, 1, 2, 0, 1, 2]).repeat_interleave(T)
    z = logps(W, h, y)
    scales = [0.5, 0.25, 1.0]
    grads = [torch.autograd.grad(z[side[::T] == i].sum() * scales[i], [W], retain_graph=True)[0].reshape(-1)
             for i in range(3)]
    want = torch.stack(grads) @ torch.stack(grads).T
    spec = HeadSpec(W.detach())
    lse = torch.logsumexp(h.reshape(-1, D) @ W.detach().T, -1)
    got = side_gram(h.reshape(-1, D), y.reshape(-1), side, lse, spec, scales, chunk_size=4)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    halves = side_gram(h.reshape(-1, D), y.reshape(-1), side, lse, spec, scales, (0, 7), 4) + side_gram(
        h.reshape(-1, D), y.reshape(-1), side, lse, spec, scales, (7, V), 4)
    torch.testing.assert_close(halves, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("held", [False, True])
@pytest.mark.parametrize("loss_name", ["dpo", "rc_dpo", "simpo"])
def test_probe_pred_equals_autograd_over_an_accumulated_step(tmp_path, loss_name, held):
    """Two micro-batches per step (dpo, simpo: the token pass; rc_dpo: the step accumulator; held: the step's score
    rows), probe = the first micro-batch: the record's probe_pred_w/l equal ⟨d_w s_w − d_l s_l, s_p⟩ with every s by
    autograd on the head weight at the step's weights, on every re-check step. Between re-checks, where the step's
    scores are held or accumulated (held, rc_dpo), the prediction uses the probe's scores from its last re-score (at
    the first step and every re-check step); with the token pass it is null there."""
    g, W, loss, mon = setup(tmp_path, 1, loss_name, recheck_every=2, held=held)
    opt = torch.optim.SGD([W], lr=0.05)
    probe, sp = None, None
    every_step = held or loss_name.startswith("rc_")
    for step in (1, 2, 3, 4, 5):
        want_parts, n = [], 0
        for _ in range(2):
            h, y = micro(g, 2)
            probe = probe or (h, y)
            ref = (torch.randn(2, generator=g) - 8, torch.randn(2, generator=g) - 8)
            per = feed(mon, loss, W, ref, h, y)
            (per.mean() / 2).backward()
            want_parts.append((h, y))
            n += 2
        Wd = W.detach().clone().requires_grad_(True)
        zs = [logps(Wd, h, y) for h, y in want_parts]
        zw, zl = torch.cat([z[:2] for z in zs]), torch.cat([z[2:] for z in zs])
        sw = torch.autograd.grad(zw.mean(), [Wd], retain_graph=True)[0]
        sl = torch.autograd.grad(zl.mean(), [Wd])[0]
        if step == 1 or step % 2 == 0:  # the probe re-scored at this step's weights
            pz = logps(Wd, *probe)
            sp = (torch.autograd.grad(pz[:2].mean(), [Wd], retain_graph=True)[0], torch.autograd.grad(pz[2:].mean(),
                                                                                                      [Wd])[0])
        spw, spl = sp
        mon.close_scores()
        opt.step()
        opt.zero_grad()
        mon.end_step(step)
        rec = [json.loads(line) for line in open(tmp_path / "t.jsonl")][-1]
        if step % 2 and not every_step:
            assert rec["probe_pred_w"] is None and rec["probe_pred_l"] is None
            continue
        dw, dl = rec["d_w"], rec["d_l"]
        assert rec["probe_pred_w"] == pytest.approx(float((dw * sw - dl * sl).mul(spw).sum()), rel=1e-4, abs=1e-6)
        assert rec["probe_pred_l"] == pytest.approx(float((dw * sw - dl * sl).mul(spl).sum()), rel=1e-4, abs=1e-6)
        assert rec["sw_norm"] == pytest.approx(float(sw.norm()), rel=1e-4)  # the step's band, from the same pass
        assert rec["sw_dot_sl"] == pytest.approx(float((sw * sl).sum()), rel=1e-4, abs=1e-6)


def test_probe_pred_is_the_first_order_change_of_a_gradient_step(tmp_path):
    """At the start (policy = reference) every DPO pair has the same incentives, so the step's gradient on the head is
    exactly d_w s_w − d_l s_l: a small SGD step changes the probe's mean chosen and rejected log-likelihoods by
    lr·probe_pred_w and lr·probe_pred_l to first order."""
    g = torch.Generator().manual_seed(2)
    W = torch.randn(V, D, generator=g, requires_grad=True)
    host = Host(W)
    loss = build("dpo")
    ph, py = micro(g, 3)  # held-out pairs as the probe (--po.probe_file)
    mon = BandMonitor(loss, str(tmp_path / "t.jsonl"), recheck_every=1, rescore=host.rescore, head=host.head,
                      probe_batches=[(ph, py)])
    h, y = micro(g, 4)
    with torch.no_grad():
        z0 = logps(W, h, y)
    feed(mon, loss, W, (z0[:4].clone(), z0[4:].clone()), h, y).mean().backward()
    mon.close_scores()
    before = logps(W.detach(), ph, py)
    lr = 1e-4
    with torch.no_grad():
        W -= lr * W.grad
    after = logps(W.detach(), ph, py)
    mon.end_step(1)
    rec = [json.loads(line) for line in open(tmp_path / "t.jsonl")][-1]
    assert rec["probe_pred_w"] == pytest.approx(float((after - before)[:3].mean()) / lr, rel=2e-2)
    assert rec["probe_pred_l"] == pytest.approx(float((after - before)[3:].mean()) / lr, rel=2e-2)
    assert rec["probe_delta_z_w"] == pytest.approx(float((after - before)[:3].mean()), rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("held", [False, True])
@pytest.mark.parametrize("loss_name", ["apo_zero", "rc_dpo"])
def test_unequal_micro_batches_are_weighted_as_the_optimizer_weighs_them(tmp_path, loss_name, held):
    """A step of micro-batches of 2, 2 and 1 pairs (an epoch's smaller last micro-batch on TRL or LLaMA-Factory): the
    optimizer averages each micro-batch's mean loss, so a pair weighs 1/(3·B_i). The step's scores (token pass for
    apo_zero, whose two incentives differ pair by pair; RC's accumulator for rc_dpo), the band's ratio and the probe
    prediction are those of that gradient, against autograd; d_w and d_l stay the means over the step's pairs."""
    g, W, loss, mon = setup(tmp_path, 3, loss_name, recheck_every=1, held=held)
    micros = [micro(g, 2), micro(g, 2), micro(g, 1)]
    ref = (torch.zeros(2) - 8, torch.zeros(2) - 8)
    dws, dls = [], []
    for h, y in micros:
        k = h.shape[0] // 2
        per = feed(mon, loss, W, (ref[0][:k], ref[1][:k]), h, y)
        diag = loss.diagnostics(feed.last)  # the incentives the loss call trained with (RC: its α of that call)
        dws.append(diag.d_w.mean())
        dls.append(diag.d_l.mean())
        (per.mean() / 3).backward()
    Wd = W.detach().clone().requires_grad_(True)
    zs = [logps(Wd, h, y) for h, y in micros]
    weighted = lambda side: sum(z.chunk(2)[side].mean() for z in zs) / 3  # noqa: E731
    sw = torch.autograd.grad(weighted(0), [Wd], retain_graph=True)[0]
    sl = torch.autograd.grad(weighted(1), [Wd], retain_graph=True)[0]
    spw = torch.autograd.grad(zs[0].chunk(2)[0].mean(), [Wd])[0]  # the probe: the first micro-batch
    mon.close_scores()
    mon.end_step(1)
    rec = [json.loads(line) for line in open(tmp_path / "t.jsonl")][-1]
    assert rec["score_pairs"] == 5
    assert rec["sw_norm"] == pytest.approx(float(sw.norm()), rel=1e-4)
    assert rec["sl_norm"] == pytest.approx(float(sl.norm()), rel=1e-4)
    assert rec["sw_dot_sl"] == pytest.approx(float((sw * sl).sum()), rel=1e-4, abs=1e-6)
    # the band's ratio is the step's: each micro-batch's mean incentive, micro-batches equally
    d_w, d_l = float(sum(dws) / 3), float(sum(dls) / 3)
    assert rec["log_r"] == pytest.approx(math.log(d_w / d_l), rel=1e-6)
    assert rec["log_r"] != pytest.approx(math.log(rec["d_w"] / rec["d_l"]), rel=1e-6)  # not the pair mean's
    band = band_stats(d_w, d_l, float(sw.norm()), float(sl.norm()), float((sw * sl).sum()))
    assert rec["slack"] == pytest.approx(band["slack"], rel=1e-4)
    assert rec["probe_pred_w"] == pytest.approx(float(((d_w * sw - d_l * sl) * spw).sum()), rel=1e-4, abs=1e-6)
