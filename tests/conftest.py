import os
import sys
from pathlib import Path

# the working tree, not an installed copy, is what the tests test (subprocesses inherit it through PYTHONPATH)
SRC = str(Path(__file__).resolve().parents[1] / "src")
sys.path.insert(0, SRC)
os.environ["PYTHONPATH"] = SRC + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers.utils import logging  # noqa: E402

from tiny import save_tiny  # noqa: E402

logging.set_verbosity_error()
logging.disable_progress_bar()
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory):
    """tiny_path(arch) -> a folder with a saved tiny checkpoint of that architecture (made once per session)."""
    made = {}

    def make(arch: str):
        if arch not in made:
            made[arch] = save_tiny(arch, tmp_path_factory.mktemp(arch))
        return made[arch]

    return make
