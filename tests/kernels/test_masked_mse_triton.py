import os

import pytest
import torch

from kernels import dispatch
from kernels.masked_mse import masked_mse_torch, masked_mse_triton

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="Triton kernels need CUDA or TRITON_INTERPRET=1; test_triton_interpret.py reruns "
    "this file under the interpreter",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCES = {  # dtype: (atol, rtol) of the loss and gradients against the reference
    torch.float32: (1e-6, 1e-5),
    torch.float16: (1e-5, 1e-3),
    torch.bfloat16: (1e-5, 1e-2),
    torch.float64: (1e-12, 1e-10),
}


def make_inputs(num_tokens, seed=0, dtype=torch.float32, num_features=5):
    generator = torch.Generator().manual_seed(seed)
    prediction = torch.randn(num_tokens, num_features, generator=generator) * 3
    target = torch.randn(num_tokens, num_features, generator=generator) * 3
    mask = torch.rand(num_tokens, generator=generator) < 0.4
    return prediction.to(DEVICE, dtype), target.to(DEVICE, dtype), mask.to(DEVICE)


def loss_and_grads(function, prediction, target, mask, normalizer):
    prediction = prediction.detach().clone().requires_grad_()
    target = target.detach().clone().requires_grad_()
    loss = function(prediction, target, mask, normalizer)
    loss.backward()
    return loss.detach(), prediction.grad, target.grad


def assert_matches_reference(prediction, target, mask, normalizer, dtype):
    atol, rtol = TOLERANCES[dtype]
    got = loss_and_grads(masked_mse_triton, prediction, target, mask, normalizer)
    expected = loss_and_grads(masked_mse_torch, prediction, target, mask, normalizer)
    for name, got_value, expected_value in zip(("loss", "grad prediction", "grad target"),
                                               got, expected):
        assert got_value.dtype == expected_value.dtype, name
        torch.testing.assert_close(got_value, expected_value, atol=atol, rtol=rtol, msg=name)


@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize("num_tokens", [37, 1000, 2500])
def test_matches_reference(num_tokens, dtype):
    prediction, target, mask = make_inputs(num_tokens, dtype=dtype)
    assert_matches_reference(prediction, target, mask, int(mask.sum()), dtype)


def test_empty_batch():
    prediction, target, mask = make_inputs(0)
    loss, grad_prediction, _ = loss_and_grads(masked_mse_triton, prediction, target, mask, 0)
    assert loss.item() == 0.0
    assert grad_prediction.shape == (0, 5)


def test_no_masked_token_gives_exact_zero():
    prediction, target, _ = make_inputs(50, seed=1)
    mask = torch.zeros(50, dtype=torch.bool, device=DEVICE)
    loss, grad_prediction, grad_target = loss_and_grads(masked_mse_triton, prediction, target,
                                                        mask, 0)
    assert loss.item() == 0.0
    assert torch.count_nonzero(grad_prediction) == 0
    assert torch.count_nonzero(grad_target) == 0


def test_nan_after_tensor_end_is_not_read():
    storage = torch.full((2000,), float("nan"), device=DEVICE)
    prediction = storage[:1000].view(200, 5)
    prediction.copy_(torch.randn(200, 5))
    target = torch.randn(200, 5, device=DEVICE)
    mask = torch.ones(200, dtype=torch.bool, device=DEVICE)
    assert_matches_reference(prediction, target, mask, 200, torch.float32)


# The interpreter evaluates the NaN and inf with numpy, which warns; the kernel discards them.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_nan_in_unmasked_token_does_not_leak():
    prediction, target, mask = make_inputs(64, seed=2)
    unmasked = int(torch.nonzero(~mask)[0])
    prediction[unmasked, 0] = float("nan")
    target[unmasked, 2] = float("inf")
    loss, grad_prediction, _ = loss_and_grads(masked_mse_triton, prediction, target, mask, 9)
    assert torch.isfinite(loss)
    assert torch.isfinite(grad_prediction).all()
    assert_matches_reference(prediction, target, mask, 9, torch.float32)


def test_fp16_sum_beyond_fp16_range():
    prediction = torch.full((1000, 5), 300.0, dtype=torch.float16, device=DEVICE)
    target = torch.zeros_like(prediction)
    mask = torch.ones(1000, dtype=torch.bool, device=DEVICE)
    loss = masked_mse_triton(prediction, target, mask, 1)
    expected = masked_mse_torch(prediction.float(), target.float(), mask, 1)
    assert torch.isfinite(loss)
    assert loss.item() > 65504
    assert loss.item() == pytest.approx(expected.item(), rel=1e-3)


def test_non_contiguous_inputs():
    wide = torch.randn(90, 10, device=DEVICE)
    prediction = wide[:, 1::2]
    target = torch.randn(5, 90, device=DEVICE).T
    mask = torch.rand(90, device=DEVICE) < 0.5
    assert not prediction.is_contiguous()
    assert not target.is_contiguous()
    assert_matches_reference(prediction, target, mask, 17, torch.float32)


def test_upstream_grad_scales_gradient():
    prediction, target, mask = make_inputs(40, seed=3)
    grads = []
    for function in (masked_mse_triton, masked_mse_torch):
        leaf = prediction.clone().requires_grad_()
        loss = function(leaf, target, mask, 7)
        torch.stack([loss, loss.detach()]).mul(3.0)[0].backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_tensor_normalizer():
    prediction, target, mask = make_inputs(40, seed=4)
    normalizer = torch.tensor(12, device=DEVICE)
    assert_matches_reference(prediction, target, mask, normalizer, torch.float32)


def test_run_twice_identical_bits():
    prediction, target, mask = make_inputs(3000, seed=5)
    first = loss_and_grads(masked_mse_triton, prediction, target, mask, 100)
    second = loss_and_grads(masked_mse_triton, prediction, target, mask, 100)
    for got, expected in zip(first, second):
        assert torch.equal(got, expected)


def test_gradcheck_float64():
    prediction, target, mask = make_inputs(6, seed=7, dtype=torch.float64)
    leaves = (prediction.clone().requires_grad_(), target.clone().requires_grad_())
    assert torch.autograd.gradcheck(lambda p, t: masked_mse_triton(p, t, mask, 4), leaves)


def test_dispatcher_selects_kernel(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    prediction, target, mask = make_inputs(20, seed=6)
    torch.testing.assert_close(dispatch.masked_mse(prediction, target, mask, 4),
                               masked_mse_torch(prediction, target, mask, 4))
