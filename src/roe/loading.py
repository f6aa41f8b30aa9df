"""Checks `RosterOfExperts.from_pretrained` makes before it loads any weights, each failing in one line.

The device and dtype are checked first (no file read), then the checkpoint's config (its model type must be one
transformers knows and RoE supports), then its weight files: a local folder must hold safetensors files whose
headers cover the whole file (a truncated download fails here, reading a few bytes, not after a traceback from
deep inside the loader). Pickle weights (`pytorch_model.bin`) are never unpickled: loading a pickle runs
arbitrary code, so RoE loads safetensors only, as `use_safetensors=True` asks transformers to.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import torch

# torch dtype names a checkpoint can be loaded in (and "auto": the dtype the checkpoint's config records)
DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "half": torch.float16,
          "fp16": torch.float16, "float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
          "float64": torch.float64, "double": torch.float64}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
MAX_REASON = 80  # characters of a library's own message quoted in ours (the whole line stays under 200)
LOADING_BAR_BYTES = 1 << 30  # a local checkpoint this large shows transformers' "Loading weights" bar
MAX_NAME = 48  # characters of a checkpoint's name or path quoted in a message (a long path keeps its end)


def label(name: str) -> str:
    """A checkpoint's name for a one-line message: quoted, a long path cut to its last characters."""
    return repr(name) if len(name) <= MAX_NAME else repr("..." + name[-(MAX_NAME - 3):])


def short(message: object) -> str:
    """The first line of a library's error message, cut to MAX_REASON characters."""
    text = str(message).strip().splitlines()[0] if str(message).strip() else type(message).__name__
    text = text.removeprefix("Error while deserializing header: ")  # safetensors' prefix says nothing here
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 3] + "..."


def check_dtype(dtype) -> torch.dtype | str:
    """"auto" (None too: the checkpoint's own dtype), a floating torch dtype, or one of DTYPES' names."""
    if dtype is None or dtype == "auto":
        return "auto"
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    raise ValueError(f"dtype {str(dtype)!r} is not supported: use auto (the checkpoint's own), bfloat16, float16, "
                     "float32 or float64")


def check_device(device) -> torch.device:
    """The torch.device `device` names, if this machine has it (so loading never ends in an assertion in torch)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {str(device)!r} is not a device name: use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r}: this PyTorch sees no CUDA GPU (not built with CUDA, or no GPU "
                             "visible); use --device cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device {str(device)!r} does not exist: this machine has {count} CUDA GPU(s), "
                             f"cuda:0 to cuda:{count - 1}")
    elif dev.type != "cpu":
        try:  # mps, xpu, ...: a zero-size tensor is the one test every backend answers
            torch.empty(0, device=dev)
        except (RuntimeError, AssertionError, AttributeError) as e:
            raise ValueError(f"device {str(device)!r} is not available here ({short(e)}); use --device cpu") from None
    return dev


def unknown_model_type(path: str, trust_remote_code: bool) -> str | None:
    """The model type of a local checkpoint's config.json that this transformers does not know, if it is one."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        data = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    kind = data.get("model_type") if isinstance(data, dict) else None
    if not isinstance(kind, str) or kind in CONFIG_MAPPING or (trust_remote_code and "auto_map" in data):
        return None
    return kind


def config_error(name: str, path: str, error: Exception, trust_remote_code: bool) -> ValueError:
    """The one line for a config AutoConfig could not load."""
    kind = unknown_model_type(path, trust_remote_code)
    if kind is not None:
        import transformers

        return ValueError(f"{label(name)} has model type {kind!r}, which transformers {transformers.__version__} does not "
                          "know: upgrade transformers, or check config.json")
    if Path(path).is_dir() and not (Path(path) / "config.json").exists():
        return ValueError(f"{label(name)} has no config.json: give a Hugging Face checkpoint folder (config.json, "
                          "*.safetensors, tokenizer files)")
    return ValueError(f"cannot load a model config from {label(name)}: {short(error)}")


def check_weights(name: str, path: str) -> None:
    """A local folder's safetensors weights are all there and whole (checked from their headers)."""
    folder = Path(path)
    if not folder.is_dir():
        return  # a hub id: the files are fetched by the loader
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise ValueError(f"{label(name)}: {index.name} is not a valid index (no weight_map); re-download it") from None
    elif (folder / "model.safetensors").exists():
        shards = ["model.safetensors"]
    else:
        pickles = sorted(f.name for f in folder.iterdir() if f.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ValueError(f"{label(name)} has only pickle weights ({pickles[0]}), which RoE never loads (unsafe): "
                             "convert them to model.safetensors")
        raise ValueError(f"{label(name)} has no weights: expected model.safetensors (or a sharded "
                         "model.safetensors.index.json)")
    for shard in shards:
        _check_safetensors(name, folder / shard)


def _check_safetensors(name: str, file: Path) -> None:
    from safetensors import safe_open

    if not file.exists():
        raise ValueError(f"{label(name)}: weight file {file.name} is missing (listed in the index); re-download it")
    try:
        with safe_open(str(file), framework="pt"):
            pass  # opening parses the header and checks that its tensors cover the file exactly
    except Exception as e:  # SafetensorError, which safetensors does not export under a stable name
        raise ValueError(f"{label(name)}: {file.name} is damaged or truncated ({short(e)}); re-download it") from None


def load_error(name: str, error: Exception) -> ValueError:
    """The one line for weights the loader could not read (a hub download, a file changed since the checks)."""
    return ValueError(f"cannot load the weights of {label(name)}: {short(error)}")


@contextlib.contextmanager
def loading_bars(path: str):
    """transformers' "Loading weights" bar only where loading takes a while: a local checkpoint of at least
    LOADING_BAR_BYTES, shown in a terminal (a hub id keeps its download bars). Loading the built-in model takes
    well under a second, and a bar per command, or bar frames in a log file, say nothing."""
    from transformers.utils import logging

    folder = Path(path)
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors")) if folder.is_dir() else None
    quiet = (size is not None and size < LOADING_BAR_BYTES) or not sys.stderr.isatty()
    was_on = logging.is_progress_bar_enabled()
    if quiet and was_on:
        logging.disable_progress_bar()
    try:
        yield
    finally:
        if quiet and was_on:
            logging.enable_progress_bar()
