"""CPU shims that let the stock OpenRLHF DPO/RM CLIs run on a machine without CUDA.

Call :func:`apply_cpu_shims` (and, for a launcher-less ``python -m`` run, :func:`ensure_single_process_env`)
before OpenRLHF is imported or run. Nothing is changed when ``torch.cuda.is_available()`` is True.

What is shimmed, and why (OpenRLHF 0.11.2, DeepSpeed 0.19.6):

* ``torch.cuda.set_device/current_device/synchronize/empty_cache``: ``DeepspeedStrategy`` calls them
  unconditionally (``setup_distributed``, ``all_reduce``/``all_gather``, ``save_model``). They become
  no-ops, and ``current_device()`` returns ``"cpu"`` so ``tensor.to(torch.cuda.current_device())`` stays on CPU.
  DeepSpeed itself picks its CPU accelerator and the gloo backend on its own.
* ``DeepspeedStrategy.all_reduce``: on CUDA the strategy reduces a *copy* of a CPU tensor (``.to(cuda)``);
  on CPU ``.to("cpu")`` is the same tensor, so the in-place ``/= world_size`` and ``dist.all_reduce``
  would overwrite the caller's tensor. The wrapper passes a clone of CPU tensors; the reduction itself
  is upstream's. (``all_gather`` needs nothing beyond ``current_device``.) Only patched when OpenRLHF
  is installed.
* ``flash_attn``: OpenRLHF imports ``flash_attn.bert_padding`` and ``flash_attn.utils.distributed`` at
  module level, and flash-attn cannot be installed with CPU torch. If ``import flash_attn`` fails, the
  pure-torch stand-in in ``po_plugins/_cpu/flash_attn`` is put on ``sys.path``. It has no ``flash_attn.ops``
  (so ``log_probs_from_logits`` uses its torch path) and no dist-info (so transformers does not offer
  flash-attention; use ``--ds.attn_implementation eager`` or ``sdpa``).
* ``deepspeed.comm.torch.build_shm_op``: DeepSpeed JIT-compiles its ``deepspeed_shm_comm`` C++ op on every
  CPU ``init_distributed`` (~30 s on first use). The op only serves ``inference_all_reduce`` (tensor-parallel
  inference), which falls back to ``torch.distributed.all_reduce`` without it, so it is skipped.
* Adam: OpenRLHF always puts ``{"type": "AdamW"}`` in the DeepSpeed config, and DeepSpeed then builds
  ``FusedAdam`` (or ``DeepSpeedCPUAdam`` with ``--ds.adam_offload``), whose CPU op is JIT-compiled with
  g++ on first use (~50 s). ``deepspeed.initialize`` is wrapped to add DeepSpeed's documented
  ``"torch_adam": true`` optimizer parameter, so DeepSpeed constructs ``torch.optim.AdamW`` with the
  same lr/betas/eps/weight_decay (same update rule) and nothing is compiled. An explicit ``torch_adam``
  in a config is left alone.
* Packed attention: with ``--ds.packing_samples`` OpenRLHF forces ``attn_implementation="flash_attention_2"``,
  whose kernels need CUDA. ``Actor.__init__`` is wrapped to load the model with ``sdpa`` instead; OpenRLHF passes a
  packed batch as one row with ``attention_mask=None`` and ``position_ids`` restarting at 0 for every sequence, and
  transformers (``masking_utils.find_packed_sequence_indices``) then builds the exact block-diagonal causal mask
  for sdpa, so each sequence attends to itself only, as flash-attention's varlen kernel does. Tested: packed
  log-probs equal unpacked ones.
"""

import importlib
import logging
import os
import socket
import sys
from pathlib import Path

import torch

logger = logging.getLogger("po_plugins")

_HERE = Path(__file__).resolve().parent
_applied = None  # list of shim names once apply_cpu_shims() has run on a CPU-only machine


# One function object per patched name: torch._dynamo's trace rules map each torch.cuda function object
# to a rule and reject one object registered under two names with different rules.
def _set_device(device):
    """CPU stand-in for ``torch.cuda.set_device``: nothing to select."""


def _current_device():
    """CPU stand-in for ``torch.cuda.current_device``: a device usable in ``tensor.to(...)``."""
    return "cpu"


def _synchronize(device=None):
    """CPU stand-in for ``torch.cuda.synchronize``: CPU ops are synchronous."""


def _empty_cache():
    """CPU stand-in for ``torch.cuda.empty_cache``: there is no caching allocator."""


def _no_shm_op():
    """Replacement for ``deepspeed.comm.torch.build_shm_op``: report the op as unavailable."""
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_single_process_env() -> bool:
    """Set ``MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE/LOCAL_RANK`` for a one-process run without a launcher.

    Does nothing (returns False) when ``RANK`` or ``WORLD_SIZE`` is already set, i.e. under torchrun or the
    deepspeed launcher. Existing ``MASTER_ADDR``/``MASTER_PORT``/``LOCAL_RANK`` values are kept.
    Without these variables DeepSpeed falls back to MPI discovery and fails on ``import mpi4py``.
    """
    if "RANK" in os.environ or "WORLD_SIZE" in os.environ:
        return False
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ["RANK"] = "0"
    os.environ["WORLD_SIZE"] = "1"
    os.environ.setdefault("LOCAL_RANK", "0")
    return True


def _shim_torch_cuda() -> str:
    torch.cuda.set_device = _set_device
    torch.cuda.current_device = _current_device
    torch.cuda.synchronize = _synchronize
    torch.cuda.empty_cache = _empty_cache
    return "torch.cuda.{set_device,current_device,synchronize,empty_cache}"


