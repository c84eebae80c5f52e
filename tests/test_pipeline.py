"""po_plugins.pipeline: one MADPO pipeline over both hosts, and what a new user meets first (fast; no training).

Relative paths are read from the config's folder on every host, `--dry_run` checks every input the config names,
the shipped examples dry-run cleanly on the assets `--example_assets` builds, and run_madpo.sh is the pipeline.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from po_plugins import pipeline
from po_plugins.cli import madpo

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "madpo"
CPU = not torch.cuda.is_available()
ROW = '{"prompt": "a", "chosen": "b", "rejected": "c"}\n'


def write(path: Path, cfg: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def dry_run(capsys, path, code=0):
    """stdout lines by step name, and stderr, of a dry run that must end with `code` (0, or the error's text)."""
    if code == 0:
        assert madpo.main(["--config", str(path), "--dry_run"]) == 0
    else:
        with pytest.raises(SystemExit) as e:
            madpo.main(["--config", str(path), "--dry_run"])
        assert code in str(e.value.code)
    out, err = capsys.readouterr()
    return {line.split(":")[0][len("[madpo] "):]: line for line in out.splitlines()}, err


def local_inputs(folder: Path) -> None:
    (folder / "sft").mkdir(parents=True)
    (folder / "sft" / "config.json").write_text("{}")
    for name in ("pairs.jsonl", "more.jsonl", "eval.jsonl"):
        (folder / name).write_text(ROW)


# ------------------------------------------------------------------------------------------------ relative paths
def test_openrlhf_reads_relative_paths_from_the_config_folder(capsys, tmp_path, monkeypatch):
    cfg_dir = tmp_path / "project"
    local_inputs(cfg_dir)
    (cfg_dir / "sub").mkdir()
    cfg = {"workdir": "runs", "data": {"dataset": "pairs.jsonl, more.jsonl@sub", "eval_dataset": "./eval.jsonl"},
           "reward_model": {"pretrain": "sft", "output": "rm_out"}, "dpo": {"pretrain": "sft"}}
    path = write(cfg_dir / "madpo.yaml", cfg)
    monkeypatch.chdir(tmp_path)  # started from another folder: nothing may be read from here
    lines, err = dry_run(capsys, path)
    assert err == ""  # every input found: no note
    rm = lines["rm"]
    assert f"--model.model_name_or_path {cfg_dir / 'sft'} " in rm
    assert f"--data.dataset {cfg_dir / 'pairs.jsonl'},{cfg_dir / 'more.jsonl'}@sub " in rm
    assert f"--eval.dataset {cfg_dir / 'eval.jsonl'}" in rm and f"--ckpt.output_dir {cfg_dir / 'rm_out'} " in rm
    assert f"--model {cfg_dir / 'rm_out'} " in lines["score"]
    assert f"--output {cfg_dir / 'runs' / 'scored.jsonl'} " in lines["score"]
    assert f"--model.model_name_or_path {cfg_dir / 'sft'} " in lines["dpo"]


def test_generation_inputs_are_read_from_the_config_folder(capsys, tmp_path, monkeypatch):
    cfg_dir = tmp_path / "project"
    local_inputs(cfg_dir)
    (cfg_dir / "my_rm").mkdir()
    cfg = {"workdir": "w", "data": {"dataset": "pairs.jsonl"}, "dpo": {"pretrain": "sft"},
           "generation": {"prompts": "more.jsonl", "reward": "rm:my_rm", "margins": "label"}}
    path = write(cfg_dir / "madpo.yaml", cfg)
    monkeypatch.chdir(tmp_path)
    lines, err = dry_run(capsys, path)
    assert err == ""
    assert f"--data.dataset {cfg_dir / 'more.jsonl'} " in lines["round 0 generate"]
    assert f"--reward rm:{cfg_dir / 'my_rm'} " in lines["round 0 label"]


# --------------------------------------------------------------------------------------------- the input check
def test_dry_run_names_every_missing_input_in_one_message(capsys, tmp_path):
    local_inputs(tmp_path)
    (tmp_path / "models").mkdir()
    cfg = {"workdir": "w", "data": {"dataset": "./typo.jsonl", "eval_dataset": str(tmp_path / "gone.jsonl")},
           "reward_model": {"pretrain": "sft"}, "dpo": {"pretrain": "models/policy"}}
    path = write(tmp_path / "madpo.yaml", cfg)
    lines, _ = dry_run(capsys, path, code="po_plugins: madpo config: not found: ")
    assert list(lines) == ["rm", "score", "dpo"]  # the commands are still printed, then the one error
    with pytest.raises(SystemExit) as e:
        madpo.main(["--config", str(path), "--dry_run"])
    message = str(e.value.code)
    assert "\n" not in message
    for missing in (f"data.dataset {tmp_path / 'typo.jsonl'}", f"data.eval_dataset {tmp_path / 'gone.jsonl'}",
                    f"dpo.pretrain {tmp_path / 'models' / 'policy'}"):
        assert missing in message
    assert "reward_model.pretrain" not in message and f"config's folder, {tmp_path}" in message
    # a real run refuses up front: nothing is started, not even the workdir
    with pytest.raises(SystemExit, match="not found: data.dataset"):
        madpo.main(["--config", str(path)])
    assert not (tmp_path / "w").exists()


def test_hub_names_are_said_once_and_not_missing(capsys, tmp_path):
    model = "Qwen/Qwen2.5-0.5B-Instruct"
    cfg = {"host": "trl", "workdir": "w", "data": {"dataset": "trl-lib/ultrafeedback_binarized"},
           "reward_model": {"pretrain": model}, "dpo": {"pretrain": model}}
    lines, err = dry_run(capsys, write(tmp_path / "madpo_trl.yaml", cfg))
    assert list(lines) == ["rm", "score", "score test", "dpo", "policy"]
    notes = err.splitlines()
    assert len(notes) == 1 and "fetched from the hub at run time (this machine may be offline)" in notes[0]
    assert "data.dataset 'trl-lib/ultrafeedback_binarized'" in notes[0] and "dpo.pretrain 'Qwen/" in notes[0]
    assert "not a valid hub name" not in notes[0] and "--example_assets" not in notes[0]


def test_check_inputs(tmp_path):
    local_inputs(tmp_path)
    cfg = pipeline.load_config(write(tmp_path / "c.yaml", {
        "data": {"dataset": "pairs.jsonl,./nope.jsonl"}, "reward_model": {"pretrain": "path/to/sft-model"},
        "dpo": {"pretrain": "sft"}}))
    check = pipeline.check_inputs(cfg)
    assert check.missing == [f"data.dataset {tmp_path / 'nope.jsonl'}"]
    assert check.hub == ["reward_model.pretrain 'path/to/sft-model' (not a valid hub name either: name or org/name)"]
    assert check.examples and "--example_assets" in check.notes()[1]


# ---------------------------------------------------------------------------------------- the shipped examples
def test_shipped_examples_dry_run_on_the_assets_built_for_them(capsys, tmp_path):
    folder = tmp_path / "examples" / "madpo"
    folder.mkdir(parents=True)
    for name in ("madpo.yaml", "madpo_trl.yaml"):
        shutil.copy(EXAMPLES / name, folder / name)
    _, err = dry_run(capsys, folder / "madpo.yaml")  # nothing built yet: hub notes that name the one command
    assert f"--example_assets {folder}" in err and "reward_model.pretrain 'path/to/sft-model'" in err
    assert madpo.main(["--example_assets", str(folder)]) == 0
    built = capsys.readouterr().out
    assert built.count("[madpo] built: ") == 6 and (folder / "path/to/sft-model/model.safetensors").is_file()
    assert len((folder / "pairs.jsonl").read_text().splitlines()) == 64
    assert (folder / "pairs" / "train.jsonl").read_text() == (folder / "pairs.jsonl").read_text()
    assert (folder / "pairs" / "test.jsonl").read_text() == (folder / "pairs_eval.jsonl").read_text()
    assert madpo.main(["--example_assets", str(folder)]) == 0
    assert capsys.readouterr().out.count("kept (exists)") == 6
    model = folder / "path" / "to" / "sft-model"
    lines, err = dry_run(capsys, folder / "madpo.yaml")
    assert err == "" and list(lines) == ["rm", "score", "dpo", "policy"]
    assert f"--model.model_name_or_path {model} " in lines["rm"] and f"--data.dataset {folder / 'pairs.jsonl'} " \
        in lines["rm"] and f"--eval.dataset {folder / 'pairs_eval.jsonl'}" in lines["rm"]
    assert f"--output {tmp_path / 'runs' / 'madpo' / 'scored.jsonl'}" in lines["score"]
    lines, err = dry_run(capsys, folder / "madpo_trl.yaml")
    assert err == "" and list(lines) == ["rm", "score", "score test", "dpo", "policy"]
    assert f"--model_name_or_path {model} --dataset_name {folder / 'pairs'} " in lines["rm"]
    assert f"--output_dir {tmp_path / 'runs' / 'madpo_trl' / 'policy'}" in lines["dpo"]
    if CPU:
        assert "--ds.attn_implementation sdpa" not in lines["rm"]  # TRL's CPU flags are its own
        assert "--use_cpu true --bf16 false" in lines["rm"]
    # the example's optional generation block, uncommented, also finds every input it names (prompts.jsonl)
    text = re.sub(r"^# (rounds|generation|  \w)", r"\1", (folder / "madpo.yaml").read_text(), flags=re.M)
    (folder / "madpo_rounds.yaml").write_text(text)
    lines, err = dry_run(capsys, folder / "madpo_rounds.yaml")
    assert err == "" and f"--data.dataset {folder / 'prompts.jsonl'} " in lines["round 1 generate"]


def test_run_madpo_sh_is_the_pipeline_with_deepspeed(tmp_path):
    local_inputs(tmp_path)
    env = {**os.environ, "PYTHON": sys.executable, "GPUS": "2"}
    res = subprocess.run(["bash", str(EXAMPLES / "run_madpo.sh"), "sft", "pairs.jsonl", "eval.jsonl", "work",
                          "--dry_run"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = {line.split(":")[0]: line for line in res.stdout.splitlines()}
    work = tmp_path / "work"
    assert " deepspeed --num_gpus 2 --module po_plugins.cli.train_rm " in f" {lines['[madpo] rm']}"
    assert f"--model.model_name_or_path {tmp_path / 'sft'} " in lines["[madpo] rm"]
    assert "--ds.zero_stage 3" in lines["[madpo] rm"] and "--ds.packing_samples " in lines["[madpo] rm"]
    assert "torch.distributed.run --nproc_per_node 2 -m po_plugins.cli.score_margins" in lines["[madpo] score"]
    assert f"--output {work / 'scored.jsonl'}" in lines["[madpo] score"]
    assert "--loss madpo --po.margin_key rm_margin --po.c_max 4 --po.tau 7" in lines["[madpo] dpo"]
    assert f"--data.dataset {work / 'scored.jsonl'}" in lines["[madpo] dpo"]
    assert json.loads((work / "madpo.yaml").read_text())["launcher"] == "deepspeed --num_gpus 2"
    res = subprocess.run(["bash", str(EXAMPLES / "run_madpo.sh")], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "SFT_MODEL PAIRS.jsonl EVAL.jsonl" in res.stderr


# ------------------------------------------------------------------------------------------ the plan's commands
def test_launchers_cpu_flags_and_the_files_the_pipeline_wrote(capsys, tmp_path):
    local_inputs(tmp_path)
    cfg = {"workdir": "w", "launcher": "torchrun --nproc_per_node 2",
           "data": {"dataset": "pairs.jsonl", "dataset_split": "test"},
           "reward_model": {"pretrain": "sft", "flags": {"ds.attn_implementation": "eager"}},
           "dpo": {"pretrain": "sft"}}
    lines, _ = dry_run(capsys, write(tmp_path / "madpo.yaml", cfg))
    # torchrun runs the training CLIs as modules
    assert "-m torch.distributed.run --nproc_per_node 2 -m po_plugins.cli.train_rm " in lines["rm"]
    assert "-m torch.distributed.run --nproc_per_node 2 -m po_plugins.cli.train_dpo " in lines["dpo"]
    # the flags decide the attention; without them, and without CUDA, sdpa (flash-attention needs CUDA)
    assert lines["rm"].count("--ds.attn_implementation") == 1 and "--ds.attn_implementation eager" in lines["rm"]
    assert ("--ds.attn_implementation sdpa" in lines["dpo"]) == CPU
    # data.dataset_split selects the user's split; scored.jsonl (written by the scorer) has only train
    assert "--data.dataset_split test" in lines["score"] and "--data.dataset_split" not in lines["dpo"]
    cfg["launcher"] = "torchrun --nproc_per_node 2 --module"
    lines, _ = dry_run(capsys, write(tmp_path / "madpo.yaml", cfg))
    assert "--nproc_per_node 2 --module po_plugins.cli.train_rm " in lines["rm"]


def test_both_hosts_are_one_plan():
    """The hosts differ only in their records: the same stages, in the same order, from the same builders."""
    for name, host in pipeline.HOSTS.items():
        assert host.name == name and host.example.startswith("examples/madpo/")
        assert (ROOT / host.example).is_file()
        cfg = pipeline.load_config(EXAMPLES / Path(host.example).name)
        steps = pipeline.plan(cfg)
        assert [s.stage for s in steps][0] == "rm" and [s.stage for s in steps][-1] == "dpo"
        assert {s.stage for s in steps} == {"rm", "score", "dpo"}
        assert steps[0].command[steps[0].command.index(host.rm_module) + 1] == host.model_flag


def test_execute_skips_complete_steps_and_marks_training_done(tmp_path):
    def step(stage, out, code="pass"):
        return pipeline.Step(stage, stage, [sys.executable, "-c", code], out)

    cfg = {"workdir": str(tmp_path / "w"), "host": "openrlhf"}
    rm, scored = tmp_path / "rm", tmp_path / "scored.jsonl"
    steps = [step("rm", rm, f"import os; os.makedirs({str(rm)!r})"),
             step("score", scored, f"open({str(scored)!r}, 'w').write('x')")]
    said = []
    assert pipeline.execute(cfg, steps, lambda line, err=False: said.append(line)) == 0
    assert json.loads((rm / pipeline.DONE).read_text())["stage"] == "rm" and scored.is_file()
    said.clear()
    assert pipeline.execute(cfg, steps, lambda line, err=False: said.append(line)) == 0
    assert all(line.endswith("skipped") for line in said) and len(said) == 2
    said.clear()
    failing = [steps[0], step("score", scored, "raise SystemExit(3)")]
    assert pipeline.execute(cfg, failing, lambda line, err=False: said.append((line, err)), force=["score"]) == 3
    assert said[-1][1] and "score failed (exit 3)" in said[-1][0]


def test_config_file_errors_are_one_line(tmp_path):
    (tmp_path / "bad.yaml").write_text("data: [a\n")
    for path, message in ((tmp_path / "bad.yaml", "bad.yaml is not valid YAML"),
                          (tmp_path / "none.yaml", "none.yaml is not a file"),
                          (write(tmp_path / "l.yaml", {"data": "pairs.jsonl", "reward_model": {"pretrain": "m"},
                                                       "dpo": {"pretrain": "m"}}), "'data' must be a mapping")):
        with pytest.raises(SystemExit) as e:
            madpo.main(["--config", str(path), "--dry_run"])
        assert str(e.value.code).startswith("po_plugins: madpo config: ") and message in str(e.value.code)
        assert "\n" not in str(e.value.code)
    with pytest.raises(SystemExit) as e:
        madpo.main([])
    assert e.value.code == 2


def test_scored_folders_with_the_same_layout_load_their_own_rows(tmp_path):
    """TRL reads the scored folder with load_dataset(folder), whose cache is keyed by the card's config and relative
    paths: the card names its config after the files' content, so a second workdir (or a re-scored one) is never
    served the first one's cached rows (with a fixed config name the second load returned the first folder's rows)."""
    from datasets import load_dataset

    seen = []
    for k, run in enumerate(("a", "b", "b")):  # two workdirs, then the second one re-scored in place
        folder = tmp_path / run / "scored"
        folder.mkdir(parents=True, exist_ok=True)
        steps = []
        for split in ("train", "test"):
            out = folder / f"{split}.jsonl"
            out.write_text("".join(json.dumps({"i": i, "rm_margin": float(k * 10 + i)}) + "\n" for i in range(3)))
            steps.append(pipeline.Step("score", f"score {split}", [], out))
        pipeline.write_scored_card(folder, steps)
        ds = load_dataset(str(folder), cache_dir=str(tmp_path / "hf_cache"))
        assert set(ds) == {"train", "test"}
        seen.append(ds["train"]["rm_margin"][:])
    assert seen == [[0.0, 1.0, 2.0], [10.0, 11.0, 12.0], [20.0, 21.0, 22.0]]
