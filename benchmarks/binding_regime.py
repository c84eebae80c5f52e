"""Training where the band binds on a real model: gold-labelled shared-prefix pairs, dpo / rc_dpo / simpo / rc_simpo.

    python benchmarks/binding_regime.py [--quick] [--out runs/binding_regime] [--docs docs] [--seeds 3]

Issue 13, item 2 (training). benchmarks/band_regimes.py found, on SmolLM2-135M-Instruct at the initial model, that
pairs sharing text and differing in length put DPO outside the disentanglement band, while on-policy sample pairs
and unrelated human pairs do not. This experiment builds such pairs the way a practitioner would and labels them
with a gold reward, not by construction, then trains through the real command and asks whether calibration matters.

* Prompts: review prompts ("How was the {topic}?", 5 templates); 12 topics train (60 prompts), 4 other topics are
  held out (20 prompts). Prompts go through SmolLM2's chat template.
* Samples (the model's own, HF generate): per prompt, `samples` responses at T 0.7 of at most 24 new tokens; each is
  continued by the model (T 0.7, no early stop) to 3× its token count. Both versions of a sample are one row of
  `po_plugins.cli.generate`'s format (`samples: [concise, verbose]`).
* Gold labels: `po_plugins.cli.label_pairs --reward fn:binding_regime:vader_gold` (3 × VADER compound, the gold
  reward of experiments 1 and 3), best/worst, ties dropped. The gold prefers the concise version when the
  continuation turns less positive, and the verbose one otherwise.
* Geometry: the band statistics of DPO at the initial model, per batch of 8 labelled pairs (as band_regimes.py),
  for the training pairs and for the two label directions separately; and for the first 8 training batches the
  band of the whole model (scores = autograd gradients over every parameter) next to the head's, with the verdicts
  for DPO and for RC-DPO's target ratio, and the first-order change each batch's step gives the chosen
  log-likelihood of 16 held-out pairs.
* Training set: `train_pairs` of the gold-labelled pairs, drawn at random (seed 0) from all of them, whichever
  version the gold chose; test pairs likewise from the held-out prompts' pairs.
* Token split (issue 21, item 1): each held-out response's Δ log π is split into the tokens the two responses share
  at their start (equal token ids after the prompt: equal contexts, so the same change in both) and the rest.
* Variants: `--losses rc_dpo+shared_prefix=detach+rc_target=nearest` adds `--po.shared_prefix detach
  --po.rc_target nearest` to that run (and to its folder's name); `+probe_file=heldout` gives the monitor the
  first 32 held-out pairs as its probe (`--po.probe_file`: the alarm and probe_pred_* on pairs measured below).
* Training: dpo, rc_dpo, simpo, rc_simpo through po_plugins.cli.train_dpo (real OpenRLHF, ZeRO-2, bf16, monitor on),
  one epoch, micro-batch 4, batch 8, learning rate 5e-5 and the objectives' default β/γ: experiment 2's rate, chosen
  there on validation pairs; nothing is tuned on this experiment's test pairs. Seeds 42, 43, ... (batch order).
* Measured per run: the monitor's in-band fraction; on the held-out pairs, the mean change of the chosen / rejected
  log-likelihood against the initial model, the fraction of chosen responses that rose, preference accuracy (the
  implicit reward, and SimPO's own length-normalised one); and the policy's own samples on the held-out prompts
  (4 per prompt, T 0.7, at most 48 new tokens): mean gold reward and mean length. Means over seeds with 95 %
  t-intervals.

Resumable: generated samples, labels, reference log-probs and every finished run (its `result.json`) are kept in
--out and reused. --quick runs the same code on a tiny random Llama (a minute; exercised by a test).
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
from band_regimes import PROMPTS as TEMPLATES  # noqa: E402  (the prompts and topics of the measurement)
from band_regimes import TOPICS, batch_stats, msg  # noqa: E402
from common import cpu_threads, mean_ci, parser, run_checked, write_jsonl  # noqa: E402

LOSSES = ["dpo", "rc_dpo", "simpo", "rc_simpo"]
FULL = {"topics": TOPICS, "test_topics": 4,
        "samples": 9, "test_samples": 8, "max_new": 24, "train_pairs": 160, "test_pairs": 128,
        "own_samples": 4, "own_max_new": 48, "micro_batch": 4, "batch": 8, "epochs": 1, "max_len": 160, "lr": 5e-5}
QUICK = {"topics": ["movie", "book", "meal", "hotel", "concert", "game", "trip", "class"], "test_topics": 2,
         "samples": 8, "test_samples": 16, "max_new": 8, "train_pairs": 32, "test_pairs": 16,
         "own_samples": 2, "own_max_new": 12, "micro_batch": 4, "batch": 8, "epochs": 1, "max_len": 96, "lr": 5e-3}


# ---- samples ----------------------------------------------------------------------------------------------------
def sample(model, tok, texts: list[str], n: int, temperature: float, new_tokens: int, exact: bool, seed: int,
           batch: int = 32) -> list[list[str]]:
    """`n` samples per text (HF generate, left padding): at most `new_tokens` (or exactly, `exact`, no early stop)."""
    import torch

    tok.padding_side = "left"
    out: list[list[str]] = []
    for i in range(0, len(texts), batch):
        enc = tok(texts[i: i + batch], return_tensors="pt", padding=True, add_special_tokens=False)
        torch.manual_seed(seed + i)
        with torch.no_grad():
            ids = model.generate(**enc, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                                 num_return_sequences=n, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens if exact else 0, pad_token_id=tok.pad_token_id)
        dec = tok.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        out += [dec[j * n:(j + 1) * n] for j in range(len(dec) // n)]
    return out


def shared_prefix_rows(model, tok, prompts: list[str], n: int, max_new: int, seed: int) -> list[dict]:
    """Per prompt `n` concise samples, each with its continuation by the model to 3× its token count."""
    chats = [tok.apply_chat_template(msg("user", p), tokenize=False, add_generation_prompt=True) for p in prompts]
    base = sample(model, tok, chats, n, 0.7, max_new, False, seed)
    items = [(p, c, s.strip() or "I liked it.") for p, c, ss in zip(prompts, chats, base) for s in ss]
    counts = [len(tok(s, add_special_tokens=False)["input_ids"]) for _, _, s in items]
    cont = [""] * len(items)
    for k in sorted(set(counts)):  # one batch per continuation length: 2× the concise sample's tokens, exactly
        idx = [i for i, c in enumerate(counts) if c == k]
        texts = [items[i][1] + items[i][2] for i in idx]
        for i, s in zip(idx, sample(model, tok, texts, 1, 0.7, 2 * k, True, seed + 1000 * k)):
            cont[i] = s[0]
    return [{"prompt": msg("user", p), "samples": [s, (s + c).strip()], "prompt_text": p}
            for (p, _, s), c in zip(items, cont)]


def vader_gold(prompts: list, responses: list[str]) -> list[float]:
    """label_pairs' fn: reward: 3 × VADER compound of the response (the prompt is not used)."""
    from real_assets import vader_reward

    return vader_reward(responses)


