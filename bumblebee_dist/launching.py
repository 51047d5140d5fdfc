"""Start DeepSpeed training jobs: the same command a user would type, checked first.

On a machine without CUDA the DeepSpeed launcher runs CPU ranks over gloo when
``DS_ACCELERATOR=cpu`` is set, so the default here is one rank per GPU when GPUs exist and
two CPU ranks otherwise.

Run as a module, this file is the launch wrapper for one or many nodes. It checks its options
and the hostfile (``bumblebee_dist.train.preflight``) before any process starts, then runs the
``deepspeed`` launcher as its child, passing the expected world size to the entry point:

    python -m bumblebee_dist.launching --hostfile hostfile --num_nodes 4 --num_gpus 8 \\
        launch/pretrain.py --config configs/pretrain.yaml train.run_dir=/shared/runs/pt1

The launcher child gets SIGTERM when the process that started it dies, even by SIGKILL (Linux
only, through ``prctl(PR_SET_PDEATHSIG)``), and passes SIGTERM on to its launcher and ranks
processes. DeepSpeed 0.19.8's ``deepspeed`` runner does not forward SIGTERM when it launches on
this node alone (``--no_ssh`` or one node), so the child runs that runner behind a handler that
stops its whole process tree.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import runpy
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import psutil
import torch

from bumblebee_dist.train.preflight import LaunchError, check_hostfile, read_hostfile

LOG = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[1]
WORLD_SIZE_OPTION = "--expected_world_size"
PR_SET_PDEATHSIG = 1  # option number from <linux/prctl.h>
# Seconds the launcher child gives its processes to exit after SIGTERM before it sends SIGKILL.
STOP_TIMEOUT_S = 10.0
# Runs the deepspeed runner (argv[1]) with SIGTERM forwarding. The -P flag keeps the working
# folder off sys.path, so a user's folder named like a package cannot shadow it.
_FORWARDING_RUNNER = ("import sys\n"
                      "from bumblebee_dist.launching import run_launcher_script\n"
                      "run_launcher_script(sys.argv[1:])\n")


@dataclass
class NodeLaunch:
    """Multi-node settings of the DeepSpeed launcher (``deepspeed --help`` names the same)."""

    hostfile: str | None = None  # '<host> slots=<n>' per line
    num_nodes: int = 1  # nodes to use, the first ones of the hostfile
    num_gpus: int | None = None  # ranks per node; None: every slot of the host
    node_rank: int | None = None  # this node's rank; only with no_ssh
    no_ssh: bool = False  # start this node's ranks only; run one launcher per node yourself
    master_addr: str | None = None  # rendezvous host; None: first host's address (not with no_ssh)
    master_port: int | None = None  # rendezvous port; None: a free local port

    def __post_init__(self) -> None:
        """Check each option against its valid range (LaunchError names the option and value)."""
        if self.num_nodes < 1:
            raise LaunchError(f"--num_nodes {self.num_nodes} is invalid: must be at least 1")
        if self.num_gpus is not None and self.num_gpus < 1:
            raise LaunchError(f"--num_gpus {self.num_gpus} is invalid: must be at least 1")
        if self.master_port is not None and not 1 <= self.master_port <= 65535:
            raise LaunchError(f"--master_port {self.master_port} is invalid: must be a TCP port "
                              "from 1 to 65535")
        if self.master_addr is not None and not self.master_addr.strip():
            raise LaunchError("--master_addr is empty; pass the rendezvous host name or address")
        if self.no_ssh:
            self._check_no_ssh()
        elif self.node_rank is not None:
            raise LaunchError(f"--node_rank {self.node_rank} is only valid with --no_ssh; without "
                              "it the launcher starts every node over ssh and ignores the rank")

    def _check_no_ssh(self) -> None:
        if self.node_rank is None:
            raise LaunchError("--no_ssh needs --node_rank: each node's launcher must know its rank")
        if not 0 <= self.node_rank < self.num_nodes:
            raise LaunchError(f"--node_rank {self.node_rank} is invalid: with --num_nodes "
                              f"{self.num_nodes} it must be from 0 to {self.num_nodes - 1}")
        if self.master_addr is None:
            raise LaunchError("--no_ssh needs --master_addr: pass the host name or address of the "
                              "--node_rank 0 node, as every node reaches it")

    @property
    def multi_node(self) -> bool:
        """True when a hostfile or more than one node is requested."""
        return self.hostfile is not None or self.num_nodes > 1

    def world_size(self) -> int:
        """Check the hostfile and return the world size it gives (LaunchError otherwise)."""
        return check_hostfile(self.hostfile, self.num_nodes, self.num_gpus)

    def local_ranks(self, world_size: int) -> int:
        """Return the number of ranks this machine starts: its host's with ``no_ssh``, else all."""
        if not self.no_ssh:
            return world_size
        if self.num_gpus is not None:
            return self.num_gpus
        return list(read_hostfile(self.hostfile).values())[self.node_rank]

    def launcher_options(self) -> list[str]:
        """Return the matching ``deepspeed`` launcher options."""
        options = ["--hostfile", str(self.hostfile), "--num_nodes", str(self.num_nodes)]
        if self.num_gpus is not None:
            options += ["--num_gpus", str(self.num_gpus)]
        if self.no_ssh:
            options += ["--no_ssh", "--node_rank", str(self.node_rank)]
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
    if num_ranks is not None and num_ranks < 1:
        raise LaunchError(f"{num_ranks} ranks requested; the number of ranks must be at least 1")
    nodes = nodes or NodeLaunch()
    if nodes.multi_node:
        world_size = nodes.world_size()
        local_ranks = nodes.local_ranks(world_size)
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
    returncode = run_launcher(command, env)
    if returncode != 0:
        raise subprocess.CalledProcessError(returncode, command)


