"""Named stand-in for ``torchaudio`` on CPU-only machines (po_plugins; not the real package).

LLaMA-Factory 0.9.5 imports ``torchaudio`` at module level (``llamafactory/data/mm_plugin.py``) but calls it only to
load and resample audio inputs. PyPI has no CPU build of torchaudio for torch 2.13 (its wheels are CUDA builds that
fail to load next to CPU torch), so :func:`po_plugins._cpu.lf.apply_lf_cpu_shims` puts this folder's parent on
``sys.path`` when no GPU is present and the real ``import torchaudio`` fails. Text-only preference training never
reaches these functions; audio inputs fail with a message naming the fix. There is no dist-info, so
``transformers`` never reports torchaudio as installed.
"""

PO_PLUGINS_STAND_IN = True
__version__ = "0.0.0+po_plugins.stand_in"

_MSG = ("torchaudio is a po_plugins stand-in on this CPU-only machine (no CPU build of torchaudio exists for this "
        "torch): audio inputs need a real torchaudio next to a CUDA torch")


def load(*args, **kwargs):
    raise RuntimeError(_MSG)


class functional:  # noqa: N801  (mirrors the torchaudio.functional module attribute LLaMA-Factory calls)
    @staticmethod
    def resample(*args, **kwargs):
        raise RuntimeError(_MSG)
