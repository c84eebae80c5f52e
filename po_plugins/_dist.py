"""Collectives for the plugin's statistics (no-ops without torch.distributed)."""

from __future__ import annotations

import torch


def all_reduce(t: torch.Tensor, op: str = "sum", inplace: bool = False) -> torch.Tensor:
    """Sum or max of `t` over ranks, returned on t's device; NCCL gets a CUDA copy, gloo a CPU one. `inplace`: when
    `t` already lives where the backend reduces and is contiguous, reduce it in place and return it (no copy: the
    monitor's step accumulator is up to 1 GiB)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return t
    dev = torch.device("cuda" if dist.get_backend() == "nccl" else "cpu")
    if inplace and t.device.type == dev.type and t.is_contiguous():
        dist.all_reduce(t.detach(), op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return t
    comm = t.detach().to(dev).clone()
    dist.all_reduce(comm, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return comm.to(t.device)


def world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate along dim 0 the tensors of every rank (rows may differ per rank), in rank order, on t's device."""
    dist = torch.distributed
    if world_size() == 1:
        return t
    dev = "cuda" if dist.get_backend() == "nccl" else "cpu"
    n = torch.tensor([t.shape[0]], dtype=torch.long, device=dev)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    sizes = [int(x) for x in sizes]
    top = max(sizes)
    pad = torch.zeros((top, *t.shape[1:]), dtype=t.dtype, device=dev)
    pad[: t.shape[0]] = t.detach().to(dev)
    parts = [torch.empty_like(pad) for _ in sizes]
    dist.all_gather(parts, pad)
    return torch.cat([p[:k] for p, k in zip(parts, sizes)]).to(t.device)


def finish_process() -> None:
    """End a CLI process that trained under torch.distributed: the ranks meet, the process group (if still open) is
    destroyed, and every rank but 0 then runs Python's exit handlers and leaves without the interpreter's teardown of
    C++ objects. Gloo ranks were seen to abort in that teardown ("terminate called without an active exception",
    rank 1, intermittently, after training and saving had finished, with TRL and LLaMA-Factory). Before leaving, such a
    rank waits for its non-daemon threads, as the interpreter's exit would. Rank 0, which writes the logs, the trace
    and the model, exits normally; a single process is left alone."""
    import atexit
    import os
    import sys

    dist = torch.distributed
    rank_, world = int(os.environ.get("RANK", "0") or 0), int(os.environ.get("WORLD_SIZE", "1") or 1)
    if dist.is_available() and dist.is_initialized():
        rank_, world = dist.get_rank(), dist.get_world_size()
        if world > 1:
            dist.barrier()
        dist.destroy_process_group()
    if world > 1 and rank_ != 0:
        import threading

        for t in threading.enumerate():  # what the interpreter's own exit does first: wait for non-daemon threads
            if t is not threading.current_thread() and not t.daemon:  # (an async checkpoint writer, a callback's)
                t.join()
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
