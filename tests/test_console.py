"""The `po-plugins` console command (pyproject.toml [project.scripts] -> po_plugins/cli/main.py): installed into the
running venv, its overview and every subcommand's --help (as subprocesses), the nearest-name hint for an unknown
subcommand, exit statuses, and lazy imports."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from po_plugins.cli.main import COMMANDS, Command, main
from po_plugins.errors import DataError

REPO = Path(__file__).resolve().parents[1]
LF_PYTHON = REPO / ".venv-lf" / "bin" / "python"

# each subcommand's own flags that its --help must name, in the order they are printed (a host wrapper: the
# plugin's flags first, then one of the host's); and the host package it needs, if any
HELP = {
    "train-dpo": (["--loss", "--po.monitor", "--ckpt.output_dir"], "openrlhf"),
    "train-rm": (["no po_plugins flags", "--ckpt.output_dir", "--data.chosen_key"], "openrlhf"),
    "trl-dpo": (["--loss", "--po.monitor", "--dataset_name"], "trl"),
    "llamafactory": (["pref_loss", "po_hparams", "po_monitor", "po_alert_steps", "po_weight_key"], None),
    "score-margins": (["--model", "--output", "--margin_key"], None),
    "generate": (["--model", "--n_samples", "--output"], None),
    "label-pairs": (["--input", "--output", "--reward", "--pairing"], None),
    "madpo": (["--config", "--dry_run", "--force"], None),
    "diagnose": (["--model", "--data", "--loss", "--apply_chat_template"], None),
    "report": (["--out", "--labels", "--smooth"], None),
    "demo": (["--out", "--seed", "--losses"], None),
}


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT", "PYTHONPATH")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1")
    return env


@pytest.fixture(scope="module")
def console() -> Path:
    """The venv's `po-plugins` script; (re)installed from this checkout, offline, when it is missing."""
    script = Path(sys.executable).parent / "po-plugins"
    if not script.exists():
        res = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                              "--no-index", "-e", str(REPO)], capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stdout + res.stderr
    assert script.is_file() and os.access(script, os.X_OK), script
    assert "po_plugins.cli.main" in script.read_text()
    return script


