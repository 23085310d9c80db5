#!/bin/bash
# Issue 42 after the fold screen: the held-out twin on 0006R0 (the schedule probe and the card's held-out
# numbers), then the long run on all 468 images. One run at a time; finished runs are skipped, cut ones resumed.
#   WORKTREE=/work/wt-train VENV=/work/main/.venv BN=identity nohup training_state/segnet_imagenet/queue.sh &
LIB="$(cd "$(dirname "$0")/.." && pwd)/queue_lib.sh"
cd "${WORKTREE:-.}"  # a worktree of this repository (runs/ is ignored there)
. "${VENV:-.venv}/bin/activate"
export PYTHONPATH=$PWD
. "$LIB"  # run OUT ARGS...
COMMON="--data ../shared/camvid --train-split train+val --seed 0 --no-progress \
 --recipe cpu --class-weight-power 0.5 --weight-decay 0.01 --model segnet --lr 2e-3 \
 --encoder-lr-mult 0.1 --freeze-encoder-epochs 2 --encoder-weights imagenet --encoder-bn ${BN:-identity} --compile"
run runs/segnet_imagenet_0006R0 --holdout 0006R0 --epochs ${TWIN_EPOCHS:-40} --val-every 4 || exit 1
# Candidates for the last epochs, each 3 more epochs from the twin's final weights at a tenth of the peak lr
# (cosine to 0): the control on the same crops, whole 360x480 frames at scale 1 (what the node sees), and full
# median-frequency class weights (power 1 instead of 0.5).
MORE="--holdout 0006R0 --init-weights runs/segnet_imagenet_0006R0/final --epochs 3 --lr 2e-4 --warmup-epochs 0 \
 --freeze-encoder-epochs 0 --val-every 1"
if [ "${CANDIDATES:-1}" = 1 ]; then
  run runs/segnet_imagenet_0006R0_more_crops $MORE || exit 1
  run runs/segnet_imagenet_0006R0_more_whole $MORE --crop none --scale 1,1 || exit 1
  run runs/segnet_imagenet_0006R0_more_weights1 $MORE --class-weight-power 1.0 || exit 1
fi
# Bayesian SegNet's held-out twin: the same tensors (dropout has none) fine-tuned with dropout after encoders and
# decoders 3-5 from the SegNet twin's final weights; the MC-dropout gains per sample count are measured on it.
run runs/bayesian_segnet_imagenet_0006R0 --model bayesian_segnet --holdout 0006R0 \
 --init-weights runs/segnet_imagenet_0006R0/final --epochs "${BAYES_TWIN_EPOCHS:-15}" --lr 1e-3 --warmup-epochs 1 \
 --freeze-encoder-epochs 0 --val-every 3 || exit 1
# The long run on all 468 images (LONG_EPOCHS=0: stop before it). Started at 120 epochs (what ~30 CPU-hours left
# at a Zen 4's ~385 s an epoch); shortened to 80 on resume after epoch 34, when two working stretches on a 2-core
# Zen 3 (fp32, ~2,000 s an epoch) had spent 1.9 CPU-hours on 3 epochs: the cosine takes the new length from there.
[ "${LONG_EPOCHS:-80}" != 0 ] || exit 0
run runs/segnet_imagenet_all468 --val-split none --epochs "${LONG_EPOCHS:-80}" || exit 1
# Bayesian SegNet's long run: dropout fine-tuned into the long run's final weights as in its twin, on all 468
# images, 12 epochs (696 steps, the twin's 675; 20 before the budget was weighed again) of cosine from lr 1e-3
# (BAYES_LONG_EPOCHS=0: stop before).
[ "${BAYES_LONG_EPOCHS:-12}" != 0 ] || exit 0
run runs/bayesian_segnet_imagenet_all468 --model bayesian_segnet --val-split none \
 --init-weights runs/segnet_imagenet_all468/final --epochs "${BAYES_LONG_EPOCHS:-12}" --lr 1e-3 --warmup-epochs 1 \
 --freeze-encoder-epochs 0 || exit 1
