"""Parametric detector: efficiencies, resolutions, isolation, jets, b-tagging and missing momentum.

The numbers follow the public Delphes card ``cards/delphes_card_CMS.tcl`` (Delphes 3), module by
module. pT and E in GeV; resolutions are one standard deviation.

| stage | numbers from the card |
|---|---|
| tracking efficiency, charged hadrons | 0 for pT <= 0.1 or abs(eta) > 2.5; abs(eta) <= 1.5: 0.70 (pT <= 1), 0.95; 1.5 < abs(eta) <= 2.5: 0.60, 0.85 |
| tracking efficiency, electrons | abs(eta) <= 1.5: 0.73 (pT <= 1), 0.95 (pT <= 100), 0.99; up to 2.5: 0.50, 0.83, 0.90 |
| tracking efficiency, muons | abs(eta) <= 1.5: 0.75 (pT <= 1), 0.99; up to 2.5: 0.70, 0.98 |
| track pT resolution (relative) | sqrt(a^2 + (b pT)^2) with (a, b) per abs(eta) bin 0-0.5, 0.5-1.5, 1.5-2.5: hadrons (0.01, 1.5e-4), (0.015, 2.5e-4), (0.025, 5.5e-4); electrons (0.03, 1.3e-3), (0.05, 1.7e-3), (0.15, 3.1e-3); muons (0.01, 1.0e-4), (0.015, 1.5e-4), (0.025, 3.5e-4) |
| ECAL energy resolution | abs(eta) <= 1.5: (1 + 0.64 eta^2) S; 1.5-2.5: (2.16 + 5.6 (abs(eta) - 2)^2) S with S = sqrt((0.008 E)^2 + 0.11^2 E + 0.40^2); 2.5-5: sqrt((0.107 E)^2 + 2.08^2 E); threshold 0.5 |
| HCAL energy resolution | abs(eta) <= 3: sqrt((0.050 E)^2 + 1.50^2 E); 3-5: sqrt((0.130 E)^2 + 2.70^2 E); threshold 1.0 |
| electron efficiency | 0 for pT <= 10; 0.95 for abs(eta) <= 1.5, 0.85 up to 2.5, 0 beyond |
| muon efficiency | 0 for pT <= 10; 0.95 up to abs(eta) 2.4 (times exp(0.5 - 5e-4 pT) above 1 TeV), 0 beyond |
| isolation | cone 0.5, particles with pT > 0.5; sum pT / lepton pT below 0.12 (e), 0.25 (mu) |
| jets | anti-kt from the energy-flow objects, pT > 20 before the scale factor sqrt((2.5 - 0.15 abs(eta))^2 / pT + 1) |
| b-tagging | b: 0.85 tanh(0.0025 pT) 25 / (1 + 0.063 pT); c: 0.25 tanh(0.018 pT) / (1 + 0.0013 pT); light: 0.01 + 3.8e-5 pT |
| missing momentum | minus the vector sum of all energy-flow objects |

Differences from the card, each a simplification of this parametric model:

- Energy flow is built per particle, not from calorimeter towers. A tracked charged particle
  enters as its smeared track. Photons and untracked electrons enter as ECAL deposits, neutral
  hadrons and untracked charged hadrons as HCAL deposits. Each deposit is smeared with the
  card's tower resolution and cut at the tower threshold. Tower granularity, the energy-significance cut and
  the split of K0_S and Lambda deposits are not modelled (Pythia decays K0_S and Lambda anyway).
  An untracked muon is lost.
- Jets use R = 0.4 (the card uses 0.5) and are clustered without the isolated leptons, which is
  how the card's unique-object step keeps a lepton from being counted twice.
- A jet's flavour comes from matching hadrons, not partons: b if a b hadron with pT > 1 and
  abs(eta) < 2.5 lies within dR < 0.4 of the jet axis, else c for a c hadron, else light. Jets
  with abs(eta) > 2.5 are never tagged (no tracker there).
- Smearing draws a log-normal with the given mean and width, as the card's modules do, so a
  smeared energy is never negative.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data_prep.generate import ParticleBatch
from data_prep.jets import JET_RADIUS, FourVectors, cluster_jets
from data_prep.physics import delta_r, finite_mask, to_pt_eta_phi_m, to_px_py_pz_e, wrap_phi

ELECTRON_MASS_GEV = 0.000511
MUON_MASS_GEV = 0.10566

KIND_TRACK, KIND_ELECTRON, KIND_MUON, KIND_ECAL, KIND_HCAL = range(5)
FLAVOUR_LIGHT, FLAVOUR_C, FLAVOUR_B = 0, 4, 5


@dataclass
class DetectorConfig:
    """Switches and cuts of the parametric detector; the card's numbers are in the functions."""

    smear: bool = True  # apply resolutions; False keeps generator momenta (tests)
    efficiencies: bool = True  # draw efficiencies; False accepts everything inside acceptance
    jet_radius: float = JET_RADIUS
    jet_pt_min: float = 20.0  # GeV, before the jet energy scale factor
    isolation_cone: float = 0.5
    isolation_pt_min: float = 0.5  # GeV, particles counted in the isolation sum
    electron_isolation_max: float = 0.12
    muon_isolation_max: float = 0.25
    btag_match_cone: float = 0.4
    btag_hadron_pt_min: float = 1.0  # GeV
    btag_eta_max: float = 2.5


