import os

import pytest
import torch

from kernels import dispatch
from kernels.embedding_sum import (
    GRAD_MODE_ENV_VAR,
    GRAD_MODES,
    embedding_sum_torch,
    embedding_sum_triton,
    resolve_grad_mode,
)

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="Triton kernels need CUDA or TRITON_INTERPRET=1; test_triton_interpret.py reruns "
    "this file under the interpreter",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FEATURES, PDG_ROWS = 5, 13
PARAMETERS = ("proj_weight", "proj_bias", "pdg_table", "level_table", "mask_table")


def make_inputs(num_tokens, width, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    tensors = {
        "features": torch.randn(num_tokens, FEATURES, generator=generator),
        "mask": torch.rand(num_tokens, generator=generator) < 0.3,
        "pdg_index": torch.randint(0, PDG_ROWS, (num_tokens,), generator=generator),
        "level": torch.randint(0, 2, (num_tokens,), generator=generator),
        "proj_weight": torch.randn(width, FEATURES, generator=generator),
        "proj_bias": torch.randn(width, generator=generator),
        "pdg_table": torch.randn(PDG_ROWS, width, generator=generator),
        "level_table": torch.randn(2, width, generator=generator),
        "mask_table": torch.randn(2, width, generator=generator),
    }
    return {name: tensor.to(DEVICE, dtype) if tensor.is_floating_point() else tensor.to(DEVICE)
            for name, tensor in tensors.items()}


def seeded_randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def output_and_grads(function, tensors, upstream):
    leaves = {name: tensor.detach().clone().requires_grad_()
              for name, tensor in tensors.items() if tensor.is_floating_point()}
    out = function(**{**tensors, **leaves})
    out.backward(upstream)
    return out.detach(), {name: leaf.grad for name, leaf in leaves.items()}


def assert_matches_reference(tensors, upstream, grad_atol=1e-5):
    got_out, got_grads = output_and_grads(embedding_sum_triton, tensors, upstream)
    expected_out, expected_grads = output_and_grads(embedding_sum_torch, tensors, upstream)
    torch.testing.assert_close(got_out, expected_out, atol=1e-5, rtol=1e-5, msg="output")
    for name, expected in expected_grads.items():
        assert got_grads[name].dtype == expected.dtype, name
        torch.testing.assert_close(got_grads[name], expected, atol=grad_atol, rtol=1e-5,
                                   msg=name)


def max_error(results, exact):
    out, grads = results
    errors = {"output": (out.float() - exact[0]).abs().max().item()}
    for name, grad in grads.items():
        errors[name] = (grad.float() - exact[1][name]).abs().max().item()
    return errors


def assert_low_precision_close(tensors, upstream):
    """Bound the kernel's error by a small multiple of the reference's own error at bf16."""
    upcast = {name: tensor.float() if tensor.is_floating_point() else tensor
              for name, tensor in tensors.items()}
    exact = output_and_grads(embedding_sum_torch, upcast, upstream.float())
    kernel = max_error(output_and_grads(embedding_sum_triton, tensors, upstream), exact)
    reference = max_error(output_and_grads(embedding_sum_torch, tensors, upstream), exact)
    for name, error in kernel.items():
        assert error <= 2 * reference[name] + 1e-3, (name, error, reference[name])


@pytest.mark.parametrize("num_tokens, width", [(37, 48), (64, 64), (1, 16), (300, 96)])
def test_matches_reference(num_tokens, width):
    tensors = make_inputs(num_tokens, width)
    assert_matches_reference(tensors, seeded_randn(num_tokens, width))


@pytest.mark.parametrize("num_tokens, width", [(37, 48), (300, 96)])
def test_bfloat16_error_within_reference_error(num_tokens, width):
    tensors = make_inputs(num_tokens, width, dtype=torch.bfloat16)
    upstream = seeded_randn(num_tokens, width).bfloat16()
    assert_low_precision_close(tensors, upstream)


def test_empty_batch():
    tensors = make_inputs(0, 32)
    out, grads = output_and_grads(embedding_sum_triton, tensors, torch.zeros(0, 32))
    assert out.shape == (0, 32)
    assert torch.count_nonzero(grads["pdg_table"]) == 0


def test_no_bias():
    tensors = {**make_inputs(20, 32, seed=1), "proj_bias": None}
    got = embedding_sum_triton(**tensors)
    torch.testing.assert_close(got, embedding_sum_torch(**tensors))


def test_non_contiguous_features():
    tensors = make_inputs(45, 32, seed=2)
    wide = seeded_randn(45, 2 * FEATURES)
    tensors["features"] = wide[:, 1::2]
    assert not tensors["features"].is_contiguous()
    assert_matches_reference(tensors, seeded_randn(45, 32))


def test_masked_nan_features_ignored():
    tensors = make_inputs(40, 32, seed=3)
    tensors["features"][tensors["mask"]] = float("nan")
    out, grads = output_and_grads(embedding_sum_triton, tensors, torch.ones(40, 32, device=DEVICE))
    assert torch.isfinite(out).all()
    for name, grad in grads.items():
        assert torch.isfinite(grad).all(), name
    assert torch.count_nonzero(grads["features"][tensors["mask"]]) == 0


@pytest.mark.parametrize("kind", ["stride_zero", "from_cat"])
def test_unusual_upstream_grad(kind):
    tensors = make_inputs(50, 32, seed=4)
    if kind == "stride_zero":
        upstream = torch.ones(1, 1, device=DEVICE).expand(50, 32)
    else:
        wide = seeded_randn(50, 64)
        upstream = torch.cat([wide, wide], dim=1)[:, 5:37]
    assert not upstream.is_contiguous()
    assert_matches_reference(tensors, upstream)


def heavy_row_grads(tensors, upstream, grad_mode):
    # Only the parameters are leaves here, which skips the feature-gradient kernel.
    leaves = {name: tensors[name].clone().requires_grad_() for name in PARAMETERS}
    embedding_sum_triton(**{**tensors, **leaves}, grad_mode=grad_mode).backward(upstream)
    return {name: leaf.grad for name, leaf in leaves.items()}


@pytest.mark.parametrize("grad_mode", GRAD_MODES)
def test_one_heavy_row_matches_index_add(grad_mode):
    num_tokens = 10_100
    tensors = make_inputs(num_tokens, 32, seed=5)
    tensors["pdg_index"][:10_000] = 3
    upstream = seeded_randn(num_tokens, 32, seed=6)
    # Only the deterministic mode promises the same bits, so only it runs twice.
    runs = 2 if grad_mode == "deterministic" else 1
    grads = [heavy_row_grads(tensors, upstream, grad_mode) for _ in range(runs)]
    for name in PARAMETERS:
        assert torch.equal(grads[0][name], grads[-1][name]), name
    expected = torch.zeros(PDG_ROWS, 32, dtype=torch.float64, device=DEVICE)
    expected.index_add_(0, tensors["pdg_index"], upstream.double())
    # Relative to the largest entry: a single entry of a sum of 10,000 terms of both signs can
    # lie near 0, where an element-wise relative error measures nothing about the accumulation.
    for grad in grads:
        error = (grad["pdg_table"].double() - expected).abs().max()
        assert error <= 1e-6 * expected.abs().max()


def test_atomic_mode_matches_reference(monkeypatch):
    monkeypatch.setenv(GRAD_MODE_ENV_VAR, "atomic")
    tensors = make_inputs(600, 48, seed=8)
    # Atomic adds sum 600 tokens in another order than torch: gradients of size about 50 then
    # differ by a few fp32 ulps, above an absolute 1e-5 where an entry lies near 0.
    assert_matches_reference(tensors, seeded_randn(600, 48, seed=9), grad_atol=1e-4)


def test_grad_mode_resolution(monkeypatch):
    monkeypatch.delenv(GRAD_MODE_ENV_VAR, raising=False)
    assert resolve_grad_mode() == "deterministic"
    monkeypatch.setenv(GRAD_MODE_ENV_VAR, " Atomic ")
    assert resolve_grad_mode() == "atomic"
    assert resolve_grad_mode("deterministic") == "deterministic"
    monkeypatch.setenv(GRAD_MODE_ENV_VAR, "fast")
    with pytest.raises(ValueError, match="BUMBLEBEE_EMBEDDING_GRAD='fast' is invalid"):
        resolve_grad_mode()
    with pytest.raises(ValueError, match="grad_mode='sorted' is invalid"):
        resolve_grad_mode("sorted")


@pytest.mark.filterwarnings("ignore:Input #:UserWarning")
def test_gradcheck_float32():
    # The kernels accumulate in fp32 whatever the input dtype, so a float64 gradcheck with
    # eps = 1e-6 would measure fp32 rounding. The op is linear in each single input element,
    # so central differences with eps = 1e-2 in fp32 are exact up to rounding (about 1e-5).
    tensors = make_inputs(6, 16, seed=10)
    names = ("features", *PARAMETERS)
    leaves = tuple(tensors[name].clone().requires_grad_() for name in names)

    def function(*values):
        return embedding_sum_triton(**{**tensors, **dict(zip(names, values))})

    assert torch.autograd.gradcheck(function, leaves, eps=1e-2, atol=1e-3, rtol=1e-3,
                                    fast_mode=True)


def test_dispatcher_selects_kernel(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    tensors = make_inputs(20, 32, seed=7)
    torch.testing.assert_close(dispatch.embedding_sum(**tensors), embedding_sum_torch(**tensors))
