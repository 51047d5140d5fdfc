"""Launch checks that run before any DeepSpeed process starts, and at the start of each rank.

The last tests start small Python processes, no DeepSpeed, to check that a launcher child and
its descendants stop when the process that started it is killed.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from deepspeed.launcher.runner import fetch_hostfile

from bumblebee_dist import launching
from bumblebee_dist.train.preflight import (LaunchError, check_hostfile, check_launch_world_size,
                                            read_hostfile)


def write_hostfile(folder: Path, text: str) -> Path:
    path = folder / "hostfile"
    path.write_text(text)
    return path


def test_hostfile_parsed_in_order(tmp_path):
    path = write_hostfile(tmp_path, "# cluster\nworker-1 slots=8\n\nworker-0 slots=4\n")
    assert list(read_hostfile(path).items()) == [("worker-1", 8), ("worker-0", 4)]


# Each text is parsed by DeepSpeed 0.19.8 and by read_hostfile. Both must give the expected
# hosts, or both must reject the text (None).
AGREEMENT_CASES = [
    ("h1 slots=2\n", {"h1": 2}),
    ("h1  slots=2 # gpu\n", {"h1": 2}),
    ("h1 slots=2#gpu\n", {"h1": 2}),
    ("h1\tslots=2\n", {"h1": 2}),
    ("  h1 slots=2  \n", {"h1": 2}),
    ("\th1 \t slots=2\t\n", {"h1": 2}),
    ("h1 slots=2 extra text\n", {"h1": 2}),
    ("h1 slots=2x\n", {"h1": 2}),
    ("h1 slots=08\n", {"h1": 8}),
    ("h1 slots=2", {"h1": 2}),
    ("# h0 slots=4\nh1 slots=2\n", {"h1": 2}),
    ("   # indented comment\nh1 slots=2\n", {"h1": 2}),
    ("\n \n\t\nh1 slots=2\n\n", {"h1": 2}),
    ("h1 slots=1\r\nh2 slots=2\r\n", {"h1": 1, "h2": 2}),
    ("h1 slots=1\rh2 slots=2\r", {"h1": 1, "h2": 2}),
    ("h1 slots=1\x0ch2 slots=2\n", {"h1": 1}),
    ("h1#rack2 slots=2\n", {"h1#rack2": 2}),
    ("", None),
    ("# only a comment\n\n", None),
    ("h1 # slots=2\n", None),
    ("h1 slots = 2\n", None),
    ("h1 slots=\n", None),
    ("h1 slots=-1\n", None),
    ("h1 slots=two\n", None),
    ("h1 SLOTS=2\n", None),
    ("h1 gpus=2\n", None),
    ("h1\n", None),
    ("slots=2\n", None),
    ("h1 slots=2\nbad line\n", None),
    ("h1 slots=1\nh1 slots=2\n", None),
]


@pytest.mark.parametrize("text, expected", AGREEMENT_CASES)
def test_hostfile_parsing_matches_deepspeed(tmp_path, text, expected):
    path = tmp_path / "hostfile"
    path.write_bytes(text.encode())
    if expected is None:
        with pytest.raises(ValueError):
            fetch_hostfile(str(path))
        with pytest.raises(LaunchError):
            read_hostfile(path)
    else:
        assert dict(fetch_hostfile(str(path))) == expected
        assert dict(read_hostfile(path)) == expected


def test_zero_slots_rejected(tmp_path):
    path = write_hostfile(tmp_path, "h0 slots=1\nh1 slots=0\n")
    # DeepSpeed accepts the line; the check is stricter because the node would have no rank.
    assert dict(fetch_hostfile(str(path))) == {"h0": 1, "h1": 0}
    with pytest.raises(LaunchError) as error:
        read_hostfile(path)
    message = str(error.value)
    assert str(path) in message
    assert "line 2 'h1 slots=0'" in message
    assert "slots must be at least 1" in message


def test_missing_hostfile_rejected(tmp_path):
    path = tmp_path / "absent"
    with pytest.raises(LaunchError) as error:
        check_hostfile(path, num_nodes=2, num_gpus=1)
    assert str(path) in str(error.value)
    assert "not found" in str(error.value)


def test_unreadable_hostfile_rejected(tmp_path, monkeypatch):
    path = write_hostfile(tmp_path, "node0 slots=1\nnode1 slots=1\n")
    # Permission bits do not stop root from reading, so the failed read is simulated.
    def deny(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))
    monkeypatch.setattr(Path, "read_text", deny)
    with pytest.raises(LaunchError) as error:
        check_hostfile(path, num_nodes=2, num_gpus=1)
    assert str(path) in str(error.value)
    assert "not readable" in str(error.value)


def test_binary_hostfile_rejected(tmp_path):
    path = tmp_path / "hostfile"
    path.write_bytes(b"\xff\xfe\x00node0")
    with pytest.raises(LaunchError, match="not readable"):
        read_hostfile(path)


def test_directory_as_hostfile_rejected(tmp_path):
    with pytest.raises(LaunchError, match="is not a file"):
        read_hostfile(tmp_path)


@pytest.mark.parametrize("text, rule", [
    ("", "lists no hosts"),
    ("# only a comment\n", "lists no hosts"),
    ("node0 slots=1\nnode0 slots=1\n", "a second time"),
    ("node0 gpus=1\n", "line 1 'node0 gpus=1' is invalid"),
])
def test_malformed_hostfile_rejected(tmp_path, text, rule):
    path = write_hostfile(tmp_path, text)
    with pytest.raises(LaunchError) as error:
        read_hostfile(path)
    assert rule in str(error.value)
    assert str(path) in str(error.value)


def test_too_few_hosts_rejected(tmp_path):
    path = write_hostfile(tmp_path, "node0 slots=8\n")
    with pytest.raises(LaunchError) as error:
        check_hostfile(path, num_nodes=2, num_gpus=8)
    message = str(error.value)
    assert str(path) in message
    assert "lists 1 hosts (node0), fewer than --num_nodes 2" in message


def test_too_few_slots_rejected(tmp_path):
    path = write_hostfile(tmp_path, "node0 slots=8\nnode1 slots=4\n")
    with pytest.raises(LaunchError) as error:
        check_hostfile(path, num_nodes=2, num_gpus=8)
    message = str(error.value)
    assert str(path) in message
    assert "node1 (slots=4)" in message
    assert "node0" not in message.split("on ")[-1]


def test_world_size_from_hostfile(tmp_path):
    path = write_hostfile(tmp_path, "a slots=8\nb slots=8\nc slots=2\n")
    assert check_hostfile(path, num_nodes=2, num_gpus=8) == 16
    assert check_hostfile(path, num_nodes=3, num_gpus=None) == 18
    assert check_hostfile(path, num_nodes=2, num_gpus=4) == 8


def test_several_nodes_need_hostfile():
    with pytest.raises(LaunchError, match="needs a hostfile"):
        check_hostfile(None, num_nodes=2, num_gpus=1)


def test_entry_point_rejects_smaller_world(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    check_launch_world_size(None)
    check_launch_world_size(2)
    with pytest.raises(LaunchError) as error:
        check_launch_world_size(32)
    assert "world of 2 ranks, but 32 were requested" in str(error.value)


def record_launches(monkeypatch) -> list[list[str]]:
    """Replace the launcher start with a recorder; return the list of commands it receives."""
    started = []

    def record(command, env):
        started.append(command)
        return 0

    monkeypatch.setattr(launching, "run_launcher", record)
    return started


def test_wrapper_stops_before_launch(tmp_path, monkeypatch, capsys):
    path = write_hostfile(tmp_path, "node0 slots=1\n")
    started = record_launches(monkeypatch)
    with pytest.raises(SystemExit) as stop:
        launching.main(["--hostfile", str(path), "--num_nodes", "2", "--num_gpus", "1",
                        "launch/pretrain.py", "--preset", "tiny"])
    assert stop.value.code == 2
    assert started == []
    assert "fewer than --num_nodes 2" in capsys.readouterr().err


def test_wrapper_rejects_zero_slots(tmp_path, monkeypatch, capsys):
    path = write_hostfile(tmp_path, "node0 slots=0\n")
    started = record_launches(monkeypatch)
    with pytest.raises(SystemExit) as stop:
        launching.main(["--hostfile", str(path), "launch/pretrain.py", "--preset", "tiny"])
    assert stop.value.code == 2
    assert started == []
    error = capsys.readouterr().err
    assert f"hostfile {path} line 1 'node0 slots=0' gives slots=0" in error
    assert "slots must be at least 1" in error


NO_SSH = ["--no_ssh", "--master_addr", "127.0.0.1"]


@pytest.mark.parametrize("options, rule", [
    (["--num_nodes", "2", *NO_SSH, "--node_rank", "5"],
     "--node_rank 5 is invalid: with --num_nodes 2 it must be from 0 to 1"),
    (["--num_nodes", "2", *NO_SSH, "--node_rank", "2"],
     "--node_rank 2 is invalid: with --num_nodes 2 it must be from 0 to 1"),
    (["--num_nodes", "2", *NO_SSH, "--node_rank", "-1"],
     "--node_rank -1 is invalid: with --num_nodes 2 it must be from 0 to 1"),
    (["--num_nodes", "2", "--no_ssh", "--master_addr", "127.0.0.1"],
     "--no_ssh needs --node_rank"),
    (["--num_nodes", "2", "--no_ssh", "--node_rank", "0"], "--no_ssh needs --master_addr"),
    (["--num_nodes", "2", "--no_ssh", "--node_rank", "0", "--master_addr", " "],
     "--master_addr is empty"),
    (["--num_nodes", "2", "--node_rank", "1"], "--node_rank 1 is only valid with --no_ssh"),
    (["--num_nodes", "0"], "--num_nodes 0 is invalid: must be at least 1"),
    (["--num_nodes", "-2"], "--num_nodes -2 is invalid: must be at least 1"),
    (["--num_nodes", "2", "--num_gpus", "0"], "--num_gpus 0 is invalid: must be at least 1"),
    (["--num_gpus", "0"], "--num_gpus 0 is invalid: must be at least 1"),
    (["--num_gpus", "-1"], "--num_gpus -1 is invalid: must be at least 1"),
    (["--num_nodes", "2", "--master_port", "0"], "--master_port 0 is invalid"),
    (["--master_port", "65536"], "--master_port 65536 is invalid"),
])
def test_wrapper_rejects_option_out_of_range(tmp_path, monkeypatch, capsys, options, rule):
    path = write_hostfile(tmp_path, "node0 slots=1\nnode1 slots=1\n")
    started = record_launches(monkeypatch)
    with pytest.raises(SystemExit) as stop:
        launching.main(["--hostfile", str(path), *options, "launch/pretrain.py"])
    assert stop.value.code == 2
    assert started == []
    error = capsys.readouterr().err
    assert error.startswith("launch stopped before any process started: ")
    assert rule in error
    assert "Traceback" not in error


def test_negative_rank_count_rejected():
    with pytest.raises(LaunchError, match="-1 ranks requested"):
        launching.deepspeed_command("launch/pretrain.py", [], num_ranks=-1)


def test_no_ssh_local_ranks_follow_own_host(tmp_path):
    path = write_hostfile(tmp_path, "node0 slots=4\nnode1 slots=2\n")
    nodes = launching.NodeLaunch(hostfile=str(path), num_nodes=2, no_ssh=True, node_rank=1,
                                 master_addr="127.0.0.1")
    assert nodes.world_size() == 6
    assert nodes.local_ranks(6) == 2


def test_wrapper_builds_node_command(tmp_path, monkeypatch):
    path = write_hostfile(tmp_path, "node0 slots=1\nnode1 slots=1\n")
    started = record_launches(monkeypatch)
    with pytest.raises(SystemExit) as stop:
        launching.main(["--hostfile", str(path), "--num_nodes", "2", "--num_gpus", "1",
                        "--no_ssh", "--node_rank", "1", "--master_addr", "127.0.0.1",
                        "--master_port", "29999", "launch/pretrain.py", "--preset", "tiny",
                        "train.max_steps=2"])
    assert stop.value.code == 0
    command = started[0]
    script = command.index(str(launching.REPO_ROOT / "launch/pretrain.py"))
    assert command[1:script] == ["--hostfile", str(path), "--num_nodes", "2", "--num_gpus", "1",
                                 "--no_ssh", "--node_rank", "1", "--master_addr", "127.0.0.1",
                                 "--master_port", "29999"]
    assert command[script + 1:] == ["--expected_world_size", "2", "--preset", "tiny",
                                    "train.max_steps=2"]


def test_launcher_options_split_from_script_arguments(tmp_path):
    path = write_hostfile(tmp_path, "node0 slots=2\n")
    nodes, rest = launching.split_launcher_options(
        ["--config", "configs/pretrain.yaml", "--hostfile", str(path), "--num_nodes", "1",
         "train.max_steps=2"])
    assert nodes.hostfile == str(path)
    assert nodes.multi_node
    assert rest == ["--config", "configs/pretrain.yaml", "train.max_steps=2"]
    command, _ = launching.deepspeed_command("launch/pretrain.py", rest, nodes=nodes)
    assert command[command.index("--expected_world_size") + 1] == "2"


def test_single_node_command_passes_world_size():
    command, env = launching.deepspeed_command("launch/pretrain.py", ["train.max_steps=1"],
                                               num_ranks=2, master_port=29998)
    assert command[1:7] == ["--num_gpus", "2", "--master_addr", "127.0.0.1", "--master_port",
                            "29998"]
    assert command[-3:] == ["--expected_world_size", "2", "train.max_steps=1"]


def job_processes(marker: str) -> dict[int, str]:
    """Return pid -> command line of every live process whose command line contains ``marker``."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue  # the process exited while the folder was listed
        if marker.encode() in cmdline:
            found[int(entry.name)] = cmdline.replace(b"\0", b" ").decode(errors="replace")
    return found


