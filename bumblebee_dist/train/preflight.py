"""Checks that run before a multi-node launch and at the start of every rank.

The DeepSpeed launcher (0.19.8, ``deepspeed/launcher/runner.py``) proceeds with the local
machine alone when the hostfile is missing. It takes the first N hosts when ``--num_nodes N``
is larger than the hostfile. A typo in a path can therefore start a job on fewer ranks than
requested. Two checks close that gap:

- ``check_hostfile``, before any process starts: the hostfile exists, is readable, parses in
  DeepSpeed's format (``<host> slots=<n>`` per line, ``#`` comments) and lists at least
  ``num_nodes`` hosts with at least ``num_gpus`` slots each. It returns the world size the job
  will have, which the launch wrapper passes to the entry point;
- ``check_launch_world_size``, at the start of the entry point: the launcher's ``WORLD_SIZE``
  equals that expected size.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from pathlib import Path

# Same pattern as DeepSpeed's own hostfile parser: a host name, blanks, then slots=<count>.
_HOST_LINE = re.compile(r"^(\S+)\s+slots=(\d+)\s*$")


class LaunchError(RuntimeError):
    """A launch would start a different world than requested; the message names the fix."""


def read_hostfile(path: str | Path) -> OrderedDict[str, int]:
    """Parse a DeepSpeed hostfile into host name -> slots, in file order.

    Raises LaunchError naming the file when it is missing, unreadable, empty, has a line that
    is not ``<host> slots=<n>``, or names a host twice.
    """
    path = Path(path)
    if not path.exists():
        raise LaunchError(f"hostfile {path} not found; write one line '<host> slots=<gpus>' "
                          "per node, or pass the right path with --hostfile")
    if not path.is_file():
        raise LaunchError(f"hostfile {path} is not a file")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise LaunchError(f"hostfile {path} is not readable: {error}") from error
    hosts: OrderedDict[str, int] = OrderedDict()
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _HOST_LINE.match(line)
        if match is None:
            raise LaunchError(f"hostfile {path} line {number} {line!r} is invalid: "
                              "expected '<host> slots=<count>'")
        host, slots = match.group(1), int(match.group(2))
        if host in hosts:
            raise LaunchError(f"hostfile {path} line {number} lists host {host!r} a second time")
        hosts[host] = slots
    if not hosts:
        raise LaunchError(f"hostfile {path} lists no hosts; expected lines '<host> slots=<count>'")
    return hosts


def check_hostfile(path: str | Path | None, num_nodes: int, num_gpus: int | None) -> int:
    """Check that ``path`` can host ``num_nodes`` nodes of ``num_gpus`` ranks; return the world size.

    ``num_gpus`` None means every slot of each chosen host, as DeepSpeed does. The chosen hosts
    are the first ``num_nodes`` of the file, which is the order DeepSpeed uses.
    """
    if num_nodes < 1:
        raise LaunchError(f"--num_nodes {num_nodes} is invalid: must be >= 1")
    if num_gpus is not None and num_gpus < 1:
        raise LaunchError(f"--num_gpus {num_gpus} is invalid: must be >= 1")
    if path is None:
        raise LaunchError(f"--num_nodes {num_nodes} needs a hostfile: pass --hostfile FILE "
                          "with one line '<host> slots=<gpus>' per node")
    hosts = read_hostfile(path)
    if len(hosts) < num_nodes:
        raise LaunchError(f"hostfile {path} lists {len(hosts)} hosts ({', '.join(hosts)}), "
                          f"fewer than --num_nodes {num_nodes}; add the missing hosts or lower "
                          "--num_nodes")
    chosen = list(hosts.items())[:num_nodes]
    if num_gpus is None:
        return sum(slots for _, slots in chosen)
    short = [f"{host} (slots={slots})" for host, slots in chosen if slots < num_gpus]
    if short:
        raise LaunchError(f"hostfile {path} has fewer slots than --num_gpus {num_gpus} on "
                          f"{', '.join(short)}; raise their slots or lower --num_gpus")
    return num_nodes * num_gpus


def check_launch_world_size(expected: int | None) -> None:
    """Raise LaunchError unless the launcher's ``WORLD_SIZE`` equals ``expected`` (None skips).

    Run at the start of an entry point, before the process group forms, so a smaller world
    stops every rank instead of training on it.
    """
    if expected is None:
        return
    started = int(os.environ.get("WORLD_SIZE", "1"))
    if started != expected:
        raise LaunchError(
            f"the launcher started a world of {started} ranks, but {expected} were requested "
            "(--expected_world_size); check the hostfile, --num_nodes and --num_gpus of the "
            "deepspeed command")
