"""Loading of exported models for evaluation, with checks against what each model was trained for.

Training writes the task into the export's ``config.json`` (``"task": "pretrain"`` or
``"finetune-<task>"``) and the SHA-256 of the data set manifest it read
(``"data_manifest_sha256"``). Before anything is scored, the task must fit the study: a
classifier for ``--task X`` needs ``"finetune-X"`` and reconstruction needs ``"pretrain"``.
Another task raises ``ModelTaskError``, and an export without a task record loads with a warning.

A different data set is allowed, with one warning per model. Features are standardized with
the statistics the model was trained with, which the export records (``"feature_stats"``), so
a model gets its inputs scaled as in training. An export without them falls back to the
evaluated data set's statistics, and the warning states it. The loaded model carries the statistics to use
as its ``feature_stats`` attribute.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch

from bumblebee_dist.data.shards import Manifest
from bumblebee_dist.features import FeatureStats
from bumblebee_dist.train.export import load_exported, read_export_config

LOG = logging.getLogger(__name__)

PRETRAIN_TASK = "pretrain"
FINETUNE_PREFIX = "finetune-"
REGISTRY_PREFIX = "models:/"


class ModelTaskError(ValueError):
    """A model trained for another task than the study needs; the message names both tasks."""


def classifier_task(task: str) -> str:
    """Return the export task of a model fine-tuned for classification ``task``."""
    return f"{FINETUNE_PREFIX}{task}"


def resolve_export(path: str | Path) -> Path:
    """Accept an export folder, its .safetensors file, or a training run's result.json."""
    path = Path(path)
    if path.suffix == ".json":
        if not path.is_file():
            raise FileNotFoundError(f"training result {path} not found; run the training step first")
        result = json.loads(path.read_text())
        if "export_path" not in result:
            raise KeyError(f"{path} has no 'export_path'; it is not a training result.json")
        return Path(result["export_path"])
    return path


def check_task(name: str, config: dict[str, Any], expected: str) -> None:
    """Raise ModelTaskError unless the export config of model ``name`` records task ``expected``.

    An export without a ``task`` field passes with a warning, because it cannot be checked.
    """
    recorded = config.get("task")
    if recorded is None:
        LOG.warning("model %s records no training task in its config.json, so it is used for "
                    "task %r without a check", name, expected)
        return
    if recorded == expected:
        return
    if expected == PRETRAIN_TASK:
        study, fix = "reconstruction", "a pre-trained model"
    else:
        task = expected.removeprefix(FINETUNE_PREFIX)
        study, fix = f"{task} classification", f"a model fine-tuned for {task}"
    raise ModelTaskError(f"model {name} records training task {recorded!r}, but {study} needs "
                         f"task {expected!r}; pass {fix}")


def feature_stats_for(config: dict[str, Any], manifest: Manifest) -> FeatureStats:
    """Return the statistics to standardize a model's inputs with: its own, else the manifest's."""
    recorded = config.get("feature_stats")
    return FeatureStats.from_manifest(recorded if recorded is not None else manifest.feature_stats)


def check_data(name: str, config: dict[str, Any], manifest: Manifest) -> None:
    """Log a warning when model ``name`` was trained on a data set other than ``manifest``'s."""
    recorded = config.get("data_manifest_sha256")
    if recorded is None or recorded == manifest.sha256:
        return
    if config.get("feature_stats") is not None:
        scaling = "Features are standardized with the statistics recorded in its export"
    else:
        scaling = ("Features are standardized with the statistics of this manifest, because the "
                   "export does not record the ones the model was trained with")
    LOG.warning("model %s was trained on the data set with manifest SHA-256 %s, but %s has "
                "SHA-256 %s. %s", name, recorded, manifest.path, manifest.sha256, scaling)


def load_for_study(spec: str | Path, expected_task: str, manifest: Manifest, *,
                   tracking_uri: str = "", device: str = "cpu") -> torch.nn.Module:
    """Load a model for evaluation after checking its recorded task and data set.

    ``spec`` is a ``models:/name/version`` or ``models:/name@alias`` URI of the registry at
    ``tracking_uri``, or an export as ``resolve_export`` accepts it. Returns the model in eval
    mode, with the statistics to standardize its inputs with as ``model.feature_stats``; raises
    ModelTaskError before any weights are read when the task does not fit.
    """
    if str(spec).startswith(REGISTRY_PREFIX):
        from bumblebee_dist.tracking import ModelRegistry

        with tempfile.TemporaryDirectory(prefix="bumblebee-model-") as tmp:
            folder = ModelRegistry(tracking_uri).download(str(spec), tmp)
            return _load_checked(str(spec), folder, expected_task, manifest, device)
    return _load_checked(str(spec), resolve_export(spec), expected_task, manifest, device)


def _load_checked(name: str, export: Path, expected_task: str, manifest: Manifest,
                  device: str) -> torch.nn.Module:
    config = read_export_config(export)
    check_task(name, config, expected_task)
    check_data(name, config, manifest)
    model = load_exported(export, device=device).eval()
    model.feature_stats = feature_stats_for(config, manifest)
    return model
