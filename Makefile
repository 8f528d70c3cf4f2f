# make setup   create .venv with the pinned packages (REUSE_TORCH=1 keeps a torch already installed)
# make demo    SimCLR on the built-in `shapes` data, on the CPU, in a few minutes
# make test    the test suite (no network, no GPU)
# make bench   speed table on a GPU (METHOD=simclr|moco|byol|simsiam|dino|mae, BENCH_DATA=path to
#              CIFAR-10, BENCH_PY=python with torch)
# make exp-collapse   SimSiam without stop-grad and BYOL without predictor against the full methods
#              (EPOCHS=, DATA=; on shapes by default, a CPU run of about 10 minutes)

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
EXP_ARGS ?= --image-size 16 --width 16 --batch-size 256 --warmup-epochs 1 --min-scale 0.3
endif

.PHONY: setup demo test bench exp-collapse clean

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

demo: $(VENV)/.installed
	$(PY) simclr.py --data shapes --image-size 16 --width 16 --batch-size 256 --epochs 15 \
		--warmup-epochs 2 --min-scale 0.3 --eval-every 5

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

bench: $(if $(filter $(PY),$(BENCH_PY)),$(VENV)/.installed)
	$(BENCH_PY) $(METHOD).py --data $(BENCH_DATA) --epochs $(BENCH_EPOCHS) --eval-every 0 --bench \
		$(if $(filter mae,$(METHOD)),--finetune-epochs 0) --out runs/bench-$(METHOD)-$$(date +%Y%m%d-%H%M%S)

exp-collapse: $(VENV)/.installed
	$(PY) experiments/collapse.py --epochs $(EPOCHS) --data $(DATA) -- $(EXP_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
