"""Generator-level objects read from the Pythia event record.

Rules, in terms of Pythia's record (a particle that is shower-recoiled gets a new copy with the
previous copy as its only mother):

- final state: every particle with positive status. Their summed four-momentum equals the two
  beams' (entries 1 and 2); ``momentum_balance`` measures the difference.
- hard-process tops: the first copy of the top and of the anti-top, that is the |id| = 6
  particle whose mother is not a top (status -22). Each top is taken once, whatever number of
  recoil copies follows. The true m(ttbar) is the invariant mass of these two.
- b and anti-b: the first copies made by the top decays, |id| = 5 with a top as mother (status
  -23). They are taken before final-state radiation, so top = b + W exactly.
- charged leptons and neutrinos: the first copies made by the W decays, |id| in 11, 13 (leptons)
  or 12, 14 (neutrinos) with a W (|id| = 24) as mother (status 23 or -23), again before QED
  radiation, so W = lepton + neutrino exactly.

An event is complete when it has exactly one top and one anti-top, one b and one anti-b, one
positive and one negative lepton and two neutrinos; incomplete events are counted and dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data_prep.generate import ParticleBatch

PDG_TOP = 6
PDG_BOTTOM = 5
PDG_W = 24
CHARGED_LEPTONS = (11, 13)
NEUTRINOS = (12, 14)
STATUS_BEAM = -12


@dataclass
class GenObjects:
    """Global particle indices of the gen objects of E events, -1 where absent.

    Columns are (E,) int64 indices into the batch's particle arrays.
    """

    top: np.ndarray
    antitop: np.ndarray
    b: np.ndarray
    antib: np.ndarray
    lepton_plus: np.ndarray  # e+ or mu+ (negative PDG id)
    lepton_minus: np.ndarray  # e- or mu- (positive PDG id)
    neutrino: np.ndarray  # nu_e or nu_mu
    antineutrino: np.ndarray
    complete: np.ndarray  # (E,) bool: every object found exactly once

    def indices(self) -> np.ndarray:
        """Return the (E, 6) indices of l+, l-, nu, nubar, b, bbar: the gen tokens, in order."""
        return np.stack([self.lepton_plus, self.lepton_minus, self.neutrino, self.antineutrino,
                         self.b, self.antib], axis=1)


def final_state_mask(batch: ParticleBatch) -> np.ndarray:
    """Return a (N,) bool mask of the final-state particles: status > 0."""
    return batch.status > 0


def momentum_balance(batch: ParticleBatch) -> np.ndarray:
    """Return (E, 4): summed final-state (px, py, pz, E) minus the beams', per event, in GeV."""
    events = batch.event_index()
    final = final_state_mask(batch)
    beams = batch.status == STATUS_BEAM
    balance = np.zeros((batch.num_events, 4))
    for column, values in enumerate((batch.px, batch.py, batch.pz, batch.e)):
        balance[:, column] = (
            np.bincount(events[final], weights=values[final], minlength=batch.num_events)
            - np.bincount(events[beams], weights=values[beams], minlength=batch.num_events)
        )
    return balance


def _mother_pdg(batch: ParticleBatch, events: np.ndarray) -> np.ndarray:
    """Return the PDG id of each particle's first mother (0 for the system entry's)."""
    mother = batch.offsets[events] + np.maximum(batch.mother1, 0)
    return batch.pdg_id[mother]


def _unique_per_event(selected: np.ndarray, events: np.ndarray,
                      num_events: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (index, found_once): the selected particle of each event, and whether unique."""
    counts = np.bincount(events[selected], minlength=num_events)
    index = np.full(num_events, -1, dtype=np.int64)
    positions = np.flatnonzero(selected)
    # With repeats the last match wins, but found_once is False for that event anyway.
    index[events[positions]] = positions
    return index, counts == 1


def find_gen_objects(batch: ParticleBatch) -> GenObjects:
    """Locate tops, b quarks, leptons and neutrinos of every event by the module's rules."""
    events = batch.event_index()
    pdg = batch.pdg_id
    mother_pdg = np.abs(_mother_pdg(batch, events))
    rules = {
        "top": (pdg == PDG_TOP) & (mother_pdg != PDG_TOP),
        "antitop": (pdg == -PDG_TOP) & (mother_pdg != PDG_TOP),
        "b": (pdg == PDG_BOTTOM) & (mother_pdg == PDG_TOP),
        "antib": (pdg == -PDG_BOTTOM) & (mother_pdg == PDG_TOP),
        "lepton_plus": np.isin(pdg, [-i for i in CHARGED_LEPTONS]) & (mother_pdg == PDG_W),
        "lepton_minus": np.isin(pdg, CHARGED_LEPTONS) & (mother_pdg == PDG_W),
        "neutrino": np.isin(pdg, NEUTRINOS) & (mother_pdg == PDG_W),
        "antineutrino": np.isin(pdg, [-i for i in NEUTRINOS]) & (mother_pdg == PDG_W),
    }
    complete = np.ones(batch.num_events, dtype=bool)
    found = {}
    for name, selected in rules.items():
        found[name], once = _unique_per_event(selected, events, batch.num_events)
        complete &= once
    return GenObjects(complete=complete, **found)


def ttbar_mass(batch: ParticleBatch, gen: GenObjects) -> np.ndarray:
    """Return the (E,) invariant mass of the hard-process top pair in GeV; NaN if incomplete."""
    ok = (gen.top >= 0) & (gen.antitop >= 0)
    top = np.where(ok, gen.top, 0)
    antitop = np.where(ok, gen.antitop, 0)
    total = [column[top] + column[antitop] for column in (batch.px, batch.py, batch.pz, batch.e)]
    m2 = total[3] ** 2 - total[0] ** 2 - total[1] ** 2 - total[2] ** 2
    return np.where(ok, np.sqrt(np.maximum(m2, 0.0)), np.nan)
