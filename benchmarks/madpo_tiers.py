"""MADPO against DPO, IPO and β-DPO on three data-quality tiers, after the MADPO paper's v1 design, at CPU scale.

    python benchmarks/madpo_tiers.py [--quick] [--out runs/madpo_tiers] [--seeds 3] [--workers 2]

Issue 6, experiment 3 (arXiv 2510.05342 v1; papers.md §2.4), every stage through the project's real commands:

1. SFT policy: a small Llama (byte-level BPE trained on the corpus) language-model-trained on the 10,605
   Rotten-Tomatoes review snippets of the vaderSentiment sdist (plain torch; the paper fine-tunes Gemma-3-270M on
   IMDB). Snippets are split into disjoint pools: pair prompts, validation prompts, evaluation prompts.
2. Prompts = the first 4 words of a snippet; two continuations per prompt sampled from the SFT policy by
   `po_plugins.cli.generate` (the generation stage; temperature 1, up to 24 new tokens).
3. Gold reward s(y) = 3 · VADER compound(continuation) ∈ [−3, 3] (the paper: 6·(p_pos − 0.5) from a RoBERTa
   sentiment classifier). Labels are Bradley–Terry draws: y1 ≻ y2 iff s1 + G1 ≥ s2 + G2, G ~ Gumbel(0, 1).
4. Tiers: High = both responses sampled; Medium = for half of the pairs, response 1 becomes the better of the two
   samples and response 2 the human-written continuation of the snippet (truncated to 24 tokens); Low = all pairs.
5. Methods, each from the SFT policy with the SFT policy as reference, β = 0.1: MADPO through the whole pipeline
   `po_plugins.cli.madpo` (stock `train_rm` reward model on the same pairs, `score_margins`, `--loss madpo`,
   c_max = 4, λ = 1); `--loss dpo`, `--loss ipo`, `--loss beta_dpo` (β0 = 0.1, α = 0.6, ρ = 0.8) through
   `po_plugins.cli.train_dpo`.
6. Metric: mean gold reward of one sampled continuation (temperature 1, 24 tokens) per evaluation prompt, per
   run; per method and tier the mean over seeds with a 95% t-interval. Each seed redraws the labels and the
   training order.
Hyperparameters are chosen on the validation prompts (tier High, seed 0), never on the evaluation prompts: the
learning rate from a grid by DPO's validation reward (then used by every method), MADPO's τ from a grid (its
reward-model margins are on this reward model's own scale, not the paper's).
--quick runs every stage on a tiny model and a synthetic corpus (exercised by a test). The last line printed is
one JSON object with the headline numbers.
"""

from __future__ import annotations

import json
import math
import random
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import mean_ci, parser, run_checked, save_figure, write_jsonl  # noqa: E402

TIERS = ("high", "medium", "low")
METHODS = ("madpo", "beta_dpo", "dpo", "ipo")
PAPER = {"madpo": (2.23, 2.23, 1.95), "beta_dpo": (1.67, 1.84, 1.76), "dpo": (1.62, 1.71, 1.48),
         "ipo": (0.35, 0.31, 0.10)}
PROMPT_WORDS = 4
FULL = {"hidden": 128, "layers": 4, "heads": 4, "vocab": 4000, "sft_epochs": 3, "sft_lr": 3e-3,
        "pairs": 2000, "val_prompts": 200, "eval_prompts": 500, "max_new": 24, "epochs": 2, "micro": 16, "batch": 32,
        "rm_lr": 1e-3, "rm_epochs": 2, "lr_grid": [3e-5, 1e-4, 3e-4], "tau_grid": [2.0, 6.9068], "seeds": 3}
QUICK = {"hidden": 32, "layers": 2, "heads": 4, "vocab": 512, "sft_epochs": 1, "sft_lr": 3e-3,
         "pairs": 48, "val_prompts": 12, "eval_prompts": 16, "max_new": 8, "epochs": 1, "micro": 8, "batch": 16,
         "rm_lr": 1e-3, "rm_epochs": 1, "lr_grid": [1e-3], "tau_grid": [6.9068], "seeds": 1}


