"""CPU shim for LLaMA-Factory: the named ``torchaudio`` stand-in (po_plugins/_cpu/audio/torchaudio).

Applied by po_plugins.cli.llamafactory (and the LLaMA-Factory tests) before LLaMA-Factory is imported, only when no
GPU is present and the real ``import torchaudio`` fails. A GPU machine installs the real torchaudio with a CUDA torch.
"""

from __future__ import annotations

from pathlib import Path

AUDIO_DIR = Path(__file__).resolve().parent / "audio"


def apply_lf_cpu_shims() -> str | None:
    """Put the torchaudio stand-in on sys.path when no GPU is present and torchaudio cannot be imported; return a
    label naming what was done (None: nothing needed)."""
    import torch

    if torch.cuda.is_available():
        return None
    from . import install_stand_in

    return install_stand_in("torchaudio", AUDIO_DIR, "torchaudio stand-in (po_plugins/_cpu/audio)")


def pythonpath_entry() -> str:
    """The folder to put on PYTHONPATH for a child process that imports LLaMA-Factory on a CPU-only machine."""
    return str(AUDIO_DIR)
