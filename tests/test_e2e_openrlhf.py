"""End to end: the real, unmodified openrlhf.cli.train_dpo through po_plugins.cli.train_dpo on CPU (tiny model)."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from po_plugins.tiny import DIST_VARS, free_port, make_assets, run_module

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(importlib.util.find_spec("openrlhf") is None,
                                                  reason="openrlhf not installed (make test installs it)")]
KEYS = ["step", "z_w", "z_l", "r_w", "r_l", "d_w", "d_l", "log_r", "log_r_star", "rho", "band_lower", "band_upper",
        "slack", "in_band", "alpha", "chosen_up_frac", "probe_delta_z_w", "sw_norm", "score_pairs"]
NULLABLE = ("band_upper", "band_lower", "slack", "log_r")  # ρ ≤ 0: no edges; a mean incentive ≤ 0: no log r


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("tiny"), n_train=16, n_eval=8)


def run(args, cwd, nproc=1, module="po_plugins.cli.train_dpo", env_extra=None, check=True):
    res = run_module(module, args, cwd, nproc=nproc, env_extra=env_extra)
    if check:
        assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-6000:])
    return res


def flags(assets, out, stage=0, micro=2, batch=4, epochs=1, extra=()):
    return ["--model.model_name_or_path", assets["model"], "--data.dataset", assets["train"],
            "--data.prompt_key", "prompt", "--data.chosen_key", "chosen", "--data.rejected_key", "rejected",
            "--data.max_len", "64", "--train.micro_batch_size", micro, "--train.batch_size", batch,
            "--train.max_epochs", epochs, "--ds.attn_implementation", "eager", "--ds.zero_stage", stage,
            "--ds.param_dtype", "bf16", "--adam.lr", "1e-2", "--lr_warmup_ratio", "0",
            "--ckpt.output_dir", out, *extra]


def _strict(constant):
    raise AssertionError(f"po_band.jsonl holds {constant}, which strict JSON readers reject")


def trace(out):
    lines = Path(out, "po_band.jsonl").read_text().splitlines()
    assert json.loads(lines[0]).keys() == {"meta"}
    return [json.loads(x, parse_constant=_strict) for x in lines[1:]]


def weights(out):
    from safetensors.torch import load_file

    return load_file(str(Path(out) / "model.safetensors"))


@pytest.mark.parametrize("loss,stage", [("dpo", 0), ("rc_dpo", 0), ("simpo", 0), ("ipo", 0), ("dpo", 2),
                                        ("rc_dpo", 3), ("simpo", 2), ("ipo", 3), ("rc_madpo", 0)])
def test_losses_run_end_to_end_with_the_monitor(assets, tmp_path, loss, stage):
    extra = ["--po.monitor", "--po.recheck_every", "1", "--logger.tensorboard_dir", tmp_path / "tb"]
    if "madpo" in loss:  # margins travel with their rows through OpenRLHF's dataset and collator
        rows = [json.loads(x) for x in Path(assets["train"]).read_text().splitlines()]
        data = tmp_path / "scored.jsonl"
        data.write_text("".join(json.dumps({**r, "rm_margin": (i % 7) - 3.0}) + "\n" for i, r in enumerate(rows)))
        extra += ["--po.margin_key", "rm_margin", "--data.dataset", data]
    res = run(["--loss", loss, *flags(assets, tmp_path / "out", stage=stage, extra=extra)], tmp_path)
    assert (tmp_path / "out" / "model.safetensors").exists()
    rec = trace(tmp_path / "out")
    assert [r["step"] for r in rec] == [1, 2, 3, 4]
    for r in rec:
        for k in KEYS:
            assert k in r, (k, r)
            assert (r[k] is None and k in NULLABLE) or math.isfinite(float(r[k])), (k, r)
        assert r["loss_name"] == loss
    if loss in ("dpo", "rc_dpo"):
        assert rec[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy equals reference at step 1
        assert rec[0]["r_w"] == 0 and rec[0]["r_l"] == 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(next((tmp_path / "tb").iterdir())))
    ea.Reload()
    tags = ea.Tags()["scalars"]
    for k in ("alpha", "slack", "in_band", "log_r", "band_lower", "z_w", "chosen_up_frac"):
        assert f"train/po/{k}" in tags or k in ("slack", "band_lower"), (k, tags)  # ±inf edges are not logged
    assert [e.value for e in ea.Scalars("train/po/alpha")] == pytest.approx([r["alpha"] for r in rec])
    if loss.startswith("rc_"):
        assert any(r["alpha"] != 1.0 for r in rec)
    else:
        assert all(r["alpha"] == 1.0 for r in rec)
    if loss == "simpo":
        assert "reference forward skipped" in res.stdout + res.stderr
    if "madpo" in loss:
        assert all(0 < r["w_min"] <= r["w_mean"] <= r["w_max"] for r in rec)
        assert rec[0]["loss"] == pytest.approx(rec[0]["w_mean"] * math.log(2), abs=1e-6)  # weights × ln 2


def test_plugin_dpo_reproduces_the_stock_trainer(assets, tmp_path):
    common = flags(assets, tmp_path / "stock", extra=["--logger.tensorboard_dir", tmp_path / "tb_stock"])
    run(["openrlhf.cli.train_dpo", *common], tmp_path, module="po_plugins._cpu.run_stock")
    mine = flags(assets, tmp_path / "plugin", extra=["--logger.tensorboard_dir", tmp_path / "tb_plugin"])
    run(["--loss", "dpo", *mine], tmp_path)
    a, b = weights(tmp_path / "stock"), weights(tmp_path / "plugin")
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] == b[k]).all(), k
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def losses(d):
        ea = EventAccumulator(str(next(Path(d).iterdir())))
        ea.Reload()
        return [e.value for e in ea.Scalars("train/loss")]

    assert losses(tmp_path / "tb_stock") == losses(tmp_path / "tb_plugin") and len(losses(tmp_path / "tb_stock")) == 4


def test_interrupted_and_resumed_run_equals_uninterrupted(assets, tmp_path):
    def args(out):
        return ["--loss", "rc_dpo", *flags(assets, out, epochs=2, extra=[
            "--ckpt.save_steps", "3", "--ckpt.path", Path(out) / "ckpt", "--ckpt.load_enable"])]

    run(args(tmp_path / "full"), tmp_path)
    res = run(args(tmp_path / "part"), tmp_path, env_extra={"PO_PLUGINS_INTERRUPT_AT_STEP": "3"}, check=False)
    assert res.returncode != 0 and "stopping" in res.stdout + res.stderr
    assert [r["step"] for r in trace(tmp_path / "part")] == [1, 2, 3]
    run(args(tmp_path / "part"), tmp_path)
    full, part = trace(tmp_path / "full"), trace(tmp_path / "part")
    assert [r["step"] for r in part] == list(range(1, 9))
    assert [r["alpha"] for r in part] == [r["alpha"] for r in full]
    a, b = weights(tmp_path / "full"), weights(tmp_path / "part")
    for k in a:
        assert (a[k] == b[k]).all(), k
    # resuming the rc_dpo checkpoint with another objective: one line that names both
    other = args(tmp_path / "part")
    other[1] = "dpo"
    res = run(other, tmp_path, check=False)
    err = res.stdout + res.stderr
    assert res.returncode != 0 and "trained with the objective 'rc_dpo', this run uses 'dpo'" in err, err[-2000:]
    assert "KeyError" not in err and "Traceback" not in err


def test_nearest_target_is_one_in_band_and_resumes(assets, tmp_path, nearest_alpha_counts):
    """--po.rc_target nearest: α is exactly 1 on the steps whose micro-batch was inside its shrunk band and moves the
    others to its nearest edge; an interrupted and resumed run repeats α and the weights. (rc_margin 0.9 keeps only
    the inner tenth of each band: on these pairs steps 1-4 are inside it, step 5 is not.)"""
    def args(out):
        return ["--loss", "rc_dpo", "--po.rc_target", "nearest", "--po.rc_margin", "0.9",
                *flags(assets, out, micro=4, batch=4, epochs=2, extra=[
                    "--ckpt.save_steps", "3", "--ckpt.path", Path(out) / "ckpt", "--ckpt.load_enable"])]

    run(args(tmp_path / "full"), tmp_path)
    res = run(args(tmp_path / "part"), tmp_path, env_extra={"PO_PLUGINS_INTERRUPT_AT_STEP": "3"}, check=False)
    assert res.returncode != 0 and "stopping" in res.stdout + res.stderr
    run(args(tmp_path / "part"), tmp_path)
    full, part = trace(tmp_path / "full"), trace(tmp_path / "part")
    assert [r["step"] for r in part] == list(range(1, 9))
    assert [r["alpha"] for r in part] == [r["alpha"] for r in full]
    inside, moved = nearest_alpha_counts(full, margin=0.9)
    assert inside >= 1 and moved >= 1, (inside, moved)
    a, b = weights(tmp_path / "full"), weights(tmp_path / "part")
    for k in a:
        assert (a[k] == b[k]).all(), k


def test_step_band_does_not_depend_on_micro_batch_size_or_processes(assets, tmp_path):
    """The band is the optimizer step's (its summed head gradient): the first step (same model, same 4 pairs) gives
    the same record for micro-batches of 1, 2 and 4 pairs and for 1 and 2 processes. (The record against autograd
    of the step's gradient: tests/test_monitor.py.)"""
    runs = {}
    for name, micro, nproc in (("m4", 4, 1), ("m2", 2, 1), ("m1", 1, 1), ("p2m1", 1, 2), ("p2m2", 2, 2)):
        run(["--loss", "dpo", "--po.monitor", *flags(assets, tmp_path / name, micro=micro, batch=4)], tmp_path,
            nproc=nproc)
        runs[name] = trace(tmp_path / name)[0]
    ref = runs["m4"]
    assert ref["score_pairs"] == 4 and -1 <= ref["rho"] <= 1
    for name, r in runs.items():
        assert r["score_pairs"] == 4, name
        for k in ("z_w", "d_w", "d_l", "sw_norm", "sl_norm", "sw_dot_sl", "rho", "log_r_star"):
            # bf16 forwards of differently padded micro-batches round differently
            assert r[k] == pytest.approx(ref[k], rel=2e-2, abs=1e-3), (name, k, r[k], ref[k])
        assert r["in_band"] == ref["in_band"], name


def test_step_band_is_taken_at_the_weights_the_step_used(assets, tmp_path):
    """With accumulation the monitor's token pass rebuilds the logits from the head weight: it runs before the
    optimizer step (Plugin.before_optimizer_step), so even a step that changes the head a lot (learning rate 0.5)
    gives the first record of one micro-batch of 4 pairs (its own statistics, at the initial weights)."""
    runs = {}
    for name, micro in (("m4", 4), ("m2", 2)):
        run(["--loss", "dpo", "--po.monitor", *flags(assets, tmp_path / name, micro=micro, batch=4,
                                                     extra=["--adam.lr", "0.5"])], tmp_path)
        runs[name] = trace(tmp_path / name)[0]
    for k in ("sw_norm", "sl_norm", "sw_dot_sl", "rho"):
        assert runs["m2"][k] == pytest.approx(runs["m4"][k], rel=2e-2, abs=1e-3), (k, runs["m2"][k], runs["m4"][k])


def test_nll_term_is_folded_and_the_step_equals_stock(assets, tmp_path):
    """--model.nll_loss_coef with a plugin objective: the NLL term is inside the objective (incentives, RC, band), and
    OpenRLHF's losses, logs and weights stay the stock step's."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    nll = ["--model.nll_loss_coef", "0.5", "--adam.lr", "1e-3"]
    run(["openrlhf.cli.train_dpo", *flags(assets, tmp_path / "stock", extra=[
        "--logger.tensorboard_dir", tmp_path / "tb_stock", *nll])], tmp_path, module="po_plugins._cpu.run_stock")
    res = run(["--loss", "dpo", "--po.monitor", *flags(assets, tmp_path / "plugin", extra=[
        "--logger.tensorboard_dir", tmp_path / "tb_plugin", *nll])], tmp_path)
    assert "NLL(chosen)" in res.stdout + res.stderr

    def scalars(d, tag):
        ea = EventAccumulator(str(next(Path(d).iterdir())))
        ea.Reload()
        return [e.value for e in ea.Scalars(tag)]

    for tag in ("train/loss", "train/nll_loss"):
        stock = scalars(tmp_path / "tb_stock", tag)
        assert len(stock) == 4 and scalars(tmp_path / "tb_plugin", tag) == pytest.approx(stock, rel=1e-5), tag
    ws, wp, w0 = weights(tmp_path / "stock"), weights(tmp_path / "plugin"), weights(assets["model"])
    update = sum(float(((ws[k].float() - w0[k].float()) ** 2).sum()) for k in ws) ** 0.5
    diff = sum(float(((ws[k].float() - wp[k].float()) ** 2).sum()) for k in ws) ** 0.5
    assert diff <= 1e-2 * update
    # the term is in the monitor's incentives: at step 1 (policy = reference) DPO's d_w = d_l = β/2, and the NLL
    # adds c/|y_w| to d_w
    rec = trace(tmp_path / "plugin")[0]
    assert rec["d_l"] == pytest.approx(0.05, rel=1e-4) and rec["d_w"] > rec["d_l"] + 0.5 / 64
    meta = json.loads(Path(tmp_path / "plugin" / "po_band.jsonl").read_text().splitlines()[0])["meta"]
    assert meta["hparams"]["nll_coef"] == 0.5
    res = run(["--loss", "rc_dpo", *flags(assets, tmp_path / "rc", extra=nll)], tmp_path)
    assert all(r["d_w"] > 0 for r in trace(tmp_path / "rc"))


def test_ring_attention_is_refused_at_start_with_the_band(assets, tmp_path):
    for loss in (["--loss", "rc_dpo"], ["--loss", "dpo", "--po.monitor"]):
        res = run([*loss, *flags(assets, tmp_path / "out", extra=["--ds.ring_attn_size", "2"])], tmp_path,
                  check=False)
        err = res.stdout + res.stderr
        assert res.returncode != 0 and "do not support ring attention (--ds.ring_attn_size 2" in err, err[-2000:]
        assert "Traceback" not in err


def test_two_processes_agree_with_one(assets, tmp_path):
    # one pair per micro-batch, so both layouts see the same pairs per optimizer step and the same score norms
    run(["--loss", "dpo", "--po.monitor", *flags(assets, tmp_path / "one", micro=1, batch=4)], tmp_path)
    run(["--loss", "dpo", "--po.monitor", *flags(assets, tmp_path / "two", micro=1, batch=4)], tmp_path, nproc=2)
    one, two = trace(tmp_path / "one"), trace(tmp_path / "two")
    assert len(one) == len(two) == 4
    for a, b in zip(one, two):
        for k in ("z_w", "z_l", "r_w", "r_l", "d_w", "d_l", "log_r", "log_r_star", "rho", "loss"):
            # bf16 weights: summing gradients in another order rounds differently after the first update
            assert a[k] == pytest.approx(b[k], rel=1e-2, abs=1e-2), (k, a[k], b[k])
    run(["--loss", "rc_dpo", *flags(assets, tmp_path / "rc2", stage=2)], tmp_path, nproc=2)
    assert all(r["alpha_rank_spread"] == 0.0 for r in trace(tmp_path / "rc2"))


def test_lora_with_gradient_accumulation(assets, tmp_path):
    run(["--loss", "rc_dpo", *flags(assets, tmp_path / "out", micro=1, batch=4,
                                     extra=["--ds.lora.rank", "4", "--ds.lora.alpha", "8"])], tmp_path)
    rec = trace(tmp_path / "out")
    assert len(rec) == 4 and all(r["sw_norm"] > 0 and r["sl_norm"] > 0 for r in rec)


def test_bad_inputs_give_one_clear_error(assets, tmp_path):
    res = run(["--loss", "dpoo", *flags(assets, tmp_path / "o")], tmp_path, check=False)
    assert res.returncode != 0 and "unknown loss 'dpoo'" in res.stderr and "rc_dpo" in res.stderr
    res = run(["--loss", "simpo", "--model.ipo_enable", *flags(assets, tmp_path / "o")], tmp_path, check=False)
    assert res.returncode != 0 and "--model.ipo_enable contradicts --loss simpo" in res.stderr
    res = run(["--loss", "simpo", "--po.gama", "1", *flags(assets, tmp_path / "o")], tmp_path, check=False)
    assert res.returncode != 0 and "--po.gama" in res.stderr and "gamma" in res.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "good": "b", "rejected": "c"}\n' * 8)
    res = run(["--loss", "dpo", *flags(assets, tmp_path / "o"), "--data.dataset", bad], tmp_path, check=False)
    assert res.returncode != 0 and "no column 'chosen'" in res.stderr and "--data.chosen_key" in res.stderr
    res = run(["--loss", "madpo", *flags(assets, tmp_path / "o")], tmp_path, check=False)
    assert res.returncode != 0 and "margins" in res.stderr and "--po.margin_key" in res.stderr
    for args, msg in [(["--loss", "rc_dpo", "--po.ema_decay", "1.5"], "ema_decay must be in [0, 1), got 1.5"),
                      (["--loss", "dpo", "--po.alert_steps", "-1"], "--po.alert_steps must be an integer >= 0"),
                      (["--loss", "dpo", "--po.score_every", "0"], "--po.score_every must be an integer >= 1")]:
        res = run([*args, *flags(assets, tmp_path / "o")], tmp_path, check=False)
        assert res.returncode != 0 and msg in res.stderr and "Traceback" not in res.stderr, (args, res.stderr[-2000:])


def test_unsupported_openrlhf_version_is_refused():
    from po_plugins._cpu import apply_cpu_shims

    apply_cpu_shims()
    from po_plugins.hosts.openrlhf import HostError, check_host

    with pytest.raises(HostError, match=r"0\.9\.5 is not supported.*>=0\.10\.2,<0\.12"):
        check_host("0.9.5")
    with pytest.raises(HostError, match="0.12.0"):
        check_host("0.12.0")
    assert check_host()


def test_help_shows_plugin_flags(tmp_path):
    res = run(["--help"], tmp_path, check=False)
    assert "--loss NAME" in res.stdout and "--po.monitor" in res.stdout and "--model.beta" in res.stdout


def test_deepspeed_launcher(assets, tmp_path):
    launcher = Path(sys.executable).parent / "deepspeed"
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="disabled", OMP_NUM_THREADS="1", TORCH_EXTENSIONS_DIR=str(tmp_path / "x"),
               PATH=f"{launcher.parent}{os.pathsep}{env.get('PATH', '')}")
    cmd = [str(launcher), "--num_gpus", "1", "--master_port", str(free_port()), "--module", "po_plugins.cli.train_dpo",
           "--loss", "rc_dpo", *map(str, flags(assets, tmp_path / "out", stage=2))]
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-6000:])
    assert [r["step"] for r in trace(tmp_path / "out")] == [1, 2, 3, 4]


def test_score_every_reuses_the_last_statistics(assets, tmp_path):
    run(["--loss", "rc_dpo", "--po.score_every", "1000", *flags(assets, tmp_path / "out")], tmp_path)
    rec = trace(tmp_path / "out")
    # scored once (the first micro-batch: 2 of step 1's 4 pairs); RC reuses those statistics; the later steps have
    # no scored micro-batch, so their band is null (not a stale copy)
    assert rec[0]["score_pairs"] == 2 and rec[0]["sw_norm"] > 0 and rec[0]["in_band"] in (0.0, 1.0)
    assert all(r["score_pairs"] == 0 and r["sw_norm"] is None and r["in_band"] is None for r in rec[1:])
    assert all(r["alpha"] != 1.0 for r in rec[1:])  # RC calibrates on the reused statistics
    run(["--loss", "rc_dpo", *flags(assets, tmp_path / "every")], tmp_path)
    every = trace(tmp_path / "every")
    assert len({r["sw_norm"] for r in every}) == 4 and all(r["score_pairs"] == 4 for r in every)
    # default --po.recheck_every 10: the exact per-pair deltas are null on steps 1-4, the keys still present
    assert all("chosen_up_frac" in r and r["chosen_up_frac"] is None for r in every)


def _quick_benchmark(script: str) -> dict:
    """`benchmarks/<script> --quick` in a fresh process: its last output line, one JSON object."""
    import subprocess
    import sys as _sys

    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([_sys.executable, str(root / "benchmarks" / script), "--quick"], cwd=root,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_overhead_benchmark_quick_prints_json_last(tmp_path):
    out = _quick_benchmark("overhead.py")
    for k in ("step_time_ratio", "peak_mem_ratio", "autograd_step_time_ratio", "monitor_step_time_ratio"):
        assert out[k] > 0, k


def test_benchmarks_time_whole_optimizer_steps():
    """OpenRLHF calls optimizer_step after every micro-batch; a step is the time between the accumulation
    boundaries (every `accum`-th call), both micro-batches included."""
    import sys as _sys

    _sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.overhead import step_times

    # micro-batch 1 ends at 1.0, the step (micro-batch 2 + optimizer) at 1.5; then 1.7 / 2.4, 2.6 / 3.1
    assert step_times([1.0, 1.5, 1.7, 2.4, 2.6, 3.1], 2) == pytest.approx([0.9, 0.7])
    assert step_times([1.0, 2.0, 4.0], 1) == pytest.approx([1.0, 2.0])


def test_hosts_benchmark_quick_prints_json_last(tmp_path):
    out = _quick_benchmark("hosts.py")
    for k in ("trl_plugin_step_time_ratio", "trl_plugin_peak_mem_ratio", "openrlhf_plugin_step_time_ratio",
              "openrlhf_plugin_peak_mem_ratio"):
        assert out[k] > 0, k


def test_memory_benchmark_quick_prints_json_last(tmp_path):
    shape = _quick_benchmark("memory.py")["shapes"]["quick"]
    for mode in ("rc_dpo_fused", "dpo_fused", "rc_dpo_share", "dpo_share", "rc_dpo_fused_storedref",
                 "rc_dpo_share_storedref"):  # every mode ran, stored reference log-probs made by score_margins
        for k in ("peak_mem", "step_time"):
            assert shape[f"{mode}_{k}_ratio"] > 0, (mode, k)


def test_stored_reference_logps_replace_the_reference_forward(assets, tmp_path):
    rows = [json.loads(x) for x in Path(assets["train"]).read_text().splitlines()]
    data = tmp_path / "with_ref.jsonl"
    # reference log-probs of 0: at step 1 every implicit reward equals the policy log-prob itself
    data.write_text("".join(json.dumps({**r, "rc": 0.0, "rr": 0.0}) + "\n" for r in rows))
    res = run(["--loss", "dpo", "--po.monitor", "--po.ref_logp_keys", "rc,rr",
               *flags(assets, tmp_path / "out", extra=["--data.dataset", data])], tmp_path)
    assert "reference forward skipped" in res.stdout + res.stderr
    first = trace(tmp_path / "out")[0]
    assert first["r_w"] == pytest.approx(first["z_w"]) and first["r_l"] == pytest.approx(first["z_l"])
    res = run(["--loss", "dpo", "--po.ref_logp_keys", "rc", *flags(assets, tmp_path / "o2")], tmp_path, check=False)
    assert res.returncode != 0 and "two columns" in res.stderr


def test_unscored_eval_set_is_evaluated_unweighted(assets, tmp_path):
    rows = [json.loads(x) for x in Path(assets["train"]).read_text().splitlines()]
    data = tmp_path / "scored.jsonl"
    data.write_text("".join(json.dumps({**r, "rm_margin": (i % 5) - 2.0}) + "\n" for i, r in enumerate(rows)))
    res = run(["--loss", "madpo", *flags(assets, tmp_path / "o", extra=[
        "--po.margin_key", "rm_margin", "--data.dataset", data, "--eval.dataset", assets["eval"],
        "--eval.split", "train", "--eval.steps", "2", "--logger.tensorboard_dir", tmp_path / "tb"])], tmp_path)
    out = res.stdout + res.stderr
    assert f"the evaluation dataset ({assets['eval']}) has no column 'rm_margin'" in out
    assert out.count("evaluated unweighted") == 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(next((tmp_path / "tb").iterdir())))
    ea.Reload()
    assert any("eval" in t for t in ea.Tags()["scalars"]), ea.Tags()["scalars"]
    bad = tmp_path / "unscored_train.jsonl"
    bad.write_text(Path(assets["train"]).read_text())
    res = run(["--loss", "madpo", *flags(assets, tmp_path / "o2", extra=[
        "--po.margin_key", "rm_margin", "--data.dataset", bad])], tmp_path, check=False)
    assert res.returncode != 0 and f"the training dataset ({bad}) has no column 'rm_margin'" in res.stderr


# ---- --po.fused_head and --ds.packing_samples ----------------------------------------------------------------------
@pytest.mark.parametrize("loss,stage,extra", [("dpo", 0, []), ("rc_dpo", 2, []), ("simpo", 3, []), ("rc_dpo", 3, []),
                                              ("rc_dpo", 0, ["--ds.lora.rank", "4", "--ds.lora.alpha", "8"])])
def test_fused_head_trains_at_every_zero_stage_and_with_lora(assets, tmp_path, loss, stage, extra):
    res = run(["--loss", loss, "--po.monitor", "--po.fused_head", "--po.head_chunk", "7", "--po.recheck_every", "1",
               *flags(assets, tmp_path / "out", stage=stage, extra=extra)], tmp_path)
    assert "chunked LM head" in res.stdout + res.stderr
    rec = trace(tmp_path / "out")
    assert [r["step"] for r in rec] == [1, 2, 3, 4] and all(r["sw_norm"] > 0 for r in rec)
    for k in KEYS:
        assert all(math.isfinite(float(r[k])) for r in rec if r[k] is not None or k not in NULLABLE), k


def test_fused_head_follows_the_stock_trajectory(assets, tmp_path):
    """--loss dpo --po.fused_head against the stock trainer (bf16 weights, 4 steps, lr 1e-3). With one chunk (the
    default at this size) the head's GEMM is the stock one: per-step losses within rel 1e-5 and the weight update
    within 0.1 % of its size (L2). With 5-token chunks the bf16 logits of a chunk may round differently by an ulp,
    and Adam turns sign noise on near-zero gradients into ±lr steps: losses within rel 1e-3, update within 10 %."""
    lr = ["--adam.lr", "1e-3"]
    run(["openrlhf.cli.train_dpo", *flags(assets, tmp_path / "stock",
                                           extra=["--logger.tensorboard_dir", tmp_path / "tb_stock", *lr])],
        tmp_path, module="po_plugins._cpu.run_stock")
    for name, chunk in (("one", "0"), ("five", "5")):
        run(["--loss", "dpo", "--po.fused_head", "--po.head_chunk", chunk,
             *flags(assets, tmp_path / name, extra=["--logger.tensorboard_dir", tmp_path / f"tb_{name}", *lr])],
            tmp_path)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def losses(d):
        ea = EventAccumulator(str(next(Path(d).iterdir())))
        ea.Reload()
        return [e.value for e in ea.Scalars("train/loss")]

    stock, ws, w0 = losses(tmp_path / "tb_stock"), weights(tmp_path / "stock"), weights(assets["model"])
    assert len(stock) == 4
    update = sum(float(((ws[k].float() - w0[k].float()) ** 2).sum()) for k in ws) ** 0.5
    for name, rel, upd in (("one", 1e-5, 1e-3), ("five", 1e-3, 0.1)):
        assert losses(tmp_path / f"tb_{name}") == pytest.approx(stock, rel=rel), name
        wf = weights(tmp_path / name)
        diff = sum(float(((ws[k].float() - wf[k].float()) ** 2).sum()) for k in ws) ** 0.5
        assert diff <= upd * update, (name, diff / update)


def test_fused_head_under_zero3_matches_the_stock_step(assets, tmp_path):
    """ZeRO-3 shards the head weight: the chunked head calls the head module, whose hooks gather it in the forward
    and in the recomputation, and its gradient reaches the partitioned parameter (the head's final weights follow
    the stock run's)."""
    lr = ["--adam.lr", "1e-3"]
    run(["openrlhf.cli.train_dpo", *flags(assets, tmp_path / "stock", stage=3, extra=lr)], tmp_path,
        module="po_plugins._cpu.run_stock")
    run(["--loss", "dpo", "--po.fused_head", "--po.monitor", *flags(assets, tmp_path / "fused", stage=3, extra=lr)],
        tmp_path)
    w0, ws, wf = weights(assets["model"]), weights(tmp_path / "stock"), weights(tmp_path / "fused")
    head = "lm_head.weight"
    update = (ws[head].float() - w0[head].float()).norm()
    assert update > 0 and (wf[head].float() - ws[head].float()).norm() <= 1e-2 * update
    assert (wf[head].float() - w0[head].float()).norm() > 0.5 * update


def test_packed_sequences_end_to_end(assets, tmp_path):
    """--ds.packing_samples on CPU (sdpa with the block-diagonal packed mask): the first step's log-probs equal the
    unpacked ones; dpo and rc_dpo train packed, with and without the fused head; margins survive packing."""
    base = ["--po.monitor", "--ds.attn_implementation", "sdpa"]
    run(["--loss", "dpo", *base, *flags(assets, tmp_path / "unpacked")], tmp_path)
    run(["--loss", "dpo", *base, "--ds.packing_samples", *flags(assets, tmp_path / "packed")], tmp_path)
    run(["--loss", "rc_dpo", *base, "--ds.packing_samples", "--po.fused_head", *flags(assets, tmp_path / "pf")],
        tmp_path)
    u, p, f = trace(tmp_path / "unpacked"), trace(tmp_path / "packed"), trace(tmp_path / "pf")
    for k in ("z_w", "z_l", "sw_norm", "sl_norm", "sw_dot_sl"):  # bf16 weights: rounding differs, not the maths
        assert p[0][k] == pytest.approx(u[0][k], rel=1e-3), (k, p[0][k], u[0][k])
        assert f[0][k] == pytest.approx(u[0][k], rel=1e-3), (k, f[0][k], u[0][k])
    assert len(p) == len(f) == 4 and len({r["alpha"] for r in f}) > 1
    rows = [json.loads(x) for x in Path(assets["train"]).read_text().splitlines()]
    data = tmp_path / "scored.jsonl"
    data.write_text("".join(json.dumps({**r, "rm_margin": (i % 7) - 3.0}) + "\n" for i, r in enumerate(rows)))
    for name, extra in (("m_unpacked", []), ("m_packed", ["--ds.packing_samples", "--po.fused_head"])):
        run(["--loss", "madpo", *base, "--po.margin_key", "rm_margin", *extra,
             *flags(assets, tmp_path / name, extra=["--data.dataset", data])], tmp_path)
    mu, mp = trace(tmp_path / "m_unpacked"), trace(tmp_path / "m_packed")
    assert [r["w_mean"] for r in mp] == pytest.approx([r["w_mean"] for r in mu], rel=1e-6)
    assert mp[0]["loss"] == pytest.approx(mp[0]["w_mean"] * math.log(2), abs=1e-6)


# ---- --po.share_prompt ---------------------------------------------------------------------------------------------
def _saved(out):
    from safetensors.torch import load_file

    name = "adapter_model.safetensors" if (Path(out) / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(str(Path(out) / name))


def _tb_losses(d):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(next(Path(d).iterdir())))
    ea.Reload()
    return [e.value for e in ea.Scalars("train/loss")]


@pytest.mark.parametrize("stage,extra", [(0, []), (2, ["--ds.packing_samples", "--ds.attn_implementation", "sdpa"]),
                                         (3, ["--ds.attn_implementation", "sdpa",
                                              "--model.gradient_checkpointing_enable"]),
                                         (0, ["--ds.lora.rank", "4", "--ds.lora.alpha", "8"])],
                         ids=["zero0", "zero2-packed", "zero3-checkpointing", "lora"])
def test_share_prompt_trains_the_stock_weights(shared_assets, tmp_path, stage, extra):
    """--loss dpo --po.share_prompt against stock OpenRLHF with the same flags, on pairs whose responses share their
    first tokens (the rejected answer continues the chosen one) behind a shared prompt: each pair is one row, its
    prompt and shared start computed once. bf16 weights, 4 steps: per-step losses within rel 2e-3 or 1e-3 (the first is
    log 2 in both) and the weights within 2 % of the largest move (Adam's eps at 1, so the update follows the gradient
    instead of turning bf16 rounding of near-zero gradients into ±lr steps)."""
    common = ["--adam.eps", "1", "--adam.lr", "1", *extra]
    def args(name):
        return flags(shared_assets, tmp_path / name, stage=stage, epochs=2,
                     extra=[*common, "--logger.tensorboard_dir", tmp_path / f"tb_{name}"])

    run(["openrlhf.cli.train_dpo", *args("stock")], tmp_path, module="po_plugins._cpu.run_stock")
    res = run(["--loss", "dpo", "--po.share_prompt", *args("shared")], tmp_path)
    assert "prompt computed once" in res.stdout + res.stderr
    stock, shared = _tb_losses(tmp_path / "tb_stock"), _tb_losses(tmp_path / "tb_shared")
    assert len(stock) == 4 and stock[0] == pytest.approx(math.log(2), abs=1e-6)
    assert shared == pytest.approx(stock, rel=2e-3, abs=1e-3)
    a, b = _saved(tmp_path / "stock"), _saved(tmp_path / "shared")
    if "--ds.lora.rank" in extra:
        init = {k: torch.zeros_like(v) if "lora_B" in k else v for k, v in a.items()}  # LoRA's B starts at zero
        init = {k: v for k, v in init.items() if "lora_B" in k}
        a, b = {k: a[k] for k in init}, {k: b[k] for k in init}
    else:
        init = weights(shared_assets["model"])
    moved = max(float((a[k].float() - init[k].float()).abs().max()) for k in a)
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert moved > 0 and diff < 0.02 * moved, diff / moved


def test_share_prompt_keeps_rc_and_the_band(shared_assets, tmp_path):
    """rc_dpo + monitor with --po.share_prompt: the first step (same weights) has the stock layout's log-probs, head
    statistics, α and shared-text count; --po.shared_prefix detach composes with it (same tokens detached)."""
    base = ["--loss", "rc_dpo", "--po.monitor", "--po.recheck_every", "1"]
    for name, extra in (("two_rows", []), ("one_row", ["--po.share_prompt"]),
                        ("det_two", ["--po.shared_prefix", "detach"]),
                        ("det_one", ["--po.shared_prefix", "detach", "--po.share_prompt"])):
        run([*base, *extra, *flags(shared_assets, tmp_path / name, micro=4, batch=4)], tmp_path)
    for ref, got in (("two_rows", "one_row"), ("det_two", "det_one")):
        u, p = trace(tmp_path / ref)[0], trace(tmp_path / got)[0]
        for k in ("z_w", "z_l", "sw_norm", "sl_norm", "sw_dot_sl", "alpha", "log_r_star", "shared_frac"):
            assert p[k] == pytest.approx(u[k], rel=2e-3, abs=1e-6), (got, k, p[k], u[k])


@pytest.fixture(scope="module")
def shared_assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("tiny_shared"), n_train=8, n_eval=4, kind="shared")


def test_shared_prefix_detach_through_the_real_command(shared_assets, tmp_path):
    """--po.shared_prefix detach on pairs whose rejected response continues the chosen one: DPO trains the same
    weights as without it (its shared-text gradient cancels), SimPO does not; RC-SimPO's detached statistics are the
    same through the chunked head (--po.fused_head) as through the logits; an interrupted and resumed run repeats
    α and the weights; packed sequences (--ds.packing_samples) detach the same tokens."""
    def args(out, loss, *extra, stage=0):
        return ["--loss", loss, "--po.monitor", *flags(shared_assets, out, stage=stage, micro=4, batch=4, epochs=2,
                                                        extra=list(extra))]

    # Adam's eps at 1: the update follows the gradient's size (with the default 1e-8 a parameter that only shared
    # text reaches, such as an embedding row, moves by the learning rate on keep's rounding-level gradient)
    sgd_like = ["--adam.eps", "1", "--adam.lr", "1"]
    for loss in ("dpo", "simpo"):
        run(args(tmp_path / f"{loss}_keep", loss, *sgd_like), tmp_path)
        res = run(args(tmp_path / f"{loss}_det", loss, "--po.shared_prefix", "detach", *sgd_like), tmp_path)
        assert "shared response prefixes: detach" in res.stdout + res.stderr
        a, b = weights(tmp_path / f"{loss}_keep"), weights(tmp_path / f"{loss}_det")
        init = weights(shared_assets["model"])
        moved = max(float((a[k].float() - init[k].float()).abs().max()) for k in a)
        diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a) / moved
        if loss == "dpo":  # bf16 weights: the summation order's rounding, a fraction of the largest move
            assert diff < 0.02, diff
        else:
            assert diff > 0.1, diff
    # guard: these pairs push their shared text up under SimPO (the chosen response is the shorter), so guard trains
    # keep's weights (up to bf16 rounding), through the logits and through the chunked head
    init = weights(shared_assets["model"])
    for name, extra in (("simpo_guard", []), ("simpo_guard_fused", ["--po.fused_head"])):
        run(args(tmp_path / name, "simpo", "--po.shared_prefix", "guard", *sgd_like, *extra), tmp_path)
        a, b = weights(tmp_path / "simpo_keep"), weights(tmp_path / name)
        moved = max(float((a[k].float() - init[k].float()).abs().max()) for k in a)
        assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) < 0.02 * moved, name
    # the band of the differing tokens: a detached run's scores are not the whole responses'; the shared share of the
    # response tokens is the same number under both
    keep0, det0 = trace(tmp_path / "simpo_keep")[0], trace(tmp_path / "simpo_det")[0]
    assert 0.2 < keep0["shared_frac"] < 0.6 and det0["shared_frac"] == keep0["shared_frac"]
    assert trace(tmp_path / "simpo_det")[0]["sw_norm"] != pytest.approx(trace(tmp_path / "simpo_keep")[0]["sw_norm"],
                                                                        rel=1e-3)

    def resumable(out, *extra):
        return args(out, "rc_simpo", "--po.shared_prefix", "detach", "--ckpt.save_steps", "2", "--ckpt.path",
                    Path(out) / "ckpt", "--ckpt.load_enable", *extra, stage=2)

    run(resumable(tmp_path / "full"), tmp_path)
    run(resumable(tmp_path / "fused", "--po.fused_head"), tmp_path)
    run(resumable(tmp_path / "packed", "--ds.packing_samples", "--ds.attn_implementation", "sdpa"), tmp_path)
    res = run(resumable(tmp_path / "part"), tmp_path, env_extra={"PO_PLUGINS_INTERRUPT_AT_STEP": "2"}, check=False)
    assert res.returncode != 0 and "stopping" in res.stdout + res.stderr
    run(resumable(tmp_path / "part"), tmp_path)
    full, part, fused = trace(tmp_path / "full"), trace(tmp_path / "part"), trace(tmp_path / "fused")
    packed = trace(tmp_path / "packed")
    for k in ("z_w", "z_l", "sw_norm", "sl_norm", "sw_dot_sl", "alpha", "shared_frac"):  # rows compared before packing
        assert packed[0][k] == pytest.approx(full[0][k], rel=2e-3), k
    assert [r["step"] for r in part] == [1, 2, 3, 4]
    assert [r["alpha"] for r in part] == [r["alpha"] for r in full]
    for r, f in zip(full, fused):  # the same model at step 1; later steps follow bf16 trajectories a little apart
        for k in ("sw_norm", "rho", "log_r_star", "alpha"):
            assert f[k] == pytest.approx(r[k], rel=2e-3 if r["step"] == 1 else 3e-2, abs=1e-6), (k, r["step"])
    a, b = weights(tmp_path / "full"), weights(tmp_path / "part")
    for k in a:
        assert (a[k] == b[k]).all(), k


