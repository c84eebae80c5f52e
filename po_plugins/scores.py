"""Head score statistics: norms and inner product of s_w = grad_W mean(z_w), s_l = grad_W mean(z_l).

The disentanglement band (arXiv 2604.18239; docs/monitor.md, "The band of a step") needs ‖s_w‖, ‖s_l‖ and
⟨s_w, s_l⟩ restricted to the LM-head weight W (V×d). With logits = hidden @ Wᵀ, the gradient of a summed response
log-prob is sum_t (e_{y_t} − softmax(logits_t)) h_tᵀ, so the three statistics follow from hidden states and logits
alone: no V×d matrix is materialised at once (the vocabulary is processed in chunks) and W itself is never read,
which is what makes this work when ZeRO-3 shards W.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


class ScoreStats(NamedTuple):
    """Scalar statistics of the chosen/rejected score vectors (0-dim tensors)."""

    sw_norm: torch.Tensor
    sl_norm: torch.Tensor
    sw_dot_sl: torch.Tensor


class ReusedStats(ScoreStats):
    """The statistics of an earlier micro-batch, given to one that was not scored (`--po.score_every` k > 1): RC
    calibrates with them but does not count them again in its score EMAs."""

    __slots__ = ()


@torch.no_grad()
def head_score_stats(
    hidden: torch.Tensor,  # [N, T, d]   inputs of the LM head
    logits: torch.Tensor,  # [N, T, V]   hidden @ W.T (any dtype; computed in fp32)
    labels: torch.Tensor,  # [N, T]      next-token ids aligned with logits
    mask: torch.Tensor,  # [N, T]      1 on response positions
    is_chosen: torch.Tensor,  # [N] bool
    chunk_size: int = 4096,
) -> ScoreStats:
    """‖s_w‖, ‖s_l‖, ⟨s_w, s_l⟩ where s = ∇_W of the mean over chosen (rejected) rows of summed response logps.

    Cost: one pass over the vocabulary, O(M·V·d) for M response tokens; memory O(M·chunk + chunk·d).

    Args: as annotated above (padded [N, T, ·] layout); chunk_size: vocabulary rows per chunk.

    Returns:
        ScoreStats of 0-dim fp32 tensors; ValueError when hidden and logits disagree in shape.
    """
    if hidden.dim() != 3 or logits.dim() != 3 or logits.shape[:2] != hidden.shape[:2]:
        raise ValueError(f"hidden [N,T,d] and logits [N,T,V] must agree, got {tuple(hidden.shape)}, "
                         f"{tuple(logits.shape)}")
    mask = mask.bool()
    pos = mask.nonzero(as_tuple=False)
    return score_stats_flat(hidden[pos[:, 0], pos[:, 1]], logits[pos[:, 0], pos[:, 1]], labels[pos[:, 0], pos[:, 1]],
                            pos[:, 0], is_chosen, chunk_size)


@torch.no_grad()
def score_stats_flat(
    hidden: torch.Tensor,  # [M, d]  head inputs at the response positions
    logits: torch.Tensor,  # [M, V]
    labels: torch.Tensor,  # [M]     next-token ids
    rows: torch.Tensor,  # [M]     sequence index of each position
    is_chosen: torch.Tensor,  # [N]   bool per sequence
    chunk_size: int = 4096,
    method: str = "auto",
    logit_scale: float = 1.0,
    softcap: float | None = None,
    temperature: float = 1.0,
    acc: torch.Tensor | None = None,
) -> ScoreStats:
    """The same statistics from response positions already gathered (any layout, e.g. packed sequences).

    `logits` are the logits that are softmaxed, z = c·tanh(s·u/c)/T of the head's raw output u (z = s·u/T without
    soft-capping; the defaults: z = u); scale, cap and temperature enter as ∂z/∂u, so the statistics stay those of
    the head weight.

    Two exact evaluations of s = Aᵀ H (A = onehot − softmax, rows scaled by 1/n of their side, H the head inputs):
      "vocab": s chunk by chunk over the vocabulary, ‖s‖² summed: O(M·V·d) work, O(M·chunk + chunk·d) memory;
      "gram":  ⟨s_a, s_b⟩ = Σ_{i∈a, j∈b} (A Aᵀ)_ij (H Hᵀ)_ij with A Aᵀ accumulated over vocabulary chunks:
               O(M²·V) work, O(M·chunk + M²) memory.
    "auto" takes the cheaper: gram when M < 2d (measured crossover on CPU; one GEMM beats two per chunk).

    Args: as annotated above; `acc` [2, V, d] fp32 (vocabulary pass only): each side's score matrix (its mean over the
    micro-batch's pairs) is added to it (BandMonitor.step_acc).

    Returns:
        ScoreStats of 0-dim fp32 tensors.
    """
    V = logits.shape[-1]

    def chunk(a, b):
        z = logits[:, a:b].to(torch.float32, copy=True)  # a_chunk works in place
        return z, _final_slope(z, logit_scale, softcap, temperature)

    return _stats(hidden, labels, rows, is_chosen, V, chunk, chunk_size, method, acc=acc)


def _final_slope(z: torch.Tensor, logit_scale: float, softcap: float | None, temperature: float):
    """∂z/∂u of the final logits z = c·tanh(s·u/c)/T (z = s·u/T uncapped) given z: a tensor like z, a 0-dim tensor, or
    None for 1."""
    s, T = float(logit_scale), float(temperature)
    if softcap:
        t = z * (T / softcap)
        return (s / T) * (1 - t * t)
    return None if s == T else torch.full((), s / T, device=z.device)


def _grad_rows(z: torch.Tensor, dz, lse: torch.Tensor, y: torch.Tensor, a: int = 0) -> torch.Tensor:
    """(e_y − softmax) ⊙ ∂z/∂u on vocabulary rows [a, a + z.shape[1]), in place on `z` (those rows' fp32 final logits,
    [M, ·]; `dz` their ∂z/∂u or None for 1; `lse` [M, 1] the full-vocabulary log-normalisers; `y` [M] the labels):
    each token's log-prob gradient with respect to the head's raw output, on those rows."""
    g = z.sub_(lse).exp_().neg_()
    hit = ((y >= a) & (y < a + g.shape[1])).nonzero(as_tuple=True)[0]
    if hit.numel():
        g[hit, y[hit] - a] += 1.0
    return g if dz is None else g.mul_(dz)


@torch.no_grad()
def score_rows(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, logit_scale: float = 1.0,
               softcap: float | None = None, temperature: float = 1.0) -> torch.Tensor:
    """[M, V] fp32 rows a_t = (e_{y_t} − softmax(z_t)) ⊙ ∂z_t/∂u_t of the final logits `logits` [M, V] (lse: their
    [M] log-normalisers): each response token's log-prob gradient with respect to the head's raw output, so that
    ∇_W log p(y_t) = a_tᵀ h_t (StepGram)."""
    z = logits.to(torch.float32, copy=True)
    dz = _final_slope(z, logit_scale, softcap, temperature)
    return _grad_rows(z, dz, lse.float().reshape(-1, 1).to(z.device), labels.long().to(z.device))


@torch.no_grad()
def head_score_rows(hidden: torch.Tensor, labels: torch.Tensor, spec: HeadSpec,
                    lse: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(`score_rows` [M, V] fp32, lse [M]) for a host whose head builds no logits: the final logits rebuilt once from
    the head's input and weight (`lse`: the log-normalisers where the host's head computed them)."""
    z, _ = _head_chunk(hidden, spec)(0, spec.weight.shape[0])
    if lse is None:
        lse = torch.logsumexp(z, dim=-1)
    return score_rows(z, labels, lse, spec.logit_scale, spec.softcap, spec.temperature), lse.float()


