"""The TRL host: the real, unmodified TRL 1.16 DPOTrainer (and its own `trl dpo` script through the CLI) on CPU, with a
tiny Llama built offline. In-process trainers for the maths; subprocesses for the CLI, torchrun and resume."""

import importlib.util
import json
import math
import os
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="trl not installed (make test does)")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from po_plugins.errors import DataError  # noqa: E402
from po_plugins.losses import names  # noqa: E402
from po_plugins.monitor import JSONL_KEYS, MAYBE_NULL, RECHECK_KEYS  # noqa: E402
from po_plugins.tiny import make_model, pair_rows, run_module  # noqa: E402

# float32 on CPU; the plugin's loss and TRL's differ only in the order of a few scalar additions
LOSS_TOL = dict(rtol=1e-5, atol=1e-6)
WEIGHT_TOL = dict(rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("trl_tiny") / "model")


def rows(n=16, margins=False, weights=None):
    out = pair_rows(n)
    for i, r in enumerate(out):
        if margins:
            r["rm_margin"] = (i % 7) - 3.0
        if weights is not None:
            r["w"] = weights[i]
    return out


def dataset(rs):
    from datasets import Dataset

    return Dataset.from_list(rs)


def make_trainer(model_dir, out, loss=None, stock=False, data=None, ref=True, peft_config=None, eval_data=None,
                 callbacks=None, **kw):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from po_plugins.trl import PoDPOConfig, PoDPOTrainer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ref_model = AutoModelForCausalLM.from_pretrained(model_dir) if ref else None
    tok = AutoTokenizer.from_pretrained(model_dir)
    cfg = dict(output_dir=str(out), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3,
               learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True, bf16=False, save_strategy="no",
               seed=0, disable_tqdm=True, lr_scheduler_type="constant")
    cfg.update(kw)
    data = dataset(rows()) if data is None else data
    if stock:
        from trl import DPOConfig, DPOTrainer

        return DPOTrainer(model=model, ref_model=ref_model, args=DPOConfig(**cfg), train_dataset=data,
                          eval_dataset=eval_data, processing_class=tok, peft_config=peft_config, callbacks=callbacks)
    return PoDPOTrainer(model=model, ref_model=ref_model, args=PoDPOConfig(po_loss=loss, **cfg), train_dataset=data,
                        eval_dataset=eval_data, processing_class=tok, peft_config=peft_config, callbacks=callbacks)


def losses(tr):
    return [h["loss"] for h in tr.state.log_history if "loss" in h]


def trace(out):
    lines = Path(out, "po_band.jsonl").read_text().splitlines()
    assert json.loads(lines[0]).keys() == {"meta"}
    return [json.loads(x) for x in lines[1:]]


def count_calls(module):
    calls = []
    module.register_forward_hook(lambda *a: calls.append(1))
    return calls


@pytest.mark.parametrize("loss", names())
def test_every_objective_trains_through_the_trainer(model_dir, tmp_path, loss):
    needs_margins = "madpo" in loss
    tr = make_trainer(model_dir, tmp_path / "o", loss, data=dataset(rows(8, margins=needs_margins)), max_steps=2,
                      gradient_accumulation_steps=1, po_margin_key="rm_margin" if needs_margins else None,
                      po_monitor=True, po_recheck_every=1)
    ref_calls = count_calls(tr.ref_model)
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    tr.train()
    ls = losses(tr)
    assert len(ls) == 2 and all(math.isfinite(x) for x in ls), ls
    assert any(not torch.equal(before[k], v) for k, v in tr.model.state_dict().items())
    if tr.po_loss.reference_free:
        assert ref_calls == [], "a reference-free objective ran the reference model"
    else:
        assert len(ref_calls) == 2
    rec = trace(tmp_path / "o")
    assert [r["step"] for r in rec] == [1, 2] and all(r["loss_name"] == loss for r in rec)


# TRL loss_type -> (po_plugins loss, po_hparams, DPOConfig extras) with the same definition
SAME_AS_TRL = {
    "sigmoid": ("dpo", {}, {}),
    "hinge": ("hinge", {}, {}),
    "ipo": ("ipo", {"length_normalize": True}, {}),
    "exo_pair": ("exo", {}, {"label_smoothing": 1e-3}),
    "nca_pair": ("nca", {}, {}),
    "robust": ("robust_dpo", {}, {"label_smoothing": 0.1}),
    "bco_pair": ("bce", {}, {}),
    "sppo_hard": ("sppo_hard", {}, {}),
    "apo_zero": ("apo_zero", {}, {}),
    "apo_down": ("apo_down", {}, {}),
    "discopop": ("discopop", {}, {}),
}


