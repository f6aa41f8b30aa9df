"""Roster of Experts: hyper-parallel inference scaling for Mixture-of-Experts language models.

The names below load on first use (PEP 562), so `import roe` (and `roe --help`, `roe.cli`) does not import
torch or transformers; `from roe import RosterOfExperts` imports them as before.
"""

from importlib import import_module

_EXPORTS = {"RoEConfig": "config", "RosterOfExperts": "roster", "UnsupportedModelError": "adapters",
            "builtin_path": "builtin", "supported_architectures": "adapters"}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value  # looked up once
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_EXPORTS])
