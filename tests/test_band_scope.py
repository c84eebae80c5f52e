"""--po.band_scope model: the band of the step's last micro-batch by autograd over every trainable parameter, beside
the head's closed form on the same pairs (`scope_*` keys, on re-check steps). Against a direct autograd computation on a
two-layer model driven through the Plugin, and through each host's command."""

from __future__ import annotations

import contextlib
import json
import math

import pytest
import torch

from po_plugins.band import band_stats
from po_plugins.hosts.base import RunInfo
from po_plugins.losses import PairBatch, build
from po_plugins.plugin import Plugin
from po_plugins.scores import HeadSpec, tokens_of

V, D, T = 11, 5, 3


class TwoLayerHost:
    """h = tanh(x·A) then logits = h·Wᵀ: every trainable parameter is A and W (with `frozen_a`, W only)."""

    def __init__(self, tmp_path, loss="dpo", frozen_a=False, **options):
        g = torch.Generator().manual_seed(0)
        self.A = torch.randn(D, D, generator=g).requires_grad_(not frozen_a)
        self.W = torch.randn(V, D, generator=g, requires_grad=True)
        self.po = Plugin(build(loss), {"monitor": True, "recheck_every": 2, "band_scope": "model", **options}, self,
                         RunInfo(1, 1, str(tmp_path), lambda n: f"--loss {n}"))

    def forward(self, x, y, n_pairs):
        h = torch.tanh(x @ self.A)
        logits = h @ self.W.T
        z = torch.log_softmax(logits, -1).gather(-1, y[..., None]).squeeze(-1).sum(-1)
        rows = torch.arange(x.shape[0]).repeat_interleave(T)
        tokens = tokens_of(h.reshape(-1, D).detach(), y.reshape(-1), rows, n_pairs,
                           torch.logsumexp(logits.detach().reshape(-1, V), -1))
        return z, tokens

    # the host contract
    def po_head_spec(self):
        return contextlib.nullcontext(HeadSpec(self.W.detach()))

    def po_rescore(self, inputs):
        with torch.no_grad():
            z, _ = self.forward(*inputs)
        return z.chunk(2)

    def po_scope_forward(self, inputs):
        z, tokens = self.forward(*inputs)
        zw, zl = z.chunk(2)
        return zw, zl, tokens, [self.A, self.W]

    def po_print(self, msg):
        pass

    def po_is_rank_0(self):
        return True

    def step(self, x, y, global_step):
        n = x.shape[0] // 2
        training = True
        self.po.scoring(training)
        z, tokens = self.forward(x, y, n)
        b = PairBatch(z[:n], z[n:], torch.zeros(n) - 5, torch.zeros(n) - 5)
        per_sample, _, _ = self.po.loss_step(b, training, (x, y, n), tokens)
        per_sample.mean().backward()
        self.po.before_optimizer_step()
        with torch.no_grad():
            for p in (self.A, self.W):
                if p.grad is not None:
                    p -= 0.1 * p.grad
                    p.grad = None
        return self.po.end_step(global_step)


def data(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(6, T, D, generator=g), torch.randint(0, V, (6, T), generator=g)


def test_model_scope_equals_autograd_and_the_head_scope_the_closed_form(tmp_path):
    host = TwoLayerHost(tmp_path)
    for step in (1, 2):
        x, y = data(step)
        if step == 2:  # the weights of this step's forward, before its update
            A, W = host.A.detach().clone().requires_grad_(True), host.W.detach().clone().requires_grad_(True)
            z = torch.log_softmax(torch.tanh(x @ A) @ W.T, -1).gather(-1, y[..., None]).squeeze(-1).sum(-1)
            gw = torch.autograd.grad(z[:3].mean(), [A, W], retain_graph=True)
            gl = torch.autograd.grad(z[3:].mean(), [A, W])
        host.step(x, y, step)
    rec = [json.loads(line) for line in open(tmp_path / "po_band.jsonl")][1:]
    assert "scope_model_rho" in rec[0]  # the first step (a setting it cannot run with shows at once) ...
    host.step(*data(3), 3)
    assert "scope_model_rho" not in [json.loads(line) for line in open(tmp_path / "po_band.jsonl")][-1]  # ... then
    # re-check steps only (recheck_every 2)
    r = rec[1]
    flat = lambda g: torch.cat([t.reshape(-1) for t in g])  # noqa: E731
    sw, sl = flat(gw), flat(gl)
    assert r["scope_pairs"] == 3 and r["scope_params"] == D * D + V * D
    assert r["scope_model_sw_norm"] == pytest.approx(float(sw.norm()), rel=1e-5)
    assert r["scope_model_sl_norm"] == pytest.approx(float(sl.norm()), rel=1e-5)
    rho = float(sw @ sl / (sw.norm() * sl.norm()))
    assert r["scope_model_rho"] == pytest.approx(rho, rel=1e-5)
    # the head scope: the closed form on W alone, equal to autograd's W block
    assert r["scope_head_sw_norm"] == pytest.approx(float(gw[1].norm()), rel=1e-5)
    assert r["scope_head_rho"] == pytest.approx(float((gw[1] * gl[1]).sum() / (gw[1].norm() * gl[1].norm())),
                                                rel=1e-5)
    band = band_stats(0.05, 0.05, float(sw.norm()), float(sl.norm()), float(sw @ sl))  # DPO at the start: β/2 each
    assert r["scope_model_log_r_star"] == pytest.approx(band["log_r_star"], rel=1e-5)


def test_with_only_the_head_trainable_both_scopes_agree(tmp_path):
    host = TwoLayerHost(tmp_path, frozen_a=True)
    for step in (1, 2):
        host.step(*data(step), step)
    r = [json.loads(line) for line in open(tmp_path / "po_band.jsonl")][2]
    for k in ("sw_norm", "sl_norm", "rho", "log_r_star"):
        assert r[f"scope_model_{k}"] == pytest.approx(r[f"scope_head_{k}"], rel=1e-5), k
    assert r["scope_model_in_band"] == r["scope_head_in_band"]
    assert math.isfinite(r["scope_model_rho"])


def test_band_scope_is_refused_where_it_cannot_run(tmp_path):
    from po_plugins.errors import OptionError
    from po_plugins.options import check_options

    with pytest.raises(OptionError, match="takes 'head' or 'model'"):
        check_options({"band_scope": "all"})
    with pytest.raises(OptionError, match="set --po.recheck_every above 0"):
        check_options({"band_scope": "model", "recheck_every": 0})
