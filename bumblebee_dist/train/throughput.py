"""Model FLOPs of a training step and the accelerator peak they are compared with (MFU).

FLOPs per optimizer step, the estimate of the PaLM paper's appendix B (Chowdhery et al. 2022)
that nanoGPT also uses, adapted to packed events: a forward pass costs 2 FLOPs per parameter
per token for the matrix products, plus, in each of the L layers, 4 D FLOPs per pair of tokens
of the same event for Q K^T and for the weighted sum of V. Backward costs twice the forward, so

    flops = 6 N T + 12 L D sum_e(len_e^2)

with N parameters, T tokens and len_e the token count of event e. Embedding lookups and
element-wise work are left out, as in that estimate.

MFU is those FLOPs per second divided by the peak of all ranks. The peaks below are dense
(no structured sparsity) numbers from NVIDIA's A100 and H100/H200 data sheets, for bf16 tensor
cores and for plain fp32. Set ``BUMBLEBEE_PEAK_TFLOPS`` to the peak of one device in TFLOPS for
other hardware or clocks. On CPU, or on a GPU not in the table, MFU is reported as n/a.
"""

from __future__ import annotations

import os

import torch

from bumblebee_dist.config import ModelConfig

PEAK_ENV = "BUMBLEBEE_PEAK_TFLOPS"

# Device-name substring -> (bf16 dense TFLOPS, fp32 TFLOPS); the first match wins, so the more
# specific names come first.
PEAK_TFLOPS = (
    ("H100 PCIe", (756.0, 51.0)),
    ("H100 NVL", (835.0, 60.0)),
    ("H100", (989.0, 67.0)),  # SXM5
    ("H200", (989.0, 67.0)),  # same compute as H100 SXM5
    ("A100", (312.0, 19.5)),
)


def step_flops(model: ModelConfig, num_parameters: int, tokens: int, squared_lengths: int) -> float:
    """Training FLOPs of ``tokens`` packed tokens whose event lengths square-sum to ``squared_lengths``."""
    matmul = 6.0 * num_parameters * tokens
    attention = 12.0 * model.num_layers * model.hidden_size * squared_lengths
    return matmul + attention


def peak_flops_per_device(precision: str) -> float | None:
    """Peak FLOP/s of one device for ``precision`` ("bf16" or "fp32"), or None when unknown."""
    override = os.environ.get(PEAK_ENV)
    if override:
        try:
            return float(override) * 1e12
        except ValueError:
            raise ValueError(f"{PEAK_ENV}={override!r} is invalid: expected TFLOPS as a number") from None
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, (bf16, fp32) in PEAK_TFLOPS:
        if key in name:
            return (bf16 if precision == "bf16" else fp32) * 1e12
    return None
