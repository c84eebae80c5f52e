"""MADPO against DPO, IPO and β-DPO on three data-quality tiers, after the MADPO paper's v1 design, at CPU scale.

    python benchmarks/madpo_tiers.py [--quick] [--out runs/madpo_tiers] [--seeds 3] [--workers 2]
                                     [--margins rm|oracle] [--lr LR] [--tiers high medium low]

Issue 6, experiment 3 (arXiv 2510.05342 v1; docs/results_madpo.md), every stage through the project's real commands:

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
--margins oracle (issue 13, item 4) replaces the reward model by the gold reward itself: each pair's margin column
`gold_margin` is gold(chosen) − gold(rejected), the same gold reward that drew the label, and MADPO trains on it with
`po_plugins.cli.train_dpo --loss madpo --po.margin_key gold_margin` (no reward-model stage); the methods are then
MADPO-oracle, β-DPO and DPO (the baseline runs are the same runs as in the default mode and shared through --out).
MADPO's τ is chosen from ORACLE_TAU_GRID on the validation prompts. --lr skips the learning-rate grid and uses the
given rate (one chosen on the validation prompts by an earlier run). Every training run and every evaluation is
cached in its run folder, so an interrupted run resumes where it stopped.
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
ORACLE_METHODS = ("madpo_oracle", "beta_dpo", "dpo")
PAPER = {"madpo": (2.23, 2.23, 1.95), "madpo_oracle": (2.23, 2.23, 1.95), "beta_dpo": (1.67, 1.84, 1.76),
         "dpo": (1.62, 1.71, 1.48), "ipo": (0.35, 0.31, 0.10)}
PROMPT_WORDS = 4
FULL = {"hidden": 128, "layers": 4, "heads": 4, "vocab": 4000, "sft_epochs": 3, "sft_lr": 3e-3,
        "pairs": 2000, "val_prompts": 200, "eval_prompts": 500, "max_new": 24, "epochs": 2, "micro": 16, "batch": 32,
        "rm_lr": 1e-3, "rm_epochs": 2, "lr_grid": [3e-5, 1e-4, 3e-4], "tau_grid": [2.0, 6.9068], "seeds": 3,
        "oracle_tau_grid": [2.0, 4.0, 6.9068]}
QUICK = {"hidden": 32, "layers": 2, "heads": 4, "vocab": 512, "sft_epochs": 1, "sft_lr": 3e-3,
         "pairs": 48, "val_prompts": 12, "eval_prompts": 16, "max_new": 8, "epochs": 1, "micro": 8, "batch": 16,
         "rm_lr": 1e-3, "rm_epochs": 1, "lr_grid": [1e-3], "tau_grid": [6.9068], "seeds": 1,
         "oracle_tau_grid": [6.9068]}


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
        loss = {"madpo_oracle": "madpo"}.get(method, method)
        args = ["--loss", loss, "--model.model_name_or_path", sft, "--data.dataset", data,
                "--data.prompt_key", "prompt", "--data.chosen_key", "chosen", "--data.rejected_key", "rejected",
                "--ckpt.output_dir", policy, "--po.monitor"]
        if method == "madpo_oracle":  # the gold reward difference as MADPO's margin
            args += ["--po.margin_key", "gold_margin", "--po.c_max", 4.0, "--po.lam", 1.0, "--po.tau", tau]
        for k, v in flags.items():
            args += [f"--{k}", v]
        run_checked("po_plugins.cli.train_dpo", args, run_dir, run_dir / "train.log")
    (run_dir / "trained.json").write_text(json.dumps({"method": method, "lr": lr, "seed": seed, "tau": tau}))
    return policy


def evaluate(policy: Path, prompts: list[str], cfg: dict, seed: int = 1234, cache: Path | None = None) -> dict:
    """Mean gold reward of one sample per prompt; with `cache` (a JSON file), stored there and reused."""
    path = cache
    if path is not None and path.exists():
        got = json.loads(path.read_text())
        if got.get("n") == len(prompts):
            return got
    texts = [s[0] for s in sample(policy, prompts, cfg, seed)]
    r = gold(texts)
    m, ci = mean_ci(r)
    res = {"reward": m, "ci": ci, "n": len(r)}
    if path is not None:
        path.write_text(json.dumps(res))
    return res


def oracle_diagnostics(pairs_file: Path, cfg: dict, tau: float) -> dict:
    """What the gold margins do under MADPO's weights: their spread, how often the label agrees with the gold
    order (Bradley–Terry noise flips the rest), and the weights on flipped, tied and agreeing pairs."""
    import torch

    from po_plugins.madpo import margin_weights

    h = [json.loads(line)["gold_margin"] for line in pairs_file.read_text().splitlines()]
    w = margin_weights(torch.tensor(h), c_max=4.0, lam=1.0, tau=tau).tolist()

    def mean_w(sel):
        xs = [wi for hi, wi in zip(h, w) if sel(hi)]
        return statistics.fmean(xs) if xs else float("nan")

    return {"margin_sd": statistics.stdev(h) if len(h) > 1 else 0.0, "margin_abs_max": max(map(abs, h)),
            "label_agrees_with_gold": sum(x > 0 for x in h) / len(h), "ties": sum(x == 0 for x in h) / len(h),
            "w_agree": mean_w(lambda x: x > 0), "w_flipped": mean_w(lambda x: x < 0), "w_mean": statistics.fmean(w)}


def rm_diagnostics(run_dir: Path, heldout: Path | None = None) -> dict:
    """How informative the MADPO run's reward-model margins are: their spread, and how often their sign agrees with
    the training label and with the gold reward's order of the two responses (`gold_agreement` counts a gold tie
    as "rejected ahead"; `gold_agreement_untied` leaves ties out). With `heldout` (pairs of the validation prompts,
    chosen = the higher gold reward, no ties), also the agreement on those pairs, which the reward model never saw,
    scored by `po_plugins.cli.score_margins`."""
    rows = [json.loads(line) for line in (run_dir / "scored.jsonl").read_text().splitlines()]
    h = [r["rm_margin"] for r in rows]
    untied = [r for r in rows if r["gold_chosen"] != r["gold_rejected"]]
    res = {"margin_sd": statistics.stdev(h) if len(h) > 1 else 0.0, "margin_abs_max": max(map(abs, h)),
           "label_agreement": sum(x > 0 for x in h) / len(h),
           "gold_agreement": sum((r["rm_margin"] > 0) == (r["gold_chosen"] > r["gold_rejected"]) for r in rows)
           / len(rows),
           "gold_agreement_untied": sum((r["rm_margin"] > 0) == (r["gold_chosen"] > r["gold_rejected"])
                                        for r in untied) / max(1, len(untied))}
    if heldout is not None:
        out = run_dir / "heldout_scored.jsonl"
        if not out.exists():
            run_checked("po_plugins.cli.score_margins",
                        ["--model", run_dir / "rm", "--data.dataset", heldout, "--data.prompt_key", "prompt",
                         "--data.chosen_key", "chosen", "--data.rejected_key", "rejected", "--data.max_len", 128,
                         "--output", out, "--margin_key", "rm_margin", "--batch_size", 64],
                        run_dir, run_dir / "heldout_score.log")
        hh = [json.loads(line)["rm_margin"] for line in out.read_text().splitlines()]
        res["heldout_gold_agreement"] = sum(x > 0 for x in hh) / len(hh)
        res["heldout_pairs"] = len(hh)
    return res


def heldout_pairs(sft: Path, prompts: list[str], cfg: dict, path: Path) -> Path:
    """Two SFT samples per validation prompt, oriented by the gold reward (ties dropped): the held-out pairs on
    which a reward model's agreement with the gold order is measured."""
    if path.exists():
        return path
    rows = []
    for p, (a, b) in zip(prompts, sample(sft, prompts, cfg, seed=4321, n=2)):
        sa, sb = gold([a, b])
        if sa != sb:
            rows.append({"prompt": p, "chosen": a if sa > sb else b, "rejected": b if sa > sb else a,
                         "gold_chosen": max(sa, sb), "gold_rejected": min(sa, sb)})
    return write_jsonl(rows, path)


