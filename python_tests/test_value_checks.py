"""The host side of the op boundary: value checks read the device exactly once per call (none with
``check_values=False``), and the per-signature memo of the structural checks (``_plan_cache``) never lets a call
through that the checks would refuse."""
import pytest
import torch
from kv_helpers import make_cache
from test_checks import att, with_
from test_opcheck import attention_args, kv_args, rope_args

from aspd_kernels import branch_attention, branch_attention_with_kvcache, remap_positions, rope_append_kv
from bench.host_ops import noop_kernels

# every way a tensor's value reaches the host
_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu")


@pytest.fixture
def reads(monkeypatch):
    """Counts device reads; the torch backend is swapped for one that only allocates its outputs (the real one
    reads lengths to plan its loops, which is the kernel's business, not the boundary's)."""
    count = [0]
    for name in _READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *a, __original=original, **kw):
            count[0] += 1
            return __original(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, counted)
    with noop_kernels():
        yield count


def _calls():
    q, k, v, seg, br, cu_q, cu_k, mq, mk = attention_args(requires_grad=False)
    c, qd = kv_args()
    rq, rk, rv, pos, csc, rc, after, ids = rope_args()
    return {
        "branch_attention": lambda cv: branch_attention(q, k, v, seg, br, cu_q, cu_k, mq, mk, check_values=cv),
        "branch_attention_with_kvcache": lambda cv: branch_attention_with_kvcache(
            qd, c["k_cache"], c["v_cache"], c["cache_seqlens"], c["segment"], c["branch"], check_values=cv),
        "remap_positions": lambda cv: remap_positions(seg, br, cu_seqlens=cu_k, check_values=cv),
        "rope_append_kv": lambda cv: rope_append_kv(rq, rk, rv, pos, csc, rc["k_cache"], rc["v_cache"], rc["segment"],
                                                    rc["branch"], after, ids, ids, check_values=cv),
    }


@pytest.mark.parametrize("op", list(_calls()))
def test_one_device_read_per_checked_call(op, reads):
    call = _calls()[op]
    for check_values, expected in ((True, 1), (False, 0), (True, 1)):  # the second checked call hits the memo
        reads[0] = 0
        call(check_values)
        assert reads[0] == expected, (op, check_values, reads[0])


def test_paged_cache_checks_read_once(reads):
    c = make_cache(2, batch=2, hkv=2, d=16, dtype=torch.float32, paged=True, poison=False)
    reads[0] = 0
    branch_attention_with_kvcache(torch.randn(2, 3, 4, 16), c["k_cache"], c["v_cache"], c["cache_seqlens"],
                                  c["segment"], c["branch"], block_table=c["block_table"])
    assert reads[0] == 1


def test_memo_does_not_hide_a_refusal(monkeypatch):
    """A call with a memoised signature is accepted; changing the environment, a shape, a dtype or a stride that a
    check reads makes it miss and refuse again, with the same message as a first call."""
    a = att()
    branch_attention(**a)
    monkeypatch.setenv("ASPD_BACKEND", "cudnn")
    with pytest.raises(ValueError, match="backend"):
        branch_attention(**a)
    monkeypatch.delenv("ASPD_BACKEND")
    branch_attention(**a)
    with pytest.raises(TypeError, match="k must have the dtype of q"):
        branch_attention(**with_(a, k=a["k"].double()))
    with pytest.raises(ValueError, match="max_seqlen_q"):  # a value rule: never memoised
        branch_attention(**with_(a, max_seqlen_q=3))
    rq, rk, rv, pos, csc, rc, after, ids = rope_args()
    args = [rq, rk, rv, pos, csc, rc["k_cache"], rc["v_cache"], rc["segment"], rc["branch"], after, ids, ids]
    rope_append_kv(*args)
    strided = rc["k_cache"].transpose(0, 1).contiguous().transpose(0, 1)  # same shape, not contiguous
    args[5] = strided
    with pytest.raises(ValueError, match="k_cache must be contiguous"):
        rope_append_kv(*args)


@pytest.mark.parametrize("seg_value,br_value,expected", [
    (-2, None, "segment must be >= 0, got -2"),
    (None, -1, r"branch must be >= 0 \(0 = serial, 1..K = branch\), got -1"),
    (-2, -1, "branch must be >= 0"),  # both broken: branch is named first, as the rules have always been ordered
])
def test_one_sign_rule_names_the_negative_id(seg_value, br_value, expected):
    """Both ids' signs are read as one rule (``(segment | branch) < 0``); the message still names the id that broke
    it, and slots past ``cache_seqlens`` may hold anything."""
    c = make_cache(4, batch=2, hkv=2, d=16, dtype=torch.float32, poison=False)
    seg, br = c["segment"].clone(), c["branch"].clone()
    n = int(c["cache_seqlens"][1])
    seg[1, n:] = -5  # beyond the valid slots: never read, never refused
    br[1, n:] = -5
    branch_attention_with_kvcache(torch.randn(2, 1, 4, 16), c["k_cache"], c["v_cache"], c["cache_seqlens"], seg, br)
    if seg_value is not None:
        seg[1, n - 1] = seg_value
    if br_value is not None:
        br[1, n - 1] = br_value
    with pytest.raises(ValueError, match=expected):
        branch_attention_with_kvcache(torch.randn(2, 1, 4, 16), c["k_cache"], c["v_cache"], c["cache_seqlens"],
                                      seg, br)
