"""po_plugins: preference-optimization research for OpenRLHF, TRL and LLaMA-Factory.

The maths core (objectives, incentives, band, reward calibration, MADPO weights, head score statistics) needs torch
only; the host adapters live in po_plugins.hosts and are imported only by the CLIs. The core's layers are pictured
in po_plugins/objective.py; `incentives` is re-exported from there.
"""

from __future__ import annotations

from .objective import incentives

__version__ = "0.1.0"

__all__ = ["incentives", "__version__"]