class StepGram:
    """The optimizer step's response tokens held as their log-prob gradients with respect to the head's output
    (`score_rows`, [M_i, V] per micro-batch) and head inputs, with the token Gram matrix K = A Aᵀ built as they come
    (each new micro-batch against itself and every earlier one): then ⟨s_a, s_b⟩ = Σ_{t∈a, u∈b} w_t w_u K_tu (h_t·h_u)
    for the step (any per-token weights) and for a probe, with no vocabulary pass and no [V, d] matrix.

    Work: M_i·M·V per micro-batch (M: the step's tokens so far), against 2·M_i·V·d for a vocabulary pass; memory
    M·V·4 bytes. The monitor uses it while the step's tokens stay under 2·d and its budget (BandMonitor.step_gram),
    on one process (on several the rows would have to be gathered)."""

    def __init__(self):
        self.a: list[torch.Tensor] = []  # [M_i, V] fp32
        self.h: list[torch.Tensor] = []  # [M_i, d] fp32
        self.chosen: list[torch.Tensor] = []  # [M_i] bool
        self.pairs: list[int] = []
        self.k: dict[tuple[int, int], torch.Tensor] = {}  # (i, j), j ≤ i: A_i A_jᵀ

    @property
    def tokens(self) -> int:
        return sum(int(a.shape[0]) for a in self.a)

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() for a in self.a)

    def add(self, a: torch.Tensor, hidden: torch.Tensor, chosen: torch.Tensor, pairs: int) -> ScoreStats:
        """Hold one micro-batch (a: `score_rows` [M, V]; hidden [M, d]; chosen [M] bool per token; its pairs) and
        return its own statistics (each side at 1/pairs)."""
        i = len(self.a)
        for j in range(i):
            self.k[(i, j)] = a @ self.a[j].T
        kii = a @ a.T
        self.k[(i, i)] = kii
        self.a.append(a)
        self.h.append(hidden.detach().float())
        self.chosen.append(chosen.bool())
        self.pairs.append(int(pairs))
        c = chosen.bool()
        n = 1.0 / max(int(pairs), 1)
        return _gram_stats(kii, self.h[i] * n, c)

    def stats(self, n_micro: int) -> ScoreStats:
        """The step's statistics: each pair at 1/(n_micro · its micro-batch's pairs), as the optimizer weighs it."""
        k, hw, c = self._all(n_micro)
        return _gram_stats(k, hw, c)

    def probe_dots(self, n_micro: int, probe: ProbeRows) -> tuple:
        """(⟨s_w, s_pw⟩, ⟨s_l, s_pw⟩, ⟨s_w, s_pl⟩, ⟨s_l, s_pl⟩): the step's scores with the probe pairs' mean scores."""
        _, hw, c = self._all(n_micro, gram=False)
        return probe.dots_rows(torch.cat(self.a), hw, c)

    def _all(self, n_micro: int, gram: bool = True):
        w = torch.cat([torch.full((a.shape[0],), 1.0 / (max(p, 1) * max(n_micro, 1)), device=a.device)
                       for a, p in zip(self.a, self.pairs)])
        hw = torch.cat(self.h) * w[:, None]
        c = torch.cat(self.chosen)
        if not gram:
            return None, hw, c
        sizes = [int(a.shape[0]) for a in self.a]
        k = torch.cat([torch.cat([self.k[(i, j)] if j <= i else self.k[(j, i)].T for j in range(len(sizes))], 1)
                       for i in range(len(sizes))], 0)
        return k, hw, c

    def flush(self, acc: torch.Tensor) -> None:
        """Add every held micro-batch's score matrices (each side at 1/pairs) to a [2, V, d] step accumulator and
        forget them (the step continues on the vocabulary pass)."""
        for a, h, c, p in zip(self.a, self.h, self.chosen, self.pairs):
            n = 1.0 / max(p, 1)
            acc[0].addmm_(a[c].T, h[c], alpha=n)
            acc[1].addmm_(a[~c].T, h[~c], alpha=n)
        self.clear()

    def clear(self) -> None:
        self.a, self.h, self.chosen, self.pairs, self.k = [], [], [], [], {}