def tiny_gold(prompts: list, responses: list[str]) -> list[float]:
    """--quick's gold reward on the tiny tokenizer's words: positive minus negative words, per 10 words."""
    from po_plugins import tiny

    def score(t: str) -> float:
        w = t.lower().replace(".", " ").replace(",", " ").split()
        return 10.0 * (sum(x in tiny.POSITIVE for x in w) - sum(x in tiny.NEGATIVE for x in w)) / max(1, len(w))

    return [score(t) for t in responses]


def label(gen: Path, out: Path, quick: bool, log: Path) -> list[dict]:
    if not out.exists():
        fn = "binding_regime:tiny_gold" if quick else "binding_regime:vader_gold"
        run_checked("po_plugins.cli.label_pairs",
                    ["--input", gen, "--output", out, "--reward", f"fn:{fn}", "--data.apply_chat_template",
                     "--pairing", "best_worst", "--ties", "drop"], Path(__file__).resolve().parent, log)
    return [json.loads(line) for line in out.read_text().splitlines()]


# ---- geometry at the initial model --------------------------------------------------------------------------------
def geometry(model, tok, rows: list[dict], k: int, max_batches: int) -> dict:
    batches = [batch_stats(model, tok, rows[i: i + k]) for i in range(0, len(rows) - k + 1, k)][:max_batches]
    if not batches:
        return {"pairs": len(rows), "batches": 0}
    return {"pairs": len(rows), "batches": len(batches),
            "rho_median": statistics.median(b["rho"] for b in batches),
            "r_star_median": statistics.median(b["r_star"] for b in batches),
            "dpo_in_band_frac": sum(b["dpo_in_band"] for b in batches) / len(batches),
            "edges": sorted({b["edge"] for b in batches if b["edge"]}),
            "tokens_w": statistics.fmean(b["tokens_w"] for b in batches),
            "tokens_l": statistics.fmean(b["tokens_l"] for b in batches)}


