"""A tiny real data set job with Ray: manifest counts, reader compatibility, resume."""

from __future__ import annotations

import json

from bumblebee_dist.data.shards import read_manifest
from data_prep.ray_job import build_dataset
from data_prep.shards import read_shard


def test_tiny_job_manifest_and_resume(tmp_path):
    manifest_path = build_dataset(tmp_path, ttbar_events=36, eta_t_events=36, seed=2,
                                  events_per_shard=12, num_workers=2, block_events=3)
    manifest = json.loads(manifest_path.read_text())
    assert manifest["complete"] is True
    for sample in manifest["samples"]:
        assert sample["cut_flow"]["generated"] == 36
        selected = sum(s["events"] for s in manifest["shards"] if s["sample"] == sample["name"])
        assert selected == sample["cut_flow"]["one_btag"]
    assert manifest["events"] == sum(s["events"] for s in manifest["shards"])
    assert len(manifest["shards"]) + len(manifest["empty_shards"]) == 6
    for shard in manifest["shards"]:
        blocks = read_shard(tmp_path / shard["path"])
        assert sum(b.num_events for b in blocks) == shard["events"]
        assert sum(b.num_tokens for b in blocks) == shard["tokens"]
    assert len(read_manifest(tmp_path).shards) == len(manifest["shards"])

    mtimes = {s["path"]: (tmp_path / s["path"]).stat().st_mtime_ns for s in manifest["shards"]}
    build_dataset(tmp_path, ttbar_events=36, eta_t_events=36, seed=2, events_per_shard=12,
                  num_workers=2, block_events=3)
    again = json.loads(manifest_path.read_text())
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in manifest["shards"]]
    for path, mtime in mtimes.items():
        assert (tmp_path / path).stat().st_mtime_ns == mtime
