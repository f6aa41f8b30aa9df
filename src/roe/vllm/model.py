"""The RoE model classes vLLM constructs (registered by `roe.vllm.register`).

One vLLM forward carries the batch's N scheduled tokens. Each sequence's last scheduled token (the token
whose logits vLLM computes: the last prompt token at prefill, the new token at decode) is a *RoE token*:

* Rows. The forward enters with vLLM's N rows. At the entrance of the first decoder layer that holds a
  noisy MoE layer, every RoE token's hidden state (and residual, position) is copied K-1 times and appended
  after the N rows: row N + r*(K-1) + (k-1) is noisy sample k of sequence r. Layers before it compute the
  same thing for all K samples, so they run once (as the project's engine does).
* Routing. Each MoE layer's router is vLLM's own for the N rows; for the noisy rows the choice is
  TopK(router_logits + tau_layer * G) with G = roe.routing.gumbel_noise(seed, position, sample, MoE layer,
  expert) (computed on the device for the whole step, no host loop), the noise on the logit pre-image of what
  the router ranks, and the weights of the chosen experts are the router's own (routers.py: one family per kind
  of vLLM router).
* Attention (clean cache). The N rows go through vLLM's attention layer unchanged, so only their keys and
  values are written to the paged KV cache. A noisy row attends to the clean keys/values of every earlier
  position of its sequence, read from that cache through the block table, plus its own key/value for the
  current position, which is never stored. Samples share nothing but the clean history.
  MLA layers read the clean latent cache the same way (mla.py); Gated DeltaNet layers step copies of the clean
  recurrent states (recurrent.py).
* Logits. `forward` returns the N clean rows to vLLM and keeps the noisy rows' final hidden states;
  `compute_logits` computes the K logit rows of each sequence and returns the aggregate
  (log of the mean of the K softmaxes by default), a normalised log-distribution, to vLLM's sampler.

Decode-only steps run inside vLLM's compiled graph when vLLM compiles (compiled.py); steps with a prefill chunk
run the model's eager forward (the forward context's `skip_compiled`). CUDA graphs would replay a graph whose
custom ops read the step at run time (shapes and block tables that change per step), so a RoE deployment
refuses a CUDA-graph mode other than NONE.
"""

from __future__ import annotations

import importlib
import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..routing import gumbel_noise, layer_taus
from . import adaptive, compiled, gate, mla, recurrent, routers
from .attend import attend
from .history import history_blocks, reference_layer
from .settings import SUPPORTED, RoESettingsError, settings_from_hf_config


def _vllm_class(module: str, name: str):
    return getattr(importlib.import_module(f"vllm.model_executor.models.{module}"), name)


def _arch(vllm_config) -> str:
    archs = getattr(vllm_config.model_config.hf_config, "architectures", None) or ["?"]
    return archs[0]


class _Step:
    """What the hooks of one RoE forward share."""

    def __init__(self, n: int, idx: torch.Tensor, pos: torch.Tensor, k: int, query_lens: torch.Tensor):
        self.n = n  # vLLM's rows
        self.idx = idx  # [R] row of each sequence's RoE token
        self.query_lens = query_lens  # [R] tokens of each sequence in this step
        self.before: torch.Tensor | None = None  # adaptive K: [R, hidden] final hidden state of the row before idx
        self.pos = pos  # [R] its absolute position
        self.k = k
        self.extra = idx.numel() * (k - 1)  # noisy rows appended after the N rows
        self.rows = idx.repeat_interleave(k - 1)  # [extra] the vLLM row each noisy row copies
        self.noise: dict[int, torch.Tensor] = {}  # MoE ordinal -> [extra, E] tau-scaled noise
        self.widened = False
        self.parked: dict[int, torch.Tensor] = {}  # id of an N-row tensor between layers -> its noisy rows


