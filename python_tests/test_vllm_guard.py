"""No silent fallback: every engine setting under which the plugin cannot apply a layout refuses a request that
carries one, with an error naming the setting; a request without a layout is never refused; the refusal runs where
vLLM validates a request (``InputProcessor._validate_params``). No engine here (one end-to-end refusal is in
test_vllm.py)."""
from __future__ import annotations

import types

import pytest

vllm = pytest.importorskip("vllm")

from vllm import SamplingParams  # noqa: E402
from vllm.config import CacheConfig, ModelConfig, VllmConfig  # noqa: E402
from vllm.config.compilation import CUDAGraphMode  # noqa: E402
from vllm_helpers import save_tiny  # noqa: E402

from aspd_kernels.vllm import guard  # noqa: E402
from aspd_kernels.vllm.layout import encode  # noqa: E402

CPU = types.SimpleNamespace(is_cpu=lambda: True, is_cuda_alike=lambda: False, device_name="cpu")
CUDA = types.SimpleNamespace(is_cpu=lambda: False, is_cuda_alike=lambda: True, device_name="cuda")
TPU = types.SimpleNamespace(is_cpu=lambda: False, is_cuda_alike=lambda: False, device_name="tpu")
LAYOUT = SamplingParams(max_tokens=1, extra_args=encode([0, 1], [0, 1], [0, 1]))


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny"))
    save_tiny("llama", path)
    mc = ModelConfig(model=path, tokenizer=path, skip_tokenizer_init=True, dtype="float32", max_model_len=512)
    return VllmConfig(model_config=mc, cache_config=CacheConfig(block_size=32))


class _with:
    """``cfg`` with some attributes overridden (the rest read through)."""

    def __init__(self, cfg, **over) -> None:
        self._cfg, self.__dict__["_over"] = cfg, over

    def __getattr__(self, name):
        over = self.__dict__["_over"]
        return over[name] if name in over else getattr(self._cfg, name)


def test_this_engine_applies_layouts(config):
    assert guard.refusal(config, platform=CPU) is None
    guard.check(LAYOUT, config)  # no raise


ns = types.SimpleNamespace
REFUSALS = {
    "VLLM_USE_V2_MODEL_RUNNER=0": (dict(use_v2_model_runner=True), CPU),
    "no-async-scheduling": (dict(scheduler_config=ns(async_scheduling=True)), CPU),
    "cudagraph_mode": (dict(compilation_config=ns(cudagraph_mode=CUDAGraphMode.FULL_AND_PIECEWISE),
                            attention_config=ns(backend=ns(name="ASPD"))), CUDA),
    "attention_backend='ASPD'": (dict(compilation_config=ns(cudagraph_mode=CUDAGraphMode.PIECEWISE),
                                      attention_config=ns(backend=None)), CUDA),
    "only the CPU and CUDA/ROCm runners": ({}, TPU),
    "kv_cache_dtype='auto'": (dict(cache_config=ns(cache_dtype="fp8")), CPU),
    "sliding window": (dict(model_config=ns(get_sliding_window=lambda: 4096, is_encoder_decoder=False)), CPU),
    "encoder-decoder": (dict(model_config=ns(get_sliding_window=lambda: None, is_encoder_decoder=True)), CPU),
    "speculative_config": (dict(speculative_config=object()), CPU),
}


@pytest.mark.parametrize("setting", list(REFUSALS))
def test_each_refusal_names_its_setting(config, setting, monkeypatch):
    over, platform = REFUSALS[setting]
    cfg = _with(config, **over)
    why = guard.refusal(cfg, platform=platform)
    assert why is not None and setting in why
    # through the request check too (the platform patched where refusal() looks it up)
    monkeypatch.setattr("vllm.platforms.current_platform", platform, raising=False)
    with pytest.raises(ValueError, match="aspd layout") as e:
        guard.check(LAYOUT, cfg)
    assert setting in str(e.value)
    guard.check(SamplingParams(max_tokens=1), cfg)  # no layout: never refused


def test_an_untested_vllm_version_is_refused_unless_allowed(config, monkeypatch):
    monkeypatch.delenv(guard.ANY_VERSION, raising=False)
    why = guard.refusal(config, version="0.40.1", platform=CPU)
    assert "0.40.1" in why and guard.ANY_VERSION in why
    monkeypatch.setenv(guard.ANY_VERSION, "1")
    assert guard.refusal(config, version="0.40.1", platform=CPU) is None


def test_the_check_runs_where_vllm_validates_requests(config):
    from vllm.v1.engine.input_processor import InputProcessor

    from aspd_kernels.vllm.plugin import register

    register()
    assert getattr(InputProcessor._validate_params, "_aspd", False)
    proc = object.__new__(InputProcessor)  # only what _validate_params reads
    proc.vllm_config = _with(config, scheduler_config=ns(async_scheduling=True))
    proc.model_config, proc.speculative_config = config.model_config, None
    proc.structured_outputs_config = config.structured_outputs_config
    proc.validate_logits_processors_params = lambda p: None
    proc.renderer = ns(tokenizer=None)
    with pytest.raises(ValueError, match="async"):
        InputProcessor._validate_params(proc, LAYOUT, ("generate",))


def test_a_malformed_layout_is_refused(config):
    ragged = SamplingParams(max_tokens=1, extra_args={"aspd_seg": [0, 0], "aspd_br": [0], "aspd_pos": [0, 1]})
    with pytest.raises(guard.LayoutRefused, match="aspd_br"):
        guard.check(ragged, config)
    request = types.SimpleNamespace(sampling_params=LAYOUT, prompt_token_ids=[5, 6, 7])  # 2 entries, 3 tokens
    with pytest.raises(guard.LayoutRefused, match="2 entries for 3 prompt tokens"):
        guard.check_length(request)
    guard.check_length(types.SimpleNamespace(sampling_params=LAYOUT, prompt_token_ids=[5, 6]))
