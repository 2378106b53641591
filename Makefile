# Every target sets itself up: a .venv with fastneg and all its extras, the system libraries
# FFCV builds against, and a stamp so that a second run is instant.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.stamp-install
FFCV_SYSTEM_PACKAGES := pkg-config libturbojpeg0-dev libopencv-dev

.PHONY: setup train test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	@missing=$$(for p in $(FFCV_SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	extras=all,dev; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing system packages for FFCV: $$missing"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null || exit 1; \
	  else \
	    echo "FFCV needs system packages; run: sudo apt-get install -y $$missing"; \
	    echo "carrying on without FFCV (the ffcv loader will report itself unavailable)"; \
	    extras=dali,cuda,eval,dev; \
	  fi; \
	fi; \
	$(BIN)/python -m pip install -q -e ".[$$extras]"
	@touch $@

train: $(STAMP)
	$(BIN)/torchrun --standalone --nproc_per_node=1 train/moco.py --loader dali --eval

# Two pytest processes: Numba's CUDA simulator must be switched on before numba is imported.
test: $(STAMP)
	$(BIN)/python -m pytest -m "not cudasim" -q
	NUMBA_ENABLE_CUDASIM=1 $(BIN)/python -m pytest -m cudasim -q

bench: $(STAMP)
	$(BIN)/python benchmarks/throughput.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
