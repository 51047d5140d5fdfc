"""Task and data set checks of exports before evaluation, on tiny exports and data sets."""

import hashlib
import json
import logging

import pytest

from bumblebee_dist.config import TrackingConfig, model_preset
from bumblebee_dist.data.shards import read_manifest
from bumblebee_dist.data.synthetic import write_dataset
from bumblebee_dist.evaluate.compare import compare_classifiers, compare_reconstruction
from bumblebee_dist.evaluate.loading import ModelTaskError, load_for_study
from bumblebee_dist.evaluate.run import run_evaluation
from bumblebee_dist.features import FeatureStats
from bumblebee_dist.model import BumblebeeEncoder
from bumblebee_dist.tracking import ModelRegistry, Tracker
from bumblebee_dist.train.export import write_export


@pytest.fixture
def manifest_path(tmp_path):
    return write_dataset(tmp_path / "data", {"train": [8, 8], "test": [8, 8]})


def tiny_export(folder, **metadata):
    config = model_preset("tiny")
    model = BumblebeeEncoder(config, init_seed=0)
    return write_export(model.state_dict(), config, folder, metadata)


def registered(tmp_path, export, name):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(TrackingConfig(uri=uri, experiment="tests"), tmp_path / "run", active=True)
    tracker.start()
    version = ModelRegistry(uri).register(name, tracker.log_model(export), tracker.run_id)
    tracker.finish()
    return uri, f"models:/{name}/{version}"


@pytest.mark.parametrize("recorded, expected", [
    ("pretrain", "finetune-toponium"),
    ("finetune-initial_state", "finetune-toponium"),
    ("finetune-toponium", "pretrain"),
])
def test_wrong_task_rejected(tmp_path, manifest_path, recorded, expected):
    export = tiny_export(tmp_path / "export", task=recorded)
    with pytest.raises(ModelTaskError) as error:
        load_for_study(export, expected, read_manifest(manifest_path))
    message = str(error.value)
    assert str(export) in message
    assert repr(recorded) in message
    assert repr(expected) in message


def test_matching_task_loads(tmp_path, manifest_path, caplog):
    manifest = read_manifest(manifest_path)
    export = tiny_export(tmp_path / "export", task="finetune-toponium",
                         data_manifest_sha256=manifest.sha256)
    with caplog.at_level(logging.WARNING):
        model = load_for_study(export, "finetune-toponium", manifest)
    assert not model.training
    assert caplog.records == []


def test_missing_task_warns(tmp_path, manifest_path, caplog):
    export = tiny_export(tmp_path / "export")
    with caplog.at_level(logging.WARNING):
        load_for_study(export, "pretrain", read_manifest(manifest_path))
    assert len(caplog.records) == 1
    assert "records no training task" in caplog.text
    assert str(export) in caplog.text


def test_other_data_set_warns_once(tmp_path, manifest_path, caplog):
    manifest = read_manifest(manifest_path)
    export = tiny_export(tmp_path / "export", task="pretrain", data_manifest_sha256="0" * 64)
    with caplog.at_level(logging.WARNING):
        load_for_study(export, "pretrain", manifest)
    assert len(caplog.records) == 1
    assert "0" * 64 in caplog.text
    assert manifest.sha256 in caplog.text
    assert str(manifest_path) in caplog.text
    assert "statistics" in caplog.text


def test_recorded_feature_stats_used(tmp_path, manifest_path, caplog):
    manifest = read_manifest(manifest_path)
    trained = {name: {"mean": entry["mean"] + 1.0, "std": 2 * entry["std"]}
               for name, entry in manifest.feature_stats.items()}
    export = tiny_export(tmp_path / "export", task="pretrain", data_manifest_sha256="0" * 64,
                         feature_stats=trained)
    with caplog.at_level(logging.WARNING):
        model = load_for_study(export, "pretrain", manifest)
    assert model.feature_stats == FeatureStats.from_manifest(trained)
    assert "statistics recorded in its export" in caplog.text