class RoEMixin:
    """Mixed in front of a vLLM MoE model class; all behaviour is off unless the hf config has `roe`."""

    _roe_base: type  # the vLLM class
    _roe_checked_layout: bool = False

    def __new__(cls, *args, **kwargs):
        vllm_config = kwargs.get("vllm_config", args[0] if args else None)
        if settings_from_hf_config(vllm_config.model_config.hf_config) is None:
            return cls._roe_base(*args, **kwargs)  # no `roe`: exactly vLLM's own model
        return super().__new__(cls)

    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        try:
            cfg = settings_from_hf_config(vllm_config.model_config.hf_config)
            _check_deployment(vllm_config, cfg)
            super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
            self._roe_setup(cfg, vllm_config)
        except RoESettingsError as e:
            gate.report(str(e))  # in an engine process: the starting process prints the line last
            raise

    # ---- setup ----------------------------------------------------------------------------------------
    def _roe_setup(self, cfg, vllm_config) -> None:
        from vllm.model_executor.layers.attention import Attention
        from vllm.model_executor.layers.fused_moe.runner.moe_runner_interface import MoERunnerInterface

        self._roe = cfg
        self._roe_vllm_config = vllm_config
        self._roe_adaptive = None if cfg.adaptive_metric is None else (cfg.adaptive_metric, cfg.adaptive_threshold)
        self._roe_record: list | None = None  # set to a list to record (MoE ordinal, noisy experts [rows, k])
        self._roe_step: _Step | None = None
        self._roe_hidden: tuple[torch.Tensor, torch.Tensor] | None = None  # (clean rows at idx, noisy rows)
        self._roe_compiles = False
        self._roe_compiled_steps = 0  # RoE steps that ran in vLLM's compiled graph (diagnostics, tests)
        layers = self.model.layers
        moe: list[tuple[int, nn.Module]] = []  # (decoder layer, runner)
        self._roe_attn: list[tuple[int, nn.Module]] = []
        for i, layer in enumerate(layers):
            runners = [m for m in layer.modules() if isinstance(m, MoERunnerInterface)]
            if runners:
                moe.append((i, runners[0]))
            self._roe_attn += [(i, m) for m in layer.modules() if isinstance(m, Attention) or mla.is_mla(m)]
        if not moe:
            raise RoESettingsError(f"roe: this '{_arch(vllm_config)}' model has no MoE layers; RoE needs at least one")
        try:
            self._roe_taus = layer_taus(cfg.tau, cfg.skip_layers, len(moe))
        except ValueError as e:
            raise RoESettingsError(f"roe: {e}") from None
        self._roe_ref_attn = reference_layer([a for _, a in self._roe_attn])  # its metadata lists the sequences
        self._roe_experts = [int(r.router.global_num_experts) for _, r in moe]
        noisy = [i for (i, _), t in zip(moe, self._roe_taus) if t > 0]
        self._roe_fanout = noisy[0] if noisy and cfg.num_samples > 1 else None
        for m, (i, runner) in enumerate(moe):
            if self._roe_taus[m] > 0:
                _hook_router(self, m, runner)
        for i, attn in self._roe_attn:
            if self._roe_fanout is not None and i >= self._roe_fanout:
                (mla.hook if mla.is_mla(attn) else _hook_attention)(self, attn)
        special = False  # a layer kind whose hooks have no compiled form (compiled.py)
        for layer in list(layers)[self._roe_fanout :] if self._roe_fanout is not None else []:
            for m in [m for m in layer.modules() if recurrent.is_gdn(m)]:  # linear attention (Qwen3-Next)
                reason = recurrent.check_supported(m)
                if reason is not None:
                    raise RoESettingsError(reason)
                recurrent.hook(self, m)
                special = True
        special = special or any(mla.is_mla(a) for _, a in self._roe_attn)
        _log_start(cfg, self._roe_taus, _arch(vllm_config))
        if self._roe_fanout is not None:
            for attn in {(mla.is_mla(a), a.head_size): a for _, a in self._roe_attn}.values():  # one per kind
                (mla.probe_layout_at_start if mla.is_mla(attn) else _probe_layout_at_start)(attn, vllm_config)
        if self._roe_fanout is not None:
            parks = _arch(vllm_config) in PARKED  # the noisy rows wait outside the model's loop between layers
            # decode steps run in vLLM's compiled graph (compiled.py)
            self._roe_compiles = not (parks or special) and _arch(vllm_config) not in EAGER_DECODE
            for module in list(layers)[self._roe_fanout :] + ([self.model.norm] if parks else []):
                module.register_forward_pre_hook(partial(_widen, self), with_kwargs=True)
                if parks:
                    module.register_forward_hook(partial(_park, self))

    # ---- forward ----------------------------------------------------------------------------------------
    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        self._roe_step = None
        self._roe_hidden = None
        step = self._roe_begin(positions) if self._roe_fanout is not None else None
        n = positions.shape[-1]
        if step is None:  # vLLM's compiled graph holds the noisy rows (compiled.py): drop them
            hidden = super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
            return hidden[:n] if isinstance(hidden, torch.Tensor) and hidden.shape[0] > n else hidden
        from vllm.forward_context import get_forward_context

        ctx = get_forward_context()
        saved = ctx.skip_compiled
        decode_only = self._roe_compiles and step.extra == n * (step.k - 1)  # one RoE token per row
        # other steps' noisy rows are not the compiled graph's: run the model's eager forward
        ctx.skip_compiled = saved if decode_only else True
        self._roe_step = step
        try:
            hidden = super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
        finally:
            ctx.skip_compiled = saved
            self._roe_step = None
        if not step.widened and hidden.shape[0] != n + step.extra:
            raise RuntimeError("roe: the noisy rows never entered the model (the fan-out layer did not run)")
        self._roe_compiled_steps += not step.widened  # the eager hooks did not run: the compiled graph did
        if step.parked:
            hidden = torch.cat([hidden, step.parked.pop(id(hidden))], dim=0)
        if self._roe_adaptive is not None:  # the clean prediction before a chunk's RoE token (adaptive.py)
            step.before = hidden[(step.idx - 1).clamp(min=0)]
        self._roe_hidden = (hidden[step.idx], hidden[n:], step)
        return hidden[:n]

    def _roe_begin(self, positions: torch.Tensor) -> _Step | None:
        from vllm.forward_context import get_forward_context, is_forward_context_available

        if not is_forward_context_available():
            return None
        meta = get_forward_context().attn_metadata
        if isinstance(meta, list):
            raise RuntimeError("roe: speculative decoding / micro-batching is not supported with RoE")
        if not meta:  # profiling and dummy runs
            return None
        first = meta.get(self._roe_ref_attn.layer_name) if isinstance(meta, dict) else meta
        if first is None:
            return None
        qsl = first.query_start_loc
        idx = (qsl[1:] - 1).to(device=positions.device, dtype=torch.long)
        if idx.numel() == 0:
            return None
        pos = positions.reshape(-1)[idx] if positions.dim() == 1 else positions[0][idx]
        step = _Step(positions.shape[-1], idx, pos, self._roe.num_samples, (qsl[1:] - qsl[:-1]).to(pos.device))
        K, R = step.k, idx.numel()
        on = None
        if self._roe_adaptive is not None:  # a skipped sequence's noisy rows get no noise: they are the clean row
            on = adaptive.known_gates(self._roe_vllm_config, step.query_lens).repeat_interleave(K - 1)[:, None]
        seed = torch.tensor(self._roe.seed, dtype=torch.long, device=pos.device)
        sample = torch.arange(1, K, device=pos.device, dtype=torch.long)[None, :]  # [1, K-1]
        for m, tau in enumerate(self._roe_taus):
            if tau > 0:
                g = gumbel_noise(seed, pos[:, None].long(), sample, m, self._roe_experts[m])  # [R, K-1, E]
                step.noise[m] = (g * tau).reshape(R * (K - 1), -1)
                if on is not None:
                    step.noise[m] = step.noise[m] * on
        return step

    def compute_logits(self, hidden_states: torch.Tensor, *args, **kwargs):
        logits = super().compute_logits(hidden_states, *args, **kwargs)
        saved, self._roe_hidden = self._roe_hidden, None
        if saved is None or logits is None:
            return logits
        clean, noisy, step = saved
        if hidden_states.shape != clean.shape or not torch.equal(hidden_states, clean):
            raise RuntimeError(
                "roe: vLLM asked for logits of other rows than each sequence's last token "
                "(speculative decoding or prompt logprobs are not supported with RoE)"
            )
        noisy_logits = super().compute_logits(noisy, *args, **kwargs)  # [R*(K-1), V]
        R, K = clean.shape[0], step.k
        all_logits = torch.cat([logits[:, None], noisy_logits.view(R, K - 1, -1)], dim=1)  # [R, K, V]
        out = aggregate(all_logits, self._roe.aggregate)
        if self._roe_adaptive is not None:
            before = super().compute_logits(step.before, *args, **kwargs)  # [R, V]
            out = adaptive.combine(self._roe_vllm_config, self._roe_adaptive, out, logits, before, step.query_lens)
        return out.to(logits.dtype)


