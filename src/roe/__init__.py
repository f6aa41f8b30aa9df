"""Roster of Experts: hyper-parallel inference scaling for Mixture-of-Experts language models."""

from .adapters import UnsupportedModelError, supported_architectures
from .builtin import builtin_path
from .config import RoEConfig
from .roster import RosterOfExperts

__all__ = ["RoEConfig", "RosterOfExperts", "UnsupportedModelError", "builtin_path", "supported_architectures"]
__version__ = "0.1.0"
