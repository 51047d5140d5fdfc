"""Masked mean squared error, the pre-training loss: torch reference and input check.

Shapes: T packed tokens, F particle features. Feature ``PHI_INDEX`` (phi) is periodic, so its
error is taken on the difference wrapped into [-pi, pi], never on the raw difference.

The reference computes in float32 for fp16, bf16 and fp32 inputs, and in float64 for float64
inputs. The largest fp16 value is 65504, and a sum of squared errors over a batch passes that
easily. Unmasked tokens are removed with ``torch.where`` on the difference before squaring, so a
NaN or inf in an unmasked token reaches neither the loss nor the gradient. A product with a 0/1
mask would turn it into NaN, and so would a ``where`` placed after the square, whose backward
multiplies the NaN by 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

PHI_INDEX = 2


def _wrap_phi(diff: torch.Tensor) -> torch.Tensor:
    """Wrap an angle difference into [-pi, pi]; the derivative is 1 almost everywhere.

    Subtracting the nearest multiple of 2 pi leaves a difference already inside the range
    bit-exact, which ``remainder(diff + pi, 2 pi) - pi`` would round to the precision of pi.
    Whether +pi or -pi comes out at the boundary does not matter to a squared error.
    """
    return diff - (2 * math.pi) * torch.round(diff / (2 * math.pi))


def _normalizer_value(
    normalizer: int | float | torch.Tensor, device: torch.device, dtype: torch.dtype
):
    """Return the normalizer, a count of masked tokens, as a value of at least 1."""
    if isinstance(normalizer, torch.Tensor):
        if normalizer.numel() != 1:
            raise ValueError(
                f"normalizer must be a scalar count of masked tokens, got shape "
                f"{tuple(normalizer.shape)}"
            )
        return normalizer.detach().to(device=device, dtype=dtype).reshape(()).clamp_min(1)
    value = float(normalizer)
    if not math.isfinite(value) or value < 0:
        raise ValueError(
            f"normalizer must be a finite count of masked tokens >= 0, got {normalizer!r}"
        )
    return max(value, 1.0)


def check_masked_mse_args(
    prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor
) -> None:
    """Raise ValueError unless prediction and target are (T, F) and mask is (T,) bool."""
    if prediction.ndim != 2 or prediction.shape != target.shape:
        raise ValueError(
            f"prediction and target must both have shape (T, F), got {tuple(prediction.shape)} "
            f"and {tuple(target.shape)}"
        )
    if mask.dtype != torch.bool or mask.shape != prediction.shape[:1]:
        raise ValueError(
            f"mask must be a ({prediction.shape[0]},) bool tensor (True = masked token), got "
            f"shape {tuple(mask.shape)} and {mask.dtype}"
        )


def masked_mse_torch(
    prediction: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    normalizer: int | float | torch.Tensor,
) -> torch.Tensor:
    """Sum the squared error of every feature of the masked tokens, divided by ``normalizer``.

    prediction and target are (T, F) of any float dtype. mask is (T,) bool, True where the token
    was masked. normalizer is the number of masked tokens in the whole global batch, as a Python
    number or a scalar tensor, and no gradient flows into it. A normalizer below 1 counts as 1,
    so a batch with no masked token gives exactly 0 with zero gradients instead of 0 / 0.
    Returns a float32 scalar, or a float64 one when an input is float64.
    """
    check_masked_mse_args(prediction, target, mask)
    dtype = _accumulation_dtype(prediction, target)
    diff_TF = prediction.to(dtype) - target.to(dtype)
    is_phi_F = torch.arange(diff_TF.shape[1], device=diff_TF.device) == PHI_INDEX
    diff_TF = torch.where(is_phi_F, _wrap_phi(diff_TF), diff_TF)
    diff_TF = torch.where(mask[:, None], diff_TF, 0.0)
    return diff_TF.square().sum() / _normalizer_value(normalizer, diff_TF.device, dtype)


def _accumulation_dtype(prediction: torch.Tensor, target: torch.Tensor) -> torch.dtype:
    """Return float32 for fp16, bf16 and fp32 inputs, float64 when either input is float64."""
    return torch.promote_types(torch.promote_types(prediction.dtype, target.dtype), torch.float32)


@dataclass(frozen=True)
class NonFiniteReport:
    """Non-finite values found in one loss input."""

    tensor: str  # "prediction" or "target"
    count: int  # NaN or inf elements in the tensor
    masked_count: int  # of those, in masked tokens: these make the loss non-finite
    first_index: tuple[int, int]  # (token, feature) of the first non-finite element

    def __str__(self) -> str:
        return (
            f"{self.tensor} has {self.count} non-finite values ({self.masked_count} in masked "
            f"tokens); first at token {self.first_index[0]}, feature {self.first_index[1]}"
        )


def check_loss_inputs(
    prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor
) -> list[NonFiniteReport]:
    """Find NaN and inf in the loss inputs; return one report per affected tensor, [] if none.

    Values in unmasked tokens do not reach the loss but are still reported, because they point
    at broken data or a diverging model. This reads the result on the host, so call it at the
    rate you log, not on every kernel launch.
    """
    check_masked_mse_args(prediction, target, mask)
    reports = []
    for name, tensor in (("prediction", prediction), ("target", target)):
        bad_TF = ~torch.isfinite(tensor.detach())
        count = int(bad_TF.sum())
        if count == 0:
            continue
        masked_count = int(bad_TF[mask].sum())
        token, feature = (int(i) for i in torch.nonzero(bad_TF)[0])
        reports.append(NonFiniteReport(name, count, masked_count, (token, feature)))
    return reports
