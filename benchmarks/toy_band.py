"""Softmax toy: does the disentanglement band predict the signs of Δz_w and Δz_l, and what does RC change?

    .venv/bin/python benchmarks/toy_band.py [--quick] [--out docs] [--workers 2]

Issue 6, experiment 1 (docs/monitor.md, docs/results_toy.md). On many random one-layer softmax toys
(po_plugins.toy: fixed contexts, trainable unembedding W, plain gradient descent, exact head score statistics)
this measures

  (a) sign accuracy: at every step, the band's gradient-flow prediction (po_plugins.band.predicted_signs on the
      effective incentives) against the realised sign of Δz_w and Δz_l after one discrete step, and
      "in band ⇔ Δz_w ≥ 0 and Δz_l ≤ 0", as a function of the learning rate (small → large), pooled over
      eight objectives (dpo, bce, simpo, cpo and their rc_ versions);
  (b) base vs reward-calibrated objective (dpo/rc_dpo, bce/rc_bce, simpo/rc_simpo, cpo/rc_cpo) at one moderate
      learning rate: final slack, in-band fraction, total Δz_w and Δz_l, the policy margin m = z_w − z_l reached
      and the implicit-reward margin, averaged over toys with 95% t-intervals (all toys, and the subset where
      DPO starts below the band, i.e. the likelihood-displacement toys);
  (c) PNGs under <out>/img/: z_w/z_l trajectories of dpo vs rc_dpo on the default displacement toy, and sign
      accuracy vs learning rate.

Toys vary the seed, the context spread (small spread → nearly collinear contexts → ρ ≈ 1), the chosen length,
whether the rejected response starts with the chosen one, how often it repeats the chosen tokens in new
contexts, and how many other tokens it has, so that some toys put DPO inside the band and some below it.
Hyperparameters are the po_plugins defaults (dpo β=0.1, bce β=1, simpo β=2 γ=1, cpo β=0.1 λ=1, RC γ_ema=0.98).
Everything is seeded; workers run single-threaded torch, so the numbers do not depend on --workers.
The last line printed is one JSON object with the headline numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PAIRS = [("dpo", "rc_dpo"), ("bce", "rc_bce"), ("simpo", "rc_simpo"), ("cpo", "rc_cpo")]
LOSSES = [n for pair in PAIRS for n in pair]

FULL = {"toys": 40, "lrs": [1e-3, 1e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 1000.0], "sign_steps": 40,
        "b_lr": 0.05, "b_steps": 200, "traj_steps": 300}
QUICK = {"toys": 3, "lrs": [1e-3, 30.0], "sign_steps": 10, "b_lr": 0.05, "b_steps": 30, "traj_steps": 30}


# ---- toys -------------------------------------------------------------------------------------------------
def make_toy(index: int, d: int = 16, vocab: int = 32):
    """A random toy; returns (Toy, description dict). Deterministic in `index`."""
    import torch

    from po_plugins.toy import Toy

    rng = random.Random(1000 + index)
    spread = rng.choice([0.05, 0.2, 0.5, 1.0, 3.0])
    n_chosen = rng.randint(1, 3)
    share_prefix = rng.random() < 0.6
    n_rep = rng.choice([0, 1, 2, 4])  # repetitions of the chosen tokens in new contexts
    n_other = rng.randint(0, 3)  # rejected tokens absent from the chosen response
    if not share_prefix and n_rep == 0 and n_other == 0:
        n_other = 1
    if share_prefix and n_rep == 0 and n_other == 0:
        n_rep = 1
    toks = rng.sample(range(vocab), n_chosen + n_other)
    chosen_toks, other_toks = toks[:n_chosen], toks[n_chosen:]
    k = 0
    chosen = []
    for t in chosen_toks:
        chosen.append((k, t))
        k += 1
    rejected = list(chosen) if share_prefix else []
    for _ in range(n_rep):
        for t in chosen_toks:
            rejected.append((k, t))
            k += 1
    for t in other_toks:
        rejected.append((k, t))
        k += 1
    g = torch.Generator().manual_seed(2000 + index)
    u = torch.randn(d, generator=g, dtype=torch.float64)
    ctx = u + spread * torch.randn(k, d, generator=g, dtype=torch.float64)
    ctx = 2.0 * ctx / ctx.norm(dim=1, keepdim=True)
    desc = {"index": index, "spread": spread, "len_w": len(chosen), "len_l": len(rejected),
            "share_prefix": share_prefix, "n_rep": n_rep, "n_other": n_other}
    return Toy(ctx, chosen, rejected, vocab), desc


# ---- workers ----------------------------------------------------------------------------------------------
def _init_worker():
    import torch

    torch.set_num_threads(1)


def _final_z(rec):
    return rec[-1]["z_w"] + rec[-1]["delta_z_w"], rec[-1]["z_l"] + rec[-1]["delta_z_l"]


def sign_job(args):
    """(a): one (toy, loss, lr) run; per-step agreement counts."""
    toy_index, loss, lr, steps = args
    from po_plugins.toy import train

    toy, _ = make_toy(toy_index)
    rec = train(loss, steps=steps, lr=lr, seed=toy_index, toy=toy)
    c = {"n": 0, "w": 0, "l": 0, "both": 0, "iff": 0, "pred_fall": 0, "pred_fall_ok": 0, "fall": 0,
         "fall_predicted": 0, "finite": 0, "in_band": 0}
    for r in rec:
        dzw, dzl = r["delta_z_w"], r["delta_z_l"]
        finite = math.isfinite(dzw) and math.isfinite(dzl)
        ok_w = finite and (dzw > 0) == (r["pred_sign_w"] > 0)
        ok_l = finite and (dzl > 0) == (r["pred_sign_l"] > 0)
        c["n"] += 1
        c["in_band"] += bool(r["in_band"])
        c["finite"] += finite
        c["w"] += ok_w
        c["l"] += ok_l
        c["both"] += ok_w and ok_l
        c["iff"] += finite and bool(r["in_band"]) == (dzw >= 0 and dzl <= 0)
        if r["pred_sign_w"] < 0:
            c["pred_fall"] += 1
            c["pred_fall_ok"] += finite and dzw < 0
        if finite and dzw < 0:
            c["fall"] += 1
            c["fall_predicted"] += r["pred_sign_w"] < 0
    return {"toy": toy_index, "loss": loss, "lr": lr, **c}


def pair_job(args):
    """(b): one (toy, loss) run at the comparison learning rate; end-of-run summary."""
    toy_index, loss, lr, steps = args
    from po_plugins.toy import train

    toy, desc = make_toy(toy_index)
    rec = train(loss, steps=steps, lr=lr, seed=toy_index, toy=toy)
    zw, zl = _final_z(rec)
    first = rec[0]
    # reference = initial W, so the implicit-reward margin is (z_w − z_l) − (z_w⁰ − z_l⁰)
    return {"toy": toy_index, "loss": loss, "desc": desc,
            "start_in_band": first["in_band"], "start_below": float(first["log_r"] < first["lower"]),
            "start_rho": first["rho"], "start_log_r_star": first["log_r_star"],
            "final_slack": rec[-1]["slack"], "in_band_frac": sum(r["in_band"] for r in rec) / len(rec),
            "dz_w": zw - first["z_w"], "dz_l": zl - first["z_l"], "margin": zw - zl,
            "reward_margin": (zw - zl) - (first["z_w"] - first["z_l"]),
            "final_alpha": rec[-1]["alpha"], "finite": all(math.isfinite(r["loss"]) for r in rec)}


def traj_job(args):
    """(c): the trajectories of the default displacement toy."""
    loss, lr, steps = args
    from po_plugins.toy import default_toy, train

    rec = train(loss, steps=steps, lr=lr, seed=0, toy=default_toy(seed=0))
    keep = ("step", "z_w", "z_l", "slack", "in_band", "alpha", "log_r", "lower", "upper")
    return loss, [{k: r[k] for k in keep} for r in rec]


def _run_all(jobs, fn, workers):
    if workers <= 1:
        _init_worker()
        return [fn(j) for j in jobs]
    import multiprocessing as mp

    with mp.get_context("fork").Pool(workers, initializer=_init_worker) as pool:
        return pool.map(fn, jobs, chunksize=1)


# ---- statistics -------------------------------------------------------------------------------------------
def t975(df: int) -> float:
    """0.975 quantile of Student's t (Cornish–Fisher expansion in 1/df; < 0.2% error for df ≥ 3)."""
    if df <= 0:
        return float("nan")
    exact = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571}
    if df in exact:
        return exact[df]
    z = 1.959964
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))


