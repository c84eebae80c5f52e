"""`po-plugins diagnose`: check a preference dataset against a model before training, for one or more objectives
(po_plugins.diagnose).

    po-plugins diagnose --model DIR --dataset FILE.jsonl [--loss dpo,simpo,rc_dpo] [--beta B] [--apply_chat_template]
        [--input_template T] [--batch 8] [--max_batches 16] [--max_len 512] [--train_seed N] [--dtype fp32]
        [--device cpu|cuda] [--prompt_key prompt --chosen_key chosen --rejected_key rejected] [--margin_key COL]
        [--json OUT.json] [--plot OUT.png]

One forward per batch serves every objective. Prints the dataset's numbers (shared starts, length ratio, ρ and r*
of the whole responses and of their differing tokens), one row per objective (batches in band and the edge crossed,
for shared_prefix keep and detach, and its incentive ratio) and one recommendation per objective; `--json` writes
every batch's numbers; the picture (every objective's batches against its band) goes to `--plot`, or next to the
JSON. Exit 0; 1 on bad input (one line).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from po_plugins.cli._common import run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="po-plugins diagnose", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="Hugging Face model folder (the policy you will start from)")
    p.add_argument("--data", "--dataset", dest="data", required=True, help="preference JSONL (one pair per line)")
    p.add_argument("--loss", default="dpo",
                   help="the objectives to compare, comma-separated (dpo,simpo,rc_dpo; rc_* included; default dpo): "
                        "the model pass is done once, only the incentives differ")
    p.add_argument("--beta", type=float, default=None,
                   help="the β of every objective that has one (as --model.beta; default: each paper's)")
    p.add_argument("--prompt_key", default="prompt")
    p.add_argument("--chosen_key", default="chosen")
    p.add_argument("--rejected_key", default="rejected")
    p.add_argument("--margin_key", default=None, help="reward-model margin column (MADPO objectives need it)")
    p.add_argument("--apply_chat_template", action="store_true",
                   help="format with the tokenizer's chat template (as OpenRLHF's --data.apply_chat_template)")
    p.add_argument("--input_template", default=None, help="prompt template with {} (as --data.input_template)")
    p.add_argument("--batch", type=int, default=8,
                   help="pairs per batch: your optimizer step's (--train.batch_size; default 8)")
    p.add_argument("--max_batches", type=int, default=16)
    p.add_argument("--max_len", type=int, default=512,
                   help="tokens per sequence, prompt included (as --data.max_len; default 512, OpenRLHF's)")
    p.add_argument("--train_seed", type=int, default=None,
                   help="take the rows in the order OpenRLHF's sampler draws them with --train.seed N (the first "
                        "batch is then the run's first step's pairs); default: file order")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="the model's dtype (bf16: a bf16 run's forward, OpenRLHF's default; default fp32)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when torch sees one)")
    p.add_argument("--attn_implementation", default="sdpa", help="the model's attention (as --ds.attn_implementation)")
    p.add_argument("--json", default=None, help="write the full report here (and the picture next to it: same name, "
                                                ".png, unless --plot says otherwise)")
    p.add_argument("--plot", default=None,
                   help="write the picture here (PNG; needs matplotlib): every objective's batches as "
                        "(log r* - log r, rho) against the band, keep and detach; default: next to --json; "
                        "'none': no picture")
    a = p.parse_args(argv)
    from po_plugins.diagnose import describe, diagnose, plot

    png = a.plot if a.plot is not None else (str(Path(a.json).with_suffix(".png")) if a.json else None)
    if png is not None and png.lower() == "none":
        png = None
    rep = diagnose(a.model, a.data, a.loss, a.prompt_key, a.chosen_key, a.rejected_key, a.apply_chat_template,
                   a.batch, a.max_batches, a.max_len, a.input_template, a.train_seed, a.dtype, a.device, a.beta,
                   a.margin_key, a.attn_implementation)
    print("\n".join(describe(rep)))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rep, f, indent=1)
        print(f"  report: {a.json}")
    if png is not None:
        print(f"  picture: {plot(rep, png)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main))
