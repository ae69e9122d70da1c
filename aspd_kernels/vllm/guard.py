"""No silent fallback: the engine settings under which the plugin cannot apply a request's layout, and the
front-end check that refuses such a request (a clear error naming the setting) before it reaches the engine.

The layout reaches the model in two places the plugin patches: the V1 model runner's ``_prepare_inputs`` (the
positions, and the ids the backend writes) and the attention backend. Anything that bypasses either would run the
request as plain causal text without a word: Model Runner V2 (another ``_prepare_inputs``), a platform whose runner
is not V1's, another attention backend, async scheduling (the runner prepares step n+1 before step n's tokens are
known), full CUDA graphs (they replay attention with the captured id tensors), and the layers the op does not
compute (quantized caches, sliding windows, encoder-decoder). A request without a layout is never refused.
"""
from __future__ import annotations

import os

from vllm.exceptions import VLLMValidationError

from .layout import has_layout, layout_of

TESTED = "0.32."
ANY_VERSION = "ASPD_VLLM_ANY_VERSION"  # set to 1 to try a vLLM the plugin was not tested with


class LayoutRefused(VLLMValidationError, ValueError):
    """A request carries an aspd layout that this engine's settings cannot apply (HTTP 400 from a server)."""


def refusal(vllm_config, version: str | None = None, platform=None) -> str | None:
    """Why a request with a layout cannot run under ``vllm_config`` (None: it can). ``version``/``platform``:
    vLLM's version and current platform (default the installed ones)."""
    import vllm
    from vllm.platforms import current_platform

    version = vllm.__version__ if version is None else version
    platform = current_platform if platform is None else platform
    why = []
    if not version.startswith(TESTED) and os.environ.get(ANY_VERSION) != "1":
        why.append(f"the plugin patches vLLM {TESTED}x's V1 model runner and was not tested with vLLM {version} "
                   f"(install vllm {TESTED}x, or set {ANY_VERSION}=1 to try)")
    if vllm_config.use_v2_model_runner:
        why.append("Model Runner V2 is in use, whose inputs the plugin does not patch (set "
                   "VLLM_USE_V2_MODEL_RUNNER=0)")
    if vllm_config.scheduler_config.async_scheduling:
        why.append("async scheduling prepares a step before the previous step's tokens are known (pass "
                   "async_scheduling=False, or --no-async-scheduling to vllm serve)")
    mode = vllm_config.compilation_config.cudagraph_mode
    if not platform.is_cpu() and mode is not None and mode.has_full_cudagraphs():
        why.append(f"cudagraph_mode={mode.name} replays attention with captured ids (pass "
                   f"compilation_config={{'cudagraph_mode': 'PIECEWISE'}} or enforce_eager=True)")
    if not (platform.is_cpu() or platform.is_cuda_alike()):
        why.append(f"platform {platform.device_name!r}: only the CPU and CUDA/ROCm runners are patched")
    backend = vllm_config.attention_config.backend
    if not platform.is_cpu() and (backend is None or backend.name != "ASPD"):
        why.append(f"attention_backend={getattr(backend, 'name', backend)}: only the aspd backend applies a "
                   "layout off the CPU (pass attention_backend='ASPD')")
    if vllm_config.cache_config.cache_dtype != "auto":
        why.append(f"kv_cache_dtype={vllm_config.cache_config.cache_dtype!r}: the branch mask runs on an "
                   "unquantized cache (pass kv_cache_dtype='auto')")
    mc = vllm_config.model_config
    if mc.get_sliding_window() is not None:
        why.append(f"the model uses a sliding window ({mc.get_sliding_window()}), which the op does not implement")
    if mc.is_encoder_decoder:
        why.append("encoder-decoder models: the layout applies to decoder-only self-attention")
    if vllm_config.speculative_config is not None:
        why.append("speculative decoding: draft tokens would not follow the layout (drop speculative_config)")
    return "; ".join(why) or None


def check(params, vllm_config) -> None:
    """Raise :class:`LayoutRefused` if ``params`` (``SamplingParams``) carries a layout ``vllm_config`` cannot
    apply; a request without one always passes."""
    try:
        if not has_layout(getattr(params, "extra_args", None)):
            return
    except ValueError as e:  # a malformed layout: the client's fault (HTTP 400), never run as plain text
        raise LayoutRefused(str(e), parameter="extra_args") from None
    why = refusal(vllm_config)
    if why:
        raise LayoutRefused(f"this request carries an aspd layout (extra_args aspd_seg/aspd_br/aspd_pos), which "
                            f"this engine cannot "
                            f"apply: {why}", parameter="extra_args")


def check_length(request) -> None:
    """A layout holds one entry per prompt token (``request``: the ``EngineCoreRequest`` vLLM built)."""
    lay = layout_of(getattr(request.sampling_params, "extra_args", None))
    n = len(request.prompt_token_ids or ())
    if lay is not None and len(lay["seg"]) != n:
        raise LayoutRefused(f"the request's aspd layout holds {len(lay['seg'])} entries for {n} prompt tokens",
                            parameter="extra_args")


def install() -> None:
    """Run :func:`check` where vLLM validates each request's parameters, and :func:`check_length` on the request
    it builds (the front end, before the engine)."""
    from vllm.v1.engine.input_processor import InputProcessor

    orig = InputProcessor._validate_params
    if getattr(orig, "_aspd", False):
        return

    def _validate_params(self, params, *args, **kwargs):
        out = orig(self, params, *args, **kwargs)
        check(params, self.vllm_config)
        return out

    orig_process = InputProcessor.process_inputs

    def process_inputs(self, *args, **kwargs):
        request = orig_process(self, *args, **kwargs)
        check_length(request)
        return request

    _validate_params._aspd = True
    InputProcessor._validate_params = _validate_params
    InputProcessor.process_inputs = process_inputs
