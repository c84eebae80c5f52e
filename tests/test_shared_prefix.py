"""--po.shared_prefix detach (issue 21, item 2): which tokens are shared, the loss value unchanged bit for bit, DPO's
gradient unchanged, SimPO's shared tokens without gradient, and the detached band statistics against autograd."""

import pytest
import torch

from po_plugins.errors import OptionError
from po_plugins.losses import PairBatch, build
from po_plugins.options import check_options
from po_plugins.prefix import detach_shared, guard_shared, shared_prefix_mask
from po_plugins.scores import score_stats_flat


def _mask(rows_w, rows_l, prompt_lens, left=False, pad=0):
    """Padded [2B, L] ids / attention / response masks from token lists (prompt first)."""
    rows = rows_w + rows_l
    lens = list(prompt_lens) * 2
    L = max(map(len, rows))
    ids = torch.full((len(rows), L), pad)
    att = torch.zeros(len(rows), L, dtype=torch.long)
    resp = torch.zeros(len(rows), L, dtype=torch.bool)
    for i, (r, p) in enumerate(zip(rows, lens)):
        off = L - len(r) if left else 0
        ids[i, off:off + len(r)] = torch.tensor(r)
        att[i, off:off + len(r)] = 1
        resp[i, off + p:off + len(r)] = True
    return ids, att, resp


@pytest.mark.parametrize("left", [False, True])
def test_shared_tokens_are_the_common_start_of_the_responses(left):
    w = [[5, 6, 10, 11, 12, 2], [5, 10, 11, 2], [7, 8, 9, 2], [5, 6, 20, 2]]
    lo = [[5, 6, 10, 11, 2], [5, 10, 11, 2], [7, 8, 1, 2], [5, 7, 20, 2]]
    plens = [2, 1, 3, 2]
    ids, att, resp = _mask(w, lo, plens, left=left)
    m = shared_prefix_mask(ids, att, resp, 4)
    got = [ids[i][m[i]].tolist() for i in range(8)]
    # pair 0: responses 10 11 12 2 / 10 11 2 share 10 11; pair 1: identical responses share every token;
    # pair 2: the prompt is 7 8 9 / 7 8 1 (differs) so nothing is shared though both responses are "2";
    # pair 3: the prompts differ (5 6 / 5 7): the identical response token 20 has another context, not shared
    assert got == [[10, 11], [10, 11, 2], [], [], [10, 11], [10, 11, 2], [], []]
    # empty prompt: the responses are compared from their first token
    ids, att, resp = _mask([[3, 4, 5]], [[3, 4, 6, 7]], [0], left=left)
    assert ids[shared_prefix_mask(ids, att, resp, 1)].tolist() == [3, 4, 3, 4]
    with pytest.raises(ValueError, match="2 × 3 rows"):
        shared_prefix_mask(ids, att, resp, 3)


