#!/usr/bin/env bash
# One call on a lent GPU machine (device tool): the GPU checks and the held-out-drive training sweep,
# packed for the trip back. Run from the repository root, with CamVid (JPEG q95 is enough) in $DATA.
#
#   DATA=.camvid_jpg BUDGET=420 OUT=/tmp/out tools/gpu_session.sh
#   SWEEP=none OUT=/tmp/out tools/gpu_session.sh      # the checks alone (CHECK_BUDGET, default 480 s)
#
# The device tool allows 600 s a command: the checks (up to 480 s) and a sweep do not fit one call.
#
# Writes $OUT/logs.tar (gpu.txt: the card, gpu_check.{log,jsonl}, sweep.log) and part.tar.NN (runs:
# logs, metrics, curves, fp16 model folders; `cat part.tar.* | tar x`); model folders over the size
# limit go to /tmp/rest.tar on the machine (fetch it with a second call while the machine is warm).
set -u
: "${OUT:?set OUT}" "${DATA:=.camvid_jpg}" "${BUDGET:=420}" "${SWEEP:=configs/sweeps/heldout_0006R0.yaml}"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import torch, cv2; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" >> "$OUT/gpu.txt" 2>&1

# The GPU checks first, alone on the machine, so that their timings are clean. gpu_check runs the GPU tests
# itself (once) and writes each result as it gets it, so a cut by the timeout keeps what came before.
timeout "${CHECK_BUDGET:-480}" python3 tools/gpu_check.py --json "$OUT/gpu_check.jsonl" > "$OUT/gpu_check.log" 2>&1

if [ "$SWEEP" = none ]; then
  (cd "$OUT" && tar cf logs.tar gpu.txt gpu_check.log gpu_check.jsonl 2>/dev/null && rm -f gpu.txt gpu_check.log gpu_check.jsonl)
  tar xOf "$OUT/logs.tar" gpu_check.log | tail -n 40
  exit 0
fi

# A two-iteration smoke run: if bf16 + channels_last fails on this stack, the sweep runs in fp32.
EXTRA=()
if ! python3 -m perception.train.cli --model segnet --recipe robust --data "$DATA" --train-split train --val-split none \
    --epochs 1 --max-iters-per-epoch 2 --out /tmp/smoke --no-progress > "$OUT/smoke.log" 2>&1; then
  echo "smoke run failed; sweep in fp32" >> "$OUT/smoke.log"
  EXTRA=(--amp off --no-channels-last)
fi

python3 tools/train_many.py "$SWEEP" --out /tmp/sweep --budget "$BUDGET" --grace 30 -- \
  --data "$DATA" --num-workers 2 "${EXTRA[@]}" > "$OUT/sweep.log" 2>&1
python3 tools/pack_runs.py /tmp/sweep "$OUT" --first segnet_robust --rank-by holdout_0006R0 \
  --max-mib 63 --chunk-mib 15.9 --rest /tmp/rest.tar >> "$OUT/sweep.log" 2>&1
# The trip back takes few files: the logs travel in one tar.
(cd "$OUT" && tar cf logs.tar gpu.txt gpu_check.log gpu_check.jsonl smoke.log sweep.log 2>/dev/null
 rm -f gpu.txt gpu_check.log gpu_check.jsonl smoke.log)
tar xOf "$OUT/logs.tar" gpu_check.log | grep -E "^(FAIL|ok    pytest)" | head -n 20
tail -n 30 "$OUT/sweep.log"
