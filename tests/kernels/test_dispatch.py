import pytest
import torch

from kernels import dispatch

OPS = ("embedding_sum", "masked_mse", "unpadded_attention")
CPU = torch.device("cpu")
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.mark.parametrize("op", OPS)
def test_default_is_auto_and_torch_on_cpu(op):
    assert dispatch.requested_backend() == "auto"
    assert dispatch.select_backend(op, CPU) == "torch"


@pytest.mark.parametrize("op", OPS)
def test_auto_on_cuda_uses_kernel_when_present(op, monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "auto")
    expected = "triton" if dispatch.has_triton_kernel(op) else "torch"
    assert dispatch.select_backend(op, CUDA) == expected


@pytest.mark.parametrize("op", OPS)
def test_torch_forced_everywhere(op, monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    assert dispatch.select_backend(op, CUDA) == "torch"
    assert dispatch.select_backend(op, CPU) == "torch"


@pytest.mark.parametrize("op", OPS)
def test_triton_forced_on_cpu_needs_interpreter(op, monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    if not dispatch.has_triton_kernel(op):
        with pytest.raises(NotImplementedError, match="not implemented yet"):
            dispatch.select_backend(op, CPU)
        return
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        dispatch.select_backend(op, CPU)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.select_backend(op, CPU) == "triton"


@pytest.mark.parametrize("op", OPS)
def test_every_op_has_kernel(op):
    assert dispatch.has_triton_kernel(op)


def test_value_is_case_insensitive(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, " Torch ")
    assert dispatch.requested_backend() == "torch"


def test_invalid_value_lists_valid_ones(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="auto, torch, triton"):
        dispatch.select_backend("masked_mse", CPU)


def test_unknown_op_rejected():
    with pytest.raises(ValueError, match="valid ops"):
        dispatch.select_backend("softmax", CPU)


def test_masked_mse_through_dispatcher(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    prediction = torch.ones(4, 5)
    target = torch.zeros(4, 5)
    mask = torch.tensor([True, False, True, False])
    assert dispatch.masked_mse(prediction, target, mask, 2).item() == 5.0


def test_attention_shape_mismatch_rejected():
    q = torch.zeros(5, 2, 4)
    with pytest.raises(ValueError, match="share one shape"):
        dispatch.unpadded_attention(q, q[:4], q, torch.tensor([0, 5], dtype=torch.int32), 5)