def run_launcher(command: list[str], env: dict[str, str]) -> int:
    """Run a ``deepspeed`` command as a child that dies with this process; return its exit status.

    The job runs in the caller's folder, so relative data and run paths resolve from there. On
    KeyboardInterrupt the child gets SIGTERM, which stops its ranks, and the interrupt is re-raised
    once the child has exited.

    NOTE: Linux sends the parent-death signal when the thread that started the child exits, so
    call this from a thread that lives as long as the job (the main thread, in this package).
    """
    process = subprocess.Popen([sys.executable, "-P", "-c", _FORWARDING_RUNNER, *command],
                               env=env, preexec_fn=_parent_death_signal())
    try:
        return process.wait()
    except KeyboardInterrupt:
        process.terminate()
        process.wait()
        raise


def _parent_death_signal() -> Callable[[], None] | None:
    """Return a ``preexec_fn`` that gives the child SIGTERM when this process dies, or None.

    Returns None where ``prctl`` is unavailable (outside Linux), and there the child outlives a
    killed parent.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent_pid = os.getpid()

    def set_parent_death_signal() -> None:
        # A failed prctl (a seccomp filter, say) only leaves the child without the signal.
        prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(signal.SIGTERM), ctypes.c_ulong(0),
              ctypes.c_ulong(0), ctypes.c_ulong(0))
        # The parent may have died between fork and prctl, and then no signal would come.
        if os.getppid() != parent_pid:
            os.kill(os.getpid(), signal.SIGTERM)

    return set_parent_death_signal


def run_launcher_script(argv: list[str]) -> None:
    """Run the ``deepspeed`` runner script ``argv[0]`` here; stop its process tree on SIGTERM.

    The runner replaces this handler with its own only on the pdsh path over several nodes,
    where its handler also stops the remote ranks.
    """
    signal.signal(signal.SIGTERM, _stop_process_tree)
    sys.argv = list(argv)
    runpy.run_path(argv[0], run_name="__main__")


def _stop_process_tree(signum: int, frame) -> None:
    # DeepSpeed's launch.py stops its ranks on SIGTERM too. Signaling every descendant also
    # covers ranks that launch.py started before it installed its own handler.
    children = psutil.Process().children(recursive=True)
    for child in children:
        try:
            child.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(children, timeout=STOP_TIMEOUT_S)
    for child in alive:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    sys.exit(128 + signum)


def _node_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=add_help, allow_abbrev=False,
                                     prog="python -m bumblebee_dist.launching",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--hostfile", help="DeepSpeed hostfile: '<host> slots=<n>' per line")
    parser.add_argument("--num_nodes", type=int, default=1,
                        help="nodes to use, at least 1 (default 1)")
    parser.add_argument("--num_gpus", type=int, default=None,
                        help="ranks per node, at least 1 (default: every slot; one node: every "
                             "GPU, or 2 CPU ranks)")
    parser.add_argument("--node_rank", type=int, default=None,
                        help="this node's rank, 0 to num_nodes - 1; only with --no_ssh")
    parser.add_argument("--no_ssh", action="store_true",
                        help="start this node's ranks only; run the command once per node, with "
                             "--node_rank and --master_addr")
    parser.add_argument("--master_addr", default=None,
                        help="rendezvous host (default: the first address that `hostname -I` "
                             "prints on the first host, over ssh; required with --no_ssh)")
    parser.add_argument("--master_port", type=int, default=None,
                        help="rendezvous TCP port, 1 to 65535 (default: a free local port)")
    return parser


def _node_launch(parsed: argparse.Namespace) -> NodeLaunch:
    return NodeLaunch(hostfile=parsed.hostfile, num_nodes=parsed.num_nodes,
                      num_gpus=parsed.num_gpus, node_rank=parsed.node_rank,
                      no_ssh=parsed.no_ssh, master_addr=parsed.master_addr,
                      master_port=parsed.master_port)


def main(argv: list[str] | None = None) -> None:
    """Check the launch, then run the ``deepspeed`` launcher and exit with its status."""
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
    try:
        returncode = run_launcher(command, env)
    except KeyboardInterrupt:
        raise SystemExit(128 + signal.SIGINT) from None
    # A launcher killed by a signal reports -signum; a shell reports 128 + signum.
    raise SystemExit(returncode if returncode >= 0 else 128 - returncode)


if __name__ == "__main__":
    main()
