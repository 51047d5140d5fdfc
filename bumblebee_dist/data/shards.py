"""Reader side of the shard format: the manifest and the WebDataset tar shards it lists.

A shard is a tar whose members are ``<key>.<column>.npy``; the members of one key are adjacent and
together form one ``EventBlock``. Shards are read as a stream with ``tarfile`` (no seeking), and
every member is decoded with ``np.load(allow_pickle=False)``, so nothing in a shard is ever
unpickled or executed. The writer lives in ``data_prep``; this module only reads and validates.

A shard is corrupt in any of these cases:

- it cannot be read as a tar, or a member is truncated;
- a key repeats after another key started (interleaved samples);
- a member has an unexpected or pickle-based extension, or a block breaks the block format;
- its event count or SHA-256 differs from the manifest.

Strict readers raise ``ShardError`` naming the shard and the member. Tolerant readers skip the
whole shard, log one warning for it and count it, so a shard contributes all its events or none.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from bumblebee_dist.data.block import COLUMN_DTYPES, BlockFormatError, EventBlock

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
FEATURE_STAT_NAMES = ("log_pt", "eta", "m")

# Extensions that WebDataset, torch or joblib decode with pickle. They are rejected by name,
# before any byte of the member is interpreted.
PICKLE_EXTENSIONS = frozenset({"pyd", "pickle", "pkl", "pth", "pt", "joblib", "dill", "cpkl"})
BLOCK_MEMBER_SUFFIXES = frozenset(f"{name}.npy" for name in COLUMN_DTYPES)

_READ_CHUNK = 1 << 20


class ShardError(ValueError):
    """A shard that cannot be read; the message names the shard and, where known, the member."""


class ManifestError(ValueError):
    """An invalid manifest; the message names the file and the field."""


@dataclass(frozen=True)
class ShardEntry:
    """One shard as listed in the manifest; ``path`` is relative to the data set folder."""

    path: str
    split: str
    sample: str
    events: int
    tokens: int
    sha256: str


@dataclass
class Manifest:
    """The validated content of a data set's ``manifest.json``."""

    path: Path
    format_version: int
    samples: list[dict[str, Any]]
    shards: list[ShardEntry]
    feature_stats: dict[str, dict[str, float]]
    raw: dict[str, Any] = field(repr=False)
    sha256: str = ""  # hex SHA-256 of the file, recorded by training as data_manifest_sha256

    @property
    def root(self) -> Path:
        """Data set folder that shard paths are relative to."""
        return self.path.parent

    def shards_of(self, split: str) -> list[ShardEntry]:
        """Shards of one split, in manifest order; raise ManifestError for an unknown split."""
        if split not in SPLITS:
            raise ManifestError(f"{self.path}: split {split!r} is unknown; valid splits: {SPLITS}")
        return [entry for entry in self.shards if entry.split == split]

    def shard_path(self, entry: ShardEntry) -> Path:
        """Absolute path of a shard."""
        return self.root / entry.path


