"""Dileptonic top-pair selection with a cut flow.

The cuts, applied in this order (every number is a ``SelectionConfig`` field):

1. ``gen_complete``: the generator record holds both tops, both b quarks and both W decays
   (bookkeeping; fails only for a malformed record).
2. ``two_leptons``: exactly two isolated leptons (e or mu) with pT > 20 GeV and abs(eta) < 2.4.
3. ``opposite_charge``: the two leptons have opposite charge.
4. ``leading_lepton_pt``: the leading lepton has pT > 25 GeV.
5. ``mll_min``: m(ll) > 20 GeV (removes low-mass resonances).
6. ``z_veto``: same flavour only, abs(m(ll) - 91.19) > 15 GeV.
7. ``met_same_flavour``: same flavour only, MET > 40 GeV.
8. ``two_jets``: at least two jets with pT > 30 GeV and abs(eta) < 2.4.
9. ``one_btag``: at least one of those jets b-tagged.

The cut flow counts the events that pass each cut and every cut before it, starting with
``generated``; events with 0, 1 or 2 visible particles simply fail a cut and are counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from data_prep.detector import Objects, RecoEvents
from data_prep.physics import to_px_py_pz_e

CUT_NAMES = ("generated", "gen_complete", "two_leptons", "opposite_charge", "leading_lepton_pt",
             "mll_min", "z_veto", "met_same_flavour", "two_jets", "one_btag")
Z_MASS_GEV = 91.19


@dataclass
class SelectionConfig:
    """Cuts of the dilepton selection; pT, masses and MET in GeV."""

    lepton_pt_min: float = 20.0
    leading_lepton_pt_min: float = 25.0
    lepton_eta_max: float = 2.4
    mll_min: float = 20.0
    z_window: float = 15.0  # same-flavour events within this distance of m_Z are vetoed
    met_min_same_flavour: float = 40.0
    jet_pt_min: float = 30.0
    jet_eta_max: float = 2.4
    min_jets: int = 2
    min_btags: int = 1

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field."""
        for name in ("lepton_pt_min", "leading_lepton_pt_min", "lepton_eta_max", "mll_min",
                     "z_window", "met_min_same_flavour", "jet_pt_min", "jet_eta_max"):
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(f"selection.{name}={value!r} is invalid: must be >= 0")
        if self.min_jets < self.min_btags or self.min_btags < 0:
            raise ValueError(
                f"selection.min_jets={self.min_jets} and min_btags={self.min_btags} are invalid: "
                "need 0 <= min_btags <= min_jets"
            )


@dataclass
class CutFlow:
    """Ordered event counts per cut, summed over batches."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CUT_NAMES, 0))

    def add(self, other: "CutFlow | dict[str, int]") -> None:
        """Add another cut flow's counts to this one."""
        counts = other.counts if isinstance(other, CutFlow) else other
        for name in CUT_NAMES:
            self.counts[name] += int(counts.get(name, 0))

    def efficiency(self) -> float:
        """Return the fraction of generated events that pass every cut (0 if none generated)."""
        generated = self.counts["generated"]
        return self.counts[CUT_NAMES[-1]] / generated if generated else 0.0


@dataclass
class Selected:
    """Outcome of the selection for E events, and the objects the tokens are built from."""

    passed: np.ndarray  # (E,) bool
    leptons: Objects  # the two selected leptons of every event that has exactly two
    jets: Objects  # jets passing the jet cuts, sorted by event then decreasing pT
    cut_flow: CutFlow


def _pair_mass(leptons: Objects) -> np.ndarray:
    """Return m(ll) of consecutive lepton pairs (rows 0-1, 2-3, ...)."""
    px, py, pz, e = (c.reshape(-1, 2).sum(axis=1)
                     for c in to_px_py_pz_e(leptons.pt, leptons.eta, leptons.phi, leptons.m))
    return np.sqrt(np.maximum(e * e - px * px - py * py - pz * pz, 0.0))


def select(reco: RecoEvents, gen_complete: np.ndarray,
           config: SelectionConfig | None = None) -> Selected:
    """Apply the dilepton selection to a batch and return the passing mask and cut flow."""
    config = config or SelectionConfig()
    num_events = reco.met.size
    good_lepton = (reco.leptons.pt > config.lepton_pt_min) & (
        np.abs(reco.leptons.eta) < config.lepton_eta_max)
    leptons = reco.leptons.take(good_lepton)
    lepton_count = np.bincount(leptons.event, minlength=num_events)
    two = lepton_count == 2
    leptons = leptons.take(two[leptons.event])
    pair_event = leptons.event[0::2]
    pair_pdg = leptons.pdg_id.reshape(-1, 2)
    pair_pt = leptons.pt.reshape(-1, 2)
    opposite = np.zeros(num_events, dtype=bool)
    opposite[pair_event] = np.sign(pair_pdg[:, 0]) != np.sign(pair_pdg[:, 1])
    leading = np.zeros(num_events, dtype=bool)
    leading[pair_event] = pair_pt.max(axis=1) > config.leading_lepton_pt_min
    mll = np.zeros(num_events)
    mll[pair_event] = _pair_mass(leptons)
    same_flavour = np.zeros(num_events, dtype=bool)
    same_flavour[pair_event] = np.abs(pair_pdg[:, 0]) == np.abs(pair_pdg[:, 1])

    jet_ok = (reco.jets.pt > config.jet_pt_min) & (np.abs(reco.jets.eta) < config.jet_eta_max)
    jets = reco.jets.take(jet_ok)
    jet_count = np.bincount(jets.event, minlength=num_events)
    btag_count = np.bincount(jets.event, weights=jets.btag, minlength=num_events)

    cuts = [
        np.ones(num_events, dtype=bool),
        np.asarray(gen_complete, dtype=bool),
        two,
        opposite,
        leading,
        mll > config.mll_min,
        ~same_flavour | (np.abs(mll - Z_MASS_GEV) > config.z_window),
        ~same_flavour | (reco.met > config.met_min_same_flavour),
        jet_count >= config.min_jets,
        btag_count >= config.min_btags,
    ]
    passed = np.ones(num_events, dtype=bool)
    cut_flow = CutFlow()
    for name, cut in zip(CUT_NAMES, cuts):
        passed &= cut
        cut_flow.counts[name] = int(np.count_nonzero(passed))
    return Selected(passed=passed, leptons=leptons, jets=jets, cut_flow=cut_flow)
