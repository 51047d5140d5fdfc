"""Physics checks of the eta_t stand-in against inclusive ttbar, from the generator record.

Two observables tell the eta_t sample (``generate.SAMPLES["eta_t"]``) from ordinary ttbar:

- the true m(ttbar) of the hard-process tops, which for the bound state peaks just below the
  open-top threshold 2 m_t = 345 GeV, while inclusive ttbar starts at the threshold;
- the azimuthal opening dphi(ll) of the two charged leptons from the W decays. A colour-singlet,
  spin-singlet t tbar pair at threshold gives a smaller mean dphi(ll) than inclusive ttbar.

``spin_cos_phi`` adds the spin observable cos phi, the angle between the l+ direction in the
top rest frame and the l- direction in the anti-top rest frame (both reached through the t tbar
rest frame). Its distribution is (1 - D cos phi) / 2 with D = tr(C) / 3, so <cos phi> = -D / 3:
+1/3 for a spin singlet (D = -1) and 0 without spin correlation.

Only events whose gen objects are complete (``truth.GenObjects.complete``) enter. A few per mille
of events miss a b quark because the top decayed to W s or W d.

Run ``python -m data_prep.validation --events 3000`` to print the numbers for both samples.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np

from data_prep.generate import TOP_MASS_GEV, ParticleBatch, generate_batches, pythia_seed
from data_prep.physics import wrap_phi
from data_prep.truth import GenObjects, find_gen_objects, ttbar_mass

OPEN_TOP_THRESHOLD_GEV = 2.0 * TOP_MASS_GEV


@dataclass
class GenSample:
    """Per-event generator observables of the complete events of one sample, (E,) float64."""

    sample: str
    m_ttbar: np.ndarray  # GeV
    dphi_ll: np.ndarray  # rad, in [0, pi]
    cos_phi: np.ndarray  # spin observable, in [-1, 1]

    @property
    def num_events(self) -> int:
        """Number of complete events E."""
        return int(self.m_ttbar.size)


@dataclass
class SampleSummary:
    """Means and fractions of a ``GenSample`` with their statistical uncertainties."""

    sample: str
    events: int
    median_m_ttbar: float  # GeV
    fraction_below_threshold: float
    fraction_below_threshold_error: float
    mean_dphi_ll: float  # rad
    mean_dphi_ll_error: float
    mean_cos_phi: float
    mean_cos_phi_error: float


def _four_vectors(batch: ParticleBatch, index: np.ndarray) -> np.ndarray:
    """Return (K, 4) rows (px, py, pz, E) of the particles at ``index``."""
    return np.stack([batch.px[index], batch.py[index], batch.pz[index], batch.e[index]], axis=1)


def boost_to_rest_frame(p: np.ndarray, frame: np.ndarray) -> np.ndarray:
    """Boost four-vectors ``p`` (K, 4) into the rest frames of the timelike ``frame`` (K, 4)."""
    beta = frame[:, :3] / frame[:, 3:4]
    beta2 = np.sum(beta * beta, axis=1)
    gamma = 1.0 / np.sqrt(1.0 - beta2)
    beta_p = np.sum(beta * p[:, :3], axis=1)
    # The factor (gamma - 1) / beta^2 is set to 0 at beta = 0, so a frame at rest changes nothing.
    factor = np.where(beta2 > 0, (gamma - 1.0) / np.where(beta2 > 0, beta2, 1.0), 0.0)
    space = p[:, :3] + ((factor * beta_p - gamma * p[:, 3]))[:, None] * beta
    return np.column_stack([space, gamma * (p[:, 3] - beta_p)])


def lepton_dphi(batch: ParticleBatch, gen: GenObjects) -> np.ndarray:
    """Return |dphi| in [0, pi] between l+ and l- of every event; events need both leptons."""
    plus, minus = _four_vectors(batch, gen.lepton_plus), _four_vectors(batch, gen.lepton_minus)
    phi_plus = np.arctan2(plus[:, 1], plus[:, 0])
    phi_minus = np.arctan2(minus[:, 1], minus[:, 0])
    return np.abs(wrap_phi(phi_plus - phi_minus))


def spin_cos_phi(batch: ParticleBatch, gen: GenObjects) -> np.ndarray:
    """Return cos phi between l+ in the top and l- in the anti-top rest frame, per event."""
    top, antitop = _four_vectors(batch, gen.top), _four_vectors(batch, gen.antitop)
    plus, minus = _four_vectors(batch, gen.lepton_plus), _four_vectors(batch, gen.lepton_minus)
    pair = top + antitop
    top, antitop, plus, minus = (boost_to_rest_frame(v, pair) for v in (top, antitop, plus, minus))
    plus = boost_to_rest_frame(plus, top)[:, :3]
    minus = boost_to_rest_frame(minus, antitop)[:, :3]
    norms = np.linalg.norm(plus, axis=1) * np.linalg.norm(minus, axis=1)
    return np.sum(plus * minus, axis=1) / norms


def gen_observables(batch: ParticleBatch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (m_ttbar, dphi_ll, cos_phi) of the complete events of a batch."""
    gen = find_gen_objects(batch)
    complete = np.flatnonzero(gen.complete)
    subset = GenObjects(**{name: getattr(gen, name)[complete]
                           for name in gen.__dataclass_fields__})
    return ttbar_mass(batch, subset), lepton_dphi(batch, subset), spin_cos_phi(batch, subset)