def aggregate(logits: torch.Tensor, how: str) -> torch.Tensor:
    """[R, K, V] -> normalised log-probs [R, V] (float32), as the project's engine aggregates."""
    logits = logits.float()
    k = logits.shape[1]
    if how == "probs":
        return torch.logsumexp(F.log_softmax(logits, dim=-1), dim=1) - math.log(k)
    if how == "logits":
        return F.log_softmax(logits.mean(dim=1), dim=-1)
    if how == "logprobs":
        return F.log_softmax(F.log_softmax(logits, dim=-1).mean(dim=1), dim=-1)
    raise ValueError(f"roe: unknown aggregate {how!r}")


def _log_start(cfg, taus, arch: str) -> None:
    """One line in vLLM's log (first tensor-parallel rank): RoE is on, and with which settings."""
    import logging

    from vllm.distributed import get_tensor_model_parallel_rank

    if get_tensor_model_parallel_rank() == 0:
        logging.getLogger("vllm.roe").info(
            "RoE on (%s): K=%d, tau per MoE layer %s, cache %s, seed %d, aggregate %s",
            arch, cfg.num_samples, [round(t, 6) for t in taus], cfg.cache, cfg.seed, cfg.aggregate,
        )


def _check_deployment(vllm_config, cfg) -> None:
    from vllm.config import CUDAGraphMode

    par = vllm_config.parallel_config
    if par.pipeline_parallel_size > 1:
        raise RoESettingsError("roe: pipeline parallelism is not supported with RoE (use tensor/expert parallelism)")
    if par.data_parallel_size > 1:
        raise RoESettingsError("roe: data parallelism is not supported with RoE (use tensor/expert parallelism)")
    if vllm_config.speculative_config is not None:
        raise RoESettingsError("roe: speculative decoding is not supported with RoE")
    mode = vllm_config.compilation_config.cudagraph_mode
    if mode is not None and mode != CUDAGraphMode.NONE:
        raise RoESettingsError(
            "roe: CUDA graphs would replay steps captured without RoE's noisy rows; start vLLM with --enforce-eager"
        )
    if cfg.adaptive_metric is not None:
        _check_adaptive_deployment(vllm_config)


