VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: test demo install clean

# torch first, pinned to the local CPU wheel (any other spec downloads CUDA);
# the project's own range (torch>=2.4) is then already satisfied.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest tests

demo: $(VENV)/.installed
	$(VENV)/bin/roe demo

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
