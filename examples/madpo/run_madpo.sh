#!/usr/bin/env bash
# MADPO on a GPU node with the deepspeed launcher: the same three stages as `python -m po_plugins.cli.madpo`.
# Usage: examples/madpo/run_madpo.sh SFT_MODEL PAIRS.jsonl EVAL.jsonl [WORKDIR]
set -euo pipefail
SFT=$1; DATA=$2; EVAL=$3; WORK=${4:-runs/madpo}
GPUS=${GPUS:-8}
DATA_FLAGS=(--data.dataset "$DATA" --data.prompt_key prompt --data.chosen_key chosen --data.rejected_key rejected
            --data.max_len 1024)

# 1. reward model: the stock OpenRLHF trainer
deepspeed --num_gpus "$GPUS" --module po_plugins.cli.train_rm --model.model_name_or_path "$SFT" \
  "${DATA_FLAGS[@]}" --eval.dataset "$EVAL" --ckpt.output_dir "$WORK/rm" \
  --train.micro_batch_size 4 --train.batch_size 128 --train.max_epochs 1 --adam.lr 9e-6 \
  --ds.zero_stage 3 --ds.param_dtype bf16 --ds.packing_samples --model.gradient_checkpointing_enable

# 2. margins: every row kept in order, plus rm_margin (resumable, atomic)
torchrun --nproc_per_node "$GPUS" -m po_plugins.cli.score_margins --model "$WORK/rm" \
  "${DATA_FLAGS[@]}" --output "$WORK/scored.jsonl" --margin_key rm_margin --batch_size 32 --resume \
  --attn_implementation flash_attention_2

# 3. margin-adaptive DPO (rc_madpo adds reward calibration)
deepspeed --num_gpus "$GPUS" --module po_plugins.cli.train_dpo --loss madpo --po.margin_key rm_margin \
  --po.c_max 4 --po.tau 7 --model.beta 0.1 --model.model_name_or_path "$SFT" \
  "${DATA_FLAGS[@]/$DATA/$WORK/scored.jsonl}" --ckpt.output_dir "$WORK/policy" \
  --train.micro_batch_size 4 --train.batch_size 128 --train.max_epochs 2 --adam.lr 1e-6 \
  --ds.zero_stage 3 --ds.param_dtype bf16 --ds.packing_samples --model.gradient_checkpointing_enable
