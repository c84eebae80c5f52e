"""The end-of-run summary: one line when training ends, on every host (LLaMA-Factory: tests/llamafactory), with the
steps in band, the edge crossed most, the alert and the alarm with their steps, the probe pairs' change since the
start, where the trace is and the report command."""

import json
from pathlib import Path

import torch

from po_plugins.losses import PairBatch, build
from po_plugins.monitor import BandMonitor, loss_step
from po_plugins.scores import ScoreStats, Tokens
from po_plugins.tiny import make_assets, make_model, pair_rows, run_module


def test_summary_counts_what_the_trace_says(tmp_path):
    said = []
    fall = {}
    mon = BandMonitor(build("dpo"), str(tmp_path / "run" / "po_band.jsonl"), alert_steps=2, recheck_every=1,
                      rescore=lambda inp: (inp[0].detach().double() + fall["d"], inp[1].detach().double() - 2.0),
                      log=said.append)
    for step, stats in enumerate([(1.0, 3.0, 2.9), (1.0, 3.0, 2.9), (2.0, 2.0, 0.5)], start=1):
        fall["d"] = -1.5 * step
        g = torch.Generator().manual_seed(step)
        zw, zl = -10 - torch.rand(4, generator=g), -11 - torch.rand(4, generator=g)
        st = ScoreStats(*(torch.tensor(x) for x in stats))
        b = PairBatch(zw.requires_grad_(), zl.requires_grad_(), torch.full((4,), -10.5), torch.full((4,), -10.5),
                      score_stats=st)
        loss_step(mon.loss, b, mon, training=True, recheck_inputs=(b.policy_chosen, b.policy_rejected),
                  tokens=Tokens(None, None, None, None, 4, st))
        mon.end_step(step)
    rec = [json.loads(x) for x in (tmp_path / "run" / "po_band.jsonl").read_text().splitlines()[1:]]
    line = mon.summary()
    n_in = sum(r["in_band"] for r in rec)
    assert f"in band {int(n_in)}/3 steps" in line and "lower edge crossed most (2 steps)" in line, (line, rec)
    assert "alert at step 2" in line and "displacement alarm at step 2" in line
    assert f"chosen {rec[-1]['probe_delta_z_w']:+.3g}" in line and "rejected -2 nats" in line
    assert f"report: po-plugins report {tmp_path / 'run'}" in line and "\n" not in line


def test_openrlhf_prints_the_summary_when_training_ends(tmp_path):
    assets = make_assets(tmp_path / "a", n_train=8, n_eval=2)
    out = tmp_path / "o"
    res = run_module("po_plugins.cli.train_dpo", [
        "--loss", "rc_dpo", "--model.model_name_or_path", assets["model"], "--data.dataset", assets["train"],
        "--data.prompt_key", "prompt", "--data.chosen_key", "chosen", "--data.rejected_key", "rejected",
        "--data.max_len", "64", "--train.micro_batch_size", "2", "--train.batch_size", "4", "--train.max_epochs", "1",
        "--ds.attn_implementation", "eager", "--ds.zero_stage", "0", "--ds.param_dtype", "bf16", "--adam.lr", "1e-3",
        "--lr_warmup_ratio", "0", "--po.recheck_every", "1", "--ckpt.output_dir", str(out)], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [x for x in (res.stdout + res.stderr).splitlines() if "[po_plugins] end of run" in x]
    assert len(lines) == 1 and "rc_dpo, 2 steps" in lines[0] and f"trace {out / 'po_band.jsonl'}" in lines[0], lines


def test_trl_prints_the_summary_when_training_ends(tmp_path, capsys):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from po_plugins.trl import PoDPOConfig, PoDPOTrainer

    model_dir = make_model(tmp_path / "model")
    args = PoDPOConfig(output_dir=str(tmp_path / "o"), po_loss="rc_dpo", use_cpu=True, bf16=False, report_to=[],
                       max_steps=2, per_device_train_batch_size=2, save_strategy="no", po_recheck_every=1)
    PoDPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), args=args,
                 train_dataset=Dataset.from_list(pair_rows(8)),
                 processing_class=AutoTokenizer.from_pretrained(model_dir)).train()
    lines = [x for x in capsys.readouterr().out.splitlines() if "[po_plugins] end of run" in x]
    assert len(lines) == 1 and "rc_dpo, 2 steps" in lines[0] and "probe pairs since the start" in lines[0]
    assert Path(tmp_path / "o" / "po_band.jsonl").exists()
