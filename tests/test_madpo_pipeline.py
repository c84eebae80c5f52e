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

    from po_plugins.hosts import openrlhf as host

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
    from po_plugins.errors import DataError  # the library's typed error; the CLI prints it as one line

    with pytest.raises(DataError, match="no column 'score'.*--po.margin_key"):
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


# ------------------------------------------------------------------------------ on-policy pairs, iterative MADPO
GOLD = "def reward(prompts, responses):\n    return [sum(map(ord, r)) % 89 / 10 for r in responses]\n"


def _dry_run(capsys, cfg, tmp_path):
    import yaml

    from po_plugins.cli import madpo

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert madpo.main(["--config", str(path), "--dry_run"]) == 0
    return [line for line in capsys.readouterr().out.splitlines() if line.startswith("[madpo] round")]


def test_rounds_chain_policies_and_keep_every_round(capsys, tmp_path):
    base = {"workdir": "w", "data": {"dataset": "pairs.jsonl", "prompt_key": "prompt", "max_len": 64},
            "dpo": {"pretrain": "sft", "flags": {"model.beta": 0.1}}, "rounds": 2,
            "generation": {"reward": "fn:gold:reward", "n_samples": 4, "temperature": 0.8, "seed": 5}}
    lines = _dry_run(capsys, base, tmp_path)
    assert [line.split(":")[0] for line in lines] == [f"[madpo] round {i} {s}" for i in (0, 1)
                                                      for s in ("generate", "label", "dpo")]
    w = tmp_path / "w"
    gen0, label0, dpo0, gen1, label1, dpo1 = lines
    assert "--model sft " in gen0 and f"--model {w / 'round_0' / 'policy'} " in gen1
    assert "--seed 5 " in gen0 and "--seed 6 " in gen1 and "--n_samples 4" in gen0 and "--temperature 0.8" in gen0
    assert f"--output {w / 'round_1' / 'generated.jsonl'}" in gen1 and "--data.prompt_key prompt" in gen1
    assert "--reward fn:gold:reward" in label1 and f"--input {w / 'round_1' / 'generated.jsonl'}" in label1
    assert "--model.model_name_or_path sft " in dpo0
    assert f"--model.model_name_or_path {w / 'round_0' / 'policy'}" in dpo1
    assert "--po.margin_key reward_margin" in dpo1 and f"--data.dataset {w / 'round_1' / 'pairs.jsonl'}" in dpo1
    assert "--ref.model_name_or_path" not in dpo1  # reference: the round's starting policy
    # with the pipeline's reward model: rm once, RM labels, a score stage per round, rm_margin; reference initial
    cfg = {**base, "reward_model": {"pretrain": "sft"}, "generation": {**base["generation"], "reward": "rm"},
           "dpo": {**base["dpo"], "reference": "initial"}}
    lines = _dry_run(capsys, cfg, tmp_path)
    assert [line.split(":")[0] for line in lines][:4] == [f"[madpo] round 0 {s}" for s in
                                                           ("generate", "label", "score", "dpo")]
    assert f"--reward rm:{w / 'rm'}" in lines[1] and f"--model {w / 'rm'}" in lines[2]
    assert "--po.margin_key rm_margin" in lines[7] and "--ref.model_name_or_path sft" in lines[7]
    from po_plugins.cli import madpo

    for bad, msg in (({**base, "generation": None}, "rounds > 1 needs a generation section"),
                     ({**base, "generation": {"reward": "rm"}}, "need the reward_model section")):
        path = tmp_path / "bad.yaml"
        import yaml

        path.write_text(yaml.safe_dump(bad))
        with pytest.raises(SystemExit, match=msg):
            madpo.main(["--config", str(path), "--dry_run"])


def test_example_config_generation_block_parses(capsys, tmp_path):
    """The commented-out stage-0 block of the example, uncommented, is a valid config."""
    import re

    from po_plugins.cli import madpo

    text = (Path(__file__).resolve().parents[1] / "examples" / "madpo" / "madpo.yaml").read_text()
    text = re.sub(r"^# (rounds|generation|  \w)", r"\1", text, flags=re.M)
    path = tmp_path / "madpo.yaml"
    path.write_text(text.replace("workdir: ../../runs/madpo", f"workdir: {tmp_path / 'w'}"))
    assert madpo.main(["--config", str(path), "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert "round 1 generate" in out and "round 1 score" in out and "po_plugins.cli.label_pairs" in out


@needs_host
@pytest.mark.e2e
def test_iterative_madpo_two_rounds_end_to_end(tmp_path):
    import yaml

    assets = make_assets(tmp_path / "assets", n_train=8, n_eval=2)
    (tmp_path / "gold.py").write_text(GOLD)
    common = {"train.micro_batch_size": 2, "train.batch_size": 4, "train.max_epochs": 1, "ds.zero_stage": 0,
              "ds.param_dtype": "bf16", "ds.attn_implementation": "eager", "lr_warmup_ratio": 0, "adam.lr": 1e-2}
    cfg = {"workdir": "work", "rounds": 2,
           "data": {"dataset": str(assets["train"]), "prompt_key": "prompt", "max_len": 64},
           "generation": {"reward": "fn:gold:reward", "n_samples": 2, "max_new_tokens": 8, "backend": "hf",
                          "batch_size": 8, "ties": "keep"},
           "dpo": {"pretrain": str(assets["model"]), "loss": "madpo", "flags": common}}
    path = tmp_path / "madpo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = run_module("po_plugins.cli.madpo", ["--config", path], tmp_path, timeout=600)
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-6000:])
    assert "generating samples" in res.stderr and "rewarding samples" in res.stderr  # progress bars
    rows = [json.loads(x) for x in Path(assets["train"]).read_text().splitlines()]
    samples = []
    for i in (0, 1):
        d = tmp_path / "work" / f"round_{i}"
        pairs = [json.loads(x) for x in (d / "pairs.jsonl").read_text().splitlines()]
        assert [p["prompt"] for p in pairs] == [r["prompt"] for r in rows]
        assert all(p["chosen"] in p["samples"] and p["reward_margin"] >= 0 for p in pairs)
        assert (d / "policy" / "model.safetensors").exists() and (d / "generated.jsonl").exists()
        samples.append([p["samples"] for p in pairs])
    assert samples[0] != samples[1]  # round 1 sampled from round 0's policy (and seed + 1)
    again = run_module("po_plugins.cli.madpo", ["--config", path], tmp_path, timeout=120)
    assert again.returncode == 0 and again.stdout.count("skipped") == 6, again.stdout
