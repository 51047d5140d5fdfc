import math

import pytest
import torch
import torch.nn.functional as F

from kernels.attention import (
    INT32_MAX,
    check_padding_mask,
    padded_attention,
    padding_mask_from_cu_seqlens,
    unpadded_attention_torch,
    validate_cu_seqlens,
)
from kernels.dispatch import unpadded_attention

HEADS, HEAD_DIM = 2, 8


def make_packed(lengths, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q, k, v = (torch.randn(total, HEADS, HEAD_DIM, generator=generator, dtype=dtype)
               for _ in range(3))
    cu_seqlens = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.cumsum(torch.tensor(lengths), 0)
    return q, k, v, cu_seqlens


def per_event_reference(q, k, v, cu_seqlens):
    """Plain softmax attention on each event alone; empty events contribute no rows."""
    outputs = []
    for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        if end == start:
            continue
        q_NSH, k_NSH, v_NSH = (x[start:end].transpose(0, 1) for x in (q, k, v))
        scores = q_NSH @ k_NSH.transpose(1, 2) / math.sqrt(HEAD_DIM)
        outputs.append((scores.softmax(-1) @ v_NSH).transpose(0, 1))
    return torch.cat(outputs) if outputs else q.new_zeros(0, HEADS, HEAD_DIM)


def test_empty_and_single_token_events():
    lengths = [0, 1, 0, 25]
    q, k, v, cu_seqlens = make_packed(lengths)
    for tensor in (q, k, v):
        tensor.requires_grad_()
    out = unpadded_attention(q, k, v, cu_seqlens, max(lengths))
    assert out.shape == (26, HEADS, HEAD_DIM)
    torch.testing.assert_close(out, per_event_reference(q, k, v, cu_seqlens))
    out.square().sum().backward()
    for tensor in (q, k, v):
        assert torch.isfinite(tensor.grad).all()


def test_gradients_match_per_event_reference():
    lengths = [3, 0, 7, 1, 12]
    inputs = make_packed(lengths, seed=1)
    leaves = [x.clone().requires_grad_() for x in inputs[:3]]
    reference_leaves = [x.clone().requires_grad_() for x in inputs[:3]]
    cu_seqlens = inputs[3]
    unpadded_attention(*leaves, cu_seqlens, 12).square().sum().backward()
    per_event_reference(*reference_leaves, cu_seqlens).square().sum().backward()
    for got, expected in zip(leaves, reference_leaves):
        torch.testing.assert_close(got.grad, expected.grad)


def test_larger_max_seqlen_same_result():
    q, k, v, cu_seqlens = make_packed([4, 9])
    torch.testing.assert_close(unpadded_attention(q, k, v, cu_seqlens, 9),
                               unpadded_attention(q, k, v, cu_seqlens, 30))


def test_no_cross_event_attention():
    q, k, v, cu_seqlens = make_packed([5, 6], seed=2)
    out = unpadded_attention(q, k, v, cu_seqlens, 6)
    v_changed = v.clone()
    v_changed[5:] += 100.0
    out_changed = unpadded_attention(q, k, v_changed, cu_seqlens, 6)
    torch.testing.assert_close(out[:5], out_changed[:5])


def test_all_keys_masked_event_gives_zero_rows():
    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(3, 4, HEADS, HEAD_DIM, generator=generator).requires_grad_()
               for _ in range(3))
    key_padding_mask = torch.tensor([[True, True, False, False],
                                     [False, False, False, False],
                                     [True, True, True, True]])
    out = padded_attention(q, k, v, key_padding_mask)
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert torch.count_nonzero(out[1]) == 0
    assert torch.count_nonzero(out[0, 2:]) == 0
    for tensor in (q, k, v):
        assert torch.isfinite(tensor.grad).all()


def test_padded_matches_sdpa_on_real_rows():
    generator = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 5, HEADS, HEAD_DIM, generator=generator) for _ in range(3))
    key_padding_mask = torch.tensor([[True, True, True, False, False]])
    out = padded_attention(q, k, v, key_padding_mask)
    expected = F.scaled_dot_product_attention(*(x[:, :3].transpose(1, 2) for x in (q, k, v)))
    torch.testing.assert_close(out[:, :3], expected.transpose(1, 2))


