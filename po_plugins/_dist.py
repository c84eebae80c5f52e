"""One all-reduce helper for the plugin's small statistics vectors (no-op without torch.distributed)."""

from __future__ import annotations

import torch


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Sum or max of `t` over ranks, returned on t's device; NCCL gets a CUDA copy, gloo a CPU one."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return t
    comm = t.detach().to("cuda" if dist.get_backend() == "nccl" else "cpu").clone()
    dist.all_reduce(comm, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return comm.to(t.device)


def world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
