"""Event-record rules on constructed events: final state, tops once, jets, isolation."""

from __future__ import annotations

import numpy as np

from data_prep.detector import DetectorConfig, simulate
from data_prep.jets import FourVectors, cluster_jets
from data_prep.selection import select
from data_prep.truth import final_state_mask, find_gen_objects, momentum_balance, ttbar_mass

BEAM_E = 6500.0


def _record_with_shower_copies(make_batch):
    """Beams, hard process with two recoil copies of each top, decays and final particles."""
    # (id, status, mother1, px, py, pz, e, m, charge); positions are Pythia record indices.
    rows = [
        (90, -11, 0, 0, 0, 0, 2 * BEAM_E, 2 * BEAM_E, 0),
        (2212, -12, 0, 0, 0, BEAM_E, BEAM_E, 0.938, 1),
        (2212, -12, 0, 0, 0, -BEAM_E, BEAM_E, 0.938, 1),
        (21, -21, 1, 0, 0, 200, 200, 0, 0),
        (21, -21, 2, 0, 0, -200, 200, 0, 0),
        (6, -22, 3, 50, 0, 0, 0, 172.5, 2 / 3),  # 5: hard-process top, e fixed below
        (-6, -22, 3, -50, 0, 0, 0, 172.5, -2 / 3),
        (6, -44, 5, 50, 0, 0, 0, 172.5, 2 / 3),  # 7, 8: shower copies
        (-6, -44, 6, -50, 0, 0, 0, 172.5, -2 / 3),
        (24, -22, 7, 30, 0, 0, 0, 80.4, 1),  # 9: W+ from top
        (5, -23, 7, 20, 0, 0, 0, 4.8, -1 / 3),
        (-24, -22, 8, -30, 0, 0, 0, 80.4, -1),
        (-5, -23, 8, -20, 0, 0, 0, 4.8, 1 / 3),
        (-11, 23, 9, 15, 5, 0, 0, 0.000511, 1),  # 13: e+
        (12, 23, 9, 15, -5, 0, 0, 0, 0),
        (13, 23, 11, -15, 5, 0, 0, 0.10566, -1),
        (-14, 23, 11, -15, -5, 0, 0, 0, 0),
    ]
    # Final particles that balance the beams exactly: two remnants along the beams.
    rows += [(2212, 63, 1, 0, 0, BEAM_E - 300, 0, 0.938, 1),
             (2212, 63, 2, 0, 0, -(BEAM_E - 300), 0, 0.938, 1)]
    batch = make_batch(rows)
    # Give every particle an on-shell energy.
    batch.e[:] = np.sqrt(batch.px**2 + batch.py**2 + batch.pz**2 + batch.m**2)
    return batch


def test_final_state_is_positive_status(make_batch):
    batch = _record_with_shower_copies(make_batch)
    final = final_state_mask(batch)
    assert np.array_equal(np.flatnonzero(final), np.flatnonzero(batch.status > 0))


def test_real_event_momentum_balance(small_run):
    from data_prep.generate import generate_batches

    batch = next(generate_batches("ttbar", 5, 3, batch_size=3))
    balance = momentum_balance(batch)
    assert np.abs(balance).max() < 1e-3


def test_hard_process_tops_taken_once(make_batch):
    batch = _record_with_shower_copies(make_batch)
    gen = find_gen_objects(batch)
    assert gen.top.tolist() == [5]
    assert gen.antitop.tolist() == [6]
    assert gen.complete.tolist() == [True]
    expected = np.sqrt((batch.e[5] + batch.e[6]) ** 2)
    assert ttbar_mass(batch, gen)[0] == np.float64(expected)


def test_w_decay_products_found(make_batch):
    gen = find_gen_objects(_record_with_shower_copies(make_batch))
    assert gen.lepton_plus.tolist() == [13]
    assert gen.lepton_minus.tolist() == [15]
    assert gen.neutrino.tolist() == [14]
    assert gen.antineutrino.tolist() == [16]
    assert gen.b.tolist() == [10]
    assert gen.antib.tolist() == [12]


def _flat(rows):
    rows = np.array(rows, dtype=np.float64).reshape(-1, 4)
    return FourVectors(np.zeros(len(rows), dtype=np.int64), *rows.T)


def test_clustering_few_particles():
    for count in (0, 1, 2):
        particles = _flat([(30.0 + i, 1.0, 0.0, 31.0 + i) for i in range(count)])
        jets = cluster_jets(particles, 1, min_pt=20.0)
        assert jets.event.size <= 1


def test_sparse_events_fail_selection_and_count(make_batch):
    rows = [(90, -11, 0, 0, 0, 0, 1, 1, 0), (2212, -12, 0, 0, 0, 1, 1, 0.938, 1),
            (2212, -12, 0, 0, 0, -1, 1, 0.938, 1)]
    for extra in ([], [(211, 91, 1, 30, 0, 0, 30, 0.1396, 1)],
                  [(211, 91, 1, 30, 0, 0, 30, 0.1396, 1), (22, 91, 1, 0, 25, 0, 25, 0, 0)]):
        batch = make_batch(rows + extra)
        reco = simulate(batch, np.random.default_rng(0), DetectorConfig())
        gen = find_gen_objects(batch)
        selected = select(reco, gen.complete)
        assert selected.cut_flow.counts["generated"] == 1
        assert not selected.passed[0]


def test_isolated_electron_inside_jet_counted_once(make_batch):
    # A 500 GeV electron with 25 GeV of hadrons at dR 0.2-0.3: isolated (ratio 0.05), and
    # inside the cone of the jet those hadrons form.
    rows = [(90, -11, 0, 0, 0, 0, 1, 1, 0), (2212, -12, 0, 0, 0, 1, 1, 0.938, 1),
            (2212, -12, 0, 0, 0, -1, 1, 0.938, 1),
            (11, 1, 1, 500, 0, 0, 500, 0.000511, -1)]
    for dphi in (0.2, 0.25, 0.3):
        pt = 25.0 / 3
        rows.append((211, 91, 1, pt * np.cos(dphi), pt * np.sin(dphi), 0, 0, 0.1396, 1))
    batch = make_batch(rows)
    batch.e[:] = np.sqrt(batch.px**2 + batch.py**2 + batch.pz**2 + batch.m**2)
    config = DetectorConfig(smear=False, efficiencies=False)
    reco = simulate(batch, np.random.default_rng(0), config)
    assert reco.leptons.pdg_id.tolist() == [11]
    assert reco.jets.event.size == 1
    # The jet is the hadrons only (times the jet energy scale factor, at most ~1.12 here).
    assert 25.0 <= reco.jets.pt[0] < 30.0
    # MET balances electron plus hadrons once: about 525 GeV, not 1025.
    assert abs(reco.met[0] - 525.0) < 1.0