def _check_adaptive_deployment(vllm_config) -> None:
    """Adaptive K keeps each sequence's gate in the sampling rank's logits step (adaptive.py)."""
    if vllm_config.parallel_config.tensor_parallel_size > 1:
        raise RoESettingsError("roe: adaptive K is not supported with tensor parallelism in vLLM (every rank must "
                               "see the gates); use tensor_parallel_size=1 or leave adaptive_metric unset")
    if vllm_config.cache_config.enable_prefix_caching:
        # a prefix-cache hit can leave one token to compute, whose previous clean prediction was never made
        # here: its gate would depend on what other requests cached
        raise RoESettingsError("roe: adaptive K in vLLM needs enable_prefix_caching=False "
                               "(--no-enable-prefix-caching)")


# ---- hooks --------------------------------------------------------------------------------------------


def _widen(model: RoEMixin, layer: nn.Module, args, kwargs):
    """Pre-hook of every decoder layer from the fan-out on: give the N-row inputs (the hidden states and
    residual at the fan-out layer, the positions at every layer) the K-1 noisy copies of each RoE token."""
    if torch.compiler.is_compiling():
        return compiled.widen(model._roe.num_samples, args, kwargs) if model._roe_compiles else None
    step = model._roe_step
    if step is None:
        return None
    n, rows = step.n, step.rows

    def grow(x):
        if isinstance(x, torch.Tensor) and x.dim() and x.shape[0] == n:
            return torch.cat([x, step.parked.pop(id(x)) if id(x) in step.parked else x[rows]], dim=0)
        return x

    step.widened = True
    return tuple(grow(a) for a in args), {k: grow(v) for k, v in kwargs.items()}


