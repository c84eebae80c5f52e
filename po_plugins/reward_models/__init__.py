"""Reward models as scorers of preference pairs, one module per kind:

* `openrlhf_rm`: an OpenRLHF reward model (saved by `openrlhf.cli.train_rm` / `po_plugins.cli.train_rm`), scored
  through the stock `RewardModelTrainer` forward; also the DPO reference log-probs through `DPOTrainer`.
* `hf_rm`: a Hugging Face sequence-classification model with one label, as TRL's `RewardTrainer` saves it, with
  TRL's pair formatting (no OpenRLHF import).

`detect_rm_kind` tells them apart; `scoring` is the job that writes the margins of a dataset, `labels` the one that
rewards generated samples and forms pairs. What each computes, exactly: `po_plugins/cli/score_margins.py` and
`po_plugins/cli/label_pairs.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

from po_plugins.errors import DataError, OptionError

RM_KINDS = ("auto", "openrlhf", "hf")


def detect_rm_kind(path, requested: str = "auto") -> str:
    """openrlhf | hf: ``requested`` unless it is auto; auto reads the model folder's config.json.

    An ``architectures`` entry ending in ForSequenceClassification is a TRL / Hugging Face reward model; anything
    else keeps the OpenRLHF path. Raises OptionError without config.json, DataError when it is not a JSON object.
    """
    if requested != "auto":
        return requested
    cfg_path = Path(path, "config.json")
    if not cfg_path.is_file():
        raise OptionError(f"--model {path}: no config.json there; give the folder of a trained reward model (saved "
                          "by po_plugins.cli.train_rm / openrlhf.cli.train_rm, or by TRL's trl.scripts.reward)")
    try:
        archs = json.loads(cfg_path.read_text()).get("architectures") or []
    except (json.JSONDecodeError, AttributeError):
        raise DataError(f"--model {path}: config.json is not a JSON object") from None
    return "hf" if any(str(a).endswith("ForSequenceClassification") for a in archs) else "openrlhf"


__all__ = ["RM_KINDS", "detect_rm_kind"]
