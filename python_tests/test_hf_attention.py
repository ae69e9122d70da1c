"""attn_implementation="aspd" in transformers: equal to eager/SDPA attention given the dense branch mask, forward
and backward, for Llama and Qwen2; causal fallback, padding, packing by position ids, generate, refusals."""
from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

import aspd_kernels.hf as ah  # noqa: E402
from aspd_kernels.hf.synthetic import byte_tokenizer, synthetic_dataset  # noqa: E402
from aspd_kernels.reference import dense_mask  # noqa: E402
from transformers import AttentionInterface, AutoModelForCausalLM, LlamaConfig, Qwen2Config  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface  # noqa: E402

CONFIGS = {"llama": LlamaConfig, "qwen2": Qwen2Config}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # tiny matmuls: thread hand-offs cost more than they save on a shared 2-core runner
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def tiny_model(kind: str, vocab: int, dtype=torch.float64, attn: str = "aspd", seed: int = 0):
    torch.manual_seed(seed)
    cfg = CONFIGS[kind](vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=dtype)


def twin(model, attn: str):
    other = copy.deepcopy(model)
    other.set_attn_implementation(attn)
    return other


def packed_batch(tok, n: int = 3, seed: int = 1, **kw):
    examples = [ah.encode_example(tok, p, r, **kw) for p, r in synthetic_dataset(n, seed=seed)]
    return examples, ah.AspdCollator()(examples)


def block_mask(examples) -> torch.Tensor:
    """bool [T, T]: block-diagonal over the packed examples, each block the example's ``dense_mask``."""
    lengths = [len(e["input_ids"]) for e in examples]
    mask = torch.zeros(sum(lengths), sum(lengths), dtype=torch.bool)
    at = 0
    for e, n in zip(examples, lengths):
        mask[at:at + n, at:at + n] = dense_mask(e["segment"], e["branch"])
        at += n
    return mask


def additive(mask: torch.Tensor, dtype) -> torch.Tensor:
    """The 4-D float mask eager attention adds to its scores."""
    return torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)[None, None]


def assert_grads_close(model, ref, rtol: float):
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert p.grad is not None, name
        scale = q.grad.abs().max().clamp_min(1e-30)
        err = ((p.grad - q.grad).abs().max() / scale).item()
        assert err < rtol, f"{name}: relative gradient error {err:.3g}"


def test_registered_with_both_interfaces():
    assert ah.NAME in AttentionInterface._global_mapping
    assert ah.NAME in AttentionMaskInterface._global_mapping
    assert AttentionInterface._global_mapping[ah.NAME] is ah.aspd_attention_forward


