"""A one-layer softmax toy for the disentanglement band (docs/results_toy.md, "Setup"; the band: docs/monitor.md).

Fixed context features h_k ∈ R^d, a trainable unembedding W ∈ R^{V×d}, responses as (context, token) sequences;
z = Σ_t log softmax(W h_{k_t})[y_t]. The default pair reproduces likelihood displacement: the rejected response
repeats the chosen one's tokens in nearly collinear contexts, so ρ ≈ 1 and ‖s_l‖ > ‖s_w‖/ρ, and plain DPO lowers
z_w. Everything is exact: the score statistics come from po_plugins.scores on the toy's own logits.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .band import band_stats
from .losses import build
from .objective import PairBatch, incentives
from .scores import head_score_stats


@dataclasses.dataclass
class Toy:
    contexts: torch.Tensor  # [K, d]
    chosen: list[tuple[int, int]]  # (context, token)
    rejected: list[tuple[int, int]]
    vocab: int


def default_toy(d: int = 16, vocab: int = 32, seed: int = 0, spread: float = 0.3) -> Toy:
    """The default pair: a chosen response of two tokens, a rejected one repeating them in nearly collinear contexts.

    Args:
        d: context dimension. vocab: vocabulary size. seed: generator seed. spread: context spread around a shared
            direction (small: ρ near 1).

    Returns:
        The Toy (six contexts of norm 2, fp64).
    """
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(d, generator=g, dtype=torch.float64)
    ctx = u + spread * torch.randn(6, d, generator=g, dtype=torch.float64)
    ctx = 2.0 * ctx / ctx.norm(dim=1, keepdim=True)
    chosen = [(0, 3), (1, 5)]
    rejected = [(0, 3), (1, 5), (2, 3), (3, 5), (4, 3), (5, 7)]
    return Toy(ctx, chosen, rejected, vocab)


def _side(toy: Toy, seq, W):
    k = torch.tensor([c for c, _ in seq])
    y = torch.tensor([t for _, t in seq])
    h = toy.contexts[k]
    logits = h @ W.T
    return h, logits, y


def logps(toy: Toy, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs (z_w, z_l) of the toy's chosen and rejected responses under the unembedding W [V, d]."""
    out = []
    for seq in (toy.chosen, toy.rejected):
        _, logits, y = _side(toy, seq, W)
        out.append(torch.log_softmax(logits, -1).gather(-1, y[:, None]).sum())
    return out[0], out[1]


def score_stats(toy: Toy, W: torch.Tensor):
    """ScoreStats of the pair via the chunked closed form (rows padded to a common length).

    Args:
        toy: the toy. W: the unembedding [V, d] (detached here).

    Returns:
        ScoreStats (‖s_w‖, ‖s_l‖, ⟨s_w, s_l⟩) of po_plugins.scores.head_score_stats.
    """
    sides = [_side(toy, s, W.detach()) for s in (toy.chosen, toy.rejected)]
    T = max(len(toy.chosen), len(toy.rejected))
    d = toy.contexts.shape[1]
    hidden = torch.zeros(2, T, d, dtype=W.dtype)
    logits = torch.zeros(2, T, toy.vocab, dtype=W.dtype)
    labels = torch.zeros(2, T, dtype=torch.long)
    mask = torch.zeros(2, T, dtype=torch.bool)
    for i, (h, lg, y) in enumerate(sides):
        n = len(y)
        hidden[i, :n], logits[i, :n], labels[i, :n], mask[i, :n] = h, lg, y, True
    return head_score_stats(hidden, logits, labels, mask, torch.tensor([True, False]), chunk_size=7)


def train(loss_name: str, steps: int = 200, lr: float = 0.05, seed: int = 0, toy: Toy | None = None,
          **hparams) -> list[dict]:
    """Plain gradient descent on the toy with a po_plugins loss; one record per step (before/after the step).

    Args:
        loss_name: any name of po_plugins.losses.names(). steps, lr: gradient-descent steps and learning rate.
        seed: seeds the default toy and W's initialisation. toy: another toy (default: `default_toy(seed=seed)`).
        **hparams: the loss's hyperparameters.

    Returns:
        One dict per step: loss, z_w, z_l, their changes over the step, the effective incentives d_w, d_l (after
        RC's α), α and the band of `po_plugins.band.band_stats` as plain floats.
    """
    toy = toy or default_toy(seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    W = (0.5 * torch.randn(toy.vocab, toy.contexts.shape[1], generator=g, dtype=torch.float64)).requires_grad_(True)
    with torch.no_grad():
        ref_w, ref_l = logps(toy, W)
    loss_fn = build(loss_name, **hparams)
    n_w, n_l = torch.tensor([len(toy.chosen)]), torch.tensor([len(toy.rejected)])
    records = []
    for step in range(1, steps + 1):
        zw, zl = logps(toy, W)
        batch = PairBatch(zw[None], zl[None], ref_w[None], ref_l[None], n_w, n_l,
                          score_stats=score_stats(toy, W))
        loss = loss_fn(batch).mean()
        W.grad = None
        loss.backward()
        dw, dl = incentives(loss_fn, batch)  # effective incentives (after RC, if any)
        st = batch.score_stats
        band = _floats(band_stats(dw, dl, *st))  # its pred_sign_w / pred_sign_l are the gradient-flow signs
        with torch.no_grad():
            W -= lr * W.grad
            zw2, zl2 = logps(toy, W)
        records.append({
            "step": step, "loss": float(loss.detach()), "z_w": float(zw.detach()), "z_l": float(zl.detach()),
            "delta_z_w": float(zw2 - zw.detach()), "delta_z_l": float(zl2 - zl.detach()),
            "d_w": float(dw), "d_l": float(dl), "alpha": float(loss_fn.diagnostics(batch).alpha),
            **band,
        })
    return records


def _floats(band: dict) -> dict:
    """The toy's records keep plain floats: an unbounded band (ρ ≤ 0) as ∓inf edges and +inf slack, an undefined
    one (a mean incentive ≤ 0) as NaN."""
    out = dict(band)
    unbounded = band["log_r"] is not None and band["lower"] is None
    for k, v in (("lower", -math.inf), ("upper", math.inf), ("slack", math.inf)):
        if out[k] is None:
            out[k] = v if unbounded else math.nan
    if out["log_r"] is None:
        out["log_r"] = math.nan
    return out
