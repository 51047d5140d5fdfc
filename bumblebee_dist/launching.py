"""Start DeepSpeed training jobs from Python: the same command a user would type.

On a machine without CUDA the DeepSpeed launcher runs CPU ranks over gloo when
``DS_ACCELERATOR=cpu`` is set, so the default here is one rank per GPU when GPUs exist and
two CPU ranks otherwise.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import torch

LOG = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[1]


def default_num_ranks() -> int:
    """One rank per visible GPU, or 2 CPU ranks without a GPU."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 2


def free_port() -> int:
    """Ask the kernel for a free TCP port on 127.0.0.1 for the rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def deepspeed_command(script: str, args: list[str], *, num_ranks: int | None = None,
                      master_port: int | None = None) -> tuple[list[str], dict[str, str]]:
    """Build the ``deepspeed`` command line and environment for one node.

    ``script`` is a path relative to the repository root, for example ``launch/pretrain.py``.
    """
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or shutil.which("deepspeed")
    if launcher is None:
        raise FileNotFoundError(
            "the deepspeed launcher is not on PATH; install the project with `make install` "
            "or `pip install -e .` in the active environment")
    script_path = REPO_ROOT / script
    if not script_path.is_file():
        raise FileNotFoundError(f"entry point {script_path} not found; run from a checkout of the project")
    num_ranks = num_ranks or default_num_ranks()
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("PYTHONUNBUFFERED", "1")
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
        # One thread per rank keeps 2 ranks from oversubscribing a small CPU machine.
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // num_ranks)))
    command = [launcher, "--num_gpus", str(num_ranks), "--master_addr", "127.0.0.1",
               "--master_port", str(master_port or free_port()), str(script_path), *args]
    return command, env


def run_deepspeed(script: str, args: list[str], *, num_ranks: int | None = None) -> None:
    """Run a DeepSpeed job to completion; raise CalledProcessError naming the command on failure."""
    command, env = deepspeed_command(script, args, num_ranks=num_ranks)
    LOG.info("launching: %s", " ".join(command))
    subprocess.run(command, env=env, cwd=REPO_ROOT, check=True)
