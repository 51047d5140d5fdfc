"""Choose between the Triton kernel and the torch reference of each op.

The environment variable ``BUMBLEBEE_KERNELS`` selects the path, read on every call:

- ``auto`` (default): the Triton kernel for CUDA tensors when the op has one, else the reference;
- ``torch``: always the reference;
- ``triton``: always the kernel. An op without a Triton kernel raises NotImplementedError, and
  CPU tensors raise RuntimeError unless ``TRITON_INTERPRET=1`` runs the kernel in the interpreter.

Each op lives in its own module of this package as ``<op>_torch``, the reference, and
``<op>_triton``, the kernel with its launcher and autograd function. This module finds both by
name. Every op has a Triton kernel, so ``auto`` runs all three as kernels on CUDA.
"""

from __future__ import annotations

import os
from types import ModuleType

import torch

from kernels import attention as _attention
from kernels import embedding_sum as _embedding_sum
from kernels import masked_mse as _masked_mse

ENV_VAR = "BUMBLEBEE_KERNELS"
BACKENDS = ("auto", "torch", "triton")
_OP_MODULES: dict[str, ModuleType] = {
    "embedding_sum": _embedding_sum,
    "masked_mse": _masked_mse,
    "unpadded_attention": _attention,
}


def requested_backend() -> str:
    """Return the value of ``BUMBLEBEE_KERNELS`` (``auto`` when unset), lowercased and checked."""
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={value!r} is invalid; valid values: {', '.join(BACKENDS)}")
    return value


def has_triton_kernel(op: str) -> bool:
    """Return True when ``op`` has a Triton implementation."""
    return getattr(_OP_MODULES[op], f"{op}_triton", None) is not None


def select_backend(op: str, device: torch.device) -> str:
    """Return "triton" or "torch" for ``op`` on ``device``, following ``BUMBLEBEE_KERNELS``."""
    if op not in _OP_MODULES:
        raise ValueError(f"op {op!r} is unknown; valid ops: {sorted(_OP_MODULES)}")
    request = requested_backend()
    if request == "torch":
        return "torch"
    if request == "auto":
        return "triton" if device.type == "cuda" and has_triton_kernel(op) else "torch"
    if not has_triton_kernel(op):
        raise NotImplementedError(
            f"{ENV_VAR}=triton requests the Triton kernel of {op}, which is not implemented "
            f"yet; set {ENV_VAR}=torch or auto to use the torch reference"
        )
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"{ENV_VAR}=triton runs {op} on a {device.type} tensor, which Triton supports only "
            f"in its interpreter: set TRITON_INTERPRET=1, or {ENV_VAR}=torch or auto"
        )
    return "triton"


def _implementation(op: str, device: torch.device):
    backend = select_backend(op, device)
    return getattr(_OP_MODULES[op], f"{op}_{backend}")


def embedding_sum(
    features: torch.Tensor,
    mask: torch.Tensor,
    pdg_index: torch.Tensor,
    level: torch.Tensor,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor | None,
    pdg_table: torch.Tensor,
    level_table: torch.Tensor,
    mask_table: torch.Tensor,
) -> torch.Tensor:
    """Embed packed tokens, (T, D); see ``kernels.embedding_sum.embedding_sum_torch``."""
    implementation = _implementation("embedding_sum", features.device)
    return implementation(features, mask, pdg_index, level, proj_weight, proj_bias, pdg_table,
                          level_table, mask_table)


def masked_mse(
    prediction: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    normalizer: int | float | torch.Tensor,
) -> torch.Tensor:
    """Return the masked-token squared error over ``normalizer``, a float32 scalar.

    See ``kernels.masked_mse.masked_mse_torch`` for the contract.
    """
    implementation = _implementation("masked_mse", prediction.device)
    return implementation(prediction, target, mask, normalizer)


def unpadded_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    validate: bool = True,
) -> torch.Tensor:
    """Attend within each packed event: q, k, v (T, N, H) -> (T, N, H).

    ``validate`` checks cu_seqlens and max_seqlen with ``validate_cu_seqlens`` before any kernel
    runs (a host sync); a caller that validated them once per batch passes False.
    """
    if q.ndim != 3 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"q, k and v must share one shape (T, N, H), got {tuple(q.shape)}, "
            f"{tuple(k.shape)} and {tuple(v.shape)}"
        )
    if validate:
        cu_seqlens = _attention.validate_cu_seqlens(cu_seqlens, q.shape[0], max_seqlen=max_seqlen)
    implementation = _implementation("unpadded_attention", q.device)
    return implementation(q, k, v, cu_seqlens, int(max_seqlen))
