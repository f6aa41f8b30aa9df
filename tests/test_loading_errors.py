"""Bad checkpoints, devices and dtypes: one line under 200 characters naming the problem and the fix, from the
Python API (ValueError, raised before any weights load) and from the CLI (exit code 2, no traceback)."""

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from roe import RosterOfExperts
from roe.cli import main


def _copy(tiny_path, tmp_path, weights=True):
    src = tiny_path("olmoe")
    dst = tmp_path / "ckpt"
    dst.mkdir()
    for f in src.iterdir():
        if weights or not f.name.endswith(".safetensors"):
            shutil.copy(f, dst / f.name)
    return dst


def _refused(capsys, monkeypatch, model, pattern, *extra):
    """The API and the CLI both refuse `model` in one line matching `pattern`, without loading weights."""
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("weights were loaded"))
    with pytest.raises(ValueError, match=pattern) as info:
        RosterOfExperts.from_pretrained(str(model), **dict(zip(extra[::2], extra[1::2])))
    message = str(info.value)
    assert "\n" not in message and len(message) < 200, message
    flags = [f"--{word}" if i % 2 == 0 else word for i, word in enumerate(extra)]  # (name, value) -> --name value
    assert main(["generate", "hi", "--model", str(model), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {message}" and "Traceback" not in err


def test_pickle_only_folder(tiny_path, tmp_path, capsys, monkeypatch):
    ckpt = _copy(tiny_path, tmp_path, weights=False)
    (ckpt / "pytorch_model.bin").write_bytes(b"never unpickled")
    _refused(capsys, monkeypatch, ckpt, r"only pickle weights \(pytorch_model.bin\).*convert them to model.safetensors")


def test_folder_without_weights(tiny_path, tmp_path, capsys, monkeypatch):
    _refused(capsys, monkeypatch, _copy(tiny_path, tmp_path, weights=False), "has no weights: expected model.safetensors")


@pytest.mark.parametrize("keep", [0.5, 5])  # half the file; five bytes (not even the header's length)
def test_truncated_safetensors(tiny_path, tmp_path, capsys, monkeypatch, keep):
    ckpt = _copy(tiny_path, tmp_path)
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: int(len(data) * keep) if keep < 1 else keep])
    _refused(capsys, monkeypatch, ckpt, "model.safetensors is damaged or truncated .*; re-download it")


def test_missing_shard(tiny_path, tmp_path, capsys, monkeypatch):
    ckpt = _copy(tiny_path, tmp_path)
    (ckpt / "model.safetensors").rename(ckpt / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    _refused(capsys, monkeypatch, ckpt, "weight file model-00002-of-00002.safetensors is missing")


def test_unknown_model_type(tiny_path, tmp_path, capsys, monkeypatch):
    ckpt = _copy(tiny_path, tmp_path)
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "model_type": "frobnicator"}))
    _refused(capsys, monkeypatch, ckpt, r"model type 'frobnicator', which transformers .* does not know: upgrade")


def test_folder_without_config(tmp_path, capsys, monkeypatch):
    (tmp_path / "model.safetensors").write_bytes(b"")
    _refused(capsys, monkeypatch, tmp_path, "has no config.json")


def test_no_cuda(tiny_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _refused(capsys, monkeypatch, tiny_path("olmoe"), "sees no CUDA GPU.*use --device cpu", "device", "cuda:7")


def test_cuda_index_out_of_range(tiny_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    _refused(capsys, monkeypatch, tiny_path("olmoe"), r"'cuda:7' does not exist: .* 2 CUDA GPU\(s\), cuda:0 to cuda:1",
             "device", "cuda:7")


def test_not_a_device(tiny_path, capsys, monkeypatch):
    _refused(capsys, monkeypatch, tiny_path("olmoe"), "'gpu0' is not a device name", "device", "gpu0")


def test_bad_dtype(tiny_path, capsys, monkeypatch):
    _refused(capsys, monkeypatch, tiny_path("olmoe"), "dtype 'float8' is not supported: use auto", "dtype", "float8")


def test_dtype_names():
    from roe.loading import check_dtype

    assert check_dtype(None) == check_dtype("auto") == "auto"
    assert check_dtype("bfloat16") is check_dtype("torch.bfloat16") is check_dtype(torch.bfloat16) is torch.bfloat16
    with pytest.raises(ValueError, match="not supported"):
        check_dtype(torch.int8)
