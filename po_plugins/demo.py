"""`make demo`: why calibration matters, on a real OpenRLHF DPO run. Offline; under a minute on two CPU cores.

    po-plugins demo [--out runs/demo] [--seed 0] [--pairs 64] [--epochs 2]     (or: python -m po_plugins.demo ...)

A tiny Llama is built locally (po_plugins.tiny) with preference pairs whose chosen and rejected answers share text
and differ in length (`kind="shared"`: the rejected answer is the chosen one continued by two more sentences). Such
pairs have aligned head scores (ρ well above 0) and a larger rejected score (r* > 1), so DPO's incentive ratio r = 1
lies below the disentanglement band: the monitor's out-of-band alert fires and the chosen log-likelihood falls with
the rejected continuation. `--loss rc_dpo` trains the same pairs from the same model with r calibrated into the
band and keeps the chosen log-likelihood from falling. Both runs are the real `openrlhf.cli.train_dpo` through
`po_plugins.cli.train_dpo`; then the band report. One line per run: the in-band fraction of the optimizer steps,
whether the alert fired, and the change of the held-out pairs' summed chosen (and rejected) response log-probs
between the initial model and the model the run saved (the same pairs scored by both). That measurement is also
written to the run directory, `<out>/<loss>/po_heldout.json` (po_plugins.report.write_heldout), where the report
shows it, labelled "held-out pairs (N pairs)", with the numbers of this line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from po_plugins.cli._common import user_errors
from po_plugins.errors import PoError
from po_plugins.tiny import run_module

ALERT = "out of the disentanglement band"
# the demo's schedule; tests/test_demo.py runs a shorter one through the same function
DEFAULTS = {"pairs": 64, "epochs": 2, "lr": 5e-3, "beta": 0.1, "alert_steps": 3, "n_eval": 16}


def run_cli(loss: str, assets: dict, out: Path, extra: list[str] | None = None, lr: float = DEFAULTS["lr"],
            beta: float = DEFAULTS["beta"], alert_steps: int = DEFAULTS["alert_steps"], seed: int = 42) -> Path:
    run_dir = out / loss
    cmd = ["--loss", loss,
           "--model.model_name_or_path", str(assets["model"]), "--data.dataset", str(assets["train"]),
           "--eval.dataset", str(assets["eval"]), "--eval.split", "train",
           "--data.prompt_key", "prompt", "--data.chosen_key", "chosen", "--data.rejected_key", "rejected",
           "--data.max_len", "96", "--train.micro_batch_size", "4", "--train.batch_size", "8",
           "--train.seed", str(seed),
           "--ds.attn_implementation", "eager", "--ds.zero_stage", "2", "--ds.param_dtype", "bf16",
           "--adam.lr", str(lr), "--lr_warmup_ratio", "0", "--model.beta", str(beta),
           "--po.monitor", "--po.alert_steps", str(alert_steps), "--po.recheck_every", "1",
           "--ckpt.output_dir", str(run_dir), "--logger.tensorboard_dir", str(out / "tensorboard"),
           "--logger.wandb.run_name", loss, *(extra or [])]
    print(f"[demo] po_plugins.cli.train_dpo --loss {loss} ... --ckpt.output_dir {run_dir}", flush=True)
    res = run_module("po_plugins.cli.train_dpo", cmd, out, timeout=3600)
    log = out / f"{loss}.log"
    log.write_text(res.stdout + res.stderr)
    rc = res.returncode
    if rc != 0:
        sys.stderr.write(log.read_text()[-4000:])
        raise PoError(f"the demo's {loss} run failed (exit {rc}); full log: {log}")
    return run_dir


def response_logps(model_dir, rows: list[dict], max_len: int = 96):
    """Summed log-probs of each row's chosen and rejected response under the HF model saved in `model_dir`, with
    OpenRLHF's DPO formatting (prompt + response + " " + eos, no chat template; response tokens = those after the
    prompt's). Returns two float64 tensors [len(rows)]."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32,
                                                 attn_implementation="eager").eval()

    def score(prompt: str, response: str) -> float:
        _, n_prompt, lp = token_logps(model, tok, prompt, response, max_len)
        return float(lp[n_prompt - 1:].sum())

    zw = torch.tensor([score(r["prompt"], r["chosen"]) for r in rows], dtype=torch.float64)
    zl = torch.tensor([score(r["prompt"], r["rejected"]) for r in rows], dtype=torch.float64)
    return zw, zl


