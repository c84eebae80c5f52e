"""LLaMA-Factory host (po_plugins.hosts.llamafactory, po_plugins.cli.llamafactory): the real LLaMA-Factory 0.9.5 DPO
stage on CPU with a tiny model. Runs in the .venv-lf environment (`make test-lf`)."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from po_plugins.losses import names
from po_plugins.monitor import JSONL_KEYS, MAYBE_NULL, RECHECK_KEYS


def _losses(log):
    return [r["loss"] for r in log if "loss" in r]


def test_every_objective_trains(assets, lf, tmp_path):
    """Every po_plugins objective (rc_* included) and LLaMA-Factory's own names train two steps from a YAML."""
    failures = []
    for name in [*names(), "sigmoid", "hinge", "ipo", "orpo", "simpo"]:
        out = tmp_path / name
        cfg = lf.base_config(assets, out, pref_loss=name, per_device_train_batch_size=2, max_steps=2, cutoff_len=48,
                             po_recheck_every=0)
        try:
            lf.run_inprocess(cfg)
            losses = _losses(lf.trainer_log(out))
            assert len(losses) == 2 and all(math.isfinite(v) for v in losses), losses
        except Exception as e:  # collect all, report once
            failures.append(f"{name}: {type(e).__name__}: {e}")
        shutil.rmtree(out, ignore_errors=True)
    assert not failures, "\n".join(failures)


def test_sigmoid_matches_stock_and_hinge_bug(assets, lf, tmp_path):
    """pref_loss: sigmoid through the plugin = stock LLaMA-Factory (per-step losses, final weights); stock `hinge`
    trains the sigmoid loss (LLaMA-Factory 0.9.5 calls TRL 0.24's dpo_loss without loss_type), the plugin's `hinge`
    trains the hinge loss."""
    runs = {}
    for loss in ("sigmoid", "hinge"):
        stock = tmp_path / f"stock_{loss}"
        cfg = lf.base_config(assets, stock, pref_loss=loss, max_steps=3)
        p = lf.run_subprocess(["train", lf.write_yaml(tmp_path / f"stock_{loss}.yaml", cfg)], tmp_path, stock=True)
        assert p.returncode == 0, p.stderr[-3000:]
        runs[f"stock_{loss}"] = stock
        plug = tmp_path / f"plugin_{loss}"
        lf.run_inprocess(lf.base_config(assets, plug, pref_loss=loss, max_steps=3))
        runs[f"plugin_{loss}"] = plug
    log = {k: lf.trainer_log(v) for k, v in runs.items()}
    w = {k: lf.weights(v) for k, v in runs.items()}
    # the plugin's sigmoid is stock LLaMA-Factory's sigmoid
    assert _losses(log["plugin_sigmoid"]) == pytest.approx(_losses(log["stock_sigmoid"]), abs=1e-4)
    for k in w["stock_sigmoid"]:
        torch.testing.assert_close(w["plugin_sigmoid"][k], w["stock_sigmoid"][k], rtol=1e-5, atol=1e-6)
    # stock hinge is the sigmoid loss, step by step and in the final weights
    assert _losses(log["stock_hinge"]) == pytest.approx(_losses(log["stock_sigmoid"]), abs=1e-6)
    assert _losses(log["stock_hinge"])[0] == pytest.approx(math.log(2), abs=1e-4)
    for k in w["stock_sigmoid"]:
        torch.testing.assert_close(w["stock_hinge"][k], w["stock_sigmoid"][k])
    # the plugin's hinge is max(0, 1 − βΔ): 1 at the first step (policy = reference), then its own trajectory
    assert _losses(log["plugin_hinge"])[0] == pytest.approx(1.0, abs=1e-4)
    assert any((w["plugin_hinge"][k] - w["stock_hinge"][k]).abs().max() > 1e-6 for k in w["stock_hinge"])


