# Both targets set themselves up on a fresh machine: a venv in .venv, torch pinned to the local
# CPU wheel (an unpinned torch would pull a multi-GB CUDA build), then lowbit in editable mode.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0

.PHONY: test demo clean

$(VENV)/.ready: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

test: $(VENV)/.ready
	$(PY) -m pytest -q

demo: $(VENV)/.ready
	$(PY) -m lowbit.eval.demo

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
