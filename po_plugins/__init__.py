"""po_plugins: preference-optimization research for OpenRLHF.

The maths core (losses, incentives, band, reward calibration, MADPO weights, head score statistics) needs torch
only; the OpenRLHF adapter lives in po_plugins.hosts.openrlhf and is imported only by the CLIs.
"""

from __future__ import annotations

import dataclasses

import torch

__version__ = "0.1.0"


def incentives(loss, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample incentives d_w = −∂ℓ/∂z_w and d_l = +∂ℓ/∂z_l (arXiv 2604.18239 §3), exact by autograd.

    Evaluated with the loss's running state frozen (RC keeps its current α, β-DPO its statistics), so calling it
    never changes training. Returns two fp32 tensors [B].
    """
    zw = batch.policy_chosen.detach().float().requires_grad_(True)
    zl = batch.policy_rejected.detach().float().requires_grad_(True)
    b = dataclasses.replace(batch, policy_chosen=zw, policy_rejected=zl)
    with torch.enable_grad(), loss.frozen():
        per_sample = loss(b)
        gw, gl = torch.autograd.grad(per_sample.sum(), [zw, zl], allow_unused=True)
    gw = torch.zeros_like(zw) if gw is None else gw
    gl = torch.zeros_like(zl) if gl is None else gl
    return -gw.detach(), gl.detach()


__all__ = ["incentives", "__version__"]
