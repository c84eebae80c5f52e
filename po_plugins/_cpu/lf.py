"""CPU shim for LLaMA-Factory: the named ``torchaudio`` stand-in (po_plugins/_cpu/audio/torchaudio).

Applied by po_plugins.cli.llamafactory (and the LLaMA-Factory tests) before LLaMA-Factory is imported, only when no
GPU is present and the real ``import torchaudio`` fails. A GPU machine installs the real torchaudio with a CUDA torch.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

AUDIO_DIR = Path(__file__).resolve().parent / "audio"


def apply_lf_cpu_shims() -> str | None:
    """Put the torchaudio stand-in on sys.path when no GPU is present and torchaudio cannot be imported; return a
    label naming what was done (None: nothing needed)."""
    import torch

    if torch.cuda.is_available():
        return None
    try:
        import torchaudio  # noqa: F401
    except Exception:  # the PyPI CUDA wheel next to CPU torch raises OSError, not only ImportError
        for name in [m for m in sys.modules if m == "torchaudio" or m.startswith("torchaudio.")]:
            sys.modules.pop(name, None)
        if str(AUDIO_DIR) not in sys.path:
            sys.path.insert(0, str(AUDIO_DIR))
        importlib.invalidate_caches()
        import torchaudio

        assert getattr(torchaudio, "PO_PLUGINS_STAND_IN", False), torchaudio.__file__
        return "torchaudio stand-in (po_plugins/_cpu/audio)"
    return None


def pythonpath_entry() -> str:
    """The folder to put on PYTHONPATH for a child process that imports LLaMA-Factory on a CPU-only machine."""
    return str(AUDIO_DIR)