def wait_until(condition, timeout_s: float) -> bool:
    """Poll ``condition`` every 0.2 s; return whether it held within ``timeout_s`` seconds."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


def kill_and_wait_for_job(process: subprocess.Popen, marker: str, timeout_s: float) -> dict[int, str]:
    """SIGKILL ``process``; return the processes with ``marker`` still alive after ``timeout_s``."""
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=10)
    wait_until(lambda: not job_processes(marker), timeout_s)
    return job_processes(marker)


def kill_leftovers(process: subprocess.Popen, marker: str) -> None:
    """SIGKILL the session of ``process`` and every process with ``marker``; reap ``process``."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid in job_processes(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait(timeout=10)


# Stands in for the deepspeed runner on its local path: it starts a process and waits for it,
# with no SIGTERM handler of its own. Both processes carry the marker (argv[1]).
FAKE_RUNNER = """import subprocess, sys
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", sys.argv[1]]).wait()
"""
# Starts the fake runner through run_launcher, the way run_deepspeed starts deepspeed.
PARENT = """import os, sys
from bumblebee_dist.launching import run_launcher
run_launcher(sys.argv[1:], dict(os.environ))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_launcher_tree_dies_with_parent(tmp_path):
    runner = tmp_path / "fake_runner.py"
    runner.write_text(FAKE_RUNNER)
    marker = f"tree-marker-{os.getpid()}-{tmp_path.name}"
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(runner), marker],
                              start_new_session=True, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    try:
        # The parent, the runner and the runner's child.
        started = wait_until(lambda: parent.poll() is not None or len(job_processes(marker)) == 3,
                             timeout_s=60)
        assert started, parent.stderr.read().decode()[-3000:]
        assert parent.poll() is None, parent.stderr.read().decode()[-3000:]
        left = kill_and_wait_for_job(parent, marker, timeout_s=10)
        assert left == {}, f"left running: {left}"
    finally:
        kill_leftovers(parent, marker)