def test_the_option_takes_keep_detach_or_guard():
    check_options({"shared_prefix": "guard"})
    check_options({"shared_prefix": "detach"})
    with pytest.raises(OptionError, match="--po.shared_prefix takes 'keep', 'detach' or 'guard'"):
        check_options({"shared_prefix": "drop"})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from po_plugins.tiny import make_model, shared_pair_rows

    d = make_model(tmp_path_factory.mktemp("m"), hidden_size=32, layers=2, heads=4)
    tok = AutoTokenizer.from_pretrained(str(d))
    model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    rows = shared_pair_rows(6, seed=1)
    enc = [tok(r["prompt"], add_special_tokens=False)["input_ids"] for r in rows]
    w = [p + tok(" " + r["chosen"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
         for p, r in zip(enc, rows)]
    lo = [p + tok(" " + r["rejected"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
          for p, r in zip(enc, rows)]
    ids, att, resp = _mask(w, lo, [len(p) for p in enc], pad=tok.pad_token_id or 0)
    return model, ids, att, resp


def _token_logps(model, ids, att):
    """Per-token log-probs [2B, L-1] (label indexing) and the head's input at every position."""
    cache = {}
    hook = model.lm_head.register_forward_hook(lambda m, i, o: cache.__setitem__("h", i[0].detach()))
    try:
        logits = model(input_ids=ids, attention_mask=att).logits[:, :-1].float()
    finally:
        hook.remove()
    lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return lp, logits, cache["h"][:, :-1]


def _loss_and_grads(model, name, ids, att, resp, detach, **hp):
    """detach: False (keep), True or "detach", or "guard"."""
    model.zero_grad(set_to_none=True)
    B = ids.shape[0] // 2
    lp, _, _ = _token_logps(model, ids, att)
    lp.retain_grad()
    lab = resp[:, 1:]
    shared = shared_prefix_mask(ids, att, resp, B)[:, 1:] if detach else None
    z = (detach_shared(lp, shared) * lab).sum(-1)
    if detach == "guard":
        z = z + guard_shared((lp * shared).sum(-1))
    n = lab.sum(-1)
    g = torch.Generator().manual_seed(0)
    ref = -20 + torch.randn(2 * B, generator=g)
    loss = build(name, **hp)(PairBatch(z[:B], z[B:], ref[:B], ref[B:], n[:B], n[B:])).mean()
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}, lp.grad, shared


def test_detach_keeps_the_loss_and_dpo_gradient_and_zeroes_simpos_shared_tokens(tiny):
    model, ids, att, resp = tiny
    shared = shared_prefix_mask(ids, att, resp, ids.shape[0] // 2)[:, 1:]
    assert shared.sum() > 0 and (resp[:, 1:] & ~shared).sum() > 0
    # DPO (r = 1 per pair): the shared text's gradient cancels between the two rows; detaching it changes nothing
    l_keep, g_keep, _, _ = _loss_and_grads(model, "dpo", ids, att, resp, False, beta=0.1)
    l_det, g_det, _, _ = _loss_and_grads(model, "dpo", ids, att, resp, True, beta=0.1)
    assert torch.equal(l_keep, l_det)
    for k in g_keep:
        torch.testing.assert_close(g_det[k], g_keep[k], rtol=1e-4, atol=1e-7)
    # SimPO (r = |y_l|/|y_w| < 1 on these pairs): the shared tokens get no gradient under detach, some under keep
    l_keep, g_keep, lp_keep, _ = _loss_and_grads(model, "simpo", ids, att, resp, False)
    l_det, g_det, lp_det, _ = _loss_and_grads(model, "simpo", ids, att, resp, True)
    assert torch.equal(l_keep, l_det)
    assert (lp_det[shared] == 0).all() and (lp_keep[shared].abs() > 1e-6).all()
    assert (lp_det[~shared] == lp_keep[~shared]).all()  # the differing tokens' gradient is unchanged
    assert max(float((g_det[k] - g_keep[k]).abs().max()) for k in g_keep) > 1e-4


def test_detached_band_statistics_equal_autograd_of_the_differing_tokens(tiny):
    """Under detach the vectors that push are the differing tokens' head scores (U_w, U_l): the statistics the plugin
    computes from the positions left after removing the shared ones equal autograd of the mean over pairs of each
    side's differing-token log-likelihood with respect to the head weight."""
    model, ids, att, resp = tiny
    B = ids.shape[0] // 2
    model.zero_grad(set_to_none=True)
    lp, logits, h = _token_logps(model, ids, att)
    shared = shared_prefix_mask(ids, att, resp, B)[:, 1:]
    rest = resp[:, 1:] & ~shared
    t = (lp * rest).sum(-1)
    W = model.lm_head.weight
    (uw,) = torch.autograd.grad(t[:B].mean(), [W], retain_graph=True)
    (ul,) = torch.autograd.grad(t[B:].mean(), [W])
    pos = rest.nonzero(as_tuple=False)
    is_chosen = torch.arange(2 * B) < B
    for method in ("vocab", "gram"):
        st = score_stats_flat(h[pos[:, 0], pos[:, 1]], logits.detach()[pos[:, 0], pos[:, 1]],
                              ids[:, 1:][pos[:, 0], pos[:, 1]], pos[:, 0], is_chosen, method=method)
        torch.testing.assert_close(st.sw_norm, uw.norm(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(st.sl_norm, ul.norm(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(st.sw_dot_sl, (uw * ul).sum(), rtol=1e-5, atol=1e-7)
    # and they differ from the whole responses' (the shared start is most of each chosen response here)
    full = resp[:, 1:].nonzero(as_tuple=False)
    whole = score_stats_flat(h[full[:, 0], full[:, 1]], logits.detach()[full[:, 0], full[:, 1]],
                             ids[:, 1:][full[:, 0], full[:, 1]], full[:, 0], is_chosen)
    assert abs(float(whole.sw_norm) - float(uw.norm())) > 1e-3 * float(uw.norm())


class _Host:
    """The least a host provides for these checks (hosts.base.HostAdapter)."""

    def __init__(self):
        self.printed = []

    def po_head_spec(self):  # pragma: no cover
        raise AssertionError("not used")

    def po_rescore(self, inputs):  # pragma: no cover
        raise AssertionError("not used")

    def po_print(self, msg):
        self.printed.append(msg)

    def po_is_rank_0(self):
        return True


@pytest.mark.parametrize("mode", ["keep", "detach"])
def test_shared_frac_is_the_steps_shared_share_of_response_tokens(tmp_path, mode):
    """`shared_frac` is the step's shared response-start tokens over all its response tokens (a ratio of sums over
    its micro-batches, so the split into micro-batches does not change it); under keep the end-of-run line says how
    to detach them, under detach it does not; Plugin.shared returns the mask only under detach."""
    from po_plugins.hosts.base import RunInfo
    from po_plugins.plugin import Plugin

    host = _Host()
    po = Plugin(build("simpo"), {"monitor": True, "recheck_every": 0, "shared_prefix": mode}, host,
                RunInfo(2, 1, str(tmp_path), lambda n: f"--loss {n}"))
    micro = [([[1, 7, 8, 9, 2], [1, 7, 2]], [1, 1]),  # pair 0: responses 7 8 9 2 / 7 2 share 7; pair 1 as below
             ([[1, 5, 2], [1, 5, 2]], [1, 1])]  # identical responses: both tokens shared
    counts = []
    for rows, plens in micro:
        ids, att, resp = _mask([rows[0]], [rows[1]], plens[:1])
        got = po.shared(ids, att, resp, 1, training=True)
        assert (got is not None) == (mode == "detach")
        counts.append((int(shared_prefix_mask(ids, att, resp, 1).sum()), int(resp.sum())))
        z = torch.tensor([-3.0, -2.0], requires_grad=True)
        po.loss_step(PairBatch(z[:1], z[1:], torch.zeros(1), torch.zeros(1), torch.tensor([4]), torch.tensor([2])),
                     True)
    rec = po.end_step(1)
    assert counts == [(2, 6), (4, 4)]
    assert rec["po/shared_frac"] == pytest.approx(6 / 10)
    assert po.shared(ids, att, resp, 1, training=False) is None  # evaluation and re-scores: nothing
    po.finish()
    assert ("--po.shared_prefix guard stops that" in host.printed[-1]) == (mode == "keep"), host.printed[-1]
    assert "60% of the response tokens so far are text a pair's two responses start with" in host.printed[-1] \
        or mode == "detach"


def test_demo_token_split_benchmark_quick(tmp_path):
    """benchmarks/shared_prefix_demo.py --quick (the demo's real command, one seed): the split adds up to each
    response's change, the shared start has the same log-prob in both responses, and a detach variant runs."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "shared_prefix_demo.py"
    res = subprocess.run([sys.executable, str(bench), "--quick", "--seeds", "1", "--out", str(tmp_path / "o"),
                          "--losses", "dpo,simpo+shared_prefix=detach"], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    head = json.loads(res.stdout.strip().splitlines()[-1])
    for loss in ("dpo", "simpo+shared_prefix=detach"):
        r = head["per_seed"][loss][0]
        assert r["shared_tokens"] > 3 and r["n"] == 16
        assert r["dz_shared"] + r["dz_w_rest"] == pytest.approx(r["dz_w"], abs=1e-9)
        assert r["dz_shared"] + r["dz_l_rest"] == pytest.approx(r["dz_l"], abs=1e-9)
    init = json.loads((tmp_path / "o" / "seed0" / "initial.json").read_text())
    assert all(abs(x["shared"] - x["shared_l"]) < 1e-6 for x in init)
    assert "shared response prefixes: detach" in (tmp_path / "o" / "seed0" / "simpo+shared_prefix=detach"
                                                   / "simpo.log").read_text()


def _swap(ids, att, resp):
    """The same pairs with chosen and rejected exchanged (rows B.. first)."""
    B = ids.shape[0] // 2
    order = torch.cat([torch.arange(B, 2 * B), torch.arange(B)])
    return ids[order], att[order], resp[order]


def test_guard_keeps_the_shared_push_up_and_drops_the_push_down(tiny):
    """guard: the loss value bit for bit; SimPO with the chosen response the shorter (ratio |y_l|/|y_w| > 1, the pair
    pushes its shared text up) trains exactly as keep; with the chosen response the longer (ratio < 1, the pair
    pushes it down) exactly as detach; DPO (ratio 1) as keep."""
    model, ids, att, resp = tiny
    for data, like in (((ids, att, resp), False), (_swap(ids, att, resp), True)):
        l_ref, g_ref, lp_ref, _ = _loss_and_grads(model, "simpo", *data, like)
        l_g, g_g, lp_g, _ = _loss_and_grads(model, "simpo", *data, "guard")
        assert torch.equal(l_g, l_ref)
        assert torch.equal(lp_g, lp_ref)  # the per-token gradients: the same numbers, shared tokens included
        for k in g_ref:
            torch.testing.assert_close(g_g[k], g_ref[k], rtol=1e-6, atol=1e-9)
    l_k, g_k, _, _ = _loss_and_grads(model, "dpo", ids, att, resp, False, beta=0.1)
    l_g, g_g, _, _ = _loss_and_grads(model, "dpo", ids, att, resp, "guard", beta=0.1)
    assert torch.equal(l_k, l_g)
    for k in g_k:
        torch.testing.assert_close(g_g[k], g_k[k], rtol=1e-4, atol=1e-7)


def test_guard_decides_per_pair_from_the_backwards_own_gradient():
    """Each pair on its own: the shared sums keep their gradient when the pair's net push −d_w + d_l on them is
    ≤ 0 and lose it when it is > 0; the value added is exactly zero."""
    p = torch.tensor([-3.0, -2.0, -3.0, -2.0], requires_grad=True)  # pair 0: rows 0, 2; pair 1: rows 1, 3
    out = guard_shared(p)
    assert torch.equal(out, torch.zeros(4))
    (g,) = torch.autograd.grad((out * torch.tensor([-2.0, -1.0, 1.0, 3.0])).sum(), [p])
    assert g.tolist() == [-2.0, 0.0, 1.0, 0.0]  # pair 0: −2 + 1 < 0 kept; pair 1: −1 + 3 > 0 dropped


@pytest.mark.parametrize("loss,hp,names_nearest", [("rc_dpo", {}, True), ("rc_dpo", {"rc_target": "nearest"}, False),
                                                   ("dpo", {}, False)])
def test_the_alarm_names_the_do_no_harm_target_for_centre_calibration(tmp_path, loss, hp, names_nearest):
    """The measured alarm's advice (Plugin._alarm_hint) puts `rc_target nearest` first for the paper's centre target
    (never worse than the base objective in docs/choosing.md's regimes), in the host's spelling; not when it is
    already on, nor for an uncalibrated objective (which is told of its rc_ twin)."""
    from po_plugins.hosts.base import RunInfo
    from po_plugins.plugin import Plugin

    run = RunInfo(1, 1, str(tmp_path), lambda n: f"--loss {n}", spell_option=lambda k, v: f"po_{k}={v!r}")
    hint = Plugin(build(loss, **hp), {"recheck_every": 0}, _Host(), run)._alarm_hint(run)
    assert hint.startswith("po_rc_target='nearest'") == names_nearest, hint
    assert ("--loss dpo (uncalibrated)" in hint) == loss.startswith("rc_")
    assert ("--loss rc_dpo (calibrated)" in hint) == (loss == "dpo")


def test_diagnose_recommends_nearest_where_rc_pushes_shared_text_down():
    from po_plugins.diagnose import recommend

    down = recommend("rc_dpo", 0.49, 0.9, 1.0, r_star=0.6)
    assert "--po.rc_target nearest" in down and "--po.shared_prefix guard" in down and "r* = 0.60" in down
    assert "--po.rc_target nearest" not in recommend("rc_dpo", 0.49, 0.9, 1.0, r_star=1.3)  # pushes it up: keep RC
    assert "--po.rc_target nearest" not in recommend("simpo", 0.49, 0.5, 0.34)  # base objective: guard
    assert "rc_dpo calibrates the ratio, and with --po.rc_target nearest" in recommend("dpo", 0.0, 0.3, 1.0)