def mean_ci(xs) -> tuple[float, float, int]:
    xs = [float(x) for x in xs if math.isfinite(float(x))]
    n = len(xs)
    if n == 0:
        return float("nan"), float("nan"), 0
    m = statistics.fmean(xs)
    hw = t975(n - 1) * statistics.stdev(xs) / math.sqrt(n) if n > 1 else float("nan")
    return m, hw, n


def fmt(m, hw, digits=3):
    if not math.isfinite(m):
        return "n/a"
    return f"{m:+.{digits}f} ± {hw:.{digits}f}" if math.isfinite(hw) else f"{m:+.{digits}f}"


# ---- (a) ---------------------------------------------------------------------------------------------------
def summarise_signs(rows, lrs):
    """Per lr: accuracies pooled over losses per toy, then mean ± CI over toys; also per loss (pooled)."""
    out = []
    for lr in lrs:
        at = [r for r in rows if r["lr"] == lr]
        toys = sorted({r["toy"] for r in at})
        per_toy = {key: [] for key in ("w", "l", "both", "iff")}
        for t in toys:
            rs = [r for r in at if r["toy"] == t]
            n = sum(r["n"] for r in rs)
            for key in per_toy:
                per_toy[key].append(sum(r[key] for r in rs) / n)
        n_all = sum(r["n"] for r in at)
        fall = sum(r["pred_fall"] for r in at)
        real_fall = sum(r["fall"] for r in at)
        entry = {"lr": lr, "steps": n_all, "pred_fall_share": fall / n_all,
                 "fall_acc": (sum(r["pred_fall_ok"] for r in at) / fall) if fall else float("nan"),
                 "fall_recall": (sum(r["fall_predicted"] for r in at) / real_fall) if real_fall else float("nan"),
                 "nonfinite_share": 1 - sum(r["finite"] for r in at) / n_all,
                 "per_loss_both": {loss: sum(r["both"] for r in at if r["loss"] == loss)
                                   / max(1, sum(r["n"] for r in at if r["loss"] == loss)) for loss in LOSSES},
                 "per_loss_in_band": {loss: sum(r["in_band"] for r in at if r["loss"] == loss)
                                      / max(1, sum(r["n"] for r in at if r["loss"] == loss)) for loss in LOSSES}}
        for key, vals in per_toy.items():
            m, hw, _ = mean_ci(vals)
            entry[f"acc_{key}"], entry[f"acc_{key}_ci"] = m, hw
        out.append(entry)
    return out


