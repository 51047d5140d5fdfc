"""Packed, unpadded batches: the events of a batch concatenated into one token stream.

Shapes: E events, T packed tokens, F = 5 particle features. A batch contains no padding: event i
owns tokens ``cu_seqlens[i]:cu_seqlens[i + 1]``, the layout that unpadded attention kernels take.
Batches are cut greedily to a token budget in the order the events come, and an event is never
split across two batches.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Iterator

import numpy as np
import torch

from bumblebee_dist.data.block import EventBlock
from bumblebee_dist.tokens import NUM_FEATURES, pdg_to_index


@dataclass
class PackedBatch:
    """One packed batch; every field is a torch tensor except ``max_seqlen``.

    | field        | shape  | dtype   | meaning                                        |
    |--------------|--------|---------|------------------------------------------------|
    | features     | (T, F) | float32 | model-space features, the regression target    |
    | pdg_index    | (T,)   | int64   | row in the PDG embedding                       |
    | level        | (T,)   | int64   | 1 reco, 0 gen                                  |
    | mask         | (T,)   | bool    | True where the token is hidden                 |
    | cu_seqlens   | (E+1,) | int32   | token offsets, starting at 0, ending at T      |
    | max_seqlen   | int    |         | longest event in the batch, 0 when E = 0       |
    | event_id     | (E,)   | int64   | unique id of each event                        |
    | process_code | (E,)   | int32   | Pythia process code                            |
    | sample       | (E,)   | int8    | index of the sample in the manifest            |
    | m_ttbar_true | (E,)   | float32 | true m(ttbar) in GeV                           |

    A batch with E = 0 and T = 0 is valid: ranks that have no events left in an evaluation
    pass receive one so that every rank takes the same number of steps.
    """

    features: torch.Tensor
    pdg_index: torch.Tensor
    level: torch.Tensor
    mask: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    event_id: torch.Tensor
    process_code: torch.Tensor
    sample: torch.Tensor
    m_ttbar_true: torch.Tensor

    @property
    def num_events(self) -> int:
        """Number of events E."""
        return int(self.event_id.shape[0])

    @property
    def num_tokens(self) -> int:
        """Number of packed tokens T."""
        return int(self.features.shape[0])

    def _map_tensors(self, function) -> "PackedBatch":
        values = {}
        for item in fields(self):
            value = getattr(self, item.name)
            values[item.name] = function(value) if isinstance(value, torch.Tensor) else value
        return PackedBatch(**values)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "PackedBatch":
        """Return a copy with every tensor on ``device``."""
        return self._map_tensors(lambda tensor: tensor.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "PackedBatch":
        """Return a copy in pinned host memory; torch's DataLoader calls this with pin_memory."""
        return self._map_tensors(lambda tensor: tensor.pin_memory())

    @classmethod
    def empty(cls) -> "PackedBatch":
        """Return a batch with no events and no tokens."""
        return pack_events(_empty_block(), np.zeros(0, dtype=bool))


def _empty_block() -> EventBlock:
    return EventBlock(
        event_id=np.zeros(0, np.int64), offsets=np.zeros(1, np.int64),
        process_code=np.zeros(0, np.int32), sample=np.zeros(0, np.int8),
        m_ttbar_true=np.zeros(0, np.float32), pdg_id=np.zeros(0, np.int32),
        level=np.zeros(0, np.int8), features=np.zeros((0, NUM_FEATURES), np.float32),
    )