def test_manifest_feature_stats_without_record(tmp_path, manifest_path):
    manifest = read_manifest(manifest_path)
    model = load_for_study(tiny_export(tmp_path / "export", task="pretrain"), "pretrain", manifest)
    assert model.feature_stats == FeatureStats.from_manifest(manifest.feature_stats)


def test_manifest_sha256_is_file_digest(manifest_path):
    expected = hashlib.sha256(manifest_path.read_bytes()).hexdigest()
    assert read_manifest(manifest_path).sha256 == expected


def test_registry_uri_wrong_task_named(tmp_path, manifest_path):
    export = tiny_export(tmp_path / "export", task="pretrain")
    tracking_uri, model_uri = registered(tmp_path, export, "encoder")
    with pytest.raises(ModelTaskError, match=f"{model_uri} records training task 'pretrain'"):
        load_for_study(model_uri, "finetune-toponium", read_manifest(manifest_path),
                       tracking_uri=tracking_uri)
    model = load_for_study(model_uri, "pretrain", read_manifest(manifest_path),
                           tracking_uri=tracking_uri)
    assert isinstance(model, BumblebeeEncoder)


def test_compare_rejects_wrong_kind(tmp_path, manifest_path):
    export = tiny_export(tmp_path / "export", task="pretrain")
    tracking_uri, model_uri = registered(tmp_path, export, "encoder")
    out = tmp_path / "compare"
    with pytest.raises(ModelTaskError, match="toponium classification"):
        compare_classifiers([model_uri], manifest_path.parent, out, task="toponium",
                            tracking_uri=tracking_uri)
    assert not out.exists()
    classifier = tiny_export(tmp_path / "classifier", task="finetune-toponium")
    with pytest.raises(ModelTaskError, match="reconstruction needs task 'pretrain'"):
        compare_reconstruction([str(classifier)], manifest_path.parent, out,
                               tracking_uri=tracking_uri)
    assert not out.exists()


def test_evaluate_rejects_pretrained_as_classifier(tmp_path, manifest_path):
    pretrained = tiny_export(tmp_path / "pretrained", task="pretrain")
    out = tmp_path / "evaluation"
    with pytest.raises(ModelTaskError, match="pretrain"):
        run_evaluation(manifest_path.parent, pretrained, None, out)
    assert not out.exists()


def test_evaluate_rejects_classifier_for_reconstruction(tmp_path, manifest_path):
    classifier = tiny_export(tmp_path / "classifier", task="finetune-toponium")
    out = tmp_path / "evaluation"
    with pytest.raises(ModelTaskError, match="reconstruction"):
        run_evaluation(manifest_path.parent, classifier, classifier, out)
    assert not out.exists()


def test_evaluate_invalid_inputs_leave_no_folder(tmp_path, manifest_path):
    out = tmp_path / "evaluation"
    with pytest.raises(FileNotFoundError):
        run_evaluation(tmp_path / "no-data", tmp_path / "no-export", None, out)
    assert not out.exists()
    with pytest.raises(FileNotFoundError):
        run_evaluation(manifest_path.parent, tmp_path / "no-export", None, out)
    assert not out.exists()
    result = tmp_path / "result.json"
    result.write_text(json.dumps({"export_path": str(tmp_path / "no-export")}))
    with pytest.raises(FileNotFoundError):
        run_evaluation(manifest_path.parent, result, None, out)
    assert not out.exists()


@pytest.mark.parametrize("seed, out_is_file, expected", [
    (-1, False, "--seed -1 is invalid"),
    (0, True, "is a file"),
])
def test_evaluate_bad_seed_or_out_rejected_first(tmp_path, manifest_path, seed, out_is_file, expected):
    out = tmp_path / "out"
    if out_is_file:
        out.write_text("")
    classifier = tiny_export(tmp_path / "export", task="finetune-toponium")
    with pytest.raises((ValueError, FileExistsError), match=expected):
        run_evaluation(manifest_path.parent, classifier, None, out, seed=seed)