# ---- (b) ---------------------------------------------------------------------------------------------------
METRICS = [("final_slack", "final slack"), ("in_band_frac", "in-band frac"), ("dz_w", "Δz_w"), ("dz_l", "Δz_l"),
           ("margin", "final m=z_w−z_l"), ("reward_margin", "reward margin")]


def summarise_pairs(rows, subset):
    """{loss: {metric: (mean, hw, n)}} and paired rc − base differences, over toys in `subset`."""
    by = {(r["toy"], r["loss"]): r for r in rows}
    table, diffs = {}, {}
    for base, rc in PAIRS:
        for loss in (base, rc):
            rs = [by[(t, loss)] for t in subset]
            table[loss] = {k: mean_ci([r[k] for r in rs]) for k, _ in METRICS}
            table[loss]["final_in_band"] = mean_ci([float(r["final_slack"] >= 0) for r in rs])
            table[loss]["dz_w_up"] = mean_ci([float(r["dz_w"] >= 0) for r in rs])
            table[loss]["infinite_slack"] = sum(not math.isfinite(r["final_slack"]) for r in rs)
        diffs[rc] = {k: mean_ci([by[(t, rc)][k] - by[(t, base)][k] for t in subset
                                 if math.isfinite(by[(t, rc)][k] - by[(t, base)][k])])
                     for k in ("in_band_frac", "dz_w", "dz_l", "margin")}
    return table, diffs