def full_geometry(model, tok, rows: list[dict], k: int, max_batches: int, params: list | None = None,
                  heldout: list[dict] | None = None) -> dict:
    """The band of the whole model against the head's, per batch of `k` pairs at the initial model: s_w, s_l as the
    gradients of the batch's mean chosen / rejected log-likelihood with respect to every parameter (autograd), next
    to the head-weight scores the monitor uses. Verdicts for DPO (r = 1) and for RC-DPO's target ratio (r = r* of
    the head, the band's centre at the head level: d_w = √r*, d_l = 1/√r*). `params`: a subset (a test passes the
    untied head weight alone, whose band must equal the head's). `heldout`: pairs whose mean chosen log-likelihood
    gradient g_h gives the first-order change of the held-out chosen likelihood under each batch's step,
    ∝ d_w⟨g_h, s_w⟩ − d_l⟨g_h, s_l⟩, for DPO and for RC-DPO's target ratio."""
    import math

    import torch

    from po_plugins.band import band_stats

    params = params or [p for p in model.parameters() if p.requires_grad]

    def grad_of(batch: list[dict], key: str):
        model.zero_grad(set_to_none=True)
        for r in batch:
            p_ids = tok(tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True),
                        add_special_tokens=False)["input_ids"]
            ids = tok(tok.apply_chat_template(r["prompt"] + r[key], tokenize=False).rstrip("\n"),
                      add_special_tokens=False)["input_ids"]
            x = torch.tensor([ids])
            logits = model(input_ids=x).logits[0, len(p_ids) - 1: len(ids) - 1].float()
            (torch.log_softmax(logits, -1).gather(-1, x[0, len(p_ids):, None]).sum() / len(batch)).backward()
        return torch.cat([p.grad.reshape(-1) for p in params])

    g_h = grad_of(heldout, "chosen") if heldout else None
    out = []
    for i in range(0, min(len(rows) - k + 1, k * max_batches), k):
        batch = rows[i: i + k]
        head = batch_stats(model, tok, batch)
        g_w = grad_of(batch, "chosen")
        g_l = grad_of(batch, "rejected")
        sw, sl, dot = float(g_w.norm()), float(g_l.norm()), float(g_w @ g_l)
        a = math.sqrt(head["r_star"])
        cross = {}
        if g_h is not None:
            hw, hl = float(g_h @ g_w), float(g_h @ g_l)
            cross = {"heldout_dpo_dz_w": hw - hl, "heldout_rc_dz_w": a * hw - hl / a}
        del g_w, g_l
        dpo, rc = band_stats(1.0, 1.0, sw, sl, dot), band_stats(a, 1.0 / a, sw, sl, dot)
        out.append({"head_rho": head["rho"], "head_r_star": head["r_star"], "head_dpo_in_band": head["dpo_in_band"],
                    "full_rho": dpo["rho"], "full_r_star": sl / sw, "full_dpo_in_band": bool(dpo["in_band"]),
                    "full_dpo_edge": dpo["edge"], "full_rc_in_band": bool(rc["in_band"]), "full_rc_edge": rc["edge"],
                    "full_rc_pred_sign_w": rc["pred_sign_w"], "full_dpo_pred_sign_w": dpo["pred_sign_w"], **cross})
    model.zero_grad(set_to_none=True)
    n = len(out)
    return {"batches": n, "per_batch": out,
            "head_rho_median": statistics.median(b["head_rho"] for b in out),
            "full_rho_median": statistics.median(b["full_rho"] for b in out),
            "head_r_star_median": statistics.median(b["head_r_star"] for b in out),
            "full_r_star_median": statistics.median(b["full_r_star"] for b in out),
            "head_dpo_in_band_frac": sum(b["head_dpo_in_band"] for b in out) / n,
            "full_dpo_in_band_frac": sum(b["full_dpo_in_band"] for b in out) / n,
            "full_rc_in_band_frac": sum(b["full_rc_in_band"] for b in out) / n,
            "full_dpo_chosen_falls_frac": sum(b["full_dpo_pred_sign_w"] < 0 for b in out) / n,
            "full_rc_chosen_falls_frac": sum(b["full_rc_pred_sign_w"] < 0 for b in out) / n,
            **({"heldout_pairs": len(heldout),
                "heldout_dpo_chosen_falls_frac": sum(b["heldout_dpo_dz_w"] < 0 for b in out) / n,
                "heldout_rc_chosen_falls_frac": sum(b["heldout_rc_dz_w"] < 0 for b in out) / n} if heldout else {})}