@dataclass
class Objects:
    """Reconstructed objects of several events as flat (K,) columns, sorted by event."""

    event: np.ndarray  # int64
    pdg_id: np.ndarray  # int32: signed lepton id, 5 b-tagged jet, 41 other jet
    pt: np.ndarray
    eta: np.ndarray
    phi: np.ndarray
    m: np.ndarray
    btag: np.ndarray  # float64 0 or 1

    def take(self, mask: np.ndarray) -> "Objects":
        """Return the objects where ``mask`` (or an index array) selects."""
        return Objects(*(getattr(self, name)[mask] for name in _OBJECT_FIELDS))


_OBJECT_FIELDS = ("event", "pdg_id", "pt", "eta", "phi", "m", "btag")


@dataclass
class RecoEvents:
    """Detector output of a batch: leptons, jets and the missing transverse momentum."""

    leptons: Objects
    jets: Objects
    met: np.ndarray  # (E,) GeV
    met_phi: np.ndarray  # (E,) rad in [-pi, pi)
    dropped_nonfinite: int  # final-state particles dropped for a NaN or infinite component


@dataclass
class EnergyFlow:
    """Smeared visible particles: one entry per track or calorimeter deposit."""

    event: np.ndarray
    kind: np.ndarray  # KIND_*
    pdg_id: np.ndarray
    charge: np.ndarray
    px: np.ndarray
    py: np.ndarray
    pz: np.ndarray
    e: np.ndarray
    pt: np.ndarray
    eta: np.ndarray
    phi: np.ndarray


def _binned(abs_eta: np.ndarray, edges: tuple[float, ...], values: list[np.ndarray]) -> np.ndarray:
    """Pick values[i] where edges[i] < abs_eta <= edges[i+1] (first bin includes 0); else 0."""
    result = np.zeros_like(abs_eta)
    for low, high, value in zip(edges[:-1], edges[1:], values):
        inside = (abs_eta <= high) & ((abs_eta > low) | (low == 0.0))
        result = np.where(inside, value, result)
    return result


def tracking_efficiency(kind: np.ndarray, pt: np.ndarray, eta: np.ndarray) -> np.ndarray:
    """Return the card's tracking efficiency of charged hadrons, electrons and muons."""
    abs_eta = np.abs(eta)
    soft = (pt > 0.1) & (pt <= 1.0)
    hadron = _binned(abs_eta, (0.0, 1.5, 2.5),
                     [np.where(soft, 0.70, 0.95), np.where(soft, 0.60, 0.85)])
    electron = _binned(abs_eta, (0.0, 1.5, 2.5), [
        np.where(soft, 0.73, np.where(pt <= 100.0, 0.95, 0.99)),
        np.where(soft, 0.50, np.where(pt <= 100.0, 0.83, 0.90)),
    ])
    muon = _binned(abs_eta, (0.0, 1.5, 2.5),
                   [np.where(soft, 0.75, 0.99), np.where(soft, 0.70, 0.98)])
    efficiency = np.select([kind == KIND_ELECTRON, kind == KIND_MUON], [electron, muon], hadron)
    return np.where(pt > 0.1, efficiency, 0.0)