class ProbeRows:
    """The probe pairs' response tokens held for `probe_pred_*` between re-scores: their score rows a_t ([M_p, V] fp32,
    `score_rows` at the weights of the re-score) and head inputs weighted 1/n_probe (n_probe: the probe's pairs on
    all processes), so that every step's prediction costs a product with the step's scores, not a vocabulary pass."""

    def __init__(self, a: torch.Tensor, hw: torch.Tensor, chosen: torch.Tensor):
        self.a, self.hw, self.chosen = a, hw, chosen.bool()
        self._mats = None

    @classmethod
    @torch.no_grad()
    def build(cls, probe: list[Tokens], spec: HeadSpec, n_probe: int, chunk_size: int = 4096) -> ProbeRows:
        """From the probe's re-scored Tokens: their `grad_rows` where the host gave them, else rebuilt from the head."""
        dev = spec.weight.device
        hp, yp, cp, lse, chunk = _probe_rows(probe, spec, dev)
        if all(t.grad_rows is not None for t in probe):
            a = torch.cat([t.grad_rows for t in probe]).float().to(dev)
        else:
            V = spec.weight.shape[0]
            a = torch.empty(hp.shape[0], V, dtype=torch.float32, device=dev)
            for lo in range(0, V, chunk_size):
                hi = min(lo + chunk_size, V)
                a[:, lo:hi] = _grad_rows(*chunk(lo, hi), lse, yp, lo)
        return cls(a, hp.float() / max(int(n_probe), 1), cp)

    def matrices(self) -> torch.Tensor:
        """[2, V, d] fp32: this process's share of the probe's mean chosen and rejected scores (kept until the next
        re-score)."""
        if self._mats is None:
            c = self.chosen
            self._mats = torch.stack([self.a[c].T @ self.hw[c], self.a[~c].T @ self.hw[~c]])
        return self._mats

    def dots_acc(self, total: torch.Tensor, scale: float) -> torch.Tensor:
        """[4] fp64 (⟨s_w, s_pw⟩, ⟨s_l, s_pw⟩, ⟨s_w, s_pl⟩, ⟨s_l, s_pl⟩) with the step's scores scale·total ([2, V, d],
        the step accumulator), this process's share (processes' results add up)."""
        m = self.matrices().to(total.device)
        return torch.stack([dot64(total[0], m[0]), dot64(total[1], m[0]), dot64(total[0], m[1]),
                            dot64(total[1], m[1])]) * scale

    def dots_rows(self, a: torch.Tensor, hw: torch.Tensor, chosen: torch.Tensor) -> tuple:
        """The same four products with step scores given as score rows a [M, V], weighted head inputs hw [M, d] and
        each token's side (StepGram)."""
        kp = self.a.to(a.device) @ a.T  # [M_p, M]
        cross = kp.double() * (self.hw.double().to(a.device) @ hw.double().T)
        cw, cl = chosen.double(), (~chosen.bool()).double()
        pw, pl = self.chosen.double().to(a.device), (~self.chosen).double().to(a.device)
        return tuple(float(p @ cross @ s) for p, s in ((pw, cw), (pw, cl), (pl, cw), (pl, cl)))

    @property
    def nbytes(self) -> int:
        return self.a.numel() * 4


