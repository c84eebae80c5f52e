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


def lora_params(head) -> list:
    """The parameters of a PEFT LoRA layer on the LM head that its effective weight is built from (gather them with
    the head's weight under ZeRO-3); [] for a plain head or merged adapters."""
    if getattr(head, "base_layer", None) is None or not hasattr(head, "lora_A") or getattr(head, "merged", False):
        return []
    return [p for a in head.active_adapters if a in head.lora_A for p in (head.lora_A[a].weight,
                                                                           head.lora_B[a].weight)]


def effective_head_weight(head):
    """The [V, d] weight the LM head applies: a plain head's `weight`; under a PEFT LoRA layer (lm_head among the
    target modules) its base weight plus each active, unmerged adapter's scaling·B·A, so that the head statistics
    are those of the logits the log-probs come from (exact with lora_dropout 0; with dropout the training logits
    are a random draw around them). DoRA on the head is refused."""
    if not lora_params(head):
        return head.weight
    w = head.base_layer.weight
    for a in head.active_adapters:
        if a not in head.lora_A:
            continue
        if getattr(head, "use_dora", {}).get(a):
            raise HostError("DoRA on the LM head: the band's head statistics do not model it; leave lm_head out "
                            "of the DoRA target modules or run without the monitor and rc_ objectives")
        delta = head.lora_B[a].weight.float() @ head.lora_A[a].weight.float()
        w = (w.float() + head.scaling[a] * delta).to(w.dtype)
    return w


def band_params(base, head) -> dict:
    """What the band's scores are the gradient of, for the trace's header: the LM head's weight as the head uses it;
    `tied_embeddings` when that parameter is also the input embedding (its input-side gradient share is not in
    the closed form: docs/monitor.md, "Scope"), `lora_head` when a LoRA adapter on the head is folded in."""
    emb = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    w = getattr(head, "base_layer", head).weight
    return {"band_params": "lm_head.weight (its use by the head)",
            "tied_embeddings": bool(emb is not None and getattr(emb, "weight", None) is w),
            "lora_head": bool(lora_params(head))}


def head_spec(base, head, temperature: float = 1.0):
    """A context manager yielding the `HeadSpec` the band's step statistics rebuild the logits with: `head`'s
    effective weight (`effective_head_weight`) and bias (gathered under ZeRO-3), the scale and soft-cap of
    `base.config`, the host's sampling temperature."""
    import contextlib

    from ..head import head_transform
    from ..scores import HeadSpec

    @contextlib.contextmanager
    def spec():
        scale, cap = head_transform(base.config)
        bias = getattr(head, "bias", None)
        with gathered(head.weight, bias, *lora_params(head)):
            yield HeadSpec(effective_head_weight(head), bias, scale, cap, temperature, head.weight.dtype)

    return spec()