def test_pref_ftx_is_folded_and_matches_stock(assets, lf, tmp_path):
    """pref_ftx (γ·NLL of the chosen response) is folded into the plugin's objective (so the incentives, RC and the
    band include it); the trained step stays stock LLaMA-Factory's: per-step losses and final weights."""
    stock, plug = tmp_path / "stock", tmp_path / "plugin"
    cfg = lf.base_config(assets, stock, pref_loss="sigmoid", max_steps=3, pref_ftx=0.5)
    p = lf.run_subprocess(["train", lf.write_yaml(tmp_path / "stock.yaml", cfg)], tmp_path, stock=True)
    assert p.returncode == 0, p.stderr[-3000:]
    lf.run_inprocess(lf.base_config(assets, plug, pref_loss="sigmoid", max_steps=3, pref_ftx=0.5, po_monitor=True))
    a, b = _losses(lf.trainer_log(stock)), _losses(lf.trainer_log(plug))
    assert len(a) == 3 and b == pytest.approx(a, abs=1e-4)
    lf.run_inprocess(lf.base_config(assets, tmp_path / "no_ftx", pref_loss="sigmoid", max_steps=3))
    assert abs(_losses(lf.trainer_log(tmp_path / "no_ftx"))[0] - a[0]) > 0.1  # the term is there at all
    ws, wp = lf.weights(stock), lf.weights(plug)
    for k in ws:
        torch.testing.assert_close(wp[k], ws[k], rtol=1e-5, atol=1e-6)
    rec = lf.band(plug)
    meta = json.loads((plug / "po_band.jsonl").read_text().splitlines()[0])["meta"]
    assert meta["hparams"]["nll_coef"] == 0.5
    assert rec[0]["d_w"] > rec[0]["d_l"]  # step 1, policy = reference: DPO's d_w = d_l, the NLL adds γ/|y_w|