# ---- the policy's own samples -------------------------------------------------------------------------------------
def own_samples(model_dir: Path, tok_dir: Path, prompts: list[str], cfg: dict, quick: bool, gold=None) -> dict:
    """`own_samples` samples per prompt (T 0.7, at most `own_max_new` tokens), scored by `gold(prompts, texts)` (one
    prompt per text; default: this page's gold, VADER or --quick's word count): mean gold reward and length."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(cpu_threads())
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    chats = [tok.apply_chat_template(msg("user", p), tokenize=False, add_generation_prompt=True) for p in prompts]
    texts = [s.strip() for ss in sample(model, tok, chats, cfg["own_samples"], 0.7, cfg["own_max_new"], False, 4242)
             for s in ss]
    per_text = [p for p in prompts for _ in range(cfg["own_samples"])]
    gold = (gold or (tiny_gold if quick else vader_gold))(per_text, texts)
    lens = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
    return {"gold": statistics.fmean(gold), "tokens": statistics.fmean(lens), "n_samples": len(texts),
            "examples": texts[:3]}


def strict(mean_ci: tuple[float, float]) -> list:
    """(mean, half-width) for strict JSON: an interval from one seed is null, not NaN."""
    m, c = mean_ci
    return [m, None if c != c else c]


def train_matrix(losses: list[str], seeds: int, cfg: dict, model_dir: Path, train_file: Path, out: Path,
                 test_pairs: list[dict], ref_test: dict, own, files: dict | None = None, tag: str = "binding_regime"):
    """Train every `loss[+option=value...]` at seeds 42, 43, ... (seed by seed: an interrupted study keeps whole seeds)
    through displacement.train (the real command), and evaluate each run once (its `result.json`, kept): the held-out
    pairs' changes and token split (displacement.metrics), the monitor's trace, and `own(run)`'s own-sample numbers.
    `files`: option values that name a data file ({"heldout": path}: `+probe_file=heldout`)."""
    from displacement import metrics, sequence_logps, trace_summary, train

    results: dict[str, list[dict]] = {loss: [] for loss in losses}
    runs42 = {}
    for seed in range(42, 42 + seeds):
        for loss in losses:
            name, *opts = loss.split("+")
            extra = {k: (files or {}).get(v, v) for k, v in (o.split("=", 1) for o in opts)}
            run = train(name, cfg["lr"], model_dir, train_file, out, cfg, seed=seed, extra=extra)
            res_file = run / "result.json"
            if not res_file.exists():
                res = {**metrics(loss, sequence_logps(run, test_pairs, model_dir), ref_test), **trace_summary(run),
                       **{f"own_{k}": v for k, v in own(run).items()}}
                res_file.write_text(json.dumps(res))
            results[loss].append(json.loads(res_file.read_text()))
            if seed == 42:
                runs42[loss] = run
            print(f"[{tag}] {run.name}: {json.dumps(results[loss][-1])}", flush=True)
    return results, runs42


KEYS = ["in_band_frac", "dz_w", "dz_l", "chosen_up_frac", "acc_implicit", "acc_own", "own_gold", "own_tokens"]
SPLIT_KEYS = ["dz_w_shared", "dz_w_rest", "dz_l_rest"]


def summarise(results: dict[str, list[dict]], initial: dict) -> dict:
    """Per setting, every key's mean over seeds with its 95 % t-interval; prints the two markdown tables."""
    summary = {loss: {k: strict(mean_ci([r[k] for r in rs])) for k in KEYS + SPLIT_KEYS if all(k in r for r in rs)}
               for loss, rs in results.items() if rs}
    print("\n| loss | steps in band | Δ log π(y_w) | Δ log π(y_l) | chosen rose | acc. (implicit) | acc. (own) "
          "| own samples: gold | own samples: tokens |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| initial model | — | — | — | — | — | — | {initial['gold']:+.2f} | {initial['tokens']:.1f} |")
    for loss, s in summary.items():
        cells = [(f"{s[k][0]:+.2f}" if k in ("dz_w", "dz_l", "own_gold", "own_tokens") else f"{s[k][0]:.2f}")
                 + (f" ± {s[k][1]:.2f}" if s[k][1] is not None else "") for k in KEYS]
        print(f"| {loss} | " + " | ".join(cells) + " |")
    print("\n| loss | Δ log π(y_w) | shared start (both responses) | y_w's rest | y_l's rest |")
    print("|---|---|---|---|---|")
    for loss, s in summary.items():
        if all(k in s for k in SPLIT_KEYS):
            print(f"| {loss} | " + " | ".join(f"{s[k][0]:+.2f}" + (f" ± {s[k][1]:.2f}" if s[k][1] is not None else "")
                                              for k in ["dz_w"] + SPLIT_KEYS) + " |")
    print()
    return summary


