"""The training and evaluation loader: packed batches of one split, for one rank.

Guarantees, per epoch and for a fixed (data set, seed, max_tokens, max_jets, world_size):

- every event is taken exactly once across ranks and workers, except the events of at most
  ``world_size - 1`` batches that ``drop_last`` drops (logged on rank 0 with their count);
- every rank takes the same number of batches, ``len(loader)``; without ``drop_last`` the ranks
  that run out get empty batches (E = 0, T = 0) so that no rank waits in a collective alone;
- the order is a pure function of (seed, epoch), see ``bumblebee_dist.data.plan``, so
  ``state_dict()`` (epoch and batches taken) resumes with exactly the batches not yet seen;
- ``num_workers`` changes neither the batches nor their order.

The whole split is loaded into memory on each rank at construction (``store.load_split``): the
memory limit is stated there. Batches are then cut with array gathers, with no per-event Python
work.
"""

from __future__ import annotations

import logging
import multiprocessing
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from bumblebee_dist import masking
from bumblebee_dist.config import DataConfig
from bumblebee_dist.data.block import EventBlock
from bumblebee_dist.data.packing import PackedBatch, gather_events, pack_events
from bumblebee_dist.data.plan import EMPTY_BATCH, EpochPlan, plan_epoch, worker_share
from bumblebee_dist.data.store import EventStore, load_split
from bumblebee_dist.features import FeatureStats
from bumblebee_dist.tokens import LEVEL_GEN

logger = logging.getLogger(__name__)

MASK_MODES = ("pretrain", "gen", "none")
STATE_VERSION = 1
# Settings that must match for a saved position to name the same batches.
_STATE_KEYS = ("split", "seed", "world_size", "max_tokens", "max_jets", "drop_last",
               "num_events")


