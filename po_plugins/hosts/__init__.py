"""One adapter module per host framework; each alone knows its host's internals, declares them in its `SPEC`
(`hosts.base.HostSpec`: version range and seams) and checks at start that the installed version still has them.
The maths core, the monitor and the Plugin never import them. `hosts.base` is the contract; this package's own
code is what every adapter shares to reach the LM head."""

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
