"""Evaluation of a demo or study: classifiers and reconstruction on the same test events.

- Classification: the fine-tuned model's class-token score and an MLP on reco features, trained
  on the train split of the same data set, both scored on the test split. AUROC with a bootstrap
  uncertainty, ROC curves and score distributions as plots.
- Reconstruction: the pre-trained model with every gen particle masked predicts the gen leptons,
  neutrinos and b quarks; residuals of m(ttbar) and of the neutrino kinematics (see
  ``reconstruction``), overall and in bins of true m(ttbar).

Everything runs in one process on the CPU or one GPU; results go to ``evaluation.json``, plots
beside it, and to an MLflow run of the same store.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from bumblebee_dist.data.loader import EventLoader
from bumblebee_dist.data.shards import read_manifest
from bumblebee_dist.evaluate.baselines import reco_feature_matrix, train_mlp_classifier
from bumblebee_dist.evaluate.loading import PRETRAIN_TASK, classifier_task, load_for_study
from bumblebee_dist.evaluate.metrics import auroc_with_uncertainty
from bumblebee_dist.evaluate.plots import plot_residuals, plot_roc_curves, plot_score_distributions
from bumblebee_dist.evaluate.reconstruction import reconstruction_residuals, summarize_residuals
from bumblebee_dist.features import FeatureStats
from bumblebee_dist.finetune import build_task, class_scores
from bumblebee_dist.tokens import PDG_VOCABULARY

LOG = logging.getLogger(__name__)
PDG_OF_INDEX = np.asarray(PDG_VOCABULARY, dtype=np.int64)


@dataclass
class TokenArrays:
    """Concatenated per-token and per-event arrays of one split, in loader order."""

    features: np.ndarray  # (T, F) model space
    pdg_id: np.ndarray  # (T,) signed PDG ids
    level: np.ndarray  # (T,)
    offsets: np.ndarray  # (E + 1,)
    sample: np.ndarray  # (E,)
    process_code: np.ndarray  # (E,)
    m_ttbar_true: np.ndarray  # (E,)
    prediction: np.ndarray | None = None  # (T, F) model space, when a model ran


def collect_split(data_path: Path, split: str, *, mask_mode: str, model: torch.nn.Module | None = None,
                  max_tokens: int = 8192, max_jets: int = 8,
                  feature_stats: FeatureStats | None = None) -> TokenArrays:
    """Read every event of ``split`` once, optionally running ``model`` on each packed batch.

    Features are standardized with ``feature_stats``, else with the manifest's statistics.
    """
    loader = EventLoader(data_path, split, mask_mode=mask_mode, drop_last=False,
                         max_tokens=max_tokens, max_jets=max_jets, feature_stats=feature_stats)
    parts: dict[str, list[np.ndarray]] = {key: [] for key in
                                          ("features", "pdg_index", "level", "lengths", "sample",
                                           "process_code", "m_ttbar_true", "prediction")}
    with torch.no_grad():
        for batch in tqdm(loader, desc=f"read {split}", unit="batch", leave=False):
            if batch.num_events == 0:
                continue
            if model is not None:
                prediction = model(batch.features, batch.pdg_index, batch.level, batch.mask,
                                   batch.cu_seqlens, batch.max_seqlen)
                parts["prediction"].append(prediction.float().numpy())
            parts["features"].append(batch.features.numpy())
            parts["pdg_index"].append(batch.pdg_index.numpy())
            parts["level"].append(batch.level.numpy())
            parts["lengths"].append(torch.diff(batch.cu_seqlens.long()).numpy())
            for key in ("sample", "process_code", "m_ttbar_true"):
                parts[key].append(getattr(batch, key).numpy())
    if not parts["lengths"]:
        raise ValueError(f"split {split!r} of {data_path} contains no events")
    lengths = np.concatenate(parts["lengths"])
    offsets = np.zeros(lengths.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return TokenArrays(
        features=np.concatenate(parts["features"]),
        pdg_id=PDG_OF_INDEX[np.concatenate(parts["pdg_index"])],
        level=np.concatenate(parts["level"]), offsets=offsets,
        sample=np.concatenate(parts["sample"]), process_code=np.concatenate(parts["process_code"]),
        m_ttbar_true=np.concatenate(parts["m_ttbar_true"]),
        prediction=np.concatenate(parts["prediction"]) if parts["prediction"] else None)


def finetuned_scores(model: torch.nn.Module, data_path: Path, task_name: str, samples: list[dict],
                     *, max_tokens: int = 8192, max_jets: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Score every test event of the task with the fine-tuned model; return (labels, scores).

    Inputs are standardized with ``model.feature_stats`` when the model has them (see
    ``evaluate.loading``), else with the manifest's statistics.
    """
    task = build_task(task_name, samples)
    loader = EventLoader(data_path, "test", mask_mode=task.mask_mode, drop_last=False,
                         max_tokens=max_tokens, max_jets=max_jets,
                         feature_stats=getattr(model, "feature_stats", None))
    labels, scores = [], []
    for batch in tqdm(loader, desc=f"score {task_name}", unit="batch", leave=False):
        if batch.num_events == 0:
            continue
        inputs = task.prepare(batch)
        if inputs.num_events == 0:
            continue
        labels.append(inputs.labels.numpy())
        scores.append(class_scores(model, inputs).numpy())
    return np.concatenate(labels).astype(np.int64), np.concatenate(scores)


