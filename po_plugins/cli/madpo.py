"""The MADPO pipeline in one command (arXiv 2510.05342): reward model, margin scoring, margin-adaptive DPO.

    python -m po_plugins.cli.madpo --config madpo.yaml [--dry_run] [--force STAGE]
    python -m po_plugins.cli.madpo --example_assets examples/madpo      (tiny offline inputs for the shipped examples)

The stages, their outputs and the skip-on-rerun rule are in po_plugins/pipeline.py; every config field is documented
in examples/madpo/madpo.yaml (host: openrlhf) and examples/madpo/madpo_trl.yaml (host: trl). `--dry_run` prints the
commands and checks every input path and model the config names; it exits non-zero, naming each, when one is missing.
"""

from __future__ import annotations

import argparse
import sys

from po_plugins import pipeline
from po_plugins.cli._common import user_errors


def say(line: str, err: bool = False) -> None:
    print(line, file=sys.stderr if err else sys.stdout, flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="MADPO: reward model -> margins -> margin-adaptive DPO")
    ap.add_argument("--config", help="the pipeline's YAML (examples/madpo/madpo.yaml, examples/madpo/madpo_trl.yaml)")
    ap.add_argument("--dry_run", action="store_true", help="print the commands, check the inputs and exit")
    ap.add_argument("--force", choices=pipeline.STAGES, action="append", default=[],
                    help="re-run this stage (in every round)")
    ap.add_argument("--example_assets", metavar="DIR",
                    help="write tiny offline stand-ins for the inputs the shipped example configs name into DIR "
                         "(examples/madpo): a random tiny model at path/to/sft-model and preference pairs")
    args = ap.parse_args(argv)
    if not args.config and not args.example_assets:
        ap.error("--config is required (or --example_assets DIR)")
    with user_errors():
        if args.example_assets:
            for path, built in pipeline.example_assets(args.example_assets):
                say(f"[madpo] {'built' if built else 'kept (exists)'}: {path}")
            if not args.config:
                return 0
        cfg = pipeline.load_config(args.config)
        check = pipeline.check_inputs(cfg)
        for note in check.notes():
            say(f"[madpo] note: {note}", err=True)
        if check.missing and not args.dry_run:
            raise check.error()
        steps = pipeline.plan(cfg)
        rc = pipeline.execute(cfg, steps, say, force=args.force, dry_run=args.dry_run)
        if check.missing:
            raise check.error()
        if rc == 0:
            say(f"[madpo] policy: {steps[-1].output}")
        return rc


if __name__ == "__main__":
    raise SystemExit(main())
