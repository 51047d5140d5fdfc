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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
