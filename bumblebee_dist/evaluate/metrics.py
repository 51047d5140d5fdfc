"""Classifier and resolution metrics with their uncertainties.

AUROC comes with a bootstrap standard deviation over the test set. Resolutions follow the usual
collider convention: bias is the median of the residual, resolution is half the width of the
central 68 % interval (the 16th to 84th percentile), which is robust against the non-Gaussian
tails that neutrino reconstruction has.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve


@dataclass
class AurocResult:
    """AUROC of one classifier on one test set."""

    auroc: float
    uncertainty: float  # standard deviation over bootstrap resamples of the test set
    num_events: int
    num_signal: int

    def to_dict(self) -> dict:
        """Plain dict for JSON and MLflow."""
        return asdict(self)


def _check_scores(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).astype(np.int64).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} must have the same shape")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 (background) or 1 (signal)")
    if labels.min(initial=1) == labels.max(initial=0):
        raise ValueError(f"AUROC needs both classes in the test set; got {labels.size} events of one class")
    if not np.isfinite(scores).all():
        raise ValueError(f"{int((~np.isfinite(scores)).sum())} classifier scores are not finite")
    return labels, scores


def auroc_with_uncertainty(labels: np.ndarray, scores: np.ndarray, *, num_bootstrap: int = 200,
                           seed: int = 0) -> AurocResult:
    """Compute the AUROC and its bootstrap standard deviation.

    Each resample draws the test events with replacement; resamples that happen to hold a single
    class are skipped (they occur only for tiny test sets).
    """
    labels, scores = _check_scores(labels, scores)
    value = float(roc_auc_score(labels, scores))
    rng = np.random.default_rng(seed)
    resampled = []
    for _ in range(num_bootstrap):
        index = rng.integers(0, labels.size, labels.size)
        if labels[index].min() != labels[index].max():
            resampled.append(roc_auc_score(labels[index], scores[index]))
    uncertainty = float(np.std(resampled, ddof=1)) if len(resampled) > 1 else float("nan")
    return AurocResult(value, uncertainty, int(labels.size), int(labels.sum()))


def roc_points(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (false positive rate, true positive rate) of the ROC curve."""
    labels, scores = _check_scores(labels, scores)
    false_positive, true_positive, _ = roc_curve(labels, scores)
    return false_positive, true_positive


@dataclass
class Resolution:
    """Bias and resolution of one residual distribution."""

    bias: float  # median residual
    resolution: float  # half the width of the central 68 % interval
    num_events: int

    def to_dict(self) -> dict:
        """Plain dict for JSON and MLflow."""
        return asdict(self)


def resolution(residual: np.ndarray) -> Resolution:
    """Bias and resolution of ``residual``, ignoring non-finite entries."""
    residual = np.asarray(residual, dtype=np.float64).ravel()
    residual = residual[np.isfinite(residual)]
    if residual.size == 0:
        return Resolution(float("nan"), float("nan"), 0)
    low, median, high = np.percentile(residual, [16.0, 50.0, 84.0])
    return Resolution(float(median), float(0.5 * (high - low)), int(residual.size))


def _finite_or_none(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def binned_resolution(residual: np.ndarray, binning_values: np.ndarray,
                      edges: np.ndarray) -> list[dict]:
    """Bias and resolution of ``residual`` in bins of ``binning_values`` given by ``edges``.

    An infinite edge (an open last or first bin) is written as None, so the rows stay valid
    JSON: strict parsers reject ``Infinity``.
    """
    residual = np.asarray(residual, dtype=np.float64)
    binning_values = np.asarray(binning_values, dtype=np.float64)
    rows = []
    for low, high in zip(edges[:-1], edges[1:]):
        inside = (binning_values >= low) & (binning_values < high)
        rows.append({"low": _finite_or_none(low), "high": _finite_or_none(high),
                     **resolution(residual[inside]).to_dict()})
    return rows


def wrap_phi(delta: np.ndarray) -> np.ndarray:
    """Wrap an azimuthal difference into [-pi, pi)."""
    return np.remainder(np.asarray(delta) + np.pi, 2.0 * np.pi) - np.pi
