#!/bin/bash
# Issue 46: a pruned SegNet distilled from the full one. First the held-out twin (the SegNet twin of issue 42,
# pruned and fine-tuned on the 367 images without 0006R0, selected on 0006R0: the "within a point" measure),
# then the same recipe on the long-run SegNet with all 468 images (what ships as segnet_camvid_fast).
# One run at a time; finished runs are skipped, cut ones resumed. Needs a worktree whose trainer has
# --distill-from (the commit that added this file or later):
#   WORKTREE=/work/wt-train VENV=/work/main/.venv nohup training_state/segnet_fast/queue.sh &
LIB="$(cd "$(dirname "$0")/.." && pwd)/queue_lib.sh"
cd "${WORKTREE:-.}"  # a worktree of this repository (runs/ is ignored there)
. "${VENV:-.venv}/bin/activate"
export PYTHONPATH=$PWD
. "$LIB"  # run OUT ARGS...
KEEP=${KEEP:-0.625}  # 2.07x the int8 frames/s of the full SegNet on a 2-core Zen 4 (docs/benchmarks.md)
EPOCHS=${FAST_EPOCHS:-30}
# The whole network lost channels, so the encoder learns at half the decoder's rate (the twin's 0.1 protected
# ImageNet features that pruning has cut into); the teacher's soft labels carry half the loss at T = 2.
COMMON="--data ../shared/camvid --train-split train+val --seed 0 --no-progress --recipe cpu --model segnet \
 --class-weight-power 0.5 --weight-decay 0.01 --lr ${LR:-1e-3} --encoder-lr-mult ${ENCODER_LR_MULT:-0.5} \
 --warmup-epochs 1 --freeze-encoder-epochs 0 --distill-weight 0.5 --distill-temperature 2"
tag=p$(python -c "print(round(${KEEP} * 1000))")
# prune SOURCE OUT: the source folder's channels cut to KEEP (skipped when OUT exists).
prune() { [ -d "$2" ] || python tools/prune_model.py --model "$1" --keep-ratio "$KEEP" --out "$2" || return 1; }
TWIN=${TWIN:-training_state/segnet_imagenet/segnet_imagenet_0006R0/final}  # committed, fp16
prune "$TWIN" runs/segnet_fast_${tag}_0006R0_pruned || exit 1
run runs/segnet_fast_${tag}_0006R0 --holdout 0006R0 --init-weights runs/segnet_fast_${tag}_0006R0_pruned \
 --distill-from "$TWIN" --epochs "$EPOCHS" --val-every 2 || exit 1
LONG=${LONG:-runs/segnet_imagenet_all468/final}  # issue 42's long run
[ -f "$LONG/model.json" ] || { echo "$LONG is not finished: stop before the long run's pruned copy"; exit 0; }
prune "$LONG" runs/segnet_fast_${tag}_all468_pruned || exit 1
run runs/segnet_fast_${tag}_all468 --val-split none --init-weights runs/segnet_fast_${tag}_all468_pruned \
 --distill-from "$LONG" --epochs "$EPOCHS" || exit 1
