"""Only here to ship the lm-eval registration hook (a .pth file) into site-packages; metadata is in pyproject.toml."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "roster_of_experts_lm_eval.pth"


class BuildPyWithPth(build_py):
    def run(self):
        super().run()
        shutil.copy(Path("src") / PTH, Path(self.build_lib) / PTH)


setup(cmdclass={"build_py": BuildPyWithPth})
