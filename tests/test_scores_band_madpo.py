"""Head score statistics against autograd, the band on the softmax toy, and MADPO weights."""

import math

import pytest
import torch

from po_plugins.band import alert_message, band_stats, predicted_signs
from po_plugins.madpo import margin_weights, scale_c
from po_plugins.scores import head_score_stats, response_positions, score_stats_flat, score_stats_head
from po_plugins.toy import train


@pytest.mark.parametrize("method", ["vocab", "gram"])
@pytest.mark.parametrize("chunk", [1, 7, 13, 50, 4096])
def test_head_score_stats_equal_autograd_on_the_head(chunk, method):
    g = torch.Generator().manual_seed(0)
    N, T, d, V = 6, 9, 5, 50
    W = torch.randn(V, d, generator=g, requires_grad=True)
    hidden = torch.randn(N, T, d, generator=g)
    labels = torch.randint(0, V, (N, T), generator=g)
    mask = torch.rand(N, T, generator=g) > 0.3
    mask[:, 0] = True
    is_chosen = torch.tensor([True, False, True, True, False, False])
    logits = hidden @ W.T
    lp = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    seq = (lp * mask).sum(-1)
    (sw,) = torch.autograd.grad(seq[is_chosen].mean(), [W], retain_graph=True)
    (sl,) = torch.autograd.grad(seq[~is_chosen].mean(), [W])
    pos = mask.nonzero(as_tuple=False)
    st = score_stats_flat(hidden[pos[:, 0], pos[:, 1]], logits.detach()[pos[:, 0], pos[:, 1]],
                          labels[pos[:, 0], pos[:, 1]], pos[:, 0], is_chosen, chunk_size=chunk, method=method)
    auto = head_score_stats(hidden, logits.detach(), labels, mask, is_chosen, chunk_size=chunk)
    for x, y in zip(st, auto):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(st.sw_norm, sw.norm(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(st.sl_norm, sl.norm(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(st.sw_dot_sl, (sw * sl).sum(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["vocab", "gram"])
@pytest.mark.parametrize("chunk", [1, 7, 50, 4096])
@pytest.mark.parametrize("head", ["plain", "bias_scale_temperature", "softcap"])
def test_head_stats_from_weight_equal_autograd_without_logits(chunk, method, head):
    """The fused-head path (TRL): statistics from the head's input and weight, logits rebuilt per vocabulary chunk,
    against autograd through the whole head transform (bias, logit scale, soft-capping, temperature)."""
    g = torch.Generator().manual_seed(1)
    N, T, d, V = 4, 7, 6, 50
    W = torch.randn(V, d, generator=g, requires_grad=True)
    b = torch.randn(V, generator=g) if head != "plain" else None
    scale, cap, temp = {"plain": (1.0, None, 1.0), "bias_scale_temperature": (0.5, None, 0.7),
                        "softcap": (2.0, 3.0, 0.9)}[head]
    hidden = torch.randn(N, T, d, generator=g)
    labels = torch.randint(0, V, (N, T), generator=g)
    mask = torch.rand(N, T, generator=g) > 0.3
    mask[:, 0] = True
    is_chosen = torch.tensor([True, False, False, True])
    u = hidden @ W.T + (b if b is not None else 0)
    z = u * scale
    z = cap * torch.tanh(z / cap) if cap else z
    lp = torch.log_softmax(z / temp, -1).gather(-1, labels[..., None]).squeeze(-1)
    seq = (lp * mask).sum(-1)
    (sw,) = torch.autograd.grad(seq[is_chosen].mean(), [W], retain_graph=True)
    (sl,) = torch.autograd.grad(seq[~is_chosen].mean(), [W])
    pos = mask.nonzero(as_tuple=False)
    st = score_stats_head(hidden[pos[:, 0], pos[:, 1]], W.detach(), labels[pos[:, 0], pos[:, 1]], pos[:, 0],
                          is_chosen, bias=b, logit_scale=scale, softcap=cap, temperature=temp, chunk_size=chunk,
                          method=method)
    torch.testing.assert_close(st.sw_norm, sw.norm(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(st.sl_norm, sl.norm(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(st.sw_dot_sl, (sw * sl).sum(), rtol=1e-5, atol=1e-6)


def test_band_stats_edges_and_slack():
    out = band_stats(torch.tensor([1.0, 3.0]), torch.tensor([1.0, 1.0]), 2.0, 4.0, 0.5 * 8.0)
    assert out["log_r"] == pytest.approx(math.log(2.0))
    assert out["log_r_star"] == pytest.approx(math.log(2.0))
    assert out["rho"] == pytest.approx(0.5)
    assert out["lower"] == pytest.approx(math.log(2.0) + math.log(0.5))
    assert out["upper"] == pytest.approx(math.log(2.0) - math.log(0.5))
    assert out["slack"] == pytest.approx(math.log(2.0)) and out["in_band"] == 1.0
    out = band_stats(1.0, 1.0, 1.0, 5.0, 0.9 * 5.0)  # r = 1, r* = 5, ρ = 0.9: far below the lower edge
    assert out["slack"] < 0 and out["in_band"] == 0.0 and out["edge"] == "lower" and out["pred_sign_w"] == -1
    out = band_stats(1.0, 1.0, 5.0, 1.0, 0.9 * 5.0)  # r* = 1/5: above the upper edge, the rejected rises
    assert out["slack"] < 0 and out["edge"] == "upper" and out["pred_sign_l"] == 1 and out["pred_sign_w"] == 1
    neg = band_stats(1.0, 1.0, 1.0, 5.0, -1.0)  # ρ ≤ 0: always in band; the band is the whole line (no edges)
    assert neg["in_band"] == 1.0 and neg["lower"] is None and neg["upper"] is None and neg["slack"] is None
    assert neg["rho"] == pytest.approx(-0.2) and neg["edge"] is None


def test_band_verdict_is_the_sign_conditions_for_incentives_of_every_sign():
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(2000):
        dw, dl = (float(x) for x in torch.randn(2, generator=g))
        sw, sl = (float(x) for x in torch.rand(2, generator=g) * 3 + 0.1)
        rho = float(torch.rand((), generator=g)) * 2 - 1
        out = band_stats(dw, dl, sw, sl, rho * sw * sl)
        pw, pl = predicted_signs(dw, dl, sw, sl, rho * sw * sl)
        assert out["in_band"] == float(pw >= 0 and pl <= 0), (dw, dl, sw, sl, rho)
        assert (out["pred_sign_w"], out["pred_sign_l"]) == (pw, pl)
        assert -1.0 <= out["rho"] <= 1.0
        if dw > 0 and dl > 0 and rho > 0:  # the paper's band: slack ≥ 0 ⇔ in band
            assert (out["slack"] >= 0) == bool(out["in_band"])
        else:
            assert out["slack"] is None
        if dw <= 0 or dl <= 0:
            assert out["log_r"] is None
        seen.add((dw > 0, dl > 0, out["edge"]))
    # every sign pattern occurred, with each edge (past-target objectives: both incentives negative)
    assert {(False, False, "lower"), (False, False, "upper"), (True, False, "upper"), (False, True, "lower"),
            (True, True, "lower"), (True, True, "upper"), (True, True, None)} <= seen


def test_band_of_objectives_past_their_target_and_satisfied_hinges():
    # cDPO/IPO past their target: both incentives negative, d = (−1, −1), ρ = 0.5 → the chosen falls, the rejected
    # rises (the old clamp reported this in band with slack 0.693)
    out = band_stats(-1.0, -1.0, 1.0, 1.0, 0.5)
    assert out["in_band"] == 0.0 and out["edge"] == "both" and out["log_r"] is None and out["slack"] is None
    # one mean ≤ 0 (a satisfied hinge has d = 0): no log r = 27.6 any more
    out = band_stats(1.0, 0.0, 1.0, 1.0, 0.5)
    # ż_w ∝ d_w‖s_w‖² = 1 > 0, ż_l ∝ d_w⟨s_w, s_l⟩ = 0.5 > 0: only the chosen is pushed, and the shared direction
    # lifts the rejected too
    assert out["log_r"] is None and out["in_band"] == 0.0 and out["edge"] == "upper"
    msg = alert_message(1, 1, {"step": 3, "loss_name": "hinge", "d_w": 1.0, "d_l": 0.0, **{
        k: out[k] for k in ("log_r", "edge")}})
    assert "band is undefined" in msg and "rejected log-likelihood is predicted to rise" in msg



@pytest.mark.parametrize("name", ["dpo", "rc_dpo", "bce", "rc_cpo", "lsif"])
def test_band_predicts_signs_of_likelihood_changes_in_softmax_toy(name):
    rec = train(name, steps=60, lr=1e-3)
    for r in rec:
        assert (r["delta_z_w"] > 0) == (r["pred_sign_w"] > 0), r
        assert (r["delta_z_l"] > 0) == (r["pred_sign_l"] > 0), r
        # in band ⇔ chosen not falling and rejected not rising (both edges of the band)
        assert bool(r["in_band"]) == (r["delta_z_w"] >= 0 and r["delta_z_l"] <= 0)


def test_toy_dpo_leaves_band_and_rc_keeps_it():
    dpo, rc = train("dpo", steps=100), train("rc_dpo", steps=100)
    assert dpo[-1]["z_w"] < dpo[0]["z_w"] and all(r["in_band"] == 0 for r in dpo)
    assert rc[-1]["z_w"] > rc[0]["z_w"] and all(r["in_band"] == 1 for r in rc)
    assert rc[-1]["z_l"] < rc[0]["z_l"]


def test_madpo_weights_shape():
    tau = math.log(999)
    h = torch.tensor([-tau - 1e-3, -tau, -tau + 1e-6, 0.0, 1.0, tau, 2 * tau])
    w = margin_weights(h)
    assert w[0] == 1 and w[1] == 1
    assert float(w[2]) == pytest.approx(1.0, abs=1e-4)  # continuity at −τ (c(τ) = 1)
    assert float(w[3]) == pytest.approx(1.0, abs=1e-7)  # w(0) = σ(0)/σ(0)
    assert float(w[4]) > 1.0  # amplified below τ
    assert float(w[5]) == pytest.approx(1.0, abs=1e-6)
    assert float(w[6]) < 1.0  # dampened above τ
    assert float(scale_c(torch.tensor(tau))) == pytest.approx(1.0)
    a = torch.linspace(0, 20, 50)
    assert (scale_c(a)[1:] < scale_c(a)[:-1]).all()  # c decreasing
    # independent formula
    c = 0.25 + 3.75 / (1 + (3 / 0.75) * torch.exp(1.0 * (a - 7.0)))
    expect = torch.sigmoid(c * a) / torch.sigmoid(a)
    torch.testing.assert_close(margin_weights(a, c_max=4.0, tau=7.0), expect, rtol=1e-5, atol=1e-6)


def test_madpo_bad_input():
    with pytest.raises(ValueError, match="c_max"):
        margin_weights(torch.zeros(2), c_max=0.5)
    with pytest.raises(ValueError, match="non-finite.*\\[1\\]"):
        margin_weights(torch.tensor([0.0, float("nan")]))


def test_out_of_band_alert_fires_once_at_the_threshold():
    rec = {"step": 7, "loss_name": "dpo", "log_r": 0.0, "band_lower": 0.5, "band_upper": 1.2}
    assert alert_message(2, 3, rec) is None and alert_message(4, 3, rec) is None
    msg = alert_message(3, 3, rec)
    assert "3 consecutive steps" in msg and "step 7" in msg and "rc_dpo" in msg
    assert "chosen log-likelihood is predicted to fall" in alert_message(3, 3, {**rec, "edge": "lower"})
    up = alert_message(3, 3, {**rec, "edge": "upper"})
    assert "upper edge" in up and "rejected log-likelihood is predicted to rise" in up and "chosen" not in up
    assert "--loss rc_dpo" in alert_message(3, 3, rec, "; consider --loss rc_dpo")
    assert "--loss rc_" not in alert_message(3, 3, {**rec, "loss_name": "rc_dpo"})
    assert alert_message(3, 0, rec) is None


def test_packed_layout_gives_the_padded_statistics():
    """--ds.packing_samples feeds the head [1, nnz, ·] in flash-attn's row-major unpad order."""
    g = torch.Generator().manual_seed(4)
    N, L, d, V = 4, 7, 5, 30
    att = torch.zeros(N, L, dtype=torch.long)
    for i, n in enumerate([7, 4, 6, 3]):  # right padding, as DPO batches are
        att[i, :n] = 1
    loss_masks = att.bool().clone()
    for i, p in enumerate([2, 1, 3, 1]):
        loss_masks[i, :p] = False
    loss_masks = loss_masks[:, 1:]
    ids = torch.randint(0, V, (N, L), generator=g)
    W = torch.randn(V, d, generator=g)
    hidden = torch.randn(N, L, d, generator=g)
    logits = hidden @ W.T
    packed_h, packed_lg = hidden[att.bool()][None], logits[att.bool()][None]
    is_chosen = torch.arange(N) < N // 2
    a = score_stats_flat(*response_positions(hidden, logits, ids, att, loss_masks), is_chosen)
    b = score_stats_flat(*response_positions(packed_h, packed_lg, ids, att, loss_masks), is_chosen)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)
    ref = head_score_stats(hidden[:, :-1], logits[:, :-1], ids[:, 1:], loss_masks, is_chosen)
    for x, y in zip(a, ref):
        torch.testing.assert_close(x, y)