# ---- corpus, SFT policy -------------------------------------------------------------------------------------
def split_corpus(texts: list[str], cfg: dict, seed: int = 0) -> dict[str, list[str]]:
    """Disjoint pools: evaluation prompts, validation prompts, pair prompts; SFT trains on all but evaluation."""
    usable = [t for t in texts if len(t.split()) >= PROMPT_WORDS + 4]
    random.Random(seed).shuffle(usable)
    e, v = cfg["eval_prompts"], cfg["val_prompts"]
    pools = {"eval": usable[:e], "val": usable[e:e + v], "pairs": usable[e + v:e + v + cfg["pairs"]],
             "sft": usable[e:]}
    if len(pools["pairs"]) < cfg["pairs"]:
        raise RuntimeError(f"corpus too small: {len(usable)} usable snippets")
    return pools


def prompt_of(text: str) -> tuple[str, str]:
    """(first PROMPT_WORDS words, the human continuation with its leading space)."""
    words = text.split(" ")
    return " ".join(words[:PROMPT_WORDS]), " " + " ".join(words[PROMPT_WORDS:])


def train_sft(out: Path, texts: list[str], cfg: dict, seed: int = 0) -> Path:
    """Language-model training of a small Llama on the snippets (plain torch, AdamW, cosine); returns its folder."""
    if (out / "sft_done.json").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from po_plugins.tiny import make_model

    make_model(out, hidden_size=cfg["hidden"], layers=cfg["layers"], heads=cfg["heads"], seed=seed, texts=texts,
               tokenizer_vocab=cfg["vocab"])
    tok = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out))
    seqs = [tok(t, add_special_tokens=False)["input_ids"][:64] + [tok.eos_token_id] for t in texts]
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["sft_lr"], weight_decay=0.01)
    bs = 32
    total = cfg["sft_epochs"] * math.ceil(len(seqs) / bs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg["sft_lr"], total_steps=total, pct_start=0.05)
    model.train()
    losses = []
    for _ in range(cfg["sft_epochs"]):
        order = torch.randperm(len(seqs), generator=g).tolist()
        for i in range(0, len(order), bs):
            batch = [seqs[j] for j in order[i:i + bs]]
            T = max(map(len, batch))
            x = torch.full((len(batch), T), tok.pad_token_id)
            labels = torch.full((len(batch), T), -100)
            for k, s in enumerate(batch):
                x[k, :len(s)] = torch.tensor(s)
                labels[k, :len(s)] = torch.tensor(s)
            loss = model(input_ids=x, attention_mask=(labels != -100).long(), labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
            losses.append(loss.item())
    model.save_pretrained(str(out))
    tail = losses[-20:]
    (out / "sft_done.json").write_text(json.dumps({"steps": len(losses), "final_loss": sum(tail) / len(tail)}))
    print(f"[madpo_tiers] SFT: {len(losses)} steps, final loss {sum(tail) / len(tail):.3f}", flush=True)
    return out


# ---- sampling and gold reward -------------------------------------------------------------------------------
def sample(model_dir: Path, prompts: list[str], cfg: dict, seed: int, n: int = 1) -> list[list[str]]:
    """n continuations per prompt (temperature 1), with po_plugins.generation's seeded HF backend."""
    from po_plugins.generation import HFBackend, Sampling, load_tokenizer, sample_seed

    tok = load_tokenizer(model_dir)
    backend = HFBackend(model_dir, tok, dtype="float32")
    sampling = Sampling(n_samples=n, temperature=1.0, max_new_tokens=cfg["max_new"], seed=seed)
    units = [(i, j) for i in range(len(prompts)) for j in range(n)]
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    out = [[None] * n for _ in prompts]
    for k in range(0, len(units), 64):
        chunk = units[k:k + 64]
        comps = backend.generate([ids[i] for i, _ in chunk], [sample_seed(seed, i, j) for i, j in chunk], sampling)
        for (i, j), c in zip(chunk, comps):
            out[i][j] = c.text
    return out


def gold(texts: list[str]) -> list[float]:
    from real_assets import vader_reward

    return vader_reward(texts)


def truncate(tok, text: str, n: int) -> str:
    return tok.decode(tok(text, add_special_tokens=False)["input_ids"][:n])


def tier_pairs(rows: list[dict], tier: str, seed: int) -> list[dict]:
    """Tier responses, then a Bradley–Terry label per pair (Gumbel noise, scale 1), seeded by `seed`."""
    rng = random.Random(f"labels-{seed}")
    n_replace = {"high": 0, "medium": len(rows) // 2, "low": len(rows)}[tier]
    pairs = []
    for k, r in enumerate(rows):
        (a, b), (sa, sb) = r["samples"], r["sample_rewards"]
        if k < n_replace:  # the better sample against the human-written continuation
            a, sa = (a, sa) if sa >= sb else (b, sb)
            b, sb = r["human"], r["human_reward"]
        g1, g2 = (-math.log(-math.log(rng.random())) for _ in range(2))
        first = sa + g1 >= sb + g2
        pairs.append({"prompt": r["prompt"], "chosen": a if first else b, "rejected": b if first else a,
                      "gold_chosen": sa if first else sb, "gold_rejected": sb if first else sa})
    random.Random(f"order-{seed}").shuffle(pairs)
    return pairs


# ---- training -----------------------------------------------------------------------------------------------
def common_flags(cfg: dict, lr: float, seed: int) -> dict:
    return {"model.beta": 0.1, "train.micro_batch_size": cfg["micro"], "train.batch_size": cfg["batch"],
            "train.max_epochs": cfg["epochs"], "train.seed": seed, "adam.lr": lr, "adam.betas": None,
            "lr_warmup_ratio": 0.03, "max_norm": 1.0, "ds.zero_stage": 2, "ds.param_dtype": "bf16",
            "ds.attn_implementation": "eager", "data.max_len": 128}


def train_method(method: str, sft: Path, data: Path, eval_data: Path, run_dir: Path, cfg: dict, lr: float,
                 seed: int, tau: float) -> Path:
    """One policy; MADPO through the whole `po_plugins.cli.madpo` pipeline, the others through train_dpo."""
    policy = run_dir / "policy"
    if (policy / "config.json").exists() and (run_dir / "trained.json").exists():
        return policy
    flags = common_flags(cfg, lr, seed)
    flags.pop("adam.betas")
    if method == "madpo":
        import yaml

        data_keys = {"dataset": str(data), "eval_dataset": str(eval_data), "prompt_key": "prompt",
                     "chosen_key": "chosen", "rejected_key": "rejected", "max_len": 128}
        rm_flags = {"train.micro_batch_size": cfg["micro"], "train.batch_size": cfg["batch"],
                    "train.max_epochs": cfg["rm_epochs"],
                    "train.seed": seed, "adam.lr": cfg["rm_lr"], "ds.zero_stage": 2, "ds.param_dtype": "bf16",
                    "ds.attn_implementation": "eager"}
        dpo_flags = {k: v for k, v in flags.items() if k != "data.max_len"}
        config = {"workdir": str(run_dir), "data": data_keys,
                  "reward_model": {"pretrain": str(sft), "flags": rm_flags},
                  "scoring": {"margin_key": "rm_margin", "batch_size": 64},
                  "dpo": {"pretrain": str(sft), "loss": "madpo", "c_max": 4.0, "lam": 1.0, "tau": tau,
                          "output": str(policy), "flags": dpo_flags}}
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "madpo.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        run_checked("po_plugins.cli.madpo", ["--config", run_dir / "madpo.yaml"], run_dir, run_dir / "pipeline.log")
    else:
        args = ["--loss", method, "--model.model_name_or_path", sft, "--data.dataset", data,
                "--data.prompt_key", "prompt", "--data.chosen_key", "chosen", "--data.rejected_key", "rejected",
                "--ckpt.output_dir", policy, "--po.monitor"]
        for k, v in flags.items():
            args += [f"--{k}", v]
        run_checked("po_plugins.cli.train_dpo", args, run_dir, run_dir / "train.log")
    (run_dir / "trained.json").write_text(json.dumps({"method": method, "lr": lr, "seed": seed, "tau": tau}))
    return policy


def evaluate(policy: Path, prompts: list[str], cfg: dict, seed: int = 1234) -> dict:
    texts = [s[0] for s in sample(policy, prompts, cfg, seed)]
    r = gold(texts)
    m, ci = mean_ci(r)
    return {"reward": m, "ci": ci, "n": len(r)}


def rm_diagnostics(run_dir: Path) -> dict:
    """How informative the MADPO run's reward-model margins are: their spread, and how often their sign agrees with
    the training label and with the gold reward's order of the two responses."""
    rows = [json.loads(line) for line in (run_dir / "scored.jsonl").read_text().splitlines()]
    h = [r["rm_margin"] for r in rows]
    return {"margin_sd": statistics.stdev(h) if len(h) > 1 else 0.0, "margin_abs_max": max(map(abs, h)),
            "label_agreement": sum(x > 0 for x in h) / len(h),
            "gold_agreement": sum((r["rm_margin"] > 0) == (r["gold_chosen"] > r["gold_rejected"]) for r in rows)
            / len(rows)}


def plot(table: dict, sft_reward: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.2
    for k, method in enumerate(METHODS):
        xs = [t + (k - 1.5) * width for t in range(len(TIERS))]
        ours = [table[method][t]["mean"] for t in TIERS]
        err = [table[method][t]["ci"] for t in TIERS]
        axes[0].bar(xs, ours, width, yerr=[0 if math.isnan(e) else e for e in err], label=method, capsize=3)
        axes[1].bar(xs, PAPER[method], width, label=method)
    axes[0].axhline(sft_reward, color="grey", ls="--", lw=1, label="SFT policy")
    axes[0].set_title("this run (mean gold reward, 95% CI over seeds)")
    axes[1].set_title("paper (Gemma-3-270M, IMDB, README table)")
    for ax in axes:
        ax.set_xticks(range(len(TIERS)), [t.capitalize() for t in TIERS])
        ax.set_ylabel("mean gold reward [−3, 3]")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    save_figure(fig, path)


def main(argv=None) -> int:
    ap = parser(__doc__, "runs/madpo_tiers")
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--workers", type=int, default=2, help="training runs in parallel (one thread each)")
    args = ap.parse_args(argv)
    t0 = time.time()
    cfg = dict(QUICK if args.quick else FULL)
    seeds = list(range(args.seeds or cfg["seeds"]))
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.quick:
        from displacement import synthetic_snippets

        texts = [s["text"] for s in synthetic_snippets(n=300)]
    else:
        from real_assets import movie_snippets

        texts = [s["text"] for s in movie_snippets()]
    pools = split_corpus(texts, cfg)
    import torch

    torch.set_num_threads(max(1, args.workers))
    sft = train_sft(out / "sft", pools["sft"], cfg)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(sft))

    # the generation stage: two samples per pair prompt from the SFT policy, through the real CLI
    prompts = [{"prompt": prompt_of(t)[0], "human": truncate(tok, prompt_of(t)[1], cfg["max_new"])}
               for t in pools["pairs"]]
    gen_file = out / "data" / "generated.jsonl"
    if not gen_file.exists():
        write_jsonl(prompts, out / "data" / "prompts.jsonl")
        run_checked("po_plugins.cli.generate", ["--model", sft, "--data.dataset", out / "data" / "prompts.jsonl",
                                         "--data.prompt_key", "prompt", "--output", gen_file, "--n_samples", 2,
                                         "--backend", "hf", "--temperature", 1.0, "--max_new_tokens", cfg["max_new"],
                                         "--seed", 0, "--batch_size", 64, "--dtype", "float32"],
             out, out / "logs" / "generate.log")
    rows = [json.loads(line) for line in gen_file.read_text().splitlines()]
    for r in rows:
        r["sample_rewards"] = gold(r["samples"])
        r["human_reward"] = gold([r["human"]])[0]
    data_stats = {"sample_reward": statistics.fmean(x for r in rows for x in r["sample_rewards"]),
                  "human_reward": statistics.fmean(r["human_reward"] for r in rows)}

    val_prompts = [prompt_of(t)[0] for t in pools["val"]]
    eval_prompts = [prompt_of(t)[0] for t in pools["eval"]]
    sft_eval = evaluate(sft, eval_prompts, cfg)

    def data_for(tier: str, seed: int) -> tuple[Path, Path]:
        pairs = tier_pairs(rows, tier, seed)
        n_eval = max(4, len(pairs) // 10)  # the reward model's eval split (train_rm needs one)
        d = out / "data" / f"{tier}_seed{seed}"
        return write_jsonl(pairs, d / "pairs.jsonl"), write_jsonl(pairs[:n_eval], d / "rm_eval.jsonl")

    def job(method, tier, seed, lr, tau, tag=""):
        data, rm_eval = data_for(tier, seed)
        run = out / "runs" / f"{tier}_seed{seed}" / f"{method}{tag}"
        return train_method(method, sft, data, rm_eval, run, cfg, lr, seed, tau)

    pool = ThreadPoolExecutor(max(1, args.workers))
    # hyperparameters on the validation prompts (tier High, seed 0)
    val = {}
    futs = {("dpo", lr): pool.submit(job, "dpo", "high", 0, lr, 0.0, f"_lr{lr:g}") for lr in cfg["lr_grid"]}
    for (_, lr), f in futs.items():
        val[f"dpo_lr{lr:g}"] = evaluate(f.result(), val_prompts, cfg)["reward"]
    lr = max(cfg["lr_grid"], key=lambda x: val[f"dpo_lr{x:g}"])
    futs = {tau: pool.submit(job, "madpo", "high", 0, lr, tau, f"_tau{tau:g}") for tau in cfg["tau_grid"]}
    for tau, f in futs.items():
        val[f"madpo_tau{tau:g}"] = evaluate(f.result(), val_prompts, cfg)["reward"]
    tau = max(cfg["tau_grid"], key=lambda x: val[f"madpo_tau{x:g}"])
    print(f"[madpo_tiers] validation: {val} -> lr {lr:g}, tau {tau:g}", flush=True)

    # the grid: every method x tier x seed (the validation runs of the chosen settings are reused)
    futs = {}
    for seed in seeds:
        for tier in TIERS:
            for method in METHODS:
                if tier == "high" and seed == 0 and method in ("dpo", "madpo"):
                    tag = f"_lr{lr:g}" if method == "dpo" else f"_tau{tau:g}"
                else:
                    tag = ""
                futs[(method, tier, seed)] = pool.submit(job, method, tier, seed, lr, tau, tag)
    per_run = {}
    for key, f in futs.items():
        per_run[key] = evaluate(f.result(), eval_prompts, cfg)
        print(f"[madpo_tiers] {key}: {per_run[key]['reward']:+.3f}", flush=True)
    pool.shutdown()

    rm = {f"{t}/{s}": rm_diagnostics(futs[("madpo", t, s)].result().parent) for t in TIERS for s in seeds}
    table = {m: {t: dict(zip(("mean", "ci"), mean_ci([per_run[(m, t, s)]["reward"] for s in seeds])))
                 for t in TIERS} for m in METHODS}
    result = {"mode": "quick" if args.quick else "full", "seeds": len(seeds), "n_pairs": len(rows),
              "n_eval_prompts": len(eval_prompts), "lr": lr, "tau": tau, "validation": val,
              "sft_reward": sft_eval["reward"], "sft_reward_ci": sft_eval["ci"], **data_stats,
              "table": table, "per_run": {"/".join(map(str, k)): v["reward"] for k, v in per_run.items()},
              "reward_model": rm,
              "paper": {m: dict(zip(TIERS, PAPER[m])) for m in METHODS}}
    img_root = Path(args.docs) if args.docs else out
    png = img_root / "img" / f"madpo_tiers{'_quick' if args.quick else ''}.png"
    plot(table, sft_eval["reward"], png, f"MADPO v1 design at CPU scale ({len(seeds)} seeds)")
    result["png"] = str(png)
    result["seconds"] = round(time.time() - t0, 1)
    print(f"[madpo_tiers] SFT policy: {sft_eval['reward']:+.3f} ± {sft_eval['ci']:.3f}")
    for m in METHODS:
        cells = "  ".join(f"{t}: {table[m][t]['mean']:+.3f} ± {table[m][t]['ci']:.3f}" for t in TIERS)
        print(f"[madpo_tiers] {m:>8}  {cells}   (paper {PAPER[m]})")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
