"""Start DeepSpeed training jobs: the same command a user would type, checked first.

On a machine without CUDA the DeepSpeed launcher runs CPU ranks over gloo when
``DS_ACCELERATOR=cpu`` is set, so the default here is one rank per GPU when GPUs exist and
two CPU ranks otherwise.

Run as a module, this file is the launch wrapper for one or many nodes. It checks the hostfile
(``bumblebee_dist.train.preflight``) before any process starts, then replaces itself with the
``deepspeed`` launcher, passing the expected world size to the entry point:

    python -m bumblebee_dist.launching --hostfile hostfile --num_nodes 4 --num_gpus 8 \\
        launch/pretrain.py --config configs/pretrain.yaml train.run_dir=/shared/runs/pt1
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from bumblebee_dist.train.preflight import LaunchError, check_hostfile

LOG = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[1]
WORLD_SIZE_OPTION = "--expected_world_size"


@dataclass
class NodeLaunch:
    """Multi-node settings of the DeepSpeed launcher (``deepspeed --help`` names the same)."""

    hostfile: str | None = None  # '<host> slots=<n>' per line
    num_nodes: int = 1  # nodes to use, the first ones of the hostfile
    num_gpus: int | None = None  # ranks per node; None: every slot of the host
    node_rank: int | None = None  # this node's rank; only with no_ssh
    no_ssh: bool = False  # start this node's ranks only; run one launcher per node yourself
    master_addr: str | None = None  # rendezvous host; None: DeepSpeed takes the first host
    master_port: int | None = None  # rendezvous port; None: a free local port

    @property
    def multi_node(self) -> bool:
        """True when a hostfile or more than one node is requested."""
        return self.hostfile is not None or self.num_nodes > 1

    def world_size(self) -> int:
        """Check the hostfile and return the world size it gives (LaunchError otherwise)."""
        return check_hostfile(self.hostfile, self.num_nodes, self.num_gpus)

    def launcher_options(self) -> list[str]:
        """Return the matching ``deepspeed`` launcher options."""
        options = ["--hostfile", str(self.hostfile), "--num_nodes", str(self.num_nodes)]
        if self.num_gpus is not None:
            options += ["--num_gpus", str(self.num_gpus)]
        if self.no_ssh:
            options += ["--no_ssh", "--node_rank", str(self.node_rank or 0)]
        if self.master_addr:
            options += ["--master_addr", self.master_addr]
        return options


def default_num_ranks() -> int:
    """Return one rank per visible GPU, or 2 CPU ranks without a GPU."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 2