_TRACK_RESOLUTION = {  # (a, b) per abs(eta) bin 0-0.5, 0.5-1.5, 1.5-2.5
    KIND_TRACK: ((0.01, 1.5e-4), (0.015, 2.5e-4), (0.025, 5.5e-4)),
    KIND_ELECTRON: ((0.03, 1.3e-3), (0.05, 1.7e-3), (0.15, 3.1e-3)),
    KIND_MUON: ((0.01, 1.0e-4), (0.015, 1.5e-4), (0.025, 3.5e-4)),
}


def track_resolution(kind: np.ndarray, pt: np.ndarray, eta: np.ndarray) -> np.ndarray:
    """Return the relative track pT resolution sigma(pT)/pT of the card."""
    result = np.zeros_like(pt)
    for track_kind, bins in _TRACK_RESOLUTION.items():
        per_bin = [np.sqrt(a * a + (b * pt) ** 2) for a, b in bins]
        values = _binned(np.abs(eta), (0.0, 0.5, 1.5, 2.5), per_bin)
        result = np.where(kind == track_kind, values, result)
    return result


def ecal_resolution(e: np.ndarray, eta: np.ndarray) -> np.ndarray:
    """Return the card's ECAL energy resolution sigma(E) in GeV."""
    abs_eta = np.abs(eta)
    core = np.sqrt((0.008 * e) ** 2 + 0.11**2 * e + 0.40**2)
    return _binned(abs_eta, (0.0, 1.5, 2.5, 5.0), [
        (1.0 + 0.64 * eta**2) * core,
        (2.16 + 5.6 * (abs_eta - 2.0) ** 2) * core,
        np.sqrt((0.107 * e) ** 2 + 2.08**2 * e),
    ])


def hcal_resolution(e: np.ndarray, eta: np.ndarray) -> np.ndarray:
    """Return the card's HCAL energy resolution sigma(E) in GeV."""
    return _binned(np.abs(eta), (0.0, 3.0, 5.0), [
        np.sqrt((0.050 * e) ** 2 + 1.50**2 * e),
        np.sqrt((0.130 * e) ** 2 + 2.70**2 * e),
    ])


def log_normal(mean: np.ndarray, sigma: np.ndarray, normal: np.ndarray) -> np.ndarray:
    """Map standard normal draws to log-normal values with the given mean and width."""
    mean = np.asarray(mean, dtype=np.float64)
    relative = np.where(mean > 0, sigma / np.where(mean > 0, mean, 1.0), 0.0)
    s2 = np.log1p(relative**2)
    return np.where(mean > 0, mean * np.exp(np.sqrt(s2) * normal - 0.5 * s2), 0.0)


def electron_efficiency(pt: np.ndarray, eta: np.ndarray) -> np.ndarray:
    """Return the card's electron identification efficiency."""
    value = _binned(np.abs(eta), (0.0, 1.5, 2.5), [np.full_like(pt, 0.95), np.full_like(pt, 0.85)])
    return np.where(pt > 10.0, value, 0.0)


def muon_efficiency(pt: np.ndarray, eta: np.ndarray) -> np.ndarray:
    """Return the card's muon identification efficiency."""
    value = np.where(pt <= 1.0e3, 0.95, 0.95 * np.exp(0.5 - pt * 5.0e-4))
    return np.where((pt > 10.0) & (np.abs(eta) <= 2.4), value, 0.0)


