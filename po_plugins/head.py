"""A chunked LM head: log-probs of the labelled tokens without ever holding the [tokens, vocabulary] logits.

The head module is called on chunks of token positions; each chunk's logits live only inside that chunk's
computation and are recomputed in the backward pass (activation checkpointing of the chunk), so the peak is one
chunk's [c, V] fp32 logits instead of the whole [N, T, V] tensor and its fp32 copy and gradient. The recomputation
reruns only the head's product (the log-normalisers are kept from the forward), and the backward writes the
gradient of the head's output directly, g·(onehot − softmax), in place. Calling the head
*module* (never its weight directly) keeps every framework hook working: DeepSpeed ZeRO-3 gathers a sharded weight
in the module's pre-forward hook, in the forward and again in the recomputation, and its gradient reaches the
partitioned parameter through autograd as usual; LoRA-wrapped heads, tied embeddings and biases are the module's
business. The final-logit transform of the model config is applied after the head: a scale, soft-capping, then
the sampling temperature, as the model and the host apply them (`head_transform`).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def head_transform(config) -> tuple[float, float | None]:
    """(logit scale, soft-cap) a causal-LM config applies to its head's output, by the attribute names models use:
    `final_logit_softcapping`; a scale `logit_scale` / `output_multiplier` / `lm_head_multiplier`, or a divisor
    `logits_scaling` (a multiplier for HyperCLOVA X)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    cap = getattr(text, "final_logit_softcapping", None)
    scale = getattr(text, "logit_scale", None)
    if scale is None:
        scale = getattr(text, "output_multiplier", None)
    if scale is None:
        scale = getattr(text, "lm_head_multiplier", None)
    if scale is None and getattr(text, "logits_scaling", None) is not None:
        scale = text.logits_scaling if getattr(text, "model_type", "") == "hyperclovax" else 1 / text.logits_scaling
    return (1.0 if scale is None else float(scale)), (float(cap) if cap else None)


def final_logits(raw: torch.Tensor, scale: float = 1.0, softcap: float | None = None,
                 temperature: float = 1.0) -> torch.Tensor:
    """The head's output turned into the logits that are softmaxed, in fp32."""
    z = raw.float()
    if scale != 1.0:
        z = z * scale
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    if temperature != 1.0:
        z = z / temperature
    return z


def _final_inplace(u: torch.Tensor, scale: float, softcap: float | None, temperature: float, slope: bool = False,
                   out: torch.Tensor | None = None):
    """(z, ∂z/∂u): `final_logits(u)` as a fresh fp32 tensor (or written into `out`, a reused buffer of u's shape),
    transformed in place, and its derivative with respect to the head's output (a tensor under soft-capping, a float
    otherwise, None for the identity) when `slope`."""
    z = u.to(torch.float32, copy=True) if out is None else out.copy_(u)
    if softcap:
        t = z.mul_(scale / softcap).tanh_()
        dz = t.square().neg_().add_(1.0).mul_(scale / temperature) if slope else None
        return t.mul_(softcap / temperature), dz
    c = scale / temperature
    if c != 1.0:
        z.mul_(c)
    return z, (c if c != 1.0 else None)


def _logprobs_consuming(z: torch.Tensor, y: torch.Tensor, softmax: bool = False):
    """(log p(y_t), logsumexp_t) of fp32 logits z [c, V], using z as the scratch of the log-sum-exp (z is destroyed):
    the max-shifted sum of torch.logsumexp without its [c, V] temporary. `softmax`: z is left holding the softmax."""
    zy = z.gather(-1, y[:, None]).squeeze(-1)
    m = z.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    lse = z.sub_(m).exp_().sum(dim=-1).log_().add_(m.squeeze(-1))
    if softmax:  # exp(z − m)·exp(m − lse)
        z.mul_((m.squeeze(-1) - lse).exp_()[:, None])
    return zy.sub_(lse), lse


def _add_scores(sink, p, dz, h, y, a):
    """Add one chunk's score matrices to `sink` = (weights [M, 2], buffer [2, V, d] fp32): buffer[k] += Σ_t
    weights[t, k]·((onehot − softmax)·∂z/∂u)_tᵀ h_t over the chunk's positions t ∈ [a, a + c), from its softmax `p`
    (destroyed). The softmax part is multiplied in the head's dtype; the label part is added exactly in fp32."""
    wts, buf = sink
    w = wts[a:a + p.shape[0]].to(p.device)
    hf = h.float()
    if dz is not None:
        p.mul_(dz)
    slope = None if dz is None else (dz.gather(-1, y[:, None]).squeeze(-1) if torch.is_tensor(dz) and dz.dim() == 2
                                     else torch.full_like(hf[:, 0], float(dz)))
    for k in range(2):
        idx = (w[:, k] != 0).nonzero(as_tuple=True)[0]
        if idx.numel() == 0:
            continue
        hk = hf[idx] * w[idx, k][:, None]
        buf[k].sub_((p[idx].T.to(h.dtype) @ hk.to(h.dtype)).float())
        buf[k].index_add_(0, y[idx], hk if slope is None else hk * slope[idx, None])


