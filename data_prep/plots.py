"""Validation plots of a written data set: the samples overlaid, each normalized to unit area.

Every plot is one PNG file in the output folder, named after the quantity:

| file | quantity, per object or per event |
|---|---|
| ``lepton_{pt,eta,phi}.png`` | reco leptons (e and mu, both charges) |
| ``jet_{pt,eta,phi}.png`` | every reco jet, b-tagged or not |
| ``bjet_{pt,eta,phi}.png`` | b-tagged reco jets |
| ``met_{pt,phi}.png`` | missing transverse momentum |
| ``jet_multiplicity.png`` | reco jets per event |
| ``m_ttbar_true.png`` | true m(ttbar) of the hard-process tops (block column ``m_ttbar_true``) |
| ``gen_dphi_ll.png`` | abs(dphi) between the gen l+ and l- from the W decays |

Values outside a plot's range are counted in its first or last bin, so each histogram contains
every entry. A sample with no entry for a quantity is left out of that plot.

Run ``python -m data_prep.plots --data DIR --out DIR``; ``--tracking-uri`` also logs the PNG files
as artifacts of an MLflow run.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from matplotlib.figure import Figure

from bumblebee_dist.data.block import EventBlock, concat_blocks
from bumblebee_dist.data.shards import read_manifest, read_shards
from bumblebee_dist.tokens import ETA, LEVEL_GEN, LEVEL_RECO, PDG_B, PDG_JET, PDG_MET, PHI, PT

logger = logging.getLogger("data_prep.plots")

ARTIFACT_PATH = "validation_plots"
DEFAULT_EXPERIMENT = "data-validation"
_CHARGED_LEPTONS = (11, 13)


@dataclass(frozen=True)
class PlotSpec:
    """One histogram: file stem, x-axis label, bin edges and the values it shows."""

    name: str
    xlabel: str
    edges: np.ndarray
    values: Callable[[EventBlock], np.ndarray]


def _token_event(block: EventBlock) -> np.ndarray:
    return np.repeat(np.arange(block.num_events), block.lengths())


def _reco_leptons(block: EventBlock) -> np.ndarray:
    return (block.level == LEVEL_RECO) & np.isin(np.abs(block.pdg_id), _CHARGED_LEPTONS)


def _reco_jets(block: EventBlock) -> np.ndarray:
    return (block.level == LEVEL_RECO) & np.isin(block.pdg_id, (PDG_B, PDG_JET))


def _reco_bjets(block: EventBlock) -> np.ndarray:
    return (block.level == LEVEL_RECO) & (block.pdg_id == PDG_B)


def _met(block: EventBlock) -> np.ndarray:
    return (block.level == LEVEL_RECO) & (block.pdg_id == PDG_MET)


def jet_multiplicity(block: EventBlock) -> np.ndarray:
    """Return the number of reco jets of every event, (E,) int64."""
    return np.bincount(_token_event(block)[_reco_jets(block)], minlength=block.num_events)


def gen_lepton_dphi(block: EventBlock) -> np.ndarray:
    """Return abs(dphi) in [0, pi] between gen l+ and l- of events that have exactly one each."""
    event = _token_event(block)
    gen_lepton = (block.level == LEVEL_GEN) & np.isin(np.abs(block.pdg_id), _CHARGED_LEPTONS)
    phis = []
    counts = []
    # l+ carries a negative PDG id (e+ is -11), l- a positive one.
    for sign in (-1, 1):
        chosen = gen_lepton & (np.sign(block.pdg_id) == sign)
        counts.append(np.bincount(event[chosen], minlength=block.num_events))
        phis.append(np.bincount(event[chosen], weights=block.features[chosen, PHI],
                                minlength=block.num_events))
    both = (counts[0] == 1) & (counts[1] == 1)
    dphi = np.mod(phis[0][both] - phis[1][both] + np.pi, 2.0 * np.pi) - np.pi
    return np.abs(dphi)


def _feature(select: Callable[[EventBlock], np.ndarray],
             column: int) -> Callable[[EventBlock], np.ndarray]:
    return lambda block: block.features[select(block), column]


def _kinematic_specs(stem: str, label: str, select: Callable[[EventBlock], np.ndarray],
                     pt_max: float) -> list[PlotSpec]:
    return [
        PlotSpec(f"{stem}_pt", f"{label} $p_T$ [GeV]", np.linspace(0.0, pt_max, 41),
                 _feature(select, PT)),
        PlotSpec(f"{stem}_eta", f"{label} $\\eta$", np.linspace(-2.5, 2.5, 26),
                 _feature(select, ETA)),
        PlotSpec(f"{stem}_phi", f"{label} $\\phi$ [rad]", np.linspace(-np.pi, np.pi, 25),
                 _feature(select, PHI)),
    ]


PLOTS: tuple[PlotSpec, ...] = (
    *_kinematic_specs("lepton", "reco lepton", _reco_leptons, 300.0),
    *_kinematic_specs("jet", "reco jet", _reco_jets, 400.0),
    *_kinematic_specs("bjet", "b-tagged jet", _reco_bjets, 400.0),
    PlotSpec("met_pt", "missing $p_T$ [GeV]", np.linspace(0.0, 300.0, 31),
             _feature(_met, PT)),
    PlotSpec("met_phi", "missing $p_T$ $\\phi$ [rad]", np.linspace(-np.pi, np.pi, 25),
             _feature(_met, PHI)),
    PlotSpec("jet_multiplicity", "reco jets per event", np.arange(-0.5, 13.0, 1.0),
             jet_multiplicity),
    PlotSpec("m_ttbar_true", "true $m(t\\bar{t})$ [GeV]", np.linspace(300.0, 1000.0, 71),
             lambda block: block.m_ttbar_true),
    PlotSpec("gen_dphi_ll", "gen $|\\Delta\\phi(\\ell^+, \\ell^-)|$ [rad]",
             np.linspace(0.0, np.pi, 21), gen_lepton_dphi),
)


def load_samples(data_dir: str | Path, split: str | None = None) -> dict[str, EventBlock]:
    """Read every shard of a data set (or of one split) into one block per sample name.

    Shards are read strictly with their SHA-256 checked, so a corrupt shard raises ShardError.
    Samples of the manifest without events are left out.
    """
    manifest = read_manifest(data_dir)
    entries = manifest.shards if split is None else manifest.shards_of(split)
    blocks = read_shards(manifest, entries).blocks
    if not blocks:
        raise ValueError(f"data set {manifest.path} lists no shard for split {split or 'any'}; "
                         "pass another --split or a complete data set")
    events = concat_blocks(blocks)
    samples = {}
    for sample in manifest.samples:
        chosen = np.flatnonzero(events.sample == sample["id"])
        if chosen.size:
            samples[sample["name"]] = events.take_events(chosen)
    return samples


def draw_plot(spec: PlotSpec, samples: dict[str, EventBlock], path: Path) -> bool:
    """Draw one overlay of the normalized sample histograms to ``path``.

    Returns False, writing nothing, when no sample has an entry for this quantity.
    """
    figure = Figure(figsize=(5.0, 4.0), layout="constrained")
    axes = figure.subplots()
    drawn = 0
    for name, block in samples.items():
        values = np.asarray(spec.values(block), dtype=np.float64)
        values = values[np.isfinite(values)]
        if values.size == 0:
            continue
        # Clip into the outermost bins, so overflow and underflow stay visible.
        clipped = np.clip(values, spec.edges[0], np.nextafter(spec.edges[-1], -np.inf))
        axes.hist(clipped, bins=spec.edges, density=True, histtype="step", linewidth=1.5,
                  label=f"{name} ({values.size})")
        drawn += 1
    if drawn == 0:
        return False
    axes.set_xlabel(spec.xlabel)
    axes.set_ylabel("normalized entries")
    axes.legend(frameon=False)
    figure.savefig(path, dpi=100)
    return True


def make_plots(samples: dict[str, EventBlock], out_dir: str | Path) -> list[Path]:
    """Draw every plot of ``PLOTS`` into ``out_dir``; return the paths of the written files."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for spec in PLOTS:
        path = out / f"{spec.name}.png"
        if draw_plot(spec, samples, path):
            written.append(path)
        else:
            logger.warning("plot %s skipped: no sample has an entry", spec.name)
    return written