def btag_efficiency(flavour: np.ndarray, pt: np.ndarray) -> np.ndarray:
    """Return the card's b-tagging probability for b, c and light jets."""
    b = 0.85 * np.tanh(0.0025 * pt) * (25.0 / (1.0 + 0.063 * pt))
    c = 0.25 * np.tanh(0.018 * pt) * (1.0 / (1.0 + 0.0013 * pt))
    light = 0.01 + 0.000038 * pt
    return np.select([flavour == FLAVOUR_B, flavour == FLAVOUR_C], [b, c], light)


def jet_energy_scale(pt: np.ndarray, eta: np.ndarray) -> np.ndarray:
    """Return the card's jet energy scale factor sqrt((2.5 - 0.15 abs(eta))^2 / pT + 1)."""
    return np.sqrt((2.5 - 0.15 * np.abs(eta)) ** 2 / pt + 1.0)


def build_energy_flow(batch: ParticleBatch, rng: np.random.Generator,
                      config: DetectorConfig) -> tuple[EnergyFlow, int]:
    """Turn the visible final-state particles into smeared tracks and calorimeter deposits.

    Returns the energy flow and the number of final-state particles dropped because a momentum
    component was NaN or infinite.
    """
    final = batch.status > 0
    finite = finite_mask(batch.px, batch.py, batch.pz, batch.e)
    dropped = int(np.count_nonzero(final & ~finite))
    abs_id = np.abs(batch.pdg_id)
    visible = final & finite & ~np.isin(abs_id, (12, 14, 16))
    index = np.flatnonzero(visible)
    abs_id = abs_id[index]
    kin = to_pt_eta_phi_m(batch.px[index], batch.py[index], batch.pz[index], batch.e[index])
    abs_eta = np.abs(kin.eta)
    track_kind = np.select([abs_id == 11, abs_id == 13], [KIND_ELECTRON, KIND_MUON], KIND_TRACK)
    charged = batch.charge[index] != 0
    efficiency = tracking_efficiency(track_kind, kin.pt, kin.eta)
    uniform = rng.random(index.size)
    normal = rng.standard_normal(index.size)
    accept = uniform < efficiency if config.efficiencies else efficiency > 0
    tracked = charged & accept
    calorimeter = ~tracked & (abs_eta <= 5.0) & (abs_id != 13)
    ecal = calorimeter & ((abs_id == 22) | (abs_id == 11))
    hcal = calorimeter & ~ecal
    kind = np.select([tracked, ecal], [track_kind, KIND_ECAL], KIND_HCAL)

    energy = batch.e[index]
    if config.smear:
        pt_track = log_normal(kin.pt, track_resolution(kind, kin.pt, kin.eta) * kin.pt, normal)
        sigma_calo = np.where(ecal, ecal_resolution(energy, kin.eta),
                              hcal_resolution(energy, kin.eta))
        energy_calo = log_normal(energy, sigma_calo, normal)
    else:
        pt_track, energy_calo = kin.pt, energy
    above_threshold = np.where(ecal, energy_calo > 0.5, energy_calo > 1.0)
    keep = tracked | (calorimeter & above_threshold)

    # Tracks keep their mass and direction with the smeared pT; deposits are massless.
    track_px, track_py, track_pz, track_e = to_px_py_pz_e(pt_track, kin.eta, kin.phi,
                                                         np.maximum(kin.m, 0.0))
    calo_pt = energy_calo / np.cosh(kin.eta)
    calo_px, calo_py, calo_pz, calo_e = to_px_py_pz_e(calo_pt, kin.eta, kin.phi, 0.0)
    pt = np.where(tracked, pt_track, calo_pt)
    flow = EnergyFlow(
        event=batch.event_index()[index],
        kind=kind.astype(np.int8),
        pdg_id=batch.pdg_id[index],
        charge=batch.charge[index],
        px=np.where(tracked, track_px, calo_px),
        py=np.where(tracked, track_py, calo_py),
        pz=np.where(tracked, track_pz, calo_pz),
        e=np.where(tracked, track_e, calo_e),
        pt=pt,
        eta=kin.eta,
        phi=kin.phi,
    )
    return _take_flow(flow, keep), dropped


