import math

import pytest
import torch

from kernels.masked_mse import check_loss_inputs, masked_mse_torch


def loop_reference(prediction, target, mask, normalizer):
    """Plain loop over masked tokens in float64, phi wrapped with atan2."""
    total = 0.0
    for token in torch.nonzero(mask).flatten().tolist():
        for feature in range(prediction.shape[1]):
            diff = float(prediction[token, feature]) - float(target[token, feature])
            if feature == 2:
                diff = math.atan2(math.sin(diff), math.cos(diff))
            total += diff * diff
    return total / max(normalizer, 1)


def make_inputs(num_tokens=37, num_features=5, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    prediction = torch.randn(num_tokens, num_features, generator=generator) * 2
    target = torch.randn(num_tokens, num_features, generator=generator) * 2
    mask = torch.rand(num_tokens, generator=generator) < 0.4
    return prediction.to(dtype), target.to(dtype), mask


def test_matches_loop_reference():
    prediction, target, mask = make_inputs()
    normalizer = int(mask.sum()) + 3
    loss = masked_mse_torch(prediction, target, mask, normalizer)
    expected = loop_reference(prediction, target, mask, normalizer)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert loss.dtype == torch.float32


def test_phi_error_uses_wrapped_difference():
    prediction = torch.tensor([[0.0, 0.0, math.pi - 0.1, 0.0, 0.0]])
    target = torch.tensor([[0.0, 0.0, -math.pi + 0.1, 0.0, 0.0]])
    loss = masked_mse_torch(prediction, target, torch.tensor([True]), 1)
    assert loss.item() == pytest.approx(0.04, rel=1e-4)


def test_small_phi_difference_is_exact():
    prediction = torch.tensor([[0.0, 0.0, 1e-4 + 0.5, 0.0, 0.0]])
    target = torch.tensor([[0.0, 0.0, 0.5, 0.0, 0.0]])
    diff = prediction[0, 2] - target[0, 2]
    loss = masked_mse_torch(prediction, target, torch.tensor([True]), 1)
    assert loss.item() == (diff * diff).item()


def test_gradient_matches_float64_autograd():
    prediction, target, mask = make_inputs(seed=1)
    prediction = prediction.double().requires_grad_()
    torch.autograd.gradcheck(
        lambda p: masked_mse_torch(p, target.double(), mask, 7), (prediction,)
    )


def test_normalizer_tensor_equals_number():
    prediction, target, mask = make_inputs(seed=2)
    by_number = masked_mse_torch(prediction, target, mask, 11)
    by_tensor = masked_mse_torch(prediction, target, mask, torch.tensor(11))
    assert torch.equal(by_number, by_tensor)


def test_no_masked_token_gives_exact_zero():
    prediction, target, _ = make_inputs(seed=3)
    prediction.requires_grad_()
    mask = torch.zeros(prediction.shape[0], dtype=torch.bool)
    loss = masked_mse_torch(prediction, target, mask, 0)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(prediction.grad).all()
    assert torch.count_nonzero(prediction.grad) == 0


def test_nan_in_unmasked_token_does_not_leak():
    prediction, target, mask = make_inputs(seed=4)
    unmasked = int(torch.nonzero(~mask)[0])
    clean = masked_mse_torch(prediction, target, mask, 9)
    prediction[unmasked, 1] = float("nan")
    target[unmasked, 3] = float("inf")
    prediction.requires_grad_()
    loss = masked_mse_torch(prediction, target, mask, 9)
    loss.backward()
    assert torch.isfinite(loss)
    assert loss.item() == clean.item()
    assert torch.isfinite(prediction.grad).all()
    assert torch.count_nonzero(prediction.grad[unmasked]) == 0


def test_input_check_reports_non_finite():
    prediction, target, mask = make_inputs(seed=5)
    unmasked = int(torch.nonzero(~mask)[0])
    masked = int(torch.nonzero(mask)[0])
    prediction[unmasked, 1] = float("nan")
    target[masked, 0] = float("inf")
    target[masked, 4] = float("nan")
    reports = {report.tensor: report for report in check_loss_inputs(prediction, target, mask)}
    assert reports["prediction"].count == 1
    assert reports["prediction"].masked_count == 0
    assert reports["prediction"].first_index == (unmasked, 1)
    assert reports["target"].count == 2
    assert reports["target"].masked_count == 2
    assert reports["target"].first_index == (masked, 0)
    assert "non-finite" in str(reports["target"])


def test_input_check_clean_returns_empty():
    prediction, target, mask = make_inputs(seed=6)
    assert check_loss_inputs(prediction, target, mask) == []


def test_fp16_large_sum_accumulates_in_fp32():
    num_tokens = 1000
    prediction = torch.full((num_tokens, 5), 300.0, dtype=torch.float16)
    target = torch.zeros(num_tokens, 5, dtype=torch.float16)
    mask = torch.ones(num_tokens, dtype=torch.bool)
    loss = masked_mse_torch(prediction, target, mask, 1)
    expected = masked_mse_torch(prediction.float(), target.float(), mask, 1)
    assert torch.isfinite(loss)
    assert loss.item() > 65504
    assert loss.item() == pytest.approx(expected.item(), rel=1e-3)


def test_fp16_ones_sum_exactly():
    prediction = torch.ones(32768, 1, dtype=torch.float16)
    target = torch.zeros(32768, 1, dtype=torch.float16)
    loss = masked_mse_torch(prediction, target, torch.ones(32768, dtype=torch.bool), 1)
    assert loss.item() == 32768.0


def test_bfloat16_matches_fp32():
    prediction, target, mask = make_inputs(seed=7)
    low = masked_mse_torch(prediction.bfloat16(), target.bfloat16(), mask, 5)
    high = masked_mse_torch(prediction.bfloat16().float(), target.bfloat16().float(), mask, 5)
    assert low.item() == pytest.approx(high.item(), rel=1e-6)


def test_invalid_arguments_raise():
    prediction, target, mask = make_inputs()
    with pytest.raises(ValueError, match="bool"):
        masked_mse_torch(prediction, target, mask.long(), 1)
    with pytest.raises(ValueError, match="shape"):
        masked_mse_torch(prediction, target[:-1], mask, 1)
    with pytest.raises(ValueError, match="normalizer"):
        masked_mse_torch(prediction, target, mask, -1)
    with pytest.raises(ValueError, match="normalizer"):
        masked_mse_torch(prediction, target, mask, torch.ones(2))
