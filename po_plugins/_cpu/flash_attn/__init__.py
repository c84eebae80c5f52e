"""Pure-torch stand-in for the parts of ``flash_attn`` that OpenRLHF imports at module level.

Put on ``sys.path`` by :func:`po_plugins._cpu.apply_cpu_shims` only when the real ``flash_attn``
cannot be imported (CPU-only torch). It provides ``flash_attn.bert_padding`` and
``flash_attn.utils.distributed.all_gather`` with flash-attn 2.8's semantics and deliberately has
no ``flash_attn.ops``, so OpenRLHF's ``log_probs_from_logits`` takes its plain-torch path.
There is no ``__version__`` and no dist-info, so transformers never reports flash-attn as installed.
"""

PO_PLUGINS_STAND_IN = True
