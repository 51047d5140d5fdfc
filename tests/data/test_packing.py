"""Packed batches: fields, shapes, dtypes, token budget and greedy cutting."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bumblebee_dist.data.packing import (
    EventTooLongError,
    PackedBatch,
    gather_events,
    iter_packed,
    pack_events,
    plan_batches,
)
from bumblebee_dist.data.synthetic import synthetic_block
from bumblebee_dist.tokens import NUM_FEATURES, PDG_VOCABULARY


@pytest.fixture
def block():
    return synthetic_block(50, 1000, np.random.default_rng(3))


def test_pack_events_fields(block):
    mask = np.zeros(block.num_tokens, dtype=bool)
    mask[::3] = True
    batch = pack_events(block, mask)
    num_events, num_tokens = block.num_events, block.num_tokens
    expected = {
        "features": ((num_tokens, NUM_FEATURES), torch.float32),
        "pdg_index": ((num_tokens,), torch.int64),
        "level": ((num_tokens,), torch.int64),
        "mask": ((num_tokens,), torch.bool),
        "cu_seqlens": ((num_events + 1,), torch.int32),
        "event_id": ((num_events,), torch.int64),
        "process_code": ((num_events,), torch.int32),
        "sample": ((num_events,), torch.int8),
        "m_ttbar_true": ((num_events,), torch.float32),
    }
    for name, (shape, dtype) in expected.items():
        tensor = getattr(batch, name)
        assert tuple(tensor.shape) == shape, name
        assert tensor.dtype == dtype, name
    assert isinstance(batch.max_seqlen, int)
    assert batch.max_seqlen == int(block.lengths().max())
    assert batch.cu_seqlens[0].item() == 0
    assert batch.cu_seqlens[-1].item() == num_tokens
    assert torch.equal(batch.mask, torch.from_numpy(mask))
    rows = batch.pdg_index.numpy()
    np.testing.assert_array_equal(np.asarray(PDG_VOCABULARY)[rows], block.pdg_id)


def test_pack_events_rejects_wrong_mask(block):
    with pytest.raises(ValueError, match="mask has shape"):
        pack_events(block, np.zeros(3, dtype=bool))


def test_empty_batch_is_valid():
    batch = PackedBatch.empty()
    assert batch.num_events == 0
    assert batch.num_tokens == 0
    assert batch.cu_seqlens.tolist() == [0]
    assert batch.max_seqlen == 0


def test_to_device_copies_every_tensor(block):
    batch = pack_events(block, np.zeros(block.num_tokens, dtype=bool))
    moved = batch.to("cpu")
    assert moved.max_seqlen == batch.max_seqlen
    assert torch.equal(moved.features, batch.features)
    assert moved.cu_seqlens.dtype == torch.int32


def test_plan_batches_respects_budget():
    lengths = np.array([5, 7, 3, 9, 1, 10, 4, 4, 4])
    bounds = plan_batches(lengths, max_tokens=12)
    assert bounds.tolist() == [0, 2, 4, 6, 9]
    sizes = np.add.reduceat(lengths, bounds[:-1])
    assert (sizes <= 12).all()


def test_plan_batches_greedy_is_maximal():
    rng = np.random.default_rng(0)
    lengths = rng.integers(11, 21, size=500)
    bounds = plan_batches(lengths, max_tokens=100)
    assert bounds[0] == 0
    assert bounds[-1] == lengths.size
    for start, end in zip(bounds[:-1], bounds[1:]):
        assert lengths[start:end].sum() <= 100
        if end < lengths.size:
            assert lengths[start:end + 1].sum() > 100


def test_event_longer_than_budget_is_named():
    with pytest.raises(EventTooLongError, match="event id 42 has 30 tokens"):
        plan_batches(np.array([10, 30, 5]), max_tokens=20, event_id=np.array([7, 42, 8]))


def test_gather_events_matches_take_events(block):
    rows = np.array([4, 0, 49, 17, 17 + 1])
    gathered = gather_events(block, rows)
    reference = block.take_events(rows)
    for name in ("event_id", "offsets", "pdg_id", "level", "features", "m_ttbar_true"):
        np.testing.assert_array_equal(getattr(gathered, name), getattr(reference, name))


def test_iter_packed_covers_block_in_order(block):
    batches = list(iter_packed(block, max_tokens=64))
    event_ids = torch.cat([batch.event_id for batch in batches])
    assert event_ids.tolist() == block.event_id.tolist()
    for batch in batches:
        assert batch.num_tokens <= 64
        assert batch.cu_seqlens[-1].item() == batch.num_tokens
        assert not batch.mask.any()
    features = torch.cat([batch.features for batch in batches])
    assert torch.equal(features, torch.from_numpy(block.features))