@pytest.mark.parametrize("trl_name", sorted(SAME_AS_TRL))
def test_same_losses_and_weights_as_trl_own_loss(model_dir, tmp_path, trl_name):
    from po_plugins.trl import TRL_NAMES

    name, hp, extra = SAME_AS_TRL[trl_name]
    assert TRL_NAMES[trl_name] == name
    stock = make_trainer(model_dir, tmp_path / "stock", stock=True, loss_type=trl_name, beta=0.5, **extra)
    stock.train()
    mine = make_trainer(model_dir, tmp_path / "mine", name, po_hparams=hp, beta=0.5, **extra)
    assert mine.po_loss.name == name and mine.loss_types == ["sigmoid"]  # TRL's own loss is not what trains
    mine.train()
    torch.testing.assert_close(torch.tensor(losses(mine)), torch.tensor(losses(stock)), **LOSS_TOL)
    a, b = stock.model.state_dict(), mine.model.state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], **WEIGHT_TOL)
    # mapped from TRL's loss_type alone (po_loss unset) when the monitor needs the plugin's path
    mapped = make_trainer(model_dir, tmp_path / "mapped", None, loss_type=trl_name, beta=0.5, po_monitor=True,
                          max_steps=1, **extra)
    assert mapped.po_loss.name == name and mapped.po_loss.hparams.get("length_normalize", True) is True


def test_first_step_is_ln2_and_precomputed_reference_gives_the_same_losses(model_dir, tmp_path):
    live = make_trainer(model_dir, tmp_path / "live", "dpo")
    live.train()
    assert losses(live)[0] == pytest.approx(math.log(2), abs=1e-7)
    pre = make_trainer(model_dir, tmp_path / "pre", "dpo", precompute_ref_log_probs=True)
    ref_calls = count_calls(pre.ref_model)  # the reference ran once per row at init, never during training
    pre.train()
    assert ref_calls == []
    torch.testing.assert_close(torch.tensor(losses(pre)), torch.tensor(losses(live)), **LOSS_TOL)


