"""Fixtures that write small data sets in the on-disk layout into a temporary folder."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest

from bumblebee_dist.data.synthetic import synthetic_block, write_dataset


@pytest.fixture
def make_dataset(tmp_path):
    """Return a function that writes a data set and returns its folder.

    Call it with ``{split: [events per shard, ...]}`` and ``write_dataset`` options.
    """
    counter = iter(range(1000))

    def build(shard_events: dict[str, list[int]], **options) -> Path:
        root = tmp_path / f"dataset{next(counter)}"
        write_dataset(root, shard_events, **options)
        return root

    return build


@pytest.fixture
def block_members():
    """Return a function giving the ``.npy`` members of a fresh synthetic block."""

    def build(num_events: int = 5, first_event_id: int = 0) -> dict[str, bytes]:
        block = synthetic_block(num_events, first_event_id, np.random.default_rng(first_event_id))
        return block.to_members()

    return build


@pytest.fixture
def write_tar():
    """Return a function writing ``(name, data)`` members, in that order, into a tar file."""

    def write(path: Path, members: list[tuple[str, bytes]]) -> Path:
        with tarfile.open(path, "w") as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return path

    return write
