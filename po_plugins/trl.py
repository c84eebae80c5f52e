"""po_plugins for Hugging Face TRL: change two names in an existing DPO script.

    from po_plugins.trl import PoDPOConfig, PoDPOTrainer
    args = PoDPOConfig(output_dir="out", po_loss="rc_dpo", beta=0.1, ...)   # every DPOConfig field, plus po_*
    PoDPOTrainer(model=..., args=args, train_dataset=..., processing_class=tok).train()

Supported: trl >=1.16,<1.17 (checked at import). The adapter is po_plugins.hosts.trl; docs/trl.md has the options and
how TRL's loss names map to po_plugins objectives.
"""

from .hosts.trl import TRL_NAMES, HostError, PoDPOConfig, PoDPOTrainer, check_host

__all__ = ["PoDPOConfig", "PoDPOTrainer", "TRL_NAMES", "HostError", "check_host"]
