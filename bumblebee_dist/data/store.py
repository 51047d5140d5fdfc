"""A split held in memory, preprocessed once: jet cap applied, features in model space.

Every rank (and, through fork, every loader worker) keeps the whole split as one ``EventBlock``.
It costs 25 bytes per token (20 for features, 4 for the PDG id, 1 for the level) and 25 bytes
per event, so about 0.43 kB per event of 16 tokens: 7M events take about 3 GB per rank process,
and about twice that at the peak of loading, when the preprocessed shards are concatenated. Shards are preprocessed one at a time, so the float64 intermediates of
the feature transform never exceed one shard.

NOTE: past a few GB per rank this design needs a change: read only the shards a rank needs
(which costs the global permutation across shards) or memory-map decoded columns.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bumblebee_dist.data.block import EventBlock, concat_blocks
from bumblebee_dist.data.shards import Manifest, read_manifest, read_shards
from bumblebee_dist.features import FeatureStats, to_model
from bumblebee_dist.tokens import LEVEL_RECO, PDG_B, PDG_JET, PT

logger = logging.getLogger(__name__)


def reco_jet_tokens(block: EventBlock) -> np.ndarray:
    """Return (T,) bool, True at reco jets: PDG id 5 (b-tagged) or 41 (untagged) at level 1."""
    is_jet_id = (block.pdg_id == PDG_B) | (block.pdg_id == PDG_JET)
    return is_jet_id & (block.level == LEVEL_RECO)


def cap_jets(block: EventBlock, max_jets: int) -> tuple[EventBlock, int]:
    """Keep the ``max_jets`` highest-pT reco jets of each event; return (block, jets dropped).

    Jets are ranked by pT within each event, whatever order they are stored in; ties keep the
    stored order. Every other token is kept, and kept tokens keep their stored order.
    """
    if max_jets < 0:
        raise ValueError(f"max_jets={max_jets} is invalid: must be >= 0")
    jet_token = np.flatnonzero(reco_jet_tokens(block))
    if jet_token.size == 0:
        return block, 0
    token_event = np.repeat(np.arange(block.num_events), block.lengths())
    jet_event = token_event[jet_token]
    # Sort by event, then by descending pT; lexsort is stable, so equal pT keeps stored order.
    order = np.lexsort((-block.features[jet_token, PT], jet_event))
    sorted_event = jet_event[order]
    first_of_event = np.searchsorted(sorted_event, sorted_event, side="left")
    rank_in_event = np.arange(order.size) - first_of_event
    dropped = jet_token[order[rank_in_event >= max_jets]]
    if dropped.size == 0:
        return block, 0
    keep = np.ones(block.num_tokens, dtype=bool)
    keep[dropped] = False
    return _keep_tokens(block, keep, token_event), int(dropped.size)


def _keep_tokens(block: EventBlock, keep: np.ndarray, token_event: np.ndarray) -> EventBlock:
    lengths = np.bincount(token_event[keep], minlength=block.num_events)
    offsets = np.zeros(block.num_events + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return EventBlock(
        event_id=block.event_id, offsets=offsets, process_code=block.process_code,
        sample=block.sample, m_ttbar_true=block.m_ttbar_true, pdg_id=block.pdg_id[keep],
        level=block.level[keep], features=block.features[keep],
    )


@dataclass
class EventStore:
    """One split in memory, ready to be packed.

    ``events.features`` are in model space; ``skipped_shards`` lists shards skipped as corrupt and
    ``jets_dropped`` counts reco jets removed by the jet cap.
    """

    manifest: Manifest
    split: str
    events: EventBlock
    skipped_shards: list[str]
    jets_dropped: int

    @property
    def num_events(self) -> int:
        """Events in the split, after skipped shards."""
        return self.events.num_events


def load_split(data_path: str | Path, split: str, *, max_jets: int,
               skip_corrupt_shards: bool = False,
               feature_stats: FeatureStats | None = None) -> EventStore:
    """Read every shard of ``split``, cap the jets and convert the features to model space.

    Features are standardized with ``feature_stats`` when given (the statistics a model was
    trained with), else with the manifest's.

    Shards are read in manifest order. Raises ValueError when the split has no events left to
    read, naming the manifest; corrupt shards raise or are skipped as in ``read_shards``.
    """
    manifest = read_manifest(data_path)
    entries = manifest.shards_of(split)
    stats = feature_stats or FeatureStats.from_manifest(manifest.feature_stats)
    parts, skipped, jets_dropped = [], [], 0
    for entry in entries:
        result = read_shards(manifest, [entry], skip_corrupt=skip_corrupt_shards)
        skipped.extend(result.skipped)
        if result.blocks:
            part, dropped = _preprocess(concat_blocks(result.blocks), max_jets, stats)
            parts.append(part)
            jets_dropped += dropped
    if sum(part.num_events for part in parts) == 0:
        raise ValueError(
            f"split {split!r} of {manifest.path} has no events to read: {len(entries)} shards "
            f"listed, {len(skipped)} skipped as corrupt"
        )
    events = concat_blocks(parts)
    del parts
    _check_unique_ids(events, manifest, split)
    return EventStore(manifest=manifest, split=split, events=events,
                      skipped_shards=skipped, jets_dropped=jets_dropped)


def _preprocess(block: EventBlock, max_jets: int, stats: FeatureStats) -> tuple[EventBlock, int]:
    block, jets_dropped = cap_jets(block, max_jets)
    block.features = to_model(block.features, block.pdg_id, stats)
    return block, jets_dropped


def _check_unique_ids(events: EventBlock, manifest: Manifest, split: str) -> None:
    unique, counts = np.unique(events.event_id, return_counts=True)
    if unique.size != events.num_events:
        repeated = int(unique[np.argmax(counts > 1)])
        raise ValueError(
            f"split {split!r} of {manifest.path}: event id {repeated} occurs in more than one "
            "block; event ids must be unique in a data set because they seed the masking draw"
        )
