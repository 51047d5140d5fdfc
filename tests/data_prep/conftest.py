"""Shared fixtures: one small real Pythia run reused by the token tests."""

from __future__ import annotations

import numpy as np
import pytest

from bumblebee_dist.data.block import concat_blocks
from data_prep.generate import ParticleBatch
from data_prep.pipeline import PipelineConfig, ShardStats, shard_blocks


@pytest.fixture(scope="session")
def small_run():
    """40 real ttbar events through the whole chain: (block of selected events, stats)."""
    stats = ShardStats()
    blocks = list(shard_blocks("ttbar", 11, 0, 40, PipelineConfig(batch_size=20), stats))
    return concat_blocks(blocks), stats


@pytest.fixture
def make_batch():
    """Return the one-event batch builder ``build_batch``."""
    return build_batch


def build_batch(particles: list[tuple], process_code: int = 601) -> ParticleBatch:
    """Build a one-event batch from rows (id, status, mother1, px, py, pz, e, m, charge)."""
    rows = np.array(particles, dtype=np.float64).reshape(-1, 9)
    return ParticleBatch(
        offsets=np.array([0, len(rows)], dtype=np.int64),
        pdg_id=rows[:, 0].astype(np.int32),
        status=rows[:, 1].astype(np.int32),
        mother1=rows[:, 2].astype(np.int32),
        mother2=np.zeros(len(rows), dtype=np.int32),
        px=rows[:, 3].copy(), py=rows[:, 4].copy(), pz=rows[:, 5].copy(), e=rows[:, 6].copy(),
        m=rows[:, 7].copy(), charge=rows[:, 8].astype(np.float32),
        process_code=np.array([process_code], dtype=np.int32),
    )
