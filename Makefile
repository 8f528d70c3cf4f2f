# make setup   create .venv with the pinned packages (REUSE_TORCH=1 keeps a torch already installed)
# make demo    SimCLR on the built-in `shapes` data, on the CPU, a few minutes on 2 cores
#              (METHOD=moco|byol|simsiam|dino|mae|rotation: that method instead; times and figures in
#              README.md, "A demo per method")
# make test    the test suite (no network, no GPU)
# make bench   speed table on a GPU (METHOD=simclr|moco|byol|simsiam|dino|mae, BENCH_DATA=path to
#              CIFAR-10, BENCH_PY=python with torch)
# The lecture's claims, one command each (EPOCHS=, DATA=; on shapes and the CPU by default,
# CIFAR-10 on a GPU with DATA=path/to/cifar10-jpg.tar.gz; FT_EPOCHS= for the fine-tuning ones).
# Each writes results/<name>.png and .json; runs are shared between them (runs/experiments).
# make exp-temperature  SimCLR kNN against tau in {0.05, 0.1, 0.2, 0.5, 1}, and the gradient weight of
#                       each negative against its similarity (results/temperature_landscape.png, no training)
# make exp-mask-ratio   MAE linear probe and fine-tune against mask ratio in {0.15, 0.25, 0.5, 0.75, 0.9},
#                       and the error of filling the hidden patches by interpolation
#                       (on shapes give EPOCHS=20: MAE needs them)
# make exp-collapse     SimSiam without stop-grad and BYOL without predictor against the full methods
# make exp-labels       SSL (probe, fine-tune) vs supervised vs from scratch with 1%, 10%, 100% labels
# make exp-augment      SimCLR with one part of the augmentation pipeline off at a time
# make exp-pretext      rotation prediction (the early pretext task) beside SimCLR, MAE and supervised
# make exp-attention    DINO's ViT against the same ViT supervised: attention maps scored against the
#                       true shape masks (32 px shapes, its own sizes; EPOCHS= is not passed)
# make compare          the six methods, supervised and rotation under one recipe: accuracy, time, memory
# make experiments      all of the above
# make laptop CIFAR=path/to/cifar10-jpg.tar.gz   the six methods, supervised and rotation on CIFAR-10, on 2 CPU cores
# make tables  rewrite the tables of README.md and docs/*.md from results/*.json (docs/tables.py)

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BENCH_PY ?= $(PY)
BENCH_DATA ?= cifar10
BENCH_EPOCHS ?= 5
METHOD ?= simclr
EPOCHS ?= 10
DATA ?= shapes
# Small images and a narrow network for the CPU on `shapes`; the defaults (32 px, full width) otherwise.
ifeq ($(DATA),shapes)
EXP_ARGS ?= --image-size 16 --width 16 --batch-size 256 --warmup-epochs 1 --min-scale 0.6
# exp-mask-ratio's MAE on shapes: the demo's 4-block ViT, 2-block decoder and higher rate (see
# DEMO_mae below), with which it learns in 20 epochs (EPOCHS=20); ViT-Tiny's defaults need more.
MAE_EXP_ARGS ?= --depth 4 --decoder-depth 2 --lr 1e-3
endif

EXPERIMENTS := exp-temperature exp-mask-ratio exp-collapse exp-labels exp-augment exp-pretext compare
.PHONY: setup demo test bench experiments $(EXPERIMENTS) exp-attention laptop tables clean

$(VENV)/.installed: requirements.txt
ifeq ($(REUSE_TORCH),1)
	$(PYTHON) -m venv --system-site-packages $(VENV)
	grep -v '^torch' requirements.txt | $(PY) -m pip install -r /dev/stdin
else
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements.txt
endif
	touch $@

setup: $(VENV)/.installed

# One recipe per method for `make demo METHOD=...`: 16 px shapes and a narrow ResNet-18 (MAE: a
# 4-block ViT with 4 px patches), the epochs that fit about four minutes on 2 CPU cores, and a
# few departures from each method's defaults; why each, with the measurements: docs/notes.md,
# "The demos' recipes, in short". Their figures: results/demos.json (experiments/demos.py).
DEMO := --data shapes --image-size 16 --eval-every 5
DEMO_RESNET := $(DEMO) --width 16 --min-scale 0.6
DEMO_simclr := simclr.py $(DEMO_RESNET) --batch-size 256 --epochs 20 --warmup-epochs 2
DEMO_moco := moco.py $(DEMO_RESNET) --batch-size 128 --epochs 16 --queue-size 1024 --proj-bn --momentum-end 0.99
DEMO_byol := byol.py $(DEMO_RESNET) --batch-size 256 --epochs 16 --tau-base 0.8
DEMO_simsiam := simsiam.py $(DEMO_RESNET) --batch-size 256 --epochs 16
DEMO_rotation := rotation.py $(DEMO_RESNET) --batch-size 256 --epochs 30 --warmup-epochs 1
DEMO_dino := dino.py $(DEMO_RESNET) --arch resnet18 --batch-size 64 --epochs 16 --out-dim 256 --teacher-temp 0.02
DEMO_mae := mae.py $(DEMO) --batch-size 256 --patch-size 4 --depth 4 --decoder-depth 2 --lr 1e-3 --epochs 20 \
            --finetune-epochs 0

demo: $(VENV)/.installed
	@$(if $(DEMO_$(METHOD)),:,echo "make demo: METHOD=$(METHOD) is not one of simclr, moco, byol, simsiam, dino, mae, rotation"; exit 2)
	$(PY) $(DEMO_$(METHOD))

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

bench: $(if $(filter $(PY),$(BENCH_PY)),$(VENV)/.installed)
	$(BENCH_PY) bench.py $(METHOD) --data $(BENCH_DATA) --epochs $(BENCH_EPOCHS)

# exp-mask-ratio -> experiments/mask_ratio.py, compare -> experiments/compare.py
$(EXPERIMENTS): $(VENV)/.installed
	$(PY) experiments/$(subst -,_,$(patsubst exp-%,%,$@)).py --epochs $(EPOCHS) --data $(DATA) \
		$(if $(and $(FT_EPOCHS),$(filter exp-labels exp-mask-ratio,$@)),--ft-epochs $(FT_EPOCHS)) -- $(EXP_ARGS) \
		$(if $(filter exp-mask-ratio,$@),$(MAE_EXP_ARGS))

# Its own budget and sizes (32 px, 4 px patches: an 8x8 map per head): experiments/attention.py.
exp-attention: $(VENV)/.installed
	$(PY) experiments/attention.py

experiments: $(EXPERIMENTS) exp-attention

# The six methods, supervised and rotation on real CIFAR-10, at a budget a laptop's CPU can afford.
laptop: $(VENV)/.installed
	@test -n "$(CIFAR)" || { echo "make laptop: give CIFAR=path/to/cifar10-jpg.tar.gz (or cifar-10-python.tar.gz)"; exit 2; }
	$(PY) experiments/laptop.py --data $(CIFAR) -- $(LAPTOP_ARGS)

# Every table of README.md and docs/*.md from results/*.json (no torch needed).
tables:
	$(PYTHON) docs/tables.py

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