def mlp_scores(data_path: Path, task_name: str, samples: list[dict], *, seed: int,
               max_jets: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Train the reco-feature MLP on the train split and score the test split."""
    task = build_task(task_name, samples)
    splits = {}
    for split in ("train", "test"):
        arrays = collect_split(data_path, split, mask_mode="none", max_jets=max_jets)
        matrix = reco_feature_matrix(arrays.features, arrays.pdg_id, arrays.level, arrays.offsets)
        keep, labels = _task_labels(task, arrays)
        splits[split] = (matrix[keep], labels[keep])
    model = train_mlp_classifier(*splits["train"], seed=seed)
    test_inputs, test_labels = splits["test"]
    return test_labels, model.predict_proba(test_inputs)[:, 1]


def _task_labels(task, arrays: TokenArrays) -> tuple[np.ndarray, np.ndarray]:
    signal_ids, background_ids = task.signal_ids.numpy(), task.background_ids.numpy()
    in_signal = np.isin(arrays.sample, signal_ids)
    in_background = np.isin(arrays.sample, background_ids)
    if task.spec.signal_process is None:
        return in_signal | in_background, in_signal.astype(np.int64)
    signal = in_signal & (arrays.process_code == task.spec.signal_process)
    background = in_background & (arrays.process_code == task.spec.background_process)
    return signal | background, signal.astype(np.int64)


def evaluate_reconstruction(model: torch.nn.Module, data_path: Path, stats: FeatureStats,
                            out_dir: Path, *, max_jets: int = 8) -> tuple[dict, dict]:
    """Residuals of the pre-trained model with all gen particles masked; return (summary, raw).

    ``stats`` standardize the inputs and map the predictions back to physics: pass the ones
    the model was trained with (``model.feature_stats`` of a model from ``evaluate.loading``).
    """
    arrays = collect_split(data_path, "test", mask_mode="gen", model=model, max_jets=max_jets,
                           feature_stats=stats)
    predicted = stats.from_model(arrays.prediction, arrays.pdg_id)
    true = stats.from_model(arrays.features, arrays.pdg_id)
    residuals = reconstruction_residuals(predicted, true, arrays.pdg_id, arrays.level, arrays.offsets)
    plot_residuals(residuals, out_dir / "reconstruction_residuals.png",
                   "pre-trained model, all gen particles masked")
    return summarize_residuals(residuals), residuals


def run_evaluation(data_path: str | Path, finetuned: str | Path, pretrained: str | Path | None,
                   out_dir: str | Path, *, task: str = "toponium", tracking_uri: str = "",
                   seed: int = 0, max_jets: int = 8) -> dict:
    """Evaluate classifiers and reconstruction; write ``evaluation.json`` and plots to ``out_dir``.

    ``finetuned`` and ``pretrained`` are exports (folder, .safetensors file or training
    result.json) or ``models:/`` URIs of the registry at ``tracking_uri``. The fine-tuned model
    must record task ``finetune-<task>`` and the pre-trained one ``pretrain``, else
    ModelTaskError is raised. ``out_dir`` is created only after the manifest and both models
    loaded, so invalid inputs leave no folder behind.
    """
    data_path, out_dir = Path(data_path), Path(out_dir)
    if not 0 <= seed < 2**32:
        raise ValueError(f"--seed {seed} is invalid: it must be from 0 to {2**32 - 1}")
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"--out {out_dir} is a file; pass a folder for the evaluation output")
    manifest = read_manifest(data_path / "manifest.json")
    samples = [dict(sample) for sample in manifest.samples]
    build_task(task, samples)  # raises for an unknown task or a sample missing from the data set
    finetuned_model = load_for_study(finetuned, classifier_task(task), manifest,
                                     tracking_uri=tracking_uri)
    pretrained_model = None
    if pretrained is not None:
        pretrained_model = load_for_study(pretrained, PRETRAIN_TASK, manifest,
                                          tracking_uri=tracking_uri)
    out_dir.mkdir(parents=True, exist_ok=True)

    LOG.info("scoring the test split with the fine-tuned model (%s)", task)
    labels, scores = finetuned_scores(finetuned_model, data_path, task, samples, max_jets=max_jets)
    LOG.info("training the reco-feature MLP baseline on the train split")
    mlp_labels, mlp_probability = mlp_scores(data_path, task, samples, seed=seed, max_jets=max_jets)
    results = {
        "bumblebee (fine-tuned)": auroc_with_uncertainty(labels, scores, seed=seed),
        "MLP on reco features": auroc_with_uncertainty(mlp_labels, mlp_probability, seed=seed),
    }
    written = [out_dir / f"roc_{task}.png", out_dir / f"scores_{task}.png"]
    plot_roc_curves({"bumblebee (fine-tuned)": (labels, scores, results["bumblebee (fine-tuned)"].auroc),
                     "MLP on reco features": (mlp_labels, mlp_probability,
                                              results["MLP on reco features"].auroc)},
                    written[0], f"{task}: test split")
    plot_score_distributions(labels, scores, written[1], f"{task}: fine-tuned class-token score")
    evaluation = {"classification": {"task": task, "models": {
        name: result.to_dict() for name, result in results.items()}}}

    if pretrained_model is not None:
        evaluation["reconstruction"], _ = evaluate_reconstruction(
            pretrained_model, data_path, pretrained_model.feature_stats, out_dir,
            max_jets=max_jets)
        written.append(out_dir / "reconstruction_residuals.png")
    written.append(out_dir / "evaluation.json")
    written[-1].write_text(json.dumps(evaluation, indent=2) + "\n")
    params = {"task": task, "finetuned": str(finetuned), "pretrained": str(pretrained or ""),
              "data": str(data_path.resolve()), "data_manifest_sha256": manifest.sha256,
              "seed": seed, "max_jets": max_jets}
    _log_to_mlflow(evaluation, written, params, tracking_uri, task)
    return evaluation


def _log_to_mlflow(evaluation: dict, written: list[Path], params: dict, tracking_uri: str,
                   task: str) -> None:
    """Log the metrics, the inputs as parameters, and the files this evaluation wrote."""
    from bumblebee_dist.config import TrackingConfig
    from bumblebee_dist.tracking import Tracker

    tracker = Tracker(TrackingConfig(uri=tracking_uri, run_name=f"evaluate-{task}"),
                      written[-1].parent, active=True)
    tracker.start()
    tracker.log_params(params)
    metrics = {}
    for name, result in evaluation["classification"]["models"].items():
        key = "mlp" if name.startswith("MLP") else "bumblebee"
        metrics[f"auroc/{task}/{key}"] = result["auroc"]
        metrics[f"auroc/{task}/{key}_uncertainty"] = result["uncertainty"]
    for name, value in evaluation.get("reconstruction", {}).items():
        if isinstance(value, dict) and "resolution" in value:
            metrics[f"reconstruction/{name}/resolution"] = value["resolution"]
            metrics[f"reconstruction/{name}/bias"] = value["bias"]
    tracker.log_metrics(metrics, step=0)
    for path in written:  # only this run's files, not older ones left in the folder
        tracker.log_artifact(path)
    tracker.finish()
