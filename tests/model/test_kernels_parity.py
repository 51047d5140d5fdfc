"""The encoder and its loss give the same output and gradients with the Triton kernels and with
the torch references.

The Triton kernels run on CUDA, or on the CPU under ``TRITON_INTERPRET=1``. ``triton.jit``
reads that variable when the kernels are defined, at import time, so without CUDA this file
reruns itself in a fresh process with the variable set.
"""

import os
import subprocess
import sys

import pytest
import torch

from bumblebee_dist.config import ModelConfig
from bumblebee_dist.model import BumblebeeEncoder
from bumblebee_dist.tokens import PDG_VOCABULARY_SIZE
from kernels import dispatch

KERNELS_RUN_HERE = os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Head dim 12, not a power of two, so the attention kernel pads and masks its head tiles.
CONFIG = ModelConfig(num_layers=2, hidden_size=36, num_heads=3, ffn_size=64)
LENGTHS = [0, 1, 2, 25, 13, 0, 11]
TOLERANCES = {  # dtype: (atol, rtol) of the output, the loss and every parameter gradient
    # The embedding kernel accumulates in fp32 even for float64 inputs.
    torch.float64: (1e-6, 1e-5),
    torch.float32: (2e-5, 1e-4),
}


def make_batch(dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    total = sum(LENGTHS)
    cu_seqlens = torch.zeros(len(LENGTHS) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.cumsum(torch.tensor(LENGTHS), 0)
    batch = {
        "features": torch.randn(total, CONFIG.num_features, generator=generator),
        "pdg_index": torch.randint(0, PDG_VOCABULARY_SIZE, (total,), generator=generator),
        "level": torch.randint(0, 2, (total,), generator=generator),
        "mask": torch.rand(total, generator=generator) < 0.4,
        "cu_seqlens": cu_seqlens,
    }
    batch = {name: tensor.to(DEVICE) for name, tensor in batch.items()}
    batch["features"] = batch["features"].to(dtype)
    return {**batch, "max_seqlen": max(LENGTHS)}


def forward_backward(backend, dtype, monkeypatch):
    """Return the prediction, the masked MSE loss and every parameter gradient."""
    monkeypatch.setenv(dispatch.ENV_VAR, backend)
    model = BumblebeeEncoder(CONFIG, init_seed=0).to(DEVICE, dtype)
    batch = make_batch(dtype)
    prediction = model(**batch)
    mask = batch["mask"]
    loss = dispatch.masked_mse(prediction, batch["features"], mask, int(mask.sum()))
    loss.backward()
    grads = {name: parameter.grad for name, parameter in model.named_parameters()}
    return prediction.detach(), loss.detach(), grads


@pytest.mark.skipif(not KERNELS_RUN_HERE, reason="needs CUDA or TRITON_INTERPRET=1; "
                    "test_parity_under_interpreter reruns this file under the interpreter")
@pytest.mark.parametrize("dtype", list(TOLERANCES))
def test_encoder_triton_matches_torch(dtype, monkeypatch):
    atol, rtol = TOLERANCES[dtype]
    got_prediction, got_loss, got_grads = forward_backward("triton", dtype, monkeypatch)
    prediction, loss, grads = forward_backward("torch", dtype, monkeypatch)
    assert got_prediction.shape == (sum(LENGTHS), CONFIG.num_features)
    torch.testing.assert_close(got_prediction, prediction, atol=atol, rtol=rtol, msg="output")
    torch.testing.assert_close(got_loss, loss, atol=atol, rtol=rtol, msg="loss")
    assert got_grads.keys() == grads.keys()
    for name, expected in grads.items():
        assert got_grads[name] is not None, name
        torch.testing.assert_close(got_grads[name], expected, atol=atol, rtol=rtol, msg=name)


@pytest.mark.skipif(KERNELS_RUN_HERE, reason="the parity test runs directly in this process")
def test_parity_under_interpreter():
    environment = {**os.environ, "TRITON_INTERPRET": "1"}
    environment.pop(dispatch.ENV_VAR, None)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        capture_output=True, text=True, env=environment, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