def _take_flow(flow: EnergyFlow, mask: np.ndarray) -> EnergyFlow:
    return EnergyFlow(**{name: getattr(flow, name)[mask] for name in flow.__dataclass_fields__})


def _event_starts(event: np.ndarray, num_events: int) -> np.ndarray:
    """Return (E+1,) offsets of each event in a column sorted by event."""
    return np.searchsorted(event, np.arange(num_events + 1))


def isolation_ratio(flow: EnergyFlow, candidates: np.ndarray, num_events: int,
                    config: DetectorConfig) -> np.ndarray:
    """Return sum pT of other energy-flow objects in the cone / candidate pT, per candidate."""
    starts = _event_starts(flow.event, num_events)
    ratio = np.zeros(candidates.size)
    for position, candidate in enumerate(candidates):
        event = flow.event[candidate]
        begin, end = starts[event], starts[event + 1]
        distance = delta_r(flow.eta[candidate], flow.phi[candidate],
                           flow.eta[begin:end], flow.phi[begin:end])
        counted = (distance < config.isolation_cone) & (flow.pt[begin:end] > config.isolation_pt_min)
        counted[candidate - begin] = False
        ratio[position] = flow.pt[begin:end][counted].sum() / flow.pt[candidate]
    return ratio


def reconstruct_leptons(flow: EnergyFlow, num_events: int, rng: np.random.Generator,
                        config: DetectorConfig) -> tuple[Objects, np.ndarray]:
    """Apply lepton efficiencies and isolation; return the leptons and their flow indices."""
    candidates = np.flatnonzero((flow.kind == KIND_ELECTRON) | (flow.kind == KIND_MUON))
    electron = flow.kind[candidates] == KIND_ELECTRON
    pt, eta = flow.pt[candidates], flow.eta[candidates]
    efficiency = np.where(electron, electron_efficiency(pt, eta), muon_efficiency(pt, eta))
    uniform = rng.random(candidates.size)
    accept = uniform < efficiency if config.efficiencies else efficiency > 0
    candidates, electron = candidates[accept], electron[accept]
    ratio = isolation_ratio(flow, candidates, num_events, config)
    limit = np.where(electron, config.electron_isolation_max, config.muon_isolation_max)
    isolated = candidates[ratio < limit]
    electron = flow.kind[isolated] == KIND_ELECTRON
    leptons = Objects(
        event=flow.event[isolated].astype(np.int64),
        pdg_id=flow.pdg_id[isolated].astype(np.int32),
        pt=flow.pt[isolated],
        eta=flow.eta[isolated],
        phi=flow.phi[isolated],
        m=np.where(electron, ELECTRON_MASS_GEV, MUON_MASS_GEV),
        btag=np.zeros(isolated.size),
    )
    return leptons, isolated


