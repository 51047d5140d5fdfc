"""Synthetic data sets in the on-disk layout, for tests and benchmarks of the reading side.

Events have the token layout of a dileptonic top-pair event (two reco leptons, 2 to
``max_jets_stored`` reco jets, missing momentum, then two gen leptons, two neutrinos, b and
anti-b), with random kinematics that follow no physics. The layout, member names and manifest
fields are those of ``docs/architecture.md``; real data sets are written by ``data_prep``.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np

from bumblebee_dist.data.block import EventBlock
from bumblebee_dist.features import FeatureStats
from bumblebee_dist.tokens import (
    BTAG, ETA, LEVEL_GEN, LEVEL_RECO, MASS, NUM_FEATURES, PDG_B, PDG_JET, PDG_MET, PHI, PT,
)

SAMPLES = ({"name": "ttbar", "id": 0}, {"name": "eta_t", "id": 1})
# Gen tokens of every event, in stored order: lepton+, lepton-, neutrino, anti-neutrino, b, anti-b.
_GEN_PDG = np.array([-11, 13, 12, -14, PDG_B, -PDG_B], dtype=np.int32)


def synthetic_block(num_events: int, first_event_id: int, rng: np.random.Generator, *,
                    sample: int = 0, max_jets_stored: int = 10,
                    sort_jets: bool = True) -> EventBlock:
    """Return a valid block of ``num_events`` events with ids ``first_event_id`` onwards.

    ``sort_jets=False`` stores the reco jets of each event in random pT order.
    """
    num_jets = rng.integers(2, max_jets_stored + 1, size=num_events)
    lengths = 2 + num_jets + 1 + _GEN_PDG.size
    offsets = np.zeros(num_events + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    token_event = np.repeat(np.arange(num_events), lengths)
    position = np.arange(offsets[-1]) - offsets[:-1][token_event]
    jets_end = 2 + num_jets[token_event]
    is_jet = (position >= 2) & (position < jets_end)
    is_met = position == jets_end
    is_gen = position > jets_end
    pdg_id, features = _token_values(rng, position, is_jet, is_met, is_gen, jets_end)
    if sort_jets:
        _sort_jets(features, np.flatnonzero(is_jet), token_event)
    return EventBlock(
        event_id=np.arange(first_event_id, first_event_id + num_events, dtype=np.int64),
        offsets=offsets,
        process_code=rng.choice(np.array([601, 602], dtype=np.int32), size=num_events),
        sample=np.full(num_events, sample, dtype=np.int8),
        m_ttbar_true=rng.uniform(340.0, 800.0, size=num_events).astype(np.float32),
        pdg_id=pdg_id,
        level=np.where(is_gen, LEVEL_GEN, LEVEL_RECO).astype(np.int8),
        features=features,
    )


def _token_values(rng, position, is_jet, is_met, is_gen, jets_end):
    num_tokens = position.size
    pdg_id = np.where(position == 0, 11, -13).astype(np.int32)
    btag = rng.random(num_tokens) < 0.3
    pdg_id[is_jet] = np.where(btag[is_jet], PDG_B, PDG_JET)
    pdg_id[is_met] = PDG_MET
    pdg_id[is_gen] = _GEN_PDG[(position - jets_end - 1)[is_gen]]
    features = np.zeros((num_tokens, NUM_FEATURES), dtype=np.float32)
    features[:, PT] = rng.lognormal(3.8, 0.6, num_tokens)
    features[:, ETA] = np.where(is_met, 0.0, rng.normal(0.0, 1.5, num_tokens))
    features[:, PHI] = rng.uniform(-np.pi, np.pi, num_tokens)
    # float32 rounding can lift a value just below pi to pi, outside [-pi, pi).
    features[:, PHI] = np.minimum(features[:, PHI], np.nextafter(np.float32(np.pi), 0))
    neutrino = np.isin(pdg_id, (12, -12, 14, -14))
    features[:, MASS] = np.where(is_met | neutrino, 0.0, rng.uniform(0.0, 20.0, num_tokens))
    features[:, BTAG] = np.abs(pdg_id) == PDG_B
    return pdg_id, features


def _sort_jets(features: np.ndarray, jet_token: np.ndarray, token_event: np.ndarray) -> None:
    """Reorder jet rows within each event by descending pT, in place."""
    order = np.lexsort((-features[jet_token, PT], token_event[jet_token]))
    features[jet_token] = features[jet_token[order]]


def write_shard(path: str | Path, blocks: list[tuple[str, EventBlock]]) -> str:
    """Write ``(key, block)`` pairs as a tar shard with fixed member metadata; return its SHA-256.

    The file is written under a temporary name and renamed when complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    with tarfile.open(temporary, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, block in blocks:
            for suffix, data in block.to_members().items():
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size, info.mode, info.mtime = len(data), 0o644, 0
                tar.addfile(info, io.BytesIO(data))
    temporary.replace(path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_dataset(root: str | Path, shard_events: dict[str, list[int]], *, seed: int = 0,
                  block_events: int = 1000, **block_options) -> Path:
    """Write a data set with a manifest; return the manifest path.

    ``shard_events`` maps a split to the event count of each of its shards; shards alternate
    between the two samples. Event ids are unique over the data set. ``block_options`` go to
    ``synthetic_block``. Feature statistics come from the train split (or from all shards when
    there is none).
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    entries, blocks_by_split, next_id = [], {}, 0
    for split, counts in shard_events.items():
        for index, count in enumerate(counts):
            sample = SAMPLES[index % len(SAMPLES)]
            name = f"{sample['name']}-{index:05d}"
            blocks = []
            for block_index, start in enumerate(range(0, count, block_events)):
                size = min(block_events, count - start)
                block = synthetic_block(size, next_id, rng, sample=sample["id"], **block_options)
                next_id += size
                blocks.append((f"{name}-{block_index:04d}", block))
            relative = f"shards/{split}/{name}.tar"
            digest = write_shard(root / relative, blocks)
            blocks_by_split.setdefault(split, []).extend(block for _, block in blocks)
            entries.append({"path": relative, "split": split, "sample": sample["name"],
                            "events": count, "tokens": sum(b.num_tokens for _, b in blocks),
                            "sha256": digest})
    stats_blocks = blocks_by_split.get("train") or sum(blocks_by_split.values(), [])
    stats = FeatureStats.compute(np.concatenate([b.features for b in stats_blocks]),
                                 np.concatenate([b.pdg_id for b in stats_blocks]))
    manifest = {"format_version": 1, "samples": [dict(s) for s in SAMPLES], "shards": entries,
                "feature_stats": stats.to_manifest(), "seed": seed, "created": "synthetic"}
    path = root / "manifest.json"
    path.write_text(json.dumps(manifest, indent=1) + "\n")
    return path
