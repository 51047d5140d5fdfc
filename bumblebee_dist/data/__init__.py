"""Event data: shard reading, packing into token-budget batches, and the distributed loader.

Names are imported lazily, so that ``bumblebee_dist.data.block`` (used by the shard writer)
imports without torch.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "EventBlock": "block",
    "BlockFormatError": "block",
    "EventLoader": "loader",
    "MASK_MODES": "loader",
    "PackedBatch": "packing",
    "EventTooLongError": "packing",
    "pack_events": "packing",
    "plan_batches": "packing",
    "iter_packed": "packing",
    "gather_events": "packing",
    "Manifest": "shards",
    "ManifestError": "shards",
    "ShardError": "shards",
    "read_manifest": "shards",
    "read_shard": "shards",
    "read_shards": "shards",
    "iter_shard_blocks": "shards",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'bumblebee_dist.data' has no attribute {name!r}")
    return getattr(import_module(f"bumblebee_dist.data.{_EXPORTS[name]}"), name)
