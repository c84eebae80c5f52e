"""Calibration settings trained in two more regimes: one-fact edits and human-rated pairs (issue 21, item 4).

    python benchmarks/regimes.py --regime fact_edit|human [--quick] [--out runs/regimes] [--seeds 3] [--losses ...]

docs/results_binding_regime.md trained every calibration setting where the band binds through shared text. The
recommendation of docs/choosing.md must also hold where the data is different, so the same settings are trained, with
the same schedule and evaluation (benchmarks/binding_regime.py: `train_matrix`, `summarise`), in two other regimes:

* `fact_edit`: one fact changed. "What is the capital of X?" (3 question templates) answered "The capital of X is
  Y." with the right capital (chosen: the gold is the fact) against another country's capital (rejected). At the
  initial model DPO is out of band in 7 of 8 batches (docs/results_band_regimes.md, the edit_fact row). 48 of the 64
  countries train (144 pairs: each template with its own wrong capital), the other 16 are held out (96 test pairs:
  each template with two wrong capitals). The two responses share all but the capital and the full stop.
  Own samples: 4 per held-out question (48 questions), T 0.7, at most 16 new tokens; the gold reward is 1 when the
  sample names the right capital, else 0 (so its mean is the rate of right answers).
* `human`: the human-rated Rotten-Tomatoes pairs of docs/results_displacement.md (benchmarks/displacement.py:
  `make_pairs`, the same 256 training and 128 test pairs; chosen = the higher mean rating of ~20 raters), where DPO
  stays in band. Own samples: 80 for the one prompt, T 0.7, at most 48 new tokens, scored by 3 × VADER compound.

SmolLM2-135M-Instruct, one epoch, micro-batch 4, batch 8, ZeRO-2, bf16, lr 5e-5, the objectives' default β/γ
(nothing tuned on test pairs), seeds 42, 43, ... (batch order). Settings: `loss[+option=value...]`
(`rc_dpo+rc_target=nearest` adds `--po.rc_target nearest`). Resumable: every finished run's `result.json` is kept in
--out/<regime>. --quick: a tiny random Llama (tests/test_regimes.py). The last line printed is one JSON object.
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
from band_regimes import CAPITALS, msg  # noqa: E402
from binding_regime import geometry, own_samples, summarise, train_matrix  # noqa: E402
from common import cpu_threads, parser, write_jsonl  # noqa: E402

QUESTIONS = ["What is the capital of {c}?", "Which city is the capital of {c}?", "Name the capital city of {c}."]
SETTINGS = {"fact_edit": "dpo,rc_dpo,rc_dpo+rc_target=nearest,rc_dpo+shared_prefix=guard,simpo,rc_simpo",
            "human": "dpo,rc_dpo+rc_target=nearest,simpo,rc_simpo,rc_simpo+rc_target=nearest"}
BASE = {"micro_batch": 4, "batch": 8, "epochs": 1, "lr": 5e-5, "own_samples": 4}
FULL = {"fact_edit": {**BASE, "max_len": 64, "own_max_new": 16, "test_countries": 16},
        "human": {**BASE, "max_len": 128, "own_max_new": 48, "own_samples": 80, "train_pairs": 256, "val_pairs": 64,
                  "test_pairs": 128, "min_gap": 1.5, "max_chars": 140}}
QUICK = {"fact_edit": {**FULL["fact_edit"], "lr": 5e-3, "own_samples": 1, "own_max_new": 8},
         "human": {**FULL["human"], "lr": 5e-3, "own_samples": 4, "own_max_new": 12, "train_pairs": 32,
                   "val_pairs": 16, "test_pairs": 16, "max_len": 96}}


def fact_rows(countries: list[tuple[str, str]], wrong_per_question: int, seed: str) -> list[dict]:
    """Per country and question template `wrong_per_question` pairs: the right capital chosen, another country's
    capital (drawn without repeats within the country) rejected."""
    rng = random.Random(seed)
    rows = []
    for country, capital in countries:
        wrongs = rng.sample([c for k, c in CAPITALS if k != country], wrong_per_question * len(QUESTIONS))
        for i, q in enumerate(QUESTIONS):
            for wrong in wrongs[i * wrong_per_question: (i + 1) * wrong_per_question]:
                rows.append({"prompt": msg("user", q.format(c=country)),
                             "chosen": msg("assistant", f"The capital of {country} is {capital}."),
                             "rejected": msg("assistant", f"The capital of {country} is {wrong}."),
                             "capital": capital})
    return rows


def fact_data(cfg: dict) -> tuple[dict, list[str], object]:
    """Train / test pairs over disjoint countries, the held-out questions, and the gold: the right capital named."""
    countries = list(CAPITALS)
    random.Random(0).shuffle(countries)
    train_c, test_c = countries[: -cfg["test_countries"]], countries[-cfg["test_countries"]:]
    pairs = {"train": fact_rows(train_c, 1, "train"), "test": fact_rows(test_c, 2, "test")}
    random.Random(0).shuffle(pairs["train"])
    capital_of = {q.format(c=c): cap for c, cap in test_c for q in QUESTIONS}

    def gold(prompts: list[str], texts: list[str]) -> list[float]:
        return [float(capital_of[p].lower() in t.lower()) for p, t in zip(prompts, texts)]

    return pairs, list(capital_of), gold


def human_data(cfg: dict, quick: bool) -> tuple[dict, list[str], object]:
    """displacement.py's pairs (train and test pools disjoint), its one prompt, VADER as the own samples' gold."""
    from binding_regime import tiny_gold, vader_gold
    from displacement import PROMPT, make_pairs, synthetic_snippets

    if quick:
        snippets = synthetic_snippets()
    else:
        from real_assets import movie_snippets

        snippets = movie_snippets()
    pairs = make_pairs(snippets, cfg)
    return {s: pairs[s] for s in ("train", "test")}, [PROMPT], tiny_gold if quick else vader_gold


def main(argv=None) -> int:
    ap = parser(__doc__, "runs/regimes")
    ap.add_argument("--regime", choices=sorted(SETTINGS), required=True)
    ap.add_argument("--seeds", type=int, default=3, help="training seeds per setting (42, 43, ...)")
    ap.add_argument("--losses", default=None, help="settings, comma-separated (default: the regime's matrix)")
    args = ap.parse_args(argv)
    t0 = time.time()
    import torch
    from displacement import sequence_logps
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(cpu_threads())
    cfg = (QUICK if args.quick else FULL)[args.regime]
    out = Path(args.out).resolve() / args.regime
    out.mkdir(parents=True, exist_ok=True)
    if args.quick:
        from po_plugins.tiny import make_model

        model_dir = make_model(out / "model", hidden_size=32, layers=2, heads=4)
    else:
        from real_assets import smollm2

        model_dir = smollm2()
    pairs, own_prompts, gold = fact_data(cfg) if args.regime == "fact_edit" else human_data(cfg, args.quick)

    ref_file = out / "data" / "reference_logps.json"  # the initial model: SimPO runs' monitor reference, test ref
    key = json.dumps([str(model_dir), pairs], sort_keys=True)
    cached = json.loads(ref_file.read_text()) if ref_file.exists() else {}
    if cached.get("key") != key:
        tok = AutoTokenizer.from_pretrained(str(model_dir))
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32,
                                                     attn_implementation="eager").eval()
        cached = {"key": key, "train": sequence_logps(model_dir, pairs["train"], model_dir, dtype="bfloat16"),
                  "test": sequence_logps(model_dir, pairs["test"], model_dir),
                  "geometry": geometry(model, tok, pairs["train"], cfg["batch"], 16),
                  "initial_own": own_samples(model_dir, model_dir, own_prompts, cfg, args.quick, gold)}
        del model
        ref_file.parent.mkdir(parents=True, exist_ok=True)
        ref_file.write_text(json.dumps(cached))
    train_rows = [{**{k: r[k] for k in ("prompt", "chosen", "rejected")}, "ref_chosen_logp": w, "ref_rejected_logp": lo}
                  for r, w, lo in zip(pairs["train"], cached["train"]["w"], cached["train"]["l"])]
    train_file = write_jsonl(train_rows, out / "data" / "train.jsonl")
    print(f"[regimes] {args.regime}: geometry at the initial model {json.dumps(cached['geometry'])}", flush=True)
    print(f"[regimes] {args.regime}: initial model's own samples {json.dumps(cached['initial_own'])}", flush=True)

    losses = (args.losses or SETTINGS[args.regime]).split(",")
    results, _ = train_matrix(losses, args.seeds, cfg, model_dir, train_file, out, pairs["test"], cached["test"],
                              lambda run: own_samples(run, model_dir, own_prompts, cfg, args.quick, gold),
                              tag="regimes")
    summary = summarise(results, cached["initial_own"])
    shared = [sum(k > 0 for k in cached["test"]["shared_len"]) / len(pairs["test"]),
              statistics.fmean(cached["test"]["shared_len"])]
    print(json.dumps({"regime": args.regime, "mode": "quick" if args.quick else "full", "seeds": args.seeds,
                      "n_train": len(train_rows), "n_test": len(pairs["test"]),
                      "test_shared_pairs_frac": shared[0], "test_shared_tokens": shared[1],
                      "geometry": cached["geometry"],
                      "initial_own": {k: cached["initial_own"][k] for k in ("gold", "tokens")}, "summary": summary,
                      "per_seed": {loss: [{k: r.get(k) for k in ("dz_w", "dz_l", "acc_implicit", "own_gold",
                                                                 "alpha_last")} for r in rs]
                                   for loss, rs in results.items()},
                      "seconds": round(time.time() - t0, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
