"""A chunked LM head: log-probs of the labelled tokens without ever holding the [tokens, vocabulary] logits.

The head module is called on chunks of token positions; each chunk's logits live only inside that chunk's
computation and are recomputed in the backward pass (activation checkpointing of the chunk), so the peak is one
chunk's [c, V] fp32 logits instead of the whole [N, T, V] tensor and its fp32 copy and gradient. Calling the head
*module* (never its weight directly) keeps every framework hook working: DeepSpeed ZeRO-3 gathers a sharded weight
in the module's pre-forward hook, in the forward and again in the recomputation, and its gradient reaches the
partitioned parameter through autograd as usual; LoRA-wrapped heads, tied embeddings and biases are the module's
business. The final-logit transform of the model config is applied after the head: a scale, soft-capping, then
the sampling temperature, as the model and the host apply them (`head_transform`).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def head_transform(config) -> tuple[float, float | None]:
    """(logit scale, soft-cap) a causal-LM config applies to its head's output, by the attribute names models use:
    `final_logit_softcapping`; a scale `logit_scale` / `output_multiplier` / `lm_head_multiplier`, or a divisor
    `logits_scaling` (a multiplier for HyperCLOVA X)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    cap = getattr(text, "final_logit_softcapping", None)
    scale = getattr(text, "logit_scale", None)
    if scale is None:
        scale = getattr(text, "output_multiplier", None)
    if scale is None:
        scale = getattr(text, "lm_head_multiplier", None)
    if scale is None and getattr(text, "logits_scaling", None) is not None:
        scale = text.logits_scaling if getattr(text, "model_type", "") == "hyperclovax" else 1 / text.logits_scaling
    return (1.0 if scale is None else float(scale)), (float(cap) if cap else None)


def final_logits(raw: torch.Tensor, scale: float = 1.0, softcap: float | None = None,
                 temperature: float = 1.0) -> torch.Tensor:
    """The head's output turned into the logits that are softmaxed, in fp32."""
    z = raw.float()
    if scale != 1.0:
        z = z * scale
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    if temperature != 1.0:
        z = z / temperature
    return z


def _chunk_logprobs(head, h, y, scale, softcap, temperature):
    z = final_logits(head(h), scale, softcap, temperature)
    lse = torch.logsumexp(z, dim=-1)
    return z.gather(-1, y[:, None]).squeeze(-1) - lse, lse.detach()


def default_chunk(vocab_size: int) -> int:
    """Token positions per chunk: about 2^22 logits (16 MiB in fp32; a chunk's forward and backward hold a few such
    buffers) at a time, at least 16 positions: 128 positions at V = 32k, 32 at V = 128k."""
    return max(16, (1 << 22) // max(1, int(vocab_size)))


def chunked_logprobs(
    head: torch.nn.Module,
    hidden: torch.Tensor,  # [M, d]  the head's input at the scored positions
    labels: torch.Tensor,  # [M]     the next-token ids at those positions
    chunk: int | None = None,
    scale: float = 1.0,
    softcap: float | None = None,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    return_lse: bool = False,
):
    """log p(y_t | ·) for every position, fp32 [M], differentiable with respect to `hidden` and the head's
    parameters. `chunk` positions at a time (default `default_chunk(V)`); with gradients enabled each chunk is
    checkpointed, so its logits are freed after the forward and recomputed in the backward. `return_lse=True` also
    returns the detached log-normalisers [M] (the head statistics reuse them instead of a pass of their own)."""
    M = hidden.shape[0]
    if M == 0:  # keep the graph connected so a backward through an empty selection is a zero, not an error
        zero = hidden.sum(-1).float() * 0.0
        return (zero, zero.detach()) if return_lse else zero
    if chunk is None:
        weight = getattr(head, "weight", None)
        V = vocab_size or (getattr(weight, "ds_shape", None) or getattr(weight, "shape", (1 << 15,)))[0]
        chunk = default_chunk(V)
    labels = labels.long()
    track = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in head.parameters()))
    out, lses = [], []
    for a in range(0, M, chunk):
        h, y = hidden[a:a + chunk], labels[a:a + chunk]
        if track:
            lp, lse = checkpoint(_chunk_logprobs, head, h, y, scale, softcap, temperature, use_reentrant=False)
        else:
            lp, lse = _chunk_logprobs(head, h, y, scale, softcap, temperature)
        out.append(lp)
        lses.append(lse)
    return (torch.cat(out), torch.cat(lses)) if return_lse else torch.cat(out)