def test_attention_only_registration_drops_padding_masks(tok):
    """The transformers behaviour the mask registration exists for: a name known to AttentionInterface only gets
    attention_mask=None even for a padded batch; "aspd" gets the key validity."""
    seen = {}

    def spy(module, q, k, v, attention_mask, **kw):
        seen["mask"] = attention_mask
        return ah.aspd_attention_forward(module, q, k, v, None, **kw)

    AttentionInterface.register("aspd_spy_only", spy)
    model = tiny_model("llama", len(tok), attn="aspd_spy_only")
    ids = torch.randint(0, 200, (2, 6))
    pad = torch.ones(2, 6, dtype=torch.long)
    pad[1, :2] = 0
    model(ids, attention_mask=pad)
    assert seen["mask"] is None
    # "aspd": one int8 code per key slot, bit 0 = valid key, bit 1 = query slot
    codes = ah.aspd_mask(2, 6, 6, attention_mask=pad)
    assert codes.dtype == torch.int8 and codes.shape == (2, 1, 1, 6)
    assert codes[:, 0, 0].tolist() == [[3] * 6, [2, 2, 3, 3, 3, 3]]
    # a 2-D mask always gives codes, all ones included: deciding otherwise would read the mask back to the host
    assert ah.aspd_mask(2, 6, 6, attention_mask=torch.ones(2, 6))[:, 0, 0].tolist() == [[3] * 6] * 2
    assert ah.aspd_mask(2, 6, 6) is None
    # a dynamic cache: 4 cached tokens + 2 new ones
    assert ah.aspd_mask(1, 2, 6, q_offset=4) is None
    # a static cache: 3 tokens cached + 2 new ones in 10 slots
    assert ah.aspd_mask(1, 2, 10, q_offset=3)[:, 0, 0].tolist() == [[1, 1, 1, 3, 3] + [0] * 5]
    codes = ah.aspd_mask(2, 2, 10, q_offset=3, attention_mask=torch.tensor([[0, 1, 1, 1, 1], [1] * 5]))
    assert codes[:, 0, 0].tolist() == [[0, 1, 1, 3, 3] + [0] * 5, [1, 1, 1, 3, 3] + [0] * 5]
    assert ah.aspd_mask(2, 2, 10, attention_mask=codes) is codes  # generate's precomputed mask passes through


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_gradient_identity_packed_branches(tok, kind):
    """Loss and every parameter gradient of a packed row of branch-structured examples equal those of eager
    (float32 softmax: 1e-5) and SDPA (float64: 1e-10) attention given the block-diagonal dense branch mask."""
    examples, batch = packed_batch(tok, n=3)
    assert int(batch["aspd_branch"].max()) >= 2  # there are sibling branches to hide
    model = tiny_model(kind, len(tok))
    eager, sdpa = twin(model, "eager"), twin(model, "sdpa")
    mask = block_mask(examples)

    out = model(**batch)
    out.loss.backward()
    plain = dict(input_ids=batch["input_ids"], labels=batch["labels"], position_ids=batch["position_ids"])
    ref_e = eager(**plain, attention_mask=additive(mask, torch.float64))
    ref_e.loss.backward()
    ref_s = sdpa(**plain, attention_mask=mask[None, None])
    ref_s.loss.backward()

    torch.testing.assert_close(out.logits, ref_s.logits, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.logits, ref_e.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, ref_s.loss, rtol=1e-10, atol=1e-10)
    assert_grads_close(model, sdpa, 1e-10)
    assert_grads_close(model, eager, 1e-5)

    # the layout is what makes them equal: causal attention over the same row gives other gradients
    causal = twin(model, ah.NAME)
    causal.zero_grad()
    causal(**{k: v for k, v in batch.items() if not k.startswith("aspd_")}).loss.backward()
    diff = max((p.grad - q.grad).abs().max().item() for p, q in zip(causal.parameters(), model.parameters()))
    assert diff > 1e-8


def test_gradient_identity_float32(tok):
    examples, batch = packed_batch(tok, n=2, seed=5, strategy="same-max")
    model = tiny_model("llama", len(tok), dtype=torch.float32)
    eager = twin(model, "eager")
    model(**batch).loss.backward()
    eager(input_ids=batch["input_ids"], labels=batch["labels"], position_ids=batch["position_ids"],
          attention_mask=additive(block_mask(examples), torch.float32)).loss.backward()
    assert_grads_close(model, eager, 2e-4)


def test_training_steps_reduce_loss(tok):
    _, batch = packed_batch(tok, n=4, seed=2)
    model = tiny_model("qwen2", len(tok), dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses
    assert all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_causal_fallback_rows(tok, kind):
    """No layout, batch of 2 rows: plain causal attention, as SDPA."""
    model = tiny_model(kind, len(tok))
    sdpa = twin(model, "sdpa")
    ids = torch.randint(0, 256, (2, 17))
    torch.testing.assert_close(model(ids).logits, sdpa(ids).logits, rtol=1e-10, atol=1e-10)


def test_rows_with_layout_no_cu_seqlens(tok):
    """Batch of 2 rows each carrying its own layout ([B, L] ids) = eager with each row's dense mask."""
    examples, _ = packed_batch(tok, n=2, seed=3)
    n = min(len(e["input_ids"]) for e in examples)
    cut = [{k: v[:n] for k, v in e.items()} for e in examples]
    stack = lambda key: torch.stack([e[key] for e in cut])  # noqa: E731
    model = tiny_model("llama", len(tok))
    sdpa = twin(model, "sdpa")
    out = model(stack("input_ids"), position_ids=stack("position_ids"), aspd_segment=stack("segment"),
                aspd_branch=stack("branch"))
    mask = torch.stack([dense_mask(e["segment"], e["branch"]) for e in cut])[:, None]
    ref = sdpa(stack("input_ids"), position_ids=stack("position_ids"), attention_mask=mask)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-10, atol=1e-10)