# models whose decoder loop cuts every layer's output back to the positions' length (DeepSeek's sequence-parallel
# MoE gathers rows that way): each of their layers from the fan-out on hands back the N rows and parks the noisy
# rows, which the next layer (or the final norm) takes back in
PARKED = {"DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM"}
# compiled decode steps gave other noisy rows than the eager ones from the first decode step on (clean rows and
# plain vLLM compiled agree; not understood yet): their RoE steps run eagerly, tokens as tested
EAGER_DECODE = {"Glm4MoeForCausalLM"}


def _park(model: RoEMixin, module: nn.Module, args, output):
    step = model._roe_step
    if step is None:
        return None
    n, total = step.n, step.n + step.extra

    def cut(x):
        if isinstance(x, torch.Tensor) and x.dim() and x.shape[0] == total:
            head = x[:n]
            step.parked[id(head)] = x[n:]
            return head
        return x

    return tuple(cut(x) for x in output) if isinstance(output, tuple) else cut(output)


def _hook_router(model: RoEMixin, ordinal: int, runner: nn.Module) -> None:
    """Gumbel-top-k for the noisy rows of one MoE layer (the router's family, routers.py); vLLM's own routing
    for the others."""
    router = runner.router
    route = routers.noisy_routing(router)
    if runner.is_monolithic:
        raise RoESettingsError(
            "roe: this MoE kernel routes inside the kernel (monolithic); RoE needs vLLM's modular MoE path"
        )
    original = router._compute_routing

    def compute_routing(hidden_states, router_logits, indices_type, *, input_ids=None):
        weights, ids = original(hidden_states, router_logits, indices_type, input_ids=input_ids)
        if torch.compiler.is_compiling():
            return compiled.route(router_logits, weights, ids, handle) if model._roe_compiles else (weights, ids)
        return noisy(router_logits, weights, ids)

    def noisy(router_logits, weights, ids):
        step = model._roe_step
        if step is None or router_logits.shape[0] != step.n + step.extra:
            return weights, ids
        n = step.n
        noisy_w, noisy_idx = route(router_logits[n:], step.noise[ordinal])  # the logits in vLLM's dtype
        if model._roe_record is not None:  # tests and diagnostics: the experts each noisy row visited
            model._roe_record.append((ordinal, noisy_idx.cpu()))
        weights = torch.cat([weights[:n], noisy_w.to(weights.dtype)]).contiguous()
        ids = torch.cat([ids[:n], noisy_idx.to(ids.dtype)]).contiguous()
        return weights, ids

    def at_run_time(router_logits, weights, ids):  # roe::route's body: outputs never alias its inputs
        w, i = noisy(router_logits, weights, ids)
        return (w.clone(), i.clone()) if w is weights else (w, i)

    handle = compiled.register(at_run_time)
    router._compute_routing = compute_routing