def test_probe_file_is_rescored_and_predicted(assets, tmp_path):
    """--po.probe_file: held-out pairs through OpenRLHF's own dataset code. With the training set's only micro-batch as
    the probe file, the file's probe gives the same measured changes and the same predictions (probe_pred_w/l, every
    re-check step) as the default probe (the first training micro-batch); a missing file is one line."""
    rows = Path(assets["train"]).read_text().splitlines()[:4]
    data = tmp_path / "four.jsonl"
    data.write_text("\n".join(rows) + "\n")
    recs = {}
    for name, extra in (("default", []), ("file", ["--po.probe_file", data])):
        run(["--loss", "rc_dpo", *flags(assets, tmp_path / name, micro=4, batch=4, epochs=3,
                                        extra=["--data.dataset", data, "--po.recheck_every", "1", *extra])], tmp_path)
        recs[name] = trace(tmp_path / name)
    assert len(recs["file"]) == 3
    for a, b in zip(recs["default"], recs["file"]):
        for k in ("probe_delta_z_w", "probe_delta_z_l", "probe_pred_w", "probe_pred_l"):
            assert a[k] is not None and b[k] is not None and math.isfinite(b[k]), (k, a, b)
            assert b[k] == pytest.approx(a[k], rel=2e-2, abs=2e-3), (k, a[k], b[k])
    assert recs["file"][0]["probe_pred_w"] != 0
    res = run(["--loss", "dpo", "--po.monitor", *flags(assets, tmp_path / "bad", extra=[
        "--po.probe_file", tmp_path / "nowhere.jsonl"])], tmp_path, check=False)
    assert res.returncode != 0 and "does not exist (set by --po.probe_file" in res.stderr


