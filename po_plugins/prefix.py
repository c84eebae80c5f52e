"""The response text a pair's two responses share at their start (docs/losses.md, "Shared prefix").

When the chosen and the rejected response begin with the same tokens after the same prompt, those tokens have the
same context in both rows, hence the same log-probs and the same gradients. Writing z_w = p + t_w, z_l = p + t_l
(p the shared tokens' summed log-prob), a pairwise objective's gradient is

    −d_w ∇z_w + d_l ∇z_l  =  (d_l − d_w) ∇p  −  d_w ∇t_w  +  d_l ∇t_l

so whenever the incentive ratio r = d_w/d_l is below 1 (SimPO on longer chosen responses, RC at the band's centre)
a step pushes the shared text down in both responses. `--po.shared_prefix detach` stops the gradient of the shared
tokens' log-probs (their values, hence the loss, are unchanged): the preference is learned from the tokens where the
responses differ, and the pair pushes its shared text neither way. For DPO (r = 1) the (d_l − d_w) ∇p term is zero,
so its gradient is the same with or without.

Tokenisation decides what is shared: the token ids of the two rows (padding removed) are compared from the start;
a response token is shared while every token up to it, prompt included, is equal in both rows and is a response
token in both. Padded (left or right) and per-row packed layouts give the same answer.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def shared_prefix_mask(input_ids: torch.Tensor,  # [2B, L] chosen rows 0..B-1, rejected rows B..2B-1
                       attention_mask: torch.Tensor,  # [2B, L] 1 on real tokens
                       response_mask: torch.Tensor,  # [2B, L] 1 on response tokens (the tokens whose log-probs count)
                       n_pairs: int) -> torch.Tensor:
    """[2B, L] bool: the response tokens row i (chosen) and row n_pairs + i (rejected) share at their start, with
    identical contexts. Positions index tokens (not the shifted label positions): shift by one for labels.

    Args: as annotated; `n_pairs` = B.

    Returns:
        A bool tensor like `input_ids`, True on shared response tokens, in both rows of a pair.
    """
    if input_ids.shape != attention_mask.shape or input_ids.shape != response_mask.shape:
        raise ValueError(f"input_ids, attention_mask and response_mask must have one shape, got "
                         f"{tuple(input_ids.shape)}, {tuple(attention_mask.shape)}, {tuple(response_mask.shape)}")
    if input_ids.shape[0] != 2 * n_pairs:
        raise ValueError(f"expected 2 × {n_pairs} rows (chosen, then rejected), got {input_ids.shape[0]}")
    out = torch.zeros(input_ids.shape, dtype=torch.bool, device=input_ids.device)
    real = attention_mask.bool()
    resp = response_mask.bool()
    for i in range(n_pairs):
        w, lo = i, n_pairs + i
        pos_w, pos_l = real[w].nonzero(as_tuple=True)[0], real[lo].nonzero(as_tuple=True)[0]
        m = min(pos_w.numel(), pos_l.numel())
        same = (input_ids[w, pos_w[:m]] == input_ids[lo, pos_l[:m]]) & resp[w, pos_w[:m]] & resp[lo, pos_l[:m]]
        same_ctx = (input_ids[w, pos_w[:m]] == input_ids[lo, pos_l[:m]]).long().cumprod(0).bool()
        keep = same & same_ctx
        out[w, pos_w[:m]] = keep
        out[lo, pos_l[:m]] = keep
    return out


def detach_shared(per_token: torch.Tensor, shared: torch.Tensor | None) -> torch.Tensor:
    """`per_token` log-probs with a stopped gradient where `shared` is True: same values, bit for bit (the sums that
    follow add the same numbers in the same order); None passes `per_token` through."""
    if shared is None:
        return per_token
    return torch.where(shared.to(per_token.device), per_token.detach(), per_token)


class _OneSided(torch.autograd.Function):
    """Identity on the shared sums [2B] (chosen rows, then rejected rows); in the backward, a pair's two gradients
    are zeroed when their sum is positive, i.e. when a descent step would lower the pair's shared text."""

    @staticmethod
    def forward(ctx, p):
        return p.clone()

    @staticmethod
    def backward(ctx, g):
        n = g.shape[0] // 2
        down = (g[:n] + g[n:]) > 0  # ∂L/∂p of the pair's shared text: positive, so descent lowers it
        return g * (~down).repeat(2).to(g.dtype)


def guard_shared(shared_sums: torch.Tensor) -> torch.Tensor:
    """--po.shared_prefix guard: the term to add to sums whose shared tokens were detached (`detach_shared`). Its value
    is exactly 0; its gradient gives each pair's shared tokens back their gradient unless the pair's net push on its
    shared text, −d_w + d_l (RC's α, weights and NLL terms included, as the backward sees them), would lower it.

    Args:
        shared_sums: [2B] summed log-probs of each row's shared tokens (chosen rows, then rejected rows), with grad.

    Returns:
        [2B], zeros in value."""
    return _OneSided.apply(shared_sums) - shared_sums.detach()


def shared_counts(shared: torch.Tensor, n_pairs: int) -> torch.Tensor:
    """[B] shared tokens per pair (from a mask of `shared_prefix_mask`'s form, either indexing)."""
    return shared[:n_pairs].sum(-1)
