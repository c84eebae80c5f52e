"""``flash_attn.utils.distributed.all_gather`` in plain ``torch.distributed`` (works with gloo).

Forward: concatenate every rank's tensor along dim 0 (rank order). Backward: reduce-scatter the
gradient (sum over ranks, keep this rank's slice), matching flash-attn's ``AllGatherFunc``.
Uses list-based ``all_gather`` / ``all_reduce`` instead of ``all_gather_into_tensor`` /
``reduce_scatter_tensor`` because gloo lacks the latter.
"""

import torch
import torch.distributed as dist

__all__ = ["all_gather", "all_gather_raw"]


def all_gather_raw(input_: torch.Tensor, process_group=None) -> torch.Tensor:
    """Concatenate ``input_`` from all ranks of ``process_group`` along dim 0 (no autograd)."""
    world_size = dist.get_world_size(process_group)
    if world_size == 1:
        return input_.contiguous().clone()
    parts = [torch.empty_like(input_, memory_format=torch.contiguous_format) for _ in range(world_size)]
    dist.all_gather(parts, input_.contiguous(), group=process_group)
    return torch.cat(parts, dim=0)


def _reduce_scatter_raw(input_: torch.Tensor, process_group=None) -> torch.Tensor:
    """Sum ``input_`` over ranks and return this rank's equal dim-0 slice (no autograd)."""
    world_size = dist.get_world_size(process_group)
    if world_size == 1:
        return input_.contiguous().clone()
    assert input_.shape[0] % world_size == 0
    total = input_.contiguous().clone()
    dist.all_reduce(total, group=process_group)
    rank = dist.get_rank(process_group)
    return total.chunk(world_size, dim=0)[rank].contiguous()


class AllGatherFunc(torch.autograd.Function):
    """Gather along dim 0 in forward, reduce-scatter the gradient in backward."""

    @staticmethod
    def forward(ctx, input_: torch.Tensor, process_group=None) -> torch.Tensor:
        ctx.process_group = process_group
        return all_gather_raw(input_, process_group)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return _reduce_scatter_raw(grad_output, ctx.process_group), None


all_gather = AllGatherFunc.apply
