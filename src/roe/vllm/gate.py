"""Never silently off, and refusals that a user sees.

* The gate. vLLM resolves every deployment's model class through its one registry (`ModelRegistry`,
  `inspect_model_cls`, called while the `ModelConfig` is built, in the process that starts vLLM, before any
  engine process exists). The plugin wraps that method on the registry instance: when the hf config carries
  `roe`, the settings are validated there and the resolved architecture must be one the plugin ports, else vLLM
  stops with one line. That covers every architecture vLLM can load, its own classes and its Transformers
  backend alike, with no list of architectures to keep up to date.
* The last line. A refusal raised later, inside vLLM's engine-core or worker processes (a tau list of the
  wrong length, a KV cache layout, a parallelism setting), reaches the starting process only as "Engine core
  initialization failed" after vLLM's tracebacks. The engine process writes the one-line refusal to a file
  named after the starting process; when an uncaught exception ends the starting process, its excepthook
  prints that line (or the `roe:` line in the exception's own chain) after the traceback.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import tempfile
from functools import partial
from pathlib import Path

from .settings import GUARDED, SUPPORTED, SUPPORTED_NAMES, RoESettingsError, settings_from_hf_config

_REQUEST_GUARD = "roe.vllm.requests:RoERequestGuard"
_ADAPTIVE_GATES = "roe.vllm.adaptive:RoEAdaptiveGate"
_ENV = "ROE_VLLM_STARTER_PID"  # inherited by vLLM's engine and worker processes


def refusal(arch: str) -> str | None:
    """The one-line refusal for a resolved vLLM architecture with `roe` set (None: RoE runs it)."""
    if arch in SUPPORTED:
        return None
    if arch in GUARDED:
        return f"roe: '{arch}' {GUARDED[arch][2]}"
    return f"roe: RoE does not support '{arch}' in vLLM (it runs {SUPPORTED_NAMES})"


def install(registry) -> None:
    """Wrap `registry.inspect_model_cls` (once per process) and arrange for the last-line report."""
    if getattr(registry.inspect_model_cls, "_roe_gate", False):
        return
    original = registry.inspect_model_cls

    def inspect_model_cls(architectures, model_config, *args, **kwargs):
        info, arch = original(architectures, model_config, *args, **kwargs)
        hf_config = getattr(model_config, "hf_config", None)
        cfg = None if hf_config is None else settings_from_hf_config(hf_config)
        if cfg is not None:
            reason = refusal(arch)
            if reason is not None:
                raise RoESettingsError(reason)
            procs = list(getattr(model_config, "logits_processors", None) or [])
            # refuses per-request RoE settings at admission (requests.py); adaptive K's gates (adaptive.py)
            wanted = [_REQUEST_GUARD] + ([_ADAPTIVE_GATES] if cfg.adaptive_metric is not None else [])
            model_config.logits_processors = [*procs, *(p for p in wanted if p not in procs)]
        return info, arch

    inspect_model_cls._roe_gate = True
    registry.inspect_model_cls = inspect_model_cls
    if multiprocessing.parent_process() is None:  # the starting process (vLLM's engine processes are children
        os.environ[_ENV] = str(os.getpid())  # started by multiprocessing, and inherit the variable)
        _refusal_file(str(os.getpid())).unlink(missing_ok=True)
        sys.excepthook = partial(_excepthook, sys.excepthook)


def _refusal_file(pid: str) -> Path:
    return Path(tempfile.gettempdir()) / f"roe-vllm-refusal-{pid}.txt"


def report(message: str) -> None:
    """Called where a refusal is raised: from an engine process, leave the line for the starting process."""
    starter = os.environ.get(_ENV)
    if starter and starter != str(os.getpid()):
        try:
            _refusal_file(starter).write_text(message)
        except OSError:
            pass  # the refusal still stands in this process's own log


def _excepthook(original, kind, value, tb) -> None:
    original(kind, value, tb)
    line = None
    path = _refusal_file(str(os.getpid()))
    try:
        line = path.read_text()
        path.unlink()
    except OSError:
        seen = value
        while seen is not None and line is None:
            text = str(seen)
            line = text if text.startswith("roe:") and "\n" not in text else None
            seen = seen.__cause__ or seen.__context__
    if line:
        print(line, file=sys.stderr, flush=True)
