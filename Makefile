# alexnet2gpu: every command a user runs. `make setup` once, then `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.14.1 / torchvision 0.29.1 are the newest releases the project is tested with. Their default
# wheels are built for CUDA 13, which needs an NVIDIA driver of 580 or newer; on an older driver torch
# sees no GPU (make train-1gpu says so): take the CUDA 12 build instead,
#   make clean && make setup TORCH_PIN="torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cu126"
# TORCH_PIN= keeps the torch of the Python that makes the venv (PYTHON, torch 2.11 to 2.14): the venv
# sees that Python's packages, and setup then works without a package registry (GPU machines here).
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1

# Training runs: `make train-1gpu DATASET=imagenet DATA=/data/imagenet-staged` (90 epochs into runs/imagenet)
# OUT holding a run is refused: continue it with ARGS="--resume $(OUT)/last.pt", or start over with ARGS=--overwrite.
# The CLI's own defaults differ only in the dataset: `python -m alexnet2gpu train` alone trains imagenet (P's).
DATASET ?= fashion-mnist
DATA ?=
# Epochs, a default of the dataset: ImageNet K12 run 145's 91; MNIST and Fashion-MNIST one epoch (1,000 steps of 60:
# about half an hour on the 2-core CPU machine, 85.1% test accuracy on Fashion-MNIST; README); fake one.
EPOCHS_imagenet := 91
EPOCHS ?= $(or $(EPOCHS_$(DATASET)),1)
OUT ?= runs/$(DATASET)
ARGS ?=
# Memory allocator, opt-in: glibc malloc hands large freed buffers back to the kernel and pays page
# faults for them at every step (docs/BENCHMARKS.md has the numbers).
#   ALLOC=keep      glibc keeps freed memory (MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_)
#   ALLOC=tcmalloc  preload tcmalloc (apt-get install libtcmalloc-minimal4)
ALLOC ?=
TCMALLOC_LIB ?= $(firstword $(wildcard /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 /usr/lib/x86_64-linux-gnu/libtcmalloc.so.4))
ALLOC_ENV_keep := MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296
ALLOC_ENV_tcmalloc = $(if $(TCMALLOC_LIB),LD_PRELOAD=$(TCMALLOC_LIB),$(error ALLOC=tcmalloc: no libtcmalloc found; apt-get install libtcmalloc-minimal4))
RUN = $(if $(ALLOC),$(ALLOC_ENV_$(ALLOC))) $(PY)
# Every variable reaches the shell quoted ($(call q,...)), so OUT='x; rm -rf ~' is a folder's name, never a
# command; the numbers are checked to be whole numbers ($(call whole,...)). ARGS alone is passed as written:
# it is the flags themselves, split by the shell as typed.
q = '$(subst ','"'"',$(1))'
no_digits = $(subst 0,,$(subst 1,,$(subst 2,,$(subst 3,,$(subst 4,,$(subst 5,,$(subst 6,,$(subst 7,,$(subst 8,,$(subst 9,,$(1)))))))))))
whole = $(if $(and $(filter 1,$(words $(1))),$(if $(call no_digits,$(1)),,yes)),$(1),$(error $(2)=$(1) is not a whole number, e.g. $(2)=2))
TRAIN = $(RUN) -m alexnet2gpu train --dataset $(call q,$(DATASET)) $(if $(DATA),--data $(call q,$(DATA))) \
  --epochs $(call whole,$(EPOCHS),EPOCHS) --out $(call q,$(OUT))
