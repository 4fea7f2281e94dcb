#!/usr/bin/env bash
# The CPU step rate of two source trees of this project, alternated (each round runs both), so that a
# machine busy with other work slows both alike: img/s of the same short training run, from train.csv.
#   bash tools/step_before_after.sh BEFORE_TREE AFTER_TREE [ROUNDS]
# e.g. git worktree add /tmp/before 124857d && bash tools/step_before_after.sh /tmp/before . 3
set -euo pipefail
before=$(realpath "$1") after=$(realpath "$2") rounds=${3:-3}
PY=${PY:-$(realpath .venv/bin/python)}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for round in $(seq "$rounds"); do
  for tree in "$before" "$after"; do
    rm -rf "$out/run"
    (cd "$out" && OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONPATH="$tree" "$PY" -m alexnet2gpu train \
      --dataset fashion-mnist --devices cpu --max-steps 12 -p 12 --epochs 1 --val-subset 60 --no-tensorboard \
      --out "$out/run" > /dev/null 2>&1)
    echo "round $round $tree img_per_s $(tail -1 "$out/run/train.csv" | awk -F, '{print $NF}')"
  done
done
