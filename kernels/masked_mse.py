"""Masked mean squared error, the pre-training loss: torch reference, Triton kernel, input check.

Shapes: T packed tokens, F particle features. Feature ``PHI_INDEX`` (phi) is periodic, so its
error is taken on the difference wrapped into [-pi, pi], never on the raw difference.

The reference computes in float32 for fp16, bf16 and fp32 inputs, and in float64 for float64
inputs. The largest fp16 value is 65504, and a sum of squared errors over a batch passes that
easily. Unmasked tokens are removed with ``torch.where`` on the difference before squaring, so a
NaN or inf in an unmasked token reaches neither the loss nor the gradient. A product with a 0/1
mask would turn it into NaN, and so would a ``where`` placed after the square, whose backward
multiplies the NaN by 0.

The Triton kernel computes the same function and, in the same pass, the gradient 2 * diff. The
backward pass only scales that gradient by grad_output / normalizer. Its phi wrap rounds half up
where the reference rounds half to even. The two differ only at a difference of exactly an odd
multiple of pi, where both squared errors are equal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

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


# Triton kernel ------------------------------------------------------------------------------

# 256 tokens x 8 feature slots (F = 5 padded to a power of two) = 2048 elements per program, 16
# per thread at the default 4 warps. With 1024 tokens, 64 elements per thread needed more than
# the 255 registers a thread has, so the kernel spilled on sm_80 and sm_90
# (``python -m bench.kernel_compile``). The T / 256 partial sums stay few for torch to add.
_BLOCK_TOKENS = 256


@triton.jit
def _masked_mse_forward_kernel(
    prediction_ptr,
    target_ptr,
    mask_ptr,
    partial_ptr,
    grad_ptr,
    num_tokens,
    num_features,
    prediction_row_stride,
    prediction_col_stride,
    target_row_stride,
    target_col_stride,
    PHI_COL: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_TOKENS: tl.constexpr,
    BLOCK_FEATURES: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
):
    """Write one partial sum of squared errors per program and, optionally, 2 * diff."""
    pid = tl.program_id(0)
    # int64 offsets: tokens * row stride can pass 2**31 for large strided views.
    rows = pid.to(tl.int64) * BLOCK_TOKENS + tl.arange(0, BLOCK_TOKENS)
    cols = tl.arange(0, BLOCK_FEATURES)
    row_ok = rows < num_tokens
    inside = row_ok[:, None] & (cols < num_features)[None, :]
    # Every masked load has a fill value, so memory past the tensor is never read into a sum.
    is_masked = tl.load(mask_ptr + rows, mask=row_ok, other=0) != 0
    prediction = tl.load(
        prediction_ptr + rows[:, None] * prediction_row_stride
        + cols[None, :] * prediction_col_stride,
        mask=inside, other=0.0,
    ).to(ACC_DTYPE)
    target = tl.load(
        target_ptr + rows[:, None] * target_row_stride + cols[None, :] * target_col_stride,
        mask=inside, other=0.0,
    ).to(ACC_DTYPE)
    diff = prediction - target
    # A bare float literal is an fp32 constant in Triton; build 2 pi in the accumulation dtype.
    two_pi = tl.full((), 6.283185307179586, ACC_DTYPE)
    wrapped = diff - two_pi * tl.floor(diff / two_pi + 0.5)
    diff = tl.where((cols == PHI_COL)[None, :], wrapped, diff)
    # where, not a product with the mask: a NaN in an unmasked token must become exactly 0.
    diff = tl.where(inside & is_masked[:, None], diff, 0.0)
    tl.store(partial_ptr + pid, tl.sum(diff * diff))
    if COMPUTE_GRAD:
        grad_offsets = rows[:, None] * num_features + cols[None, :]
        tl.store(grad_ptr + grad_offsets, 2.0 * diff, mask=inside)


def _launch_forward(prediction, target, mask, compute_grad: bool):
    """Return (sum of squared errors, unscaled gradient 2 * diff or None), both in acc dtype."""
    num_tokens, num_features = prediction.shape
    acc_dtype = _accumulation_dtype(prediction, target)
    num_programs = triton.cdiv(num_tokens, _BLOCK_TOKENS)
    partial = torch.zeros(max(num_programs, 1), dtype=acc_dtype, device=prediction.device)
    grad = None
    if compute_grad:
        grad = torch.empty(num_tokens, num_features, dtype=acc_dtype, device=prediction.device)
    if num_programs > 0:
        _masked_mse_forward_kernel[(num_programs,)](
            prediction, target, mask.contiguous().view(torch.uint8), partial,
            grad if compute_grad else partial,
            num_tokens, num_features,
            prediction.stride(0), prediction.stride(1), target.stride(0), target.stride(1),
            PHI_COL=PHI_INDEX,
            ACC_DTYPE=tl.float64 if acc_dtype == torch.float64 else tl.float32,
            BLOCK_TOKENS=_BLOCK_TOKENS,
            BLOCK_FEATURES=triton.next_power_of_2(num_features),
            COMPUTE_GRAD=compute_grad,
        )
    # Summing the per-program partials with torch keeps the result bit-reproducible, which
    # atomic adds across programs would not.
    return partial.sum(), grad


class _MaskedMSEFunction(torch.autograd.Function):
    """Loss and gradient in one forward pass; backward only scales the stored gradient."""

    @staticmethod
    def forward(ctx, prediction, target, mask, normalizer):
        compute_grad = prediction.requires_grad or target.requires_grad
        total, grad = _launch_forward(prediction, target, mask, compute_grad)
        ctx.save_for_backward(grad if compute_grad else None)
        ctx.normalizer = normalizer
        ctx.dtypes = (prediction.dtype, target.dtype)
        return total / normalizer

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        scale = grad_output / ctx.normalizer
        grad_prediction = grad_target = None
        if ctx.needs_input_grad[0]:
            grad_prediction = (grad * scale).to(ctx.dtypes[0])
        if ctx.needs_input_grad[1]:
            grad_target = (grad * -scale).to(ctx.dtypes[1])
        return grad_prediction, grad_target, None, None


def masked_mse_triton(
    prediction: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    normalizer: int | float | torch.Tensor,
) -> torch.Tensor:
    """Fused masked MSE, the same contract as ``masked_mse_torch``.

    One kernel reads prediction and target once, through their strides, and writes the partial
    sums and the unscaled gradient. It makes no other (T, F) intermediate.
    """
    check_masked_mse_args(prediction, target, mask)
    dtype = _accumulation_dtype(prediction, target)
    normalizer_value = _normalizer_value(normalizer, prediction.device, dtype)
    return _MaskedMSEFunction.apply(prediction, target, mask, normalizer_value)