def _probe_rows(probe: list[Tokens], spec: HeadSpec, device):
    """A probe's response tokens as (hidden, labels, chosen, lse [M, 1], the head's chunk function); the log-normalisers
    recomputed from the head where a host's re-score did not give them."""
    hp = torch.cat([t.hidden for t in probe]).to(device)
    yp = torch.cat([t.labels for t in probe]).long().to(device)
    cp = torch.cat([t.chosen for t in probe]).bool().to(device)
    chunk = _head_chunk(hp, spec)
    if all(t.lse is not None for t in probe):
        lse = torch.cat([t.lse for t in probe]).float().to(device)
    else:
        V = spec.weight.shape[0]
        lse = partial_lse(Tokens(hp, yp, cp, None, 0), spec, (0, V))
    return hp, yp, cp, lse.reshape(-1, 1), chunk


def _gram_stats(k: torch.Tensor, hw: torch.Tensor, chosen: torch.Tensor) -> ScoreStats:
    """ScoreStats from a token Gram K [M, M] of the score rows, the weighted head inputs hw [M, d] and the chosen
    mask: ⟨s_a, s_b⟩ = Σ_{t∈a, u∈b} K_tu (hw_t·hw_u), summed in fp64."""
    g = k.double() * (hw.double() @ hw.double().T)
    cw, cl = chosen.double(), (~chosen.bool()).double()
    ww, ll, wl = cw @ g @ cw, cl @ g @ cl, cw @ g @ cl
    return ScoreStats(ww.clamp(min=0).sqrt().float(), ll.clamp(min=0).sqrt().float(), wl.float())


class HeadSpec(NamedTuple):
    """What rebuilds the logits that are softmaxed from the head's input: z = c·tanh(s·(h·Wᵀ + b)/c)/T (without
    soft-capping z = s·(h·Wᵀ + b)/T). `head_dtype`: the dtype of the model's own head product (None: fp32)."""

    weight: torch.Tensor  # [V, d] (gathered if sharded)
    bias: torch.Tensor | None = None  # [V]
    logit_scale: float = 1.0
    softcap: float | None = None
    temperature: float = 1.0
    head_dtype: torch.dtype | None = None


class Tokens(NamedTuple):
    """The response tokens of one micro-batch, as the step-level statistics need them (po_plugins.monitor)."""

    hidden: torch.Tensor  # [M, d] LM-head inputs at the response positions (detached, any dtype)
    labels: torch.Tensor  # [M] next-token ids
    chosen: torch.Tensor  # [M] bool: the token belongs to a chosen response
    lse: torch.Tensor | None  # [M] fp32 log-normalisers of the final logits (None: recomputed)
    pairs: int  # pairs of the micro-batch (the 1/n of each side)
    stats: ScoreStats | None = None  # this micro-batch's own statistics when the host computed them (RC)
    in_acc: bool = False  # its score matrices were added to the monitor's step accumulator with `stats`
    grad_rows: torch.Tensor | None = None  # [M, V] fp32 `score_rows`, where the host had the logits (a probe re-score)


def tokens_of(hidden, labels, rows, n_pairs: int, lse: torch.Tensor | None = None,
              stats: ScoreStats | None = None, in_acc: bool = False, grad_rows=None) -> Tokens:
    """Tokens from gathered response positions (rows < n_pairs are chosen).

    Args:
        hidden [M, d], labels [M], rows [M]: as `response_positions` returns them. n_pairs: pairs of the micro-batch.
        lse: [M] log-normalisers, if computed. stats: the micro-batch's own ScoreStats, if computed. in_acc: its
            score matrices were added to the monitor's step accumulator. grad_rows: its `score_rows`, if computed.

    Returns:
        Tokens, detached (lse in fp32).
    """
    return Tokens(hidden.detach(), labels.detach(), (rows < n_pairs).detach(),
                  None if lse is None else lse.detach().float(), int(n_pairs), stats, bool(in_acc), grad_rows)


def final_lse(logits: torch.Tensor, scale: float = 1.0, softcap: float | None = None,
              temperature: float = 1.0) -> torch.Tensor:
    """[M] log-normalisers of the logits that are softmaxed, from a head's raw output [M, V] at response positions.

    Args:
        logits: the head's raw output [M, V]. scale, softcap, temperature: the final-logit transform
            (po_plugins.head.head_transform).

    Returns:
        [M] log-sum-exp of the final logits (detached).
    """
    from .head import final_logits

    return torch.logsumexp(final_logits(logits.detach(), scale, softcap, temperature), dim=-1)


