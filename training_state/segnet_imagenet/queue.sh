#!/bin/bash
# Issue 42 after the fold screen: the held-out twin on 0006R0 (the schedule probe and the card's held-out
# numbers), then the long run on all 468 images. One run at a time; finished runs are skipped, cut ones resumed.
#   WORKTREE=/work/wt-train VENV=/work/main/.venv BN=identity nohup training_state/segnet_imagenet/queue.sh &
cd "${WORKTREE:-.}"  # a worktree of this repository (runs/ is ignored there)
. "${VENV:-.venv}/bin/activate"
export PYTHONPATH=$PWD
RECIPE="--data ../shared/camvid --train-split train+val --seed 0 --no-progress \
 --recipe cpu --class-weight-power 0.5 --weight-decay 0.01 --model segnet --lr 2e-3 \
 --encoder-lr-mult 0.1 --freeze-encoder-epochs 2 --encoder-weights imagenet --encoder-bn ${BN:-identity} --compile"
run() {
  local out=$1; shift
  if [ -f "$out/summary.json" ]; then echo "skip $out"; return; fi
  local resume=""
  [ -f "$out/last.pt" ] && resume="--resume"
  mkdir -p "$out"
  echo "$(date -u +%FT%TZ) start $out $resume" >> runs/queue.log
  python -m perception.train.cli $RECIPE "$@" --out "$out" $resume >> "$out/train.log" 2>&1
  local rc=$?  # before any other command (a $(date) would reset it)
  echo "$(date -u +%FT%TZ) end $out rc=$rc" >> runs/queue.log
  return $rc
}
run runs/segnet_imagenet_0006R0 --holdout 0006R0 --epochs ${TWIN_EPOCHS:-40} --val-every 4 || exit 1
