#!/usr/bin/env bash
# One training seed of the issue-28 students: the `shapes_small` preset distilled at STUDENT_STEPS
# (default 4) from the `shapes` teacher's training-split dump (405 scenes x 4 noise seeds, 40 DDIM steps, the
# teacher's guidance). Makes the split captions and the dump once (under runs/, shared by every seed),
# then trains runs/small-s$STUDENT_STEPS-seed$SEED; re-running the same command resumes the run where it
# stopped.
#
#   bash benchmarks/shapes_small_seed.sh SEED [STUDENT_STEPS] [MAX_STEPS]
#   bash benchmarks/shapes_small_seed.sh 1      # then: python benchmarks/heldout_curve.py --runs ...
set -euo pipefail
cd "$(dirname "$0")/.."
SEED="${1:?usage: shapes_small_seed.sh SEED [STUDENT_STEPS] [MAX_STEPS]}"
STEPS="${2:-4}"
MAX_STEPS="${3:-6000}"
export NO_ALBUMENTATIONS_UPDATE=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
PY=.venv/bin/python
[[ -f runs/split/captions_train.txt ]] || $PY -m teachers.shapes.world runs/split
if [[ ! -f runs/shapes-train-s4/dataset.json ]]; then
  # one process makes the dump; a second seed started at the same time waits for it
  if mkdir runs/.dump-lock 2>/dev/null; then
    $PY -c 'from diffusion_distill import kit; kit.dump("runs/split/captions_train.txt", "runs/shapes-train-s4", seeds_per_prompt=4, save_images=False)'
    rmdir runs/.dump-lock
  else
    while [[ ! -f runs/shapes-train-s4/dataset.json ]]; do sleep 30; done
  fi
fi
exec .venv/bin/distill train --data runs/shapes-train-s4 --output "runs/small-s$STEPS-seed$SEED" --preset shapes_small \
  --recipe snapfusion_step --student_steps "$STEPS" --max_steps "$MAX_STEPS" --batch_size 32 --lr 2e-3 \
  --warmup_steps 300 --ema_decay 0.999 --checkpoint_every 500 --keep_checkpoints 13 --seed "$SEED"