def _head_chunk(h: torch.Tensor, spec: HeadSpec):
    """chunk(a, b) -> (final logits of vocabulary rows [a, b) at every position as a fresh fp32 tensor, ∂z/∂u there
    or None for 1)."""
    from .head import _final_inplace

    weight, bias = spec.weight, spec.bias
    hh = h.to(spec.head_dtype) if spec.head_dtype is not None else h.float()
    scratch = []  # one fp32 buffer reused by every chunk of the pass (fresh [M, chunk] pages cost as much as the math)

    def chunk(a, b):
        if spec.head_dtype is not None:  # the model's own head product (e.g. bf16), then fp32 as the log-probs take it
            u = torch.nn.functional.linear(hh, weight[a:b], None if bias is None else bias[a:b])
        else:
            u = hh @ weight[a:b].float().T
            if bias is not None:
                u = u + bias[a:b].float()
        if not scratch or scratch[0].numel() < u.numel():
            scratch[:] = [torch.empty(u.numel(), dtype=torch.float32, device=u.device)]
        out = scratch[0][:u.numel()].view(u.shape)
        z, dz = _final_inplace(u, float(spec.logit_scale), spec.softcap, float(spec.temperature), slope=True, out=out)
        return z, (None if dz is None else torch.as_tensor(dz, device=z.device) if isinstance(dz, float) else dz)

    return chunk


@torch.no_grad()
def score_stats_head(
    hidden: torch.Tensor,  # [M, d]  LM-head inputs (the backbone's last hidden state) at the response positions
    weight: torch.Tensor,  # [V, d]  LM-head weight (gathered if sharded)
    labels: torch.Tensor,  # [M]     next-token ids
    rows: torch.Tensor,  # [M]     sequence index of each position
    is_chosen: torch.Tensor,  # [N]   bool per sequence
    bias: torch.Tensor | None = None,  # [V]
    logit_scale: float = 1.0,
    softcap: float | None = None,
    temperature: float = 1.0,
    chunk_size: int = 4096,
    method: str = "auto",
    lse: torch.Tensor | None = None,  # [M] log-normalisers already computed (e.g. by po_plugins.head): one pass less
    head_dtype: torch.dtype | None = None,  # compute the head product in this dtype, as the model's head does
    acc: torch.Tensor | None = None,  # [2, V, d] fp32: (1/n)Σ A_tᵀh_t of each side is added (BandMonitor.step_acc)
) -> ScoreStats:
    """‖s_w‖, ‖s_l‖, ⟨s_w, s_l⟩ of the head weight from the head's input and weight, for hosts whose fused head never
    materialises logits: the logits are rebuilt chunk by chunk over the vocabulary (two passes: log-normaliser, then
    scores), so memory stays O(M·chunk + M² or chunk·d) and no [M, V] tensor exists.

    The logit of token v is z = c·tanh(s·u/c)/T with u = h·W_vᵀ + b_v (without soft-capping z = s·u/T), so
    ∂(log-prob)/∂W_v = Σ_t ([y_t = v] − p_tv)·(∂z_tv/∂u_tv)·h_t: exact, including the scale, cap and temperature.

    Args: as annotated above.

    Returns:
        ScoreStats of 0-dim fp32 tensors.
    """
    spec = HeadSpec(weight, bias, logit_scale, softcap, temperature, head_dtype)
    _, hidden, labels, rows, lse = _chosen_first(is_chosen.bool().to(rows.device)[rows], hidden, labels, rows, lse)
    return _stats(hidden, labels, rows, is_chosen, weight.shape[0], _head_chunk(hidden, spec), chunk_size, method,
                  lse, head_dtype, acc)