def _hook_attention(model: RoEMixin, attn: nn.Module) -> None:
    original = attn.forward
    impl = attn.impl
    if getattr(impl, "logits_soft_cap", None):
        raise RoESettingsError("roe: attention with soft-capping is not supported by the plugin")
    window = getattr(impl, "sliding_window", None)
    if isinstance(window, (tuple, list)):
        window = window[0] + 1 if window[0] >= 0 else None
    window = None if window is None or window < 0 else int(window)

    def forward(query, key, value, output_shape=None, output_dtype=None):
        if torch.compiler.is_compiling() and model._roe_compiles:
            if output_shape is not None and tuple(output_shape[1:]) != tuple(query.shape[1:]):
                raise RuntimeError("roe: a compiled RoE step needs attention outputs shaped like the queries")
            return compiled.attention(query, key, value, handle)
        return rows(query, key, value, output_shape, output_dtype)

    def at_run_time(query, key, value):  # roe::attention's body
        if model._roe_step is None:  # a dummy run through the compiled graph: the noisy rows are dropped
            n = query.shape[0] // model._roe.num_samples
            clean = original(query[:n], key[:n], value[:n])
            return torch.cat([clean, clean.new_zeros(query.shape[0] - n, *clean.shape[1:])], dim=0)
        return rows(query, key, value, None, None)

    def rows(query, key, value, output_shape, output_dtype):
        step = model._roe_step
        if step is None or query.shape[0] != step.n + step.extra:
            return original(query, key, value, output_shape=output_shape, output_dtype=output_dtype)
        n = step.n
        shape = None if output_shape is None else torch.Size((n, *output_shape[1:]))
        clean = original(query[:n], key[:n], value[:n], output_shape=shape, output_dtype=output_dtype)
        if not RoEMixin._roe_checked_layout:
            kv = attn.kv_cache[0] if isinstance(attn.kv_cache, (list, tuple)) else attn.kv_cache
            _check_layout(attn, _cache_views(attn, kv), step, key[:n], value[:n])
            RoEMixin._roe_checked_layout = True
        noisy = _noisy_attention(model, attn, step, query[n:], key[n:], value[n:], window)
        return torch.cat([clean, noisy.to(clean.dtype).reshape(noisy.shape[0], *clean.shape[1:])], dim=0)

    handle = compiled.register(at_run_time)
    attn.forward = forward


