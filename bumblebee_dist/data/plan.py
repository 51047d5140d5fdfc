"""The batches of one epoch and which rank and worker takes each: pure functions of the inputs.

An epoch's plan is built in three steps:

1. order: the split's events sorted by a 64-bit hash of (seed, epoch, event id). The order
   depends on the event ids, not on where they are stored, so it is the same whichever order
   shards were read in, and it changes with every epoch;
2. batches: that order cut greedily into batches of at most ``max_tokens`` tokens
   (``packing.plan_batches``);
3. dealing: global batch b goes to rank ``b % world_size`` as its local batch
   ``b // world_size``, so at every step the ranks work on adjacent batches of the order.

Every rank takes the same number of batches. With ``drop_last`` the last ``B % world_size``
batches are dropped, so those events are not seen in that epoch; another epoch's order drops
other events. Without ``drop_last`` (evaluation), every event is taken exactly once and ranks
that run out are given empty batches (no events, no tokens) up to the same count.

Within a rank, worker w of K takes local batches w, w + K, ...; torch's DataLoader reads its
workers round-robin, which restores the local order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bumblebee_dist.data.packing import plan_batches
from bumblebee_dist.masking import event_hashes, splitmix64

# Separates the order hash from the masking hash of the same (seed, epoch, event id).
_ORDER_SALT = np.uint64(0x6F72646572000001)

EMPTY_BATCH = -1


@dataclass(frozen=True)
class EpochPlan:
    """Batches of one epoch: ``order`` (E,) rows, ``bounds`` (B + 1,) cuts into ``order``."""

    epoch: int
    order: np.ndarray
    bounds: np.ndarray
    world_size: int
    drop_last: bool

    @property
    def num_batches(self) -> int:
        """Batches B over all ranks, before dropping or padding."""
        return int(self.bounds.size - 1)

    @property
    def batches_per_rank(self) -> int:
        """Batches every rank takes in this epoch."""
        if self.drop_last:
            return self.num_batches // self.world_size
        return -(-self.num_batches // self.world_size)

    @property
    def dropped_batches(self) -> int:
        """Batches no rank takes (``drop_last`` only)."""
        return self.num_batches - self.batches_per_rank * self.world_size if self.drop_last else 0

    @property
    def dropped_events(self) -> int:
        """Events of the dropped batches, not seen in this epoch."""
        kept_batches = self.num_batches - self.dropped_batches
        return int(self.order.size - self.bounds[kept_batches])

    @property
    def padding_batches(self) -> int:
        """Empty batches given to ranks that run out (without ``drop_last``)."""
        if self.drop_last:
            return 0
        return self.batches_per_rank * self.world_size - self.num_batches

    def rank_batches(self, rank: int) -> np.ndarray:
        """Global batch indices of ``rank`` in local order; ``EMPTY_BATCH`` marks padding."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank={rank} is invalid: must lie in [0, {self.world_size})")
        indices = rank + self.world_size * np.arange(self.batches_per_rank, dtype=np.int64)
        indices[indices >= self.num_batches] = EMPTY_BATCH
        return indices

    def batch_rows(self, batch: int) -> np.ndarray:
        """Rows of the events of global batch ``batch``, in batch order."""
        return self.order[self.bounds[batch]:self.bounds[batch + 1]]


def epoch_order(event_id: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """Return the rows of ``event_id`` in the epoch's order, (E,) int64."""
    keys = splitmix64(event_hashes(event_id, seed, epoch) ^ _ORDER_SALT)
    # Keys are distinct for distinct ids (both mixing steps are bijections on uint64), so the
    # sort has no ties; stable sort keeps it reproducible anyway.
    return np.argsort(keys, kind="stable").astype(np.int64)


def plan_epoch(event_id: np.ndarray, lengths: np.ndarray, *, seed: int, epoch: int,
               max_tokens: int, world_size: int, drop_last: bool) -> EpochPlan:
    """Build the plan of one epoch from the split's event ids and token counts, both (E,)."""
    if world_size < 1:
        raise ValueError(f"world_size={world_size} is invalid: must be >= 1")
    order = epoch_order(event_id, seed, epoch)
    bounds = plan_batches(lengths[order], max_tokens, event_id[order])
    return EpochPlan(epoch=epoch, order=order, bounds=bounds, world_size=world_size,
                     drop_last=drop_last)


def worker_share(local_batches: np.ndarray, worker: int, num_workers: int) -> np.ndarray:
    """Local batches that worker ``worker`` of ``num_workers`` produces, in its order."""
    return local_batches[worker::num_workers]
