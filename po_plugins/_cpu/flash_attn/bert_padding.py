"""Padding helpers with the semantics of ``flash_attn.bert_padding`` (flash-attn 2.8), in plain torch.

Autograd comes from torch's own indexing ops: the backward of ``x[idx]`` scatters (accumulating)
into the source rows, and the backward of ``index_put`` gathers the written rows, which is what
flash-attn's hand-written ``IndexFirstAxis`` / ``IndexPutFirstAxis`` functions do.
"""

import torch
import torch.nn.functional as F
from einops import rearrange

__all__ = ["index_first_axis", "index_put_first_axis", "pad_input", "rearrange", "unpad_input"]


def index_first_axis(input: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Select rows ``indices`` along dim 0 of a tensor with at least 2 dims: ``(N, ...) -> (len(indices), ...)``."""
    assert input.ndim >= 2, "index_first_axis expects a tensor with at least 2 dims"
    return input[indices]


def index_put_first_axis(values: torch.Tensor, indices: torch.Tensor, first_axis_dim: int) -> torch.Tensor:
    """Scatter ``values`` (``(len(indices), ...)``) into zeros ``(first_axis_dim, ...)`` at rows ``indices``."""
    assert indices.ndim == 1 and values.ndim >= 2
    out = torch.zeros(first_axis_dim, *values.shape[1:], device=values.device, dtype=values.dtype)
    return out.index_put((indices,), values)


def unpad_input(hidden_states: torch.Tensor, attention_mask: torch.Tensor, unused_mask: torch.Tensor = None):
    """Drop padded positions.

    Args:
        hidden_states: ``(batch, seqlen, ...)``.
        attention_mask: ``(batch, seqlen)``, 1/True for valid tokens.
        unused_mask: optional ``(batch, seqlen)``, 1 for allocated-but-unused tokens (kept in the output).

    Returns:
        ``(hidden_states[total_nnz, ...], indices[total_nnz], cu_seqlens[batch+1] int32,
        max_seqlen_in_batch: int, seqused[batch] int32)`` where ``indices`` index the flattened
        ``batch * seqlen`` positions and ``seqused`` counts only ``attention_mask`` tokens.
    """
    all_masks = (attention_mask + unused_mask) if unused_mask is not None else attention_mask
    seqlens_in_batch = all_masks.sum(dim=-1, dtype=torch.int32)
    used_seqlens_in_batch = attention_mask.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(all_masks.flatten(), as_tuple=False).flatten()
    max_seqlen_in_batch = int(seqlens_in_batch.max().item())
    cu_seqlens = F.pad(torch.cumsum(seqlens_in_batch, dim=0, dtype=torch.int32), (1, 0))
    flat = rearrange(hidden_states, "b s ... -> (b s) ...")
    return index_first_axis(flat, indices), indices, cu_seqlens, max_seqlen_in_batch, used_seqlens_in_batch


def pad_input(hidden_states: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """Inverse of :func:`unpad_input`: ``(total_nnz, ...) -> (batch, seqlen, ...)`` with zeros at padded positions."""
    output = index_put_first_axis(hidden_states, indices, batch * seqlen)
    return rearrange(output, "(b s) ... -> b s ...", b=batch)
