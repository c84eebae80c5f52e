#!/usr/bin/env bash
# MADPO on a GPU node with the deepspeed launcher: writes WORKDIR/madpo.yaml (the GPU settings below) and runs it
# with `python -m po_plugins.cli.madpo`, so the stages, the outputs (WORKDIR/rm, WORKDIR/scored.jsonl,
# WORKDIR/policy) and the skipping of finished stages on a re-run are the pipeline's (examples/madpo/madpo.yaml
# documents every field).
# Usage: examples/madpo/run_madpo.sh SFT_MODEL PAIRS.jsonl EVAL.jsonl [WORKDIR [--dry_run | --force STAGE ...]]
# Environment: GPUS (default 8), PYTHON (default python).
set -euo pipefail
if [[ $# -lt 3 ]]; then
  sed -n 's/^# Usage: //p' "$0" >&2
  exit 2
fi
SFT=$1; DATA=$2; EVAL=$3; WORK=${4:-runs/madpo}
shift $(( $# < 4 ? $# : 4 ))
PYTHON=${PYTHON:-python}
mkdir -p "$WORK"

# JSON is YAML: the config is written by Python so that any path is quoted right. Paths that exist here are made
# absolute (the config's own relative paths would be read from WORKDIR); other values pass as hub names.
"$PYTHON" - "$SFT" "$DATA" "$EVAL" "$WORK" "${GPUS:-8}" <<'EOF'
import json, os, sys

sft, data, evals, work, gpus = sys.argv[1:]
here = lambda p: os.path.abspath(p) if os.path.exists(p) else p
gpu = {"ds.zero_stage": 3, "ds.param_dtype": "bf16", "ds.packing_samples": True,
       "model.gradient_checkpointing_enable": True, "train.micro_batch_size": 4, "train.batch_size": 128}
config = {
    "workdir": os.path.abspath(work),
    "launcher": f"deepspeed --num_gpus {gpus}",
    "data": {"dataset": here(data), "eval_dataset": here(evals), "prompt_key": "prompt", "chosen_key": "chosen",
             "rejected_key": "rejected", "max_len": 1024},
    # 1. reward model: the stock OpenRLHF trainer
    "reward_model": {"pretrain": here(sft), "flags": {**gpu, "train.max_epochs": 1, "adam.lr": 9e-6}},
    # 2. margins: every row kept in order, plus rm_margin (torchrun on every GPU, resumable, atomic)
    "scoring": {"margin_key": "rm_margin", "batch_size": 32, "nproc": int(gpus),
                "attn_implementation": "flash_attention_2"},
    # 3. margin-adaptive DPO (loss: rc_madpo adds reward calibration)
    "dpo": {"pretrain": here(sft), "loss": "madpo", "c_max": 4, "tau": 7,
            "flags": {"model.beta": 0.1, **gpu, "train.max_epochs": 2, "adam.lr": 1e-6}},
}
with open(os.path.join(work, "madpo.yaml"), "w") as f:
    json.dump(config, f, indent=1)
EOF

exec "$PYTHON" -m po_plugins.cli.madpo --config "$WORK/madpo.yaml" "$@"
