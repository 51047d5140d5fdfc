"""Kill a 2-rank pre-training run mid-epoch, resume it, and compare with an uninterrupted run.

Three launches of ``launch/pretrain.py`` (about 25 s each): the reference run; the same config
killed with SIGKILL on the launcher's process group after a checkpoint; and its resume with
``--resume auto``. Dropout is on and the loader uses a worker process, so the RNG states and
the loader position must all come back for the losses to match bit for bit. Two more launches
must stop at once: a resume of the finished run under another ZeRO stage, and a job in a run
folder whose lock this test holds.
"""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from bumblebee_dist.data.synthetic import write_dataset
from bumblebee_dist.launching import deepspeed_command
from bumblebee_dist.train import checkpoint as ckpt
from bumblebee_dist.train.run import lock_run_dir

pytestmark = pytest.mark.slow
KILL_AFTER_STEP = 22  # in the second epoch; checkpoints every 5 steps


def pretrain_command(data, run_dir, resume):
    args = ["--preset", "tiny", "--resume", resume, f"data.path={data}", "data.max_tokens=256",
            "data.num_workers=1", "model.dropout=0.1", f"train.run_dir={run_dir}",
            "train.epochs=3", "train.warmup_steps=4", "train.log_every=5",
            "train.checkpoint_every=5", "train.val_every=10", "train.keep_checkpoints=2",
            "tracking.enabled=false"]
    return deepspeed_command("launch/pretrain.py", args, num_ranks=2)


def run_to_end(data, run_dir, resume="auto"):
    command, env = pretrain_command(data, run_dir, resume)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    return output, master_port(command)


def master_port(command):
    return command[command.index("--master_port") + 1]


def read_steps(run_dir):
    path = run_dir / "train_log.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def run_and_kill(data, run_dir, ports):
    """Start a run and SIGKILL its whole process group once KILL_AFTER_STEP is logged."""
    command, env = pretrain_command(data, run_dir, "none")
    ports.append(master_port(command))
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and process.poll() is None:
            steps = read_steps(run_dir)
            if steps and steps[-1]["step"] >= KILL_AFTER_STEP:
                os.killpg(process.pid, signal.SIGKILL)
                break
            time.sleep(0.01)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    return process.returncode


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    data = root / "data"
    write_dataset(data, {"train": [300, 300], "val": [40]}, seed=21)
    _, reference_port = run_to_end(data, root / "reference", resume="none")
    ports = [reference_port]
    killed = run_and_kill(data, root / "resumed", ports)
    steps_at_kill = read_steps(root / "resumed")
    complete_at_kill = ckpt.list_complete(ckpt.checkpoint_root(root / "resumed"))
    # A crash during a save leaves a temporary folder, and a final-named folder without its
    # completion marker must not be taken either: resume falls back to the newest complete one.
    checkpoints = ckpt.checkpoint_root(root / "resumed")
    (checkpoints / (ckpt.TMP_PREFIX + ckpt.tag_for(999))).mkdir()
    (checkpoints / (ckpt.TMP_PREFIX + ckpt.tag_for(999)) / "mp_rank_00_model_states.pt").write_bytes(b"x")
    (checkpoints / ckpt.tag_for(998)).mkdir()
    # A complete checkpoint with a file cut short afterwards: resume takes the one before it.
    damaged = complete_at_kill[-1][1] / "mp_rank_00_model_states.pt"
    damaged.write_bytes(damaged.read_bytes()[:100])
    resumed_log, resumed_port = run_to_end(data, root / "resumed")
    ports.append(resumed_port)
    return {"root": root, "data": data, "ports": ports, "killed_returncode": killed, "steps_at_kill": steps_at_kill,
            "complete_at_kill": complete_at_kill, "resumed_log": resumed_log}


def read_result(runs, name):
    return json.loads((runs["root"] / name / "result.json").read_text())


def test_run_killed_mid_epoch(runs):
    assert runs["killed_returncode"] == -signal.SIGKILL
    assert runs["steps_at_kill"][-1]["step"] >= KILL_AFTER_STEP
    reference_steps = read_result(runs, "reference")["steps"]
    assert runs["steps_at_kill"][-1]["step"] < reference_steps, "the run ended before the kill"
    assert len(runs["complete_at_kill"]) >= 2, "fewer than 2 checkpoints were complete at the kill"


def test_resume_takes_newest_undamaged_checkpoint(runs):
    damaged = runs["complete_at_kill"][-1][1]
    older_step = runs["complete_at_kill"][-2][0]
    resumed = read_result(runs, "resumed")
    assert resumed["resumed_from_step"] == older_step
    assert older_step >= 15
    assert f"checkpoint {damaged} is damaged" in runs["resumed_log"]
    assert f"resumed from {ckpt.checkpoint_root(runs['root'] / 'resumed')}" in runs["resumed_log"]
    leftovers = list(ckpt.checkpoint_root(runs["root"] / "resumed").glob(ckpt.TMP_PREFIX + "*"))
    assert leftovers == []


def test_losses_after_resume_bit_identical(runs):
    reference = read_steps(runs["root"] / "reference")
    resumed = read_steps(runs["root"] / "resumed")
    assert [row["step"] for row in resumed] == [row["step"] for row in reference]
    for expected, got in zip(reference, resumed):
        # Every logged value, compared exactly: loss, gradient norm, learning rate, counts.
        assert got == expected, f"step {expected['step']}"


def test_resumed_result_equals_reference(runs):
    reference, resumed = read_result(runs, "reference"), read_result(runs, "resumed")
    for key in ("steps", "last_loss", "last_val_loss", "events_seen", "tokens_seen",
                "epochs_completed", "first_loss"):
        assert resumed[key] == reference[key], key
    assert reference["epochs_completed"] == 3


def test_resumed_weights_bit_identical(runs):
    reference = (runs["root"] / "reference" / "export" / "model.safetensors").read_bytes()
    resumed = (runs["root"] / "resumed" / "export" / "model.safetensors").read_bytes()
    assert resumed == reference


def test_resume_with_other_zero_stage_rejected(runs):
    command, env = pretrain_command(runs["data"], runs["root"] / "resumed", "auto")
    done = subprocess.run([*command, "train.zero_stage=3"], env=env, capture_output=True,
                          text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert "error: checkpoint" in output, output[-3000:]
    assert "zero_stage: 2 saved, 3 now" in output
    assert "Traceback" not in output


def test_no_shared_memory_left(runs):
    # DeepSpeed's CPU allreduce buffers (one /dev/shm file per rank) are gone after every run,
    # the killed one included.
    for port in runs["ports"]:
        left = list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
        assert left == [], port


def test_second_job_in_run_dir_rejected(runs, tmp_path):
    other_job_lock = lock_run_dir(tmp_path)  # as if another job were running in this folder
    try:
        command, env = pretrain_command(runs["data"], tmp_path, "auto")
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    finally:
        other_job_lock.close()
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert f"train.run_dir {tmp_path} is in use by pid {os.getpid()}" in output, output[-3000:]
    assert "Traceback" not in output