def install_stand_in(name: str, folder: Path, label: str) -> str | None:
    """Put the named stand-in package in `folder` first on sys.path when `import name` fails (any exception: a CUDA
    wheel next to CPU torch raises OSError, not only ImportError); return `label`, or None when the real package
    imports."""
    try:
        importlib.import_module(name)
        return None
    except Exception:
        for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            sys.modules.pop(mod, None)
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
        importlib.invalidate_caches()
        module = importlib.import_module(name)
        assert getattr(module, "PO_PLUGINS_STAND_IN", False), module.__file__
        return label


def _shim_flash_attn():
    """Put the stand-in on sys.path if the real flash_attn is not importable; return a label or None."""
    return install_stand_in("flash_attn", _HERE, "flash_attn stand-in (bert_padding, utils.distributed; no ops)")


def _shim_deepspeed_shm():
    """Skip the deepspeed_shm_comm JIT build (only used by tensor-parallel inference all-reduce)."""
    try:
        ds_comm_torch = importlib.import_module("deepspeed.comm.torch")
    except ImportError:
        return None
    # NB: `import deepspeed.comm.torch as m` would bind the real torch package; importlib gets the module.
    ds_comm_torch.build_shm_op = _no_shm_op
    return "deepspeed shm_comm build skipped"


def with_torch_adam(config):
    """Return ``config`` with ``optimizer.params.torch_adam = True`` for Adam/AdamW/Muon dict configs.

    Any other config (a path, no optimizer section, another optimizer, ``torch_adam`` already given) is
    returned unchanged. The input dict is not modified.
    """
    if not isinstance(config, dict):
        return config
    optim = config.get("optimizer")
    if not isinstance(optim, dict) or str(optim.get("type", "")).lower() not in ("adam", "adamw", "muon"):
        return config
    params = dict(optim.get("params") or {})
    if "torch_adam" in params:
        return config
    params["torch_adam"] = True
    return {**config, "optimizer": {**optim, "params": params}}


def _shim_deepspeed_adam():
    try:
        import deepspeed
    except ImportError:
        return None
    if getattr(deepspeed.initialize, "_po_torch_adam", False):
        return "deepspeed Adam -> torch.optim.AdamW (torch_adam)"
    original = deepspeed.initialize

    def initialize(*args, **kwargs):
        if "config" in kwargs:
            kwargs["config"] = with_torch_adam(kwargs["config"])
        if "config_params" in kwargs:
            kwargs["config_params"] = with_torch_adam(kwargs["config_params"])
        return original(*args, **kwargs)

    initialize._po_torch_adam = True
    initialize.__doc__ = original.__doc__
    initialize.__wrapped__ = original
    deepspeed.initialize = initialize
    return "deepspeed Adam -> torch.optim.AdamW (torch_adam)"


def _shim_all_reduce():
    """Make DeepspeedStrategy.all_reduce leave the caller's CPU tensors untouched, as it does on CUDA."""
    if importlib.util.find_spec("openrlhf") is None:
        return None
    from openrlhf.utils.deepspeed.deepspeed import DeepspeedStrategy

    original = DeepspeedStrategy.all_reduce
    if getattr(original, "_po_clone", False):
        return "DeepspeedStrategy.all_reduce copies CPU tensors"

    def all_reduce(self, data, op="mean"):
        if isinstance(data, torch.Tensor) and data.device.type == "cpu":
            data = data.clone()
        return original(self, data, op)

    all_reduce._po_clone = True
    all_reduce.__doc__ = original.__doc__
    all_reduce.__wrapped__ = original
    DeepspeedStrategy.all_reduce = all_reduce
    return "DeepspeedStrategy.all_reduce copies CPU tensors"


def _shim_packed_attention():
    """flash_attention_2 -> sdpa for OpenRLHF's Actor on CPU (packed sequences: the block-diagonal causal mask)."""
    if importlib.util.find_spec("openrlhf") is None:
        return None
    import openrlhf.models.actor as actor_mod

    cls = actor_mod.Actor
    if getattr(cls.__init__, "_po_sdpa", False):
        return "flash_attention_2 -> sdpa (packed sequences: block-diagonal mask from position_ids)"
    original = cls.__init__

    def __init__(self, *args, **kwargs):
        if str(kwargs.get("attn_implementation", "flash_attention_2")).startswith("flash_attention"):
            kwargs["attn_implementation"] = "sdpa"
        return original(self, *args, **kwargs)

    __init__._po_sdpa = True
    __init__.__wrapped__ = original
    cls.__init__ = __init__
    return "flash_attention_2 -> sdpa (packed sequences: block-diagonal mask from position_ids)"


def apply_cpu_shims() -> bool:
    """Apply the CPU shims described in the module docstring; return True if this is a CPU run.

    Idempotent. Returns False and changes nothing when CUDA is available. Logs one line (logger
    ``po_plugins`` and stderr) naming what was shimmed, the first time only.
    """
    global _applied
    if torch.cuda.is_available():
        return False
    if _applied is not None:
        return True
    applied = [_shim_torch_cuda()]
    # Order matters: the flash_attn stand-in must be importable before OpenRLHF is (the all_reduce shim).
    for shim in (_shim_flash_attn, _shim_deepspeed_shm, _shim_deepspeed_adam, _shim_all_reduce,
                 _shim_packed_attention):
        label = shim()
        if label:
            applied.append(label)
    _applied = applied
    msg = "po_plugins: CPU run (torch.cuda unavailable); shimmed: " + "; ".join(applied)
    logger.info(msg)
    print(msg, file=sys.stderr, flush=True)
    return True