def free_port() -> int:
    """Ask the kernel for a free TCP port on 127.0.0.1 for the rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _launcher_path() -> str:
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or shutil.which("deepspeed")
    if launcher is None:
        raise FileNotFoundError(
            "the deepspeed launcher is not on PATH; install the project with `make install` "
            "or `pip install -e .` in the active environment")
    return launcher


def _environment(local_ranks: int) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("PYTHONUNBUFFERED", "1")
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
        # Spread the cores over the ranks of this machine, so they do not oversubscribe it.
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // local_ranks)))
    return env


def deepspeed_command(script: str, args: list[str], *, num_ranks: int | None = None,
                      master_port: int | None = None,
                      nodes: NodeLaunch | None = None) -> tuple[list[str], dict[str, str]]:
    """Build the ``deepspeed`` command line and environment, after the pre-launch checks.

    ``script`` is a path relative to the repository root, for example ``launch/pretrain.py``.
    Without ``nodes`` (or with one node and no hostfile) the job runs ``num_ranks`` ranks on
    this machine. With ``nodes`` the hostfile is checked first (LaunchError names what it
    lacks). The world size the job should have is passed to the script as
    ``--expected_world_size``, right after the script path, so the entry point can stop a
    smaller world.
    """
    launcher = _launcher_path()
    script_path = REPO_ROOT / script
    if not script_path.is_file():
        raise FileNotFoundError(f"entry point {script_path} not found; run from a checkout of the project")
    nodes = nodes or NodeLaunch()
    if nodes.multi_node:
        world_size = nodes.world_size()
        local_ranks = world_size // nodes.num_nodes if nodes.no_ssh else world_size
        options = nodes.launcher_options()
    else:
        world_size = local_ranks = num_ranks or nodes.num_gpus or default_num_ranks()
        options = ["--num_gpus", str(world_size), "--master_addr", nodes.master_addr or "127.0.0.1"]
    port = master_port or nodes.master_port or free_port()
    command = [launcher, *options, "--master_port", str(port), str(script_path),
               WORLD_SIZE_OPTION, str(world_size), *args]
    return command, _environment(local_ranks)


def split_launcher_options(args: list[str]) -> tuple[NodeLaunch, list[str]]:
    """Take the multi-node launcher options out of ``args``; return them and the rest in order."""
    parser = _node_parser(add_help=False)
    known, rest = parser.parse_known_args(args)
    return _node_launch(known), rest


def run_deepspeed(script: str, args: list[str], *, num_ranks: int | None = None) -> None:
    """Run a DeepSpeed job to completion; raise CalledProcessError naming the command on failure.

    ``args`` may hold the launcher options of ``NodeLaunch`` (``--hostfile``, ``--num_nodes``,
    ...); they are checked and go to the launcher, the rest goes to the script.
    """
    nodes, script_args = split_launcher_options(args)
    command, env = deepspeed_command(script, script_args, num_ranks=num_ranks, nodes=nodes)
    LOG.info("launching: %s", " ".join(command))
    # The job runs in the caller's folder, so relative data and run paths resolve from there.
    subprocess.run(command, env=env, check=True)


def _node_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=add_help, allow_abbrev=False,
                                     prog="python -m bumblebee_dist.launching",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--hostfile", help="DeepSpeed hostfile: '<host> slots=<n>' per line")
    parser.add_argument("--num_nodes", type=int, default=1, help="nodes to use (default 1)")
    parser.add_argument("--num_gpus", type=int, default=None,
                        help="ranks per node (default: every slot; one node: every GPU, or 2 CPU ranks)")
    parser.add_argument("--node_rank", type=int, default=None, help="this node's rank, with --no_ssh")
    parser.add_argument("--no_ssh", action="store_true",
                        help="start this node's ranks only; run the command once per node")
    parser.add_argument("--master_addr", default=None, help="rendezvous host (default: first host)")
    parser.add_argument("--master_port", type=int, default=None, help="rendezvous TCP port")
    return parser


def _node_launch(parsed: argparse.Namespace) -> NodeLaunch:
    if parsed.no_ssh and parsed.node_rank is None:
        raise LaunchError("--no_ssh needs --node_rank: each node's launcher must know its rank")
    return NodeLaunch(hostfile=parsed.hostfile, num_nodes=parsed.num_nodes,
                      num_gpus=parsed.num_gpus, node_rank=parsed.node_rank,
                      no_ssh=parsed.no_ssh, master_addr=parsed.master_addr,
                      master_port=parsed.master_port)


def main(argv: list[str] | None = None) -> None:
    """Check the launch, then replace this process with the ``deepspeed`` launcher."""
    parser = _node_parser()
    parser.add_argument("script", help="entry point relative to the repository root, e.g. launch/pretrain.py")
    parser.add_argument("script_args", nargs=argparse.REMAINDER, help="arguments of the entry point")
    parsed = parser.parse_args(argv)
    try:
        command, env = deepspeed_command(parsed.script, parsed.script_args,
                                         nodes=_node_launch(parsed))
    except (LaunchError, FileNotFoundError) as error:
        print(f"launch stopped before any process started: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    print("launching: " + " ".join(command), file=sys.stderr, flush=True)
    os.execvpe(command[0], command, env)


if __name__ == "__main__":
    main()