@torch.no_grad()
def step_score_sums(tokens: Tokens, spec: HeadSpec, n_pairs: int, vocab: tuple[int, int] | None = None,
                    chunk_size: int = 4096, method: str = "auto", weights: torch.Tensor | None = None) -> torch.Tensor:
    """[‖s_w‖², ‖s_l‖², ⟨s_w, s_l⟩] restricted to vocabulary rows `vocab` = [a, b) (default: all), where
    s = ∇_W (1/n_pairs)·Σ z over every token of `tokens` (e.g. all micro-batches of an optimizer step, gathered
    from all ranks). The three entries are sums over vocabulary rows, so slices computed on different ranks add
    up to the full statistics. `tokens.lse` must be the full-vocabulary log-normalisers.

    Args:
        tokens: the response tokens (with lse). spec: the head. n_pairs: the pair count n of the 1/n scaling.
        vocab: the vocabulary slice [a, b). chunk_size, method: as in `score_stats_flat`. weights: [M] per-token
            weights replacing 1/n (each pair's weight in the optimizer step: 1/(micro-batches · its micro-batch's
            pairs)).

    Returns:
        A [3] fp32 tensor; ValueError when `tokens.lse` is None.
    """
    a0, b0 = vocab if vocab is not None else (0, spec.weight.shape[0])
    if tokens.lse is None:
        raise ValueError("step_score_sums needs the log-normalisers (Tokens.lse)")
    side_w, hidden, labels, lse, w = _chosen_first(tokens.chosen.bool(), tokens.hidden, tokens.labels, tokens.lse,
                                                   weights)
    n = 1.0 / max(int(n_pairs), 1)
    if w is None:
        return _sums(hidden, labels.long(), side_w, lse, _head_chunk(hidden, spec), a0, b0, chunk_size, method,
                     spec.head_dtype, (n, n))
    # the logits come from the head inputs, the scores from the weighted ones: s = Σ_t a_t (w_t h_t)ᵀ
    hw = hidden.float() * w.float().to(hidden.device)[:, None]
    return _sums(hw, labels.long(), side_w, lse, _head_chunk(hidden, spec), a0, b0, chunk_size, method,
                 spec.head_dtype, (1.0, 1.0))


@torch.no_grad()
def side_gram(hidden: torch.Tensor, labels: torch.Tensor, side: torch.Tensor, lse: torch.Tensor, spec: HeadSpec,
              scales, vocab: tuple[int, int] | None = None, chunk_size: int = 4096,
              weights: torch.Tensor | None = None) -> torch.Tensor:
    """[k, k] inner products ⟨s_i, s_j⟩ over vocabulary rows `vocab` = [a, b) (default: all) of the head-weight scores
    s_i = scales[i]·Σ_{t: side_t = i} ∇_W log p(y_t | h_t), for k = len(scales) groups of response tokens (e.g. the
    step's chosen and rejected tokens and a probe's): sums over vocabulary rows, so ranks' slices add up.

    Args:
        hidden [M, d], labels [M]: response tokens. side [M]: each token's group in [0, k). lse [M]: the final
            logits' full-vocabulary log-normalisers. spec: the head. scales: k numbers (1/pairs of each group).
        vocab: the slice [a, b). chunk_size: vocabulary rows per chunk. weights: [M] per-token factors applied
            on top of `scales` (None: 1).

    Returns:
        A [k, k] fp32 tensor (symmetric).
    """
    k = len(scales)
    a0, b0 = vocab if vocab is not None else (0, spec.weight.shape[0])
    chunk = _head_chunk(hidden, spec)
    hf, y = hidden.float(), labels.long().to(hidden.device)
    if weights is not None:
        hf = hf * weights.float().to(hf.device)[:, None]
    lse = lse.detach().float().reshape(-1, 1).to(hidden.device)
    side = side.long().to(hidden.device)
    groups = [(side == i).nonzero(as_tuple=True)[0] for i in range(k)]
    scale = torch.tensor([float(x) for x in scales], dtype=torch.float32, device=hidden.device)
    out = torch.zeros(k, k, dtype=torch.float32, device=hidden.device)
    for a in range(a0, b0, chunk_size):
        b = min(a + chunk_size, b0)
        g = _grad_rows(*chunk(a, b), lse, y, a)  # (onehot − softmax) ⊙ ∂z/∂u on rows [a, b)
        mats = torch.stack([g[i].T @ hf[i] for i in groups]).reshape(k, -1) * scale[:, None]  # [k, (b − a)·d]
        out += mats @ mats.T
    return out


def dot64(a: torch.Tensor, b: torch.Tensor, rows: int = 1024) -> torch.Tensor:
    """⟨a, b⟩ of two equal-shape [V, d] matrices: a BLAS dot per block of `rows` rows, the blocks summed in fp64 (one
    fp32 sum over ~10^7 entries is off by ~3e-3 of a squared norm, these blocks by ~1e-5; an fp64 copy costs ~40×)."""
    out = torch.zeros((), dtype=torch.float64, device=a.device)
    for i in range(0, a.shape[0], rows):
        out += torch.dot(a[i:i + rows].reshape(-1), b[i:i + rows].reshape(-1)).double()
    return out


def matrix_stats(mats: torch.Tensor, scale: float = 1.0) -> ScoreStats:
    """ScoreStats of the score matrices s_w = scale·mats[0], s_l = scale·mats[1] ([2, V, d], e.g. the step
    accumulator or a chunked head's `score_sink`), with `dot64`'s precision."""
    ww, ll, wl = (dot64(mats[i], mats[j]) for i, j in ((0, 0), (1, 1), (0, 1)))
    return ScoreStats(*(x.float() for x in (ww.sqrt() * scale, ll.sqrt() * scale, wl * scale ** 2)))