def test_rc_dpo_alpha_moves_keys_and_tensorboard(model_dir, tmp_path):
    tr = make_trainer(model_dir, tmp_path / "o", "rc_dpo", max_steps=4, report_to=["tensorboard"], po_recheck_every=2)
    tr.train()
    rec = trace(tmp_path / "o")
    assert [r["step"] for r in rec] == [1, 2, 3, 4]
    for r in rec:
        assert set(JSONL_KEYS) <= set(r), set(JSONL_KEYS) - set(r)
        for k in JSONL_KEYS:
            if k in ("loss_name",) or (k in RECHECK_KEYS and r["step"] % 2) or (k in MAYBE_NULL and r[k] is None):
                continue
            assert math.isfinite(float(r[k])), (k, r[k])
    assert len({r["alpha"] for r in rec}) > 1 and all(r["alpha"] != 1.0 for r in rec)
    assert rec[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev = [p for p in (tmp_path / "o").rglob("events.out.tfevents.*")]  # TRL's default logging dir
    ea = EventAccumulator(str(ev[0].parent))
    ea.Reload()
    tags = ea.Tags()["scalars"]
    for k in ("alpha", "log_r", "in_band", "z_w", "rho", "chosen_up_frac"):
        assert f"train/po/{k}" in tags, (k, tags)
    assert [e.value for e in ea.Scalars("train/po/alpha")] == pytest.approx([r["alpha"] for r in rec])


def test_head_statistics_equal_autograd_on_the_head_weight(model_dir, tmp_path):
    """The statistics from TRL's fused forward (backbone hidden state + head weight, no logits) against autograd of
    the mean summed log-probs on lm_head.weight through an ordinary (logits) forward of the same batch."""
    tr = make_trainer(model_dir, tmp_path / "o", "rc_dpo", po_score_chunk=7)
    batch = next(iter(tr.get_train_dataloader()))
    tr.model.train()
    tr.compute_loss(tr.model, batch)
    st = tr.po.last_scores
    model = tr.model
    W = model.get_output_embeddings().weight
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)[:, 1:]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    lp = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    seq = (lp * (labels != -100)).sum(-1)
    zw, zl = seq.chunk(2)
    (sw,) = torch.autograd.grad(zw.mean(), [W], retain_graph=True)
    (sl,) = torch.autograd.grad(zl.mean(), [W])
    torch.testing.assert_close(st.sw_norm, sw.norm(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(st.sl_norm, sl.norm(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(st.sw_dot_sl, (sw * sl).sum(), rtol=1e-4, atol=1e-5)


def test_resume_reproduces_alpha_and_weights(model_dir, tmp_path):
    full = make_trainer(model_dir, tmp_path / "full", "rc_dpo", max_steps=6, save_strategy="steps", save_steps=3)
    full.train()
    import shutil

    (tmp_path / "part").mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-3", tmp_path / "part" / "checkpoint-3")
    part = make_trainer(model_dir, tmp_path / "part", "rc_dpo", max_steps=6, save_strategy="steps", save_steps=3)
    part.train(resume_from_checkpoint=True)
    a, b = trace(tmp_path / "full"), trace(tmp_path / "part")
    assert [r["step"] for r in b] == [4, 5, 6]
    assert [r["alpha"] for r in b] == [r["alpha"] for r in a[3:]]
    sa, sb = full.model.state_dict(), part.model.state_dict()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    # without the plugin state the α sequence would restart: the resumed run really used it
    fresh = make_trainer(model_dir, tmp_path / "fresh", "rc_dpo", max_steps=6)
    os.remove(tmp_path / "part" / "checkpoint-3" / "po_plugins_state_rank0.pt")
    shutil.copytree(tmp_path / "part" / "checkpoint-3", tmp_path / "fresh" / "checkpoint-3")
    fresh.train(resume_from_checkpoint=str(tmp_path / "fresh" / "checkpoint-3"))
    assert [r["alpha"] for r in trace(tmp_path / "fresh")] != [r["alpha"] for r in a[3:]]


def test_nearest_target_is_one_in_band_and_resumes(model_dir, tmp_path, nearest_alpha_counts):
    """po_hparams rc_target nearest: α is exactly 1 on the steps whose micro-batch was inside its band (shrunk to its
    inner tenth by rc_margin 0.9), on the shrunk band's nearest edge otherwise; resuming repeats α, the weights and
    the calibrator's EMAs, which nearest keeps updating."""
    import shutil

    def trainer(out):
        return make_trainer(model_dir, out, "rc_dpo", po_hparams={"rc_target": "nearest", "rc_margin": 0.9},
                            gradient_accumulation_steps=1, max_steps=6, save_strategy="steps", save_steps=3)

    full = trainer(tmp_path / "full")
    full.train()
    (tmp_path / "part").mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-3", tmp_path / "part" / "checkpoint-3")
    part = trainer(tmp_path / "part")
    part.train(resume_from_checkpoint=True)
    a, b = trace(tmp_path / "full"), trace(tmp_path / "part")
    assert [r["step"] for r in b] == [4, 5, 6]
    assert [r["alpha"] for r in b] == [r["alpha"] for r in a[3:]]
    inside, moved = nearest_alpha_counts(a, margin=0.9)
    assert inside >= 1 and moved >= 1, (inside, moved)
    assert part.po_loss.ema == full.po_loss.ema and part.po_loss.ema_n == full.po_loss.ema_n
    assert full.po_loss.last["target"] == "nearest" and full.po_loss.ema_n["sw"] == 6
    sa, sb = full.model.state_dict(), part.model.state_dict()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_lora_uses_the_adapter_off_reference(model_dir, tmp_path):
    from peft import LoraConfig

    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    tr = make_trainer(model_dir, tmp_path / "o", "rc_dpo", ref=False, peft_config=cfg, max_steps=2,
                      learning_rate=5e-2)
    tr.train()
    rec = trace(tmp_path / "o")
    assert len(rec) == 2 and all(r["sw_norm"] > 0 and r["sl_norm"] > 0 for r in rec)
    assert rec[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # adapter off = the base model = the policy at 0
    assert rec[1]["r_w"] != 0.0


def _grads(tr, batch):
    tr.model.zero_grad()
    tr.model.train()
    tr.compute_loss(tr.model, batch).backward()
    return {n: p.grad.clone() for n, p in tr.model.named_parameters() if p.grad is not None}


def test_weight_column_zero_and_two(model_dir, tmp_path):
    """Row weights 0 and 2: the pair of weight 0 contributes no gradient, the pair of weight 2 twice its own."""
    rs = rows(2, weights=[0.0, 2.0])
    tr = make_trainer(model_dir, tmp_path / "w", "dpo", data=dataset(rs), po_weight_key="w", max_steps=1)
    batch = tr.data_collator([tr.train_dataset[0], tr.train_dataset[1]])
    assert batch["po_weight"].tolist() == [0.0, 2.0]
    g = _grads(tr, batch)
    one = make_trainer(model_dir, tmp_path / "one", "dpo", data=dataset(rows(2)), max_steps=1)
    g1 = _grads(one, one.data_collator([one.train_dataset[1]]))  # the second pair alone, weight 1, batch of 1
    for k in g1:  # batch mean: (0·g_0 + 2·g_1)/2 = g_1
        torch.testing.assert_close(g[k], g1[k], rtol=1e-4, atol=1e-7)


def test_margins_travel_with_their_rows_and_madpo_weights(model_dir, tmp_path):
    rs = rows(16, margins=True)
    tr = make_trainer(model_dir, tmp_path / "m", "madpo", data=dataset(rs), po_margin_key="rm_margin", max_steps=2,
                      po_monitor=True)
    by_ids = {tuple(r["prompt_ids"] + r["chosen_ids"]): r["rm_margin"] for r in tr.train_dataset}
    seen = 0
    for batch in tr.get_train_dataloader():  # shuffled: each row's margin must come with that row
        half = batch["input_ids"].shape[0] // 2
        for i in range(half):
            ids = batch["input_ids"][i][batch["attention_mask"][i].bool()].tolist()
            assert batch["po_margin"][i].item() == by_ids[tuple(ids)]
            seen += 1
    assert seen == 16
    tr.train()
    from po_plugins.madpo import margin_weights

    rec = trace(tmp_path / "m")
    w = margin_weights(torch.tensor([r["rm_margin"] for r in rs]))
    assert w.min() <= rec[0]["w_mean"] <= w.max()
    assert rec[0]["loss"] == pytest.approx(rec[0]["w_mean"] * math.log(2), abs=1e-6)  # weights × ln 2 at step 1


def test_unscored_eval_set_is_evaluated_unweighted(model_dir, tmp_path, capsys):
    tr = make_trainer(model_dir, tmp_path / "e", "madpo", data=dataset(rows(8, margins=True)),
                      eval_data=dataset(pair_rows(4, seed=5)), po_margin_key="rm_margin", max_steps=1)
    out = tr.evaluate()
    assert out["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)  # unweighted DPO at the reference
    assert "evaluated unweighted" in capsys.readouterr().out


def test_bad_inputs_give_one_clear_error(model_dir, tmp_path):
    from po_plugins.options import OptionError
    from po_plugins.trl import HostError, PoDPOConfig, check_host

    def cfg(**kw):
        return PoDPOConfig(output_dir=str(tmp_path / "x"), use_cpu=True, bf16=False, **kw)

    for kw, msg in [(dict(po_loss="dpoo"), "unknown loss 'dpoo'.*rc_dpo"),
                    (dict(po_loss="simpo", po_hparams={"gama": 1}), r"po_hparams\['gama'\].*gamma"),
                    (dict(po_loss="rc_dpo", po_hparams={"ema_decay": 1.5}), "ema_decay must be in"),
                    (dict(po_loss="dpo", po_alert_steps=-1), "po_alert_steps must be an integer >= 0"),
                    (dict(po_loss="simpo", loss_type="hinge"), "contradicts po_loss='simpo'.*po_loss='hinge'"),
                    (dict(po_loss="dpo", label_smoothing=0.1), "po_loss='cdpo'"),
                    (dict(po_loss="dpo", po_hparams={"beta": 2}), "DPOConfig.beta"),
                    (dict(loss_type="aot", po_monitor=True), "no po_plugins equivalent")]:
        with pytest.raises(OptionError, match=msg):
            cfg(**kw)
    with pytest.raises(OptionError, match="training dataset has no column 'score'.*po_margin_key"):
        make_trainer(model_dir, tmp_path / "y", "madpo", po_margin_key="score")
    with pytest.raises(OptionError, match="needs reward-model margins.*po_margin_key"):
        make_trainer(model_dir, tmp_path / "y", "madpo")
    rs = rows(4, margins=True)
    rs[2]["rm_margin"] = None
    with pytest.raises(OptionError, match="row 2 of the training dataset.*po_missing_margin='unit'"):
        make_trainer(model_dir, tmp_path / "y", "madpo", data=dataset(rs), po_margin_key="rm_margin")
    with pytest.raises(HostError, match=r"1\.15\.0 is not supported.*>=1\.16,<1\.17.*po-plugins\[trl\]"):
        check_host("1.15.0")


def cli_flags(model_dir, data_dir, out, extra=()):
    return ["--model_name_or_path", model_dir, "--dataset_name", data_dir, "--output_dir", out, "--max_steps", "2",
            "--per_device_train_batch_size", "2", "--use_cpu", "--bf16", "false", "--report_to", "none",
            "--logging_steps", "1", "--save_strategy", "no", "--learning_rate", "1e-2", "--seed", "0",
            "--lr_scheduler_type", "constant", *extra]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("trl_data")
    rs = rows(20, margins=True)
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs[:16]))
    (d / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs[16:]))
    return d


CLI_CASES = [("rc_dpo", ["--po.recheck_every", "1"]), ("rc_simpo", ["--po.gamma", "0.5"]),
             ("rc_madpo", ["--po.margin_key", "rm_margin"])]
CLI_CASES += [(n, ["--po.monitor"] + (["--po.margin_key", "rm_margin"] if n == "madpo" else []))
              for n in names() if not n.startswith("rc_")]


@pytest.mark.parametrize("loss,extra", CLI_CASES)
def test_cli_runs_trl_own_dpo_script(model_dir, data_dir, tmp_path, loss, extra):
    flags = cli_flags(model_dir, data_dir, tmp_path / "o")
    res = run_module("po_plugins.cli.trl_dpo", ["--loss", loss, *extra, *flags], tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    assert (tmp_path / "o" / "model.safetensors").exists()
    rec = trace(tmp_path / "o")
    assert [r["step"] for r in rec] == [1, 2] and rec[0]["loss_name"] == loss
    if loss == "rc_simpo":
        assert "reference forward skipped" in res.stdout
        assert json.loads((tmp_path / "o" / "po_band.jsonl").read_text().splitlines()[0])["meta"]["hparams"][
            "gamma"] == 0.5


def test_cli_yaml_config_and_bad_flags(model_dir, data_dir, tmp_path):
    cfg = tmp_path / "dpo.yaml"
    cfg.write_text("po_loss: rc_ipo\npo_hparams: {length_normalize: true}\npo_alert_steps: 1\nbeta: 0.2\n")
    res = run_module("po_plugins.cli.trl_dpo", ["--config", cfg, *cli_flags(model_dir, data_dir, tmp_path / "o")],
                     tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    meta = json.loads((tmp_path / "o" / "po_band.jsonl").read_text().splitlines()[0])["meta"]
    assert meta["loss"] == "rc_ipo" and meta["hparams"]["length_normalize"] is True and meta["hparams"]["beta"] == 0.2
    for args, msg in [(["--loss", "dpoo"], "unknown loss 'dpoo'"), (["--loss", "rc_dpo", "--po.ema_decay", "1.5"],
                                                                    "ema_decay must be in [0, 1)"),
                      (["--loss", "simpo", "--po.gama", "1"], "unknown flag --po.gama"),
                      (["--loss", "dpo", "--po.alert_steps", "-2"], "--po.alert_steps must be an integer >= 0"),
                      (["--loss", "simpo", "--loss_type", "hinge"], "contradicts po_loss='simpo'")]:
        res = run_module("po_plugins.cli.trl_dpo", [*args, *cli_flags(model_dir, data_dir, tmp_path / "b")], tmp_path)
        assert res.returncode != 0 and msg in res.stderr, (args, res.stderr[-2000:])
        assert "Traceback" not in res.stderr, res.stderr[-2000:]


def test_two_processes_zero_alpha_spread_and_match_one(model_dir, data_dir, tmp_path):
    one = ["--gradient_accumulation_steps", "2", "--per_device_train_batch_size", "1", "--po.monitor"]
    two = ["--gradient_accumulation_steps", "1", "--per_device_train_batch_size", "1", "--po.monitor"]
    for name, extra, nproc in (("one", one, 1), ("two", two, 2)):
        res = run_module("po_plugins.cli.trl_dpo", ["--loss", "dpo", *cli_flags(model_dir, data_dir, tmp_path / name,
                                                                                   extra)], tmp_path, nproc=nproc)
        assert res.returncode == 0, res.stderr[-4000:]
    a, b = trace(tmp_path / "one"), trace(tmp_path / "two")
    assert len(a) == len(b) == 2
    for x, y in zip(a, b):  # the same pairs per optimizer step, one pair per micro-batch
        for k in ("z_w", "z_l", "r_w", "r_l", "d_w", "d_l", "log_r", "log_r_star", "rho", "loss", "sw_norm"):
            assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-5), (k, x[k], y[k])
    res = run_module("po_plugins.cli.trl_dpo", ["--loss", "rc_dpo", *cli_flags(model_dir, data_dir, tmp_path / "rc",
                                                                                  two)], tmp_path, nproc=2)
    assert res.returncode == 0, res.stderr[-4000:]
    rec = trace(tmp_path / "rc")
    assert all(r["alpha_rank_spread"] == 0.0 for r in rec) and len({r["alpha"] for r in rec}) > 1


def test_deepspeed_zero3_through_trl(model_dir, data_dir, tmp_path):
    """ZeRO-3 through TRL's own DeepSpeed integration (one process on CPU: the HF Trainer cannot size a multi-process
    DeepSpeed batch on CPU, stock or not): the sharded head weight is gathered for the statistics, which equal the
    unsharded run's."""
    cfg = tmp_path / "z3.json"
    cfg.write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto",
                               "gradient_accumulation_steps": "auto", "train_batch_size": "auto",
                               "gradient_clipping": "auto", "bf16": {"enabled": False}}))
    plain = ["--loss", "rc_dpo", *cli_flags(model_dir, data_dir, tmp_path / "plain")]
    z3 = ["--loss", "rc_dpo", *cli_flags(model_dir, data_dir, tmp_path / "z3", ["--deepspeed", cfg])]
    z3.remove("--use_cpu")  # DeepSpeed's CPU accelerator takes the process instead
    from po_plugins.tiny import free_port

    one_rank = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                    MASTER_PORT=str(free_port()))  # a launcher's environment, as `deepspeed`/`torchrun` set it
    for args in (plain, z3):
        res = run_module("po_plugins.cli.trl_dpo", args, tmp_path, env_extra=one_rank)
        assert res.returncode == 0, res.stderr[-4000:]
    a, b = trace(tmp_path / "plain"), trace(tmp_path / "z3")
    for k in ("sw_norm", "sl_norm", "sw_dot_sl", "alpha", "z_w", "loss"):
        assert a[0][k] == pytest.approx(b[0][k], rel=1e-4), (k, a[0][k], b[0][k])


