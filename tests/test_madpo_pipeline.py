"""MADPO stage 3 on OpenRLHF's own dataset path, and the one-command pipeline end to end (tiny models, CPU)."""

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from po_plugins.losses import PairBatch, build
from po_plugins.madpo import margin_weights
from po_plugins.tiny import make_assets, run_module

needs_host = pytest.mark.skipif(importlib.util.find_spec("openrlhf") is None, reason="openrlhf not installed")


def test_weight_zero_gives_no_gradient_and_weight_two_twice_weight_one():
    zw = torch.tensor([-10.0, -10.0, -10.0], requires_grad=True)
    zl = torch.tensor([-12.0, -12.0, -12.0], requires_grad=True)
    ref = torch.full((3,), -11.0)
    out = build("dpo")(PairBatch(zw, zl, ref, ref, weights=torch.tensor([0.0, 1.0, 2.0])))
    gw, gl = torch.autograd.grad(out.sum(), [zw, zl])
    assert gw[0] == 0 and gl[0] == 0
    torch.testing.assert_close(gw[2], 2 * gw[1])
    torch.testing.assert_close(gl[2], 2 * gl[1])
    # MADPO: each pair's gradient is its margin weight times the DPO gradient
    margins = torch.tensor([-8.0, 0.5, 3.0])
    out = build("madpo")(PairBatch(zw, zl, ref, ref, margins=margins))
    gm, _ = torch.autograd.grad(out.sum(), [zw, zl])
    (gd,) = torch.autograd.grad(build("dpo")(PairBatch(zw, zl, ref, ref)).sum(), [zw])
    torch.testing.assert_close(gm, margin_weights(margins) * gd)


@needs_host
def test_margins_travel_with_their_rows_through_openrlhf_filtering(tmp_path):
    from po_plugins._cpu import apply_cpu_shims

    apply_cpu_shims()
    from openrlhf.datasets.reward_dataset import RewardDataset  # noqa: F401  (import after the shims)
    from openrlhf.utils import get_tokenizer

    from po_plugins import openrlhf as host

    assets = make_assets(tmp_path, n_train=12, n_eval=2)
    rows = [json.loads(x) for x in Path(assets["train"]).read_text().splitlines()]
    rows[3]["prompt"] = "word " * 200  # too long: OpenRLHF drops this row in DPO mode
    for i, r in enumerate(rows):
        r["rm_margin"] = float(i)
    import datasets

    ds = datasets.Dataset.from_list(rows)
    args = SimpleNamespace(data=SimpleNamespace(prompt_key="prompt", chosen_key="chosen", rejected_key="rejected",
                                                apply_chat_template=False, tokenizer_chat_template=None),
                           po=SimpleNamespace(margin_key="rm_margin", missing_margin="error"))
    strategy = SimpleNamespace(args=args, print=print, is_rank_0=lambda: True)
    tok = get_tokenizer(str(assets["model"]), None, "right", None, use_fast=True)
    cls = host._reward_dataset_class()
    out = cls(ds, tok, 64, strategy, is_dpo=True, num_processors=1)
    assert len(out) == 11
    kept = [i for i in range(12) if i != 3]
    for j, i in enumerate(kept):
        extra = out[j][4]
        assert extra.margin == float(i)  # the margin of the row itself, not of position j
        assert int(extra) > 0 and isinstance(extra, int)
    batch = out.collate_fn([out[0], out[3]])
    assert [x.margin for x in batch[4]] == [0.0, 4.0]
    rows[5]["rm_margin"] = None
    with pytest.raises(Exception, match="missing_margin unit"):
        cls(datasets.Dataset.from_list(rows), tok, 64, strategy, is_dpo=True, num_processors=1)
    args.po.missing_margin = "unit"
    out = cls(datasets.Dataset.from_list(rows), tok, 64, strategy, is_dpo=True, num_processors=1)
    assert out[4][4].margin is None  # row 5 (position 4 after the drop): weight 1 via ĥ = 0
    with pytest.raises(SystemExit, match="no column 'score'.*--po.margin_key"):
        args.po.margin_key = "score"
        cls(ds, tok, 64, strategy, is_dpo=True, num_processors=1)


@needs_host
@pytest.mark.e2e
def test_pipeline_end_to_end_and_skip_if_done(tmp_path):
    import yaml

    assets = make_assets(tmp_path / "assets", n_train=16, n_eval=8)
    common = {"train.micro_batch_size": 2, "train.batch_size": 4, "train.max_epochs": 1, "ds.zero_stage": 0,
              "ds.param_dtype": "bf16", "ds.attn_implementation": "eager", "lr_warmup_ratio": 0}
    cfg = {
        "workdir": "work",
        "data": {"dataset": str(assets["train"]), "eval_dataset": str(assets["eval"]), "prompt_key": "prompt",
                 "chosen_key": "chosen", "rejected_key": "rejected", "max_len": 64},
        "reward_model": {"pretrain": str(assets["model"]), "flags": {**common, "adam.lr": 1e-3,
                                                                      "eval.split": "train"}},
        "scoring": {"margin_key": "rm_margin", "batch_size": 4},
        "dpo": {"pretrain": str(assets["model"]), "loss": "rc_madpo", "c_max": 4.0, "tau": 7.0,
                "flags": {**common, "adam.lr": 1e-2, "po.monitor": True}},
    }
    path = tmp_path / "madpo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = run_module("po_plugins.cli.madpo", ["--config", path], tmp_path, timeout=600)
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-6000:])
    work = tmp_path / "work"
    scored = [json.loads(x) for x in (work / "scored.jsonl").read_text().splitlines()]
    rows = [json.loads(x) for x in Path(assets["train"]).read_text().splitlines()]
    assert [{k: r[k] for k in rows[0]} for r in scored] == rows  # every row and column, in order
    assert all(isinstance(r["rm_margin"], float) for r in scored)
    assert (work / "policy" / "model.safetensors").exists()
    trace = [json.loads(x) for x in (work / "policy" / "po_band.jsonl").read_text().splitlines()[1:]]
    expect_w = margin_weights(torch.tensor([r["rm_margin"] for r in scored]), c_max=4.0, tau=7.0)
    assert all(float(expect_w.min()) - 1e-6 <= t["w_min"] <= t["w_max"] <= float(expect_w.max()) + 1e-6
               for t in trace)
    again = run_module("po_plugins.cli.madpo", ["--config", path], tmp_path, timeout=120)
    assert again.returncode == 0 and again.stdout.count("skipped") == 3, again.stdout


def test_example_config_parses_and_yields_the_three_commands(capsys, tmp_path):
    from po_plugins.cli import madpo

    path = Path(__file__).resolve().parents[1] / "examples" / "madpo" / "madpo.yaml"
    assert madpo.main(["--config", str(path), "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert "po_plugins.cli.train_rm" in out and "po_plugins.cli.score_margins" in out
    dpo = next(line for line in out.splitlines() if "po_plugins.cli.train_dpo" in line)
    assert "--loss madpo" in dpo and "--po.margin_key rm_margin" in dpo and "--po.c_max 2.0" in dpo
    assert "scored.jsonl" in dpo and "--model.beta 0.1" in dpo
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {dataset: x}\nreward_model: {pretrain: m}\n")
    with pytest.raises(SystemExit, match="section 'dpo' is required"):
        madpo.main(["--config", str(bad)])
