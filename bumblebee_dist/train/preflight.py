"""Checks that run before a multi-node launch and at the start of every rank.

The DeepSpeed launcher (0.19.8, ``deepspeed/launcher/runner.py``) proceeds with the local
machine alone when the hostfile is missing, unless ``--num_nodes`` is above 1. It uses every
host of the hostfile when ``--num_nodes N`` is larger than the number of hosts. A typo in a
path can therefore start a job on fewer ranks than requested. Two checks close that gap:

- ``check_hostfile``, before any process starts: the hostfile exists, is readable, parses as
  DeepSpeed's ``_parse_hostfile`` parses it, gives every host at least 1 slot, and lists at
  least ``num_nodes`` hosts with at least ``num_gpus`` slots each. It returns the world size
  the job will have, which the launch wrapper passes to the entry point;
- ``check_launch_world_size``, at the start of the entry point: the launcher's ``WORLD_SIZE``
  equals that expected size.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from pathlib import Path

# The pattern of DeepSpeed 0.19.8's ``_parse_hostfile``: a host name, blanks, then slots=<count>.
# It is not anchored at the end, so DeepSpeed ignores whatever follows the count: a comment
# ("slots=2 # gpu"), and also other text ("slots=2x" gives 2 slots).
_HOST_LINE = re.compile(r"^(\S+)\s+slots=(\d+)")


class LaunchError(RuntimeError):
    """A launch would start a different world than requested; the message names the fix."""


def read_hostfile(path: str | Path) -> OrderedDict[str, int]:
    """Parse a DeepSpeed hostfile into host name -> slots, in file order.

    A line is accepted exactly when DeepSpeed 0.19.8 accepts it: after stripping blanks, empty
    lines and lines starting with ``#`` are skipped, and every other line must start with
    ``<host> slots=<digits>``. Raises LaunchError naming the file when it is missing, unreadable
    or empty, has another line, names a host twice, or gives a host 0 slots. DeepSpeed accepts
    ``slots=0``, but a node without ranks cannot join the job.
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
    # read_text() turns \r\n and \r into \n, so this splits where DeepSpeed's readlines() does.
    # str.splitlines() would also split at form feeds and other separators that DeepSpeed keeps.
    for number, raw in enumerate(text.split("\n"), start=1):
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
        if slots < 1:
            raise LaunchError(f"hostfile {path} line {number} {line!r} gives slots={slots}: "
                              "slots must be at least 1; remove the host or give its GPU count")
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
        raise LaunchError(f"--num_nodes {num_nodes} is invalid: must be at least 1")
    if num_gpus is not None and num_gpus < 1:
        raise LaunchError(f"--num_gpus {num_gpus} is invalid: must be at least 1")
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
