"""The chunked LM head (po_plugins.head) against the unfused computation: values and gradients."""

import pytest
import torch

from po_plugins.head import chunked_logprobs, final_logits, head_transform


def reference(head, h, y, scale, cap, temp):
    z = final_logits(head(h), scale, cap, temp)  # the whole [M, V] logits at once
    return torch.log_softmax(z, -1).gather(-1, y[:, None]).squeeze(-1)


@pytest.mark.parametrize("fp32_acc", [True, False])  # the plain-linear function and the module path
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1, 5, 7, 64])
@pytest.mark.parametrize("variant", ["plain", "bias", "softcap_scale_temperature", "tied"])
def test_chunked_logprobs_equal_unfused_values_and_gradients(dtype, chunk, variant, fp32_acc):
    g = torch.Generator().manual_seed(3)
    M, d, V = 23, 8, 37  # chunk sizes that divide neither
    head = torch.nn.Linear(d, V, bias=variant == "bias").to(dtype)
    if variant == "tied":
        emb = torch.nn.Embedding(V, d).to(dtype)
        head.weight = emb.weight
    scale, cap, temp = (0.7, 2.5, 0.8) if variant == "softcap_scale_temperature" else (1.0, None, 1.0)
    h = torch.randn(M, d, generator=g).to(dtype).requires_grad_()
    y = torch.randint(0, V, (M,), generator=g)
    w = torch.randn(M, generator=g)
    lp = chunked_logprobs(head, h, y, chunk=chunk, scale=scale, softcap=cap, temperature=temp,
                          fp32_accumulate=fp32_acc)
    gh, gw = torch.autograd.grad((lp * w).sum(), [h, head.weight])
    ref = reference(head, h, y, scale, cap, temp)
    rh, rw = torch.autograd.grad((ref * w).sum(), [h, head.weight])
    assert lp.dtype == torch.float32 and lp.shape == (M,)
    # bf16: the head rounds its output to bf16, and a GEMM over a chunk of rows may round differently (1 ulp)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(lp, ref, **tol)
    torch.testing.assert_close(gh.float(), rh.float(), **tol)
    torch.testing.assert_close(gw.float(), rw.float(), **tol)
    if variant == "bias":
        (gb,) = torch.autograd.grad(chunked_logprobs(head, h, y, chunk=chunk, fp32_accumulate=fp32_acc).sum(),
                                    [head.bias])
        (rb,) = torch.autograd.grad(reference(head, h, y, 1.0, None, 1.0).sum(), [head.bias])
        torch.testing.assert_close(gb.float(), rb.float(), **tol)


def test_head_weight_gradient_sums_chunks_in_fp32():
    """bf16 head, 256 chunks: against fp64, the head weight's gradient summed across chunks in fp32 is about as accurate
    as the stock head's single product, while the module path (autograd adding each chunk's bf16 gradient) is not."""
    g = torch.Generator().manual_seed(0)
    M, d, V, chunk = 4096, 64, 512, 16
    head = torch.nn.Linear(d, V, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, d, generator=g) * 0.2)
    h = torch.randn(M, d, generator=g).to(torch.bfloat16)
    y = torch.randint(0, V, (M,), generator=g)
    w = torch.rand(M, generator=g)  # a chosen-side weighting: every position pushes the same way

    def grad_w(fn, weight):
        (gw,) = torch.autograd.grad((fn(weight) * w.to(weight.dtype)).sum(), [weight])
        return gw.double()

    w64 = head.weight.detach().double().requires_grad_()
    exact = grad_w(lambda W: torch.log_softmax(h.double() @ W.T, -1).gather(-1, y[:, None]).squeeze(-1), w64)
    stock = grad_w(lambda W: torch.log_softmax((h @ W.T).float(), -1).gather(-1, y[:, None]).squeeze(-1), head.weight)
    err = {"stock": float((stock - exact).norm() / exact.norm())}
    for name, acc in (("fp32", True), ("module", False)):
        got = grad_w(lambda W, acc=acc: chunked_logprobs(head, h, y, chunk=chunk, fp32_accumulate=acc), head.weight)
        err[name] = float((got - exact).norm() / exact.norm())
    assert err["fp32"] <= 1.5 * err["stock"], err
    assert err["module"] > 2 * err["fp32"], err


