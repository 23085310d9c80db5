# The training queues' one step, sourced by */queue.sh: `run OUT ARGS...` trains into OUT with $COMMON plus
# ARGS, one run at a time; a finished run (its summary.json) is skipped, a cut one (its last.pt) resumed, and
# runs/queue.log records each start and end. Returns the trainer's exit status.
# Stop a queue at any point with `pkill -TERM -f perception.train.cli`: the trainer checkpoints where it is
# (inside the epoch) and exits 143, which ends the queue; starting queue.sh again resumes from there.
run() {
  local out=$1; shift
  if [ -f "$out/summary.json" ]; then echo "skip $out"; return 0; fi
  local resume=""
  [ -f "$out/last.pt" ] && resume="--resume"
  mkdir -p "$out"
  echo "$(date -u +%FT%TZ) start $out $resume" >> runs/queue.log
  python -m perception.train.cli $COMMON "$@" --out "$out" $resume >> "$out/train.log" 2>&1
  local rc=$?  # before any other command (a $(date) would reset it)
  echo "$(date -u +%FT%TZ) end $out rc=$rc" >> runs/queue.log
  return $rc
}
