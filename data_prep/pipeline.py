"""One shard's worth of events: generate, find gen objects, simulate, select, build tokens.

Everything random in a shard derives from (data set seed, sample, shard index): the Pythia seed
through ``generate.pythia_seed`` and the detector's numpy generator through a ``SeedSequence`` of
the same three numbers, so a shard can be rebuilt bit for bit on any machine.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from bumblebee_dist.data.block import EventBlock
from data_prep.detector import (
    DetectorConfig,
    RecoEvents,
    build_energy_flow,
    missing_momentum,
    reconstruct_jets,
    reconstruct_leptons,
)
from data_prep.generate import ParticleBatch, generate_batches, get_sample, pythia_seed
from data_prep.records import DEFAULT_MAX_JETS, build_block
from data_prep.selection import CutFlow, SelectionConfig, select
from data_prep.truth import GenObjects, find_gen_objects, ttbar_mass

STAGES = ("generation", "truth", "detector", "clustering", "selection", "records")


@dataclass
class PipelineConfig:
    """Settings of the per-shard processing chain."""

    batch_size: int = 100  # events per Pythia nextBatch call and per vectorized step
    max_jets: int = DEFAULT_MAX_JETS  # reco jets kept per event, highest pT first
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)


@dataclass
class ShardStats:
    """Counters and timings of one shard's processing."""

    cut_flow: CutFlow = field(default_factory=CutFlow)
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    dropped_nonfinite: int = 0  # final-state particles with a NaN or infinite component


def detector_rng(dataset_seed: int, sample: str, shard_index: int) -> np.random.Generator:
    """Return the detector's random generator of one shard."""
    sample_id = get_sample(sample).sample_id
    return np.random.default_rng(np.random.SeedSequence([int(dataset_seed), sample_id,
                                                         int(shard_index)]))


def shard_blocks(sample: str, dataset_seed: int, shard_index: int, n_events: int,
                 config: PipelineConfig, stats: ShardStats) -> Iterator[EventBlock]:
    """Generate ``n_events`` events and yield one EventBlock of selected events per batch.

    ``stats`` is filled as the batches go by: cut flow, seconds per stage, dropped particles.
    Blocks can be empty when no event of a batch passes.
    """
    spec = get_sample(sample)
    rng = detector_rng(dataset_seed, sample, shard_index)
    seed = pythia_seed(dataset_seed, sample, shard_index)
    first_event = 0
    clock = time.perf_counter()
    for batch in generate_batches(sample, seed, n_events, config.batch_size):
        clock = _lap(stats, "generation", clock)
        gen = find_gen_objects(batch)
        m_ttbar = ttbar_mass(batch, gen)
        gen_ok = gen.complete & _finite_gen(batch, gen)
        clock = _lap(stats, "truth", clock)
        flow, dropped = build_energy_flow(batch, rng, config.detector)
        leptons, isolated = reconstruct_leptons(flow, batch.num_events, rng, config.detector)
        met, met_phi = missing_momentum(flow, batch.num_events)
        stats.dropped_nonfinite += dropped
        clock = _lap(stats, "detector", clock)
        jets, _ = reconstruct_jets(flow, isolated, batch, rng, config.detector)
        reco = RecoEvents(leptons=leptons, jets=jets, met=met, met_phi=met_phi,
                          dropped_nonfinite=dropped)
        clock = _lap(stats, "clustering", clock)
        selected = select(reco, gen_ok, config.selection)
        stats.cut_flow.add(selected.cut_flow)
        clock = _lap(stats, "selection", clock)
        block = build_block(batch, gen, m_ttbar, selected, (reco.met, reco.met_phi),
                            sample_id=spec.sample_id, shard_index=shard_index,
                            first_event_index=first_event, max_jets=config.max_jets)
        first_event += batch.num_events
        clock = _lap(stats, "records", clock)
        yield block
        clock = time.perf_counter()


def _lap(stats: ShardStats, stage: str, start: float) -> float:
    now = time.perf_counter()
    stats.seconds[stage] += now - start
    return now


def _finite_gen(batch: ParticleBatch, gen: GenObjects) -> np.ndarray:
    """Return (E,) True where every gen object found has a finite four-momentum."""
    index = np.maximum(gen.indices(), 0)
    finite = np.ones(index.shape, dtype=bool)
    for column in (batch.px, batch.py, batch.pz, batch.e, batch.m):
        finite &= np.isfinite(column[index])
    return finite.all(axis=1)
