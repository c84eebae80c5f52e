"""`po-plugins diagnose`: check a preference dataset against a model before training (po_plugins.diagnose).

    po-plugins diagnose --model DIR --data FILE.jsonl [--loss dpo] [--apply_chat_template] [--batch 8]
        [--max_batches 16] [--max_len 1024] [--prompt_key prompt --chosen_key chosen --rejected_key rejected]
        [--json OUT.json]

Prints five lines (the band of the whole responses and of their differing tokens at the initial model, the shared
response starts, a recommendation); `--json` writes every batch's numbers. Exit 0; 1 on bad input (one line).
"""

from __future__ import annotations

import argparse
import json

from po_plugins.cli._common import run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="po-plugins diagnose", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="Hugging Face model folder (the policy you will start from)")
    p.add_argument("--data", "--dataset", dest="data", required=True, help="preference JSONL (one pair per line)")
    p.add_argument("--loss", default="dpo", help="the objective you plan to train (rc_* included; default dpo)")
    p.add_argument("--prompt_key", default="prompt")
    p.add_argument("--chosen_key", default="chosen")
    p.add_argument("--rejected_key", default="rejected")
    p.add_argument("--apply_chat_template", action="store_true", help="format with the tokenizer's chat template")
    p.add_argument("--batch", type=int, default=8, help="pairs per batch (your optimizer step's; default 8)")
    p.add_argument("--max_batches", type=int, default=16)
    p.add_argument("--max_len", type=int, default=1024, help="tokens per sequence, prompt included")
    p.add_argument("--json", default=None, help="write the full report here")
    a = p.parse_args(argv)
    from po_plugins.diagnose import describe, diagnose

    rep = diagnose(a.model, a.data, a.loss, a.prompt_key, a.chosen_key, a.rejected_key, a.apply_chat_template,
                   a.batch, a.max_batches, a.max_len)
    print("\n".join(describe(rep)))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rep, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main))