def log_to_mlflow(paths: list[Path], tracking_uri: str, *, experiment: str = DEFAULT_EXPERIMENT,
                  params: dict[str, str] | None = None) -> str:
    """Log the plot files as artifacts (under ``validation_plots``) of a new MLflow run.

    Returns the run id. MLflow's usage telemetry is switched off unless the user set
    ``MLFLOW_DISABLE_TELEMETRY``.
    """
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name="data-validation-plots") as run:
        if params:
            mlflow.log_params(params)
        for path in paths:
            mlflow.log_artifact(str(path), artifact_path=ARTIFACT_PATH)
    return run.info.run_id


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line of the plot command."""
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.plots",
        description="Draw validation plots of a data set: reco leptons, jets, b-tagged jets, "
                    "missing pT, jet multiplicity, true m(ttbar) and gen dphi(ll), with the "
                    "samples overlaid and normalized.")
    parser.add_argument("--data", required=True, help="data set folder with manifest.json")
    parser.add_argument("--out", required=True, help="folder for the PNG files")
    parser.add_argument("--split", choices=("train", "val", "test"), default=None,
                        help="plot one split only (default: every shard)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI, e.g. sqlite:///mlflow.db; default: no logging")
    parser.add_argument("--experiment", default=DEFAULT_EXPERIMENT,
                        help="MLflow experiment name, used with --tracking-uri")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[Path]:
    """Draw the plots from the command line; return the written files."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    samples = load_samples(args.data, args.split)
    paths = make_plots(samples, args.out)
    logger.info("%d plots of samples %s written to %s", len(paths), sorted(samples), args.out)
    if args.tracking_uri:
        run_id = log_to_mlflow(paths, args.tracking_uri, experiment=args.experiment,
                               params={"data": str(args.data), "split": args.split or "all"})
        logger.info("plots logged to MLflow run %s at %s", run_id, args.tracking_uri)
    return paths


if __name__ == "__main__":
    main()
