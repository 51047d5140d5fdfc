"""Launch checks that run before any DeepSpeed process starts, and at the start of each rank."""

import os
from pathlib import Path

import pytest

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


def test_wrapper_stops_before_launch(tmp_path, monkeypatch, capsys):
    path = write_hostfile(tmp_path, "node0 slots=1\n")
    started = []
    monkeypatch.setattr(os, "execvpe", lambda *args: started.append(args))
    with pytest.raises(SystemExit) as stop:
        launching.main(["--hostfile", str(path), "--num_nodes", "2", "--num_gpus", "1",
                        "launch/pretrain.py", "--preset", "tiny"])
    assert stop.value.code == 2
    assert started == []
    assert "fewer than --num_nodes 2" in capsys.readouterr().err


def test_wrapper_builds_node_command(tmp_path, monkeypatch):
    path = write_hostfile(tmp_path, "node0 slots=1\nnode1 slots=1\n")
    started = []
    monkeypatch.setattr(os, "execvpe", lambda *args: started.append(args))
    launching.main(["--hostfile", str(path), "--num_nodes", "2", "--num_gpus", "1", "--no_ssh",
                    "--node_rank", "1", "--master_addr", "127.0.0.1", "--master_port", "29999",
                    "launch/pretrain.py", "--preset", "tiny", "train.max_steps=2"])
    command = started[0][1]
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