def test_integer_padding_mask_rejected():
    with pytest.raises(ValueError, match="True at real tokens"):
        check_padding_mask(torch.tensor([[1, 1, 0]]))


def test_opposite_polarity_mask_rejected():
    correct = padding_mask_from_cu_seqlens(torch.tensor([0, 2, 5], dtype=torch.int32), 4)
    check_padding_mask(correct)
    with pytest.raises(ValueError, match="opposite polarity"):
        check_padding_mask(~correct)


def test_padding_mask_from_cu_seqlens():
    mask = padding_mask_from_cu_seqlens(torch.tensor([0, 0, 2, 5], dtype=torch.int32), 3)
    expected = torch.tensor([[False, False, False], [True, True, False], [True, True, True]])
    assert torch.equal(mask, expected)


@pytest.mark.parametrize(
    "cu_seqlens, total, num_events, message",
    [
        (torch.tensor([1, 3, 5], dtype=torch.int32), 5, None, "start at 0"),
        (torch.tensor([0, 4, 3, 5], dtype=torch.int32), 5, None, "must not decrease"),
        (torch.tensor([0, 3, 5], dtype=torch.int32), 5, 3, "E \\+ 1 = 4 entries"),
        (torch.tensor([0, 3, 4], dtype=torch.int32), 5, None, "end at the total token count 5"),
        (torch.tensor([0.0, 5.0]), 5, None, "must be int32"),
        (torch.tensor([[0, 5]], dtype=torch.int32), 5, None, "1-D"),
    ],
)
def test_invalid_cu_seqlens_rejected(cu_seqlens, total, num_events, message):
    with pytest.raises(ValueError, match=message):
        validate_cu_seqlens(cu_seqlens, total, num_events=num_events)


def test_invalid_cu_seqlens_rejected_before_kernel():
    q, k, v, _ = make_packed([3, 2])
    with pytest.raises(ValueError, match="start at 0"):
        unpadded_attention(q, k, v, torch.tensor([1, 3, 5], dtype=torch.int32), 3)


def test_int64_cu_seqlens_converted():
    converted = validate_cu_seqlens(torch.tensor([0, 2, 5], dtype=torch.int64), 5)
    assert converted.dtype == torch.int32
    assert converted.tolist() == [0, 2, 5]


def test_total_tokens_beyond_int32_rejected():
    total = INT32_MAX + 6
    cu_seqlens = torch.tensor([0, total], dtype=torch.int64)
    with pytest.raises(ValueError, match="int32 range"):
        validate_cu_seqlens(cu_seqlens, total)


def test_max_seqlen_below_longest_event_rejected():
    with pytest.raises(ValueError, match="max_seqlen=3 is below the longest event"):
        validate_cu_seqlens(torch.tensor([0, 2, 6], dtype=torch.int32), 6, max_seqlen=3)


def grads_of(inputs, upstream):
    leaves = [x.clone().requires_grad_() for x in inputs[:3]]
    out = unpadded_attention_torch(*leaves, inputs[3], 9)
    out.backward(upstream(out))
    return [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("kind", ["stride_zero", "from_cat"])
def test_unusual_upstream_grad(kind):
    inputs = make_packed([4, 9, 0, 2], seed=5)
    shape = inputs[0].shape
    if kind == "stride_zero":
        upstream = torch.ones(1, 1, 1, dtype=torch.float64).expand(shape)
    else:
        wide = torch.randn(shape[0], shape[1], 2 * shape[2], dtype=torch.float64)
        upstream = torch.cat([wide, wide], dim=2)[:, :, 3:3 + shape[2]]
    assert not upstream.is_contiguous()
    got = grads_of(inputs, lambda out: upstream)
    expected = grads_of(inputs, lambda out: upstream.contiguous())
    for got_grad, expected_grad in zip(got, expected):
        torch.testing.assert_close(got_grad, expected_grad)