def generate_gen_sample(sample: str, n_events: int, *, seed: int = 1, batch_size: int = 500,
                        hard_process_only: bool = True) -> GenSample:
    """Generate ``n_events`` events of ``sample`` and return the observables of complete ones.

    The Pythia seed is the one of shard 0 of a data set with seed ``seed``, so each sample gets
    its own seed.
    """
    parts = [gen_observables(batch) for batch in generate_batches(
        sample, pythia_seed(seed, sample, 0), n_events, batch_size,
        hard_process_only=hard_process_only)]
    m_ttbar, dphi_ll, cos_phi = (np.concatenate([part[i] for part in parts]) for i in range(3))
    return GenSample(sample=sample, m_ttbar=m_ttbar, dphi_ll=dphi_ll, cos_phi=cos_phi)


def _mean_and_error(values: np.ndarray) -> tuple[float, float]:
    if values.size < 2:
        raise ValueError(f"a mean with an error needs at least 2 events, got {values.size}")
    return float(values.mean()), float(values.std(ddof=1) / np.sqrt(values.size))


def summarize(gen: GenSample) -> SampleSummary:
    """Compute the median m(ttbar), the fraction below threshold and the means, with errors."""
    below = (gen.m_ttbar < OPEN_TOP_THRESHOLD_GEV).astype(np.float64)
    fraction = float(below.mean()) if gen.num_events else float("nan")
    # Binomial error, with the fraction kept off 0 and 1 so a small sample never claims 0 error.
    bounded = min(max(fraction, 1.0 / max(gen.num_events, 1)), 1.0 - 1.0 / max(gen.num_events, 2))
    fraction_error = float(np.sqrt(bounded * (1.0 - bounded) / max(gen.num_events, 1)))
    dphi_mean, dphi_error = _mean_and_error(gen.dphi_ll)
    cos_mean, cos_error = _mean_and_error(gen.cos_phi)
    return SampleSummary(
        sample=gen.sample, events=gen.num_events, median_m_ttbar=float(np.median(gen.m_ttbar)),
        fraction_below_threshold=fraction, fraction_below_threshold_error=fraction_error,
        mean_dphi_ll=dphi_mean, mean_dphi_ll_error=dphi_error,
        mean_cos_phi=cos_mean, mean_cos_phi_error=cos_error,
    )


def peak_position(values: np.ndarray, low: float, high: float, width: float) -> float:
    """Return the centre of the most populated bin of ``width`` between ``low`` and ``high``."""
    counts, edges = np.histogram(values, bins=np.arange(low, high + width / 2, width))
    peak = int(np.argmax(counts))
    return float(0.5 * (edges[peak] + edges[peak + 1]))


def format_summary(summary: SampleSummary) -> str:
    """Return one line with every number of ``summary`` and its error."""
    return (
        f"{summary.sample}: {summary.events} events, median m(ttbar) "
        f"{summary.median_m_ttbar:.1f} GeV, fraction below {OPEN_TOP_THRESHOLD_GEV:.0f} GeV "
        f"{summary.fraction_below_threshold:.3f} +- {summary.fraction_below_threshold_error:.3f}, "
        f"mean dphi(ll) {summary.mean_dphi_ll:.3f} +- {summary.mean_dphi_ll_error:.3f} rad, "
        f"mean cos phi {summary.mean_cos_phi:.3f} +- {summary.mean_cos_phi_error:.3f}"
    )


def main(argv: list[str] | None = None) -> list[SampleSummary]:
    """Generate both samples and print their summaries; return them."""
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.validation",
        description="Compare true m(ttbar), dphi(ll) and the spin observable cos phi of the "
                    "eta_t stand-in with inclusive ttbar at generator level.")
    parser.add_argument("--events", type=int, default=3000, help="events generated per sample")
    parser.add_argument("--seed", type=int, default=1, help="data set seed of the Pythia seeds")
    parser.add_argument("--full-events", action="store_true",
                        help="keep showers, MPI and hadronization (roughly 50 times slower)")
    args = parser.parse_args(argv)
    summaries = []
    for sample in ("eta_t", "ttbar"):
        gen = generate_gen_sample(sample, args.events, seed=args.seed,
                                  hard_process_only=not args.full_events)
        summaries.append(summarize(gen))
        print(format_summary(summaries[-1]))
    return summaries


if __name__ == "__main__":
    main()
