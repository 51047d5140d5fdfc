"""MLflow tracking and registry against temporary SQLite stores."""

import logging
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from bumblebee_dist.config import TrackingConfig, model_preset
from bumblebee_dist.model import BumblebeeEncoder
from bumblebee_dist.tracking import (ModelRegistry, Tracker, TrackingError, check_reachable,
                                     make_client, parse_model_uri, resolve_store, server_command)
from bumblebee_dist.train.export import write_export


def tracker_for(tmp_path, **fields):
    config = TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="tests", **fields)
    return Tracker(config, tmp_path / "run", active=True)


def exported_model(folder, seed):
    config = model_preset("tiny")
    model = BumblebeeEncoder(config, init_seed=seed)
    write_export(model.state_dict(), config, folder, {"task": "test"})
    return model


def test_default_store_beside_run_dir(tmp_path):
    uri, artifacts = resolve_store(TrackingConfig(), tmp_path / "runs" / "pretrain")
    assert uri == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    assert artifacts == tmp_path / "runs" / "mlartifacts"


def test_server_binds_localhost_by_default(tmp_path):
    command = server_command("sqlite:///x.db", tmp_path)
    assert command[command.index("--host") + 1] == "127.0.0.1"


def test_params_metrics_artifacts_logged(tmp_path):
    tracker = tracker_for(tmp_path)
    run_id = tracker.start(tags={"task": "pretrain"})
    tracker.log_params({"train": {"lr": 0.001}, "data_manifest_sha256": "abc"})
    for step in range(1, 4):
        tracker.log_metrics({"loss/train": 1.0 / step, "throughput/events_per_s": 10.0}, step)
    note = tmp_path / "note.txt"
    note.write_text("hello")
    tracker.log_artifact(note)
    export = tmp_path / "export"
    exported_model(export, seed=1)
    model_uri = tracker.log_model(export)
    tracker.finish()
    client = make_client(tracker.tracking_uri)
    run = client.get_run(run_id)
    assert run.data.params["train.lr"] == "0.001"
    assert run.data.params["data_manifest_sha256"] == "abc"
    assert run.data.tags["task"] == "pretrain"
    assert [p.step for p in client.get_metric_history(run_id, "loss/train")] == [1, 2, 3]
    artifacts = {item.path for item in client.list_artifacts(run_id)}
    assert {"note.txt", "model"} <= artifacts
    model_files = {item.path for item in client.list_artifacts(run_id, "model")}
    assert model_files == {"model/config.json", "model/model.safetensors"}
    assert model_uri.endswith("/model")
    assert run.info.status == "FINISHED"


def test_registry_aliases_and_forced_delete(tmp_path):
    tracker = tracker_for(tmp_path)
    tracker.start()
    model_one = exported_model(tmp_path / "one", seed=1)
    model_two = exported_model(tmp_path / "two", seed=2)
    registry = ModelRegistry(tracker.tracking_uri)
    first = registry.register("encoder", tracker.log_model(tmp_path / "one"), tracker.run_id)
    source_two = tracker.log_model(tmp_path / "two")  # overwrites the run's model folder
    second = registry.register("encoder", source_two, tracker.run_id, aliases=[])
    assert (first, second) == ("1", "2")
    assert registry.aliases("encoder") == {"champion": "1"}
    with pytest.raises(TrackingError, match="champion"):
        registry.delete_version("encoder", first)
    registry.set_alias("encoder", "champion", second)
    registry.set_alias("encoder", "challenger", first)
    registry.delete_version("encoder", first, force=True)
    assert registry.aliases("encoder") == {"champion": "2"}
    loaded = registry.load("models:/encoder@champion")
    for name, tensor in model_two.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert not torch.equal(loaded.state_dict()["head.proj.weight"],
                           model_one.state_dict()["head.proj.weight"])
    expected = "models:/encoder@best: model 'encoder' has no alias 'best'"
    with pytest.raises(TrackingError, match=expected) as error:
        registry.version_source("models:/encoder@best")
    assert "@champion -> 2" in str(error.value)


def test_auto_alias_second_version_is_challenger(tmp_path):
    tracker = tracker_for(tmp_path)
    tracker.start()
    exported_model(tmp_path / "one", seed=1)
    source = tracker.log_model(tmp_path / "one")
    registry = ModelRegistry(tracker.tracking_uri)
    registry.register("auto", source, tracker.run_id)
    registry.register("auto", source, tracker.run_id)
    assert registry.aliases("auto") == {"champion": "1", "challenger": "2"}


