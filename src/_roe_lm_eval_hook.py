"""Adds RoE's `roe` model to lm-evaluation-harness's registry when `lm_eval.models` is imported.

lm-eval has no plugin entry points; `roster_of_experts_lm_eval.pth` imports this module at interpreter start.
It imports nothing heavy and does nothing unless lm-eval itself is imported.
"""

import sys
from importlib.abc import MetaPathFinder
from importlib.machinery import PathFinder


class RoELmEvalHook(MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != "lm_eval.models":
            return None
        spec = PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_register(module):
            exec_module(module)
            from lm_eval.api.registry import model_registry

            if "roe" not in model_registry:
                model_registry.register("roe", target="roe.harness:RoELM")

        spec.loader.exec_module = exec_and_register
        return spec


if not any(type(f).__name__ == "RoELmEvalHook" for f in sys.meta_path):
    sys.meta_path.insert(0, RoELmEvalHook())