def pack_events(block: EventBlock, mask: np.ndarray,
                pdg_index: np.ndarray | None = None) -> PackedBatch:
    """Build a PackedBatch from the events of ``block``, in block order.

    ``block.features`` must already be in model space. ``mask`` is (T,) bool. ``pdg_index``
    (T,) may be passed when precomputed; otherwise it is looked up from ``block.pdg_id``.
    Tensors share memory with the block's arrays where the dtype already matches (features,
    mask, per-event columns). Raises ValueError when the mask does not match the token count.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != (block.num_tokens,):
        raise ValueError(f"mask has shape {mask.shape}, expected ({block.num_tokens},)")
    if pdg_index is None:
        pdg_index = pdg_to_index(block.pdg_id)
    lengths = block.lengths()
    # Offsets are int64 in blocks, but a batch has far fewer than 2**31 tokens, so int32 is exact.
    cu_seqlens = block.offsets.astype(np.int32)
    return PackedBatch(
        features=torch.from_numpy(np.ascontiguousarray(block.features, dtype=np.float32)),
        pdg_index=torch.from_numpy(np.asarray(pdg_index, dtype=np.int64)),
        level=torch.from_numpy(block.level.astype(np.int64)),
        mask=torch.from_numpy(mask),
        cu_seqlens=torch.from_numpy(cu_seqlens),
        max_seqlen=int(lengths.max()) if lengths.size else 0,
        event_id=torch.from_numpy(np.ascontiguousarray(block.event_id)),
        process_code=torch.from_numpy(np.ascontiguousarray(block.process_code)),
        sample=torch.from_numpy(np.ascontiguousarray(block.sample)),
        m_ttbar_true=torch.from_numpy(np.ascontiguousarray(block.m_ttbar_true)),
    )


def token_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenate ``arange(start, start + length)`` over all pairs, without a Python loop."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    ends = np.cumsum(lengths)
    return np.arange(total, dtype=np.int64) + np.repeat(starts - (ends - lengths), lengths)


def gather_events(block: EventBlock, rows: np.ndarray) -> EventBlock:
    """Return a new block with the events at ``rows`` of ``block``, in that order.

    Costs O(events and tokens gathered), independent of the size of ``block``, so it serves to
    cut batches out of a whole split.
    """
    rows = np.asarray(rows, dtype=np.int64)
    starts = block.offsets[rows]
    lengths = block.offsets[rows + 1] - starts
    tokens = token_ranges(starts, lengths)
    offsets = np.zeros(rows.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return EventBlock(
        event_id=block.event_id[rows], offsets=offsets, process_code=block.process_code[rows],
        sample=block.sample[rows], m_ttbar_true=block.m_ttbar_true[rows],
        pdg_id=block.pdg_id[tokens], level=block.level[tokens], features=block.features[tokens],
    )


class EventTooLongError(ValueError):
    """An event has more tokens than the batch token budget."""


def plan_batches(lengths: np.ndarray, max_tokens: int,
                 event_id: np.ndarray | None = None) -> np.ndarray:
    """Cut events, in the given order, greedily into batches of at most ``max_tokens`` tokens.

    ``lengths`` (E,) are token counts in loader order. Returns (B + 1,) int64 boundaries: batch b
    contains events ``bounds[b]:bounds[b + 1]`` of that order. A batch is closed when the next event
    would pass the budget, so no batch is empty and no event is split. An event longer than
    ``max_tokens`` raises EventTooLongError naming it (by ``event_id`` when given).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens} is invalid: must be >= 1")
    too_long = lengths > max_tokens
    if too_long.any():
        index = int(np.argmax(too_long))
        name = f"event id {int(event_id[index])}" if event_id is not None else f"event {index}"
        raise EventTooLongError(
            f"{name} has {int(lengths[index])} tokens, more than max_tokens={max_tokens} "
            f"({int(too_long.sum())} events do); raise data.max_tokens or lower data.max_jets"
        )
    cumulative = np.zeros(lengths.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=cumulative[1:])
    bounds = [0]
    # One searchsorted per batch, not per event, because a batch contains hundreds of events.
    while bounds[-1] < lengths.size:
        start = bounds[-1]
        end = int(np.searchsorted(cumulative, cumulative[start] + max_tokens, side="right")) - 1
        bounds.append(max(end, start + 1))
    return np.asarray(bounds, dtype=np.int64)


def iter_packed(block: EventBlock, max_tokens: int, mask: np.ndarray | None = None
                ) -> Iterator[PackedBatch]:
    """Pack the events of a model-space ``block``, in block order, into token-budget batches.

    ``mask`` (T,) bool defaults to nothing masked. Each batch is a view of consecutive events,
    so no gather is needed.
    """
    if mask is None:
        mask = np.zeros(block.num_tokens, dtype=bool)
    pdg_index = pdg_to_index(block.pdg_id)
    bounds = plan_batches(block.lengths(), max_tokens, block.event_id)
    for start, end in zip(bounds[:-1], bounds[1:]):
        first, last = block.offsets[start], block.offsets[end]
        part = EventBlock(
            event_id=block.event_id[start:end], offsets=block.offsets[start:end + 1] - first,
            process_code=block.process_code[start:end], sample=block.sample[start:end],
            m_ttbar_true=block.m_ttbar_true[start:end], pdg_id=block.pdg_id[first:last],
            level=block.level[first:last], features=block.features[first:last],
        )
        yield pack_events(part, mask[first:last], pdg_index[first:last])