def heavy_flavour_hadrons(pdg_id: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (is_b, is_c) masks of hadrons holding a b quark, or a c quark and no b."""
    code = np.abs(pdg_id.astype(np.int64))
    # Hadron codes below 10000: digits q1 q2 q3 J; mesons have q1 = 0, diquarks q3 = 0.
    hadron = (code > 100) & (code < 10_000) & ((code // 10) % 10 != 0)
    quarks = [(code // 1000) % 10, (code // 100) % 10, (code // 10) % 10]
    has_b = hadron & np.logical_or.reduce([q == 5 for q in quarks])
    has_c = hadron & ~has_b & np.logical_or.reduce([q == 4 for q in quarks])
    return has_b, has_c


def jet_flavours(jets: Objects, batch: ParticleBatch, num_events: int,
                 config: DetectorConfig) -> np.ndarray:
    """Return each jet's flavour (5, 4 or 0) by matching b and c hadrons of the record."""
    is_b, is_c = heavy_flavour_hadrons(batch.pdg_id)
    finite = finite_mask(batch.px, batch.py, batch.pz, batch.e)
    index = np.flatnonzero((is_b | is_c) & finite)
    kin = to_pt_eta_phi_m(batch.px[index], batch.py[index], batch.pz[index], batch.e[index])
    usable = (kin.pt > config.btag_hadron_pt_min) & (np.abs(kin.eta) < config.btag_eta_max)
    hadron_event = batch.event_index()[index][usable]
    hadron_b = is_b[index][usable]
    eta, phi = kin.eta[usable], kin.phi[usable]
    hadron_starts = _event_starts(hadron_event, num_events)
    flavour = np.full(jets.event.size, FLAVOUR_LIGHT, dtype=np.int32)
    for jet in range(jets.event.size):
        begin, end = hadron_starts[jets.event[jet]], hadron_starts[jets.event[jet] + 1]
        if begin == end:
            continue
        near = delta_r(jets.eta[jet], jets.phi[jet], eta[begin:end],
                       phi[begin:end]) < config.btag_match_cone
        if np.any(near & hadron_b[begin:end]):
            flavour[jet] = FLAVOUR_B
        elif np.any(near):
            flavour[jet] = FLAVOUR_C
    return flavour


def reconstruct_jets(flow: EnergyFlow, isolated: np.ndarray, batch: ParticleBatch,
                     rng: np.random.Generator, config: DetectorConfig) -> tuple[Objects, int]:
    """Cluster the energy flow without isolated leptons, calibrate and b-tag the jets.

    Returns the jets and the number of jets dropped as spacelike, which is not expected from a
    sum of physical four-vectors but is counted rather than hidden.
    """
    inputs = np.ones(flow.event.size, dtype=bool)
    inputs[isolated] = False
    particles = FourVectors(flow.event[inputs], flow.px[inputs], flow.py[inputs],
                            flow.pz[inputs], flow.e[inputs])
    raw = cluster_jets(particles, batch.num_events, radius=config.jet_radius,
                       min_pt=config.jet_pt_min)
    kin = to_pt_eta_phi_m(raw.px, raw.py, raw.pz, raw.e)
    good = ~kin.spacelike
    scale = jet_energy_scale(kin.pt, kin.eta)
    jets = Objects(event=raw.event, pdg_id=np.zeros(raw.event.size, dtype=np.int32),
                   pt=kin.pt * scale, eta=kin.eta, phi=kin.phi, m=kin.m * scale,
                   btag=np.zeros(raw.event.size)).take(good)
    flavour = jet_flavours(jets, batch, batch.num_events, config)
    efficiency = np.where(np.abs(jets.eta) <= config.btag_eta_max,
                          btag_efficiency(flavour, jets.pt), 0.0)
    uniform = rng.random(jets.event.size)
    if config.efficiencies:
        tagged = uniform < efficiency
    else:
        tagged = (flavour == FLAVOUR_B) & (np.abs(jets.eta) <= config.btag_eta_max)
    jets.btag = tagged.astype(np.float64)
    jets.pdg_id = np.where(tagged, 5, 41).astype(np.int32)
    return jets, int(np.count_nonzero(~good))


def missing_momentum(flow: EnergyFlow, num_events: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (MET, phi) per event: minus the vector pT sum of every energy-flow object."""
    missing_px = -np.bincount(flow.event, weights=flow.px, minlength=num_events)
    missing_py = -np.bincount(flow.event, weights=flow.py, minlength=num_events)
    return np.hypot(missing_px, missing_py), wrap_phi(np.arctan2(missing_py, missing_px))


def simulate(batch: ParticleBatch, rng: np.random.Generator,
             config: DetectorConfig | None = None) -> RecoEvents:
    """Run the whole parametric detector on a batch of generator records."""
    config = config or DetectorConfig()
    flow, dropped = build_energy_flow(batch, rng, config)
    leptons, isolated = reconstruct_leptons(flow, batch.num_events, rng, config)
    jets, _ = reconstruct_jets(flow, isolated, batch, rng, config)
    met, met_phi = missing_momentum(flow, batch.num_events)
    return RecoEvents(leptons=leptons, jets=jets, met=met, met_phi=met_phi,
                      dropped_nonfinite=dropped)