def test_one_report_overlays_an_openrlhf_run_and_a_trl_run(model_dir, tmp_path):
    """po_plugins.cli.report reads a TRL run unchanged, next to a run of the real OpenRLHF CLI."""
    if importlib.util.find_spec("openrlhf") is None:
        pytest.skip("openrlhf not installed")
    from po_plugins.cli.report import main
    from po_plugins.tiny import make_pairs

    make_trainer(model_dir, tmp_path / "trl", "rc_dpo", max_steps=3).train()
    data = make_pairs(tmp_path / "pairs.jsonl", n=8)
    res = run_module("po_plugins.cli.train_dpo", [
        "--loss", "rc_dpo", "--model.model_name_or_path", model_dir, "--data.dataset", data, "--data.prompt_key",
        "prompt", "--data.chosen_key", "chosen", "--data.rejected_key", "rejected", "--data.max_len", "64",
        "--train.micro_batch_size", "2", "--train.batch_size", "4", "--train.max_epochs", "1",
        "--ds.attn_implementation", "eager", "--ds.zero_stage", "0", "--adam.lr", "1e-2", "--lr_warmup_ratio", "0",
        "--ckpt.output_dir", tmp_path / "orlhf"], tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    a, b = trace(tmp_path / "orlhf"), trace(tmp_path / "trl")
    assert set(a[0]) == set(b[0])  # the same keys on both hosts
    assert main([str(tmp_path / "orlhf"), str(tmp_path / "trl"), "--out", str(tmp_path / "rep"),
                 "--labels", "openrlhf,trl"]) == 0
    html = (tmp_path / "rep" / "index.html").read_text()
    assert "openrlhf" in html and "trl" in html and list((tmp_path / "rep").glob("*.png"))


def test_margin_column_never_reaches_a_model_forward_with_precomputed_reference(model_dir, tmp_path):
    rs = rows(8, margins=True)
    tr = make_trainer(model_dir, tmp_path / "p", "rc_madpo", data=dataset(rs), po_margin_key="rm_margin",
                      precompute_ref_log_probs=True, max_steps=2, eval_strategy="no")
    seen = []
    for m in (tr.model, tr.ref_model):
        m.register_forward_pre_hook(lambda mod, a, kw: seen.append(set(kw)), with_kwargs=True)
    tr.train()
    tr.evaluate(eval_dataset=dataset(rows(4, margins=True)))  # TRL precomputes this set through the wrapped collator
    assert seen and not any(k.startswith("po_") or k == "rm_margin" for kws in seen for k in kws), seen
    live = make_trainer(model_dir, tmp_path / "l", "rc_madpo", data=dataset(rs), po_margin_key="rm_margin",
                        max_steps=2)
    live.train()
    torch.testing.assert_close(torch.tensor(losses(tr)), torch.tensor(losses(live)), **LOSS_TOL)


def test_score_every_reuses_the_last_statistics(model_dir, tmp_path, monkeypatch):
    from po_plugins.hosts import trl as host

    calls = []
    original = host.PoDPOTrainer._po_scores
    # training micro-batches only (the probe's re-scores for probe_pred_* go through it too, under Plugin.probe_pass)
    monkeypatch.setattr(host.PoDPOTrainer, "_po_scores",
                        lambda self, *a: (self.po.probing or calls.append(1)) and None or original(self, *a))
    tr = make_trainer(model_dir, tmp_path / "s", "rc_dpo", po_score_every=2, max_steps=3)  # 6 micro-batches
    tr.train()
    assert len(calls) == 3
    assert tr.po.loss.ema_n["sw"] == 3 and tr.po.loss.ema_n["dw"] == 6  # each scored micro-batch counted once
    rec = trace(tmp_path / "s")
    assert len(rec) == 3 and all(r["sw_norm"] > 0 for r in rec)


def test_shared_prefix_detach_keeps_dpo_and_resumes(model_dir, tmp_path):
    """po_shared_prefix='detach' on pairs whose rejected response continues the chosen one: the same losses and, for
    DPO, the same weights as 'keep' (its shared-text gradient cancels); SimPO's weights differ; resuming a detached
    RC-SimPO run repeats α and the weights."""
    import shutil

    from po_plugins.tiny import shared_pair_rows

    data = dataset(shared_pair_rows(8, seed=2))
    sgd_like = dict(adam_epsilon=1.0, learning_rate=1.0)  # Adam's step follows the gradient's size (see OpenRLHF's)
    for loss in ("dpo", "simpo"):
        keep = make_trainer(model_dir, tmp_path / f"{loss}_k", loss, data=data, ref=loss == "dpo", **sgd_like)
        keep.train()
        det = make_trainer(model_dir, tmp_path / f"{loss}_d", loss, data=data, ref=loss == "dpo",
                           po_shared_prefix="detach", **sgd_like)
        det.train()
        assert det.po.detach_shared and not keep.po.detach_shared
        torch.testing.assert_close(losses(det)[:1], losses(keep)[:1], **LOSS_TOL)
        sa, sb = keep.model.state_dict(), det.model.state_dict()
        gap = max(float((sa[k] - sb[k]).abs().max()) for k in sa)
        if loss == "dpo":
            assert gap < 1e-5, gap
        else:
            assert gap > 1e-3, gap

    def trainer(out):
        return make_trainer(model_dir, out, "rc_simpo", data=data, ref=False, po_shared_prefix="detach",
                            gradient_accumulation_steps=1, max_steps=4, save_strategy="steps", save_steps=2)

    full = trainer(tmp_path / "full")
    full.train()
    (tmp_path / "part").mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-2", tmp_path / "part" / "checkpoint-2")
    part = trainer(tmp_path / "part")
    part.train(resume_from_checkpoint=True)
    a, b = trace(tmp_path / "full"), trace(tmp_path / "part")
    assert [r["alpha"] for r in b] == [r["alpha"] for r in a[2:]]
    sa, sb = full.model.state_dict(), part.model.state_dict()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_step_band_is_taken_at_the_weights_the_step_used(model_dir, tmp_path):
    """With accumulation the monitor's token pass runs on_pre_optimizer_step, before the weights change: with a
    learning rate that moves the head a lot, the first step's record equals that of one micro-batch of the same 4
    pairs (its own statistics)."""
    recs = {}
    for name, per_device, acc in (("one", 4, 1), ("two", 2, 2)):
        tr = make_trainer(model_dir, tmp_path / name, "dpo", po_monitor=True, per_device_train_batch_size=per_device,
                          gradient_accumulation_steps=acc, max_steps=1, learning_rate=0.5)
        tr.train()
        recs[name] = trace(tmp_path / name)[0]
    for k in ("sw_norm", "sl_norm", "sw_dot_sl", "rho"):
        assert recs["two"][k] == pytest.approx(recs["one"][k], rel=1e-4, abs=1e-6), k


def test_a_tied_head_is_named_in_the_trace_header_and_the_start_line(tmp_path, capsys):
    """Tied input and output embeddings: the band covers the head's use of the weight only; the trace's header
    (`band_params`, `tied_embeddings`) and the start line say so; an untied model's header says false."""
    tied_dir = make_model(tmp_path / "tied", tie_word_embeddings=True)
    for d, tied in ((tied_dir, True), (make_model(tmp_path / "untied"), False)):
        out = tmp_path / f"o_{tied}"
        tr = make_trainer(d, out, "rc_dpo", max_steps=1)
        tr.train()
        meta = json.loads(Path(out, "po_band.jsonl").read_text().splitlines()[0])["meta"]
        assert meta["tied_embeddings"] is tied and meta["band_params"].startswith("lm_head.weight")
        assert meta["lora_head"] is False
        assert ("band scope: the LM head's use of its weight (tied" in tr.po.banner()) is tied


def test_shared_prefix_guard_is_keep_or_detach_by_the_pairs_push(model_dir, tmp_path):
    """po_shared_prefix='guard' with SimPO: where the chosen response is the rejected one's start (the pair pushes
    its shared text up) the weights are keep's; with chosen and rejected exchanged (pushed down) detach's."""
    from po_plugins.tiny import shared_pair_rows

    rows_up = shared_pair_rows(8, seed=2)
    rows_down = [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} for r in rows_up]
    sgd_like = dict(adam_epsilon=1.0, learning_rate=1.0, max_steps=2)
    for rs, like in ((rows_up, "keep"), (rows_down, "detach")):
        w = {}
        for mode in (like, "guard"):
            tr = make_trainer(model_dir, tmp_path / f"{like}_{mode}", "simpo", data=dataset(rs), ref=False,
                              po_shared_prefix=mode, **sgd_like)
            tr.train()
            w[mode] = tr.model.state_dict()
        gap = max(float((w[like][k] - w["guard"][k]).abs().max()) for k in w[like])
        assert gap < 1e-6, (like, gap)