def print_pair_table(title, table, diffs, n):
    print(f"\n{title} (n = {n} toys; mean ± 95% CI over toys; final slack over toys with finite slack)")
    head = (f"{'loss':>9} | {'final slack':>16} {'end in band':>11} | {'in-band frac':>15} | {'Δz_w':>16} "
            f"{'z_w up':>6} | {'Δz_l':>16} | {'final m':>16} | {'reward margin':>16}")
    print(head)
    print("-" * len(head))
    for loss in LOSSES:
        t = table[loss]
        print(f"{loss:>9} | {fmt(*t['final_slack'][:2]):>16} {t['final_in_band'][0]:>11.2f} | "
              f"{fmt(*t['in_band_frac'][:2], digits=2):>15} | {fmt(*t['dz_w'][:2]):>16} {t['dz_w_up'][0]:>6.2f} | "
              f"{fmt(*t['dz_l'][:2]):>16} | {fmt(*t['margin'][:2]):>16} | {fmt(*t['reward_margin'][:2]):>16}")
    print("paired rc − base: " + "; ".join(
        f"{rc}: in-band {fmt(*d['in_band_frac'][:2], 2)}, Δz_w {fmt(*d['dz_w'][:2], 2)}, "
        f"Δz_l {fmt(*d['dz_l'][:2], 2)}" for rc, d in diffs.items()))


# ---- (c) ---------------------------------------------------------------------------------------------------
def plot_trajectories(traj, lr, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colors = {"dpo": "tab:red", "rc_dpo": "tab:blue"}
    for loss, rec in traj.items():
        steps = [r["step"] for r in rec]
        axes[0].plot(steps, [r["z_w"] for r in rec], color=colors[loss], lw=2, label=f"{loss} z_w (chosen)")
        axes[1].plot(steps, [r["z_l"] for r in rec], color=colors[loss], lw=2, label=f"{loss} z_l (rejected)")
        axes[2].plot(steps, [max(r["slack"], -3) for r in rec], color=colors[loss], lw=2, label=f"{loss} slack")
    axes[0].set_title("chosen log-prob z_w")
    axes[1].set_title("rejected log-prob z_l")
    axes[2].set_title("band slack (≥ 0: in band)")
    axes[2].axhline(0, color="k", lw=0.8, ls="--")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9)
    fig.suptitle(f"Default displacement toy (po_plugins.toy.default_toy, seed 0), plain GD, lr = {lr}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_accuracy(signs, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lrs = [s["lr"] for s in signs]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for key, label, color in [("w", "sign of Δz_w", "tab:blue"), ("l", "sign of Δz_l", "tab:orange"),
                              ("both", "both signs", "tab:green"),
                              ("iff", "in band ⇔ Δz_w≥0 and Δz_l≤0", "tab:purple")]:
        m = [s[f"acc_{key}"] for s in signs]
        hw = [s[f"acc_{key}_ci"] if math.isfinite(s[f"acc_{key}_ci"]) else 0.0 for s in signs]
        axes[0].plot(lrs, m, marker="o", color=color, label=label)
        axes[0].fill_between(lrs, [a - b for a, b in zip(m, hw)], [min(1.0, a + b) for a, b in zip(m, hw)],
                             color=color, alpha=0.15)
    fall = [s["fall_acc"] for s in signs]
    axes[0].plot(lrs, fall, marker="s", ls=":", color="k", label="P(z_w fell | band predicted fall)")
    axes[0].plot(lrs, [s["fall_recall"] for s in signs], marker="^", ls=":", color="gray",
                 label="P(band predicted fall | z_w fell)")
    axes[0].set_title("Band prediction vs realised step (all 8 objectives pooled; 95% CI over toys)")
    for (base, rc), color in zip(PAIRS, ["tab:red", "tab:blue", "tab:green", "tab:orange"]):
        for loss, ls, marker in ((base, "-", "o"), (rc, "--", "s")):
            axes[1].plot(lrs, [s["per_loss_both"][loss] for s in signs], marker=marker, ls=ls, color=color,
                         label=loss)
    axes[1].set_title("Both signs right, per objective (dashed: reward-calibrated)")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("learning rate (plain gradient descent)")
        ax.set_ylabel("share of steps")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _clean(v):
    """JSON-safe: non-finite floats become null, floats are rounded."""
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, float):
        return round(v, 4) if math.isfinite(v) else None
    return v


