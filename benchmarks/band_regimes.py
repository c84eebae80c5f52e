"""Where the disentanglement band binds on a real model: pair regimes at the initial model, batch level.

    python benchmarks/band_regimes.py [--quick] [--out runs/band_regimes] [--prompts 64] [--batch 8]

Issue 13, item 2 (measurement). For SmolLM2-135M-Instruct (benchmarks/real_assets.py, the same local model as
benchmarks/displacement.py) build preference pairs in the regimes a practitioner meets and measure, at the initial
model and per batch of `--batch` pairs (the level of the monitor's optimizer step), the head-score geometry that
decides the band: ρ = cos(s_w, s_l), r* = ‖s_l‖/‖s_w‖, and whether DPO (r = 1, d_w = d_l) is in band. The numbers
come from `po_plugins.diagnose` (what `po-plugins diagnose` prints): the pairs encoded as OpenRLHF encodes them with
the chat template, one padded forward per batch, the head statistics in the monitor's exact closed form
(`diagnose.batch_scores`: the LM-head inputs and logits at the response positions through
`po_plugins.scores.score_stats_flat`) and DPO's verdict (`diagnose.objective_band`); the picture is diagnose's
(`diagnose.plot_band`).

Regimes (prompts through the model's chat template; chosen / rejected):
* onpolicy_T{0.3,0.7,1.0}: two samples of the model for one prompt ("How was the movie?" and the like), HF
  generate at that temperature; chosen = the higher VADER compound.
* length_concise_chosen: a sample (T 0.7) vs that same sample continued by the model (T 0.7, no early stop) to
  3× its token count; length_verbose_chosen: the reverse.
* edit_sentiment: a human movie snippet (the corpus of experiment 2) with one VADER-lexicon word (|valence| ≥ 1.5)
  swapped for a word of the opposite sign and similar strength; chosen = the positive version.
* edit_fact: "What is the capital of X?" answered "The capital of X is Y." with the right vs another country's capital.
* unrelated_human: experiment 2's training pairs (two unrelated human snippets, rating gap ≥ 1.5): the reference.

Since DPO's r = 1 is in band iff ρ ≤ r* ≤ 1/ρ, swapping chosen and rejected never changes DPO's verdict (ρ stays,
r* inverts); the two length rows differ only in r*.

--quick: a tiny random Llama (po_plugins.tiny) and its synthetic corpus, 16 prompts per regime (seconds).
The last line printed is one JSON object with the headline numbers.
"""

from __future__ import annotations

import json
import math
import random
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import parser, write_jsonl  # noqa: E402

TOPICS = ["movie", "book", "meal", "hotel", "concert", "game", "trip", "class", "phone", "show", "park", "song",
          "museum", "restaurant", "album", "podcast"]
PROMPTS = ["How was the {t}?", "What did you think of the {t}?", "Tell me about the {t}.",
           "Give a short review of the {t}.", "Describe the {t} in one sentence."]
CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Portugal", "Lisbon"),
    ("Austria", "Vienna"), ("Poland", "Warsaw"), ("Greece", "Athens"), ("Sweden", "Stockholm"),
    ("Norway", "Oslo"), ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Ireland", "Dublin"),
    ("Belgium", "Brussels"), ("Netherlands", "Amsterdam"), ("Hungary", "Budapest"), ("Czechia", "Prague"),
    ("Romania", "Bucharest"), ("Bulgaria", "Sofia"), ("Serbia", "Belgrade"), ("Croatia", "Zagreb"),
    ("Ukraine", "Kyiv"), ("Russia", "Moscow"), ("Turkey", "Ankara"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"),
    ("Nigeria", "Abuja"), ("Ghana", "Accra"), ("Ethiopia", "Addis Ababa"), ("Morocco", "Rabat"),
    ("Algeria", "Algiers"), ("Tunisia", "Tunis"), ("Senegal", "Dakar"), ("South Africa", "Pretoria"),
    ("Japan", "Tokyo"), ("China", "Beijing"), ("South Korea", "Seoul"), ("India", "New Delhi"),
    ("Pakistan", "Islamabad"), ("Bangladesh", "Dhaka"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"),
    ("Indonesia", "Jakarta"), ("Philippines", "Manila"), ("Malaysia", "Kuala Lumpur"), ("Iran", "Tehran"),
    ("Iraq", "Baghdad"), ("Saudi Arabia", "Riyadh"), ("Israel", "Jerusalem"), ("Jordan", "Amman"),
    ("Australia", "Canberra"), ("New Zealand", "Wellington"), ("Canada", "Ottawa"), ("Mexico", "Mexico City"),
    ("Cuba", "Havana"), ("Brazil", "Brasilia"), ("Argentina", "Buenos Aires"), ("Chile", "Santiago"),
    ("Peru", "Lima"), ("Colombia", "Bogota"), ("Venezuela", "Caracas"), ("Ecuador", "Quito"),
    ("Uruguay", "Montevideo"), ("United States", "Washington"),
]
REGIMES = ["onpolicy_T0.3", "onpolicy_T0.7", "onpolicy_T1.0", "length_concise_chosen", "length_verbose_chosen",
           "edit_sentiment", "edit_fact", "unrelated_human"]


def msg(role: str, text: str) -> list[dict]:
    return [{"role": role, "content": text}]


# ---- pairs ----------------------------------------------------------------------------------------------------
def review_prompts(n: int, seed: int = 0) -> list[str]:
    all_ = [p.format(t=t) for t in TOPICS for p in PROMPTS]
    random.Random(seed).shuffle(all_)
    return all_[:n]


def vader(texts: list[str]) -> list[float]:
    from real_assets import vader_reward

    return vader_reward(texts)


def generate(model, tok, prompts: list[list[dict]], n: int, temperature: float, max_new_tokens: int,
             seed: int, prefixes: list[str] | None = None, min_new: list[int] | None = None) -> list[list[str]]:
    """`n` samples per chat prompt (HF generate, left padding). `prefixes`: the assistant turn's start to continue;
    `min_new`: per-prompt exact number of new tokens (no early stop), else up to `max_new_tokens` or the turn's end."""
    import torch

    tok.padding_side = "left"
    texts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) + (prefixes[i] if prefixes else "")
             for i, p in enumerate(prompts)]
    out: list[list[str]] = []
    groups = [[i] for i in range(len(texts))] if min_new else [list(range(len(texts)))]
    for g in groups:
        enc = tok([texts[i] for i in g], return_tensors="pt", padding=True, add_special_tokens=False)
        kw = {"min_new_tokens": min_new[g[0]], "max_new_tokens": min_new[g[0]]} if min_new else \
            {"max_new_tokens": max_new_tokens}
        torch.manual_seed(seed + g[0])
        with torch.no_grad():
            ids = model.generate(**enc, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                                 num_return_sequences=n, pad_token_id=tok.pad_token_id, **kw)
        new = ids[:, enc["input_ids"].shape[1]:]
        dec = tok.batch_decode(new, skip_special_tokens=True)
        out += [[s.strip() if not prefixes else s for s in dec[j * n:(j + 1) * n]] for j in range(len(g))]
    return out


def onpolicy_pairs(model, tok, prompts: list[str], temperature: float, max_new: int) -> list[dict]:
    chats = [msg("user", p) for p in prompts]
    samples = generate(model, tok, chats, 2, temperature, max_new, seed=int(1000 * temperature))
    rows = []
    for p, (a, b) in zip(prompts, samples):
        va, vb = vader([a, b])
        hi, lo = (a, b) if va >= vb else (b, a)
        rows.append({"prompt": msg("user", p), "chosen": msg("assistant", hi), "rejected": msg("assistant", lo)})
    return rows


def length_pairs(model, tok, prompts: list[str], max_new: int) -> list[dict]:
    """A concise sample and the same sample continued by the model itself to 3× its token count."""
    chats = [msg("user", p) for p in prompts]
    base = [s[0] for s in generate(model, tok, chats, 1, 0.7, max_new, seed=7)]
    base = [b if b else "I liked it." for b in base]
    counts = [len(tok(b, add_special_tokens=False)["input_ids"]) for b in base]
    cont = generate(model, tok, chats, 1, 0.7, 0, seed=11, prefixes=base, min_new=[2 * c for c in counts])
    return [{"prompt": msg("user", p), "chosen": msg("assistant", b), "rejected": msg("assistant", (b + c[0]).strip())}
            for p, b, c in zip(prompts, base, cont)]


def load_lexicon(quick: bool) -> dict[str, float]:
    if quick:
        from po_plugins import tiny

        return {**{w: 2.0 for w in tiny.POSITIVE}, **{w: -2.0 for w in tiny.NEGATIVE}}
    import vaderSentiment

    lex = {}
    for line in (Path(vaderSentiment.__file__).parent / "vader_lexicon.txt").read_text(errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) >= 2 and parts[0].isalpha() and len(parts[0]) >= 3:
            lex[parts[0]] = float(parts[1])
    return lex


