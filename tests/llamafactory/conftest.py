"""Shared assets of the LLaMA-Factory tests (the `make test-lf` venv, .venv-lf): a tiny model and pairwise datasets
in alpaca and sharegpt formats, built offline with po_plugins.tiny, and helpers that run LLaMA-Factory's DPO stage
through po_plugins.cli.llamafactory (in this process or in a fresh one) or stock (llamafactory-cli)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="po_lf_datasets_"))
for _k, _v in dict(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled",
                   TOKENIZERS_PARALLELISM="false").items():
    os.environ.setdefault(_k, _v)

from po_plugins._cpu.lf import apply_lf_cpu_shims, pythonpath_entry  # noqa: E402

apply_lf_cpu_shims()

N_ROWS = 16


def _rows():
    from po_plugins.tiny import pair_rows

    out = []
    for i, r in enumerate(pair_rows(N_ROWS, seed=0)):
        out.append({**r, "rm_margin": [-3.0, -0.5, 0.0, 1.0, 4.0][i % 5], "w0": 0.0, "w1": 1.0, "w2": 2.0})
    return out


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    from po_plugins.tiny import make_model

    root = tmp_path_factory.mktemp("lf_assets")
    make_model(root / "model", seed=0)
    data = root / "data"
    data.mkdir()
    rows = _rows()
    alpaca = [{"instruction": r["prompt"], "input": "", "chosen": r["chosen"], "rejected": r["rejected"],
               **{k: r[k] for k in ("rm_margin", "w0", "w1", "w2")}} for r in rows]
    sharegpt = [{"conversations": [{"from": "human", "value": r["prompt"]}],
                 "chosen": {"from": "gpt", "value": r["chosen"]}, "rejected": {"from": "gpt", "value": r["rejected"]},
                 **{k: r[k] for k in ("rm_margin", "w0", "w1", "w2")}} for r in rows]
    (data / "pairs.json").write_text(json.dumps(alpaca))
    (data / "pairs_sg.json").write_text(json.dumps(sharegpt))
    alpaca_cols = {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected"}
    sg_cols = {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}
    info = {
        "pairs": {"file_name": "pairs.json", "ranking": True, "columns": {**alpaca_cols, "margin": "rm_margin"}},
        "pairs_plain": {"file_name": "pairs.json", "ranking": True, "columns": alpaca_cols},
        "pairs_badmargin": {"file_name": "pairs.json", "ranking": True,
                            "columns": {**alpaca_cols, "margin": "reward_margin"}},
        "pairs_sg": {"file_name": "pairs_sg.json", "formatting": "sharegpt", "ranking": True,
                     "columns": {**sg_cols, "margin": "rm_margin"}},
    }
    (data / "dataset_info.json").write_text(json.dumps(info))
    return {"root": root, "model": str(root / "model"), "data": str(data), "rows": rows}


def base_config(assets, out, **kw) -> dict:
    cfg = dict(model_name_or_path=assets["model"], stage="dpo", do_train=True, finetuning_type="full", pref_beta=0.1,
               pref_loss="sigmoid", dataset="pairs", dataset_dir=assets["data"], template="empty", cutoff_len=64,
               overwrite_cache=True, output_dir=str(out), overwrite_output_dir=True, per_device_train_batch_size=2,
               gradient_accumulation_steps=1, learning_rate=1.0e-3, max_steps=2, logging_steps=1, save_strategy="no",
               report_to="none", seed=0, disable_shuffling=True, preprocessing_num_workers=None,
               dataloader_num_workers=0, plot_loss=False)
    cfg.update(kw)
    return cfg


def write_yaml(path, cfg: dict) -> Path:
    import yaml

    path = Path(path)
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_inprocess(cfg: dict, callbacks=None):
    from po_plugins.cli.llamafactory import run

    run(dict(cfg), callbacks=callbacks)


def run_subprocess(args, cwd, env_extra=None, stock=False, timeout=600):
    """`python -m po_plugins.cli.llamafactory ARGS` (or stock `llamafactory-cli ARGS`) in a fresh process."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                                             "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1")
    if stock:  # stock LLaMA-Factory imports torchaudio too: the same stand-in, by PYTHONPATH
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath_entry(), env.get("PYTHONPATH")) if p)
        cmd = [str(Path(sys.executable).parent / "llamafactory-cli"), *map(str, args)]
    else:
        cmd = [sys.executable, "-m", "po_plugins.cli.llamafactory", *map(str, args)]
    env.update(env_extra or {})
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def trainer_log(out) -> list:
    return [json.loads(line) for line in (Path(out) / "trainer_log.jsonl").read_text().splitlines() if line.strip()]


def band(out) -> list:
    lines = [json.loads(line) for line in (Path(out) / "po_band.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in lines if "meta" not in r]


def weights(out) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(out) / "model.safetensors"))


@pytest.fixture(scope="session")
def lf():
    """The helpers above, for the test modules (pytest runs with --import-mode=importlib)."""
    from types import SimpleNamespace

    return SimpleNamespace(base_config=base_config, write_yaml=write_yaml, run_inprocess=run_inprocess,
                           run_subprocess=run_subprocess, trainer_log=trainer_log, band=band, weights=weights)
