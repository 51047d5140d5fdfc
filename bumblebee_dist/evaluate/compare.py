"""Registered model versions side by side on the same test events.

Classifiers: AUROC with bootstrap uncertainty and overlaid ROC curves. Pre-trained models:
reconstruction bias and resolution with every gen particle masked. Every model reads the same
test split of the same data set, so differences come from the models alone.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from bumblebee_dist.data.shards import Manifest, read_manifest
from bumblebee_dist.evaluate.loading import PRETRAIN_TASK, classifier_task, load_for_study
from bumblebee_dist.evaluate.metrics import auroc_with_uncertainty
from bumblebee_dist.evaluate.plots import plot_roc_curves
from bumblebee_dist.evaluate.run import evaluate_reconstruction, finetuned_scores
from bumblebee_dist.finetune import build_task

LOG = logging.getLogger(__name__)


def compare_classifiers(uris: list[str], data_path: Path, out_dir: Path, *, task: str,
                        tracking_uri: str, seed: int = 0) -> dict:
    """Score the test split with every classifier in ``uris``; write compare.json and the ROC plot.

    Every model must record task ``finetune-<task>``, else ModelTaskError is raised before
    ``out_dir`` is created.
    """
    manifest = read_manifest(data_path / "manifest.json")
    samples = [dict(sample) for sample in manifest.samples]
    build_task(task, samples)  # raises for an unknown task or a sample missing from the data set
    models = _load_all(uris, classifier_task(task), manifest, tracking_uri)
    out_dir.mkdir(parents=True, exist_ok=True)
    results, curves = {}, {}
    for uri, model in models.items():
        labels, scores = finetuned_scores(model, data_path, task, samples)
        result = auroc_with_uncertainty(labels, scores, seed=seed)
        results[uri] = result.to_dict()
        curves[uri] = (labels, scores, result.auroc)
        LOG.info("%s: AUROC %.3f +- %.3f on %d test events", uri, result.auroc,
                 result.uncertainty, result.num_events)
    plot_roc_curves(curves, out_dir / f"compare_roc_{task}.png", f"{task}: registered models")
    comparison = {"task": task, "data": str(data_path), "models": results}
    (out_dir / "compare.json").write_text(json.dumps(comparison, indent=2) + "\n")
    return comparison


def compare_reconstruction(uris: list[str], data_path: Path, out_dir: Path, *,
                           tracking_uri: str) -> dict:
    """Compute the reconstruction residuals of every pre-trained model in ``uris``; write compare.json.

    Every model must record task ``pretrain``, else ModelTaskError is raised before ``out_dir``
    is created.
    """
    manifest = read_manifest(data_path / "manifest.json")
    models = _load_all(uris, PRETRAIN_TASK, manifest, tracking_uri)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for index, (uri, model) in enumerate(models.items()):
        summary, _ = evaluate_reconstruction(model, data_path, model.feature_stats,
                                             out_dir / f"model_{index}")
        results[uri] = summary
        LOG.info("%s: m(ttbar) bias %+.3f, resolution %.3f", uri,
                 summary["mttbar_relative"]["bias"], summary["mttbar_relative"]["resolution"])
    comparison = {"task": "reconstruction", "data": str(data_path), "models": results}
    (out_dir / "compare.json").write_text(json.dumps(comparison, indent=2) + "\n")
    return comparison


def _load_all(uris: list[str], expected_task: str, manifest: Manifest,
              tracking_uri: str) -> dict[str, torch.nn.Module]:
    # Every model is checked before the first one is scored, so a wrong URI fails in seconds.
    return {uri: load_for_study(uri, expected_task, manifest, tracking_uri=tracking_uri)
            for uri in uris}


def format_comparison(comparison: dict) -> str:
    """Render a comparison as a plain-text table."""
    lines = []
    if comparison["task"] == "reconstruction":
        lines.append(f"{'model':<44}{'m(ttbar) bias':>15}{'resolution':>12}{'nu pT res.':>12}")
        for uri, summary in comparison["models"].items():
            mttbar, nu_pt = summary["mttbar_relative"], summary["nu_pt_relative"]
            lines.append(f"{uri:<44}{mttbar['bias']:>+15.3f}{mttbar['resolution']:>12.3f}"
                         f"{nu_pt['resolution']:>12.3f}")
    else:
        lines.append(f"{'model':<44}{'AUROC':>18}{'test events':>13}")
        for uri, result in comparison["models"].items():
            auroc = f"{result['auroc']:.3f} +- {result['uncertainty']:.3f}"
            lines.append(f"{uri:<44}{auroc:>18}{result['num_events']:>13}")
    return "\n".join(lines)
