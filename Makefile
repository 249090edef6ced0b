# Two commands do everything: `make train` and `make test`. Each sets up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?= -rs
WORKDIR ?= runs/lenet5_digits

.PHONY: setup native train demo test bench clean data

setup: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(MAKE) --no-print-directory native
	touch $(STAMP)

# The native CPU kernels (cnn_jax/ops/csrc, via the XLA FFI): built here once, and
# otherwise on first use; cached by source, compiler and jaxlib version. Without a
# C++ compiler or an AVX-512 CPU the pure-JAX formulations are used (it says so).
native:
	$(PY) -c 'import sys; from cnn_jax.ops import native; sys.exit(native.main())' || true

# The main job: LeNet-5 on the embedded digits (offline). Re-running it finds the
# finished run in $(WORKDIR) and prints its metrics; `make demo` runs the notes' examples.
train: $(STAMP)
	$(PY) launch.py --config=configs/lenet5_digits.py --workdir=$(WORKDIR)

demo: $(STAMP)
	$(PY) launch.py --mode=demo

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

bench: $(STAMP)
	$(PY) benchmarks/ops.py
	$(PY) benchmarks/train.py

# `make data DATASET=name [DATA_DIR=dir] [PREPARE_ARGS=...]` prepares one dataset as
# array_record (cnn_jax/data/prepare.py). Catalog datasets need TensorFlow, which it
# installs once into .venv-data (requirements-data.txt), after its offline checks pass.
data: $(STAMP)
	@test -n "$(DATASET)" || { echo 'usage: make data DATASET=name [DATA_DIR=dir] (e.g. digits, mnist, cifar10, imagenet2012)' >&2; exit 2; }
	$(PY) -m cnn_jax.data.prepare --dataset='$(DATASET)' $(if $(DATA_DIR),--data_dir='$(DATA_DIR)') --install_tf_venv $(PREPARE_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