def main(argv=None) -> int:
    ap = parser(__doc__, "runs/binding_regime")
    ap.add_argument("--seeds", type=int, default=3, help="training seeds per loss (42, 43, ...)")
    ap.add_argument("--losses", default=",".join(LOSSES))
    args = ap.parse_args(argv)
    t0 = time.time()
    import torch
    from displacement import plot, sequence_logps
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(cpu_threads())
    cfg = QUICK if args.quick else FULL
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.quick:
        from po_plugins.tiny import make_model

        model_dir = make_model(out / "model", hidden_size=32, layers=2, heads=4)
    else:
        from real_assets import smollm2

        model_dir = smollm2()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    topics = cfg["topics"]
    split_topics = {"train": topics[: -cfg["test_topics"]], "test": topics[-cfg["test_topics"]:]}
    prompts = {s: [t.format(t=x) for x in ts for t in TEMPLATES] for s, ts in split_topics.items()}

    labelled = {}
    for split, n, seed in (("train", cfg["samples"], 7), ("test", cfg["test_samples"], 8)):
        gen = out / "data" / f"{split}_samples.jsonl"
        if not gen.exists():
            t1 = time.time()
            write_jsonl(shared_prefix_rows(model, tok, prompts[split], n, cfg["max_new"], seed), gen)
            print(f"[binding_regime] generated {split} samples in {time.time() - t1:.0f} s", flush=True)
        labelled[split] = label(gen, out / "data" / f"{split}_labelled.jsonl", args.quick,
                                out / "logs" / f"label_{split}.log")
    pairs = {}
    for split, want in (("train", cfg["train_pairs"]), ("test", cfg["test_pairs"])):
        if len(labelled[split]) < want:
            raise SystemExit(f"only {len(labelled[split])} labelled {split} pairs; {want} needed: raise the samples "
                             "per prompt")
        pairs[split] = random.Random(f"0-{split}").sample(labelled[split], want)

    geo_file = out / "data" / "geometry.json"
    if not geo_file.exists():
        k, mb = cfg["batch"], 16
        geo = {"train": geometry(model, tok, pairs["train"], k, mb),
               "concise_chosen": geometry(model, tok, [r for r in labelled["train"] if r["chosen_sample"] == 0], k,
                                          mb),
               "verbose_chosen": geometry(model, tok, [r for r in labelled["train"] if r["chosen_sample"] == 1], k,
                                          mb)}
        geo_file.write_text(json.dumps(geo, indent=1))
    geo = json.loads(geo_file.read_text())
    full_file = out / "data" / "full_geometry.json"
    if not full_file.exists():
        full_file.write_text(json.dumps(full_geometry(model, tok, pairs["train"], cfg["batch"], 8,
                                                      heldout=pairs["test"][:16]), indent=1))
    geo["full_model"] = json.loads(full_file.read_text())
    for name, g in geo.items():
        print(f"[binding_regime] geometry {name}: {json.dumps(g)}", flush=True)

    ref_file = out / "data" / "reference_logps.json"  # initial model: the SimPO runs' monitor reference, test ref
    if not ref_file.exists():
        ref_file.write_text(json.dumps({"train": sequence_logps(model_dir, pairs["train"], model_dir,
                                                                dtype="bfloat16"),
                                        "test": sequence_logps(model_dir, pairs["test"], model_dir)}))
    ref = json.loads(ref_file.read_text())
    train_rows = [{**{k: r[k] for k in ("prompt", "chosen", "rejected", "chosen_reward", "rejected_reward")},
                   "ref_chosen_logp": w, "ref_rejected_logp": lo}
                  for r, w, lo in zip(pairs["train"], ref["train"]["w"], ref["train"]["l"])]
    train_file = write_jsonl(train_rows, out / "data" / "train.jsonl")
    heldout_file = write_jsonl([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in pairs["test"][:32]],
                               out / "data" / "heldout.jsonl")  # `+probe_file=heldout`: the monitor's probe (32 pairs)
    del model

    base_file = out / "data" / "initial_own.json"
    if not base_file.exists():
        base_file.write_text(json.dumps(own_samples(model_dir, model_dir, prompts["test"], cfg, args.quick)))
    initial = json.loads(base_file.read_text())
    print(f"[binding_regime] initial model's own samples: {json.dumps(initial)}", flush=True)

    losses = args.losses.split(",")
    results, runs42 = train_matrix(losses, args.seeds, cfg, model_dir, train_file, out, pairs["test"], ref["test"],
                                   lambda run: own_samples(run, model_dir, prompts["test"], cfg, args.quick),
                                   {"heldout": str(heldout_file)})
    summary = summarise(results, initial)
    plot_pairs = [p for p in (("dpo", "rc_dpo"), ("simpo", "rc_simpo")) if all(x in runs42 for x in p)]
    img_root = Path(args.docs) if args.docs else out
    png = img_root / "img" / f"binding_regime{'_quick' if args.quick else ''}.png"
    if plot_pairs:
        model_name = "tiny" if args.quick else "SmolLM2-135M-Instruct"
        plot(runs42, png, plot_pairs, f"{model_name}: gold-labelled shared-prefix pairs (seed 42)")
    headline = {"mode": "quick" if args.quick else "full",
                "model": "tiny" if args.quick else "SmolLM2-135M-Instruct", "seeds": args.seeds,
                "n_train": len(train_rows), "n_test": len(pairs["test"]),
                "labelled_train": len(labelled["train"]), "labelled_test": len(labelled["test"]),
                "concise_chosen_frac": {s: sum(r["chosen_sample"] == 0 for r in rows) / len(rows)
                                        for s, rows in (("labelled", labelled["train"]), ("train", pairs["train"]),
                                                        ("test", pairs["test"]))},
                "geometry": geo, "initial_own": {k: initial[k] for k in ("gold", "tokens")},
                "shared_tokens": statistics.fmean(r.get("shared_tokens", 0) for rs in results.values() for r in rs)
                if results else None,
                "summary": summary, "per_seed": {loss: [{k: r[k] for k in KEYS + SPLIT_KEYS if k in r} for r in rs]
                                                 for loss, rs in results.items()},
                "png": str(png) if plot_pairs else None, "seconds": round(time.time() - t0, 1)}
    print(json.dumps(headline))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
