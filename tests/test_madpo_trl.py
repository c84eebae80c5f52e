"""MADPO on the TRL host: `po_plugins.cli.madpo --config` with `host: trl`.

End to end on CPU with tiny offline models: TRL's own reward script (trl.scripts.reward) trains the RM, the scorer
adds rm_margin to every row of each split, po_plugins.cli.trl_dpo (TRL's own dpo script with the plugin's trainer)
trains MADPO; a re-run skips every stage. Fast: the example config's commands and one clear error per bad config.
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from po_plugins.madpo import margin_weights
from po_plugins.tiny import make_assets, run_module

ROOT = Path(__file__).resolve().parents[1]
needs_trl = pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="trl not installed (po-plugins[trl])")
TRL_COMMON = {"per_device_train_batch_size": 4, "max_steps": 2, "report_to": "none", "save_strategy": "no",
              "logging_steps": 1, "seed": 0}


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def write_cfg(tmp_path, cfg, name="madpo_trl.yaml"):
    import yaml

    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def dry_run(capsys, path):
    from po_plugins.cli import madpo

    assert madpo.main(["--config", str(path), "--dry_run"]) == 0
    return {line.split(":")[0][len("[madpo] "):]: line for line in capsys.readouterr().out.splitlines()}


def base_cfg(data="pairs", pretrain="sft"):
    return {"host": "trl", "workdir": "w", "data": {"dataset": data}, "reward_model": {"pretrain": pretrain},
            "dpo": {"pretrain": pretrain}}


# --------------------------------------------------------------------------------------------------------- fast
def test_example_config_yields_the_trl_commands(capsys, tmp_path):
    text = (ROOT / "examples" / "madpo" / "madpo_trl.yaml").read_text()
    (tmp_path / "pairs").mkdir()
    for split in ("train", "test"):
        (tmp_path / "pairs" / f"{split}.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    path = tmp_path / "madpo_trl.yaml"
    path.write_text(text.replace("workdir: ../../runs/madpo_trl", f"workdir: {tmp_path / 'w'}"))
    lines = dry_run(capsys, path)
    assert list(lines) == ["rm", "score", "score test", "dpo", "policy"]
    w, data = tmp_path / "w", tmp_path / "pairs"
    assert " -m trl.scripts.reward --model_name_or_path path/to/sft-model " in lines["rm"]
    assert f"--dataset_name {data} --dataset_train_split train --dataset_test_split test" in lines["rm"]
    assert f"--output_dir {w / 'rm'}" in lines["rm"] and "--max_length 1024 --report_to none" in lines["rm"]
    assert "po_plugins.cli.score_margins --rm_kind hf" in lines["score"]
    assert f"--data.dataset_split train --data.max_len 1024 --output {w / 'scored' / 'train.jsonl'}" in lines["score"]
    assert f"--output {w / 'scored' / 'test.jsonl'}" in lines["score test"]
    dpo = lines["dpo"]
    assert " -m po_plugins.cli.trl_dpo --loss madpo --po.margin_key rm_margin --po.c_max 2.0 " in dpo
    assert f"--dataset_name {w / 'scored'} " in dpo and "--beta 0.1" in dpo and "--po.monitor true" in dpo
    if not torch.cuda.is_available():
        assert "--use_cpu true --bf16 false" in lines["rm"] and "--use_cpu true --bf16 false" in dpo


def test_trl_splits_flags_and_launchers(capsys, tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train.jsonl").write_text('{"chosen": "b", "rejected": "c"}\n')  # no test split
    cfg = base_cfg("d")
    cfg["launcher"] = "accelerate launch --num_processes 2"
    cfg["reward_model"]["flags"] = {"bf16": True, "gradient_checkpointing": False, "max_length": None,
                                    "model_init_kwargs": {"revision": "main"}}
    cfg["dpo"].update(loss="rc_madpo", flags={"use_cpu": True, "loss_weights": [1.0]})
    lines = dry_run(capsys, write_cfg(tmp_path, cfg))
    assert list(lines) == ["rm", "score", "dpo", "policy"]  # no test split: only train is scored
    assert lines["rm"].split(" trl.scripts.reward")[0].endswith("accelerate launch --num_processes 2 -m")
    assert """--bf16 true --gradient_checkpointing false --model_init_kwargs '{"revision": "main"}'""" in lines["rm"]
    assert "--use_cpu" not in lines["rm"] and "--data.max_len" not in lines["score"]  # max_length: null
    assert "--loss rc_madpo" in lines["dpo"] and "--use_cpu true --loss_weights 1.0" in lines["dpo"]
    assert "--bf16" not in lines["dpo"]


@pytest.mark.parametrize("change, message", [
    (lambda c: c.update(host="deepspeed"), r"host must be one of openrlhf, trl, got 'deepspeed'"),
    (lambda c: c.pop("reward_model"), r"host: trl needs the 'reward_model' section"),
    (lambda c: c["dpo"].pop("pretrain"), r"dpo.pretrain is required with host: trl"),
    (lambda c: c["data"].pop("dataset"), r"data.dataset is required with host: trl"),
    (lambda c: c["data"].update(prompt_key="question"), r"data field\(s\) \['prompt_key'\] are not used with host: "
                                                         r"trl; TRL's scripts read the prompt/chosen/rejected columns"),
    (lambda c: c["reward_model"].update(lr=1e-5), r"unknown reward_model field\(s\) \['lr'\].*reward_model.flags"),
    (lambda c: c["dpo"].update(flags={"output_dir": "x"}), r"dpo.flags sets \['output_dir'\], which the pipeline "
                                                           r"sets itself: use .*dpo.output"),
    (lambda c: c["dpo"].update(loss="dpo"), r"dpo.loss must be madpo or rc_madpo, got 'dpo'"),
    (lambda c: c.update(launcher="deepspeed --num_gpus 8"), r"launcher must start with python, torchrun or accelerate"),
    (lambda c: c.update(rounds=2, generation={"reward": "rm"}), r"'generation' .* not available with host: trl"),
    (lambda c: c.update(scoring={"margin_key": "margin"}), r"scoring.margin_key must not be 'margin'"),
])
def test_bad_trl_configs_fail_with_one_clear_error(tmp_path, change, message):
    from po_plugins.cli import madpo

    cfg = base_cfg()
    change(cfg)
    with pytest.raises(SystemExit, match=message):
        madpo.main(["--config", str(write_cfg(tmp_path, cfg)), "--dry_run"])


def test_default_host_stays_openrlhf(capsys, tmp_path):
    cfg = {"workdir": "w", "data": {"dataset": "pairs.jsonl"}, "reward_model": {"pretrain": "sft"},
           "dpo": {"pretrain": "sft"}}
    lines = dry_run(capsys, write_cfg(tmp_path, cfg))
    assert "po_plugins.cli.train_rm" in lines["rm"] and "po_plugins.cli.train_dpo" in lines["dpo"]
    cfg["host"] = "openrlhf"
    assert dry_run(capsys, write_cfg(tmp_path, cfg)) == lines


# ---------------------------------------------------------------------------------------------------- e2e
@needs_trl
@pytest.mark.e2e
def test_trl_pipeline_end_to_end_and_skip_if_done(tmp_path):
    assets = make_assets(tmp_path / "assets", n_train=8, n_eval=4)
    data = tmp_path / "pairs"
    data.mkdir()
    splits = {}
    for split, src in (("train", assets["train"]), ("test", assets["eval"])):
        rows = [{"id": f"{split}-{k}", **json.loads(line)} for k, line in enumerate(Path(src).read_text().splitlines())]
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        splits[split] = rows
    cfg = {
        "host": "trl", "workdir": "work",
        "data": {"dataset": str(data)},
        "reward_model": {"pretrain": str(assets["model"]), "flags": {**TRL_COMMON, "learning_rate": 5e-3}},
        "scoring": {"batch_size": 3},
        "dpo": {"pretrain": str(assets["model"]), "loss": "madpo", "c_max": 4.0, "tau": 7.0,
                "flags": {**TRL_COMMON, "learning_rate": 1e-2, "beta": 0.1, "po.monitor": True}},
    }
    path = write_cfg(tmp_path, cfg)
    res = run_module("po_plugins.cli.madpo", ["--config", path], tmp_path, timeout=300)
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-6000:])
    work = tmp_path / "work"
    rm_cfg = json.loads((work / "rm" / "config.json").read_text())
    assert rm_cfg["architectures"][0].endswith("ForSequenceClassification") and len(rm_cfg["id2label"]) == 1
    assert (work / "rm" / "model.safetensors").exists()
    for split, rows in splits.items():
        scored = read_jsonl(work / "scored" / f"{split}.jsonl")
        assert [{k: s[k] for k in r} for s, r in zip(scored, rows)] == rows and len(scored) == len(rows)
        assert all(list(s) == [*r, "rm_margin"] and isinstance(s["rm_margin"], float) for s, r in zip(scored, rows))
    margins = torch.tensor([s["rm_margin"] for s in read_jsonl(work / "scored" / "train.jsonl")])
    assert float(margins.abs().max()) > 0
    assert (work / "policy" / "model.safetensors").exists()
    lines = (work / "policy" / "po_band.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["meta"]["loss"] == "madpo"
    trace = [json.loads(x) for x in lines[1:]]
    assert [t["step"] for t in trace] == [1, 2]
    w = margin_weights(margins, c_max=4.0, tau=7.0)
    for t in trace:
        assert float(w.min()) - 1e-5 <= t["w_min"] <= t["w_mean"] <= t["w_max"] <= float(w.max()) + 1e-5
    again = run_module("po_plugins.cli.madpo", ["--config", path], tmp_path, timeout=120)
    assert again.returncode == 0 and again.stdout.count("skipped") == 4, again.stdout
