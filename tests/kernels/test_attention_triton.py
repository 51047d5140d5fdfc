import math
import os

import pytest
import torch

from kernels import dispatch
from kernels.attention import unpadded_attention_torch, unpadded_attention_triton

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="Triton kernels need CUDA or TRITON_INTERPRET=1; test_triton_interpret.py reruns "
    "this file under the interpreter",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCES = {  # dtype: (atol, rtol) of the output and every gradient against the reference
    torch.float64: (1e-12, 1e-10),
    torch.float32: (2e-5, 1e-4),
}
# A packed batch with empty events, a single token, and events longer than one key block
# (16 tokens for float32 and float64 inputs, 32 for bf16).
MIXED_LENGTHS = [0, 1, 2, 25, 0, 64, 11]


def make_packed(lengths, heads=2, head_dim=8, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q, k, v = (torch.randn(total, heads, head_dim, generator=generator).to(DEVICE, dtype)
               for _ in range(3))
    cu_seqlens = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.cumsum(torch.tensor(lengths), 0)
    return q, k, v, cu_seqlens.to(DEVICE)


def seeded_randn(shape, seed, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


def output_and_grads(function, q, k, v, cu_seqlens, max_seqlen, upstream):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = function(*leaves, cu_seqlens, max_seqlen)
    out.backward(upstream)
    return [out.detach()] + [leaf.grad for leaf in leaves]


def assert_close_report(got, expected, atol, rtol, name):
    """Compare like torch.testing.assert_close, listing how many elements differ and where."""
    assert got.shape == expected.shape, (name, got.shape, expected.shape)
    assert got.dtype == expected.dtype, (name, got.dtype, expected.dtype)
    bad = ~torch.isclose(got, expected, atol=atol, rtol=rtol)
    if bad.any():
        where = torch.nonzero(bad)[:5].tolist()
        pairs = [(index, got[tuple(index)].item(), expected[tuple(index)].item())
                 for index in where]
        pytest.fail(f"{name}: {int(bad.sum())} of {bad.numel()} elements differ; first "
                    f"(index, got, expected): {pairs}")


def assert_matches_reference(q, k, v, cu_seqlens, max_seqlen, upstream):
    atol, rtol = TOLERANCES[q.dtype]
    got = output_and_grads(unpadded_attention_triton, q, k, v, cu_seqlens, max_seqlen, upstream)
    expected = output_and_grads(unpadded_attention_torch, q, k, v, cu_seqlens, max_seqlen,
                                upstream)
    for name, got_value, expected_value in zip(("output", "dq", "dk", "dv"), got, expected):
        assert_close_report(got_value, expected_value, atol, rtol, name)


@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize("head_dim", [16, 12, 7])
def test_mixed_lengths_match_reference(head_dim, dtype):
    q, k, v, cu_seqlens = make_packed(MIXED_LENGTHS, head_dim=head_dim, dtype=dtype)
    upstream = seeded_randn(q.shape, seed=1, dtype=dtype)
    assert_matches_reference(q, k, v, cu_seqlens, max(MIXED_LENGTHS), upstream)


def test_event_longer_than_block():
    # 100 tokens span several key blocks: a key loop in the forward and the separate dQ kernel.
    q, k, v, cu_seqlens = make_packed([3, 100, 5], head_dim=5, dtype=torch.float64, seed=2)
    upstream = seeded_randn(q.shape, seed=3, dtype=torch.float64)
    assert_matches_reference(q, k, v, cu_seqlens, 100, upstream)


def test_max_seqlen_above_longest_event():
    q, k, v, cu_seqlens = make_packed([4, 9], seed=4)
    upstream = seeded_randn(q.shape, seed=5)
    assert_matches_reference(q, k, v, cu_seqlens, 40, upstream)


def test_empty_and_single_token_events():
    q, k, v, cu_seqlens = make_packed([0, 1, 0, 25], seed=6)
    got = output_and_grads(unpadded_attention_triton, q, k, v, cu_seqlens, 25,
                           torch.ones_like(q))
    assert got[0].shape == (26, 2, 8)
    for name, tensor in zip(("output", "dq", "dk", "dv"), got):
        assert torch.isfinite(tensor).all(), name
    # A single token attends only to itself: its output is its own value vector.
    torch.testing.assert_close(got[0][0], v[0])


def test_batch_without_tokens():
    q, k, v, cu_seqlens = make_packed([0, 0], seed=7)
    out, grad_q, _, _ = output_and_grads(unpadded_attention_triton, q, k, v, cu_seqlens, 0,
                                         torch.zeros_like(q))
    assert out.shape == (0, 2, 8)
    assert grad_q.shape == (0, 2, 8)


def test_non_contiguous_qkv():
    lengths = [5, 0, 13, 1]
    total = sum(lengths)
    _, _, _, cu_seqlens = make_packed(lengths)
    # The encoder's layout: q, k and v are unbound from one (T, 3, N, H) projection.
    qkv = seeded_randn((total, 3, 2, 6), seed=8)
    q, k, v = qkv.unbind(dim=1)
    # A head-major view: (N, T, H) storage read as (T, N, H).
    v = seeded_randn((2, total, 6), seed=9).transpose(0, 1)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    assert_matches_reference(q, k, v, cu_seqlens, 13, seeded_randn(q.shape, seed=10))


@pytest.mark.parametrize("kind", ["stride_zero", "from_cat"])
def test_unusual_upstream_grad(kind):
    q, k, v, cu_seqlens = make_packed([4, 9, 0, 2], head_dim=6, seed=11)
    if kind == "stride_zero":
        upstream = torch.ones(1, 1, 1, device=DEVICE).expand(q.shape)
    else:
        wide = seeded_randn((q.shape[0], 2, 12), seed=12)
        upstream = torch.cat([wide, wide], dim=2)[:, :, 3:9]
    assert not upstream.is_contiguous()
    assert_matches_reference(q, k, v, cu_seqlens, 9, upstream)


def test_gradcheck_float64():
    q, k, v, cu_seqlens = make_packed([0, 1, 3], heads=1, head_dim=3, dtype=torch.float64,
                                      seed=13)
    leaves = tuple(x.clone().requires_grad_() for x in (q, k, v))
    assert torch.autograd.gradcheck(
        lambda q, k, v: unpadded_attention_triton(q, k, v, cu_seqlens, 3), leaves
    )


def test_bfloat16_error_within_reference_error():
    q, k, v, cu_seqlens = make_packed([7, 20, 1], seed=14, dtype=torch.bfloat16)
    upstream = seeded_randn(q.shape, seed=15, dtype=torch.bfloat16)
    exact = output_and_grads(unpadded_attention_torch, q.double(), k.double(), v.double(),
                             cu_seqlens, 20, upstream.double())
    kernel = output_and_grads(unpadded_attention_triton, q, k, v, cu_seqlens, 20, upstream)
    reference = output_and_grads(unpadded_attention_torch, q, k, v, cu_seqlens, 20, upstream)
    for name, exact_value, got, expected in zip(("output", "dq", "dk", "dv"), exact, kernel,
                                                reference):
        assert got.dtype == torch.bfloat16, name
        kernel_error = (got.double() - exact_value).abs().max().item()
        reference_error = (expected.double() - exact_value).abs().max().item()
        assert kernel_error <= 2 * reference_error + 1e-3, (name, kernel_error, reference_error)


def test_run_twice_identical_bits():
    q, k, v, cu_seqlens = make_packed([3, 17, 8], seed=16)
    upstream = seeded_randn(q.shape, seed=17)
    first = output_and_grads(unpadded_attention_triton, q, k, v, cu_seqlens, 17, upstream)
    second = output_and_grads(unpadded_attention_triton, q, k, v, cu_seqlens, 17, upstream)
    for name, got, expected in zip(("output", "dq", "dk", "dv"), first, second):
        assert torch.equal(got, expected), name


def test_int64_cu_seqlens_rejected_without_validation():
    q, k, v, cu_seqlens = make_packed([2, 3], seed=18)
    with pytest.raises(ValueError, match="validate_cu_seqlens"):
        unpadded_attention_triton(q, k, v, cu_seqlens.long(), 3)


def test_mixed_dtypes_rejected():
    q, k, v, cu_seqlens = make_packed([2, 3], seed=19)
    with pytest.raises(ValueError, match="one float dtype"):
        unpadded_attention_triton(q, k.double(), v, cu_seqlens, 3)


def test_head_dim_above_limit_rejected():
    q, k, v, cu_seqlens = make_packed([2, 3], head_dim=257, seed=22)
    with pytest.raises(ValueError, match="head dim 257 is above the 256"):
        unpadded_attention_triton(q, k, v, cu_seqlens, 3)


def test_dispatcher_selects_kernel(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    q, k, v, cu_seqlens = make_packed([6, 0, 10], seed=20)
    # int64 offsets pass: the dispatcher validates them and converts them to int32 first.
    got = dispatch.unpadded_attention(q, k, v, cu_seqlens.long(), 10)
    torch.testing.assert_close(got, unpadded_attention_torch(q, k, v, cu_seqlens, 10))


def test_single_event_matches_plain_softmax():
    q, k, v, cu_seqlens = make_packed([9], heads=1, head_dim=4, dtype=torch.float64, seed=21)
    scores = q[:, 0] @ k[:, 0].T / math.sqrt(4)
    expected = scores.softmax(dim=-1) @ v[:, 0]
    got = unpadded_attention_triton(q, k, v, cu_seqlens, 9)
    torch.testing.assert_close(got[:, 0], expected, atol=1e-12, rtol=1e-10)