def token_logps(model, tok, prompt: str, response: str, max_len: int = 96):
    """(token ids, prompt tokens, per-token log-probs [len(ids) − 1] in float64) of `prompt + response` with
    OpenRLHF's DPO formatting (response + " " + eos, no chat template), no grad; lp[t] is the log-prob of ids[t + 1]."""
    import torch

    text = (prompt + response).rstrip("\n")
    if not text.endswith(tok.eos_token):
        text += " " + tok.eos_token
    ids = tok(text, add_special_tokens=False, truncation=True, max_length=max_len).input_ids
    ids[-1] = tok.eos_token_id
    n_prompt = len(tok(prompt, add_special_tokens=False).input_ids)
    x = torch.tensor([ids])
    with torch.no_grad():
        lp = torch.log_softmax(model(x).logits[0, :-1].double(), -1).gather(-1, x[0, 1:, None])[:, 0]
    return ids, n_prompt, lp


def read_rows(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def outcome(run_dir: Path, assets: dict, log_text: str) -> dict:
    """What the demo reports for one run: the band verdicts of the trace and the held-out pairs' log-prob change
    from the initial model to the run's saved model (same pairs), with the monitor's exact per-step re-checks and its
    probe batch (the first training micro-batch re-scored: its chosen change since the start, last value)."""
    from po_plugins.report import load_trace

    trace = load_trace(run_dir / "po_band.jsonl")
    rows = read_rows(assets["eval"])
    zw0, zl0 = response_logps(assets["model"], rows)
    zw1, zl1 = response_logps(run_dir, rows)
    dw, dl = zw1 - zw0, zl1 - zl0
    rechecks = [r["step_delta_z_w"] for r in trace if r.get("step_delta_z_w") is not None]
    verdicts = [r["in_band"] for r in trace if r.get("in_band") is not None]
    probe = [r["probe_delta_z_w"] for r in trace if r.get("probe_delta_z_w") is not None]
    alarms = [r["step"] for r in trace if r.get("probe_alarm")]
    return {
        "eval_pairs": len(rows),
        "steps": len(trace),
        "band_steps": len(verdicts),
        "out_of_band": sum(1 for v in verdicts if not v),
        "in_band_frac": sum(verdicts) / max(len(verdicts), 1),
        "alert": ALERT in log_text,
        "eval_delta_z_w": float(dw.mean()),
        "eval_delta_z_l": float(dl.mean()),
        "eval_chosen_down_frac": float((dw < 0).double().mean()),
        "recheck_delta_z_w_sum": float(sum(rechecks)),
        "recheck_chosen_down_steps": sum(1 for v in rechecks if v < 0),
        "probe_delta_z_w": probe[-1] if probe else None,
        "alarm": bool(alarms),  # the measured-displacement alarm (probe pairs' chosen fell past --po.probe_alarm_nats)
        "alarm_step": alarms[0] if alarms else None,
    }


def save_heldout(run_dir: Path, assets: dict, o: dict) -> Path:
    """`<run_dir>/po_heldout.json`: the held-out measurement of `outcome` (the numbers `describe` prints), for the
    report."""
    from po_plugins.report import write_heldout

    return write_heldout(run_dir, pairs=o["eval_pairs"], delta_z_w=o["eval_delta_z_w"],
                         delta_z_l=o["eval_delta_z_l"], chosen_down_frac=o["eval_chosen_down_frac"],
                         measured_by="po_plugins.demo", dataset=str(assets["eval"]),
                         initial_model=str(assets["model"]), final_model=str(run_dir))


def describe(loss: str, o: dict) -> str:
    from po_plugins.report import fmt_nats, fmt_share

    probe = ("" if o["probe_delta_z_w"] is None
             else f"; probe batch (training pairs) chosen {o['probe_delta_z_w']:+.2f}")
    none = "" if o["band_steps"] == o["steps"] else f" ({o['steps'] - o['band_steps']} steps without a verdict)"
    alarm = f"fired at step {o['alarm_step']}" if o["alarm"] else "silent"
    return (f"[demo] {loss:>6}: in band {o['band_steps'] - o['out_of_band']}/{o['band_steps']} steps{none} "
            f"({o['in_band_frac']:.0%}), out-of-band alert {'fired' if o['alert'] else 'silent'}, measured "
            f"displacement alarm {alarm}; held-out chosen "
            f"log-prob {fmt_nats(o['eval_delta_z_w'])} nats (falls on {fmt_share(o['eval_chosen_down_frac'])} of "
            f"{o['eval_pairs']} pairs), rejected {fmt_nats(o['eval_delta_z_l'])}; per-step re-checks: chosen "
            f"{o['recheck_delta_z_w_sum']:+.2f} in all, down on {o['recheck_chosen_down_steps']} steps" + probe)


def run_demo(out, seed: int = 0, pairs: int = DEFAULTS["pairs"], epochs: int = DEFAULTS["epochs"],
             lr: float = DEFAULTS["lr"], beta: float = DEFAULTS["beta"], alert_steps: int = DEFAULTS["alert_steps"],
             n_eval: int = DEFAULTS["n_eval"], losses=("dpo", "rc_dpo"), report: bool = True,
             kind: str = "shared") -> dict:
    """Build the assets under `out` (pairs of `kind`, po_plugins.tiny.make_pairs), train each loss, print and
    return {loss: outcome(...)}."""
    from po_plugins.report import HELDOUT_NAME
    from po_plugins.tiny import make_assets

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    assets = make_assets(out / "assets", n_train=pairs, n_eval=n_eval, seed=seed, kind=kind)
    results, runs = {}, []
    for loss in losses:
        (out / loss / HELDOUT_NAME).unlink(missing_ok=True)  # a failed run leaves no stale measurement behind
        run_dir = run_cli(loss, assets, out, ["--train.max_epochs", str(epochs)], lr=lr, beta=beta,
                          alert_steps=alert_steps, seed=42 + seed)
        runs.append(run_dir)
        results[loss] = outcome(run_dir, assets, (out / f"{loss}.log").read_text())
        save_heldout(run_dir, assets, results[loss])
        print(describe(loss, results[loss]), flush=True)
    if report:
        from po_plugins.cli.report import main as report_main

        rc = report_main([str(r) for r in runs] + ["--out", str(out / "report"), "--labels", ",".join(losses)])
        if rc:
            print(f"[demo] no band report (po-plugins report exited {rc}, see above)", file=sys.stderr)
        else:
            print(f"[demo] band report: {out / 'report' / 'index.html'}")
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="tiny offline OpenRLHF DPO vs RC-DPO run plus its band report")
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--seed", type=int, default=0, help="model and data seed")
    for k in ("pairs", "epochs", "alert_steps", "n_eval"):
        ap.add_argument(f"--{k}", type=int, default=DEFAULTS[k])
    ap.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    ap.add_argument("--beta", type=float, default=DEFAULTS["beta"])
    ap.add_argument("--losses", default="dpo,rc_dpo")
    ap.add_argument("--kind", default="shared", help="pairs: shared (the demo) or sentiment (unrelated answers)")
    ap.add_argument("--no_report", action="store_true")
    ap.add_argument("--json", help="also write the outcomes to this file")
    a = ap.parse_args(argv)
    with user_errors():
        res = run_demo(a.out, a.seed, a.pairs, a.epochs, a.lr, a.beta, a.alert_steps, a.n_eval,
                       tuple(a.losses.split(",")), report=not a.no_report, kind=a.kind)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
