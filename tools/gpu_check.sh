#!/usr/bin/env bash
# make gpu-check: what a GPU machine must show, in one script of under 8 minutes (GPU_CHECK_BUDGET).
#   machine          what torch and nvidia-smi see (and why torch sees no GPU, when that is the case)
#   gpu_tests        towers on cuda:0 + cpu and on cuda:0 alone against the fused model; LRN; GPU decode
#   gpu_tests_2gpu   towers on (cuda:0, cuda:1) against the fused model                   [2 GPUs]
#   bench_*          the model bench on cuda:0 in fp32, bf16, channels_last, compiled; the data pipeline
#                    on cuda:0; ImageNet staged against live on all cores, and decode_jpeg on the GPU
#   train_2epochs    a short training run on cuda:0 (Fashion-MNIST, or the fake set without it)
#   train_*_20       20 steps with --devices cuda:0, with --devices cuda:0,cuda:1 (make train-2gpu)
#                    and under torchrun --parallel tower-processes                         [2 GPUs]
#   agree_2gpu       their train.csv losses agree step by step (relative GPU_CHECK_REL_TOL)  [2 GPUs]
# It always ends with tools/gpu_check_summary.py's table (one row per check: PASS, FAIL or SKIP, and a
# key number or the last error line) and exits non-zero when a check failed. Everything is left under
# $OUT (default gpu-check/): NAME.out (stdout), NAME.log (stderr), NAME.rc, NAME.skip, the run folders.
#
# On a fresh GPU machine: `make gpu-check` (it runs `make setup` first). With no registry access, or
# to keep the machine's own torch: `make setup TORCH_PIN= && make gpu-check`.
# Run directly: PY=.venv/bin/python bash tools/gpu_check.sh (PY needs torch, torchvision, numpy, tqdm
# and pytest; the package is used from this tree through PYTHONPATH).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-gpu-check}
BUDGET=${GPU_CHECK_BUDGET:-480}  # seconds for all checks; a check that would start later is skipped
REL_TOL=${GPU_CHECK_REL_TOL:-2e-3}  # 1 GPU vs 2 GPUs vs torchrun: float summation order alone differs
FASHION_DIRS=${GPU_CHECK_FASHION_DIRS:-data/fashion-mnist /usr/share/datasets/fashion-mnist}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"
# no stale rows nor runs from an earlier check
rm -rf "${OUT:?}"/*.rc "${OUT:?}"/*.skip "${OUT:?}"/*.out "${OUT:?}"/*.log "${OUT:?}"/train_*
START=$(date +%s)

skip() {  # skip NAME REASON
  echo "$2" > "$OUT/$1.skip"
  echo "== $1: SKIP ($2)"
}

check() {  # check NAME LIMIT_S COMMAND...: stdout to NAME.out, stderr to NAME.log, "rc seconds limit" to NAME.rc
  local name=$1 limit=$2 left t0 rc
  shift 2
  left=$((BUDGET - ($(date +%s) - START)))
  if ((left < 15)); then
    skip "$name" "out of the script's time budget (GPU_CHECK_BUDGET=$BUDGET s)"
    return
  fi
  ((limit > left)) && limit=$left
  echo "== $name (at most $limit s)"
  t0=$(date +%s)
  timeout -k 10 "$limit" "$@" > "$OUT/$name.out" 2> "$OUT/$name.log"
  rc=$?
  echo "$rc $(($(date +%s) - t0)) $limit" > "$OUT/$name.rc"
  echo "   exit $rc after $(($(date +%s) - t0)) s"
}

echo "== machine"
t0=$(date +%s)
NGPU=$(timeout -k 5 90 $PY tools/gpu_check_machine.py "$OUT/machine.out" 2> "$OUT/machine.log")
rc=$?
echo "$rc $(($(date +%s) - t0)) 90" > "$OUT/machine.rc"
[[ "$NGPU" =~ ^[0-9]+$ ]] || NGPU=0
cat "$OUT/machine.out" 2> /dev/null
echo "   torch sees $NGPU CUDA device(s)"

DATA=(--dataset fake)
DATA_NOTE="data: the fake set (no Fashion-MNIST in: $FASHION_DIRS)"
for dir in $FASHION_DIRS; do
  if [ -d "$dir" ]; then
    DATA=(--dataset fashion-mnist --data "$dir")
    DATA_NOTE="data: Fashion-MNIST from $dir"
    break
  fi
done
echo "$DATA_NOTE"

NO_GPU="torch sees no CUDA device (see the machine row)"
ONE_GPU="needs 2 GPUs; torch sees $NGPU"
# 20 steps of the seed's recipe, logged every step, the same in all three placements (fp32, no TF32 set)
STEPS=("${DATA[@]}" --preset seed --init he -b 64 --lr 0.001 --epochs 2 --max-steps 20 -p 1 --val-subset 256
  --workers 0 --no-tensorboard --overwrite)

if ((NGPU >= 1)); then
  check gpu_tests 150 $PY -m pytest -q -p no:cacheprovider -k "not cuda1" tests/test_gpu.py tests/test_lrn.py \
    tests/test_staging.py::test_gpu_decode_gives_the_cpu_decodes_pixels
else
  skip gpu_tests "$NO_GPU"
fi
if ((NGPU >= 2)); then
  check gpu_tests_2gpu 90 $PY -m pytest -q -p no:cacheprovider -k cuda1 tests/test_gpu.py
else
  skip gpu_tests_2gpu "$ONE_GPU"
fi

if ((NGPU >= 1)); then
  check bench_fp32 120 $PY -m alexnet2gpu bench --device cuda:0 --repeats 10 --json
  check train_2epochs 150 $PY -m alexnet2gpu train "${DATA[@]}" --preset seed --init he --devices cuda:0 \
    --batch-size 60 --lr 0.001 --epochs 2 --amp bf16 --channels-last --workers 0 --out "$OUT/train_2epochs" \
    --overwrite --no-tensorboard
else
  skip bench_fp32 "$NO_GPU"
  skip train_2epochs "$NO_GPU"
fi

if ((NGPU >= 2)); then
  check train_1gpu_20 90 $PY -m alexnet2gpu train "${STEPS[@]}" --devices cuda:0 --out "$OUT/train_1gpu_20"
  check train_2gpu_20 90 $PY -m alexnet2gpu train "${STEPS[@]}" --devices cuda:0,cuda:1 --out "$OUT/train_2gpu_20"
  check train_torchrun_20 120 $PY -m torch.distributed.run --standalone --nproc-per-node 2 \
    -m alexnet2gpu train --parallel tower-processes "${STEPS[@]}" --out "$OUT/train_torchrun_20"
else
  for name in train_1gpu_20 train_2gpu_20 train_torchrun_20; do skip $name "$ONE_GPU"; done
fi

if ((NGPU >= 1)); then
  check bench_bf16 90 $PY -m alexnet2gpu bench --device cuda:0 --repeats 10 --json --amp bf16
  check bench_channels_last 90 $PY -m alexnet2gpu bench --device cuda:0 --repeats 10 --json --channels-last
  if [ "${DATA[1]}" = fashion-mnist ]; then
    check bench_data 60 $PY -m alexnet2gpu bench --data --data-dir "${DATA[3]}" --device cuda:0 --images 20000 --json
  else
    skip bench_data "the data bench needs Fashion-MNIST (none in: $FASHION_DIRS)"
  fi
  check bench_imagenet 150 $PY -m alexnet2gpu bench --imagenet --images 1000 --json
  check bench_bf16_channels_last_compile 180 $PY -m alexnet2gpu bench --device cuda:0 --repeats 10 --json \
    --amp bf16 --channels-last --compile
else
  for name in bench_bf16 bench_channels_last bench_data bench_imagenet bench_bf16_channels_last_compile; do
    skip $name "$NO_GPU"
  done
fi

echo
echo "== summary ($(($(date +%s) - START)) s in all; outputs in $OUT/)"
$PY tools/gpu_check_summary.py "$OUT" --rel-tol "$REL_TOL" --note "$DATA_NOTE"
status=$?
if ((status > 1)); then  # PY itself is broken: the summary needs the standard library alone
  python3 tools/gpu_check_summary.py "$OUT" --rel-tol "$REL_TOL" --note "$DATA_NOTE"
  status=$?
fi
if ((status > 1)); then  # the summary itself broke: still say what ran
  echo "the summary script failed (exit $status); exit codes as left in $OUT:"
  for f in "$OUT"/*.rc; do echo "  $(basename "$f" .rc): exit $(cut -d' ' -f1 "$f")"; done
  for f in "$OUT"/*.skip; do echo "  $(basename "$f" .skip): skipped, $(cat "$f")"; done
fi
exit $((status == 0 ? 0 : 1))
