"""Pre-training mask draw, a pure function of (run seed, epoch, event id).

Shapes: E events, T tokens in all. For every event one 64-bit hash of (seed, epoch, event id)
is computed with splitmix64 mixing, and two further draws are derived from it:

- the mode, from the top two bits of the first draw: 0 or 1 -> ``MODE_ONE`` (probability 0.5,
  one particle chosen uniformly among the event's tokens), 2 -> ``MODE_RECO`` (0.25, every reco
  token), 3 -> ``MODE_GEN`` (0.25, every gen token);
- the particle of ``MODE_ONE``, as floor(u * n) with u the top 53 bits of the second draw scaled
  to [0, 1) and n the event's token count. Its bias is below n / 2**53.

Because nothing depends on the position of an event in its batch, the same event gets the same
mask however the events are split into batches, ranks or workers, and a run replays exactly.

Edge cases: an event with no tokens masks nothing, and so does a ``MODE_RECO`` event without reco
tokens or a ``MODE_GEN`` event without gen tokens. The loss normalizer counts masked tokens, so
such events add nothing to it.
"""

from __future__ import annotations

import numpy as np

from bumblebee_dist.tokens import LEVEL_GEN, LEVEL_RECO

MODE_ONE = 0
MODE_RECO = 1
MODE_GEN = 2
MODE_NAMES = ("one", "reco", "gen")

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)
_U64_MASK = (1 << 64) - 1


def splitmix64(x: np.ndarray) -> np.ndarray:
    """Apply the splitmix64 finalizer to a uint64 array (wrapping arithmetic)."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX_1
        z = (z ^ (z >> np.uint64(27))) * _MIX_2
    return z ^ (z >> np.uint64(31))


def _to_u64(value: int) -> np.ndarray:
    # Two's complement for negative ints, so every Python int in the int64 range is a valid key.
    return np.array([int(value) & _U64_MASK], dtype=np.uint64)


def event_hashes(event_id: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """Return one uint64 hash per event, (E,), of (seed, epoch, event id)."""
    event_id = np.asarray(event_id)
    if event_id.ndim != 1 or not np.issubdtype(event_id.dtype, np.integer):
        raise ValueError(
            f"event_id must be a 1-D integer array, got shape {event_id.shape} and {event_id.dtype}"
        )
    run_key = splitmix64(splitmix64(_to_u64(seed)) ^ _to_u64(epoch))
    return splitmix64(run_key ^ event_id.astype(np.int64).view(np.uint64))


def draw_modes(event_id: np.ndarray, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw per-event masking modes and uniforms.

    Returns ``(mode, u)``: mode (E,) int8 holding ``MODE_ONE``, ``MODE_RECO`` or ``MODE_GEN``,
    and u (E,) float64 in [0, 1), which picks the particle of ``MODE_ONE`` events.
    """
    base = event_hashes(event_id, seed, epoch)
    with np.errstate(over="ignore"):
        mode_bits = splitmix64(base + _GOLDEN) >> np.uint64(62)
        choice_bits = splitmix64(base + _GOLDEN * np.uint64(2)) >> np.uint64(11)
    mode = np.where(mode_bits < 2, MODE_ONE, mode_bits - 1).astype(np.int8)
    u = choice_bits.astype(np.float64) * 2.0**-53
    return mode, u


def draw_mask_with_modes(
    event_id: np.ndarray, offsets: np.ndarray, level: np.ndarray, seed: int, epoch: int
) -> tuple[np.ndarray, np.ndarray]:
    """Draw the pre-training mask and return ``(mask (T,) bool, mode (E,) int8)``.

    ``offsets`` (E + 1,) are the token offsets of the events, starting at 0 and ending at T;
    ``level`` (T,) is 1 for reco and 0 for gen tokens.
    """
    offsets, level = _check_layout(event_id, offsets, level)
    mode, u = draw_modes(event_id, seed, epoch)
    lengths = np.diff(offsets)
    choice = np.minimum(np.floor(u * lengths).astype(np.int64), np.maximum(lengths - 1, 0))

    token_event = np.repeat(np.arange(lengths.size), lengths)
    position = np.arange(level.size, dtype=np.int64) - offsets[:-1][token_event]
    token_mode = mode[token_event]
    mask = (token_mode == MODE_ONE) & (position == choice[token_event])
    mask |= (token_mode == MODE_RECO) & (level == LEVEL_RECO)
    mask |= (token_mode == MODE_GEN) & (level == LEVEL_GEN)
    return mask, mode


def draw_mask(
    event_id: np.ndarray, offsets: np.ndarray, level: np.ndarray, seed: int, epoch: int
) -> np.ndarray:
    """Draw the pre-training mask, (T,) bool, True where a token is hidden.

    See ``draw_mask_with_modes`` for the arguments and the module docstring for the draw.
    """
    return draw_mask_with_modes(event_id, offsets, level, seed, epoch)[0]


def _check_layout(
    event_id: np.ndarray, offsets: np.ndarray, level: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    if np.ndim(event_id) != 1:
        raise ValueError(f"event_id must be 1-D (E,), got shape {np.shape(event_id)}")
    num_events = np.shape(event_id)[0]
    offsets = np.asarray(offsets, dtype=np.int64)
    level = np.asarray(level)
    if level.ndim != 1:
        raise ValueError(f"level must be 1-D (T,), got shape {level.shape}")
    if offsets.shape != (num_events + 1,):
        raise ValueError(
            f"offsets must have shape (E + 1,) = ({num_events + 1},) for {num_events} event ids, "
            f"got {offsets.shape}"
        )
    if offsets[0] != 0 or offsets[-1] != level.size:
        raise ValueError(
            f"offsets must start at 0 and end at the token count {level.size}, "
            f"got {int(offsets[0])} and {int(offsets[-1])}"
        )
    if np.any(np.diff(offsets) < 0):
        first = int(np.argmax(np.diff(offsets) < 0))
        raise ValueError(f"offsets must not decrease; they decrease after event index {first}")
    return offsets, level