def read_manifest(path: str | Path) -> Manifest:
    """Read and validate a manifest; ``path`` is the JSON file or the data set folder.

    Raises ManifestError naming the file and the first invalid field (two samples with the same
    name or id included), and FileNotFoundError when the file is missing. A manifest marked
    ``"complete": false`` is accepted with a warning: the data set job stopped before its last
    shard, so the manifest lists only the shards written so far. A manifest without the field
    (written by other tools) is taken as complete.
    """
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"manifest {path} not found; pass a data set folder that contains {MANIFEST_NAME}"
        )
    content = path.read_bytes()
    try:
        raw = json.loads(content.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ManifestError(f"{path}: not valid JSON: {error}") from error
    _require(isinstance(raw, dict), path, "<top level>", raw, "must be a JSON object")
    version = raw.get("format_version")
    _require(version == MANIFEST_FORMAT_VERSION, path, "format_version", version,
             f"must be {MANIFEST_FORMAT_VERSION}")
    samples = _validate_samples(path, raw.get("samples"))
    sample_names = {sample["name"] for sample in samples}
    shards = _validate_shards(path, raw.get("shards"), sample_names)
    feature_stats = _validate_feature_stats(path, raw.get("feature_stats"))
    complete = raw.get("complete", True)
    _require(isinstance(complete, bool), path, "complete", complete, "must be true or false")
    if not complete:
        logger.warning("%s: the data set job did not finish (\"complete\": false), so the manifest "
                       "lists only the shards written so far; rerun the job with the same "
                       "settings to complete the data set", path)
    return Manifest(path=path, format_version=version, samples=samples, shards=shards,
                    feature_stats=feature_stats, raw=raw,
                    sha256=hashlib.sha256(content).hexdigest())


def _require(condition: bool, path: Path, name: str, value: Any, rule: str) -> None:
    if not condition:
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        raise ManifestError(f"{path}: field {name!r} {rule}, got {shown}")


def _validate_samples(path: Path, samples: Any) -> list[dict[str, Any]]:
    _require(isinstance(samples, list) and samples, path, "samples", samples,
             "must be a non-empty list")
    for i, sample in enumerate(samples):
        _require(isinstance(sample, dict), path, f"samples[{i}]", sample, "must be an object")
        _require(isinstance(sample.get("name"), str) and sample["name"], path,
                 f"samples[{i}].name", sample.get("name"), "must be a non-empty string")
        _require(_is_int(sample.get("id")) and sample["id"] >= 0, path, f"samples[{i}].id",
                 sample.get("id"), "must be a non-negative int")
    for key in ("name", "id"):
        _reject_repeats(path, key, [sample[key] for sample in samples])
    return samples


def _reject_repeats(path: Path, key: str, values: list[Any]) -> None:
    first_index: dict[Any, int] = {}
    for i, value in enumerate(values):
        if value in first_index:
            raise ManifestError(
                f"{path}: field 'samples[{i}].{key}' repeats the value {value!r} of "
                f"'samples[{first_index[value]}].{key}'; every sample needs its own {key}")
        first_index[value] = i


def _validate_shards(path: Path, shards: Any, sample_names: set[str]) -> list[ShardEntry]:
    _require(isinstance(shards, list), path, "shards", shards, "must be a list")
    entries = []
    for i, shard in enumerate(shards):
        name = f"shards[{i}]"
        _require(isinstance(shard, dict), path, name, shard, "must be an object")
        _require(isinstance(shard.get("path"), str) and shard["path"], path, f"{name}.path",
                 shard.get("path"), "must be a non-empty string")
        _require(not Path(shard["path"]).is_absolute() and ".." not in Path(shard["path"]).parts,
                 path, f"{name}.path", shard["path"], "must be relative to the data set folder")
        _require(shard.get("split") in SPLITS, path, f"{name}.split", shard.get("split"),
                 f"must be one of {SPLITS}")
        _require(shard.get("sample") in sample_names, path, f"{name}.sample", shard.get("sample"),
                 f"must name a sample of the manifest {sorted(sample_names)}")
        for count in ("events", "tokens"):
            _require(_is_int(shard.get(count)) and shard[count] >= 0, path, f"{name}.{count}",
                     shard.get(count), "must be a non-negative int")
        digest = shard.get("sha256")
        _require(isinstance(digest, str) and len(digest) == 64
                 and all(c in "0123456789abcdef" for c in digest), path, f"{name}.sha256", digest,
                 "must be 64 lowercase hex digits")
        entries.append(ShardEntry(path=shard["path"], split=shard["split"], sample=shard["sample"],
                                  events=shard["events"], tokens=shard["tokens"], sha256=digest))
    paths = [entry.path for entry in entries]
    _require(len(set(paths)) == len(paths), path, "shards", "...", "must not list a path twice")
    return entries


def _validate_feature_stats(path: Path, stats: Any) -> dict[str, dict[str, float]]:
    _require(isinstance(stats, dict), path, "feature_stats", stats, "must be an object")
    for name in FEATURE_STAT_NAMES:
        entry = stats.get(name)
        _require(isinstance(entry, dict), path, f"feature_stats.{name}", entry,
                 "must be an object with mean and std")
        for key in ("mean", "std"):
            value = entry.get(key)
            _require(_is_number(value) and math.isfinite(value), path,
                     f"feature_stats.{name}.{key}", value, "must be a finite number")
        _require(entry["std"] > 0, path, f"feature_stats.{name}.std", entry["std"], "must be > 0")
    return stats


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class _HashingReader:
    """Read-only file wrapper that feeds every byte read into a SHA-256."""

    def __init__(self, file: BinaryIO):
        self._file = file
        self.digest = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self._file.read(size)
        self.digest.update(data)
        return data

    def drain(self) -> None:
        """Read the rest of the file (tar end padding) so the digest covers every byte."""
        while self.read(_READ_CHUNK):
            pass


def split_member_name(name: str) -> tuple[str, str]:
    """Split a tar member name into WebDataset key and suffix at the first dot of the basename."""
    folder, _, base = name.rpartition("/")
    stem, dot, suffix = base.partition(".")
    if not dot or not stem:
        raise ValueError(f"member name {name!r} has no <key>.<suffix> form")
    return (f"{folder}/{stem}" if folder else stem), suffix


def _check_suffix(shard: Path, member: str, suffix: str) -> None:
    extension = suffix.rsplit(".", 1)[-1].lower()
    if extension in PICKLE_EXTENSIONS:
        raise ShardError(
            f"shard {shard}: member {member!r} uses the pickle-based extension .{extension}; "
            "pickle members are rejected and never decoded"
        )
    if suffix not in BLOCK_MEMBER_SUFFIXES:
        raise ShardError(
            f"shard {shard}: member {member!r} is not a block column; "
            f"valid suffixes: {sorted(BLOCK_MEMBER_SUFFIXES)}"
        )


def _iter_member_groups(tar: tarfile.TarFile,
                        shard: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {suffix: bytes}) per sample; members of a key must be adjacent."""
    seen_keys: set[str] = set()
    key, members, last_member = None, {}, None
    try:
        for info in tar:
            if info.isdir():
                continue
            if not info.isfile():
                raise ShardError(f"shard {shard}: member {info.name!r} is not a regular file")
            member_key, suffix = _split_or_raise(shard, info.name)
            _check_suffix(shard, info.name, suffix)
            if member_key != key:
                if member_key in seen_keys:
                    raise ShardError(
                        f"shard {shard}: key {member_key!r} repeats after other keys (member "
                        f"{info.name!r}); the members of one sample must be adjacent"
                    )
                if key is not None:
                    yield key, members
                seen_keys.add(member_key)
                key, members = member_key, {}
            if suffix in members:
                raise ShardError(f"shard {shard}: member {info.name!r} appears twice")
            last_member = info.name
            members[suffix] = tar.extractfile(info).read()
    except tarfile.TarError as error:
        where = f"member {last_member!r}" if last_member else "its first member"
        raise ShardError(f"shard {shard}: tar read failed at {where}: {error}") from error
    if key is not None:
        yield key, members


def _split_or_raise(shard: Path, member: str) -> tuple[str, str]:
    try:
        return split_member_name(member)
    except ValueError as error:
        raise ShardError(f"shard {shard}: {error}") from error


def iter_shard_blocks(path: str | Path, *, sha256: str | None = None) -> Iterator[EventBlock]:
    """Stream the event blocks of one shard in stored order.

    Raises ShardError naming the shard and the member for every kind of corruption described in
    the module docstring. When ``sha256`` is given, the digest of the whole file is compared after
    the last block, so a caller that must not use a corrupt shard's blocks collects them first
    (``read_shard``).
    """
    path = Path(path)
    if path.stat().st_size == 0:
        raise ShardError(f"shard {path} is empty (0 bytes)")
    with open(path, "rb") as file:
        reader = _HashingReader(file)
        try:
            tar = tarfile.open(fileobj=reader, mode="r|")
        except tarfile.TarError as error:
            raise ShardError(f"shard {path}: not a readable tar: {error}") from error
        with tar:
            for key, members in _iter_member_groups(tar, path):
                yield _decode_block(path, key, members)
        reader.drain()
    if sha256 is not None and reader.digest.hexdigest() != sha256:
        raise ShardError(
            f"shard {path}: SHA-256 {reader.digest.hexdigest()} differs from the expected "
            f"{sha256} of the manifest"
        )


def _decode_block(shard: Path, key: str, members: dict[str, bytes]) -> EventBlock:
    try:
        return EventBlock.from_members(members, source=f"shard {shard}, key {key!r}")
    except BlockFormatError as error:
        raise ShardError(str(error)) from error


def read_shard(path: str | Path, *, events: int | None = None,
               sha256: str | None = None) -> list[EventBlock]:
    """Read every block of one shard; raise ShardError unless the whole shard is valid.

    ``events`` and ``sha256``, usually from the manifest, are checked when given: a shard cut
    exactly between two members still reads as a valid tar, and only these checks catch it.
    """
    path = Path(path)
    blocks = list(iter_shard_blocks(path, sha256=sha256))
    found = sum(block.num_events for block in blocks)
    if events is not None and found != events:
        raise ShardError(f"shard {path}: contains {found} events, the manifest lists {events}")
    return blocks


@dataclass
class ShardReadResult:
    """Blocks of the shards that were read, and the shards skipped as corrupt."""

    blocks: list[EventBlock]
    skipped: list[str]

    @property
    def num_skipped(self) -> int:
        """Number of shards skipped as corrupt."""
        return len(self.skipped)


def read_shards(manifest: Manifest, entries: list[ShardEntry], *,
                skip_corrupt: bool = False, verify_sha256: bool = True) -> ShardReadResult:
    """Read the listed shards in order.

    Strict (``skip_corrupt=False``): the first corrupt or missing shard raises ShardError or
    FileNotFoundError. Tolerant: each corrupt or missing shard is skipped whole and logged once as
    a warning. It is listed in ``ShardReadResult.skipped``, and every block of the other shards
    is kept.
    """
    blocks: list[EventBlock] = []
    skipped: list[str] = []
    for entry in entries:
        path = manifest.shard_path(entry)
        try:
            if not path.is_file():
                raise FileNotFoundError(f"shard {path} listed in {manifest.path} not found")
            blocks.extend(read_shard(path, events=entry.events,
                                     sha256=entry.sha256 if verify_sha256 else None))
        except (ShardError, FileNotFoundError) as error:
            if not skip_corrupt:
                raise
            skipped.append(str(path))
            logger.warning("skipping corrupt shard %s (%d skipped so far): %s",
                           path, len(skipped), error)
    return ShardReadResult(blocks=blocks, skipped=skipped)