def test_no_chunk_holds_more_than_its_positions():
    seen = []

    class Spy(torch.nn.Linear):
        def forward(self, x):
            seen.append(x.shape[0])
            return super().forward(x)

    head = Spy(4, 11)  # a subclass: the module path (its forward runs per chunk)
    h = torch.randn(10, 4, requires_grad=True)
    lp = chunked_logprobs(head, h, torch.randint(0, 11, (10,)), chunk=3)
    assert seen == [3, 3, 3, 1]  # forward: one chunk's logits at a time
    lp.sum().backward()
    assert seen[4:] == [1, 3, 3, 3] or sorted(seen[4:]) == [1, 3, 3, 3]  # backward: each chunk recomputed once
    assert h.grad is not None and torch.isfinite(h.grad).all()


def test_empty_selection_is_a_differentiable_zero():
    head = torch.nn.Linear(4, 9)
    h = torch.randn(0, 4, requires_grad=True)
    out = chunked_logprobs(head, h, torch.zeros(0, dtype=torch.long))
    assert out.shape == (0,)
    out.sum().backward()


def test_head_transform_reads_the_config_names():
    from types import SimpleNamespace as N

    assert head_transform(N(final_logit_softcapping=30.0)) == (1.0, 30.0)
    assert head_transform(N(logit_scale=0.5)) == (0.5, None)
    assert head_transform(N(logits_scaling=4.0, model_type="granite")) == (0.25, None)
    assert head_transform(N(logits_scaling=4.0, model_type="hyperclovax")) == (4.0, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_statistics_reuse_the_chunked_heads_normalisers(dtype):
    """--po.fused_head's statistics: the chunked head's log-normalisers and the head's own product (in its dtype)
    give the statistics of the logits the model itself produces, as the logits path computes them."""
    from po_plugins.scores import score_stats_flat, score_stats_head

    g = torch.Generator().manual_seed(5)
    M, d, V = 19, 8, 41
    head = torch.nn.Linear(d, V, bias=True).to(dtype)
    h = torch.randn(M, d, generator=g).to(dtype)
    y = torch.randint(0, V, (M,), generator=g)
    rows = torch.arange(M) % 4
    is_chosen = torch.tensor([True, False, True, False])
    with torch.no_grad():
        _, lse = chunked_logprobs(head, h, y, chunk=6, return_lse=True)
        fused = score_stats_head(h, head.weight, y, rows, is_chosen, bias=head.bias, chunk_size=10, lse=lse,
                                 head_dtype=dtype)
        logits = score_stats_flat(h, head(h), y, rows, is_chosen, chunk_size=10)  # the logits path (a hook's view)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-3)
    for a, b in zip(fused, logits):
        torch.testing.assert_close(a, b, **tol)


def test_bf16_statistics_keep_fp32_accuracy():
    """The vocabulary pass multiplies in the head's dtype (bf16) with the label part added exactly: against an fp64
    evaluation from the same bf16 logits, the norms agree to 3e-5 and the inner product to 5e-6 of the norms'
    product (measured 1.3e-5 and 1.5e-6; a plain bf16 product of A = onehot − softmax misses the norms by 1.3e-4)."""
    from po_plugins.scores import score_stats_head

    g = torch.Generator().manual_seed(9)
    M, d, V = 512, 64, 4096
    W = (torch.randn(V, d, generator=g) * 0.3).bfloat16()
    h = torch.randn(M, d, generator=g).bfloat16()
    y = torch.randint(0, V, (M,), generator=g)
    rows = torch.arange(M) * 4 // M
    is_chosen = torch.tensor([True, False, True, False])
    st = score_stats_head(h, W, y, rows, is_chosen, head_dtype=torch.bfloat16, chunk_size=1000, method="vocab")
    z = (h @ W.T).double()  # the model's bf16 head product, then exact
    A = -torch.softmax(z, -1)
    A[torch.arange(M), y] += 1
    side = is_chosen[rows]
    sw, sl = A[side].T @ h.double()[side] / 2, A[~side].T @ h.double()[~side] / 2
    assert abs(float(st.sw_norm) / float(sw.norm()) - 1) < 3e-5
    assert abs(float(st.sl_norm) / float(sl.norm()) - 1) < 3e-5
    assert abs(float(st.sw_dot_sl) - float((sw * sl).sum())) < 5e-6 * float(sw.norm() * sl.norm())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", ["plain", "bias", "softcap_scale_temperature", "scale"])
def test_score_sink_gives_the_two_pass_statistics_from_the_heads_own_pass(dtype, variant):
    """RC's statistics from the chunked head's forward (`score_sink`) equal the separate vocabulary pass's
    (`score_stats_head` with the head's normalisers), and in fp32 each side's matrix is autograd's gradient of its
    mean log-prob; the log-probs and gradients of the pass are unchanged; a `keep` mask leaves tokens out."""
    from po_plugins.head import fused_scores_ok
    from po_plugins.scores import dot64 as _dot64
    from po_plugins.scores import score_stats_head

    g = torch.Generator().manual_seed(5)
    M, d, V, n_pairs = 29, 8, 41, 3
    head = torch.nn.Linear(d, V, bias=variant == "bias").to(dtype)
    scale, cap, temp = {"softcap_scale_temperature": (0.7, 2.5, 0.8), "scale": (0.5, None, 1.0)}.get(variant,
                                                                                                    (1.0, None, 1.0))
    h = torch.randn(M, d, generator=g).to(dtype)
    y = torch.randint(0, V, (M,), generator=g)
    rows = torch.randint(0, 2 * n_pairs, (M,), generator=g)
    keep = torch.rand(M, generator=g) > 0.2
    chosen = (rows < n_pairs).float()
    wts = torch.stack([chosen, 1 - chosen], 1) / n_pairs * keep.float()[:, None]
    assert fused_scores_ok(head)
    buf = torch.zeros(2, V, d)
    hh = h.clone().requires_grad_()
    lp, lse = chunked_logprobs(head, hh, y, chunk=6, scale=scale, softcap=cap, temperature=temp, return_lse=True,
                               score_sink=(wts, buf))
    ref_lp = chunked_logprobs(head, h, y, chunk=6, scale=scale, softcap=cap, temperature=temp)
    torch.testing.assert_close(lp.detach(), ref_lp, rtol=0, atol=0)
    st = score_stats_head(h[keep], head.weight.detach(), y[keep], rows[keep], torch.arange(2 * n_pairs) < n_pairs,
                          bias=None if head.bias is None else head.bias.detach(), logit_scale=scale, softcap=cap,
                          temperature=temp, lse=lse[keep], chunk_size=7, head_dtype=dtype)
    got = [float(_dot64(buf[0], buf[0]).sqrt()), float(_dot64(buf[1], buf[1]).sqrt()), float(_dot64(buf[0], buf[1]))]
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    assert got == pytest.approx([float(st.sw_norm), float(st.sl_norm), float(st.sw_dot_sl)], rel=tol, abs=tol)
    if dtype == torch.float32:
        W = head.weight.detach().clone().requires_grad_()
        z = final_logits(torch.nn.functional.linear(h, W, head.bias), scale, cap, temp)
        lpw = torch.log_softmax(z, -1).gather(-1, y[:, None]).squeeze(-1)
        for k in range(2):
            (gk,) = torch.autograd.grad((lpw * wts[:, k]).sum(), [W], retain_graph=True)
            torch.testing.assert_close(buf[k], gk, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="plain-linear head path"):
        chunked_logprobs(head, h, y, score_sink=(wts, buf), fp32_accumulate=False)
