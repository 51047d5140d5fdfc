"""Token records from a small real Pythia run."""

from __future__ import annotations

import numpy as np

from bumblebee_dist.tokens import LEVEL_GEN, LEVEL_RECO, PDG_MET, PDG_VOCABULARY
from data_prep.records import MAX_EVENT_INDEX, event_ids


def test_selected_events_exist(small_run):
    block, stats = small_run
    assert block.num_events == stats.cut_flow.counts["one_btag"]
    assert block.num_events > 0


def test_token_counts_per_event(small_run):
    block, _ = small_run
    for event in range(block.num_events):
        tokens = slice(block.offsets[event], block.offsets[event + 1])
        pdg, level = block.pdg_id[tokens], block.level[tokens]
        reco, gen = pdg[level == LEVEL_RECO], pdg[level == LEVEL_GEN]
        assert np.isin(np.abs(reco), (11, 13)).sum() == 2
        assert (reco == PDG_MET).sum() == 1
        assert np.isin(reco, (5, 41)).sum() >= 2
        assert (reco == 5).sum() >= 1
        assert sorted(np.sign(gen[np.isin(np.abs(gen), (11, 13))]).tolist()) == [-1, 1]
        assert np.isin(np.abs(gen), (12, 14)).sum() == 2
        assert sorted(gen[np.abs(gen) == 5].tolist()) == [-5, 5]


def test_token_values(small_run):
    block, _ = small_run
    features = block.features
    assert np.isfinite(features).all()
    assert np.isin(block.pdg_id, PDG_VOCABULARY).all()
    assert features[:, 2].min() >= -np.pi
    assert features[:, 2].max() < np.pi
    assert (features[:, 0] > 0).all()
    met = block.pdg_id == PDG_MET
    assert (features[met, 1] == 0).all()
    assert (features[met, 3] == 0).all()
    neutrinos = np.isin(np.abs(block.pdg_id), (12, 14))
    assert (features[neutrinos, 3] == 0).all()
    gen_b = (np.abs(block.pdg_id) == 5) & (block.level == LEVEL_GEN)
    assert (features[gen_b, 4] == 1).all()
    jets = np.isin(block.pdg_id, (5, 41)) & (block.level == LEVEL_RECO)
    assert np.array_equal(features[jets, 4], (block.pdg_id[jets] == 5).astype(np.float32))


def test_event_columns(small_run):
    block, _ = small_run
    assert np.isin(block.process_code, (601, 602)).all()
    assert (block.sample == 0).all()
    assert (block.m_ttbar_true > 2 * 160).all()
    assert np.unique(block.event_id).size == block.num_events


def test_event_ids_unique_across_shards():
    index = np.array([0, 1, MAX_EVENT_INDEX])
    ids = np.concatenate([event_ids(sample, shard, index) for sample in (0, 1)
                          for shard in (0, 1, 99999)])
    assert np.unique(ids).size == ids.size
    assert (ids >= 0).all()