def test_rc_dpo_monitor_logs_resume(assets, lf, tmp_path):
    """rc_dpo from the command line: α moves, every JSONL key present and finite, po/* in trainer_log.jsonl; the
    report CLI reads the run; resuming from a checkpoint reproduces the α sequence exactly."""
    out = tmp_path / "rc"
    cfg = lf.base_config(assets, out, pref_loss="rc_dpo", max_steps=4, save_strategy="steps", save_steps=2,
                         gradient_accumulation_steps=2, po_recheck_every=2, po_alert_steps=1)
    p = lf.run_subprocess(["train", lf.write_yaml(tmp_path / "rc.yaml", cfg), "learning_rate=2e-3"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    recs = lf.band(out)
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    for r in recs:
        missing = [k for k in JSONL_KEYS if k not in r]
        assert not missing, missing
        for k in JSONL_KEYS:
            if k in RECHECK_KEYS and r["step"] % 2 and not k.startswith("probe_pred"):  # predicted on every step
                assert r[k] is None
            elif k != "loss_name" and not (k in MAYBE_NULL and r[k] is None):
                assert isinstance(r[k], (int, float)) and math.isfinite(r[k]), (k, r[k])
    alphas = [r["alpha"] for r in recs]
    assert len(set(alphas)) == 4 and all(a != 1.0 for a in alphas)
    log = [r for r in lf.trainer_log(out) if "loss" in r]
    assert len(log) == 4 and all("po/alpha" in r and "po/log_r" in r and "po/in_band" in r for r in log)
    assert [r["po/alpha"] for r in log] == pytest.approx(alphas, rel=1e-6)
    assert "[po_plugins] loss rc(dpo" in p.stdout + p.stderr
    assert (out / "checkpoint-2" / "po_plugins_state_rank0.pt").exists()
    # the report CLI works on the run
    from po_plugins.cli.report import main as report_main

    try:
        report_main([str(out), "--out", str(tmp_path / "report")])
    except SystemExit as e:
        assert e.code in (0, None)
    assert (tmp_path / "report" / "index.html").exists()
    # resume from checkpoint-2 in a new output dir: steps 3 and 4 repeat α exactly
    res = tmp_path / "resumed"
    lf.run_inprocess({**cfg, "learning_rate": 2e-3, "output_dir": str(res),
                      "resume_from_checkpoint": str(out / "checkpoint-2")})
    again = lf.band(res)
    assert [r["step"] for r in again] == [3, 4]
    assert [r["alpha"] for r in again] == pytest.approx(alphas[2:], rel=1e-9, abs=0)


def test_nearest_target_is_one_in_band_and_resumes(assets, lf, tmp_path, nearest_alpha_counts):
    """po_rc_target: nearest in the YAML: α is exactly 1 on the steps whose micro-batch was inside its band (shrunk
    to its inner hundredth by po_rc_margin: 0.99; on these pairs step 1 is inside, step 2 is not), on the shrunk
    band's nearest edge otherwise; resuming from a checkpoint repeats α."""
    out = tmp_path / "full"
    cfg = lf.base_config(assets, out, pref_loss="rc_dpo", po_rc_target="nearest", po_rc_margin=0.99, max_steps=6,
                         save_strategy="steps", save_steps=3)
    lf.run_inprocess(cfg)
    recs = lf.band(out)
    assert [r["step"] for r in recs] == list(range(1, 7))
    inside, moved = nearest_alpha_counts(recs, margin=0.99)
    assert inside >= 1 and moved >= 1, (inside, moved)
    res = tmp_path / "resumed"
    lf.run_inprocess({**cfg, "output_dir": str(res), "resume_from_checkpoint": str(out / "checkpoint-3")})
    again = lf.band(res)
    assert [r["step"] for r in again] == [4, 5, 6]
    assert [r["alpha"] for r in again] == [r["alpha"] for r in recs[3:]]


def test_shared_prefix_detach_keeps_dpo_and_resumes(assets, lf, tmp_path):
    """po_shared_prefix: detach on pairs whose rejected response continues the chosen one: the same first loss and,
    for DPO, the same weights as keep (its shared-text gradient cancels); SimPO's weights differ (its incentive ratio
    |y_l|/|y_w| is below 1 on these pairs); resuming a detached RC-SimPO run repeats α."""
    from po_plugins.tiny import shared_pair_rows

    data = tmp_path / "data"
    data.mkdir()
    (data / "shared.json").write_text(json.dumps([{"instruction": r["prompt"], "input": "", "chosen": r["chosen"],
                                                   "rejected": r["rejected"]} for r in shared_pair_rows(8, seed=2)]))
    cols = {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected"}
    (data / "dataset_info.json").write_text(json.dumps({"shared": {"file_name": "shared.json", "ranking": True,
                                                                   "columns": cols}}))
    sgd_like = dict(adam_epsilon=1.0, learning_rate=1.0, max_steps=3, dataset="shared", dataset_dir=str(data))
    for loss in ("sigmoid", "simpo"):
        w = {}
        for mode in ("keep", "detach"):
            out = tmp_path / f"{loss}_{mode}"
            lf.run_inprocess(lf.base_config(assets, out, pref_loss=loss, po_shared_prefix=mode, save_strategy="no",
                                            **sgd_like))
            w[mode] = (lf.weights(out), [r["loss"] for r in lf.trainer_log(out) if "loss" in r])
        (a, la), (b, lb) = w["keep"], w["detach"]
        assert la[0] == pytest.approx(lb[0], rel=1e-6)
        gap = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
        assert (gap < 1e-5) if loss == "sigmoid" else (gap > 1e-3), (loss, gap)
    out = tmp_path / "full"
    cfg = lf.base_config(assets, out, pref_loss="rc_simpo", po_shared_prefix="detach", max_steps=4,
                         save_strategy="steps", save_steps=2, dataset="shared", dataset_dir=str(data))
    lf.run_inprocess(cfg)
    recs = lf.band(out)
    lf.run_inprocess({**cfg, "output_dir": str(tmp_path / "resumed"),
                      "resume_from_checkpoint": str(out / "checkpoint-2")})
    again = lf.band(tmp_path / "resumed")
    assert [r["step"] for r in again] == [3, 4]
    assert [r["alpha"] for r in again] == [r["alpha"] for r in recs[2:]]


def test_shared_prefix_guard_is_keep_or_detach_by_the_pairs_push(assets, lf, tmp_path):
    """po_shared_prefix: guard with SimPO (the head output's gradient gated per pair): where the chosen response is
    the rejected one's start the weights are keep's, with the two exchanged detach's."""
    from po_plugins.tiny import shared_pair_rows

    rows_up = shared_pair_rows(8, seed=2)
    cols = {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected"}
    for name, rows, like in (("up", rows_up, "keep"), ("down", [{**r, "chosen": r["rejected"],
                                                               "rejected": r["chosen"]} for r in rows_up], "detach")):
        data = tmp_path / name
        data.mkdir()
        (data / "d.json").write_text(json.dumps([{"instruction": r["prompt"], "input": "", "chosen": r["chosen"],
                                                   "rejected": r["rejected"]} for r in rows]))
        (data / "dataset_info.json").write_text(json.dumps({"d": {"file_name": "d.json", "ranking": True,
                                                                  "columns": cols}}))
        w = {}
        for mode in (like, "guard"):
            out = tmp_path / f"{name}_{mode}"
            lf.run_inprocess(lf.base_config(assets, out, pref_loss="simpo", po_shared_prefix=mode, dataset="d",
                                            dataset_dir=str(data), adam_epsilon=1.0, learning_rate=1.0, max_steps=2))
            w[mode] = lf.weights(out)
        gap = max(float((w[like][k].float() - w["guard"][k].float()).abs().max()) for k in w[like])
        assert gap < 1e-6, (name, gap)


def test_report_to_backends_get_scalars(assets, lf, tmp_path):
    """The po/* scalars are in the logs every report_to backend receives (Trainer.log's on_log)."""
    from transformers import TrainerCallback

    seen = []

    class Spy(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            seen.append(dict(logs or {}))

    lf.run_inprocess(lf.base_config(assets, tmp_path / "m", pref_loss="dpo", po_monitor=True), callbacks=[Spy()])
    train_logs = [r for r in seen if "loss" in r]
    assert train_logs and all("po/alpha" in r and "po/rho" in r for r in train_logs)


def test_two_processes_zero_alpha_spread(assets, lf, tmp_path):
    """FORCE_TORCHRUN=1: the wrapper launches torchrun on itself; 2 CPU workers (gloo) keep the plugin and agree on
    α at every step."""
    out = tmp_path / "ddp"
    cfg = lf.base_config(assets, out, pref_loss="rc_dpo", max_steps=2, po_recheck_every=1)
    p = lf.run_subprocess(["train", lf.write_yaml(tmp_path / "ddp.yaml", cfg)], tmp_path,
                          env_extra={"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2"})
    assert p.returncode == 0, p.stderr[-3000:]
    assert "launching 2 workers under torchrun" in p.stdout
    recs = lf.band(out)
    assert [r["step"] for r in recs] == [1, 2]
    assert all(r["alpha_rank_spread"] == 0.0 for r in recs)
    assert (lf.trainer_log(out)[-1]["epoch"]) == pytest.approx(0.5)  # 2 steps × 2 pairs × 2 ranks of 16 rows


def test_lora(assets, lf, tmp_path):
    """LoRA: the reference forward is the adapter-off model through the same modules; the hook only sees the
    policy forward."""
    out = tmp_path / "lora"
    lf.run_inprocess(lf.base_config(assets, out, pref_loss="rc_dpo", finetuning_type="lora", lora_rank=4,
                                    lora_target="all", learning_rate=5e-3, max_steps=3, po_recheck_every=1))
    recs = lf.band(out)
    assert len(recs) == 3 and recs[0]["r_w"] == 0.0 and recs[0]["r_l"] == 0.0  # adapter starts as the reference
    assert recs[-1]["r_w"] != 0.0 and len({r["alpha"] for r in recs}) == 3
    assert (out / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("dataset", ["pairs", "pairs_sg"])
def test_weight_column_scales_the_gradient(assets, lf, tmp_path, dataset):
    """A per-row weight column (po_weight_key) reaches the loss: with plain SGD one step moves the weights by
    0 × and 2 × the unweighted step."""
    from safetensors.torch import load_file

    deltas = {}
    for col in ("w0", "w1", "w2"):
        out = tmp_path / f"{dataset}_{col}"
        lf.run_inprocess(lf.base_config(assets, out, dataset=dataset, pref_loss="dpo", po_weight_key=col, max_steps=1,
                                        optim="sgd", learning_rate=1.0, lr_scheduler_type="constant", max_grad_norm=0.0,
                                        weight_decay=0.0, per_device_train_batch_size=4))
        deltas[col] = lf.weights(out)
    w0 = load_file(f"{assets['model']}/model.safetensors")
    moved = False
    for k in w0:
        d1 = deltas["w1"][k] - w0[k]
        torch.testing.assert_close(deltas["w0"][k], w0[k], rtol=0, atol=0)
        torch.testing.assert_close(deltas["w2"][k] - w0[k], 2 * d1, rtol=1e-4, atol=1e-6)
        moved = moved or d1.abs().max() > 0
    assert moved


@pytest.mark.parametrize("dataset", ["pairs", "pairs_sg"])
def test_margin_column_reaches_the_loss_row_by_row(assets, lf, tmp_path, dataset):
    """MADPO with the margin column declared in dataset_info.json (alpaca and sharegpt): at the first step (policy =
    reference, every pair's DPO loss is log 2) the loss is the batch mean of w(ĥ_i)·log 2 over its own rows."""
    from po_plugins.madpo import margin_weights

    out = tmp_path / dataset
    lf.run_inprocess(lf.base_config(assets, out, dataset=dataset, pref_loss="madpo", max_steps=2,
                                    per_device_train_batch_size=4, po_monitor=True, po_recheck_every=0))
    margins = torch.tensor([r["rm_margin"] for r in assets["rows"]])
    w = margin_weights(margins).double()
    recs = lf.band(out)
    for r, rows in zip(recs, (slice(0, 4), slice(4, 8))):
        assert r["w_mean"] == pytest.approx(float(w[rows].mean()), rel=1e-5)
        assert r["w_min"] == pytest.approx(float(w[rows].min()), rel=1e-5)
    assert recs[0]["loss"] == pytest.approx(float(w[:4].mean()) * math.log(2), rel=1e-5)


# ---- bad inputs: one clear error each, naming the fix ----------------------------------------------------------
def _error(lf, assets, tmp_path, capsys=None, **kw):
    from po_plugins.cli.llamafactory import main

    path = lf.write_yaml(tmp_path / "bad.yaml", lf.base_config(assets, tmp_path / "bad", **kw))
    with pytest.raises(SystemExit) as e:
        main(["train", str(path)])
    return str(e.value)


def test_unknown_loss(assets, lf, tmp_path):
    msg = _error(lf, assets, tmp_path, pref_loss="rc_dpoo")
    assert "unknown pref_loss 'rc_dpoo'" in msg and "rc_dpo" in msg and "sigmoid" in msg


def test_unknown_po_key(assets, lf, tmp_path):
    msg = _error(lf, assets, tmp_path, pref_loss="rc_dpo", po_monitr=True)
    assert "unknown key 'po_monitr'" in msg and "po_monitor" in msg


def test_unknown_hyperparameter(assets, lf, tmp_path):
    msg = _error(lf, assets, tmp_path, pref_loss="simpo", po_c_max=2.0)
    assert "po_c_max" in msg and "po_gamma" in msg


def test_missing_margin_column(assets, lf, tmp_path):
    msg = _error(lf, assets, tmp_path, pref_loss="madpo", dataset="pairs_plain")
    assert "needs" in msg and "margin" in msg and "dataset_info.json" in msg and "po_margin_key" in msg
    msg = _error(lf, assets, tmp_path, pref_loss="madpo", dataset="pairs_plain", po_margin_key="reward")
    assert "has no column 'reward'" in msg and "po_missing_margin: unit" in msg
    msg = _error(lf, assets, tmp_path, pref_loss="madpo", dataset="pairs_badmargin")
    assert "columns.margin: 'reward_margin'" in msg and "rm_margin" in msg


def test_unsupported_version(monkeypatch, assets, lf, tmp_path):
    from po_plugins.hosts import llamafactory as host

    with pytest.raises(host.HostError) as e:
        host.check_host("0.9.4")
    assert "0.9.4 is not supported" in str(e.value) and "pip install 'po-plugins[llamafactory]'" in str(e.value)
    monkeypatch.setattr(host, "host_version", lambda: "0.10.0")
    msg = _error(lf, assets, tmp_path, pref_loss="rc_dpo")
    assert "LLaMA-Factory 0.10.0 is not supported" in msg and "po-plugins[llamafactory]" in msg


def test_example_config_trains(assets, lf, tmp_path):
    """examples/llamafactory/rc_dpo.yaml and its dataset_info.json (alpaca and sharegpt, margins declared) train, with
    only the model, template and run length swapped for the tiny ones."""
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[2]
    cfg = yaml.safe_load((root / "examples/llamafactory/rc_dpo.yaml").read_text())
    for dataset in ("pairs_scored", "pairs_scored_sharegpt"):
        out = tmp_path / dataset
        cfg.update(model_name_or_path=assets["model"], trust_remote_code=False, template="empty", bf16=False,
                   dataset=dataset, dataset_dir=str(root / "examples/llamafactory/data"), output_dir=str(out),
                   max_steps=1, per_device_train_batch_size=1, gradient_accumulation_steps=1, report_to="none",
                   preprocessing_num_workers=None, cutoff_len=64, plot_loss=False, save_steps=0,
                   save_strategy="no")
        lf.run_inprocess(cfg)
        rec = lf.band(out)[0]
        assert rec["loss_name"] == "rc_madpo" and rec["w_mean"] > 0


def test_alert(assets, lf, tmp_path, capsys):
    """The out-of-band alert reaches the console: ORPO's chosen incentive (its NLL term) dwarfs the rejected one."""
    out = tmp_path / "orpo"
    lf.run_inprocess(lf.base_config(assets, out, pref_loss="orpo", po_monitor=True, po_alert_steps=1,
                                    po_recheck_every=0))
    recs = lf.band(out)
    assert recs[0]["in_band"] == 0.0 and recs[0]["edge"] == "upper"  # r far above the band: the rejected rises
    said = capsys.readouterr().out
    assert "out of the disentanglement band" in said and "rejected log-likelihood is predicted to rise" in said
    assert "consider pref_loss: rc_orpo" in said


def test_lf_names_and_po_keys_resolve():
    """LLaMA-Factory's pref_loss names map to the objectives with their definitions; po_<hparam> and po_hparams set
    the objective's hyperparameters; options are typed."""
    from llamafactory.hparams import FinetuningArguments

    from po_plugins.hosts.llamafactory import resolve_loss, split_args

    def resolve(pref, po=None, **ft):
        lf_args, cfg = split_args({"stage": "dpo", **(po or {})})
        assert all(not k.startswith("po_") for k in lf_args)
        return resolve_loss(FinetuningArguments(stage="dpo", pref_loss=pref, **ft), cfg)

    assert resolve("sigmoid") == ("dpo", {"beta": 0.1})
    assert resolve("sigmoid", dpo_label_smoothing=0.2) == ("cdpo", {"label_smoothing": 0.2, "beta": 0.1})
    assert resolve("hinge", pref_beta=0.3) == ("hinge", {"beta": 0.3})
    assert resolve("ipo") == ("ipo", {"length_normalize": True, "beta": 0.1})
    assert resolve("orpo", pref_beta=0.2) == ("orpo", {"lam": 0.2})
    assert resolve("simpo", pref_beta=2.0, simpo_gamma=0.5) == ("simpo", {"gamma": 0.5, "beta": 2.0})
    assert resolve("rc_simpo", {"po_gamma": "1.5", "po_hparams": {"ema_decay": 0.9}}, pref_beta=2.0) == (
        "rc_simpo", {"gamma": 1.5, "ema_decay": 0.9, "beta": 2.0})
    _, cfg = split_args({"po_monitor": "true", "po_alert_steps": 3, "po_margin_key": "rm_margin"})
    assert cfg.opt("monitor") is True and cfg.opt("alert_steps") == 3 and cfg.opt("margin_key") == "rm_margin"
    from po_plugins.options import OptionError

    for bad, text in (({"po_beta": 0.2}, "pref_beta"), ({"po_alert_steps": -1}, "po_alert_steps"),
                      ({"po_hparams": "[1]"}, "po_hparams")):
        with pytest.raises(OptionError, match=text):
            split_args(bad)
    with pytest.raises(OptionError, match="kto_pair"):
        resolve("kto_pair")
    with pytest.raises(OptionError, match="pref_bco_weight"):
        resolve("sigmoid", pref_bco_weight=0.5)


def test_yaml_accepts_exactly_the_llamafactory_options():
    """options_for('llamafactory') is the one list of po_* option keys: each is accepted, every other host's option
    is refused with one line naming the host that has it (po_fused_head: OpenRLHF)."""
    from po_plugins.hosts.llamafactory import split_args
    from po_plugins.options import HOSTS, OPTIONS, OptionError, options_for

    value = {"missing_margin": "unit", "ref_logp_keys": "a,b", "shared_prefix": "detach", "band_scope": "model"}
    for key, (kind, _d, _h) in OPTIONS.items():
        raw = value.get(key, True if kind is bool else 2 if kind is int else -2.0 if kind is float else "col")
        if key in options_for("llamafactory"):
            _, cfg = split_args({f"po_{key}": raw})
            assert cfg.opt(key) == raw
            continue
        with pytest.raises(OptionError) as e:
            split_args({f"po_{key}": raw})
        owners = [HOSTS[h] for h in HOSTS if key in options_for(h)]
        assert f"po_{key} is an option of" in str(e.value) and all(o in str(e.value) for o in owners)
        assert "LLaMA-Factory does not support it" in str(e.value)
    with pytest.raises(OptionError, match=r"po_fused_head is an option of OpenRLHF \(--po.fused_head\) only"):
        split_args({"po_fused_head": True})


def test_an_objective_keeps_its_own_beta_unless_pref_beta_is_set():
    """The same objective trains the same hyperparameters on every host unless the user sets them: rc_simpo
    without pref_beta has SimPO's β = 2.0, as on OpenRLHF and TRL; LLaMA-Factory's own names keep pref_beta."""
    from llamafactory.hparams import FinetuningArguments

    from po_plugins.hosts.llamafactory import resolve_loss, split_args
    from po_plugins.losses import build

    def hp(pref, yaml):
        _, cfg = split_args(yaml)
        name, hp = resolve_loss(FinetuningArguments(stage="dpo", pref_loss=pref,
                                                    **{k: v for k, v in yaml.items() if k == "pref_beta"}), cfg)
        return build(name, **hp).hparams["beta"]

    assert hp("rc_simpo", {}) == 2.0 and hp("rc_simpo", {"pref_beta": 0.1}) == 0.1
    assert hp("simpo", {}) == 0.1 and hp("sigmoid", {}) == 0.1  # LLaMA-Factory's own losses: its pref_beta


def test_tiny_assets_built_in_either_environment_load_in_the_other(tmp_path):
    """po_plugins.tiny builds the same model and tokenizer under transformers 5 (the main venv) and 4.57 (this one),
    and each environment loads the other's with the same token ids, special tokens and chat template."""
    import subprocess
    import sys
    from pathlib import Path

    main_python = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "python"
    assert main_python.exists(), "make test builds .venv before .venv-lf"
    check = ("import sys, json; from transformers import AutoModelForCausalLM, AutoTokenizer; d = sys.argv[1]; "
             "AutoModelForCausalLM.from_pretrained(d); t = AutoTokenizer.from_pretrained(d); "
             "ids = t.apply_chat_template([{'role': 'user', 'content': 'hello world'}], tokenize=True); "
             "ids = ids['input_ids'] if hasattr(ids, 'keys') else ids; "
             "print(json.dumps([t('good <|user|> bad')['input_ids'], list(ids), t.pad_token_id, t.eos_token_id]))")
    build = "import sys; from po_plugins.tiny import make_model; make_model(sys.argv[1])"
    seen = {}
    for name, python in (("main", str(main_python)), ("lf", sys.executable)):
        out = tmp_path / name
        subprocess.run([python, "-c", build, str(out)], check=True, capture_output=True)
        for reader, rpython in (("main", str(main_python)), ("lf", sys.executable)):
            res = subprocess.run([rpython, "-c", check, str(out)], capture_output=True, text=True)
            assert res.returncode == 0, (name, reader, res.stderr[-2000:])
            seen[name, reader] = res.stdout.strip().splitlines()[-1]
    assert len(set(seen.values())) == 1, seen


def test_report_to_tensorboard_carries_the_po_scalars(assets, lf, tmp_path):
    """The shipped example's `report_to: tensorboard` works in this environment: LLaMA-Factory's TensorBoard log of
    an rc_dpo run has the po/* scalars, equal to the band trace's."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    lf.run_inprocess(lf.base_config(assets, out, pref_loss="rc_dpo", max_steps=2, report_to="tensorboard",
                                    logging_dir=str(tmp_path / "tb_logs")))
    events = sorted((tmp_path / "tb_logs").rglob("events.out.tfevents.*"))
    assert events, list((tmp_path / "tb_logs").rglob("*"))
    ea = EventAccumulator(str(events[0].parent))
    ea.Reload()
    assert [e.value for e in ea.Scalars("train/po/alpha")] == pytest.approx([r["alpha"] for r in lf.band(out)])


def test_a_text_margin_is_refused_while_the_data_loads(assets, lf, tmp_path):
    from pathlib import Path

    data = tmp_path / "data"
    data.mkdir()
    rows = json.loads((Path(assets["data"]) / "pairs.json").read_text())[:6]
    rows = [{**r, "rm_margin": "n/a" if i == 2 else str(0.5 * i)} for i, r in enumerate(rows)]
    (data / "pairs_text.json").write_text(json.dumps(rows))
    info = json.loads((Path(assets["data"]) / "dataset_info.json").read_text())["pairs"]
    info = {**info, "file_name": "pairs_text.json", "columns": {**info.get("columns", {}), "margin": "rm_margin"}}
    (data / "dataset_info.json").write_text(json.dumps({"pairs_text": info}))
    msg = _error(lf, assets, tmp_path, pref_loss="madpo", dataset="pairs_text", dataset_dir=str(data))
    assert "row 2 of dataset 'pairs_text.json' has a non-numeric value 'n/a' in 'rm_margin'" in msg, msg


def test_the_run_ends_with_the_summary_line(assets, lf, tmp_path, capsys):
    lf.run_inprocess(lf.base_config(assets, tmp_path / "s", pref_loss="rc_dpo", max_steps=2, po_recheck_every=1))
    lines = [x for x in capsys.readouterr().out.splitlines() if "[po_plugins] end of run" in x]
    assert len(lines) == 1 and "rc_dpo, 2 steps" in lines[0] and "po-plugins report" in lines[0], lines


def test_band_scope_model_and_probe_file_refusal(assets, lf, tmp_path):
    """po_band_scope: model through LLaMA-Factory's own entry: the whole-model band of each re-check step's last
    micro-batch beside the head's closed form on the same pairs; po_probe_file is refused (LLaMA-Factory builds its
    datasets before the trainer) in one line naming the hosts that take it."""
    out = tmp_path / "scope"
    cfg = lf.base_config(assets, out, pref_loss="dpo", max_steps=2, po_monitor=True, po_recheck_every=1,
                         po_band_scope="model")
    p = lf.run_subprocess(["train", lf.write_yaml(tmp_path / "reentrant.yaml", cfg)], tmp_path)
    assert p.returncode != 0 and "LLaMA-Factory: use_reentrant_gc: false" in p.stderr  # its default: at step 1
    cfg["use_reentrant_gc"] = False
    p = lf.run_subprocess(["train", lf.write_yaml(tmp_path / "scope.yaml", cfg)], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    for r in lf.band(out):
        assert r["scope_pairs"] >= 1 and r["scope_params"] > 0
        for k in ("sw_norm", "sl_norm", "rho", "log_r_star"):
            assert math.isfinite(r[f"scope_model_{k}"]) and math.isfinite(r[f"scope_head_{k}"]), (k, r)
    from po_plugins.hosts.llamafactory import split_args
    from po_plugins.options import OptionError

    with pytest.raises(OptionError, match=r"po_probe_file is an option of OpenRLHF .* and TRL .* only"):
        split_args({"po_probe_file": "held.jsonl"})