def test_model_uri_parsing():
    assert parse_model_uri("models:/enc@champion") == ("enc", "champion", None)
    assert parse_model_uri("models:/enc/3") == ("enc", None, "3")
    with pytest.raises(TrackingError, match="models:/<name>@<alias>"):
        parse_model_uri("runs:/abc/model")


def test_resume_reopens_run_one_value_per_step(tmp_path):
    tracker = tracker_for(tmp_path)
    run_id = tracker.start()
    for step in range(10, 80, 10):  # logs up to step 70, then the job dies at step 73
        tracker.log_metrics({"loss/train": float(step)}, step)
    resumed = tracker_for(tmp_path)
    assert resumed.start(run_id, resumed_from_step=50) == run_id
    for step in range(60, 110, 10):  # replays from the checkpoint at step 50
        resumed.log_metrics({"loss/train": float(step)}, step)
    resumed.finish()
    client = make_client(resumed.tracking_uri)
    steps = [point.step for point in client.get_metric_history(run_id, "loss/train")]
    assert sorted(steps) == list(range(10, 110, 10))
    experiment = client.get_experiment_by_name("tests")
    assert len(client.search_runs([experiment.experiment_id])) == 1
    run = client.get_run(run_id)
    assert run.data.tags["resumed_from_step"] == "50"
    assert run.info.status == "FINISHED"


def test_tracking_failure_does_not_raise(tmp_path, caplog):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the store folder should be")
    config = TrackingConfig(uri=f"sqlite:///{blocker / 'mlflow.db'}", retries=2)
    tracker = Tracker(config, tmp_path / "run", active=True)
    with caplog.at_level(logging.WARNING, logger="bumblebee_dist.tracking"):
        assert tracker.start() is None
        tracker.log_metrics({"loss/train": 1.0}, 1)
        tracker.finish()
    assert tracker.failures == 1
    assert "training continues" in caplog.text


def test_inactive_tracker_makes_no_calls(tmp_path):
    tracker = Tracker(TrackingConfig(uri=f"sqlite:///{tmp_path / 'x.db'}"), tmp_path, active=False)
    assert tracker.start() is None
    tracker.log_metrics({"loss/train": 1.0}, 1)
    assert not (tmp_path / "x.db").exists()


CONCURRENT_JOB = textwrap.dedent("""
    import sys
    from bumblebee_dist.config import TrackingConfig
    from bumblebee_dist.tracking import Tracker

    config = TrackingConfig(uri=sys.argv[1], experiment="shared", run_name=sys.argv[2])
    tracker = Tracker(config, sys.argv[3], active=True)
    if tracker.start() is None:
        sys.exit("run not started")
    for step in range(100):
        tracker.log_metrics({"loss/train": float(step)}, step)
    tracker.finish()
    sys.exit(1 if tracker.failures else 0)
""")


@pytest.mark.slow
def test_concurrent_jobs_fresh_store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    jobs = [subprocess.Popen([sys.executable, "-c", CONCURRENT_JOB, uri, f"job{i}",
                              str(tmp_path / f"run{i}")], stderr=subprocess.PIPE, text=True)
            for i in range(4)]
    for job in jobs:
        _, errors = job.communicate(timeout=300)
        assert job.returncode == 0, errors[-3000:]
    client = make_client(uri)
    experiments = [e for e in client.search_experiments() if e.name == "shared"]
    assert len(experiments) == 1
    runs = client.search_runs([experiments[0].experiment_id])
    assert sorted(run.info.run_name for run in runs) == ["job0", "job1", "job2", "job3"]
    for run in runs:
        history = client.get_metric_history(run.info.run_id, "loss/train")
        assert sorted(point.step for point in history) == list(range(100)), run.info.run_name
        assert run.info.status == "FINISHED"


def test_unreachable_server_named_at_once():
    with socket.socket() as listener:  # a port that accepts, then one that refuses
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        check_reachable(f"http://127.0.0.1:{port}")
    expected = f"cannot reach the MLflow tracking server http://127.0.0.1:{port}"
    with pytest.raises(TrackingError, match=expected):
        check_reachable(f"http://127.0.0.1:{port}", timeout=2.0)
    check_reachable("sqlite:///not/checked.db")