# ---- main -------------------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few toys, few steps (seconds)")
    ap.add_argument("--out", default="docs", help="folder for img/toy_*.png (default docs)")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    args = ap.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    t0 = time.perf_counter()
    toys = list(range(cfg["toys"]))
    print(f"toy_band: {'quick' if args.quick else 'full'} mode, {len(toys)} toys, {len(LOSSES)} objectives, "
          f"lrs {cfg['lrs']}, {cfg['sign_steps']} steps per sign run; comparison at lr {cfg['b_lr']} for "
          f"{cfg['b_steps']} steps; {args.workers} worker(s)")

    sign_rows = _run_all([(t, loss, lr, cfg["sign_steps"]) for lr in cfg["lrs"] for t in toys for loss in LOSSES],
                         sign_job, args.workers)
    pair_rows = _run_all([(t, loss, cfg["b_lr"], cfg["b_steps"]) for t in toys for loss in LOSSES],
                         pair_job, args.workers)
    traj = dict(_run_all([(loss, cfg["b_lr"], cfg["traj_steps"]) for loss in ("dpo", "rc_dpo")],
                         traj_job, args.workers))

    # toys
    dpo_rows = {r["toy"]: r for r in pair_rows if r["loss"] == "dpo"}
    below = [t for t in toys if dpo_rows[t]["start_below"]]
    inside = [t for t in toys if dpo_rows[t]["start_in_band"]]
    above = [t for t in toys if t not in below and t not in inside]
    rhos = [r["start_rho"] for r in dpo_rows.values()]
    print(f"\nToys at step 1 under DPO (r = 1): {len(inside)} in the band, {len(below)} below it (z_w predicted to "
          f"fall: displacement), {len(above)} above it (z_l predicted to rise); ρ range "
          f"[{min(rhos):.2f}, {max(rhos):.2f}]")

    # (a)
    signs = summarise_signs(sign_rows, cfg["lrs"])
    print("\n(a) Band sign prediction vs the realised discrete step (share of steps; mean ± 95% CI over toys, "
          "8 objectives pooled)")
    head = (f"{'lr':>7} | {'sign Δz_w':>15} | {'sign Δz_l':>15} | {'both':>15} | {'band ⇔ signs':>15} | "
            f"{'pred. fall':>10} {'P(fell|pred)':>12} {'P(pred|fell)':>12} | {'non-finite':>10}")
    print(head)
    print("-" * len(head))
    for s in signs:
        print(f"{s['lr']:>7g} | {fmt(s['acc_w'], s['acc_w_ci']):>15} | {fmt(s['acc_l'], s['acc_l_ci']):>15} | "
              f"{fmt(s['acc_both'], s['acc_both_ci']):>15} | {fmt(s['acc_iff'], s['acc_iff_ci']):>15} | "
              f"{s['pred_fall_share']:>10.3f} {s['fall_acc']:>12.3f} {s['fall_recall']:>12.3f} | "
              f"{s['nonfinite_share']:>10.3f}")
    print("per objective, both signs right:")
    print(f"{'lr':>7} | " + " ".join(f"{loss:>8}" for loss in LOSSES))
    for s in signs:
        print(f"{s['lr']:>7g} | " + " ".join(f"{s['per_loss_both'][loss]:>8.3f}" for loss in LOSSES))
    print("per objective, share of steps in the band (same runs):")
    print(f"{'lr':>7} | " + " ".join(f"{loss:>8}" for loss in LOSSES))
    for s in signs:
        print(f"{s['lr']:>7g} | " + " ".join(f"{s['per_loss_in_band'][loss]:>8.3f}" for loss in LOSSES))

    # (b)
    all_table, all_diffs = summarise_pairs(pair_rows, toys)
    print(f"\n(b) Base vs reward-calibrated objective, lr {cfg['b_lr']}, {cfg['b_steps']} steps; Δz = total change "
          f"over the run, m = z_w − z_l at the end, reward margin = m − m⁰ (reference = initial W)")
    print_pair_table("All toys", all_table, all_diffs, len(toys))
    if len(below) >= 2:
        below_table, below_diffs = summarise_pairs(pair_rows, below)
        print_pair_table("Displacement toys only (DPO starts below the band)", below_table, below_diffs, len(below))
    else:
        below_table, below_diffs = all_table, all_diffs
    nonfinite = sum(not r["finite"] for r in pair_rows)

    # (c)
    img = Path(args.out) / "img"
    img.mkdir(parents=True, exist_ok=True)
    plot_trajectories(traj, cfg["b_lr"], img / "toy_trajectories.png")
    plot_accuracy(signs, img / "toy_sign_accuracy.png")
    d, rc = traj["dpo"], traj["rc_dpo"]
    print(f"\n(c) default toy, lr {cfg['b_lr']}: dpo z_w {d[0]['z_w']:.3f} → {d[-1]['z_w']:.3f}, in band "
          f"{sum(r['in_band'] for r in d) / len(d):.2f}; rc_dpo z_w {rc[0]['z_w']:.3f} → {rc[-1]['z_w']:.3f}, in band "
          f"{sum(r['in_band'] for r in rc) / len(rc):.2f}")
    print(f"wrote {img / 'toy_trajectories.png'} and {img / 'toy_sign_accuracy.png'}")

    small, large = signs[0], signs[-1]
    headline = {
        "mode": "quick" if args.quick else "full", "n_toys": len(toys), "n_toys_dpo_below_band": len(below),
        "n_toys_dpo_in_band": len(inside), "lr_small": small["lr"], "lr_large": large["lr"],
        "sign_acc_w_small_lr": small["acc_w"], "sign_acc_l_small_lr": small["acc_l"],
        "sign_acc_both_small_lr": small["acc_both"], "band_iff_acc_small_lr": small["acc_iff"],
        "sign_acc_both_large_lr": large["acc_both"], "band_iff_acc_large_lr": large["acc_iff"],
        "fall_precision_small_lr": small["fall_acc"], "fall_precision_large_lr": large["fall_acc"],
        "fall_precision_min": min((s["fall_acc"] for s in signs if math.isfinite(s["fall_acc"])), default=math.nan),
        "sign_acc_both_by_lr": {f"{s['lr']:g}": round(s["acc_both"], 4) for s in signs},
        "dpo_in_band_by_lr": {f"{s['lr']:g}": round(s["per_loss_in_band"]["dpo"], 4) for s in signs},
        "rc_dpo_in_band_by_lr": {f"{s['lr']:g}": round(s["per_loss_in_band"]["rc_dpo"], 4) for s in signs},
        "b_lr": cfg["b_lr"], "nonfinite_runs": nonfinite,
    }
    for loss in LOSSES:
        headline[f"{loss}_in_band_frac"] = all_table[loss]["in_band_frac"][0]
        headline[f"{loss}_dz_w"] = all_table[loss]["dz_w"][0]
        headline[f"{loss}_dz_w_displacement_toys"] = below_table[loss]["dz_w"][0]
        headline[f"{loss}_margin"] = all_table[loss]["margin"][0]
    headline["seconds"] = round(time.perf_counter() - t0, 1)
    headline = {k: _clean(v) for k, v in headline.items()}
    print(json.dumps(headline, allow_nan=False))
    return headline


if __name__ == "__main__":
    main()
