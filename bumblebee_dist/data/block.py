"""Columnar event blocks: the unit stored in a shard and read by the loader.

A block holds many events (thousands) as flat arrays, so that a shard spends its bytes and its
Python work on data rather than on one tar member per event. Shapes: E events, T tokens in all,
F = 5 particle features.

| column        | shape  | dtype   | meaning                                                    |
|---------------|--------|---------|------------------------------------------------------------|
| event_id      | (E,)   | int64   | unique in the data set, seeds the masking draw             |
| offsets       | (E+1,) | int64   | token offsets of each event, starting at 0, ending at T    |
| process_code  | (E,)   | int32   | Pythia process code (601 gg -> ttbar, 602 qqbar -> ttbar)  |
| sample        | (E,)   | int8    | index of the sample in the manifest's sample list          |
| m_ttbar_true  | (E,)   | float32 | invariant mass of the hard-process top pair, GeV           |
| pdg_id        | (T,)   | int32   | signed PDG id of each token (see ``bumblebee_dist.tokens``)|
| level         | (T,)   | int8    | 1 reco, 0 gen                                              |
| features      | (T, F) | float32 | pT [GeV], eta, phi [rad, in [-pi, pi)], m [GeV], b-tag     |

In a shard each column is one ``.npy`` tar member named ``<key>.<column>.npy``. Members are read
with ``allow_pickle=False``: an object array is rejected, never unpickled.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, fields

import numpy as np

from bumblebee_dist.tokens import NUM_FEATURES, PDG_VOCABULARY

COLUMN_DTYPES = {
    "event_id": np.int64,
    "offsets": np.int64,
    "process_code": np.int32,
    "sample": np.int8,
    "m_ttbar_true": np.float32,
    "pdg_id": np.int32,
    "level": np.int8,
    "features": np.float32,
}
EVENT_COLUMNS = ("event_id", "process_code", "sample", "m_ttbar_true")
TOKEN_COLUMNS = ("pdg_id", "level", "features")


class BlockFormatError(ValueError):
    """A block or one of its members breaks the format; the message names source and column."""


@dataclass
class EventBlock:
    """Many events as flat columns; see the module docstring for every column."""

    event_id: np.ndarray
    offsets: np.ndarray
    process_code: np.ndarray
    sample: np.ndarray
    m_ttbar_true: np.ndarray
    pdg_id: np.ndarray
    level: np.ndarray
    features: np.ndarray

    @property
    def num_events(self) -> int:
        """Number of events E."""
        return int(self.event_id.shape[0])

    @property
    def num_tokens(self) -> int:
        """Number of tokens T over all events."""
        return int(self.pdg_id.shape[0])

    def lengths(self) -> np.ndarray:
        """Tokens per event, (E,) int64."""
        return np.diff(self.offsets)

    def validate(self, source: str = "block") -> None:
        """Raise BlockFormatError naming ``source`` and the column unless the block is well formed.

        Checks dtypes, shapes, monotone offsets, the token vocabulary, levels, phi range and that no
        feature is NaN or infinite, so no shard ever stores a non-finite value.
        """
        for name, dtype in COLUMN_DTYPES.items():
            column = getattr(self, name)
            if not isinstance(column, np.ndarray) or column.dtype != np.dtype(dtype):
                got = getattr(column, "dtype", type(column).__name__)
                raise BlockFormatError(f"{source}: column {name!r} must be {np.dtype(dtype)}, got {got}")
        num_events, num_tokens = self.num_events, self.num_tokens
        for name in EVENT_COLUMNS:
            if getattr(self, name).shape != (num_events,):
                raise BlockFormatError(
                    f"{source}: column {name!r} has shape {getattr(self, name).shape}, "
                    f"expected ({num_events},)"
                )
        for name in ("pdg_id", "level"):
            if getattr(self, name).shape != (num_tokens,):
                raise BlockFormatError(
                    f"{source}: column {name!r} has shape {getattr(self, name).shape}, "
                    f"expected ({num_tokens},)"
                )
        if self.features.shape != (num_tokens, NUM_FEATURES):
            raise BlockFormatError(
                f"{source}: column 'features' has shape {self.features.shape}, "
                f"expected ({num_tokens}, {NUM_FEATURES})"
            )
        self._validate_offsets(source)
        self._validate_values(source)

    def _validate_offsets(self, source: str) -> None:
        offsets = self.offsets
        if offsets.shape != (self.num_events + 1,):
            raise BlockFormatError(
                f"{source}: column 'offsets' has shape {offsets.shape}, expected ({self.num_events + 1},)"
            )
        if offsets[0] != 0 or offsets[-1] != self.num_tokens:
            raise BlockFormatError(
                f"{source}: offsets must start at 0 and end at the token count {self.num_tokens}, "
                f"got {int(offsets[0])} and {int(offsets[-1])}"
            )
        if np.any(np.diff(offsets) < 0):
            first = int(np.argmax(np.diff(offsets) < 0))
            raise BlockFormatError(f"{source}: offsets decrease after event index {first}")

    def _validate_values(self, source: str) -> None:
        bad = ~np.isfinite(self.features)
        if bad.any():
            token, feature = (int(i) for i in np.argwhere(bad)[0])
            event = int(np.searchsorted(self.offsets, token, side="right") - 1)
            raise BlockFormatError(
                f"{source}: {int(bad.sum())} non-finite feature values; first in event "
                f"{int(self.event_id[event])}, token {token}, feature {feature}"
            )
        unknown = ~np.isin(self.pdg_id, PDG_VOCABULARY)
        if unknown.any():
            raise BlockFormatError(
                f"{source}: PDG id {int(self.pdg_id[unknown][0])} is not in the vocabulary {PDG_VOCABULARY}"
            )
        if not np.isin(self.level, (0, 1)).all():
            raise BlockFormatError(f"{source}: column 'level' must hold 0 (gen) or 1 (reco) only")
        phi = self.features[:, 2]
        if phi.size and (phi.min() < -np.pi or phi.max() >= np.pi):
            raise BlockFormatError(
                f"{source}: phi must lie in [-pi, pi), got range [{phi.min()}, {phi.max()}]"
            )
        if np.unique(self.event_id).size != self.num_events:
            raise BlockFormatError(f"{source}: column 'event_id' repeats an id")

    def to_members(self) -> dict[str, bytes]:
        """Serialize every column as ``.npy`` bytes, keyed by ``<column>.npy``."""
        members = {}
        for name in COLUMN_DTYPES:
            buffer = io.BytesIO()
            np.save(buffer, np.ascontiguousarray(getattr(self, name)), allow_pickle=False)
            members[f"{name}.npy"] = buffer.getvalue()
        return members

    @classmethod
    def from_members(cls, members: dict[str, bytes], source: str) -> "EventBlock":
        """Decode ``.npy`` members written by ``to_members``; ``source`` names the shard and key.

        A missing column, an unexpected member or an object array is a BlockFormatError.
        """
        expected = {f"{name}.npy" for name in COLUMN_DTYPES}
        extra = sorted(set(members) - expected)
        if extra:
            raise BlockFormatError(
                f"{source}: unexpected member {extra[0]!r}; a block holds only {sorted(expected)}"
            )
        columns = {}
        for name in COLUMN_DTYPES:
            member = f"{name}.npy"
            if member not in members:
                raise BlockFormatError(f"{source}: member {member!r} is missing")
            try:
                columns[name] = np.load(io.BytesIO(members[member]), allow_pickle=False)
            except ValueError as error:
                raise BlockFormatError(f"{source}: member {member!r} cannot be read: {error}") from error
        block = cls(**columns)
        block.validate(source)
        return block

    def take_events(self, index: np.ndarray) -> "EventBlock":
        """Return a new block with the events at ``index`` (in that order)."""
        index = np.asarray(index, dtype=np.int64)
        lengths = self.lengths()[index]
        starts = self.offsets[:-1][index]
        token_index = _ranges(starts, lengths)
        offsets = np.zeros(index.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return EventBlock(
            event_id=self.event_id[index],
            offsets=offsets,
            process_code=self.process_code[index],
            sample=self.sample[index],
            m_ttbar_true=self.m_ttbar_true[index],
            pdg_id=self.pdg_id[token_index],
            level=self.level[token_index],
            features=self.features[token_index],
        )


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenate ``arange(start, start + length)`` for every pair, without a Python loop."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    ends = np.cumsum(lengths)
    shift = np.repeat(starts - (ends - lengths), lengths)
    return np.arange(total, dtype=np.int64) + shift


def concat_blocks(blocks: list[EventBlock]) -> EventBlock:
    """Concatenate blocks event-wise; offsets are rebased."""
    if not blocks:
        raise ValueError("concat_blocks needs at least one block")
    lengths = np.concatenate([b.lengths() for b in blocks])
    offsets = np.zeros(lengths.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    columns = {f.name: np.concatenate([getattr(b, f.name) for b in blocks]) for f in fields(EventBlock)
               if f.name != "offsets"}
    return EventBlock(offsets=offsets, **columns)
