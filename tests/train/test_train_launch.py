"""The real entry points under the ``deepspeed`` launcher with 2 CPU ranks and the tiny preset.

Three launches (about 30 s each): pre-train 4 steps and register the export; resume the same
run to 6 steps; fine-tune on toponium from ``models:/<name>@champion``. A fourth starts
``bumblebee pretrain`` and SIGKILLs it once the ranks run, to check that the job goes with it.
"""

import json
import os
import subprocess
import sys

import pytest

from bumblebee_dist.data.synthetic import write_dataset
from bumblebee_dist.launching import deepspeed_command
from bumblebee_dist.tracking import make_client
from bumblebee_dist.train.export import load_exported
from tests.train.test_train_preflight import (job_processes, kill_and_wait_for_job,
                                              kill_leftovers, wait_until)

pytestmark = pytest.mark.slow
MODEL_NAME = "tiny-pretrained"


def launch(script, args):
    command, env = deepspeed_command(script, args, num_ranks=2)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    return output


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("launch")
    data = root / "data"
    write_dataset(data, {"train": [150, 150], "val": [30, 30]}, seed=11)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    common = ["--preset", "tiny", f"data.path={data}", "data.max_tokens=256",
              f"tracking.uri={uri}", "train.log_every=1", "train.warmup_steps=2"]
    pretrain = common + [f"train.run_dir={root / 'pretrain'}", "train.checkpoint_every=2",
                         "train.val_every=2", f"tracking.registered_model={MODEL_NAME}"]
    first_log = launch("launch/pretrain.py", ["--config", "configs/pretrain.yaml",
                                              *pretrain, "train.max_steps=4"])
    first = json.loads((root / "pretrain" / "result.json").read_text())
    resumed_log = launch("launch/pretrain.py", ["--config", "configs/pretrain.yaml", "--resume",
                                                "auto", *pretrain, "train.max_steps=6"])
    finetune_log = launch("launch/finetune.py", [
        "--config", "configs/finetune.yaml", *common, f"train.run_dir={root / 'finetune'}",
        "train.max_steps=3", "finetune.task=toponium",
        f"finetune.pretrained=models:/{MODEL_NAME}@champion"])
    return {"root": root, "uri": uri, "first": first, "first_log": first_log,
            "resumed_log": resumed_log, "finetune_log": finetune_log}


def read_result(runs, name):
    return json.loads((runs["root"] / name / "result.json").read_text())


def test_pretrain_result(runs):
    first = runs["first"]
    assert first["steps"] == 4
    assert first["world_size"] == 2
    assert first["skipped_steps"] == 0
    assert first["events_seen"] > 0
    assert first["first_loss"] > 0
    assert first["last_val_loss"] is not None
    assert first["registered_version"] == "1"
    assert "over gloo" in runs["first_log"]


def test_pretrain_export_loads_without_deepspeed(runs):
    result = read_result(runs, "pretrain")
    model = load_exported(result["export_path"])
    assert model.config.hidden_size == 32


def test_resume_continues_same_run(runs):
    first, resumed = runs["first"], read_result(runs, "pretrain")
    assert resumed["resumed_from_step"] == 4
    assert resumed["steps"] == 6
    assert resumed["mlflow_run_id"] == first["mlflow_run_id"]
    assert resumed["first_loss"] == first["first_loss"]
    assert resumed["events_seen"] > first["events_seen"]
    rows = (runs["root"] / "pretrain" / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(row)["step"] for row in rows] == [1, 2, 3, 4, 5, 6]


def test_resumed_run_has_one_value_per_step(runs):
    client = make_client(runs["uri"])
    run_id = runs["first"]["mlflow_run_id"]
    history = client.get_metric_history(run_id, "loss/train")
    assert sorted(point.step for point in history) == [1, 2, 3, 4, 5, 6]
    run = client.get_run(run_id)
    assert run.data.tags["resumed_from_step"] == "4"
    assert run.info.status == "FINISHED"
    assert "data_manifest_sha256" in run.data.params


def test_finetune_from_registered_model(runs):
    result = read_result(runs, "finetune")
    assert result["task"] == "finetune-toponium"
    assert result["steps"] == 3
    assert result["last_loss"] is not None
    assert result["mlflow_run_id"] != runs["first"]["mlflow_run_id"]
    config = json.loads((runs["root"] / "finetune" / "export" / "config.json").read_text())
    assert config["pretrained"] == f"models:/{MODEL_NAME}@champion"
    assert config["finetune_task"] == "toponium"


def test_killed_cli_leaves_no_job_processes(tmp_path):
    data = tmp_path / "data"
    write_dataset(data, {"train": [100, 100]}, seed=5)
    # The run folder name is unique to this test, so it finds exactly this job's processes.
    run_dir = tmp_path / f"killed-parent-{os.getpid()}"
    marker = f"train.run_dir={run_dir}"
    log_path = tmp_path / "cli.log"
    command = [sys.executable, "-m", "bumblebee_dist.cli", "pretrain", "--ranks", "2",
               "--preset", "tiny", f"data.path={data}", "data.max_tokens=256", marker,
               "tracking.enabled=false", "train.epochs=1000"]
    with log_path.open("w") as log:
        # A session of its own, so the cleanup below reaches every process of the job.
        cli = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        ranks_started = wait_until(
            lambda: cli.poll() is not None or sum(
                "--local_rank=" in line for line in job_processes(marker).values()) == 2,
            timeout_s=180)
        assert ranks_started, log_path.read_text()[-3000:]
        assert cli.poll() is None, log_path.read_text()[-3000:]
        left = kill_and_wait_for_job(cli, marker, timeout_s=15)
        assert left == {}, f"left running: {left}"
    finally:
        kill_leftovers(cli, marker)