def plot(table: dict, sft_reward: float, path: Path, title: str, methods=METHODS) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / len(methods)
    tiers = [t for t in TIERS if t in table[methods[0]]]
    for k, method in enumerate(methods):
        xs = [t + (k - (len(methods) - 1) / 2) * width for t in range(len(tiers))]
        ours = [table[method][t]["mean"] for t in tiers]
        err = [table[method][t]["ci"] for t in tiers]
        axes[0].bar(xs, ours, width, yerr=[0 if math.isnan(e) else e for e in err], label=method, capsize=3)
        axes[1].bar(xs, [PAPER[method][TIERS.index(t)] for t in tiers], width, label=method)
    axes[0].axhline(sft_reward, color="grey", ls="--", lw=1, label="SFT policy")
    axes[0].set_title("this run (mean gold reward, 95% CI over seeds)")
    axes[1].set_title("paper (Gemma-3-270M, IMDB, README table)")
    for ax in axes:
        ax.set_xticks(range(len(tiers)), [t.capitalize() for t in tiers])
        ax.set_ylabel("mean gold reward [−3, 3]")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    save_figure(fig, path)


def main(argv=None) -> int:
    ap = parser(__doc__, "runs/madpo_tiers")
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--workers", type=int, default=2, help="training runs in parallel (one thread each)")
    ap.add_argument("--margins", choices=("rm", "oracle"), default="rm",
                    help="MADPO's margins: a reward model's (the whole pipeline) or the gold reward difference")
    ap.add_argument("--lr", type=float, default=None, help="skip the learning-rate grid and use this rate")
    ap.add_argument("--tiers", nargs="+", choices=TIERS, default=list(TIERS))
    ap.add_argument("--methods", nargs="+", default=None, help="a subset of the mode's methods (MADPO first)")
    ap.add_argument("--rm_epochs", type=int, default=None, help="reward-model epochs (its runs get their own folder)")
    ap.add_argument("--rm_lr", type=float, default=None, help="reward-model learning rate (likewise)")
    args = ap.parse_args(argv)
    oracle = args.margins == "oracle"
    methods = ORACLE_METHODS if oracle else METHODS
    if args.methods:
        if args.methods[0] != methods[0] or not set(args.methods) <= set(methods):
            ap.error(f"--methods: a subset of {methods} starting with {methods[0]}")
        methods = tuple(args.methods)
    tiers = [t for t in TIERS if t in args.tiers]
    t0 = time.time()
    cfg = dict(QUICK if args.quick else FULL)
    rm_tag = ""
    for key in ("rm_epochs", "rm_lr"):
        if getattr(args, key) is not None and getattr(args, key) != cfg[key]:
            cfg[key] = getattr(args, key)
            rm_tag = f"_rm{cfg['rm_epochs']}ep{cfg['rm_lr']:g}"
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
    sft_eval = evaluate(sft, eval_prompts, cfg, cache=sft / "eval.json")

    def data_for(tier: str, seed: int, method: str = "") -> tuple[Path, Path]:
        pairs = tier_pairs(rows, tier, seed)
        n_eval = max(4, len(pairs) // 10)  # the reward model's eval split (train_rm needs one)
        d = out / "data" / f"{tier}_seed{seed}"
        if method == "madpo_oracle":  # the same pairs with the gold reward difference as the margin column
            pairs = [dict(r, gold_margin=r["gold_chosen"] - r["gold_rejected"]) for r in pairs]
            return write_jsonl(pairs, d / "pairs_gold.jsonl"), d / "rm_eval.jsonl"
        return write_jsonl(pairs, d / "pairs.jsonl"), write_jsonl(pairs[:n_eval], d / "rm_eval.jsonl")

    def job(method, tier, seed, lr, tau, tag=""):
        data, rm_eval = data_for(tier, seed, method)
        run = out / "runs" / f"{tier}_seed{seed}" / f"{method}{rm_tag if method == 'madpo' else ''}{tag}"
        return train_method(method, sft, data, rm_eval, run, cfg, lr, seed, tau)

    def ev(policy: Path, prompts: list[str], name: str) -> dict:  # cached in the run folder
        return evaluate(policy, prompts, cfg, cache=policy.parent / f"{name}.json")

    pool = ThreadPoolExecutor(max(1, args.workers))
    # hyperparameters on the validation prompts (tier High, seed 0)
    val = {}
    lr_grid = [args.lr] if args.lr is not None else cfg["lr_grid"]
    if len(lr_grid) > 1:
        futs = {("dpo", lr): pool.submit(job, "dpo", "high", 0, lr, 0.0, f"_lr{lr:g}") for lr in lr_grid}
        for (_, lr), f in futs.items():
            val[f"dpo_lr{lr:g}"] = ev(f.result(), val_prompts, "val")["reward"]
        lr = max(lr_grid, key=lambda x: val[f"dpo_lr{x:g}"])
    else:
        lr = lr_grid[0]
    mad = methods[0]
    tau_grid = cfg["oracle_tau_grid" if oracle else "tau_grid"]
    futs = {tau: pool.submit(job, mad, "high", 0, lr, tau, f"_tau{tau:g}") for tau in tau_grid}
    for tau, f in futs.items():
        val[f"{mad}_tau{tau:g}"] = ev(f.result(), val_prompts, "val")["reward"]
    tau = max(tau_grid, key=lambda x: val[f"{mad}_tau{x:g}"])
    print(f"[madpo_tiers] validation: {val} -> lr {lr:g}, tau {tau:g}", flush=True)

    # the grid: every method x tier x seed (the validation runs of the chosen settings are reused), seed by seed
    futs = {}
    for seed in seeds:
        for tier in tiers:
            for method in methods:
                tag = ""
                if tier == "high" and seed == 0 and method == mad:
                    tag = f"_tau{tau:g}"
                elif tier == "high" and seed == 0 and method == "dpo" and len(lr_grid) > 1:
                    tag = f"_lr{lr:g}"
                futs[(method, tier, seed)] = pool.submit(job, method, tier, seed, lr, tau, tag)
    per_run = {}
    for key, f in futs.items():
        per_run[key] = ev(f.result(), eval_prompts, "eval")
        print(f"[madpo_tiers] {key}: {per_run[key]['reward']:+.3f}", flush=True)
    pool.shutdown()

    if oracle:
        rm = {f"{t}/{s}": oracle_diagnostics(out / "data" / f"{t}_seed{s}" / "pairs_gold.jsonl", cfg, tau)
              for t in tiers for s in seeds}
    else:
        held = heldout_pairs(sft, val_prompts, cfg, out / "data" / "heldout_pairs.jsonl")
        rm = {f"{t}/{s}": rm_diagnostics(futs[("madpo", t, s)].result().parent, held) for t in tiers for s in seeds}
    table = {m: {t: dict(zip(("mean", "ci"), mean_ci([per_run[(m, t, s)]["reward"] for s in seeds])))
                 for t in tiers} for m in methods}
    result = {"mode": "quick" if args.quick else "full", "margins": args.margins, "seeds": len(seeds),
              "rm_epochs": cfg["rm_epochs"], "rm_lr": cfg["rm_lr"],
              "n_pairs": len(rows), "n_eval_prompts": len(eval_prompts), "lr": lr, "tau": tau, "validation": val,
              "sft_reward": sft_eval["reward"], "sft_reward_ci": sft_eval["ci"], **data_stats,
              "table": table, "per_run": {"/".join(map(str, k)): v["reward"] for k, v in per_run.items()},
              ("oracle_margins" if oracle else "reward_model"): rm,
              "paper": {m: dict(zip(TIERS, PAPER[m])) for m in methods}}
    img_root = Path(args.docs) if args.docs else out
    png = img_root / "img" / f"madpo_tiers{'_oracle' if oracle else rm_tag}{'_quick' if args.quick else ''}.png"
    plot(table, sft_eval["reward"], png, f"MADPO v1 design at CPU scale ({len(seeds)} seeds"
         f"{', gold-reward margins' if oracle else ''})", methods)
    result["png"] = str(png)
    result["seconds"] = round(time.time() - t0, 1)
    print(f"[madpo_tiers] SFT policy: {sft_eval['reward']:+.3f} ± {sft_eval['ci']:.3f}")
    for m in methods:
        cells = "  ".join(f"{t}: {table[m][t]['mean']:+.3f} ± {table[m][t]['ci']:.3f}" for t in tiers)
        print(f"[madpo_tiers] {m:>8}  {cells}   (paper {PAPER[m]})")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
