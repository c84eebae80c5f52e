"""The shared-prefix mechanism on the demo's data: where each held-out response's change comes from (issue 21, item 1).

    python benchmarks/shared_prefix_demo.py [--out runs/shared_prefix_demo] [--seeds 3] [--losses ...] [--quick]

The demo's pairs (`po_plugins.demo`, `po_plugins.tiny.shared_pair_rows`): the rejected answer is the chosen one
continued by two more sentences, so the two responses share the chosen one's text and differ by its end token
against the continuation. Each loss is trained by the demo's own command (`po_plugins.demo.run_cli`: the real
OpenRLHF `train_dpo`, ZeRO-2, bf16, the demo's schedule), then every held-out pair is scored under the initial and the
trained model with the demo's formatting and each response's change is split into the tokens the two responses share
at their start (the same context, so the same change in both) and the rest. Variants: `loss+option=value`
(`rc_dpo+shared_prefix=detach` adds `--po.shared_prefix detach`). Seeds 0, 1, ... (assets and batch order, as
`po-plugins demo --seed`). Resumable: each finished run's `result.json` is kept. The last line printed is one JSON
object: per loss, per seed and the mean with its 95% t-interval.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import mean_ci, parser  # noqa: E402

LOSSES = ["dpo", "rc_dpo", "simpo", "rc_simpo", "rc_dpo+shared_prefix=detach", "simpo+shared_prefix=detach",
          "rc_simpo+shared_prefix=detach"]
KEYS = ["dz_w", "dz_l", "dz_shared", "dz_w_rest", "dz_l_rest", "chosen_up_frac", "in_band_frac"]


def split_logps(model_dir, rows: list[dict], max_len: int = 96) -> list[dict]:
    """Per row: the summed log-prob of the shared start of the two responses (same tokens after the same prompt, the
    demo's formatting: prompt + response + " " + eos) and of each response's rest."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from po_plugins.demo import token_logps

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32,
                                                 attn_implementation="eager").eval()

    out = []
    for r in rows:
        (iw, pw, lw), (il, pl, ll) = (token_logps(model, tok, r["prompt"], r[k], max_len)
                                      for k in ("chosen", "rejected"))
        k = 0  # shared: equal ids from the first token on, counted after the prompt
        while k < min(len(iw), len(il)) and iw[k] == il[k]:
            k += 1
        shared = max(0, k - pw) if pw == pl else 0
        out.append({"shared": float(lw[pw - 1: pw - 1 + shared].sum()), "w_rest": float(lw[pw - 1 + shared:].sum()),
                    "l_rest": float(ll[pl - 1 + shared:].sum()), "shared_tokens": shared,
                    "shared_l": float(ll[pl - 1: pl - 1 + shared].sum())})  # equal to "shared": the same context
    return out


def measure(run_dir: Path, assets: dict, initial: list[dict]) -> dict:
    from po_plugins.demo import read_rows
    from po_plugins.report import load_trace

    after = split_logps(run_dir, read_rows(assets["eval"]))
    n = len(after)
    d_sh = [a["shared"] - b["shared"] for a, b in zip(after, initial)]
    d_wr = [a["w_rest"] - b["w_rest"] for a, b in zip(after, initial)]
    d_lr = [a["l_rest"] - b["l_rest"] for a, b in zip(after, initial)]
    trace = load_trace(run_dir / "po_band.jsonl")
    verdicts = [r["in_band"] for r in trace if r.get("in_band") is not None]
    return {"dz_w": sum(d_sh[i] + d_wr[i] for i in range(n)) / n, "dz_l": sum(d_sh[i] + d_lr[i] for i in range(n)) / n,
            "dz_shared": sum(d_sh) / n, "dz_w_rest": sum(d_wr) / n, "dz_l_rest": sum(d_lr) / n,
            "chosen_up_frac": sum(d_sh[i] + d_wr[i] > 0 for i in range(n)) / n,
            "in_band_frac": sum(verdicts) / max(1, len(verdicts)),
            "shared_tokens": sum(a["shared_tokens"] for a in after) / n, "n": n}


def main(argv=None) -> int:
    ap = parser(__doc__, "runs/shared_prefix_demo")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--losses", default=",".join(LOSSES))
    args = ap.parse_args(argv)
    from po_plugins.demo import DEFAULTS, read_rows, run_cli
    from po_plugins.tiny import make_assets

    t0 = time.time()
    out = Path(args.out).resolve()
    pairs, epochs = (16, 1) if args.quick else (DEFAULTS["pairs"], DEFAULTS["epochs"])
    losses = args.losses.split(",")
    results: dict[str, list[dict]] = {loss: [] for loss in losses}
    for seed in range(args.seeds):
        base = out / f"seed{seed}"
        assets = make_assets(base / "assets", n_train=pairs, n_eval=DEFAULTS["n_eval"], seed=seed, kind="shared")
        init_file = base / "initial.json"
        if not init_file.exists():
            init_file.write_text(json.dumps(split_logps(assets["model"], read_rows(assets["eval"]))))
        initial = json.loads(init_file.read_text())
        for spec in losses:
            name, *opts = spec.split("+")
            res_file = base / spec / "result.json"
            if not res_file.exists():
                extra = ["--train.max_epochs", str(epochs)]
                for o in opts:
                    k, v = o.split("=", 1)
                    extra += [f"--po.{k}", v]
                (base / spec).mkdir(parents=True, exist_ok=True)
                run_dir = run_cli(name, assets, base / spec, extra, seed=42 + seed)
                res_file.write_text(json.dumps(measure(run_dir, assets, initial)))
            results[spec].append(json.loads(res_file.read_text()))
            print(f"[shared_prefix_demo] seed {seed} {spec}: {res_file.read_text()}", flush=True)
    summary = {loss: {k: [m, None if c != c else c] for k in KEYS for m, c in [mean_ci([r[k] for r in rs])]}
               for loss, rs in results.items()}
    print("\n| loss | Δ log π(y_w) | Δ log π(y_l) | shared start | y_w's rest | y_l's rest | chosen rose | in band |")
    print("|---|---|---|---|---|---|---|---|")
    for loss, s in summary.items():
        cells = [f"{s[k][0]:+.2f}" + ("" if s[k][1] is None else f" ± {s[k][1]:.2f}") for k in KEYS[:5]]
        cells += [f"{s[k][0]:.2f}" for k in KEYS[5:]]
        print(f"| {loss} | " + " | ".join(cells) + " |")
    print(json.dumps({"mode": "quick" if args.quick else "full", "seeds": args.seeds, "summary": summary,
                      "per_seed": results, "seconds": round(time.time() - t0, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