class _TokenLogProb(torch.autograd.Function):
    """log p(y_t) = z_t[y_t] − logsumexp(z_t) of the final logits z = f(u) of one chunk of positions, with a backward
    that writes the gradient of the head's output in three passes over the chunk: g·(onehot − softmax)·∂z/∂u.
    `memo` (a list) carries (log-probs, log-normalisers) from the forward to the checkpoint's recomputation, which
    then only reruns the head's product (the tensors the backward needs) and no log-sum-exp."""

    @staticmethod
    def forward(ctx, u, y, memo, scale, softcap, temperature):
        if memo:
            lp, lse = memo
        else:
            lp, lse = _logprobs_consuming(_final_inplace(u, scale, softcap, temperature)[0], y)
            memo.extend((lp, lse))
        ctx.save_for_backward(u, y, lse)
        ctx.transform = (scale, softcap, temperature)
        return lp.clone()

    @staticmethod
    def backward(ctx, g):
        u, y, lse = ctx.saved_tensors
        z, dz = _final_inplace(u, *ctx.transform, slope=True)
        g = g.float()
        gz = z.sub_(lse[:, None]).exp_().mul_(-g[:, None])  # −g·softmax
        gz.scatter_add_(1, y[:, None], g[:, None])  # + g at the label
        if dz is not None:
            gz.mul_(dz)
        return gz.to(u.dtype), None, None, None, None, None


class _LinearHeadLogProb(torch.autograd.Function):
    """All chunks of a plain linear head in one function, so that the head weight's gradient is summed across chunks
    in fp32 (autograd would add each chunk's [V, d] contribution in the weight's dtype: with bf16 the error grows with
    the number of chunks) and cast to the weight's dtype once, as the stock head's single product is. Each chunk's
    products run in the head's dtype; the forward keeps only the log-normalisers and the backward recomputes each
    chunk's head product, as the checkpointed module path does."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk, scale, softcap, temperature, sink=None):
        lps, lses = [], []
        for a in range(0, hidden.shape[0], chunk):
            h, y = hidden[a:a + chunk], labels[a:a + chunk]
            u = torch.nn.functional.linear(h, weight, bias)
            z, dz = _final_inplace(u, scale, softcap, temperature, slope=sink is not None)
            lp, lse = _logprobs_consuming(z, y, softmax=sink is not None)
            if sink is not None:  # the head statistics' score matrices from this very pass (no second one)
                _add_scores(sink, z, dz, h, y, a)
            lps.append(lp)
            lses.append(lse)
        lse = torch.cat(lses)
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.args = (chunk, scale, softcap, temperature)
        ctx.mark_non_differentiable(lse)
        return torch.cat(lps), lse

    @staticmethod
    def backward(ctx, g, _g_lse):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        chunk, scale, softcap, temperature = ctx.args
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dh = torch.empty_like(hidden) if need_h else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        db = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        g = g.float()
        for a in range(0, hidden.shape[0], chunk):
            h, y, gc = hidden[a:a + chunk], labels[a:a + chunk], g[a:a + chunk]
            u = torch.nn.functional.linear(h, weight, bias)
            z, dz = _final_inplace(u, scale, softcap, temperature, slope=True)
            gz = z.sub_(lse[a:a + chunk, None]).exp_().mul_(-gc[:, None])  # −g·softmax
            gz.scatter_add_(1, y[:, None], gc[:, None])  # + g at the label
            if dz is not None:
                gz.mul_(dz)
            gu = gz.to(u.dtype)  # the head output's gradient in its dtype, as autograd would pass it
            if need_h:
                dh[a:a + chunk] = gu @ weight
            if need_w:
                dw.add_(gu.T @ h)  # this chunk's product in the head's dtype, the sum over chunks in fp32
            if need_b:
                db.add_(gz.sum(0))
        return (dh, None if dw is None else dw.to(weight.dtype), None if db is None else db.to(bias.dtype),
                None, None, None, None, None, None)


def _plain_linear(head) -> bool:
    """The fp32-accumulating path applies: a bare nn.Linear (no LoRA or other wrapper, no hooks the module call would
    run) whose weight is whole on this process (not a ZeRO-3 shard)."""
    return (type(head) is torch.nn.Linear and not head._forward_hooks and not head._forward_pre_hooks
            and not torch.nn.modules.module._global_forward_hooks
            and not torch.nn.modules.module._global_forward_pre_hooks
            and getattr(head.weight, "ds_id", None) is None)


def fused_scores_ok(head) -> bool:
    """Whether `chunked_logprobs` can return the head statistics' score matrices from its own pass (`score_sink`)."""
    return _plain_linear(head)