@torch.no_grad()
def partial_lse(tokens: Tokens, spec: HeadSpec, vocab: tuple[int, int], chunk_size: int = 4096) -> torch.Tensor:
    """[M] log-sum-exp of the final logits over vocabulary rows [a, b) (combine slices with a log-sum-exp).

    Args:
        tokens: the response tokens. spec: the head. vocab: the slice [a, b). chunk_size: rows per chunk.

    Returns:
        [M] fp32 partial log-normalisers.
    """
    chunk = _head_chunk(tokens.hidden, spec)
    a0, b0 = vocab
    out = torch.full((tokens.hidden.shape[0],), -math.inf, dtype=torch.float32, device=tokens.hidden.device)
    for a in range(a0, b0, chunk_size):
        out = torch.logaddexp(out, torch.logsumexp(chunk(a, min(a + chunk_size, b0))[0], dim=-1))
    return out


def _chosen_first(side_w: torch.Tensor, *xs):
    """The position-indexed tensors `xs` (None passes through) reordered stably so that chosen positions come first:
    the vocabulary pass then takes each side as a slice of a chunk instead of copying it."""
    if bool(side_w[:int(side_w.sum())].all()):
        return (side_w, *xs)
    order = torch.argsort((~side_w).to(torch.int8), stable=True)
    return tuple(None if x is None else x[order] for x in (side_w, *xs))


def _stats(hidden, labels, rows, is_chosen, V, chunk, chunk_size, method, lse=None, mm_dtype=None,
           acc=None) -> ScoreStats:
    """Per micro-batch: `chunk(a, b)` gives the final logits of vocabulary rows [a, b) at every position and the
    derivative of the final logit with respect to the head's raw output there (None: 1). `acc` [2, V, d]: the
    unscaled per-side score matrices Σ_t (onehot − softmax)_tᵀ h_t are added to it (the vocabulary pass)."""
    is_chosen = is_chosen.bool().to(rows.device)
    n_w = int(is_chosen.sum())
    n_l = int((~is_chosen).sum())
    side_w = is_chosen[rows]  # [M] True for chosen tokens
    h = hidden
    M = h.shape[0]
    if lse is not None:
        lse = lse.detach().float().reshape(M).to(h.device)
    else:
        lse = torch.full((M,), -math.inf, dtype=torch.float32, device=h.device)
        for a in range(0, V, chunk_size):
            lse = torch.logaddexp(lse, torch.logsumexp(chunk(a, min(a + chunk_size, V))[0], dim=-1))
    sw2, sl2, dot = _sums(h, labels.long(), side_w, lse, chunk, 0, V, chunk_size, "vocab" if acc is not None else
                          method, mm_dtype, (1.0 / max(n_w, 1), 1.0 / max(n_l, 1)), acc)
    return ScoreStats(sw2.clamp(min=0).sqrt(), sl2.clamp(min=0).sqrt(), dot)


