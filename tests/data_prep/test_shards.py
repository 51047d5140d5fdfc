"""Shard writing: round trip, atomic writes, no empty shard, chunking, identical bytes per seed."""

from __future__ import annotations

import numpy as np
import pytest

from bumblebee_dist.data.block import BlockFormatError, EventBlock
from data_prep.pipeline import PipelineConfig
from data_prep.ray_job import ShardTask, assign_splits, run_shard_task
from data_prep.shards import (
    EmptyShardError,
    ShardStreamWriter,
    read_shard,
    sha256_file,
    write_shard,
)


def synthetic_block(num_events: int, first_id: int = 0, tokens_per_event: int = 3) -> EventBlock:
    """Events with valid tokens: ids first_id.., each with ``tokens_per_event`` jets."""
    rng = np.random.default_rng(first_id)
    total = num_events * tokens_per_event
    features = np.zeros((total, 5), dtype=np.float32)
    features[:, 0] = rng.uniform(20, 200, total)
    features[:, 1] = rng.uniform(-2.4, 2.4, total)
    features[:, 2] = rng.uniform(-3.0, 3.0, total)
    features[:, 3] = rng.uniform(0, 20, total)
    return EventBlock(
        event_id=np.arange(first_id, first_id + num_events, dtype=np.int64),
        offsets=np.arange(num_events + 1, dtype=np.int64) * tokens_per_event,
        process_code=np.full(num_events, 601, dtype=np.int32),
        sample=np.zeros(num_events, dtype=np.int8),
        m_ttbar_true=np.full(num_events, 400.0, dtype=np.float32),
        pdg_id=np.full(total, 41, dtype=np.int32),
        level=np.ones(total, dtype=np.int8),
        features=features,
    )


def test_round_trip(tmp_path):
    block = synthetic_block(25)
    info = write_shard(tmp_path / "ttbar-00000.tar", [block], block_events=10)
    blocks = read_shard(tmp_path / "ttbar-00000.tar")
    assert [b.num_events for b in blocks] == [10, 10, 5]
    assert info.events == 25
    assert info.tokens == 75
    merged = np.concatenate([b.features for b in blocks])
    assert np.array_equal(merged, block.features)
    assert np.array_equal(np.concatenate([b.event_id for b in blocks]), block.event_id)


def test_failed_write_leaves_no_file_and_retry_writes_one(tmp_path):
    good = synthetic_block(10)
    bad = synthetic_block(10, first_id=100)
    bad.features[3, 0] = np.nan  # validation fails on the second block, half-way through
    path = tmp_path / "shards" / "ttbar-00000.tar"
    with pytest.raises(BlockFormatError, match="non-finite"):
        write_shard(path, [good, bad], block_events=10)
    assert list(path.parent.iterdir()) == []
    write_shard(path, [good, synthetic_block(10, first_id=100)], block_events=10)
    assert [p.name for p in path.parent.iterdir()] == ["ttbar-00000.tar"]
    assert sum(b.num_events for b in read_shard(path)) == 20


def test_empty_shard_not_written(tmp_path):
    with pytest.raises(EmptyShardError, match="no event"):
        write_shard(tmp_path / "a.tar", [synthetic_block(0), synthetic_block(0)])
    assert not (tmp_path / "a.tar").exists()


def test_stream_writer_chunks_exactly(tmp_path):
    writer = ShardStreamWriter(tmp_path, "ttbar", shard_events=700, block_events=300)
    sizes = [333, 1, 0, 2000, 4666, 7000, 14000]  # 28,000 events in uneven pieces
    first = 0
    for size in sizes:
        writer.add(synthetic_block(size, first_id=first, tokens_per_event=1))
        first += size
    shards = writer.close()
    counts = [info.events for info in shards]
    assert sum(counts) == 28_000
    assert all(count == 700 for count in counts[:-1])
    assert 0 < counts[-1] <= 700
    ids = np.concatenate([b.event_id for info in shards for b in read_shard(info.path)])
    assert np.array_equal(ids, np.arange(28_000))


def test_stream_writer_all_empty(tmp_path):
    writer = ShardStreamWriter(tmp_path, "ttbar", shard_events=10)
    writer.add(synthetic_block(0))
    assert writer.close() == []
    assert list(tmp_path.iterdir()) == []


def test_same_blocks_same_bytes(tmp_path):
    block = synthetic_block(50)
    first = write_shard(tmp_path / "a" / "s.tar", [block], block_events=20)
    second = write_shard(tmp_path / "b" / "s.tar", [block], block_events=20)
    assert first.sha256 == second.sha256
    assert (tmp_path / "a" / "s.tar").read_bytes() == (tmp_path / "b" / "s.tar").read_bytes()


def test_real_shard_reproducible(tmp_path):
    task = ShardTask("eta_t", 0, "train", 12, "shards/train/eta_t-00000.tar")
    config = PipelineConfig(batch_size=6)
    first = run_shard_task(str(tmp_path / "a"), task, 5, config, block_events=4)
    second = run_shard_task(str(tmp_path / "b"), task, 5, config, block_events=4)
    assert first["cut_flow"] == second["cut_flow"]
    assert first.get("sha256") == second.get("sha256")
    if first["path"]:
        assert sha256_file(tmp_path / "a" / task.path) == first["sha256"]


def test_split_assignment():
    assert assign_splits(3) == ["train", "val", "test"]
    splits = assign_splits(20)
    assert splits.count("val") == 2
    assert splits.count("test") == 2
    with pytest.raises(ValueError, match="at least 3 shards"):
        assign_splits(2)
