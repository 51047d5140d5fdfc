"""Token input embedding: projection of the particle vector plus three embedding lookups.

Shapes: T packed tokens, F particle features, D model width, P rows of the PDG-id table.

    out_TD = linear(where(mask, 0, features_TF)) + pdg_table[pdg_index]
             + level_table[level] + mask_table[mask]

The particle vector of a masked token is replaced by zeros before the projection. This uses
``torch.where`` rather than a product with a 0/1 mask, so no value of a masked token reaches the
output or the gradient of the projection, not even a NaN. Its PDG id and level stay visible.

This file contains the torch reference and the fused Triton kernels: one forward kernel, and a
backward pass of two kernels (feature gradient per token block, parameter gradients reduced per
token chunk). The kernels skip loading a masked token's features at all.

The parameter gradients have two modes, chosen per call by the ``grad_mode`` argument of
``embedding_sum_triton`` or else by the environment variable ``BUMBLEBEE_EMBEDDING_GRAD``:

- ``deterministic`` (default): each program writes the partial sums of its chunk of tokens, and
  torch adds the chunks in a fixed order, so the gradients have the same bits on every run;
- ``atomic``: each program adds its partial sums into one fp32 buffer with atomic adds. Smaller
  chunks give more programs and no partial buffer, but the order of the adds, and so the last
  bits of the sums, changes from run to run. ``python -m bench.kernels`` times both modes.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

GRAD_MODE_ENV_VAR = "BUMBLEBEE_EMBEDDING_GRAD"
GRAD_MODES = ("deterministic", "atomic")


def resolve_grad_mode(grad_mode: str | None = None) -> str:
    """Return ``grad_mode``, else ``BUMBLEBEE_EMBEDDING_GRAD``, else "deterministic", checked."""
    source = "grad_mode"
    if grad_mode is None:
        source = GRAD_MODE_ENV_VAR
        grad_mode = os.environ.get(GRAD_MODE_ENV_VAR, "").strip().lower() or "deterministic"
    if grad_mode not in GRAD_MODES:
        raise ValueError(
            f"{source}={grad_mode!r} is invalid; valid values: {', '.join(GRAD_MODES)}"
        )
    return grad_mode


def check_embedding_sum_args(
    features: torch.Tensor,
    mask: torch.Tensor,
    pdg_index: torch.Tensor,
    level: torch.Tensor,
    proj_weight: torch.Tensor,
    pdg_table: torch.Tensor,
    level_table: torch.Tensor,
    mask_table: torch.Tensor,
) -> None:
    """Raise ValueError naming the argument whose shape or dtype does not fit the others."""
    if features.ndim != 2:
        raise ValueError(f"features must have shape (T, F), got {tuple(features.shape)}")
    num_tokens, num_features = features.shape
    width = proj_weight.shape[0]
    if proj_weight.shape != (width, num_features):
        raise ValueError(
            f"proj_weight must have shape (D, F) = (D, {num_features}), got "
            f"{tuple(proj_weight.shape)}"
        )
    if mask.dtype != torch.bool or mask.shape != (num_tokens,):
        raise ValueError(
            f"mask must be a ({num_tokens},) bool tensor (True = masked token), got shape "
            f"{tuple(mask.shape)} and {mask.dtype}"
        )
    for name, index in (("pdg_index", pdg_index), ("level", level)):
        if index.shape != (num_tokens,) or index.dtype.is_floating_point:
            raise ValueError(
                f"{name} must be a ({num_tokens},) integer tensor, got shape "
                f"{tuple(index.shape)} and {index.dtype}"
            )
    for name, table in (("pdg_table", pdg_table), ("level_table", level_table),
                        ("mask_table", mask_table)):
        if table.ndim != 2 or table.shape[1] != width:
            raise ValueError(f"{name} must have shape (rows, {width}), got {tuple(table.shape)}")


def embedding_sum_torch(
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
    """Embed packed tokens, (T, D): see the module docstring for the formula.

    features: (T, F) model-space features; mask: (T,) bool, True where the token is masked;
    pdg_index: (T,) rows of ``pdg_table`` (P, D); level: (T,) 1 reco or 0 gen, rows of
    ``level_table`` (2, D); proj_weight (D, F) and proj_bias (D,) as in ``torch.nn.Linear``;
    mask_table: (2, D), row 1 for masked tokens.
    """
    check_embedding_sum_args(features, mask, pdg_index, level, proj_weight, pdg_table,
                             level_table, mask_table)
    visible_TF = torch.where(mask[:, None], torch.zeros_like(features), features)
    out_TD = F.linear(visible_TF, proj_weight, proj_bias)
    out_TD = out_TD + F.embedding(pdg_index.long(), pdg_table)
    out_TD = out_TD + F.embedding(level.long(), level_table)
    return out_TD + F.embedding(mask.long(), mask_table)


# Triton kernels -----------------------------------------------------------------------------

# Features are padded to 16, the smallest K and M that tl.dot accepts. Every tl.dot uses IEEE
# fp32 products: TF32 would keep only 10 mantissa bits of the particle vector and the gradients.
_BLOCK_FEATURES = 16
_BLOCK_TOKENS = 32
_BLOCK_WIDTH = 64
# Deterministic mode reduces the parameter gradients per chunk of tokens, then torch sums the
# chunk partials in a fixed order: the bits depend only on the number of tokens, never on
# scheduling.
_MAX_CHUNKS = 64
# Atomic mode gives each program 8 token blocks (256 tokens), so a large batch has many more
# programs than the 64 deterministic chunks, at the cost of one atomic add per partial element.
_ATOMIC_CHUNK_BLOCKS = 8


@triton.jit
def _load_visible_features(features_ptr, mask_ptr, rows, row_ok, feats, num_features,
                           row_stride, col_stride):
    """Load a (BLOCK_TOKENS, BLOCK_FEATURES) fp32 tile; masked tokens and padding read as 0."""
    is_masked = tl.load(mask_ptr + rows, mask=row_ok, other=1) != 0
    visible = (row_ok & ~is_masked)[:, None] & (feats < num_features)[None, :]
    offsets = rows[:, None] * row_stride + feats[None, :] * col_stride
    return tl.load(features_ptr + offsets, mask=visible, other=0.0).to(tl.float32)


@triton.jit
def _embedding_sum_forward_kernel(
    features_ptr, mask_ptr, pdg_index_ptr, level_ptr, weight_ptr, bias_ptr,
    pdg_table_ptr, level_table_ptr, mask_table_ptr, out_ptr,
    num_tokens, num_features, width,
    features_row_stride, features_col_stride, weight_row_stride, weight_col_stride,
    HAS_BIAS: tl.constexpr,
    BLOCK_TOKENS: tl.constexpr, BLOCK_WIDTH: tl.constexpr, BLOCK_FEATURES: tl.constexpr,
):
    """out[t, d] = sum_f x[t, f] W[d, f] + b[d] + pdg[p_t, d] + level[l_t, d] + mask[m_t, d]."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_TOKENS + tl.arange(0, BLOCK_TOKENS)
    cols = tl.program_id(1) * BLOCK_WIDTH + tl.arange(0, BLOCK_WIDTH)
    feats = tl.arange(0, BLOCK_FEATURES)
    row_ok = rows < num_tokens
    col_ok = cols < width
    inside = row_ok[:, None] & col_ok[None, :]
    x = _load_visible_features(features_ptr, mask_ptr, rows, row_ok, feats, num_features,
                               features_row_stride, features_col_stride)
    weight_t = tl.load(
        weight_ptr + cols[None, :] * weight_row_stride + feats[:, None] * weight_col_stride,
        mask=(feats < num_features)[:, None] & col_ok[None, :], other=0.0,
    ).to(tl.float32)
    acc = tl.dot(x, weight_t, input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    pdg_row = tl.load(pdg_index_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    level_row = tl.load(level_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    mask_row = tl.load(mask_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    # Tables are contiguous (the launcher ensures it), so a row starts at row * width.
    acc += tl.load(pdg_table_ptr + pdg_row[:, None] * width + cols[None, :], mask=inside,
                   other=0.0).to(tl.float32)
    acc += tl.load(level_table_ptr + level_row[:, None] * width + cols[None, :], mask=inside,
                   other=0.0).to(tl.float32)
    acc += tl.load(mask_table_ptr + mask_row[:, None] * width + cols[None, :], mask=inside,
                   other=0.0).to(tl.float32)
    out_offsets = rows[:, None] * width + cols[None, :]
    tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _embedding_sum_features_backward_kernel(
    grad_out_ptr, weight_ptr, mask_ptr, grad_features_ptr,
    num_tokens, num_features, width,
    grad_row_stride, grad_col_stride, weight_row_stride, weight_col_stride,
    BLOCK_TOKENS: tl.constexpr, BLOCK_WIDTH: tl.constexpr, BLOCK_FEATURES: tl.constexpr,
):
    """grad_x[t, f] = sum_d g[t, d] W[d, f] for visible tokens, 0 for masked ones."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_TOKENS + tl.arange(0, BLOCK_TOKENS)
    feats = tl.arange(0, BLOCK_FEATURES)
    row_ok = rows < num_tokens
    feat_ok = feats < num_features
    acc = tl.zeros((BLOCK_TOKENS, BLOCK_FEATURES), dtype=tl.float32)
    for start in range(0, width, BLOCK_WIDTH):
        cols = start + tl.arange(0, BLOCK_WIDTH)
        col_ok = cols < width
        grad = tl.load(
            grad_out_ptr + rows[:, None] * grad_row_stride + cols[None, :] * grad_col_stride,
            mask=row_ok[:, None] & col_ok[None, :], other=0.0,
        ).to(tl.float32)
        weight = tl.load(
            weight_ptr + cols[:, None] * weight_row_stride + feats[None, :] * weight_col_stride,
            mask=col_ok[:, None] & feat_ok[None, :], other=0.0,
        ).to(tl.float32)
        acc += tl.dot(grad, weight, input_precision="ieee")
    is_masked = tl.load(mask_ptr + rows, mask=row_ok, other=1) != 0
    acc = tl.where(is_masked[:, None], 0.0, acc)
    offsets = rows[:, None] * num_features + feats[None, :]
    tl.store(grad_features_ptr + offsets, acc, mask=row_ok[:, None] & feat_ok[None, :])


@triton.jit
def _embedding_sum_params_backward_kernel(
    grad_out_ptr, features_ptr, mask_ptr, pdg_index_ptr, level_ptr,
    row_partial_ptr, weight_partial_ptr,
    num_tokens, num_features, width, num_pdg_rows, tokens_per_chunk,
    grad_row_stride, grad_col_stride, features_row_stride, features_col_stride,
    BLOCK_TOKENS: tl.constexpr, BLOCK_WIDTH: tl.constexpr, BLOCK_FEATURES: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, ATOMIC: tl.constexpr,
):
    """Reduce one chunk of tokens into table-row and weight gradient partials.

    Table rows are stacked as [pdg rows, 2 level rows, 2 mask rows, 1 bias row], so a one-hot
    (BLOCK_ROWS, BLOCK_TOKENS) matrix times the gradient tile sums every table at once. With
    ATOMIC the partials are added into slot 0, else stored into the chunk's own slot.
    """
    cols = tl.program_id(0) * BLOCK_WIDTH + tl.arange(0, BLOCK_WIDTH)
    chunk = tl.program_id(1)
    feats = tl.arange(0, BLOCK_FEATURES)
    table_rows = tl.arange(0, BLOCK_ROWS)
    col_ok = cols < width
    row_acc = tl.zeros((BLOCK_ROWS, BLOCK_WIDTH), dtype=tl.float32)
    weight_acc = tl.zeros((BLOCK_FEATURES, BLOCK_WIDTH), dtype=tl.float32)
    chunk_start = chunk.to(tl.int64) * tokens_per_chunk
    for start in range(0, tokens_per_chunk, BLOCK_TOKENS):
        rows = chunk_start + start + tl.arange(0, BLOCK_TOKENS)
        row_ok = rows < num_tokens
        grad = tl.load(
            grad_out_ptr + rows[:, None] * grad_row_stride + cols[None, :] * grad_col_stride,
            mask=row_ok[:, None] & col_ok[None, :], other=0.0,
        ).to(tl.float32)
        pdg_row = tl.load(pdg_index_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        level_row = num_pdg_rows + tl.load(level_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        mask_row = num_pdg_rows + 2 + tl.load(mask_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        hits = ((table_rows[:, None] == pdg_row[None, :])
                | (table_rows[:, None] == level_row[None, :])
                | (table_rows[:, None] == mask_row[None, :])
                | (table_rows[:, None] == num_pdg_rows + 4)) & row_ok[None, :]
        row_acc += tl.dot(hits.to(tl.float32), grad, input_precision="ieee")
        x = _load_visible_features(features_ptr, mask_ptr, rows, row_ok, feats, num_features,
                                   features_row_stride, features_col_stride)
        weight_acc += tl.dot(tl.trans(x), grad, input_precision="ieee")
    if ATOMIC:
        row_offsets = table_rows[:, None] * width + cols[None, :]
        weight_offsets = feats[:, None] * width + cols[None, :]
        tl.atomic_add(row_partial_ptr + row_offsets, row_acc,
                      mask=(table_rows >= 0)[:, None] & col_ok[None, :], sem="relaxed")
        tl.atomic_add(weight_partial_ptr + weight_offsets, weight_acc,
                      mask=(feats >= 0)[:, None] & col_ok[None, :], sem="relaxed")
    else:
        row_offsets = (chunk * BLOCK_ROWS + table_rows[:, None]) * width + cols[None, :]
        tl.store(row_partial_ptr + row_offsets, row_acc, mask=col_ok[None, :])
        weight_offsets = (chunk * BLOCK_FEATURES + feats[:, None]) * width + cols[None, :]
        tl.store(weight_partial_ptr + weight_offsets, weight_acc, mask=col_ok[None, :])


def _launch_forward(features, mask_u8, pdg_index, level, weight, bias, tables):
    num_tokens, num_features = features.shape
    width = weight.shape[0]
    out = torch.empty(num_tokens, width, dtype=weight.dtype, device=features.device)
    if num_tokens == 0:
        return out
    grid = (triton.cdiv(num_tokens, _BLOCK_TOKENS), triton.cdiv(width, _BLOCK_WIDTH))
    _embedding_sum_forward_kernel[grid](
        features, mask_u8, pdg_index, level, weight, bias if bias is not None else weight,
        *tables, out,
        num_tokens, num_features, width,
        features.stride(0), features.stride(1), weight.stride(0), weight.stride(1),
        HAS_BIAS=bias is not None,
        BLOCK_TOKENS=_BLOCK_TOKENS, BLOCK_WIDTH=_BLOCK_WIDTH, BLOCK_FEATURES=_BLOCK_FEATURES,
    )
    return out


def _launch_features_backward(grad_out, weight, mask_u8):
    num_tokens, width = grad_out.shape
    num_features = weight.shape[1]
    grad_features = torch.zeros(num_tokens, num_features, dtype=torch.float32,
                                device=grad_out.device)
    if num_tokens == 0:
        return grad_features
    _embedding_sum_features_backward_kernel[(triton.cdiv(num_tokens, _BLOCK_TOKENS),)](
        grad_out, weight, mask_u8, grad_features,
        num_tokens, num_features, width,
        grad_out.stride(0), grad_out.stride(1), weight.stride(0), weight.stride(1),
        BLOCK_TOKENS=_BLOCK_TOKENS, BLOCK_WIDTH=_BLOCK_WIDTH, BLOCK_FEATURES=_BLOCK_FEATURES,
    )
    return grad_features


def _launch_params_backward(grad_out, features, mask_u8, pdg_index, level, num_pdg_rows,
                            grad_mode):
    """Return fp32 (stacked table-row gradients (P + 5, D), weight gradient (D, F))."""
    num_tokens, width = grad_out.shape
    num_features = features.shape[1]
    block_rows = max(16, triton.next_power_of_2(num_pdg_rows + 5))
    num_blocks = max(triton.cdiv(num_tokens, _BLOCK_TOKENS), 1)
    atomic = grad_mode == "atomic"
    if atomic:
        blocks_per_chunk = _ATOMIC_CHUNK_BLOCKS
        num_chunks = triton.cdiv(num_blocks, blocks_per_chunk)
    else:
        num_chunks = min(num_blocks, _MAX_CHUNKS)
        blocks_per_chunk = triton.cdiv(num_blocks, num_chunks)
    tokens_per_chunk = blocks_per_chunk * _BLOCK_TOKENS
    num_slots = 1 if atomic else num_chunks
    device = grad_out.device
    row_partial = torch.zeros(num_slots, block_rows, width, dtype=torch.float32, device=device)
    weight_partial = torch.zeros(num_slots, _BLOCK_FEATURES, width, dtype=torch.float32,
                                 device=device)
    if num_tokens > 0:
        _embedding_sum_params_backward_kernel[(triton.cdiv(width, _BLOCK_WIDTH), num_chunks)](
            grad_out, features, mask_u8, pdg_index, level, row_partial, weight_partial,
            num_tokens, num_features, width, num_pdg_rows, tokens_per_chunk,
            grad_out.stride(0), grad_out.stride(1), features.stride(0), features.stride(1),
            BLOCK_TOKENS=_BLOCK_TOKENS, BLOCK_WIDTH=_BLOCK_WIDTH,
            BLOCK_FEATURES=_BLOCK_FEATURES, BLOCK_ROWS=block_rows, ATOMIC=atomic,
        )
    rows = row_partial.sum(dim=0)[: num_pdg_rows + 5]
    weight = weight_partial.sum(dim=0)[:num_features].T
    return rows, weight


class _EmbeddingSumFunction(torch.autograd.Function):
    """Fused embedding sum; both passes are Triton kernels.

    The parameter-gradient reduction follows ``grad_mode``, fixed at the forward call.
    """

    @staticmethod
    def forward(ctx, features, mask, pdg_index, level, weight, bias, pdg_table, level_table,
                mask_table, grad_mode):
        mask_u8 = mask.contiguous().view(torch.uint8)
        pdg_index, level = pdg_index.contiguous(), level.contiguous()
        tables = tuple(table.contiguous() for table in (pdg_table, level_table, mask_table))
        out = _launch_forward(features, mask_u8, pdg_index, level, weight, bias, tables)
        ctx.save_for_backward(features, mask_u8, pdg_index, level, weight)
        ctx.has_bias = bias is not None
        ctx.num_pdg_rows = pdg_table.shape[0]
        ctx.grad_mode = grad_mode
        ctx.dtypes = [t.dtype if t is not None else None for t in
                      (features, weight, bias, pdg_table, level_table, mask_table)]
        return out

    @staticmethod
    def backward(ctx, grad_out):
        features, mask_u8, pdg_index, level, weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_features = None
        if needs[0]:
            grad_features = _launch_features_backward(grad_out, weight, mask_u8)
        if not any(needs[4:9]):
            return (grad_features, *[None] * 9)
        rows, grad_weight = _launch_params_backward(
            grad_out, features, mask_u8, pdg_index, level, ctx.num_pdg_rows, ctx.grad_mode
        )
        pdg_rows = ctx.num_pdg_rows
        grads = [grad_features, grad_weight, rows[pdg_rows + 4] if ctx.has_bias else None,
                 rows[:pdg_rows], rows[pdg_rows:pdg_rows + 2], rows[pdg_rows + 2:pdg_rows + 4]]
        grads = [None if grad is None or not need else grad.to(dtype)
                 for grad, need, dtype in zip(grads, (needs[0], *needs[4:9]), ctx.dtypes)]
        grad_features, grad_weight, grad_bias, *grad_tables = grads
        return (grad_features, None, None, None, grad_weight, grad_bias, *grad_tables, None)


def embedding_sum_triton(
    features: torch.Tensor,
    mask: torch.Tensor,
    pdg_index: torch.Tensor,
    level: torch.Tensor,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor | None,
    pdg_table: torch.Tensor,
    level_table: torch.Tensor,
    mask_table: torch.Tensor,
    grad_mode: str | None = None,
) -> torch.Tensor:
    """Embed packed tokens with the fused kernels, the same contract as ``embedding_sum_torch``.

    The output has the dtype of ``proj_weight``; accumulation is in fp32. ``grad_mode`` is
    "deterministic" or "atomic" (see the module docstring); None reads
    ``BUMBLEBEE_EMBEDDING_GRAD``, whose default is "deterministic".

    NOTE: indices are not range-checked on the device, because a check would cost a host sync.
    pdg_index must contain rows of pdg_table (``tokens.pdg_to_index`` ensures it) and level 0 or 1.
    """
    check_embedding_sum_args(features, mask, pdg_index, level, proj_weight, pdg_table,
                             level_table, mask_table)
    if level_table.shape[0] != 2 or mask_table.shape[0] != 2:
        raise ValueError(
            f"level_table and mask_table must have 2 rows, got {level_table.shape[0]} and "
            f"{mask_table.shape[0]}"
        )
    return _EmbeddingSumFunction.apply(features, mask, pdg_index, level, proj_weight, proj_bias,
                                       pdg_table, level_table, mask_table,
                                       resolve_grad_mode(grad_mode))
