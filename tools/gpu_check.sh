#!/usr/bin/env bash
# make gpu-check: what a one-GPU machine must show, in one script of under 8 minutes.
#   1. the GPU tests (towers on cuda:0 + cpu and on cuda:0 alone against the fused model; LRN on CUDA)
#   2. bench on cuda:0: fp32, bf16, channels_last, compiled; the data pipeline on cuda:0; ImageNet staged
#      against live on all cores, and decode_jpeg on the GPU
#   3. a short Fashion-MNIST training run on cuda:0
# It ends with a table and leaves everything under $OUT (default gpu-check/).
# Needs torch, torchvision, numpy, tqdm and pytest importable (PY=python by default; the package is
# used from this tree through PYTHONPATH). Fashion-MNIST: data/fashion-mnist/ (carry it with the
# tree) or /usr/share/datasets/fashion-mnist/.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
OUT=${OUT:-gpu-check}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
status=0
DATA_DIR=data/fashion-mnist; [ -d "$DATA_DIR" ] || DATA_DIR=/usr/share/datasets/fashion-mnist
step() { echo; echo "== $1"; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
$PY - <<'PY' || exit 1
import importlib, sys
missing = [m for m in ("torch", "torchvision", "numpy", "tqdm", "pytest") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing modules: {missing}; install them (pip install -e '.[dev]') first")
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))
PY

step "GPU tests"
timeout 120 $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_lrn.py \
  tests/test_staging.py::test_gpu_decode_gives_the_cpu_decodes_pixels 2>&1 | tee "$OUT/tests.txt" | tail -3
[ "${PIPESTATUS[0]}" = 0 ] || status=1

step "bench on cuda:0"
for opts in "" "--amp bf16" "--channels-last" "--amp bf16 --channels-last --compile"; do
  name=$(echo "fp32 $opts" | tr -d '-' | tr ' ' '_')
  timeout 150 $PY -m alexnet2gpu bench --device cuda:0 --repeats 10 --json $opts > "$OUT/bench_$name.json" \
    || { echo "bench $opts failed"; status=1; }
done
timeout 60 $PY -m alexnet2gpu bench --data --data-dir "$DATA_DIR" --device cuda:0 --images 20000 --json > "$OUT/bench_data.json" || status=1
timeout 240 $PY -m alexnet2gpu bench --imagenet --images 1000 --json > "$OUT/bench_imagenet.json" || status=1

step "Fashion-MNIST training on cuda:0 (the seed's recipe, 2 epochs)"
start=$(date +%s)
timeout 200 $PY -m alexnet2gpu train --dataset fashion-mnist --data "$DATA_DIR" --preset seed --init he \
  --devices cuda:0 --batch-size 60 --lr 0.001 --epochs 2 --amp bf16 --channels-last --workers 0 \
  --out "$OUT/fashion" --overwrite --no-tensorboard 2> "$OUT/train.log" | tail -1 | tee "$OUT/train.json" || status=1
echo "train wall time: $(( $(date +%s) - start )) s" | tee -a "$OUT/train.json"

step "summary"
$PY - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
for path in sorted(out.glob("bench_fp32*.json")):
    r = json.loads(path.read_text())
    rows = {(x["kind"], x["model"], x["batch"]): x for x in r["rows"]}
    t = rows[("train", "towers_one_device", 64)]
    print(f"{path.stem:<40} train b64: {t['img_per_s']:>8} img/s  towers/tv {r['train_ratio_vs_torchvision']:.3f}"
          f"  towers/fused {r['train_ratio_towers_vs_fused']:.3f}  matmul {r['matmul_gflop_per_s']} GFLOP/s")
data = out / "bench_data.json"
if data.exists() and data.stat().st_size:
    d = json.loads(data.read_text())
    print(f"data pipeline on cuda:0: {d['img_per_s']} (ratio {d['ratio_paper_vs_seed']})")
imagenet = out / "bench_imagenet.json"
if imagenet.exists() and imagenet.stat().st_size:
    d = json.loads(imagenet.read_text())
    print(f"ImageNet img/s: {d['img_per_s']}, GPU decode {d['gpu_decode_img_per_s']}, staged/live {d['ratio_staged_vs_raw']}")
train = out / "train.json"
if train.exists():
    print("training:", train.read_text().strip())
PY
exit $status
