"""Attention over packed, unpadded events: cu_seqlens checks, padding helpers, torch reference.

Shapes: E events, T packed tokens, S = max_seqlen, N heads, H head dim.

A packed batch concatenates the tokens of E events. ``cu_seqlens`` (E + 1,) int32 contains the
token offset of each event, starting at 0 and ending at T, so event e owns tokens
``cu_seqlens[e]:cu_seqlens[e + 1]``. No token attends to a token of another event.

The reference scatters the packed tokens into an (E, S) padded layout, left-aligned, runs
``torch.nn.functional.scaled_dot_product_attention`` with a key padding mask, and gathers the
real tokens back. It spends memory on padding (E * S instead of T rows), which the fused kernel
avoids. Padding convention everywhere in this file: a bool mask, True at real tokens (the keys
that take part in attention, as in the bool ``attn_mask`` of scaled_dot_product_attention) and
False at padding.

The Triton kernels follow FlashAttention (Dao et al., arXiv:2205.14135, and FlashAttention-2).
The forward pass makes one pass over the keys with an online softmax and saves the log-sum-exp
of each query row. The backward pass recomputes the probabilities from it, so no (S, S) matrix
is ever stored. Unlike the padded reference, they read the packed (T, N, H) tensors directly
through cu_seqlens and their strides. One program handles one (event, head, block of BLOCK
query tokens). For bf16 and fp16 inputs BLOCK is the next power of two of max_seqlen between 16
and 32. A dileptonic event has 11 to 20 tokens, so BLOCK = 32 covers the longest event: the
program reads q, k and v of its event once, and its score tile is the whole event. fp32 and
fp64 inputs always use BLOCK = 16 (see ``_tile_config``). An event longer than BLOCK is not an
error: its query rows spread over several programs, each looping over key blocks, and the
backward pass then computes dQ in a second kernel instead of alongside dK and dV. Limits: head
dim at most 256, no dropout and no causal mask, scale fixed at 1 / sqrt(H).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

INT32_MAX = 2**31 - 1
_PADDING_CONVENTION = (
    "the convention is a bool tensor (E, S), True at real tokens (keys that take part in "
    "attention), left-aligned, and False at padding"
)


def validate_cu_seqlens(
    cu_seqlens: torch.Tensor,
    total_tokens: int,
    num_events: int | None = None,
    max_seqlen: int | None = None,
) -> torch.Tensor:
    """Check packed-batch offsets and return them as int32 on the same device.

    Each broken rule raises a ValueError that names it. The rules, in the order checked:

    - ``total_tokens`` fits int32, checked before any cast;
    - cu_seqlens is 1-D int32 or int64; int64 is converted to int32 after the checks, and float
      and bool are rejected;
    - its length is ``num_events + 1`` when num_events is given;
    - it starts at 0, never decreases, and ends at ``total_tokens``;
    - ``max_seqlen``, when given, is at least the longest event.

    Reading the values copies them to the host, which synchronizes a CUDA stream, so call this
    once per batch, not per layer.
    """
    if not 0 <= int(total_tokens) <= INT32_MAX:
        raise ValueError(
            f"total tokens {total_tokens} lie outside the int32 range [0, {INT32_MAX}] that "
            f"cu_seqlens uses; split the batch into smaller packed batches"
        )
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be int32 (or int64, converted), got {cu_seqlens.dtype}")
    if cu_seqlens.ndim != 1 or cu_seqlens.numel() == 0:
        raise ValueError(
            f"cu_seqlens must be 1-D with E + 1 >= 1 entries, got shape {tuple(cu_seqlens.shape)}"
        )
    if num_events is not None and cu_seqlens.numel() != num_events + 1:
        raise ValueError(
            f"cu_seqlens must have E + 1 = {num_events + 1} entries for {num_events} events, "
            f"got {cu_seqlens.numel()}"
        )
    offsets = cu_seqlens.detach().to("cpu", torch.int64)
    _check_offset_values(offsets, int(total_tokens), max_seqlen)
    return cu_seqlens.to(torch.int32)


def _check_offset_values(offsets: torch.Tensor, total_tokens: int, max_seqlen: int | None):
    if offsets[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {int(offsets[0])}")
    lengths = offsets[1:] - offsets[:-1]
    if (lengths < 0).any():
        first = int(torch.nonzero(lengths < 0)[0])
        raise ValueError(
            f"cu_seqlens must not decrease, but entry {first + 1} ({int(offsets[first + 1])}) "
            f"is below entry {first} ({int(offsets[first])})"
        )
    if offsets[-1] != total_tokens:
        raise ValueError(
            f"cu_seqlens must end at the total token count {total_tokens}, "
            f"got {int(offsets[-1])}"
        )
    longest = int(lengths.max()) if lengths.numel() else 0
    if max_seqlen is not None and int(max_seqlen) < longest:
        raise ValueError(
            f"max_seqlen={max_seqlen} is below the longest event ({longest} tokens); pass "
            f"max_seqlen >= {longest}"
        )


def padding_mask_from_cu_seqlens(cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
    """Return the (E, S) bool key padding mask, True at real tokens and False at padding."""
    lengths_E = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    positions_S = torch.arange(max_seqlen, device=cu_seqlens.device)
    return positions_S[None, :] < lengths_E[:, None]


def check_padding_mask(key_padding_mask: torch.Tensor) -> None:
    """Raise ValueError unless the mask is (E, S) bool, True at real tokens, left-aligned.

    Integer and float masks are rejected because 0/1 masks come in both polarities. A bool mask
    of the opposite polarity (True at padding) is caught whenever some row is partly filled,
    because then a True follows a False in that row.
    """
    if key_padding_mask.dtype != torch.bool:
        raise ValueError(
            f"key_padding_mask has dtype {key_padding_mask.dtype}; {_PADDING_CONVENTION}"
        )
    if key_padding_mask.ndim != 2:
        raise ValueError(
            f"key_padding_mask has shape {tuple(key_padding_mask.shape)}; {_PADDING_CONVENTION}"
        )
    token_after_padding = key_padding_mask[:, 1:] & ~key_padding_mask[:, :-1]
    if token_after_padding.any():
        row = int(torch.nonzero(token_after_padding)[0, 0])
        raise ValueError(
            f"key_padding_mask row {row} has True after False; {_PADDING_CONVENTION}. A mask "
            f"with True at padding has the opposite polarity: pass ~mask"
        )


def padded_attention(
    q_ESNH: torch.Tensor,
    k_ESNH: torch.Tensor,
    v_ESNH: torch.Tensor,
    key_padding_mask: torch.Tensor,
    check: bool = True,
) -> torch.Tensor:
    """Attend within each padded event, (E, S, N, H); padding rows of the output are exactly 0.

    ``check`` runs ``check_padding_mask`` first, which reads the mask on the host; callers that
    built the mask with ``padding_mask_from_cu_seqlens`` may skip it.

    An event without any real key would give a softmax over nothing (NaN). Such rows attend to
    every position instead, which is finite, and are then replaced by 0 with ``torch.where``,
    so neither the output nor any gradient contains a NaN.
    """
    if check:
        check_padding_mask(key_padding_mask)
    has_key_E = key_padding_mask.any(dim=1)
    attend_ES = key_padding_mask | ~has_key_E[:, None]
    out_ENSH = F.scaled_dot_product_attention(
        q_ESNH.transpose(1, 2),
        k_ESNH.transpose(1, 2),
        v_ESNH.transpose(1, 2),
        attn_mask=attend_ES[:, None, None, :],
    )
    out_ESNH = out_ENSH.transpose(1, 2)
    return torch.where(key_padding_mask[:, :, None, None], out_ESNH, torch.zeros_like(out_ESNH))


def _token_slots(cu_seqlens: torch.Tensor, total_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (event, position) of every packed token, each (T,) int64, without a host sync."""
    starts_E = cu_seqlens[:-1].long()
    lengths_E = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    event_T = torch.repeat_interleave(
        torch.arange(lengths_E.numel(), device=cu_seqlens.device), lengths_E,
        output_size=total_tokens,
    )
    position_T = torch.arange(total_tokens, device=cu_seqlens.device) - starts_E[event_T]
    return event_T, position_T


