"""EventLoader: exactly-once coverage, equal batch counts, order, resume, masks and jet cap."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import Counter

import numpy as np
import pytest
import torch

from bumblebee_dist import masking
from bumblebee_dist.data.loader import EventLoader
from bumblebee_dist.data.packing import EventTooLongError
from bumblebee_dist.data.shards import ShardError
from bumblebee_dist.data.store import cap_jets, reco_jet_tokens
from bumblebee_dist.data.synthetic import synthetic_block
from bumblebee_dist.features import FeatureStats
from bumblebee_dist.tokens import LEVEL_GEN, LEVEL_RECO, PDG_B, PDG_JET, PDG_VOCABULARY, PT


def _event_ids(batches) -> list[int]:
    return [int(i) for batch in batches for i in batch.event_id]


def _loaders(root, world_size, split="train", **options):
    return [EventLoader(root, split, rank=rank, world_size=world_size, **options)
            for rank in range(world_size)]


def _same_batches(first, second) -> bool:
    if len(first) != len(second):
        return False
    return all(torch.equal(a.event_id, b.event_id) and torch.equal(a.mask, b.mask)
               for a, b in zip(first, second))


def test_training_ranks_take_equal_steps(make_dataset, caplog):
    root = make_dataset({"train": [20] * 15}, block_events=20)
    with caplog.at_level(logging.INFO, logger="bumblebee_dist.data.loader"):
        # 102 tokens cut this data set into an odd number of batches, so one is dropped.
        loaders = _loaders(root, 2, max_tokens=102, drop_last=True)
        per_rank = [list(loader) for loader in loaders]
    assert len(loaders[0]) == len(loaders[1])
    assert [len(batches) for batches in per_rank] == [len(loaders[0])] * 2
    seen = Counter(_event_ids(per_rank[0]) + _event_ids(per_rank[1]))
    assert max(seen.values()) == 1
    plan = loaders[0].epoch_plan(0)
    assert plan.dropped_batches == 1
    assert plan.dropped_events > 0
    assert 300 - len(seen) == plan.dropped_events
    logged = [r.getMessage() for r in caplog.records if "batches holding" in r.getMessage()]
    assert len(logged) == 1
    assert f"holding {plan.dropped_events} events" in logged[0]


def test_evaluation_covers_every_event_once(make_dataset):
    root = make_dataset({"val": [37]})
    loaders = _loaders(root, 2, split="val", drop_last=False, num_workers=2, mask_mode="none")
    per_rank = [list(loader) for loader in loaders]
    assert len(per_rank[0]) == len(per_rank[1])
    assert len(per_rank[0]) == len(loaders[0])
    assert sorted(_event_ids(per_rank[0]) + _event_ids(per_rank[1])) == list(range(37))
    assert any(batch.num_events == 0 for batch in per_rank[1])


def test_exactly_once_over_ranks_and_workers(make_dataset):
    root = make_dataset({"train": [60, 45, 70]}, block_events=25)
    loaders = _loaders(root, 3, max_tokens=80, drop_last=False, num_workers=2)
    per_rank = [list(loader) for loader in loaders]
    assert len({len(batches) for batches in per_rank}) == 1
    assert sorted(sum((_event_ids(b) for b in per_rank), [])) == list(range(175))


def test_workers_keep_batches_and_order(make_dataset):
    root = make_dataset({"train": [90, 90]}, block_events=30)
    in_process = list(EventLoader(root, "train", max_tokens=100, seed=5))
    with_workers = list(EventLoader(root, "train", max_tokens=100, seed=5, num_workers=2))
    assert _same_batches(in_process, with_workers)


def test_batches_respect_token_budget(make_dataset):
    root = make_dataset({"train": [200]})
    for batch in EventLoader(root, "train", max_tokens=70, drop_last=False):
        assert 0 < batch.num_tokens <= 70
        assert batch.cu_seqlens[-1].item() == batch.num_tokens
        lengths = torch.diff(batch.cu_seqlens)
        assert batch.max_seqlen == int(lengths.max())


def test_order_depends_only_on_seed_and_epoch(make_dataset):
    root = make_dataset({"train": [80, 80]}, block_events=40)
    first = EventLoader(root, "train", max_tokens=120, seed=3)
    second = EventLoader(root, "train", max_tokens=120, seed=3)
    epoch0 = list(first)
    assert _same_batches(epoch0, list(second))
    epoch1 = list(first)  # the finished iteration advanced to epoch 1
    assert first.epoch == 2
    assert _event_ids(epoch0) != _event_ids(epoch1)
    second.set_epoch(1)
    assert _same_batches(epoch1, list(second))
    other_seed = list(EventLoader(root, "train", max_tokens=120, seed=4))
    assert _event_ids(other_seed) != _event_ids(epoch0)


def test_order_ignores_shard_listing_order(make_dataset):
    root = make_dataset({"train": [50, 50]}, block_events=50)
    forward = list(EventLoader(root, "train", max_tokens=100, drop_last=False))
    manifest_path = root / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["shards"].reverse()
    manifest_path.write_text(json.dumps(manifest))
    backward = list(EventLoader(root, "train", max_tokens=100, drop_last=False))
    assert _same_batches(forward, backward)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_continues_with_next_batch(make_dataset, num_workers):
    root = make_dataset({"train": [100] * 4}, block_events=50)
    options = dict(max_tokens=256, seed=11, drop_last=False)
    reference = list(EventLoader(root, "train", **options))
    assert len(reference) > 14

    interrupted = EventLoader(root, "train", **options)
    before = []
    for step, batch in enumerate(interrupted, start=1):
        before.append(batch)
        if step == 13:
            break
    state = interrupted.state_dict()
    assert state["position"] == 13

    resumed = EventLoader(root, "train", num_workers=num_workers, **options)
    resumed.load_state_dict(state)
    resumed.set_epoch(0)  # A training loop calls this, and it keeps the position.
    after = list(resumed)
    assert _same_batches(before + after, reference)
    assert torch.equal(after[0].event_id, reference[13].event_id)
    assert sorted(_event_ids(before + after)) == list(range(400))


def test_resume_rejects_other_world_size(make_dataset):
    root = make_dataset({"train": [100]})
    state = EventLoader(root, "train", world_size=2, rank=1).state_dict()
    with pytest.raises(ValueError, match="world_size=2.*world_size=1"):
        EventLoader(root, "train").load_state_dict(state)


def test_resume_rejects_position_past_epoch(make_dataset):
    root = make_dataset({"train": [100]})
    loader = EventLoader(root, "train")
    state = dict(loader.state_dict(), position=len(loader) + 1)
    with pytest.raises(ValueError, match="position"):
        loader.load_state_dict(state)
    assert loader.position == 0


def test_pretrain_mask_is_per_event_draw(make_dataset):
    root = make_dataset({"train": [120]})
    small = EventLoader(root, "train", max_tokens=64, seed=9, drop_last=False)
    large = EventLoader(root, "train", max_tokens=4096, seed=9, drop_last=False)
    small.set_epoch(2)
    large.set_epoch(2)
    masks_small = {int(e): m for b in small for e, m in _split_masks(b)}
    masks_large = {int(e): m for b in large for e, m in _split_masks(b)}
    assert masks_small.keys() == masks_large.keys()
    for event, mask in masks_small.items():
        assert torch.equal(mask, masks_large[event])
    fresh = EventLoader(root, "train", max_tokens=4096, seed=9, drop_last=False)
    fresh.set_epoch(2)
    batch = next(iter(fresh))
    expected = masking.draw_mask(batch.event_id.numpy(), batch.cu_seqlens.numpy(),
                                 batch.level.numpy(), 9, 2)
    np.testing.assert_array_equal(batch.mask.numpy(), expected)


def _split_masks(batch):
    bounds = batch.cu_seqlens.tolist()
    for index, event in enumerate(batch.event_id):
        yield event, batch.mask[bounds[index]:bounds[index + 1]]


def test_gen_and_none_mask_modes(make_dataset):
    root = make_dataset({"train": [50]})
    for batch in EventLoader(root, "train", mask_mode="gen", drop_last=False):
        assert torch.equal(batch.mask, batch.level == LEVEL_GEN)
    for batch in EventLoader(root, "train", mask_mode="none", drop_last=False):
        assert not batch.mask.any()


def test_cap_jets_keeps_highest_pt_unsorted():
    block = synthetic_block(40, 0, np.random.default_rng(1), max_jets_stored=12, sort_jets=False)
    capped, dropped = cap_jets(block, 4)
    jets_before = reco_jet_tokens(block)
    jets_after = reco_jet_tokens(capped)
    assert dropped == int(jets_before.sum() - jets_after.sum())
    for event in range(block.num_events):
        old = slice(block.offsets[event], block.offsets[event + 1])
        new = slice(capped.offsets[event], capped.offsets[event + 1])
        old_pt = block.features[old][jets_before[old], PT]
        new_pt = capped.features[new][jets_after[new], PT]
        np.testing.assert_array_equal(np.sort(new_pt), np.sort(old_pt)[::-1][:4][::-1])
        others_old = block.pdg_id[old][~jets_before[old]]
        others_new = capped.pdg_id[new][~jets_after[new]]
        np.testing.assert_array_equal(others_old, others_new)


def test_loader_applies_jet_cap(make_dataset):
    root = make_dataset({"train": [60]}, max_jets_stored=12, sort_jets=False)
    loader = EventLoader(root, "train", max_jets=3, drop_last=False)
    assert loader.store.jets_dropped > 0
    for batch in loader:
        pdg_id = torch.as_tensor(PDG_VOCABULARY)[batch.pdg_index]
        reco_jets = ((pdg_id == PDG_B) | (pdg_id == PDG_JET)) & (batch.level == LEVEL_RECO)
        per_event = torch.segment_reduce(reco_jets.float(), "sum",
                                         offsets=batch.cu_seqlens.long())
        assert per_event.max().item() <= 3


def test_event_too_long_fails_at_construction(make_dataset):
    root = make_dataset({"train": [20]})
    with pytest.raises(EventTooLongError, match="max_tokens=10"):
        EventLoader(root, "train", max_tokens=10)


def test_corrupt_shard_strict_and_tolerant(make_dataset):
    root = make_dataset({"train": [30, 30, 30]}, block_events=10)
    bad = root / "shards" / "train" / "ttbar-00002.tar"
    bad.write_bytes(bad.read_bytes()[:3000])
    with pytest.raises(ShardError, match="ttbar-00002.tar"):
        EventLoader(root, "train")
    loader = EventLoader(root, "train", skip_corrupt_shards=True, drop_last=False)
    assert loader.num_skipped_shards == 1
    assert sorted(_event_ids(loader)) == list(range(60))


def test_invalid_arguments_named(make_dataset):
    root = make_dataset({"train": [10]})
    with pytest.raises(ValueError, match="rank=2"):
        EventLoader(root, "train", rank=2, world_size=2)
    with pytest.raises(ValueError, match="mask_mode='all'"):
        EventLoader(root, "train", mask_mode="all")


def test_feature_stats_override_standardization(make_dataset):
    # A model trained on another data set brings its own statistics: the loader must scale
    # this data set's features with them, not with the manifest's.
    root = make_dataset({"train": [40]})
    own = EventLoader(root, "train", drop_last=False, mask_mode="none")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest_stats = FeatureStats.from_manifest(manifest["feature_stats"])
    other_stats = dataclasses.replace(manifest_stats, log_pt_mean=manifest_stats.log_pt_mean + 0.5,
                                      log_pt_std=2 * manifest_stats.log_pt_std)
    other = EventLoader(root, "train", drop_last=False, mask_mode="none", feature_stats=other_stats)
    default_pt = own.store.events.features[:, PT]
    other_pt = other.store.events.features[:, PT]
    log_pt = default_pt * manifest_stats.log_pt_std + manifest_stats.log_pt_mean
    expected = (log_pt - other_stats.log_pt_mean) / other_stats.log_pt_std
    np.testing.assert_allclose(other_pt, expected, rtol=1e-5, atol=1e-5)
    assert not np.allclose(other_pt, default_pt)