def test_probe_file_is_rescored_and_predicted(model_dir, tmp_path):
    """po_probe_file: held-out pairs through TRL's own dataset preparation and collator. With the training set's only
    batch as the probe file, the file's probe gives the default probe's (the first training batch) measured changes
    and predictions on every re-check step; a missing file is one line."""
    two = rows(2)
    path = tmp_path / "two.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in two))
    recs = {}
    for name, extra in (("default", {}), ("file", {"po_probe_file": str(path)})):
        tr = make_trainer(model_dir, tmp_path / name, "rc_dpo", data=dataset(two), max_steps=3,
                          gradient_accumulation_steps=1, po_recheck_every=1, **extra)
        tr.train()
        recs[name] = trace(tmp_path / name)
    for a, b in zip(recs["default"], recs["file"]):
        for k in ("probe_delta_z_w", "probe_delta_z_l", "probe_pred_w", "probe_pred_l"):
            assert a[k] is not None and b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), (k, a[k], b[k])
    assert recs["file"][0]["probe_pred_w"] != 0
    meta = json.loads((tmp_path / "file" / "po_band.jsonl").read_text().splitlines()[0])["meta"]
    assert meta["probe_file"] == str(path.resolve())  # the report labels the probe as held-out pairs
    with pytest.raises(DataError, match=r"the probe file .*nowhere.jsonl does not exist \(set by po_probe_file="):
        make_trainer(model_dir, tmp_path / "bad", "dpo", po_monitor=True, po_probe_file=str(tmp_path / "nowhere.jsonl"))


def test_band_scope_model_through_the_trainer(model_dir, tmp_path):
    """po_band_scope='model': the whole-model band of each re-check step's last micro-batch beside the head's closed
    form on the same pairs (the Plugin's maths: tests/test_band_scope.py)."""
    tr = make_trainer(model_dir, tmp_path / "o", "dpo", max_steps=2, po_monitor=True, po_recheck_every=1,
                      po_band_scope="model")
    tr.train()
    for r in trace(tmp_path / "o"):
        assert r["scope_pairs"] == 2 and r["scope_params"] == sum(p.numel() for p in tr.model.parameters())
        for k in ("sw_norm", "sl_norm", "rho", "log_r_star"):
            assert math.isfinite(r[f"scope_model_{k}"]) and math.isfinite(r[f"scope_head_{k}"]), (k, r)
