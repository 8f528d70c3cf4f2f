# make setup   create .venv with the pinned packages (REUSE_TORCH=1 keeps a torch already installed)
# make demo    SimCLR on the built-in `shapes` data, on the CPU, in a few minutes
# make test    the test suite (no network, no GPU)
# make bench   SimCLR speed table on a GPU (BENCH_DATA=path to CIFAR-10, BENCH_PY=python with torch)

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BENCH_PY ?= $(PY)
BENCH_DATA ?= cifar10
BENCH_EPOCHS ?= 5

.PHONY: setup demo test bench clean

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
	$(BENCH_PY) simclr.py --data $(BENCH_DATA) --epochs $(BENCH_EPOCHS) --eval-every 0 --bench \
		--out runs/bench-simclr-$$(date +%Y%m%d-%H%M%S)

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
