"""Pythia 8 event generation: the settings of every sample, seeds, and batched event records.

All samples share ``COMMON_SETTINGS``: pp at 13 TeV, m_t = 172.5 GeV, both W bosons forced to
e nu_e or mu nu_mu (no tau), with Pythia's defaults for initial- and final-state showers, multiple
parton interactions and hadronization (all on).

Samples:

- ``ttbar``: ``Top:gg2ttbar`` and ``Top:qqbar2ttbar`` at leading order. The process code of each
  event (601 gg -> ttbar, 602 qqbar -> ttbar) is the initial-state label.
- ``eta_t``: the toponium ground state eta_t, a colour-singlet pseudoscalar t tbar bound state
  just below the open-top threshold. Pythia has no eta_t process, and its ``TopThreshold:``
  settings (8.317.2) move only about 6 % of ttbar events below 345 GeV, so the sample uses a
  stand-in with the same quantum numbers: a pseudoscalar Higgs boson (PDG id 36) made by gluon
  fusion (``HiggsBSM:gg2A3``, process code 1042) with mass 343 GeV and width 2.8 GeV, forced
  to decay to t tbar. ``doForceWidth`` keeps the Breit-Wigner at that width instead of the
  width Pythia would compute, and the tops come out off shell, so the true m(ttbar) peaks at
  343 GeV, below 2 m_t. At hard-process level the mean azimuthal opening of the two leptons is
  about 1.60 rad, against 1.84 rad for inclusive ttbar, the direction the spin-singlet state
  predicts (measured with pythia8mc 8.317.2, ``data_prep.validation``).
  NOTE: the difference comes from the threshold kinematics alone. Pythia decays the two tops
  of this process (and of ``Top:gg2ttbar``) without a t tbar spin correlation: the spin
  observable <cos phi> of the lepton directions in the top rest frames comes out 0.00 +- 0.01
  for the stand-in, where a spin singlet gives +1/3.

``hard_process_only=True`` (``HARD_PROCESS_SETTINGS``) switches off showers, multiple
interactions and hadronization for fast physics checks of the hard process and the top and W
decays (about 7,000 events/s on one core, against about 130 with everything on). Beam remnants
and primordial kT still run, so the record keeps Pythia's layout and ``truth`` finds the same
objects.

Events come from ``Pythia.nextBatch``, which returns a batch as awkward arrays in one C++ call;
per-particle Python access costs more than generating the event. The batch interface does not
carry the process code, so it is taken from the incoming partons of the hard process (entries 3
and 4): with only the two ttbar processes on, two gluons mean 601 and a quark pair 602. Each
batch checks this against ``pythia.infoPython().code()`` for its last event.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterator

import awkward as ak
import numpy as np
import pythia8mc

TOP_MASS_GEV = 172.5
SQRT_S_GEV = 13_000.0
ETA_T_MASS_GEV = 343.0
ETA_T_WIDTH_GEV = 2.8

# Process codes of Pythia 8 (see its "Top Processes" and "Higgs Processes" manual pages).
PROCESS_GG_TTBAR = 601
PROCESS_QQBAR_TTBAR = 602
PROCESS_GG_A3 = 1042

# Pythia accepts Random:seed in [0, 900000000]; 0 means "seed from the clock", so it is avoided.
PYTHIA_SEED_MAX = 900_000_000
# Shard indices below this bound map to distinct seeds within one (data set seed, sample).
MAX_SHARDS_PER_SAMPLE = 100_000_000

COMMON_SETTINGS = (
    f"Beams:eCM = {SQRT_S_GEV:.1f}",
    f"6:m0 = {TOP_MASS_GEV}",
    # Both W bosons decay to e nu_e or mu nu_mu; the W branching ratios are renormalized.
    "24:onMode = off",
    "24:onIfAny = 11 13",
    "Print:quiet = on",
    # Showers, multiple parton interactions and hadronization stay at their default (on); they
    # are written out so the manifest records them.
    "PartonLevel:ISR = on",
    "PartonLevel:FSR = on",
    "PartonLevel:MPI = on",
    "HadronLevel:all = on",
)


# Appended after the sample settings, so they override the showers and hadronization of
# COMMON_SETTINGS. PartonLevel:all stays on because with it off the event record stays empty
# and nextBatch returns no particles.
HARD_PROCESS_SETTINGS = (
    "PartonLevel:ISR = off",
    "PartonLevel:FSR = off",
    "PartonLevel:MPI = off",
    "HadronLevel:all = off",
)


@dataclass(frozen=True)
class Sample:
    """One generated sample: its manifest id, Pythia settings and expected process codes."""

    name: str
    sample_id: int  # index in the manifest's sample list and the block's ``sample`` column
    settings: tuple[str, ...]  # Pythia settings on top of COMMON_SETTINGS
    process_codes: tuple[int, ...]


SAMPLES = {
    "ttbar": Sample(
        name="ttbar",
        sample_id=0,
        settings=("Top:gg2ttbar = on", "Top:qqbar2ttbar = on"),
        process_codes=(PROCESS_GG_TTBAR, PROCESS_QQBAR_TTBAR),
    ),
    "eta_t": Sample(
        name="eta_t",
        sample_id=1,
        settings=(
            "Higgs:useBSM = on",
            "HiggsBSM:gg2A3 = on",
            f"36:m0 = {ETA_T_MASS_GEV}",
            f"36:mWidth = {ETA_T_WIDTH_GEV}",
            "36:doForceWidth = on",
            "36:onMode = off",
            "36:onIfMatch = 6 -6",
        ),
        process_codes=(PROCESS_GG_A3,),
    ),
}


def get_sample(name: str) -> Sample:
    """Return the sample called ``name``; raise ValueError listing the valid names."""
    if name not in SAMPLES:
        raise ValueError(f"sample {name!r} is unknown; valid samples: {sorted(SAMPLES)}")
    return SAMPLES[name]


def generator_settings(sample: str) -> list[str]:
    """Return the Pythia settings of ``sample`` without the per-shard seed."""
    return [*COMMON_SETTINGS, *get_sample(sample).settings]


def pythia_settings(sample: str, pythia_seed: int, *,
                    hard_process_only: bool = False) -> list[str]:
    """Return every Pythia setting of ``sample`` with the given seed, in the order applied.

    ``hard_process_only`` appends ``HARD_PROCESS_SETTINGS`` (no showers, MPI or hadronization).
    """
    extra = list(HARD_PROCESS_SETTINGS) if hard_process_only else []
    return [*generator_settings(sample), *extra, "Random:setSeed = on",
            f"Random:seed = {pythia_seed}"]


def pythia_seed(dataset_seed: int, sample: str, shard_index: int) -> int:
    """Derive the Pythia seed of one shard, in [1, 900000000].

    The data set seed is hashed (SHA-256) to a base; sample id and shard index then add distinct
    offsets, so two shards of one data set never share a seed while the shard index stays below
    ``MAX_SHARDS_PER_SAMPLE`` and there are at most 9 samples.
    """
    if not 0 <= shard_index < MAX_SHARDS_PER_SAMPLE:
        raise ValueError(f"shard_index={shard_index} must lie in [0, {MAX_SHARDS_PER_SAMPLE})")
    spec = get_sample(sample)
    digest = hashlib.sha256(f"bumblebee-dist:{int(dataset_seed)}".encode()).digest()
    base = int.from_bytes(digest[:8], "little") % PYTHIA_SEED_MAX
    offset = spec.sample_id * MAX_SHARDS_PER_SAMPLE + shard_index
    return 1 + (base + offset) % PYTHIA_SEED_MAX


@dataclass
class ParticleBatch:
    """Full event records of E events as flat particle columns.

    Event i owns particles ``offsets[i]:offsets[i+1]``. Within an event, position k is Pythia's
    record index k (k = 0 is the system entry), so ``mother1`` and ``mother2`` are positions in
    the same event. Momenta and masses are float64 in GeV.
    """

    offsets: np.ndarray  # (E+1,) int64
    pdg_id: np.ndarray  # (N,) int32
    status: np.ndarray  # (N,) int32
    mother1: np.ndarray  # (N,) int32
    mother2: np.ndarray  # (N,) int32
    px: np.ndarray
    py: np.ndarray
    pz: np.ndarray
    e: np.ndarray
    m: np.ndarray
    charge: np.ndarray  # (N,) float32, in units of e
    process_code: np.ndarray  # (E,) int32

    @property
    def num_events(self) -> int:
        """Number of events E."""
        return int(self.offsets.size - 1)

    def event_index(self) -> np.ndarray:
        """Return the event of every particle, (N,) int64."""
        return np.repeat(np.arange(self.num_events), np.diff(self.offsets))


def make_pythia(sample: str, pythia_seed: int, *,
                hard_process_only: bool = False) -> pythia8mc.Pythia:
    """Create and initialize a Pythia instance for ``sample``; raise RuntimeError on failure."""
    pythia = pythia8mc.Pythia("", False)
    for setting in pythia_settings(sample, pythia_seed, hard_process_only=hard_process_only):
        if not pythia.readString(setting):
            raise RuntimeError(f"Pythia rejected the setting {setting!r} of sample {sample!r}")
    if not pythia.init():
        raise RuntimeError(f"Pythia failed to initialize sample {sample!r} (seed {pythia_seed})")
    return pythia


def generate_batches(sample: str, seed: int, n_events: int, batch_size: int = 100, *,
                     hard_process_only: bool = False) -> Iterator[ParticleBatch]:
    """Generate ``n_events`` events of ``sample`` with Pythia seed ``seed``, in batches.

    Events that Pythia fails to generate are skipped by ``nextBatch`` and replaced, so the batches
    hold ``n_events`` events in all. The same (sample, seed, n_events, batch_size) gives the same
    events. ``hard_process_only`` switches off showers, MPI and hadronization.
    """
    if n_events < 0 or batch_size < 1:
        raise ValueError(f"n_events={n_events} must be >= 0 and batch_size={batch_size} >= 1")
    spec = get_sample(sample)
    pythia = make_pythia(sample, seed, hard_process_only=hard_process_only)
    remaining = n_events
    while remaining > 0:
        records = pythia.nextBatch(min(batch_size, remaining), "skip")
        if len(records) == 0:
            raise RuntimeError(f"Pythia returned no events for sample {sample!r} (seed {seed})")
        batch = _to_particle_batch(records, spec, pythia.particleData)
        _check_last_process_code(batch, pythia.infoPython().code(), sample)
        remaining -= batch.num_events
        yield batch


def _to_particle_batch(records: ak.Array, spec: Sample,
                       particle_data: pythia8mc.ParticleData) -> ParticleBatch:
    particles = records.prt
    counts = ak.to_numpy(ak.num(particles)).astype(np.int64)
    offsets = np.zeros(counts.size + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])

    def column(array: ak.Array, dtype: type) -> np.ndarray:
        return np.ascontiguousarray(ak.to_numpy(ak.flatten(array)), dtype=dtype)

    momentum = particles.p
    pdg_id = column(particles.id, np.int32)
    batch = ParticleBatch(
        offsets=offsets,
        pdg_id=pdg_id,
        status=column(particles.status, np.int32),
        mother1=column(particles.mother1, np.int32),
        mother2=column(particles.mother2, np.int32),
        px=column(momentum.px, np.float64),
        py=column(momentum.py, np.float64),
        pz=column(momentum.pz, np.float64),
        e=column(momentum.e, np.float64),
        m=column(particles.m, np.float64),
        charge=_charges(pdg_id, particle_data),
        process_code=np.zeros(counts.size, dtype=np.int32),
    )
    batch.process_code[:] = _process_codes(batch, spec)
    return batch


def _charges(pdg_id: np.ndarray, particle_data: pythia8mc.ParticleData) -> np.ndarray:
    # A batch holds a few hundred distinct ids, so one Pythia lookup per distinct id is cheap.
    unique, inverse = np.unique(pdg_id, return_inverse=True)
    charges = np.array([particle_data.charge(int(pdg)) for pdg in unique], dtype=np.float32)
    return charges[inverse]


def _process_codes(batch: ParticleBatch, spec: Sample) -> np.ndarray:
    if len(spec.process_codes) == 1:
        return np.full(batch.num_events, spec.process_codes[0], dtype=np.int32)
    # Entries 3 and 4 are the incoming partons of the hard process.
    first = batch.pdg_id[batch.offsets[:-1] + 3]
    second = batch.pdg_id[batch.offsets[:-1] + 4]
    gluons = (first == 21) & (second == 21)
    return np.where(gluons, PROCESS_GG_TTBAR, PROCESS_QQBAR_TTBAR).astype(np.int32)


def _check_last_process_code(batch: ParticleBatch, code: int, sample: str) -> None:
    derived = int(batch.process_code[-1])
    if derived != code:
        raise RuntimeError(
            f"sample {sample!r}: process code {derived} derived from the incoming partons "
            f"differs from Pythia's {code}; the sample's processes no longer match the rule "
            "in data_prep.generate._process_codes"
        )
