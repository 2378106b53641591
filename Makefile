# Every target sets itself up: a .venv with fastneg and all its extras, the system libraries
# FFCV builds against, and a stamp so that a second run is instant.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.stamp-install
FFCV_SYSTEM_PACKAGES := pkg-config libturbojpeg0-dev libopencv-dev

CONSTRAINTS := constraints/tested.txt

# The compatibility floor (docs/compatibility.md): Python 3.12 with the oldest supported torch,
# torchvision, numba and numpy 2.5, as on users' GPU machines: no DALI, no FFCV, no eval extras.
COMPAT_PYTHON ?= python3.12
COMPAT_VENV   := .venv-compat
COMPAT_BIN    := $(COMPAT_VENV)/bin
COMPAT_STAMP  := $(COMPAT_VENV)/.stamp-install
COMPAT_OUT    ?= $(COMPAT_VENV)/gpu_check
# What the GPU image carries besides torch/numba: Pillow, OpenCV headless, tqdm, SciPy, pytest.
COMPAT_EXTRA  := numba-cuda pillow opencv-python-headless tqdm scipy

.PHONY: setup train test bench clean test-compat compat-setup

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile $(CONSTRAINTS)
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
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) -e ".[$$extras]"
	@touch $@

train: $(STAMP)
	$(BIN)/torchrun --standalone --nproc_per_node=1 train/moco.py --loader dali --eval

# Two pytest processes: Numba's CUDA simulator must be switched on before numba is imported.
test: $(STAMP)
	$(BIN)/python -m pytest -m "not cudasim" -q
	NUMBA_ENABLE_CUDASIM=1 $(BIN)/python -m pytest -m cudasim -q

# The suite of `make test` plus benchmarks/gpu_check.sh (CPU stages; GPU stages skip with their
# reason) in .venv-compat, built from constraints/compat.txt.
compat-setup: $(COMPAT_STAMP)

$(COMPAT_STAMP): pyproject.toml Makefile constraints/compat.txt
	@py=$(COMPAT_PYTHON); \
	if ! $$py -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then \
	  v=$$(command -v pyenv >/dev/null && pyenv versions --bare 2>/dev/null | grep -E '^3\.12(\.[0-9]+)?$$' | tail -1); \
	  py=$$( [ -n "$$v" ] && PYENV_VERSION=$$v pyenv which python3.12 2>/dev/null); \
	  if [ -z "$$py" ]; then echo "make test-compat needs Python 3.12: set COMPAT_PYTHON=/path/to/python3.12" >&2; exit 2; fi; \
	fi; \
	test -x $(COMPAT_BIN)/python || $$py -m venv $(COMPAT_VENV)
	$(COMPAT_BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(COMPAT_BIN)/python -m pip install -q -c constraints/compat.txt -e ".[dev]" $(COMPAT_EXTRA)
	@touch $@

test-compat: $(COMPAT_STAMP)
	$(COMPAT_BIN)/python -m pytest -m "not cudasim" -q
	NUMBA_ENABLE_CUDASIM=1 $(COMPAT_BIN)/python -m pytest -m cudasim -q
	PYTHON=$(COMPAT_BIN)/python bash benchmarks/gpu_check.sh $(COMPAT_OUT)

bench: $(STAMP)
	$(BIN)/python benchmarks/throughput.py

clean:
	rm -rf $(VENV) $(COMPAT_VENV) *.egg-info .pytest_cache