def unpadded_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
) -> torch.Tensor:
    """Attend within each packed event: q, k, v (T, N, H) -> (T, N, H), scale 1 / sqrt(H).

    cu_seqlens: (E + 1,) int32 offsets, checked beforehand with ``validate_cu_seqlens``;
    max_seqlen: a Python int, at least the longest event.
    """
    total_tokens, num_heads, head_dim = q.shape
    num_events = cu_seqlens.numel() - 1
    event_T, position_T = _token_slots(cu_seqlens, total_tokens)
    padded = []
    for packed_TNH in (q, k, v):
        padded_ESNH = packed_TNH.new_zeros(num_events, max_seqlen, num_heads, head_dim)
        padded.append(padded_ESNH.index_put((event_T, position_T), packed_TNH))
    key_padding_mask = padding_mask_from_cu_seqlens(cu_seqlens, max_seqlen)
    out_ESNH = padded_attention(*padded, key_padding_mask, check=False)
    return out_ESNH[event_T, position_T]


# Triton kernels -----------------------------------------------------------------------------

# One tile of BLOCK x BLOCK scores contains a whole event per head when BLOCK >= max_seqlen: with
# 11 to 20 tokens per event, BLOCK = 32 covers the longest event, so a program reads q, k and v
# of its event once and the key loop runs once. Longer events take several query programs, each
# looping over key blocks of BLOCK tokens.
# The largest block and the software-pipelining depth (num_stages) per dot precision are the
# largest with which no kernel spills registers on sm_80 or sm_90 at 4 warps and head dims up to
# 64 (``python -m bench.kernel_compile``). TF32 dots run on tensor cores: 64-token blocks spilled
# in the backward kernels, and Triton's default of 3 stages spilled the 16-token forward on
# sm_90. IEEE fp32 dots run on the FMA units and need more registers per tile: 32-token blocks
# spilled, and 16-token blocks spilled in the dK/dV kernel at 2 or 3 stages.
# NOTE: block sizes, stages and num_warps are not yet tuned for speed on a GPU; bench.kernels
# measures the kernels against the reference at realistic sizes.
_MIN_BLOCK = 16  # the smallest M, N and K that tl.dot accepts
_MAX_BLOCK = {"tf32": 32, "ieee": 16}
_NUM_STAGES = {"tf32": 2, "ieee": 1}
# A masked score is -inf, but the running maximum starts finite: exp(-inf - m) is then 0 and
# exp(m_old - m_new) never computes -inf - (-inf) = NaN.
_NEG_LARGE = tl.constexpr(-1.0e30)
# The widest head the kernels tile: a wider head would need a loop over the head dim.
# NOTE: heads wider than 64 are not compile-checked, and at head dim 128 the bf16 dK/dV kernel
# spills registers on sm_80 and sm_90. The presets use head dims of 16 to 48.
_MAX_HEAD_DIM = 256


