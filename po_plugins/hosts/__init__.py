"""One adapter module per host framework; each alone knows its host's internals and checks at start that the
installed version still has the seams it uses (`check_host()`). The maths core and the monitor never import them.
This package's own code is the host check every adapter shares."""

from __future__ import annotations

from ..errors import HostError  # noqa: F401  (re-exported)
from .base import HostSpec, Seam, check_host, installed_version  # noqa: F401  (the contract, re-exported)


def gathered(*params):
    """Read access to ZeRO-3 partitioned parameters (a no-op for anything else); collective under ZeRO-3."""
    import contextlib

    todo = [p for p in params if p is not None and hasattr(p, "ds_id")]
    if not todo:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(todo, modifier_rank=None)


def head_spec(base, head, temperature: float = 1.0):
    """A context manager yielding the `HeadSpec` the band's step statistics rebuild the logits with: `head`'s weight
    and bias (gathered under ZeRO-3), the scale and soft-cap of `base.config`, the host's sampling temperature."""
    import contextlib

    from ..head import head_transform
    from ..scores import HeadSpec

    @contextlib.contextmanager
    def spec():
        scale, cap = head_transform(base.config)
        bias = getattr(head, "bias", None)
        with gathered(head.weight, bias):
            yield HeadSpec(head.weight, bias, scale, cap, temperature, head.weight.dtype)

    return spec()


def micro_stats_needed(calibrating: bool, accumulation: int, world_size: int) -> bool:
    """Per-micro-batch band statistics: RC calibrates on them; a step of one micro-batch on one process reuses them
    as the step's (the monitor then skips its step-level pass)."""
    return calibrating or (accumulation == 1 and world_size == 1)


def step_acc_wanted(calibrating: bool, accumulation: int, world_size: int) -> bool:
    """RC's per-micro-batch vocabulary pass also fills the monitor's step accumulator (BandMonitor(step_acc=...))
    when a step spans several micro-batches or processes; a single micro-batch's own statistics are the step's."""
    return calibrating and not (accumulation == 1 and world_size == 1)