class EventLoader:
    """Packed batches of one split for one rank; iterate once per epoch.

    Args:
        data_path: data set folder holding ``manifest.json`` (or the manifest file).
        split: "train", "val" or "test".
        rank, world_size: this rank and the number of ranks sharing the split.
        seed: run seed; the order and the pre-training masks depend on (seed, epoch).
        max_tokens: token budget of one batch; an event longer than it is an error.
        max_jets: reco jets kept per event, highest pT first.
        mask_mode: "pretrain" (draw per event, ``masking.draw_mask``), "gen" (every gen token
            masked) or "none".
        drop_last: True for training (equal batch counts by dropping at most
            ``world_size - 1`` batches); False for evaluation (every event, padded with empty
            batches).
        skip_corrupt_shards: skip, log and count corrupt shards instead of raising.
        num_workers: worker processes per rank (torch DataLoader, fork start method where the
            platform has it, so workers share the loaded split instead of copying it).

    Iterating yields ``PackedBatch`` objects; finishing an iteration advances to the next epoch.
    ``set_epoch`` selects an epoch explicitly and keeps the position when the epoch is unchanged,
    so calling it after ``load_state_dict`` does not lose a resumed position.
    """

    def __init__(self, data_path: str | Path, split: str, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, max_tokens: int = 4096, max_jets: int = 8,
                 mask_mode: str = "pretrain", drop_last: bool = True,
                 skip_corrupt_shards: bool = False, num_workers: int = 0,
                 feature_stats: FeatureStats | None = None):
        _check_arguments(rank, world_size, max_tokens, max_jets, mask_mode, num_workers)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.max_tokens, self.max_jets = max_tokens, max_jets
        self.mask_mode, self.drop_last, self.num_workers = mask_mode, drop_last, num_workers
        self.store: EventStore = load_split(data_path, split, max_jets=max_jets,
                                            skip_corrupt_shards=skip_corrupt_shards,
                                            feature_stats=feature_stats)
        self._lengths = self.store.events.lengths()
        self.epoch, self.position = 0, 0
        self._plan: EpochPlan | None = None
        self._log_load()
        # Cutting epoch 0 now raises at construction if an event is longer than max_tokens.
        self._current_plan()

    @classmethod
    def from_config(cls, config: DataConfig, split: str, **kwargs: Any) -> "EventLoader":
        """Build a loader from a DataConfig; ``kwargs`` set rank, world_size, seed and the rest."""
        return cls(config.path, split, max_tokens=config.max_tokens, max_jets=config.max_jets,
                   num_workers=config.num_workers,
                   skip_corrupt_shards=config.skip_corrupt_shards, **kwargs)

    @property
    def split(self) -> str:
        """Split this loader reads."""
        return self.store.split

    @property
    def num_events(self) -> int:
        """Events of the split held by the loader (after skipped shards)."""
        return self.store.num_events

    @property
    def skipped_shards(self) -> list[str]:
        """Paths of shards skipped as corrupt."""
        return list(self.store.skipped_shards)

    @property
    def num_skipped_shards(self) -> int:
        """Number of shards skipped as corrupt."""
        return len(self.store.skipped_shards)

    def epoch_plan(self, epoch: int | None = None) -> EpochPlan:
        """Return the plan of ``epoch`` (default: the current one): order, batches, drop counts."""
        if epoch is None or epoch == self.epoch:
            return self._current_plan()
        return self._build_plan(epoch)

    def __len__(self) -> int:
        """Return the batches this rank takes in the current epoch, the same on every rank.

        The count can differ by a few batches between epochs, because the greedy cut depends on
        the epoch's order.
        """
        return self._current_plan().batches_per_rank

    def set_epoch(self, epoch: int) -> None:
        """Select ``epoch``; the position restarts at 0 unless ``epoch`` is the current one."""
        if epoch < 0:
            raise ValueError(f"epoch={epoch} is invalid: must be >= 0")
        if epoch != self.epoch:
            self.epoch, self.position, self._plan = epoch, 0, None

    def state_dict(self) -> dict[str, Any]:
        """Return the epoch, the batches already yielded in it, and the settings they depend on.

        Called inside the loop, the position counts the batch being processed as taken, so a
        checkpoint written after a step resumes with the next batch.
        """
        state = {"version": STATE_VERSION, "epoch": self.epoch, "position": self.position}
        state.update({key: self._setting(key) for key in _STATE_KEYS})
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at a saved position; raise ValueError naming any setting that differs."""
        for key in ("version", "epoch", "position", *_STATE_KEYS):
            if key not in state:
                raise ValueError(f"loader state has no field {key!r}; fields: {sorted(state)}")
        if state["version"] != STATE_VERSION:
            raise ValueError(f"loader state version {state['version']} is not {STATE_VERSION}")
        for key in _STATE_KEYS:
            if state[key] != self._setting(key):
                raise ValueError(
                    f"loader state was saved with {key}={state[key]!r}, this loader has "
                    f"{key}={self._setting(key)!r}; the saved position names other batches. "
                    f"Resume with the same {key}, or start a new run (--resume none in another "
                    "train.run_dir)"
                )
        previous = (self.epoch, self.position)
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        if self.epoch < 0 or not 0 <= self.position <= len(self):
            batches = len(self) if self.epoch >= 0 else 0
            self.epoch, self.position = previous
            raise ValueError(
                f"loader state epoch={state['epoch']}, position={state['position']} is invalid: "
                f"the epoch must be >= 0 and the position lie in [0, {batches}], the batches "
                "per rank of that epoch"
            )

    def __iter__(self) -> Iterator[PackedBatch]:
        """Yield the remaining batches of the current epoch, then advance to the next epoch."""
        plan = self._current_plan()
        if self.position == 0:
            self._log_epoch(plan)
        local = plan.rank_batches(self.rank)[self.position:]
        for batch in self._produce(plan, local):
            self.position += 1
            yield batch
        self.epoch, self.position, self._plan = self.epoch + 1, 0, None

    def _produce(self, plan: EpochPlan, local: np.ndarray) -> Iterator[PackedBatch]:
        if self.num_workers == 0:
            parts = (self.gather_batch(plan, int(batch)) for batch in local)
        else:
            dataset = _WorkerBatches(self, plan, local)
            context = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
            # A generator of its own keeps DataLoader from drawing its base seed from torch's
            # global RNG, which would make dropout differ between a resumed and an
            # uninterrupted run (a resumed run starts one more iterator).
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + plan.epoch)
            parts = iter(DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                                    collate_fn=_identity, multiprocessing_context=context,
                                    generator=generator))
        return (pack_events(events, mask) for events, mask in parts)

    def gather_batch(self, plan: EpochPlan, batch: int) -> tuple[EventBlock, np.ndarray]:
        """Gather the events of global batch ``batch`` of ``plan`` and draw their (T,) mask.

        ``EMPTY_BATCH`` gives a block with no events. Workers return these numpy arrays rather
        than tensors, because ten small tensors per batch in shared memory cost more than one
        pickled copy. The rank's main process wraps them in tensors with ``pack_events``.
        """
        if batch == EMPTY_BATCH:
            events = gather_events(self.store.events, np.zeros(0, dtype=np.int64))
        else:
            events = gather_events(self.store.events, plan.batch_rows(batch))
        return events, self._draw_mask(events, plan.epoch)

    def _draw_mask(self, events: EventBlock, epoch: int) -> np.ndarray:
        if self.mask_mode == "pretrain":
            return masking.draw_mask(events.event_id, events.offsets, events.level, self.seed,
                                     epoch)
        if self.mask_mode == "gen":
            return events.level == LEVEL_GEN
        return np.zeros(events.num_tokens, dtype=bool)

    def _current_plan(self) -> EpochPlan:
        if self._plan is None or self._plan.epoch != self.epoch:
            self._plan = self._build_plan(self.epoch)
        return self._plan

    def _build_plan(self, epoch: int) -> EpochPlan:
        return plan_epoch(self.store.events.event_id, self._lengths, seed=self.seed, epoch=epoch,
                          max_tokens=self.max_tokens, world_size=self.world_size,
                          drop_last=self.drop_last)

    def _setting(self, key: str) -> Any:
        return self.num_events if key == "num_events" else getattr(self, key)

    def _log_load(self) -> None:
        if self.rank != 0:
            return
        store = self.store
        logger.info("loaded split %s of %s: %d events, %d tokens, %d shards skipped as corrupt, "
                    "%d reco jets dropped by max_jets=%d", store.split, store.manifest.path,
                    store.num_events, store.events.num_tokens, len(store.skipped_shards),
                    store.jets_dropped, self.max_jets)

    def _log_epoch(self, plan: EpochPlan) -> None:
        if self.rank != 0:
            return
        # An epoch with no batch per rank would end a training loop at once, so it is a warning.
        level = logging.WARNING if plan.batches_per_rank == 0 else logging.INFO
        logger.log(level, "epoch %d of split %s: %d events in %d batches, %d batches per rank on "
                   "%d ranks; dropped %d batches holding %d events; padded with %d empty batches",
                   plan.epoch, self.split, plan.order.size, plan.num_batches,
                   plan.batches_per_rank, plan.world_size, plan.dropped_batches,
                   plan.dropped_events, plan.padding_batches)


class _WorkerBatches(IterableDataset):
    """The local batches of one rank, split among DataLoader workers, as numpy arrays."""

    def __init__(self, loader: EventLoader, plan: EpochPlan, local: np.ndarray):
        self.loader, self.plan, self.local = loader, plan, local

    def __iter__(self) -> Iterator[tuple[EventBlock, np.ndarray]]:
        info = get_worker_info()
        share = self.local if info is None else worker_share(self.local, info.id, info.num_workers)
        for batch in share:
            yield self.loader.gather_batch(self.plan, int(batch))


def _identity(item: Any) -> Any:
    return item


def _check_arguments(rank: int, world_size: int, max_tokens: int, max_jets: int,
                     mask_mode: str, num_workers: int) -> None:
    if world_size < 1:
        raise ValueError(f"world_size={world_size} is invalid: must be >= 1")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is invalid: must lie in [0, world_size={world_size})")
    if max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens} is invalid: must be >= 1")
    if max_jets < 0:
        raise ValueError(f"max_jets={max_jets} is invalid: must be >= 0")
    if mask_mode not in MASK_MODES:
        raise ValueError(f"mask_mode={mask_mode!r} is invalid: valid modes are {MASK_MODES}")
    if num_workers < 0:
        raise ValueError(f"num_workers={num_workers} is invalid: must be >= 0")
