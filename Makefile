VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export HF_DATASETS_OFFLINE := 1
# tests and the demo run the working tree; the installed copy provides the dependencies, the `roe` command and
# the lm-eval registration hook (a .pth file, which editable installs do not ship)
export PYTHONPATH := $(CURDIR)/src

.PHONY: test demo install clean

# torch first, pinned to the local CPU wheel (any other spec downloads CUDA);
# the project's own range (torch>=2.4) is then already satisfied.
$(VENV)/.installed: pyproject.toml setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q ".[test]"
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest tests

demo: $(VENV)/.installed
	$(VENV)/bin/roe demo

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
