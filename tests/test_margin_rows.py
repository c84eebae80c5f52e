"""Margin columns are read as numbers when the host builds its dataset, on every host (LLaMA-Factory:
tests/llamafactory): a row whose margin is text such as "n/a" is refused at start with one line naming the row, the
column and the flag, instead of training on silently (TRL trained to the end as unweighted DPO) or failing at the
last step (OpenRLHF)."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from po_plugins.errors import DataError
from po_plugins.tiny import make_assets, make_model, pair_rows


def test_trl_refuses_a_text_margin_when_the_trainer_is_built(tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from po_plugins.trl import PoDPOConfig, PoDPOTrainer

    model_dir = make_model(tmp_path / "model")
    rows = pair_rows(6)
    for i, r in enumerate(rows):
        r["rm_margin"] = "n/a" if i == 4 else str(0.5 * i)  # numbers given as text are numbers
    args = PoDPOConfig(output_dir=str(tmp_path / "o"), po_loss="madpo", po_margin_key="rm_margin", use_cpu=True,
                       bf16=False, report_to=[], max_steps=1, per_device_train_batch_size=2)

    def build(data):
        return PoDPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), args=args,
                            train_dataset=Dataset.from_list(data), processing_class=AutoTokenizer.from_pretrained(
                                model_dir))

    with pytest.raises(DataError, match=r"row 4 of the training dataset has a non-numeric value 'n/a' in "
                                        r"'rm_margin' \(po_margin_key\)") as e:
        build(rows)
    assert "\n" not in str(e.value)
    rows[4]["rm_margin"] = "2.0"
    assert build(rows).po.loss.name == "madpo"


def test_openrlhf_refuses_a_text_margin_when_the_dataset_is_built(tmp_path):
    from po_plugins._cpu import apply_cpu_shims

    apply_cpu_shims()
    import datasets
    from openrlhf.utils import get_tokenizer

    from po_plugins.hosts import openrlhf as host

    assets = make_assets(tmp_path, n_train=6, n_eval=2)
    rows = [json.loads(x) for x in Path(assets["train"]).read_text().splitlines()]
    for i, r in enumerate(rows):
        r["rm_margin"] = "n/a" if i == 5 else str(float(i))  # a text column (mixing types fails in pyarrow)
    args = SimpleNamespace(data=SimpleNamespace(prompt_key="prompt", chosen_key="chosen", rejected_key="rejected",
                                                apply_chat_template=False, tokenizer_chat_template=None,
                                                dataset=assets["train"]),
                           po=SimpleNamespace(margin_key="rm_margin", missing_margin="unit"))
    strategy = SimpleNamespace(args=args, print=print, is_rank_0=lambda: True)
    tok = get_tokenizer(str(assets["model"]), None, "right", None, use_fast=True)
    cls = host._reward_dataset_class()
    with pytest.raises(DataError, match=r"row 5 of the training dataset \(.*train.jsonl\) has a non-numeric value "
                                        r"'n/a' in 'rm_margin' \(--po.margin_key\)"):
        cls(datasets.Dataset.from_list(rows), tok, 64, strategy, is_dpo=True, num_processors=1)
    rows[5]["rm_margin"] = None  # missing, with --po.missing_margin unit: weight 1
    out = cls(datasets.Dataset.from_list(rows), tok, 64, strategy, is_dpo=True, num_processors=1)
    assert [x[4].margin for x in (out[i] for i in range(len(out)))] == [0.0, 1.0, 2.0, 3.0, 4.0, None]
