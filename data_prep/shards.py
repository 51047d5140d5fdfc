"""Writer side of the shard format: WebDataset tars of event blocks, checksums and the manifest.

A shard is a tar whose members are ``<key>.<column>.npy`` with key ``<shard name>-<block:04d>``,
one key per ``EventBlock`` (``bumblebee_dist/data/block.py``), written in block order and, within
a block, in column order. Every tar header is fixed (mtime 0, uid and gid 0, empty user and group
names, mode 0444, USTAR format), so the same blocks always give the same bytes and the same
SHA-256.

A shard is written to a hidden temporary name in its final folder, flushed and fsync-ed, and then
renamed over the final name (``os.replace``, atomic on POSIX file systems); the folder is fsync-ed
so the rename survives a crash. A writer that fails half-way removes its temporary file and
leaves no file under the final name, and a retry replaces the shard as a whole. An empty
shard is never written. ``write_json_atomic`` does the same for the manifest.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from bumblebee_dist.data.block import EventBlock, concat_blocks
from bumblebee_dist.features import PT_FLOOR_GEV, fixed_zero_slots
from bumblebee_dist.tokens import ETA, MASS, PT

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT_VERSION = 1
DEFAULT_BLOCK_EVENTS = 2000
_READ_CHUNK = 1 << 20


class EmptyShardError(ValueError):
    """A shard would hold no event; no file is written."""


def shard_relpath(split: str, sample: str, index: int) -> str:
    """Return the path of a shard relative to the data set folder."""
    return f"shards/{split}/{sample}-{index:05d}.tar"


def sha256_file(path: str | Path) -> str:
    """Return the hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(_READ_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def split_block(block: EventBlock, block_events: int) -> list[EventBlock]:
    """Cut a block into blocks of ``block_events`` events; only the last may hold fewer."""
    if block_events < 1:
        raise ValueError(f"block_events={block_events} must be >= 1")
    return [block.take_events(np.arange(start, min(start + block_events, block.num_events)))
            for start in range(0, block.num_events, block_events)]


def _tar_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _fsync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _write_atomic(path: Path, write: Any) -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, fsync it, rename it to ``path``.

    On any exception the temporary file is removed and the exception propagates.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def write_shard(path: str | Path, blocks: Iterable[EventBlock], *,
                block_events: int = DEFAULT_BLOCK_EVENTS) -> "ShardInfo":
    """Write the events of ``blocks`` as one shard at ``path``, re-blocked to ``block_events``.

    Every block is validated before it is written. Raises EmptyShardError, writing nothing, when
    the blocks hold no event. Returns the shard's event and token counts and SHA-256.
    """
    path = Path(path)
    parts = [block for block in blocks if block.num_events > 0]
    if not parts:
        raise EmptyShardError(f"shard {path} would hold no event; nothing was written")
    events = concat_blocks(parts)
    key_stem = path.name.removesuffix(".tar")

    def write(file: Any) -> None:
        with tarfile.open(fileobj=file, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for number, block in enumerate(split_block(events, block_events)):
                key = f"{key_stem}-{number:04d}"
                block.validate(f"shard {path}, block {key}")
                for member, payload in block.to_members().items():
                    tar.addfile(_tar_info(f"{key}.{member}", len(payload)), io.BytesIO(payload))

    _write_atomic(path, write)
    return ShardInfo(path=path, events=events.num_events, tokens=events.num_tokens,
                     sha256=sha256_file(path), stats=FeatureMoments.of_block(events))


def read_shard(path: str | Path) -> list[EventBlock]:
    """Read a shard written by ``write_shard`` back into its blocks, in order.

    Raises ValueError naming the shard when a key repeats after another key began.
    """
    path = Path(path)
    blocks: list[EventBlock] = []
    members: dict[str, bytes] = {}
    current = None
    seen: set[str] = set()
    with tarfile.open(path, mode="r:") as tar:
        for info in tar:
            key, _, column = info.name.partition(".")
            if key != current:
                if current is not None:
                    blocks.append(EventBlock.from_members(members, f"{path}:{current}"))
                if key in seen:
                    raise ValueError(f"shard {path}: key {key!r} repeats after another key")
                seen.add(key)
                current, members = key, {}
            members[column] = tar.extractfile(info).read()
    if current is not None:
        blocks.append(EventBlock.from_members(members, f"{path}:{current}"))
    return blocks


@dataclass
class FeatureMoments:
    """Count, mean and sum of squared deviations of log pT, eta and m, mergeable across shards.

    Left out, as in ``bumblebee_dist.features``: MET's eta and m slots and the neutrinos' m,
    which are fixed at 0. log pT uses the floor ``PT_FLOOR_GEV``.
    """

    moments: dict[str, list[float]] = field(
        default_factory=lambda: {name: [0.0, 0.0, 0.0] for name in ("log_pt", "eta", "m")})

    @classmethod
    def of_block(cls, block: EventBlock) -> "FeatureMoments":
        """Compute the moments of every token of ``block``."""
        features = block.features.astype(np.float64)
        zeros = fixed_zero_slots(block.pdg_id)
        columns = {
            "log_pt": np.log(np.maximum(features[:, PT], PT_FLOOR_GEV)),
            "eta": features[~zeros[:, ETA], ETA],
            "m": features[~zeros[:, MASS], MASS],
        }
        result = cls()
        for name, column in columns.items():
            mean = float(column.mean()) if column.size else 0.0
            result.moments[name] = [float(column.size), mean,
                                    float(((column - mean) ** 2).sum())]
        return result

    def merge(self, other: "FeatureMoments") -> None:
        """Add another set of moments (Chan et al. pairwise update)."""
        for name, (count_b, mean_b, m2_b) in other.moments.items():
            count_a, mean_a, m2_a = self.moments[name]
            count = count_a + count_b
            if count == 0:
                continue
            delta = mean_b - mean_a
            mean = mean_a + delta * count_b / count
            m2 = m2_a + m2_b + delta * delta * count_a * count_b / count
            self.moments[name] = [count, mean, m2]

    def to_feature_stats(self) -> dict[str, dict[str, float]]:
        """Return the manifest's ``feature_stats``: population mean and std per feature."""
        stats = {}
        for name, (count, mean, m2) in self.moments.items():
            if count == 0:
                raise ValueError(f"feature_stats[{name!r}]: the train split holds no token")
            stats[name] = {"mean": mean, "std": float(np.sqrt(m2 / count))}
        return stats


@dataclass
class ShardInfo:
    """What a written shard holds: counts, checksum and feature moments."""

    path: Path
    events: int
    tokens: int
    sha256: str
    stats: FeatureMoments


class ShardStreamWriter:
    """Chunk a stream of blocks into shards of at most ``shard_events`` events.

    Every shard but the last holds exactly ``shard_events`` events. Shards are named
    ``<folder>/<prefix>-<index:05d>.tar`` from index ``first_index`` on. Empty input blocks are
    skipped, and no empty shard is written.
    """

    def __init__(self, folder: str | Path, prefix: str, shard_events: int, *,
                 block_events: int = DEFAULT_BLOCK_EVENTS, first_index: int = 0):
        if shard_events < 1:
            raise ValueError(f"shard_events={shard_events} must be >= 1")
        self.folder = Path(folder)
        self.prefix = prefix
        self.shard_events = shard_events
        self.block_events = block_events
        self.next_index = first_index
        self.written: list[ShardInfo] = []
        self._pending: list[EventBlock] = []
        self._pending_events = 0

    def add(self, block: EventBlock) -> None:
        """Queue the events of ``block``; write every shard that becomes full."""
        if block.num_events == 0:
            return
        self._pending.append(block)
        self._pending_events += block.num_events
        while self._pending_events >= self.shard_events:
            events = concat_blocks(self._pending)
            head = events.take_events(np.arange(self.shard_events))
            rest = events.take_events(np.arange(self.shard_events, events.num_events))
            self._write(head)
            self._pending = [rest] if rest.num_events else []
            self._pending_events = rest.num_events

    def close(self) -> list[ShardInfo]:
        """Write the remaining events as the last shard (if any) and return every shard."""
        if self._pending_events:
            self._write(concat_blocks(self._pending))
            self._pending, self._pending_events = [], 0
        return self.written

    def _write(self, block: EventBlock) -> None:
        path = self.folder / f"{self.prefix}-{self.next_index:05d}.tar"
        self.written.append(write_shard(path, [block], block_events=self.block_events))
        self.next_index += 1


def write_json_atomic(path: str | Path, content: dict[str, Any]) -> None:
    """Write ``content`` as indented JSON, keys in insertion order, atomically."""
    payload = (json.dumps(content, indent=2) + "\n").encode()
    _write_atomic(Path(path), lambda file: file.write(payload))


def iter_shard_events(paths: Iterable[str | Path]) -> Iterator[EventBlock]:
    """Yield every block of the given shards, in order."""
    for path in paths:
        yield from read_shard(path)
