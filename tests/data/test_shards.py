"""Shard and manifest reading: valid round trips and every kind of corrupt input."""

from __future__ import annotations

import io
import json
import logging
import pickle
import tarfile

import numpy as np
import pytest
import webdataset as wds

from bumblebee_dist.data.block import concat_blocks
from bumblebee_dist.data.shards import (
    ManifestError,
    ShardError,
    iter_shard_blocks,
    read_manifest,
    read_shard,
    read_shards,
)
from bumblebee_dist.data.synthetic import synthetic_block


class _CreatesFileWhenUnpickled:
    """Unpickling this calls open(marker, "w"), so a created file proves code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _cut_inside_member(path):
    """Truncate a tar in the middle of the data of its fourth member; return that member."""
    with tarfile.open(path) as tar:
        member = tar.getmembers()[3]
    raw = path.read_bytes()
    path.write_bytes(raw[: member.offset_data + member.size // 2])
    return member.name


def test_round_trip_keeps_every_event(make_dataset):
    root = make_dataset({"train": [250, 40]}, block_events=100)
    manifest = read_manifest(root)
    result = read_shards(manifest, manifest.shards_of("train"))
    events = concat_blocks(result.blocks)
    assert events.num_events == 290
    assert sorted(events.event_id.tolist()) == list(range(290))
    assert result.num_skipped == 0


def test_streaming_yields_blocks_in_stored_order(make_dataset):
    root = make_dataset({"train": [250]}, block_events=100)
    manifest = read_manifest(root)
    blocks = list(iter_shard_blocks(manifest.shard_path(manifest.shards[0])))
    assert [block.num_events for block in blocks] == [100, 100, 50]
    assert blocks[1].event_id[0] == 100


def test_webdataset_tarwriter_shard_is_read(tmp_path):
    block = synthetic_block(20, 7, np.random.default_rng(0))
    path = tmp_path / "written.tar"
    with wds.TarWriter(str(path)) as writer:
        writer.write({"__key__": "ttbar-00000-0000", **block.to_members()})
    (read,) = read_shard(path, events=20)
    np.testing.assert_array_equal(read.event_id, block.event_id)
    np.testing.assert_array_equal(read.features, block.features)


@pytest.fixture
def five_shards_two_bad(make_dataset):
    """Shards 0 to 2 valid, shard 3 cut inside a member, shard 4 an empty file."""
    root = make_dataset({"train": [30, 30, 30, 30, 30]}, block_events=10)
    manifest = read_manifest(root)
    cut_member = _cut_inside_member(manifest.shard_path(manifest.shards[3]))
    manifest.shard_path(manifest.shards[4]).write_bytes(b"")
    return manifest, cut_member


def test_strict_mode_names_shard_and_member(five_shards_two_bad):
    manifest, cut_member = five_shards_two_bad
    with pytest.raises(ShardError) as error:
        read_shards(manifest, manifest.shards_of("train"))
    assert str(manifest.shard_path(manifest.shards[3])) in str(error.value)
    assert cut_member in str(error.value)


def test_strict_mode_names_empty_shard(five_shards_two_bad):
    manifest, _ = five_shards_two_bad
    with pytest.raises(ShardError, match="empty") as error:
        read_shards(manifest, manifest.shards[4:])
    assert str(manifest.shard_path(manifest.shards[4])) in str(error.value)


def test_tolerant_mode_skips_and_counts(five_shards_two_bad, caplog):
    manifest, _ = five_shards_two_bad
    with caplog.at_level(logging.WARNING, logger="bumblebee_dist.data.shards"):
        result = read_shards(manifest, manifest.shards_of("train"), skip_corrupt=True)
    assert result.num_skipped == 2
    assert result.skipped == [str(manifest.shard_path(entry)) for entry in manifest.shards[3:]]
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 2
    events = concat_blocks(result.blocks)
    assert sorted(events.event_id.tolist()) == list(range(90))


def test_cut_between_members_fails_event_count(make_dataset):
    root = make_dataset({"train": [30]}, block_events=10)
    manifest = read_manifest(root)
    path = manifest.shard_path(manifest.shards[0])
    with tarfile.open(path) as tar:
        ninth = tar.getmembers()[8]  # first member of the second block
    path.write_bytes(path.read_bytes()[: ninth.offset])
    with pytest.raises(ShardError, match="contains 10 events, the manifest lists 30"):
        read_shard(path, events=30)


def test_checksum_mismatch_rejected(make_dataset):
    root = make_dataset({"train": [30]}, block_events=10)
    manifest = read_manifest(root)
    entry = manifest.shards[0]
    with pytest.raises(ShardError, match="SHA-256"):
        read_shard(manifest.shard_path(entry), sha256="0" * 64)


def test_pickle_extension_rejected_unread(tmp_path, block_members, write_tar):
    marker = tmp_path / "executed"
    members = [(f"k.{suffix}", data) for suffix, data in block_members().items()]
    members.append(("k.extra.pyd", pickle.dumps(_CreatesFileWhenUnpickled(marker))))
    path = write_tar(tmp_path / "pickled.tar", members)
    with pytest.raises(ShardError) as error:
        read_shard(path)
    assert str(path) in str(error.value)
    assert "'k.extra.pyd'" in str(error.value)
    assert "pickle" in str(error.value)
    assert not marker.exists()


def test_object_array_rejected_unread(tmp_path, block_members, write_tar):
    marker = tmp_path / "executed"
    buffer = io.BytesIO()
    np.save(buffer, np.array([_CreatesFileWhenUnpickled(marker)], dtype=object), allow_pickle=True)
    members = block_members()
    members["m_ttbar_true.npy"] = buffer.getvalue()
    path = write_tar(tmp_path / "object.tar", [(f"k.{s}", d) for s, d in members.items()])
    with pytest.raises(ShardError) as error:
        read_shard(path)
    assert str(path) in str(error.value)
    assert "m_ttbar_true.npy" in str(error.value)
    assert not marker.exists()


def test_interleaved_samples_name_key(tmp_path, block_members, write_tar):
    first, second = block_members(5, 0), block_members(5, 100)
    suffixes = list(first)
    members = [("a." + suffixes[0], first[suffixes[0]]), ("b." + suffixes[0], second[suffixes[0]]),
               ("a." + suffixes[1], first[suffixes[1]]), ("b." + suffixes[1], second[suffixes[1]])]
    path = write_tar(tmp_path / "interleaved.tar", members)
    with pytest.raises(ShardError) as error:
        read_shard(path)
    assert str(path) in str(error.value)
    assert "key 'a'" in str(error.value)


def test_missing_column_names_member(tmp_path, block_members, write_tar):
    members = block_members()
    del members["level.npy"]
    path = write_tar(tmp_path / "short.tar", [(f"k.{s}", d) for s, d in members.items()])
    with pytest.raises(ShardError, match="'level.npy' is missing") as error:
        read_shard(path)
    assert str(path) in str(error.value)


def test_not_a_tar_rejected(tmp_path):
    path = tmp_path / "noise.tar"
    path.write_bytes(b"x" * 1000)
    with pytest.raises(ShardError, match=str(path)):
        read_shard(path)


def test_tolerant_mode_skips_missing_file(make_dataset):
    root = make_dataset({"train": [10, 10]}, block_events=10)
    manifest = read_manifest(root)
    manifest.shard_path(manifest.shards[0]).unlink()
    with pytest.raises(FileNotFoundError, match="not found"):
        read_shards(manifest, manifest.shards)
    result = read_shards(manifest, manifest.shards, skip_corrupt=True)
    assert result.num_skipped == 1
    assert concat_blocks(result.blocks).num_events == 10


def _rewrite_manifest(root, change):
    path = root / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda d: d.pop("format_version"), "format_version"),
        (lambda d: d["shards"][1].update(events=-1), "shards[1].events"),
        (lambda d: d["shards"][0].update(split="holdout"), "shards[0].split"),
        (lambda d: d["shards"][0].update(sample="ww"), "shards[0].sample"),
        (lambda d: d["shards"][0].update(sha256="abc"), "shards[0].sha256"),
        (lambda d: d["shards"][0].update(path="/etc/passwd"), "shards[0].path"),
        (lambda d: d["feature_stats"]["eta"].update(std=0.0), "feature_stats.eta.std"),
        (lambda d: d["feature_stats"].pop("m"), "feature_stats.m"),
        (lambda d: d["samples"][0].pop("name"), "samples[0].name"),
    ],
)
def test_manifest_error_names_file_and_field(make_dataset, change, field):
    root = make_dataset({"train": [10, 10]}, block_events=10)
    path = _rewrite_manifest(root, change)
    with pytest.raises(ManifestError) as error:
        read_manifest(root)
    assert str(path) in str(error.value)
    assert f"'{field}'" in str(error.value)


def test_manifest_missing_and_invalid_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        read_manifest(tmp_path)


@pytest.mark.parametrize("key", ["name", "id"])
def test_manifest_repeated_sample_rejected(make_dataset, key):
    root = make_dataset({"train": [10]}, block_events=10)

    def repeat(data):
        data["samples"].append({"name": "other", "id": 7, key: data["samples"][0][key]})

    path = _rewrite_manifest(root, repeat)
    repeated = json.loads(path.read_text())["samples"][0][key]
    with pytest.raises(ManifestError) as error:
        read_manifest(root)
    message = str(error.value)
    assert str(path) in message
    assert f"'samples[2].{key}'" in message
    assert f"'samples[0].{key}'" in message
    assert repr(repeated) in message


def test_manifest_incomplete_warns(make_dataset, caplog):
    root = make_dataset({"train": [10]}, block_events=10)
    path = _rewrite_manifest(root, lambda d: d.update(complete=False))
    with caplog.at_level(logging.WARNING):
        manifest = read_manifest(root)
    assert len(manifest.shards) == 1
    assert len(caplog.records) == 1
    assert str(path) in caplog.text
    assert "did not finish" in caplog.text
    assert "rerun" in caplog.text


def test_manifest_complete_no_warning(make_dataset, caplog):
    root = make_dataset({"train": [10]}, block_events=10)
    _rewrite_manifest(root, lambda d: d.update(complete=True))
    with caplog.at_level(logging.WARNING):
        read_manifest(root)
    assert caplog.records == []


def test_manifest_complete_must_be_bool(make_dataset):
    root = make_dataset({"train": [10]}, block_events=10)
    _rewrite_manifest(root, lambda d: d.update(complete="yes"))
    with pytest.raises(ManifestError, match="'complete'"):
        read_manifest(root)


def test_unknown_split_rejected(make_dataset):
    manifest = read_manifest(make_dataset({"train": [10]}))
    with pytest.raises(ManifestError, match="split 'dev' is unknown"):
        manifest.shards_of("dev")