def test_band_scope_model_through_the_real_command(assets, tmp_path):
    """--po.band_scope model at ZeRO-2: every step (recheck_every 1) carries the whole-model band of its last
    micro-batch beside the head's closed form on the same pairs; the whole model's score norms hold the head weight's
    (an untied head: its block of the gradient is the closed form). ZeRO-3 is refused at start in one line."""
    out = tmp_path / "scope"
    run(["--loss", "rc_dpo", *flags(assets, out, stage=2, extra=["--po.band_scope", "model", "--po.recheck_every",
                                                                 "1"])], tmp_path)
    meta = json.loads(Path(out, "po_band.jsonl").read_text().splitlines()[0])["meta"]
    rec = trace(out)
    for r in rec:
        assert r["scope_pairs"] == 2 and r["scope_params"] > 0
        for k in ("sw_norm", "sl_norm", "rho", "log_r_star"):
            assert math.isfinite(r[f"scope_model_{k}"]) and math.isfinite(r[f"scope_head_{k}"]), (k, r)
        if not meta["tied_embeddings"]:
            assert r["scope_model_sw_norm"] >= 0.98 * r["scope_head_sw_norm"], r
    res = run(["--loss", "dpo", "--po.monitor", *flags(assets, tmp_path / "z3", stage=3, extra=[
        "--po.band_scope", "model"])], tmp_path, check=False)
    assert res.returncode != 0 and "--po.band_scope model takes the gradient of every parameter" in res.stderr
