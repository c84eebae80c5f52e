"""The prompt computed once (`--po.share_prompt`): each pair on one row under a block attention mask.

A stock DPO step runs every pair's prompt through the model twice, once before each response, and the same again
in the reference. The two passes see the same tokens in the same context, so they compute the same activations.
Here each pair becomes one row,

    [ shared | chosen's rest | rejected's rest ]

where `shared` is the longest common start of the two token sequences: the prompt, plus the response tokens the two
answers begin with (identical ids after an identical context). Position ids restart for each rest at len(shared),
so every token keeps the position it has in its own sequence, and the attention mask lets

    a shared token     see the shared tokens before it (causal),
    a chosen token     see all shared tokens and the chosen tokens before it,
    a rejected token   see all shared tokens and the rejected tokens before it (never a chosen one),

which is exactly the keys it sees in its own sequence. Each response token's log-prob is read from the hidden state
of the position that predicts it; the last shared position predicts the first token of both rests. Every log-prob
is therefore the stock one (same keys, same positions, same weights); only the order of the float sums in the
attention and matmuls changes. A shared response token's log-prob is computed once and counted in both responses,
as the stock step counts the two equal copies.

Layouts: `packed=False` gives one row per pair, right-padded to the longest pair ([B, 1, L, L] mask); `packed=True`
one row of all pairs back to back, the mask block-diagonal over pairs ([1, 1, T, T]). The mask is additive (0 where a
key is seen, the dtype's lowest value elsewhere), the form eager and sdpa attention both take as a ready 4D mask;
flash-attention kernels take no such mask. Host-neutral: tensors in, tensors out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import OptionError


def check_share(config, max_len: int | None = None, flag: str = "--po.share_prompt",
                attn_flag: str = "--ds.attn_implementation", len_flag: str = "--data.max_len",
                flash_hint: str = "") -> None:
    """One OptionError naming the fix where pair rows would not give the stock log-probs: a flash-attention model (its
    kernels take no 4D mask), sliding-window layers whose window a sequence of `max_len` tokens can outgrow (the block
    mask is full causal within a sequence), or layers of another kind (chunked, linear attention). The flags are the
    host's; `flash_hint`: the host's reason the model runs flash attention, if it forces it."""
    impl = str(getattr(config, "_attn_implementation", None) or "eager")
    if impl.startswith("flash"):
        raise OptionError(f"{flag} lays each pair on one row under a block attention mask, which {impl} cannot take: "
                          f"use {attn_flag} sdpa (or eager){f' ({flash_hint})' if flash_hint else ''}")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    kinds = set(getattr(text, "layer_types", None) or ())
    other = kinds - {"full_attention", "sliding_attention"}
    if other:
        raise OptionError(f"{flag}: {type(config).__name__} has {', '.join(sorted(other))} layers, which the block "
                          f"mask does not reproduce; run without {flag}")
    window = getattr(text, "sliding_window", None)
    sliding = "sliding_attention" in kinds or (not kinds and bool(getattr(text, "use_sliding_window", True)))
    if window and sliding and (max_len is None or int(max_len) > int(window)):
        raise OptionError(f"{flag}: {type(config).__name__}'s sliding-window layers (window {window}) are not "
                          f"reproduced by the block mask for sequences longer than the window: set {len_flag} "
                          f"{window} or less, or run without {flag}")


@dataclass
class PairLayout:
    input_ids: torch.Tensor  # [R, L] the pair rows (R = B padded, 1 packed)
    position_ids: torch.Tensor  # [R, L]
    segment: torch.Tensor  # [R, L] 0 shared, 1 chosen's rest, 2 rejected's rest, -1 padding
    pair: torch.Tensor  # [R, L] the pair each position belongs to (-1 padding)
    src: torch.Tensor  # [M] flat index (row·L + position) of the hidden state that predicts each response token
    labels: torch.Tensor  # [M] the response tokens
    rows: torch.Tensor  # [M] their sequence in the stock layout: chosen b -> b, rejected b -> B + b
    stock_tokens: int  # tokens the stock layout runs (attention-mask ones, both rows of every pair)
    tokens: int  # tokens of the pair rows (padding excluded)

    def mask(self, dtype: torch.dtype) -> torch.Tensor:
        """[R, 1, L, L] additive attention mask in `dtype` (see the module docstring)."""
        seg, pair = self.segment, self.pair
        L = seg.shape[1]
        causal = torch.ones(L, L, dtype=torch.bool, device=seg.device).tril()
        q_seg, k_seg = seg[:, :, None], seg[:, None, :]
        seen = causal & (pair[:, :, None] == pair[:, None, :]) & (k_seg >= 0) & ((k_seg == 0) | (k_seg == q_seg))
        seen |= torch.eye(L, dtype=torch.bool, device=seg.device)  # padding queries see themselves (no empty row)
        out = torch.zeros(seen.shape, dtype=dtype, device=seg.device)
        out.masked_fill_(~seen, torch.finfo(dtype).min)
        return out[:, None]


@torch.no_grad()
def pair_layout(input_ids: torch.Tensor,  # [2B, T] chosen rows 0..B-1, then rejected rows B..2B-1
                attention_mask: torch.Tensor,  # [2B, T] 1 on real tokens (contiguous within a row)
                loss_mask: torch.Tensor,  # [2B, T-1] position t predicts token t+1 of a response
                n_pairs: int, packed: bool = False, pad_id: int = 0) -> PairLayout:
    """The pair rows of a stock [2B, T] batch. The response tokens come out in the stock layout's order (row-major
    over `loss_mask`: `scores.response_positions` gives the same labels and rows), so per-token values line up with
    anything computed on the stock layout."""
    if input_ids.shape[0] != 2 * n_pairs:
        raise ValueError(f"expected 2 × {n_pairs} rows (chosen, then rejected), got {input_ids.shape[0]}")
    if loss_mask.shape != (input_ids.shape[0], input_ids.shape[1] - 1):
        raise ValueError(f"loss_mask must be [{input_ids.shape[0]}, {input_ids.shape[1] - 1}], "
                         f"got {tuple(loss_mask.shape)}")
    dev = input_ids.device
    real = attention_mask.bool()
    pieces, place = [], {}  # place[row] = (first real token's column, this sequence's index -> pair-row index)
    for b in range(n_pairs):
        cols = [real[r].nonzero(as_tuple=True)[0] for r in (b, n_pairs + b)]
        for r, c in zip((b, n_pairs + b), cols):
            if c.numel() and int(c[-1] - c[0]) + 1 != c.numel():
                raise ValueError(f"row {r}: the attention mask has a gap; pair rows need each sequence contiguous")
        w, lo = input_ids[b, cols[0]], input_ids[n_pairs + b, cols[1]]
        m = min(w.numel(), lo.numel())
        diff = (w[:m] != lo[:m]).nonzero(as_tuple=True)[0]
        s = int(diff[0]) if diff.numel() else m
        nw, nl = w.numel() - s, lo.numel() - s
        pieces.append((torch.cat([w, lo[s:]]), s, nw, nl))
        ar_w = torch.arange(w.numel(), device=dev)
        ar_l = torch.arange(lo.numel(), device=dev)
        place[b] = (cols[0][:1], ar_w)  # chosen: its own indices (shared first, then its rest)
        place[n_pairs + b] = (cols[1][:1], torch.where(ar_l < s, ar_l, ar_l + nw))  # rejected: after chosen's rest
    lens = [p[0].numel() for p in pieces]
    if packed:
        starts = [sum(lens[:b]) for b in range(n_pairs)]
        R, L = 1, max(1, sum(lens))
    else:
        starts = [0] * n_pairs
        R, L = n_pairs, max([1, *lens])
    ids = torch.full((R, L), pad_id, dtype=input_ids.dtype, device=dev)
    pos = torch.zeros((R, L), dtype=torch.long, device=dev)
    seg = torch.full((R, L), -1, dtype=torch.long, device=dev)
    pair = torch.full((R, L), -1, dtype=torch.long, device=dev)
    base = []  # flat offset of each pair's row start
    for b, (toks, s, nw, nl) in enumerate(pieces):
        r = 0 if packed else b
        a = starts[b]
        n = toks.numel()
        ids[r, a:a + n] = toks
        pos[r, a:a + n] = torch.cat([torch.arange(s + nw, device=dev), s + torch.arange(nl, device=dev)])
        seg[r, a:a + n] = torch.cat([torch.zeros(s, dtype=torch.long, device=dev),
                                     torch.ones(nw, dtype=torch.long, device=dev),
                                     torch.full((nl,), 2, dtype=torch.long, device=dev)])
        pair[r, a:a + n] = b
        base.append(r * L + a)
    hit = loss_mask.bool().nonzero(as_tuple=False)  # [M, 2] (stock row, t): t predicts token t + 1
    src = torch.empty(hit.shape[0], dtype=torch.long, device=dev)
    for r in range(2 * n_pairs):
        sel = (hit[:, 0] == r).nonzero(as_tuple=True)[0]
        if sel.numel() == 0:
            continue
        first, idx = place[r]
        k = hit[sel, 1] - first  # index of the predicting token within its sequence
        if bool((k < 0).any()) or bool((k + 1 >= idx.numel()).any()):
            raise ValueError(f"row {r}: a response position lies outside the attention mask")
        src[sel] = base[r % n_pairs] + idx[k]
    labels = input_ids[:, 1:][hit[:, 0], hit[:, 1]]
    return PairLayout(ids, pos, seg, pair, src, labels, hit[:, 0], int(real.sum()), sum(lens))