@triton.jit
def _load_rows(base_ptr, rows, dims, row_ok, dim_ok, token_stride, dim_stride, ACC_DTYPE):
    """Load a (rows, dims) tile of one head; rows outside the event and padded dims read 0."""
    offsets = rows[:, None] * token_stride + dims[None, :] * dim_stride
    tile = tl.load(base_ptr + offsets, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    return tile.to(ACC_DTYPE)


@triton.jit
def _attention_forward_kernel(
    q_ptr, k_ptr, v_ptr, cu_seqlens_ptr, out_ptr, lse_ptr,
    num_tokens, head_dim,
    q_token_stride, q_head_stride, q_dim_stride,
    k_token_stride, k_head_stride, k_dim_stride,
    v_token_stride, v_head_stride, v_dim_stride,
    out_token_stride, out_head_stride,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Compute one (event, head, query block) with an online softmax over the key blocks.

    The program writes the output rows and the natural log-sum-exp (lse) of each row's scores,
    from which the backward pass recomputes the probabilities without a second softmax.
    """
    event = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    start = tl.load(cu_seqlens_ptr + event).to(tl.int64)
    length = tl.load(cu_seqlens_ptr + event + 1).to(tl.int64) - start
    rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_H)
    row_ok = rows < length
    dim_ok = dims < head_dim
    scale = 1.0 / tl.sqrt(tl.full((), head_dim, ACC_DTYPE))
    q = _load_rows(q_ptr + start * q_token_stride + head * q_head_stride, rows, dims, row_ok,
                   dim_ok, q_token_stride, q_dim_stride, ACC_DTYPE)
    q = q * scale
    row_max = tl.full((BLOCK_M,), _NEG_LARGE, ACC_DTYPE)
    row_sum = tl.zeros((BLOCK_M,), ACC_DTYPE)
    acc = tl.zeros((BLOCK_M, BLOCK_H), ACC_DTYPE)
    for key_start in range(0, length, BLOCK_N):
        cols = key_start + tl.arange(0, BLOCK_N)
        col_ok = cols < length
        k = _load_rows(k_ptr + start * k_token_stride + head * k_head_stride, cols, dims,
                       col_ok, dim_ok, k_token_stride, k_dim_stride, ACC_DTYPE)
        v = _load_rows(v_ptr + start * v_token_stride + head * v_head_stride, cols, dims,
                       col_ok, dim_ok, v_token_stride, v_dim_stride, ACC_DTYPE)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        scores = tl.where(col_ok[None, :], scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        correction = tl.exp(row_max - new_max)
        p = tl.exp(scores - new_max[:, None])
        row_sum = row_sum * correction + tl.sum(p, axis=1)
        acc = acc * correction[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION,
                                                 out_dtype=ACC_DTYPE)
        row_max = new_max
    # Rows past the event end are never stored; the guard keeps them free of 0 / 0.
    row_sum = tl.where(row_sum > 0, row_sum, 1.0)
    out = acc / row_sum[:, None]
    out_offsets = ((start + rows)[:, None] * out_token_stride + head * out_head_stride
                   + dims[None, :])
    tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & dim_ok[None, :])
    lse = row_max + tl.log(row_sum)
    tl.store(lse_ptr + head * num_tokens + start + rows, lse, mask=row_ok)


@triton.jit
def _probabilities_and_score_grads(q_scaled, k, v, grad_out, lse, delta, row_ok, col_ok,
                                   ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Recompute p = softmax(q k^T * scale) from lse and return (p, dS = p * (dP - delta))."""
    scores = tl.dot(q_scaled, tl.trans(k), input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    p = tl.exp(scores - lse[:, None])
    p = tl.where(row_ok[:, None] & col_ok[None, :], p, 0.0)
    grad_p = tl.dot(grad_out, tl.trans(v), input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    return p, p * (grad_p - delta[:, None])


@triton.jit
def _attention_backward_kv_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, grad_out_ptr, lse_ptr, cu_seqlens_ptr,
    grad_q_ptr, grad_k_ptr, grad_v_ptr,
    num_tokens, head_dim,
    q_token_stride, q_head_stride, q_dim_stride,
    k_token_stride, k_head_stride, k_dim_stride,
    v_token_stride, v_head_stride, v_dim_stride,
    grad_out_token_stride, grad_out_head_stride, grad_out_dim_stride,
    out_token_stride, out_head_stride,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
    WRITE_GRAD_Q: tl.constexpr,
):
    """Compute dK and dV of one (event, head, key block), summed over the query blocks.

    With WRITE_GRAD_Q the event fits one key block, so this program reads every key of each
    query row and also writes dQ. Otherwise ``_attention_backward_q_kernel`` computes dQ.
    ``out``, dQ, dK and dV share one contiguous (T, N, H) layout.
    """
    event = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    start = tl.load(cu_seqlens_ptr + event).to(tl.int64)
    length = tl.load(cu_seqlens_ptr + event + 1).to(tl.int64) - start
    cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_H)
    col_ok = cols < length
    dim_ok = dims < head_dim
    scale = 1.0 / tl.sqrt(tl.full((), head_dim, ACC_DTYPE))
    k = _load_rows(k_ptr + start * k_token_stride + head * k_head_stride, cols, dims, col_ok,
                   dim_ok, k_token_stride, k_dim_stride, ACC_DTYPE)
    v = _load_rows(v_ptr + start * v_token_stride + head * v_head_stride, cols, dims, col_ok,
                   dim_ok, v_token_stride, v_dim_stride, ACC_DTYPE)
    out_base = start * out_token_stride + head * out_head_stride
    grad_k = tl.zeros((BLOCK_N, BLOCK_H), ACC_DTYPE)
    grad_v = tl.zeros((BLOCK_N, BLOCK_H), ACC_DTYPE)
    for query_start in range(0, length, BLOCK_M):
        rows = query_start + tl.arange(0, BLOCK_M)
        row_ok = rows < length
        q = _load_rows(q_ptr + start * q_token_stride + head * q_head_stride, rows, dims,
                       row_ok, dim_ok, q_token_stride, q_dim_stride, ACC_DTYPE) * scale
        grad_out = _load_rows(
            grad_out_ptr + start * grad_out_token_stride + head * grad_out_head_stride, rows,
            dims, row_ok, dim_ok, grad_out_token_stride, grad_out_dim_stride, ACC_DTYPE)
        out = _load_rows(out_ptr + out_base, rows, dims, row_ok, dim_ok, out_token_stride, 1,
                         ACC_DTYPE)
        lse = tl.load(lse_ptr + head * num_tokens + start + rows, mask=row_ok, other=0.0)
        # delta_i = sum_j P_ij dP_ij = dO_i . O_i, the softmax backward term of each row.
        delta = tl.sum(grad_out * out, axis=1)
        p, grad_scores = _probabilities_and_score_grads(q, k, v, grad_out, lse, delta, row_ok,
                                                        col_ok, ACC_DTYPE, DOT_PRECISION)
        grad_v += tl.dot(tl.trans(p), grad_out, input_precision=DOT_PRECISION,
                         out_dtype=ACC_DTYPE)
        grad_k += tl.dot(tl.trans(grad_scores), q, input_precision=DOT_PRECISION,
                         out_dtype=ACC_DTYPE)
        if WRITE_GRAD_Q:
            grad_q = tl.dot(grad_scores, k, input_precision=DOT_PRECISION,
                            out_dtype=ACC_DTYPE) * scale
            offsets = out_base + rows[:, None] * out_token_stride + dims[None, :]
            tl.store(grad_q_ptr + offsets, grad_q.to(grad_q_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & dim_ok[None, :])
    offsets = out_base + cols[:, None] * out_token_stride + dims[None, :]
    inside = col_ok[:, None] & dim_ok[None, :]
    tl.store(grad_k_ptr + offsets, grad_k.to(grad_k_ptr.dtype.element_ty), mask=inside)
    tl.store(grad_v_ptr + offsets, grad_v.to(grad_v_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _attention_backward_q_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, grad_out_ptr, lse_ptr, cu_seqlens_ptr, grad_q_ptr,
    num_tokens, head_dim,
    q_token_stride, q_head_stride, q_dim_stride,
    k_token_stride, k_head_stride, k_dim_stride,
    v_token_stride, v_head_stride, v_dim_stride,
    grad_out_token_stride, grad_out_head_stride, grad_out_dim_stride,
    out_token_stride, out_head_stride,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Compute dQ of one (event, head, query block) of an event longer than one block."""
    event = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    start = tl.load(cu_seqlens_ptr + event).to(tl.int64)
    length = tl.load(cu_seqlens_ptr + event + 1).to(tl.int64) - start
    rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_H)
    row_ok = rows < length
    dim_ok = dims < head_dim
    scale = 1.0 / tl.sqrt(tl.full((), head_dim, ACC_DTYPE))
    out_base = start * out_token_stride + head * out_head_stride
    q = _load_rows(q_ptr + start * q_token_stride + head * q_head_stride, rows, dims, row_ok,
                   dim_ok, q_token_stride, q_dim_stride, ACC_DTYPE) * scale
    grad_out = _load_rows(
        grad_out_ptr + start * grad_out_token_stride + head * grad_out_head_stride, rows, dims,
        row_ok, dim_ok, grad_out_token_stride, grad_out_dim_stride, ACC_DTYPE)
    out = _load_rows(out_ptr + out_base, rows, dims, row_ok, dim_ok, out_token_stride, 1,
                     ACC_DTYPE)
    lse = tl.load(lse_ptr + head * num_tokens + start + rows, mask=row_ok, other=0.0)
    delta = tl.sum(grad_out * out, axis=1)
    grad_q = tl.zeros((BLOCK_M, BLOCK_H), ACC_DTYPE)
    for key_start in range(0, length, BLOCK_N):
        cols = key_start + tl.arange(0, BLOCK_N)
        col_ok = cols < length
        k = _load_rows(k_ptr + start * k_token_stride + head * k_head_stride, cols, dims,
                       col_ok, dim_ok, k_token_stride, k_dim_stride, ACC_DTYPE)
        v = _load_rows(v_ptr + start * v_token_stride + head * v_head_stride, cols, dims,
                       col_ok, dim_ok, v_token_stride, v_dim_stride, ACC_DTYPE)
        _, grad_scores = _probabilities_and_score_grads(q, k, v, grad_out, lse, delta, row_ok,
                                                        col_ok, ACC_DTYPE, DOT_PRECISION)
        grad_q += tl.dot(grad_scores, k, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    offsets = out_base + rows[:, None] * out_token_stride + dims[None, :]
    tl.store(grad_q_ptr + offsets, (grad_q * scale).to(grad_q_ptr.dtype.element_ty),
             mask=row_ok[:, None] & dim_ok[None, :])


def _tile_config(q: torch.Tensor, max_seqlen: int) -> dict:
    """Return the constexpr arguments and launch options shared by the three kernels."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    if head_dim > _MAX_HEAD_DIM:
        raise ValueError(
            f"head dim {head_dim} is above the {_MAX_HEAD_DIM} that the attention kernel "
            f"tiles; use BUMBLEBEE_KERNELS=torch or more heads of a smaller head dim"
        )
    # fp32 and fp64 products stay IEEE: TF32 keeps 10 mantissa bits. fp16 and bf16 values are
    # exact in TF32, so their dots lose nothing on the operands and round only p and dS.
    precise = q.dtype in (torch.float32, torch.float64)
    precision = "ieee" if precise else "tf32"
    block = min(max(_MIN_BLOCK, triton.next_power_of_2(max(max_seqlen, 1))),
                _MAX_BLOCK[precision])
    return {
        "ACC_DTYPE": tl.float64 if q.dtype == torch.float64 else tl.float32,
        "DOT_PRECISION": precision,
        "BLOCK_M": block, "BLOCK_N": block,
        "BLOCK_H": max(_MIN_BLOCK, triton.next_power_of_2(head_dim)),
        "num_stages": _NUM_STAGES[precision],
    }


def _strides(tensor: torch.Tensor) -> tuple[int, int, int]:
    return tensor.stride(0), tensor.stride(1), tensor.stride(2)


def _launch_forward(q, k, v, cu_seqlens, max_seqlen):
    """Return the (T, N, H) output in q's dtype and the (N, T) lse in the accumulation dtype."""
    total_tokens, num_heads, head_dim = q.shape
    num_events = cu_seqlens.numel() - 1
    config = _tile_config(q, max_seqlen)
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(num_heads, total_tokens, dtype=lse_dtype, device=q.device)
    num_query_blocks = triton.cdiv(max_seqlen, config["BLOCK_M"])
    if total_tokens == 0 or num_query_blocks == 0:
        return out, lse
    _attention_forward_kernel[(num_events, num_heads, num_query_blocks)](
        q, k, v, cu_seqlens, out, lse, total_tokens, head_dim,
        *_strides(q), *_strides(k), *_strides(v), out.stride(0), out.stride(1),
        **config,
    )
    return out, lse


def _launch_backward(grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen):
    """Return (dq, dk, dv), each (T, N, H) contiguous in q's dtype."""
    total_tokens, num_heads, head_dim = q.shape
    num_events = cu_seqlens.numel() - 1
    config = _tile_config(q, max_seqlen)
    grad_q, grad_k, grad_v = (torch.empty(q.shape, dtype=q.dtype, device=q.device)
                              for _ in range(3))
    num_blocks = triton.cdiv(max_seqlen, config["BLOCK_N"])
    if total_tokens == 0 or num_blocks == 0:
        return grad_q, grad_k, grad_v
    arguments = (
        total_tokens, head_dim, *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out),
        out.stride(0), out.stride(1),
    )
    grid = (num_events, num_heads, num_blocks)
    _attention_backward_kv_kernel[grid](
        q, k, v, out, grad_out, lse, cu_seqlens, grad_q, grad_k, grad_v, *arguments,
        WRITE_GRAD_Q=num_blocks == 1, **config,
    )
    if num_blocks > 1:
        _attention_backward_q_kernel[grid](
            q, k, v, out, grad_out, lse, cu_seqlens, grad_q, *arguments, **config,
        )
    return grad_q, grad_k, grad_v


class _UnpaddedAttentionFunction(torch.autograd.Function):
    """Fused unpadded attention; the backward recomputes probabilities from the saved lse."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen):
        out, lse = _launch_forward(q, k, v, cu_seqlens, max_seqlen)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
        ctx.max_seqlen = max_seqlen
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
        grad_q, grad_k, grad_v = _launch_backward(grad_out, q, k, v, out, lse, cu_seqlens,
                                                  ctx.max_seqlen)
        return grad_q, grad_k, grad_v, None, None


def unpadded_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
) -> torch.Tensor:
    """Attend within each packed event with the fused kernels; same contract as the reference.

    q, k and v are (T, N, H) of one float dtype, with any strides: the kernels read them, and
    the upstream gradient, through their strides without a copy. The output has q's dtype.
    Scores, softmax and sums are in fp32, or in fp64 for fp64 inputs.

    cu_seqlens must contain values checked by ``validate_cu_seqlens``, which
    ``kernels.dispatch.unpadded_attention`` runs unless its ``validate`` argument is False.
    This function checks only what needs no host sync: the dtype, shape and device of
    cu_seqlens.
    """
    if q.ndim != 3 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"q, k and v must share one shape (T, N, H), got {tuple(q.shape)}, "
            f"{tuple(k.shape)} and {tuple(v.shape)}"
        )
    if k.dtype != q.dtype or v.dtype != q.dtype or not q.dtype.is_floating_point:
        raise ValueError(f"q, k and v must share one float dtype, got {q.dtype}, {k.dtype} "
                         f"and {v.dtype}")
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.ndim != 1 or cu_seqlens.numel() == 0:
        raise ValueError(
            f"cu_seqlens must be a 1-D int32 tensor of E + 1 >= 1 offsets, got shape "
            f"{tuple(cu_seqlens.shape)} and {cu_seqlens.dtype}; convert it with "
            f"validate_cu_seqlens"
        )
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q is on {q.device}")
    return _UnpaddedAttentionFunction.apply(q, k, v, cu_seqlens, int(max_seqlen))