def test_padding_mask_is_honoured(tok):
    model = tiny_model("qwen2", len(tok))
    sdpa = twin(model, "sdpa")
    ids = torch.randint(0, 256, (3, 12))
    pad = torch.ones(3, 12, dtype=torch.long)
    pad[1, :5] = 0  # left padding
    pad[2, 9:] = 0  # right padding
    pos = (pad.cumsum(-1) - 1).clamp_min(0)
    out = model(ids, attention_mask=pad, position_ids=pos).logits
    ref = sdpa(ids, attention_mask=pad, position_ids=pos).logits
    valid = pad.bool()
    torch.testing.assert_close(out[valid], ref[valid], rtol=1e-10, atol=1e-10)


def test_padded_rows_with_layout(tok):
    """Right-padded rows of branch examples ([B, L] layout ids, 2-D attention_mask) = each example alone."""
    examples, _ = packed_batch(tok, n=3, seed=7)
    n = max(len(e["input_ids"]) for e in examples)

    def pad(key, value):
        return torch.stack([torch.cat([e[key], e[key].new_full((n - len(e[key]),), value)]) for e in examples])

    model = tiny_model("qwen2", len(tok))
    mask = pad("input_ids", 0).new_zeros(len(examples), n)
    for i, e in enumerate(examples):
        mask[i, : len(e["input_ids"])] = 1
    out = model(pad("input_ids", 0), attention_mask=mask, position_ids=pad("position_ids", 0),
                aspd_segment=pad("segment", 0), aspd_branch=pad("branch", 0)).logits
    for i, e in enumerate(examples):
        alone = model(e["input_ids"][None], position_ids=e["position_ids"][None], aspd_segment=e["segment"][None],
                      aspd_branch=e["branch"][None]).logits[0]
        torch.testing.assert_close(out[i, : len(alone)], alone, rtol=1e-10, atol=1e-10)


def test_packing_from_position_ids(tok):
    """No layout and no cu_seq_lens: restarting position ids split the row, as FlashAttention-2 does (and the
    SDPA mask, but only without a cache)."""
    model = tiny_model("llama", len(tok))
    sdpa = twin(model, "sdpa")
    ids = torch.randint(0, 256, (1, 20))
    pos = torch.cat([torch.arange(8), torch.arange(12)])[None]
    out = model(ids, position_ids=pos).logits
    torch.testing.assert_close(out, sdpa(ids, position_ids=pos, use_cache=False).logits, rtol=1e-10, atol=1e-10)
    alone = model(ids[:, 8:], position_ids=pos[:, 8:]).logits
    torch.testing.assert_close(out[:, 8:], alone, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_generate_matches_eager(tok, cache):
    """Greedy generate, dynamic cache (queries = last keys) and static cache (queries mid-buffer, empty slots)."""
    model = tiny_model("llama", len(tok), dtype=torch.float32)
    eager = twin(model, "eager")
    ids = torch.randint(0, 256, (2, 7))
    pad = torch.ones(2, 7, dtype=torch.long)
    pad[0, :3] = 0  # left padding, as batched generation does
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id, cache_implementation=cache)
    got = model.generate(ids, attention_mask=pad, **kw)
    assert got.tolist() == eager.generate(ids, attention_mask=pad, **kw).tolist()
    assert model.generate(ids[:1], **kw).tolist() == eager.generate(ids[:1], **kw).tolist()


def test_from_pretrained(tok, tmp_path):
    tiny_model("qwen2", len(tok), dtype=torch.float32, attn="eager").save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=ah.NAME, dtype=torch.float64)
    assert loaded.config._attn_implementation == ah.NAME
    examples, batch = packed_batch(tok, n=2)
    sdpa = twin(loaded, "sdpa")
    ref = sdpa(input_ids=batch["input_ids"], labels=batch["labels"], position_ids=batch["position_ids"],
               attention_mask=block_mask(examples)[None, None])
    torch.testing.assert_close(loaded(**batch).loss, ref.loss, rtol=1e-10, atol=1e-10)


