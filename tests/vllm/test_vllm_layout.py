"""The clean cache's reads of vLLM's paged CPU KV cache, for every kernel layout (isa) vLLM 0.32's CPU attention
stores: keys/values written by vLLM's own `cpu_attn_reshape_and_cache` read back exactly through the plugin."""

from types import SimpleNamespace

import pytest
import torch

from roe.vllm import RoESettingsError


def _has_amx() -> bool:
    return bool(torch.cpu._is_amx_tile_supported())


AMX_SKIP = pytest.mark.skipif(not _has_amx(), reason="this CPU has no AMX tiles: vLLM's 'amx' attention kernels "
                              "(bfloat16) cannot run here, so their cache layout is not tested on this machine")
CASES = [  # (isa, dtype, block size, head size)
    ("vec", torch.float32, 32, 64), ("vec", torch.float32, 128, 128), ("vec", torch.bfloat16, 128, 64),
    ("vec", torch.float16, 64, 96), ("vec16", torch.float32, 32, 80), ("vec16", torch.bfloat16, 16, 64),
    *[pytest.param("amx", torch.bfloat16, bs, d, marks=AMX_SKIP) for bs, d in [(32, 64), (128, 64), (128, 128),
                                                                                 (64, 256), (32, 96)]],
]


def _attn(head_size: int, isa=None):
    return SimpleNamespace(attn_backend=SimpleNamespace(get_name=lambda: "CPU_ATTN"), head_size=head_size, isa=isa)


@pytest.mark.parametrize("isa,dtype,bs,d", CASES)
def test_cache_reads_back_what_vllm_stored(isa, dtype, bs, d):
    from vllm import _custom_ops as ops

    from roe.vllm.model import _cache_views

    gen = torch.Generator().manual_seed(bs + d)
    nb, hkv = 4, 3
    cache = torch.zeros(nb, hkv, bs, 2 * d, dtype=dtype)  # vLLM's CPU cache shape [blocks, Hkv, block_size, 2*D]
    key_cache, value_cache = cache.view(nb, hkv, 2 * bs, d).chunk(2, dim=2)
    slots = torch.randperm(nb * bs, generator=gen)[: 2 * bs]  # [T] scattered over the blocks
    key, value = (torch.randn(len(slots), hkv, d, generator=gen).to(dtype) for _ in range(2))  # [T, Hkv, D]
    ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots, isa)
    got_bs, read_k, read_v = _cache_views(_attn(d, isa), cache)
    assert got_bs == bs
    b, s = slots.view(2, bs) // bs, slots.view(2, bs) % bs  # index tensors of any shape
    assert torch.equal(read_k(b, s), key.view(2, bs, hkv, d))
    assert torch.equal(read_v(b, s), value.view(2, bs, hkv, d))


@AMX_SKIP
def test_unreadable_layout_refused_at_start(monkeypatch):
    """If the plugin's reader did not match the kernel's layout, the deployment stops at start with one line."""
    import roe.vllm.model as M

    real = M._cache_views
    monkeypatch.setattr(M, "_cache_views", lambda attn, kv, isa=None: real(attn, kv, "vec"))  # wrong for amx
    cfg = SimpleNamespace(cache_config=SimpleNamespace(cache_dtype="auto", block_size=128),
                          model_config=SimpleNamespace(dtype=torch.bfloat16))
    with pytest.raises(RoESettingsError) as info:
        M._probe_layout_at_start(_attn(64), cfg)
    msg = str(info.value)
    assert msg.startswith("roe: vLLM's CPU attention (isa 'amx', torch.bfloat16) stores keys/values in a layout")
    assert "\n" not in msg and len(msg) < 200
    monkeypatch.setattr(M, "_cache_views", real)
    M._probe_layout_at_start(_attn(64), cfg)  # the real reader passes
