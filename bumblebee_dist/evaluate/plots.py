"""Evaluation plots: ROC curves, classifier score distributions and residual histograms."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot loads)
import numpy as np  # noqa: E402

from bumblebee_dist.evaluate.metrics import roc_points  # noqa: E402

# Axis label of each residual that ``reconstruction.reconstruction_residuals`` returns.
RESIDUAL_LABELS = {
    "mttbar_relative": "m(ttbar): predicted / true - 1",
    "nu_pt_relative": "neutrino pT: predicted / true - 1",
    "nu_eta_difference": "neutrino eta: predicted - true",
    "nu_phi_difference": "neutrino phi: predicted - true, wrapped [rad]",
}
SCORE_LABEL = "class-token regression output (feature slot 0, target 0 or 1; not a probability)"


def plot_roc_curves(curves: dict[str, tuple[np.ndarray, np.ndarray, float]], path: Path,
                    title: str) -> Path:
    """Overlay ROC curves; ``curves`` maps a label to (labels, scores, auroc)."""
    figure, axes = plt.subplots(figsize=(5, 5))
    for name, (labels, scores, auroc) in curves.items():
        false_positive, true_positive = roc_points(labels, scores)
        axes.plot(false_positive, true_positive, label=f"{name} (AUROC {auroc:.3f})")
    axes.plot([0, 1], [0, 1], color="grey", linestyle=":", label="random")
    axes.set_xlabel("background efficiency (false positive rate)")
    axes.set_ylabel("signal efficiency (true positive rate)")
    axes.set_title(title)
    axes.legend(loc="lower right")
    return _save(figure, path)


def plot_score_distributions(labels: np.ndarray, scores: np.ndarray, path: Path, title: str,
                             names: tuple[str, str] = ("background", "signal"),
                             xlabel: str = SCORE_LABEL) -> Path:
    """Histogram the classifier score of signal and background, normalized to unit area.

    The default x label describes the fine-tuned model's score, which is a regression output
    trained towards 0 and 1 and may fall outside [0, 1].
    """
    figure, axes = plt.subplots(figsize=(6, 4))
    edges = np.linspace(np.min(scores), np.max(scores), 41)
    for value, name in enumerate(names):
        axes.hist(scores[labels == value], bins=edges, density=True, histtype="step", label=name)
    axes.set_xlabel(xlabel)
    axes.set_ylabel("normalized events")
    axes.set_title(title)
    axes.legend()
    return _save(figure, path)


def plot_residuals(residuals: dict[str, np.ndarray], path: Path, title: str) -> Path:
    """Plot one histogram panel per residual, showing the central 98 % of each distribution.

    Neutrino residuals count two entries per event (neutrino and anti-neutrino).
    """
    names = [name for name, values in residuals.items() if np.ndim(values) == 1
             and name != "mttbar_true"]
    figure, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.5), squeeze=False)
    for axis, name in zip(axes[0], names):
        values = residuals[name][np.isfinite(residuals[name])]
        if values.size:
            low, high = np.percentile(values, [1, 99])
            axis.hist(values, bins=np.linspace(low, high, 51), histtype="step")
        axis.set_xlabel(RESIDUAL_LABELS.get(name, name))
        axis.set_ylabel("neutrinos" if name.startswith("nu_") else "events")
    figure.suptitle(title)
    return _save(figure, path)


def _save(figure: plt.Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