def _cache_views(attn: nn.Module, kv_cache: torch.Tensor, isa: str | None = None):
    """(block_size, read_keys, read_values): read_x(blocks, slots) -> [..., Hkv, D] for index tensors of one
    shape, gathered from the paged cache (the layouts were read off cpu_attn_reshape_and_cache's output for
    every isa, dtype, block size and head size the tests run; `_check_layout` checks them on the first step)."""
    name = attn.attn_backend.get_name()
    isa = isa or getattr(attn, "isa", None)
    if name == "CPU_ATTN" and isa in ("vec", "vec16", "amx"):
        nb, hkv, bs, d2 = kv_cache.shape
        d = d2 // 2
        region = kv_cache.view(nb, hkv, 2, bs * d)  # per block and head: all its keys, then all its values
        if isa == "amx":
            # keys in AMX B-tile order: [bs/16, D/2, 16 slots, 2 dims]; values [D/16, bs/2, 16 dims, 2 slots]
            k6 = region[:, :, 0].view(nb, hkv, bs // 16, d // 2, 16, 2).permute(0, 2, 4, 1, 3, 5)
            v6 = region[:, :, 1].view(nb, hkv, d // 16, bs // 2, 16, 2).permute(0, 3, 5, 1, 2, 4)
            return bs, (lambda b, s: k6[b, s // 16, s % 16].flatten(-2)), (lambda b, s: v6[b, s // 2, s % 2].flatten(-2))
        # "vec"/"vec16": keys transposed, [D, bs], then values [bs, D]
        keys = region[:, :, 0].view(nb, hkv, d, bs).permute(0, 3, 1, 2)  # [nb, bs, Hkv, D]
        values = region[:, :, 1].view(nb, hkv, bs, d).transpose(1, 2)
        return bs, (lambda b, s: keys[b, s]), (lambda b, s: values[b, s])
    if name == "CPU_ATTN":
        name = f"CPU_ATTN (isa {isa!r})"
    if name in ("FLASH_ATTN", "TRITON_ATTN") and kv_cache.dim() == 4:
        # vLLM 0.32's logical per-layer cache [num_blocks, Hkv, block_size, 2*D], split the way these backends
        # split it (the physical stride order is in the tensor's strides); not run here: no GPU build of vLLM
        keys, values = kv_cache.transpose(1, 2).split(attn.head_size, dim=-1)
        return keys.shape[1], (lambda b, s: keys[b, s]), (lambda b, s: values[b, s])
    raise RoESettingsError(
        f"roe: the clean cache reads keys/values from vLLM's paged cache and does not know the layout of the "
        f"{name} attention backend; supported: CPU_ATTN (vec, vec16, amx kernels), FLASH_ATTN, TRITON_ATTN"
    )


def _noisy_attention(model, attn, step: _Step, q, k, v, window):
    """Noisy rows: attention over the clean history in the paged cache plus each row's own key/value."""
    from vllm.forward_context import get_forward_context

    ctx = get_forward_context()
    meta = ctx.attn_metadata[attn.layer_name]
    kv_cache = attn.kv_cache
    if isinstance(kv_cache, (list, tuple)):
        kv_cache = kv_cache[0]
    bs, read_k, read_v = _cache_views(attn, kv_cache)
    Hq, Hkv, D = attn.num_heads, attn.num_kv_heads, attn.head_size
    Dv = getattr(attn, "head_size_v", D)
    G = Hq // Hkv
    R, K1 = step.idx.numel(), step.k - 1
    pos = step.pos.long()  # [R]: the history is positions 0 .. pos-1
    L = int(pos.max()) if R else 0
    j = torch.arange(max(L, 1), device=q.device)
    table, base, first = history_blocks(attn, meta, step.idx, pos, bs)  # base: the position table[:, 0] starts at
    rel = (j[None] - base[:, None]).clamp(min=0) // bs  # [R, L] (base is a multiple of bs)
    blocks = table.gather(1, rel.clamp(max=table.shape[1] - 1))
    slots = (j % bs)[None].expand(R, -1)
    hist_k = read_k(blocks, slots)  # [R, L, Hkv, D]
    hist_v = read_v(blocks, slots)
    ok = (j[None] < pos[:, None]) & (j[None] >= first[:, None])  # [R, L]
    if window is not None:
        ok = ok & (pos[:, None] - j[None] < window)
    # slots outside the visible history (blocks vLLM freed behind a sliding window, padding up to the longest
    # sequence) may hold anything: zero them so that a masked-out NaN cannot reach the softmax or the sum
    hist_k = hist_k.masked_fill(~ok[:, :, None, None], 0)
    hist_v = hist_v.masked_fill(~ok[:, :, None, None], 0)
    qf = q.reshape(R, K1, Hkv, G, D).permute(0, 2, 1, 3, 4).reshape(R, Hkv, K1 * G, D)
    own_k = k.reshape(R, K1, Hkv, D).transpose(1, 2)  # [R, Hkv, K-1, D]
    own_v = v.reshape(R, K1, Hkv, Dv).transpose(1, 2)
    all_k = torch.cat([hist_k.transpose(1, 2).to(q.dtype), own_k], dim=2)  # [R, Hkv, L+K-1, D]
    all_v = torch.cat([hist_v.transpose(1, 2).to(q.dtype), own_v], dim=2)
    own = torch.eye(K1, dtype=torch.bool, device=q.device).repeat_interleave(G, 0)  # [(K-1)*G, K-1]
    mask = torch.cat([ok[:, None, :].expand(R, K1 * G, -1), own[None].expand(R, -1, -1)], dim=-1)[:, None]
    out = attend(qf, all_k, all_v, mask, float(attn.impl.scale), getattr(attn.impl, "sinks", None), G)
    return out.view(R, Hkv, K1, G, Dv).permute(0, 2, 1, 3, 4).reshape(R * K1, Hq * Dv)


def _probe_layout_at_start(attn: nn.Module, vllm_config) -> None:
    """Before vLLM reports ready: refuse a KV cache the noisy rows cannot read. On the CPU backend, store random
    keys/values with vLLM's own kernel (the isa vLLM will pick) in a scratch cache and read them back."""
    name = attn.attn_backend.get_name()
    if vllm_config.cache_config.cache_dtype not in ("auto", None):
        raise RoESettingsError("roe: quantized KV caches (--kv-cache-dtype) are not supported by the plugin; drop the flag")
    if name in ("FLASH_ATTN", "TRITON_ATTN"):
        return  # checked against the stored keys at the first RoE step (no GPU build of vLLM here)
    if name != "CPU_ATTN":
        _cache_views(attn, torch.empty(0, 0, 0, 0))  # raises the one-line refusal naming the backend
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    dtype, bs, d, hkv = vllm_config.model_config.dtype, vllm_config.cache_config.block_size, attn.head_size, 2
    isa = _get_attn_isa(dtype, bs, d, "auto")
    gen = torch.Generator().manual_seed(0)
    cache = torch.zeros(3, hkv, bs, 2 * d, dtype=dtype)  # [blocks, Hkv, block_size, 2*D], vLLM's CPU shape
    key_cache, value_cache = cache.view(3, hkv, 2 * bs, d).chunk(2, dim=2)
    slots = torch.randperm(3 * bs, generator=gen)[: bs + 3]  # [T] scattered over all blocks
    key, value = (torch.randn(len(slots), hkv, d, generator=gen).to(dtype) for _ in range(2))
    ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots, isa)
    try:
        _, read_k, read_v = _cache_views(attn, cache, isa)
    except RoESettingsError as e:
        raise RoESettingsError(f"{e}; start vLLM with --dtype float32 (or on a CPU without AMX)") from None
    for read, x in ((read_k, key), (read_v, value)):
        if not torch.equal(read(slots // bs, slots % bs), x):
            raise RoESettingsError(
                f"roe: vLLM's CPU attention (isa {isa!r}, {dtype}) stores keys/values in a layout the plugin does "
                "not read; start vLLM with --dtype float32"
            )


def _check_layout(attn, views, step: _Step, key: torch.Tensor, value: torch.Tensor) -> None:
    """Once per process: the clean keys and values vLLM just stored must read back at their slots through our
    view of the cache, else the noisy rows would read garbage; refuse rather than compute wrong numbers."""
    from vllm.forward_context import get_forward_context

    ctx = get_forward_context()
    slots = ctx.slot_mapping.get(attn.layer_name) if isinstance(ctx.slot_mapping, dict) else None
    if slots is None:
        slots = getattr(ctx.attn_metadata[attn.layer_name], "slot_mapping", None)
    if slots is None:
        raise RuntimeError("roe: cannot find the slot mapping to check the KV cache layout")
    bs, read_k, read_v = views
    s = slots[step.idx].long()
    for read, x in ((read_k, key), (read_v, value)):
        got = read(s // bs, s % bs).float()  # [R, Hkv, D]
        want = x[step.idx].reshape(got.shape).float()
        if not torch.allclose(got, want, rtol=1e-2, atol=1e-2):
            raise RuntimeError(
                f"roe: the keys/values stored in the {attn.attn_backend.get_name()} paged cache (isa "
                f"{getattr(attn, 'isa', None)!r}) do not read back through the plugin's view of its layout; "
                "RoE's clean cache cannot run on this backend"
            )


def _make(name: str):
    if name in SUPPORTED:
        base = _vllm_class(*SUPPORTED[name])
        cls = type(name, (RoEMixin, base), {"_roe_base": base, "__module__": __name__, "__qualname__": name})
        return cls
    raise AttributeError(name)


_MADE: dict[str, type] = {}


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    if name not in _MADE:
        _MADE[name] = _make(name)
    return _MADE[name]
