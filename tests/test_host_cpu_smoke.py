"""The STOCK OpenRLHF CLIs (train_dpo, train_rm) run end to end on CPU through po_plugins._cpu.run_stock.

Each run is a fresh subprocess: ``python -m po_plugins._cpu.run_stock openrlhf.cli.<module> <flags>``
(or the same under ``torch.distributed.run --nproc_per_node 2``). ``TORCH_EXTENSIONS_DIR`` points at an
empty folder, and the tests assert it stays empty: no DeepSpeed op (FusedAdam, shm_comm) was JIT-compiled.
Also checks that the tiny assets are deterministic.
"""

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from po_plugins.tiny import make_assets, make_pairs, pair_rows

needs_host = pytest.mark.skipif(
    importlib.util.find_spec("openrlhf") is None or importlib.util.find_spec("deepspeed") is None,
    reason="openrlhf/deepspeed not installed",
)
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("tiny"), n_train=16, n_eval=8)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_stock(module: str, flags: list, workdir: Path, nproc: int = 1, timeout: int = 300):
    """Run ``module`` via po_plugins._cpu.run_stock in a fresh process (or ``nproc`` under torchrun).

    Returns ``(CompletedProcess, seconds)``. Asserts that no torch extension was JIT-compiled.
    """
    ext_dir = workdir / "torch_extensions"
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(
        TORCH_EXTENSIONS_DIR=str(ext_dir),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        WANDB_MODE="disabled",
        OMP_NUM_THREADS="1",
    )
    cmd = [sys.executable]
    if nproc > 1:
        cmd += ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(_free_port())]
    cmd += ["-m", "po_plugins._cpu.run_stock", module, *flags]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - t0
    print(f"\n{module} nproc={nproc}: rc={res.returncode} in {seconds:.1f}s")
    assert res.returncode == 0, (res.stdout[-4000:], res.stderr[-8000:])
    assert not ext_dir.exists() or not any(ext_dir.iterdir()), f"JIT build happened: {list(ext_dir.iterdir())}"
    return res, seconds


def common_flags(assets, out: Path, zero_stage: int) -> list:
    return [
        "--model.model_name_or_path", str(assets["model"]),
        "--data.dataset", str(assets["train"]),
        "--data.prompt_key", "prompt",
        "--data.chosen_key", "chosen",
        "--data.rejected_key", "rejected",
        "--data.max_len", "64",
        "--train.micro_batch_size", "2",
        "--train.batch_size", "4",
        "--train.max_epochs", "1",
        "--ds.attn_implementation", "eager",
        "--ds.zero_stage", str(zero_stage),
        "--ds.param_dtype", "bf16",
        "--ckpt.output_dir", str(out / "hf"),
        "--ckpt.path", str(out / "ckpt"),
    ]  # fmt: skip


def assert_hf_saved(out: Path):
    hf = out / "hf"
    assert (hf / "config.json").is_file()
    assert (hf / "model.safetensors").is_file()
    assert (hf / "tokenizer.json").is_file()
    return json.loads((hf / "config.json").read_text())


@needs_host
@pytest.mark.e2e
def test_train_dpo_zero0_with_eval_and_tensorboard(assets, tmp_path):
    flags = common_flags(assets, tmp_path, 0) + [
        "--eval.dataset", str(assets["eval"]),
        "--eval.split", "train",
        "--logger.tensorboard_dir", str(tmp_path / "tb"),
    ]  # fmt: skip
    res, _ = run_stock("openrlhf.cli.train_dpo", flags, tmp_path)
    assert res.stderr.count("po_plugins: CPU run") == 1
    assert_hf_saved(tmp_path)
    assert list((tmp_path / "tb").rglob("events.out.tfevents.*"))


@needs_host
@pytest.mark.e2e
def test_train_dpo_zero3(assets, tmp_path):
    run_stock("openrlhf.cli.train_dpo", common_flags(assets, tmp_path, 3), tmp_path)
    assert_hf_saved(tmp_path)


@needs_host
@pytest.mark.e2e
def test_train_rm(assets, tmp_path):
    flags = common_flags(assets, tmp_path, 0) + ["--eval.dataset", str(assets["eval"])]
    run_stock("openrlhf.cli.train_rm", flags, tmp_path)
    config = assert_hf_saved(tmp_path)
    assert config["architectures"] == ["RewardModel"]
    assert config["value_head_prefix"] == "score"
    assert "mean" in config and "std" in config


@needs_host
@pytest.mark.e2e
def test_train_dpo_two_processes_zero2(assets, tmp_path):
    flags = common_flags(assets, tmp_path, 2) + ["--eval.dataset", str(assets["eval"]), "--eval.split", "train"]
    res, _ = run_stock("openrlhf.cli.train_dpo", flags, tmp_path, nproc=2)
    assert res.stderr.count("po_plugins: CPU run") == 2  # one line per rank
    assert_hf_saved(tmp_path)


def test_pairs_are_deterministic_and_carry_a_sentiment_signal(tmp_path):
    a = make_pairs(tmp_path / "a.jsonl", n=20, seed=3).read_text()
    b = make_pairs(tmp_path / "b.jsonl", n=20, seed=3).read_text()
    assert a == b
    assert a != make_pairs(tmp_path / "c.jsonl", n=20, seed=4).read_text()
    from po_plugins.tiny import NEGATIVE, POSITIVE

    for row in map(json.loads, a.splitlines()):
        assert set(row) == {"prompt", "chosen", "rejected"}
        assert row["chosen"] != row["rejected"]
        words = lambda s: set(s.replace(".", " ").replace(",", " ").replace(";", " ").split())
        assert words(row["chosen"]) & set(POSITIVE) and not words(row["chosen"]) & set(NEGATIVE)
        assert words(row["rejected"]) & set(NEGATIVE) and not words(row["rejected"]) & set(POSITIVE)
    no_prompt = pair_rows(2, seed=3, with_prompt=False)
    assert set(no_prompt[0]) == {"chosen", "rejected"}


def test_tiny_model_is_deterministic_and_loads(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from po_plugins.tiny import make_model

    a, b = make_model(tmp_path / "a", seed=1), make_model(tmp_path / "b", seed=1)
    for name in ("model.safetensors", "tokenizer.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    tok = AutoTokenizer.from_pretrained(a)
    model = AutoModelForCausalLM.from_pretrained(a)
    assert model.config.vocab_size == len(tok)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    text = tok.apply_chat_template([{"role": "user", "content": "How was the movie?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "<|user|>\nHow was the movie?</s>\n<|assistant|>\n"
    assert tok.decode(tok("The movie was great.")["input_ids"]) == "The movie was great."