def _sums(h, y, side_w, lse, chunk, a0, b0, chunk_size, method, mm_dtype=None, scales=(1.0, 1.0),
          acc=None) -> torch.Tensor:
    """The shared core: [‖s_w‖², ‖s_l‖², ⟨s_w, s_l⟩] over vocabulary rows [a0, b0) of s = scale·Aᵀh over each side's
    positions, A = onehot − softmax (times ∂z/∂u), `scales` = (1/n_w, 1/n_l) of the two sides.

    Two exact evaluations:
      "vocab": s chunk by chunk over the vocabulary, ‖s‖² summed: O(M·V·d) work, O(M·chunk + chunk·d) memory;
      "gram":  ⟨s_a, s_b⟩ = Σ_{i∈a, j∈b} (A Aᵀ)_ij (H Hᵀ)_ij with A Aᵀ accumulated over vocabulary chunks:
               O(M²·V) work, O(M·chunk + M²) memory.
    "auto" takes the cheaper: gram when M < 2d (measured crossover on CPU; one GEMM beats two per chunk).
    `mm_dtype` (None: fp32): the head's own dtype. For bf16/fp16 the vocabulary pass multiplies in it, at its speed:
    h is the head's input, exact in its dtype; the label part of A is added exactly in fp32 and only the softmax part
    is rounded, whose errors are relative to small probabilities and average out (tests/test_head.py: against fp64,
    norms to 3e-5 and the inner product to 5e-6 of the norms' product; rounding all of A in bf16: norms to ~1e-4).
    `acc` [2, ≥b0, d] ("vocab" only): each side's scaled Aᵀh rows (its `scales` entry) are added to acc[0] / acc[1]."""
    if method not in ("auto", "vocab", "gram"):
        raise ValueError(f"method must be auto, vocab or gram, got {method!r}")
    if acc is not None and method != "vocab":
        raise ValueError("a step accumulator needs the vocabulary pass (method='vocab')")
    M, d = h.shape
    lse = lse.detach().float().reshape(M, 1).to(h.device)
    side_w = side_w.to(h.device)
    y = y.to(h.device)

    def a_chunk(a, b):  # (onehot − softmax) ⊙ ∂z/∂u on vocabulary rows [a, b): [M, b − a], in place
        return _grad_rows(*chunk(a, b), lse, y, a)

    if method == "gram" or (method == "auto" and M < 2 * d):
        hs = h.float() * torch.where(side_w, scales[0], scales[1]).to(torch.float32)[:, None]
        k = torch.zeros(M, M, dtype=torch.float32, device=h.device)  # A Aᵀ
        for a in range(a0, b0, chunk_size):
            ac = a_chunk(a, min(a + chunk_size, b0))
            k += ac @ ac.T
        kh = k * (hs @ hs.T)
        w = side_w.float()
        lw = 1.0 - w
        return torch.stack([w @ kh @ w, lw @ kh @ lw, w @ kh @ lw])
    low = mm_dtype is not None and torch.finfo(mm_dtype).bits < 32
    mm = mm_dtype if low else torch.float32
    n_w = int(side_w.sum())
    ordered = bool(side_w[:n_w].all())  # chosen positions first (see _chosen_first): each side is a slice
    hs = h.to(mm)
    hf = h.float()
    hw, hl = (hs[:n_w], hs[n_w:]) if ordered else (hs[side_w], hs[~side_w])

    low_buf = []  # the probabilities in the head's dtype, one buffer for every chunk

    def in_mm(p):
        if not low:
            return p
        if not low_buf or low_buf[0].numel() < p.numel():
            low_buf[:] = [torch.empty(p.numel(), dtype=mm, device=p.device)]
        return low_buf[0][:p.numel()].view(p.shape).copy_(p)

    out = torch.zeros(3, dtype=torch.float32, device=h.device)
    for a in range(a0, b0, chunk_size):
        b = min(a + chunk_size, b0)
        z, dz = chunk(a, b)
        p = z.sub_(lse).exp_()  # softmax on these vocabulary rows
        hit = ((y >= a) & (y < b)).nonzero(as_tuple=True)[0]  # positions whose label lies in the chunk
        slope = None if dz is None else dz[hit, y[hit] - a] if dz.dim() == 2 else dz.expand(hit.shape[0])
        if dz is not None:
            p.mul_(dz)
        p = in_mm(p)
        pw, pl = (p[:n_w], p[n_w:]) if ordered else (p[side_w], p[~side_w])
        gw, gl = (pw.T @ hw).float().neg_(), (pl.T @ hl).float().neg_()  # unscaled [b − a, d]; labels added below
        hh = hf[hit] if slope is None else hf[hit] * slope[:, None]
        on_w = side_w[hit]
        gw.index_add_(0, y[hit][on_w] - a, hh[on_w])
        gl.index_add_(0, y[hit][~on_w] - a, hh[~on_w])
        if acc is not None:  # each side at its 1/n: the micro-batch's weight in the optimizer step
            acc[0, a:b].add_(gw, alpha=scales[0])
            acc[1, a:b].add_(gl, alpha=scales[1])
        out += torch.stack([gw.pow(2).sum() * scales[0] ** 2, gl.pow(2).sum() * scales[1] ** 2,
                            (gw * gl).sum() * (scales[0] * scales[1])])
    return out


def response_positions(hidden, logits, input_ids, att_masks, loss_masks):
    """Gather the LM-head inputs/outputs at response positions, from a padded or a packed forward.

    hidden/logits: [N, L, ·] (padded) or [1, nnz, ·] (packed: the attention-mask positions in row-major order,
    as flash-attn's unpad_input lays them out). loss_masks [N, L−1]: position t predicts token t+1 of a
    response. Returns (h [M, d], logits [M, V] or None when logits is None, labels [M], rows [M]).
    """
    N, L = att_masks.shape
    pos = loss_masks.nonzero(as_tuple=False)  # [M, 2]
    if hidden.shape[0] == N and hidden.shape[1] == L:
        h = hidden[pos[:, 0], pos[:, 1]]
        lg = logits[pos[:, 0], pos[:, 1]] if logits is not None else None
    else:
        flat = att_masks.reshape(-1).bool()
        where = torch.full((N * L,), -1, dtype=torch.long, device=flat.device)
        where[flat] = torch.arange(int(flat.sum()), device=flat.device)
        idx = where[pos[:, 0] * L + pos[:, 1]]
        if bool((idx < 0).any()):
            raise ValueError("packed layout: a response position lies outside the attention mask")
        h = hidden.reshape(-1, hidden.shape[-1])[idx]
        lg = logits.reshape(-1, logits.shape[-1])[idx] if logits is not None else None
    return h, lg, input_ids[:, 1:][pos[:, 0], pos[:, 1]], pos[:, 0]