CUDA_COUNT = $(or $(shell $(PY) -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"),0)
# One line on why torch sees no GPU where nvidia-smi lists some (alexnet2gpu.devices.why_no_cuda); nothing otherwise.
SAY_WHY_NO_CUDA = $(PY) -c 'from alexnet2gpu.devices import why_no_cuda; why = why_no_cuda(); why and print("warning:", why)'

.PHONY: setup test lint clean train-2gpu train-1gpu train-dist evaluate plot demo gpu-check bench stage

setup: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
ifeq ($(strip $(TORCH_PIN)),)
# (a Python without ensurepip makes a venv without pip: pip then comes from that Python's packages)
	$(PYTHON) -m venv $(VENV) || $(PYTHON) -m venv --without-pip $(VENV)
	$(PYTHON) -c 'import site; print("\n".join([*site.getsitepackages(), site.getusersitepackages()]))' \
	  > "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/machine-site-packages.pth"
	$(PY) -m pip install --quiet --retries 1 --timeout 15 -e '.[dev]' \
	  || $(PY) -m pip install --quiet --no-deps --no-build-isolation -e . \
	  || echo "setup: alexnet2gpu is not installed in $(VENV); commands run from this folder import it from here"
else
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PIN)
	$(PY) -m pip install --quiet -e '.[dev]'
endif
	touch $@

lint: setup
	$(PY) -m ruff check alexnet2gpu tests experiments tools
	$(PY) -m ruff format --check alexnet2gpu tests experiments tools

test: lint
	$(PY) -m pytest -q --durations=10

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache

train-2gpu: setup
	@if [ "$(CUDA_COUNT)" -lt 2 ]; then \
	  $(SAY_WHY_NO_CUDA); \
	  echo "train-2gpu needs two CUDA GPUs; this machine has $(CUDA_COUNT). Use 'make train-1gpu' (both towers on one device)."; \
	  exit 1; fi
	$(TRAIN) --devices cuda:0,cuda:1 $(ARGS)

train-1gpu: setup
	@if [ "$(CUDA_COUNT)" -ge 1 ]; then \
	  $(TRAIN) --devices cuda:0 $(ARGS); \
	else \
	  $(SAY_WHY_NO_CUDA); \
	  echo "No CUDA GPU: both towers on the CPU. This is slow; the first steps print the time an epoch will take."; \
	  $(TRAIN) --devices cpu $(ARGS); fi

# One tower per process (torch.distributed): NNODES machines of NPROC ranks each, NPROC/2 tower pairs a node
# (NPROC: default the visible GPUs rounded down to even, 2 where there are fewer than two); docs/DISTRIBUTED.md.
# -b is the global batch (default 128, P 5's), split evenly over all pairs.
# On one CPU machine: make train-dist DATASET=fake EPOCHS=1 ARGS="--max-steps 4 -b 8 --preset seed --init he"
NNODES ?= 1
NPROC ?= $(shell n=$(CUDA_COUNT); [ "$$n" -ge 2 ] && echo $$((n / 2 * 2)) || echo 2)
RDZV ?= --standalone
train-dist: setup
	@if [ $$(( $(call whole,$(NPROC),NPROC) % 2 )) -ne 0 ] || [ $(NPROC) -lt 2 ]; then \
	  echo "train-dist: NPROC=$(NPROC): tower processes come in pairs, give an even number of ranks a node"; exit 2; fi
	$(VENV)/bin/torchrun --nnodes $(call whole,$(NNODES),NNODES) --nproc-per-node $(NPROC) $(RDZV) -m alexnet2gpu train \
	  --parallel tower-processes --dataset $(call q,$(DATASET)) $(if $(DATA),--data $(call q,$(DATA))) \
	  --epochs $(call whole,$(EPOCHS),EPOCHS) --out $(call q,$(OUT)) $(ARGS)

evaluate: setup
	$(RUN) -m alexnet2gpu evaluate --checkpoint $(call q,$(OUT)/last.pt) $(if $(DATA),--data $(call q,$(DATA))) $(ARGS)

plot: setup
	$(PY) -m alexnet2gpu plot $(call q,$(OUT)) $(ARGS)

# About two minutes on 2 CPU cores: the two-tower net on 3,000 Fashion-MNIST images, one epoch, the
# seed's input scaling and He init, which leave chance within the first tens of steps at batch 32;
# then the test error on 1,000 images, the figures in runs/demo/ and the top 5 of docs/fashion-mnist/
# (the default recipe, K12's, takes about half an hour an epoch on 2 cores).
demo: setup
	$(RUN) -m alexnet2gpu train --dataset fashion-mnist --preset seed --init he --devices cpu \
	  --subset 3000 --epochs 1 --batch-size 32 --val-subset 1000 --out runs/demo --overwrite
	$(RUN) -m alexnet2gpu evaluate --checkpoint runs/demo/last.pt --val-subset 1000 --devices cpu
	$(RUN) -m alexnet2gpu plot runs/demo --figure4 --neighbours-from 2000 --devices cpu
	$(RUN) -m alexnet2gpu predict --checkpoint runs/demo/last.pt docs/fashion-mnist

# One script for a GPU machine (GPU tests, bench on cuda, short training runs; with two GPUs, 1 GPU vs
# 2 GPUs vs torchrun): a table of PASS/FAIL/SKIP, non-zero exit on a FAIL; see the script. Outputs in
# gpu-check/ (or OUT=... given on the command line). Without registry access: make setup TORCH_PIN= first.
GPU_CHECK_OUT = $(if $(filter command line,$(origin OUT)),$(OUT),gpu-check)
gpu-check: setup
	PY=$(call q,$(PY)) OUT=$(call q,$(GPU_CHECK_OUT)) bash tools/gpu_check.sh

# ImageNet decoded once to 256x256 JPEG shards (hours for a million images; resumable), read straight
# out of the downloaded archives (or Kaggle's folder, or an ImageFolder tree):
#   make stage DATA=/data/ilsvrc2012 OUT=/data/imagenet-staged [ARGS="-j 16 --quality 95"]
# then train with DATA=/data/imagenet-staged
stage: setup
	@if [ -z $(call q,$(DATA)) ] || [ "$(origin OUT)" = "file" ]; then \
	  echo "make stage needs DATA=DOWNLOADS and OUT=NEW_FOLDER, e.g. make stage DATA=/data/ilsvrc2012 OUT=/data/imagenet-staged"; \
	  exit 2; fi
	$(RUN) -m alexnet2gpu stage --data $(call q,$(DATA)) --out $(call q,$(OUT)) $(ARGS)

# The model bench (CPU unless a GPU is present); `make bench ARGS=--data` for the data pipeline.
bench: setup
	$(RUN) -m alexnet2gpu bench $(ARGS)