def sentiment_edit_pairs(snippets: list[dict], lex: dict[str, float], n: int, prompt: str, seed: int = 0) -> list[dict]:
    """One strong sentiment word of a human snippet swapped for one of the opposite sign and similar strength."""
    rng = random.Random(seed)
    pool = [s for s in snippets if 10 <= len(s["text"]) <= 140]
    rng.shuffle(pool)
    strong = [w for w, v in lex.items() if abs(v) >= 1.5]
    rows = []
    for s in pool:
        words = [m for m in re.finditer(r"[A-Za-z]+", s["text"]) if abs(lex.get(m.group().lower(), 0)) >= 1.5]
        if not words:
            continue
        m = rng.choice(words)
        v = lex[m.group().lower()]
        options = [w for w in strong if (lex[w] > 0) != (v > 0) and abs(abs(lex[w]) - abs(v)) <= 0.5]
        if not options:
            continue
        new = s["text"][: m.start()] + rng.choice(options) + s["text"][m.end():]
        pos, neg = (s["text"], new) if v > 0 else (new, s["text"])
        rows.append({"prompt": msg("user", prompt), "chosen": msg("assistant", pos), "rejected": msg("assistant", neg)})
        if len(rows) == n:
            break
    return rows


def fact_pairs(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        country, capital = CAPITALS[i % len(CAPITALS)]
        wrong = rng.choice([c for k, c in CAPITALS if k != country])
        q = msg("user", f"What is the capital of {country}?")
        rows.append({"prompt": q, "chosen": msg("assistant", f"The capital of {country} is {capital}."),
                     "rejected": msg("assistant", f"The capital of {country} is {wrong}.")})
    return rows


# ---- exact head-score statistics of a batch: po_plugins.diagnose ------------------------------------------------
MAX_LEN = 4096  # no pair here comes near it: nothing is truncated


def batch_stats(model, tok, rows: list[dict]) -> dict:
    """DPO's band of one batch at the initial model, from `po_plugins.diagnose`: the pairs through the chat template as
    OpenRLHF encodes them (`diagnose.encode`), one padded forward and the monitor's closed form for the head statistics
    (`diagnose.batch_scores`), DPO's incentives and the verdict (`diagnose.objective_band`)."""
    from po_plugins import diagnose
    from po_plugins.losses import build

    enc = [diagnose.encode(tok, r, True, MAX_LEN) for r in rows]
    if any(e is None for e in enc):
        raise ValueError(f"a prompt of {MAX_LEN - 2} tokens or more")
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    scores = diagnose.batch_scores(model, model.get_output_embeddings(), enc, pad)
    b = diagnose.objective_band(build("dpo"), scores)["whole"]
    return {"rho": b["rho"], "r_star": math.exp(b["log_r_star"]), "dpo_in_band": b["in_band"], "edge": b["edge"],
            "tokens_w": scores.info["tokens_w"], "tokens_l": scores.info["tokens_l"]}


def summarise(name: str, rows: list[dict], batches: list[dict], pairs: list[dict]) -> dict:
    from po_plugins.diagnose import quantiles

    q = quantiles([b["rho"] for b in batches])
    return {"regime": name, "pairs": len(rows), "batches": len(batches),
            "rho_median": q["median"], "rho_q1": q["q1"], "rho_q3": q["q3"],
            "r_star_median": statistics.median(b["r_star"] for b in batches),
            "dpo_in_band_frac": sum(b["dpo_in_band"] for b in batches) / len(batches),
            "edges": sorted({b["edge"] for b in batches if b["edge"]}),
            "pair_rho_median": statistics.median(p["rho"] for p in pairs),
            "pair_dpo_in_band_frac": sum(p["dpo_in_band"] for p in pairs) / len(pairs),
            "tokens_w_mean": statistics.fmean(p["tokens_w"] for p in pairs),
            "tokens_l_mean": statistics.fmean(p["tokens_l"] for p in pairs),
            "identical_frac": sum(r["chosen"] == r["rejected"] for r in rows) / len(rows)}


def plot(points: dict[str, list[tuple[float, float]]], path: Path, model: str, k: int) -> None:
    """Each batch as (log r*, ρ) with DPO's band: r = 1 is in band iff |log r*| ≤ −log ρ (the shaded region), drawn by
    `po_plugins.diagnose.plot_band` (the picture `po-plugins diagnose` draws for any objective)."""
    from po_plugins.diagnose import plot_band

    pts = {name: [(math.log(r), rho) for rho, r in p] for name, p in points.items()}
    plot_band([("", pts)], path, f"{model}: batches of {k} pairs against DPO's band", region="DPO (r = 1) in band",
              xlabel="log r* = log ‖s_l‖/‖s_w‖ (batch)")


def main(argv=None) -> int:
    ap = parser(__doc__, "runs/band_regimes")
    ap.add_argument("--prompts", type=int, default=None, help="pairs per regime (default 64; --quick 16)")
    ap.add_argument("--batch", type=int, default=8, help="pairs per batch (the monitor's optimizer step)")
    ap.add_argument("--max_new_tokens", type=int, default=None, help="on-policy sample length (default 48; quick 16)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    t0 = time.time()
    import torch
    from displacement import FULL, PROMPT, make_pairs, synthetic_snippets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    n = args.prompts or (16 if args.quick else 64)
    max_new = args.max_new_tokens or (16 if args.quick else 48)
    if args.quick:
        from po_plugins.tiny import make_model

        model_dir = make_model(out / "model", hidden_size=32, layers=2, heads=4)
        snippets = synthetic_snippets()
        unrelated_cfg = {**FULL, "train_pairs": n, "val_pairs": 4, "test_pairs": 4}
    else:
        from real_assets import movie_snippets, smollm2

        model_dir, snippets = smollm2(), movie_snippets()
        unrelated_cfg = FULL
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    prompts = review_prompts(n)

    def build(name: str) -> list[dict]:
        if name.startswith("onpolicy_T"):
            return onpolicy_pairs(model, tok, prompts, float(name[len("onpolicy_T"):]), max_new)
        if name == "length_concise_chosen":
            return length_pairs(model, tok, prompts, max_new // 2)
        if name == "length_verbose_chosen":
            return [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} for r in cached("length_concise_chosen")]
        if name == "edit_sentiment":
            return sentiment_edit_pairs(snippets, load_lexicon(args.quick), n, PROMPT)
        if name == "edit_fact":
            return fact_pairs(n)
        if name == "unrelated_human":
            return [{k: r[k] for k in ("prompt", "chosen", "rejected")}
                    for r in make_pairs(snippets, unrelated_cfg)["train"][:n]]
        raise ValueError(name)

    def cached(name: str) -> list[dict]:  # the pairs of a regime are kept: a re-run measures the same pairs
        path = out / "pairs" / f"{name}.jsonl"
        if path.exists():
            rows = [json.loads(line) for line in path.read_text().splitlines()]
            if len(rows) == n:
                return rows
        rows = build(name)
        write_jsonl(rows, path)
        return rows

    table, points = [], {}
    for name in REGIMES:
        t1 = time.time()
        rows = cached(name)
        k = args.batch
        batches = [batch_stats(model, tok, rows[i: i + k]) for i in range(0, len(rows) - k + 1, k)]
        pairs = [batch_stats(model, tok, [r]) for r in rows]
        table.append(summarise(name, rows, batches, pairs))
        points[name] = [(b["rho"], b["r_star"]) for b in batches]
        s = table[-1]
        print(f"[band_regimes] {name:>22}: rho {s['rho_median']:.3f} [{s['rho_q1']:.3f}, {s['rho_q3']:.3f}] "
              f"r* {s['r_star_median']:.3f} DPO in band {s['dpo_in_band_frac']:.2f} of {s['batches']} batches "
              f"(pairs: rho {s['pair_rho_median']:.3f}, in band {s['pair_dpo_in_band_frac']:.2f}) "
              f"tokens {s['tokens_w_mean']:.0f}/{s['tokens_l_mean']:.0f} ({time.time() - t1:.0f} s)", flush=True)
    (out / "table.json").write_text(json.dumps(table, indent=1))
    (out / "batches.json").write_text(json.dumps(points, indent=1))
    png = (Path(args.docs) if args.docs else out) / "img" / f"band_regimes{'_quick' if args.quick else ''}.png"
    plot(points, png, "tiny" if args.quick else "SmolLM2-135M-Instruct", args.batch)
    print("\n| regime | pairs | batches | ρ median [IQR] | r* median | DPO in band (batches) | DPO in band (pairs) "
          "| tokens chosen / rejected |")
    print("|---|---|---|---|---|---|---|---|")
    for s in table:
        print(f"| {s['regime']} | {s['pairs']} | {s['batches']} | {s['rho_median']:.3f} [{s['rho_q1']:.3f}, "
              f"{s['rho_q3']:.3f}] | {s['r_star_median']:.3f} | {s['dpo_in_band_frac']:.2f} | "
              f"{s['pair_dpo_in_band_frac']:.2f} | {s['tokens_w_mean']:.0f} / {s['tokens_l_mean']:.0f} |")
    print()
    headline = {"mode": "quick" if args.quick else "full", "model": "tiny" if args.quick else "SmolLM2-135M-Instruct",
                "batch": args.batch, "seconds": round(time.time() - t0, 1), "png": str(png),
                "regimes": {s["regime"]: {k: (round(v, 4) if isinstance(v, float) else v) for k, v in s.items()
                                          if k != "regime"} for s in table}}
    print(json.dumps(headline))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