def po(console, *args, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([str(console), *args], cwd=cwd or REPO, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def test_the_table_matches_the_modules():
    """Every subcommand is a module with main(argv); one per `python -m po_plugins.cli.*` module, plus the demo."""
    runnable = [p.stem for p in (REPO / "po_plugins" / "cli").glob("*.py")
                if p.stem != "main" and '__name__ == "__main__"' in p.read_text()]
    assert sorted(c.module for c in COMMANDS.values()) == sorted(
        [f"po_plugins.cli.{m}" for m in runnable] + ["po_plugins.demo"])
    assert set(COMMANDS) == set(HELP)
    for name, cmd in COMMANDS.items():
        assert importlib.util.find_spec(cmd.module) is not None, name
        assert cmd.module.rsplit(".", 1)[-1].replace("_", "-") == name


def test_overview(console):
    res = po(console, "--help")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith("usage: po-plugins <command>")
    for name, cmd in COMMANDS.items():  # one line each: the name and its summary
        assert any(line.split() and line.split()[0] == name and cmd.summary in line for line in lines), name
    assert "deepspeed --module po_plugins.cli.train_dpo" in res.stdout
    bare = po(console)  # no command: the overview on stderr, argparse's usage status
    assert bare.returncode == 2 and "train-dpo" in bare.stderr


def test_overview_imports_no_subcommand(tmp_path):
    """`po-plugins --help` imports none of the subcommands' modules (nor any host framework)."""
    code = ("import sys\nfrom po_plugins.cli.main import main\nassert main(['--help']) == 0\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('openrlhf', 'trl', 'llamafactory', 'deepspeed', "
            "'transformers', 'datasets', 'matplotlib') or (m.startswith('po_plugins.cli.') and m not in "
            "('po_plugins.cli.main', 'po_plugins.cli._common')) or m == 'po_plugins.demo']\n"
            "assert not bad, bad\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("name", list(HELP))
def test_subcommand_help(console, name):
    flags, host = HELP[name]
    if host is not None and importlib.util.find_spec(host) is None:
        pytest.skip(f"{host} is not installed")
    res = po(console, name, "--help")
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    at = [out.find(f) for f in flags]
    assert all(i >= 0 for i in at), [f for f, i in zip(flags, at) if i < 0]
    if name in ("train-dpo", "train-rm", "trl-dpo"):
        assert at == sorted(at), "the plugin's flags come before the host's"
    if name in ("madpo", "demo"):  # argparse's default program name is the subcommand's
        assert out.startswith(f"usage: po-plugins {name} ")


def test_llamafactory_help_lists_the_yaml_keys(console):
    """Without LLaMA-Factory (the main venv): every po_* key with its meaning and default, then where LLaMA-Factory's
    own help is; `train --help` and `help llamafactory` print the same keys."""
    from po_plugins.options import OPTIONS, options_for

    if importlib.util.find_spec("llamafactory") is not None:
        pytest.skip("LLaMA-Factory is installed here: its own help follows (test_llamafactory_help_in_its_venv)")
    outs = [po(console, *args) for args in (["llamafactory", "--help"], ["llamafactory", "train", "--help"],
                                            ["help", "llamafactory"])]
    for res in outs:
        assert res.returncode == 0, res.stderr
        text = res.stdout
        for k in options_for("llamafactory"):
            line = next(x for x in text.splitlines() if x.split() and x.split()[0] == f"po_{k}")
            assert OPTIONS[k][2] in line, k
            if OPTIONS[k][1] is not None:
                assert f"(default {str(OPTIONS[k][1]).lower()})" in line, line
        for key in ("pref_loss", "po_<hyperparameter>", "po_hparams", "po_weight_key", "dataset_info.json"):
            assert key in text, key
        assert "ref_logp_keys" not in text  # OpenRLHF-only
        assert "LLaMA-Factory's environment" in text and "po-plugins[llamafactory]" in text
    assert outs[0].stdout == outs[1].stdout == outs[2].stdout


@pytest.mark.skipif(not LF_PYTHON.exists(), reason="no LLaMA-Factory venv (.venv-lf, `make test-lf`)")
def test_llamafactory_help_in_its_venv():
    """In LLaMA-Factory's venv the plugin's keys come first, then LLaMA-Factory's own help: its training arguments
    for `train --help`, its command list for `--help`."""
    env = _env()
    env["PYTHONPATH"] = str(REPO)
    outs = {}
    for args, host_text in ((("train", "--help"), "--model_name_or_path"), (("--help",), "llamafactory-cli train")):
        res = subprocess.run([str(LF_PYTHON), "-m", "po_plugins.cli.main", "llamafactory", *args], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        outs[args] = out = res.stdout
        assert 0 <= out.find("po_monitor") < out.find(host_text), args
        assert "LLaMA-Factory's environment" not in out
    assert "usage: po-plugins llamafactory train" in outs["train", "--help"]
    assert "--pref_loss" in outs["train", "--help"]


def test_unknown_subcommand_suggests_the_nearest(console):
    res = po(console, "trian-dpo", "--loss", "rc_dpo")
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [res.stderr.strip()]  # one line
    assert res.stderr.startswith("po_plugins: unknown command 'trian-dpo' (did you mean 'train-dpo'?)")
    with pytest.raises(SystemExit, match=r"unknown command 'reprot' \(did you mean 'report'\?\)"):
        main(["reprot", "x"])
    with pytest.raises(SystemExit) as e:
        main(["zzz"])
    assert "did you mean" not in str(e.value) and "score-margins" in str(e.value)


def test_exit_status_is_the_modules(console, tmp_path):
    """The module's own status passes through (report: 2 for a missing run), with its one line."""
    res = po(console, "report", str(tmp_path / "none"), "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.startswith("po_plugins: run directory not found") and len(res.stderr.splitlines()) == 1


def test_dispatch_passes_argv_and_converts_typed_errors(monkeypatch):
    """The remaining arguments reach main(argv) unchanged; its return is the status; a PoError becomes one line."""
    seen = []
    fake = types.ModuleType("po_fake_command")

    def fake_main(argv):
        seen.append((list(argv), sys.argv[0]))
        if argv == ["--fail"]:
            raise DataError("bad rows", file="x.jsonl", row=3)
        return 3 if argv else None

    fake.main = fake_main
    monkeypatch.setitem(sys.modules, "po_fake_command", fake)
    monkeypatch.setitem(COMMANDS, "fake", Command("po_fake_command", "a test command"))
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    assert main(["fake", "--x", "1", "--po.gamma=2", "a b"]) == 3
    assert seen[-1] == (["--x", "1", "--po.gamma=2", "a b"], "po-plugins fake")
    assert main(["fake"]) == 0
    with pytest.raises(SystemExit) as e:
        main(["fake", "--fail"])
    assert str(e.value) == "po_plugins: bad rows (file x.jsonl, row 3)"
    assert main(["help", "fake"]) == 3 and seen[-1][0] == ["--help"]
