#!/bin/bash
# Issue 42 fold screen, the cells after the first two; one run at a time, skipping finished runs, resuming cut ones.
#   WORKTREE=/work/wt-train VENV=/work/main/.venv nohup training_state/imagenet_encoder_screen/queue.sh &
LIB="$(cd "$(dirname "$0")/.." && pwd)/queue_lib.sh"
cd "${WORKTREE:-.}"  # a worktree of this repository (runs/ is ignored there)
. "${VENV:-.venv}/bin/activate"
export PYTHONPATH=$PWD
. "$LIB"  # run OUT ARGS...
COMMON="--data ../shared/camvid --train-split train+val --seed 0 --no-progress --epochs 8 --val-every 2 \
 --recipe cpu --class-weight-power 0.5 --weight-decay 0.01 --model segnet --lr 2e-3 \
 --encoder-lr-mult 0.1 --freeze-encoder-epochs 2"
run runs/pre_0006R0/imagenet_freeze2 --holdout 0006R0 --encoder-weights imagenet
run runs/pre_0001TP/imagenet_freeze2 --holdout 0001TP --encoder-weights imagenet
run runs/pre_0006R0/hed_freeze2_bndata --holdout 0006R0 --encoder-weights hed --encoder-bn data
run runs/pre_0001TP/hed_freeze2_bndata --holdout 0001TP --encoder-weights hed --encoder-bn data