def test_refusals(tok):
    model = tiny_model("llama", len(tok), dtype=torch.float32)
    ids = torch.randint(0, 256, (1, 9))
    with pytest.raises(ValueError, match="cannot honour a 4-D"):
        model(ids, attention_mask=torch.zeros(1, 1, 9, 9))
    with pytest.raises(ValueError, match="aspd_segment and aspd_branch"):
        model(ids, aspd_segment=torch.zeros(1, 9, dtype=torch.int32))
    with pytest.raises(ValueError, match="aspd_segment: expected one id per key token"):
        model(ids, aspd_segment=torch.zeros(1, 8, dtype=torch.int32), aspd_branch=torch.zeros(1, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="no padding"):
        cu = torch.tensor([0, 9], dtype=torch.int32)
        model(ids, attention_mask=torch.tensor([[0] + [1] * 8]), cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    with pytest.raises(ValueError, match="segment"):  # branch_attention's own checks: a decreasing segment
        model(ids, aspd_segment=torch.tensor([[0, 1, 0, 0, 0, 0, 0, 0, 0]]),
              aspd_branch=torch.zeros(1, 9, dtype=torch.int32))
    model.config.attention_dropout = 0.1
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.1
    model.train()
    with pytest.raises(NotImplementedError, match="dropout"):
        model(ids)


_TRITON_SCRIPT = r"""
import copy, os, sys
import torch
torch.set_num_threads(1)
import aspd_kernels.hf as ah
from aspd_kernels.hf.synthetic import byte_tokenizer, synthetic_dataset
from aspd_kernels.reference import dense_mask
from transformers import AutoModelForCausalLM, LlamaConfig

dev = torch.device(os.environ.get("ASPD_TEST_DEVICE", "cpu"))
tok = byte_tokenizer()
exs = [ah.encode_example(tok, p, r) for p, r in synthetic_dataset(2, seed=1)]
batch = ah.AspdCollator()(exs)
t = batch["input_ids"].shape[1]
mask = torch.zeros(t, t, dtype=torch.bool)
cu = batch["cu_seq_lens_q"].tolist()
for i, e in enumerate(exs):
    mask[cu[i]:cu[i + 1], cu[i]:cu[i + 1]] = dense_mask(e["segment"], e["branch"])
cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(cfg, attn_implementation="aspd", dtype=torch.float32).to(dev)
batch = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in batch.items()}
mask = mask.to(dev)
sdpa = copy.deepcopy(model)
sdpa.set_attn_implementation("sdpa")
out = model(**batch, aspd_backend="triton")
out.loss.backward()
ref = sdpa(input_ids=batch["input_ids"], labels=batch["labels"], position_ids=batch["position_ids"],
           attention_mask=mask[None, None])
ref.loss.backward()
# the same float32 arithmetic on both sides, summed in other orders (and SDPA may use tf32 on a GPU)
loss_tol, grad_tol = (1e-5, 1e-4) if dev.type == "cpu" else (1e-3, 5e-3)
torch.testing.assert_close(out.loss, ref.loss, rtol=loss_tol, atol=loss_tol)
for (name, p), q in zip(model.named_parameters(), sdpa.parameters()):
    err = ((p.grad - q.grad).abs().max() / q.grad.abs().max()).item()
    assert err < grad_tol, (name, err)
print("ok")
"""


@pytest.mark.parametrize("device", ["interpreter", "cuda"])
def test_triton_backend_behind_transformers(device):
    """The Triton kernels behind attn_implementation="aspd" -- run by the interpreter on CPU, compiled on a GPU:
    loss and gradients equal SDPA with the dense mask. A subprocess: TRITON_INTERPRET must be set (or unset)
    before triton loads."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    env = dict(os.environ)
    if device == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device")
        env.pop("TRITON_INTERPRET", None)
        env["ASPD_TEST_DEVICE"] = "cuda"
    else:
        if torch.cuda.is_available():
            pytest.skip("a CUDA device is present: the compiled variant runs instead")
        from triton_probe import interpreter_problem

        if interpreter_problem() is not None:
            pytest.skip(interpreter_problem())
        env["TRITON_INTERPRET"] = "1"
    root = Path(__file__).resolve().parent.parent
    env["PYTHONPATH"] = str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _TRITON_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=600, cwd=root)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