def _chunk_logprobs(head, h, y, memo, scale, softcap, temperature):
    return _TokenLogProb.apply(head(h), y, memo, scale, softcap, temperature)


def _chunk_logprobs_nograd(head, h, y, scale, softcap, temperature):
    return _logprobs_consuming(_final_inplace(head(h), scale, softcap, temperature)[0], y)


def default_chunk(vocab_size: int) -> int:
    """Token positions per chunk: about 2^25 logits (128 MiB in fp32; a chunk's forward and backward hold a few such
    buffers) at a time, at least 16 positions: 256 positions at V = 128k, 1,024 at V = 32k. Each chunk's backward
    adds its head-weight gradient [V, d] once, so much smaller chunks spend their time on those additions (2-core
    CPU, 4,096 positions, V = 128k, d = 256: 2^22 logits a chunk took 1.8 × the forward and backward time of 2^25)."""
    return max(16, (1 << 25) // max(1, int(vocab_size)))


def chunked_logprobs(
    head: torch.nn.Module,
    hidden: torch.Tensor,  # [M, d]  the head's input at the scored positions
    labels: torch.Tensor,  # [M]     the next-token ids at those positions
    chunk: int | None = None,
    scale: float = 1.0,
    softcap: float | None = None,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    return_lse: bool = False,
    fp32_accumulate: bool = True,
    score_sink: tuple | None = None,
):
    """log p(y_t | ·) for every position, fp32 [M], differentiable with respect to `hidden` and the head's
    parameters. `chunk` positions at a time (default `default_chunk(V)`); with gradients enabled each chunk is
    checkpointed, so its logits are freed after the forward and recomputed in the backward. `return_lse=True` also
    returns the detached log-normalisers [M] (the head statistics reuse them instead of a pass of their own).

    `fp32_accumulate` (default): where the head is a plain `nn.Linear` whose weight is whole on this process (no LoRA
    or other wrapper, no module hooks, not a ZeRO-3 shard), the head weight's gradient is summed across chunks in fp32
    and cast once (`_LinearHeadLogProb`; its memory: one fp32 [V, d] buffer during the backward). Elsewhere each chunk
    calls the module (its hooks run) and autograd sums the chunks' weight gradients in the weight's dtype.

    `score_sink` = (weights [M, 2], buffer [2, V, d] fp32): the forward also adds the head weight's score matrices
    Σ_t weights[t, k]·(onehot − softmax)_tᵀ h_t of each side k (chosen, rejected) to the buffer, from the softmax it
    already has (the head statistics then need no vocabulary pass of their own). Only on the fp32-accumulating path:
    `fused_scores_ok(head)` says whether it applies; elsewhere a ValueError."""
    M = hidden.shape[0]
    if M == 0:  # keep the graph connected so a backward through an empty selection is a zero, not an error
        zero = hidden.sum(-1).float() * 0.0
        return (zero, zero.detach()) if return_lse else zero
    if chunk is None:
        weight = getattr(head, "weight", None)
        V = vocab_size or (getattr(weight, "ds_shape", None) or getattr(weight, "shape", (1 << 15,)))[0]
        chunk = default_chunk(V)
    labels = labels.long()
    track = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in head.parameters()))
    if score_sink is not None and not (fp32_accumulate and _plain_linear(head)):
        raise ValueError("score_sink needs the plain-linear head path (fused_scores_ok(head))")
    if (track or score_sink is not None) and fp32_accumulate and _plain_linear(head):
        with torch.set_grad_enabled(track):
            lp, lse = _LinearHeadLogProb.apply(hidden, head.weight, head.bias, labels, int(chunk), scale, softcap,
                                               temperature, score_sink)
        return (lp, lse) if return_lse else lp
    out, lses = [], []
    for a in range(0, M, chunk):
        h, y = hidden[a:a + chunk], labels[a:a + chunk]
        if track:
            memo = []
            lp = checkpoint(_chunk_logprobs, head, h, y, memo, scale, softcap, temperature, use_reentrant=False)
            lse = memo[1]
        else:
            with torch.no_grad():
                lp, lse = _chunk_logprobs_nograd(head, h, y, scale, softcap, temperature)
        out.append(lp)
        lses.append(lse)
    return (torch.cat(out), torch.cat(lses)) if return_lse else torch.cat(out)
