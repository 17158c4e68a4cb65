#!/usr/bin/env bash
# One training seed of the issue-28 students: the `shapes_small` preset distilled at STUDENT_STEPS
# (default 4) from the `shapes` teacher's training-split dump (405 scenes x 4 noise seeds, 40 DDIM steps, the
# teacher's guidance). Makes the split captions and the dump once (under runs/, shared by every seed),
# then trains runs/small-s$STUDENT_STEPS-seed$SEED; re-running the same command resumes the run where it
# stopped.
#
#   bash benchmarks/shapes_small_seed.sh SEED [STUDENT_STEPS] [MAX_STEPS]
#   bash benchmarks/shapes_small_seed.sh 1      # then: python benchmarks/heldout_curve.py --runs ...
#
# TEACHER=shapes-sd15 distils the SD-1.5-shaped teacher instead (trained on the training split only): its
# dump is runs/sd15-train-s4 and its runs runs/sd15-small-s$STUDENT_STEPS-seed$SEED.
set -euo pipefail
cd "$(dirname "$0")/.."
SEED="${1:?usage: shapes_small_seed.sh SEED [STUDENT_STEPS] [MAX_STEPS]}"
STEPS="${2:-4}"
MAX_STEPS="${3:-6000}"
export NO_ALBUMENTATIONS_UPDATE=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
PY=.venv/bin/python
TEACHER="${TEACHER:-shapes}"
case "$TEACHER" in
  shapes) DUMP=runs/shapes-train-s4; RUN="runs/small-s$STEPS-seed$SEED" ;;
  shapes-sd15) DUMP=runs/sd15-train-s4; RUN="runs/sd15-small-s$STEPS-seed$SEED" ;;
  *) echo "TEACHER must be shapes or shapes-sd15, not '$TEACHER'" >&2; exit 2 ;;
esac
[[ -f runs/split/captions_train.txt ]] || $PY -m teachers.shapes.world runs/split
if [[ ! -f $DUMP/dataset.json ]]; then
  # one process makes the dump; a second seed started at the same time waits for it
  if mkdir "$DUMP.lock" 2>/dev/null; then
    $PY -c 'import sys; from diffusion_distill import kit; kit.dump("runs/split/captions_train.txt", sys.argv[1], teacher=sys.argv[2], seeds_per_prompt=4, save_images=False)' "$DUMP" "$TEACHER"
    rmdir "$DUMP.lock"
  else
    while [[ ! -f $DUMP/dataset.json ]]; do sleep 30; done
  fi
fi
exec .venv/bin/distill train --data "$DUMP" --output "$RUN" --preset shapes_small \
  --recipe snapfusion_step --student_steps "$STEPS" --max_steps "$MAX_STEPS" --batch_size 32 --lr 2e-3 \
  --warmup_steps 300 --ema_decay 0.999 --checkpoint_every 500 --keep_checkpoints 13 --seed "$SEED"
