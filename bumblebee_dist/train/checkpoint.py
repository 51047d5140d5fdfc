"""Crash-safe DeepSpeed checkpoints with the training state needed to resume exactly.

Layout under ``<run_dir>/checkpoints``::

    step_00000050/          DeepSpeed files (model, optimizer partitions) + complete.json
    step_00000100/
    latest                  tag of the newest complete checkpoint (DeepSpeed's convention)

A save goes to ``.tmp-step_<n>`` first. Only after every rank has written its files does rank 0
write ``complete.json`` (step, world size, ZeRO stage, precision, the caller's settings such as
the model config, and the size of every file) into it and rename the folder to its final name. A crash during a save
therefore leaves a temporary folder, which resume ignores and the next save removes, and never
a half-written checkpoint under a final name. Older complete checkpoints beyond
``train.keep_checkpoints`` are removed after the rename.

``client_state`` carries what DeepSpeed does not: step, epoch, counters, the loader position
and the Python, NumPy and torch RNG states. Loader positions and RNG states are gathered from
every rank into lists indexed by rank, so each rank restores its own.

A checkpoint resumes only on the world size, ZeRO stage, precision and settings it was saved
with: ZeRO partitions the optimizer state by rank, each stage and precision lays it out
differently, and another model has other shapes. Loading checks these first and raises
CheckpointError naming the first that differs, rather than failing inside DeepSpeed or
loading a mismatched state.

NOTE: on several nodes the checkpoint folder must be on a file system every node shares,
because rank 0 alone renames and prunes folders.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

LOG = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
TAG_PREFIX = "step_"
TMP_PREFIX = ".tmp-"
MARKER = "complete.json"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint cannot be resumed; the message names the checkpoint and the fix."""


def checkpoint_root(run_dir: str | Path) -> Path:
    """Folder holding the checkpoints of a run."""
    return Path(run_dir) / CHECKPOINT_DIR


def tag_for(step: int) -> str:
    """Checkpoint folder name of a step; zero-padded so names sort by step."""
    return f"{TAG_PREFIX}{step:08d}"


def read_marker(path: str | Path) -> dict[str, Any] | None:
    """Return the ``complete.json`` content of a checkpoint folder, or None if it is incomplete."""
    marker = Path(path) / MARKER
    if not marker.is_file():
        return None
    try:
        return json.loads(marker.read_text())
    except json.JSONDecodeError:
        return None


def damaged_files(path: Path, marker: dict[str, Any]) -> list[str]:
    """Return the files the marker lists that are missing from ``path`` or have another size."""
    damaged = []
    for name, size in marker.get("files", {}).items():
        file = path / name
        if not file.is_file():
            damaged.append(f"{name} (missing)")
        elif file.stat().st_size != size:
            damaged.append(f"{name} ({file.stat().st_size} bytes, {size} saved)")
    return damaged


def list_complete(root: str | Path) -> list[tuple[int, Path]]:
    """Return (step, folder) of every complete checkpoint under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        if path.is_dir() and path.name.startswith(TAG_PREFIX):
            marker = read_marker(path)
            if marker is not None:
                found.append((int(marker["step"]), path))
    return sorted(found)


def resolve_resume(resume: str, run_dir: str | Path) -> Path | None:
    """Turn ``--resume`` into a checkpoint folder, or None to start from scratch.

    ``auto``: the newest complete checkpoint of the run whose files are all there at their saved
    sizes (a damaged one is logged and skipped; an error when all are), or None when there is
    none. ``none``:
    None, and an error when the run folder already has complete checkpoints. Anything else is a path: a checkpoint folder, or a folder of checkpoints whose newest
    complete one is taken. A path without a complete checkpoint is an error.
    """
    if resume == "none":
        complete = list_complete(checkpoint_root(run_dir))
        if complete:
            raise CheckpointError(
                f"--resume none: {checkpoint_root(run_dir)} already has checkpoints of an earlier "
                f"run (newest at step {complete[-1][0]}), which a new run there would mix with "
                "its own. Continue that run with --resume auto, or start the new one in another "
                "train.run_dir")
        return None
    if resume == "auto":
        complete = list_complete(checkpoint_root(run_dir))
        for _, path in reversed(complete):
            damaged = damaged_files(path, read_marker(path))
            if not damaged:
                return path
            LOG.warning("checkpoint %s is damaged (%s); trying the one before it", path,
                        ", ".join(damaged[:3]))
        if complete:
            raise CheckpointError(
                f"every checkpoint in {checkpoint_root(run_dir)} is damaged (files missing or "
                "cut short, see the warnings above); restore them, or start a new run in another "
                "train.run_dir")
        return None
    path = Path(resume)
    marker = read_marker(path)
    if marker is not None:
        damaged = damaged_files(path, marker)
        if damaged:
            raise CheckpointError(f"--resume {resume}: checkpoint is damaged: "
                                  f"{', '.join(damaged[:3])}; pass an older checkpoint")
        return path
    complete = list_complete(path)
    if not complete:
        raise CheckpointError(
            f"--resume {resume}: no complete checkpoint found (a complete one contains {MARKER}); "
            f"pass a checkpoint folder such as {checkpoint_root(run_dir) / tag_for(100)}, "
            "'auto' or 'none'")
    return complete[-1][1]


def capture_rng_state() -> dict[str, Any]:
    """RNG states of Python, NumPy and torch (and CUDA when present) of this process."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set the RNG states captured by ``capture_rng_state``."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_from_ranks(value: Any) -> list[Any]:
    """Collect one picklable value from every rank into a list indexed by rank (collective)."""
    if not torch.distributed.is_initialized():
        return [value]
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def save_checkpoint(engine: Any, run_dir: str | Path, step: int, client_state: dict[str, Any],
                    *, keep: int, per_rank: dict[str, Any] | None = None,
                    settings: dict[str, Any] | None = None) -> Path:
    """Save a complete checkpoint of ``engine`` at ``step`` on every rank (collective).

    ``client_state`` is stored as is; ``per_rank`` values are gathered from all ranks and stored
    as lists indexed by rank. ``settings`` (JSON values) go into the marker, and
    ``load_checkpoint`` compares them with the loading job's. Returns the final checkpoint
    folder.
    """
    root = checkpoint_root(run_dir)
    tag = tag_for(step)
    tmp_tag = TMP_PREFIX + tag
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(root / tmp_tag, ignore_errors=True)
    gathered = {key: gather_from_ranks(value) for key, value in (per_rank or {}).items()}
    state = dict(client_state, per_rank=gathered, world_size=_world_size(), step=step)
    _barrier()
    engine.save_checkpoint(str(root), tag=tmp_tag, client_state=state, save_latest=False)
    _barrier()
    if _rank() == 0:
        _complete(root, tmp_tag, tag, step, engine, settings or {})
        prune_checkpoints(root, keep)
    _barrier()
    return root / tag


def _complete(root: Path, tmp_tag: str, tag: str, step: int, engine: Any,
              settings: dict[str, Any]) -> None:
    """Mark the temporary folder complete, rename it to its final name and update ``latest``."""
    folder = root / tmp_tag
    files = {str(file.relative_to(folder)): file.stat().st_size
             for file in sorted(folder.rglob("*")) if file.is_file()}
    marker = {"format_version": FORMAT_VERSION, "step": step, "world_size": _world_size(),
              "zero_stage": int(engine.zero_optimization_stage()),
              "precision": engine_precision(engine), "settings": settings, "files": files}
    _write_atomic(root / tmp_tag / MARKER, json.dumps(marker, indent=2) + "\n")
    final = root / tag
    if final.exists():
        # A second save of the same step (for example the end-of-run save after a periodic one).
        shutil.rmtree(final)
    os.replace(root / tmp_tag, final)
    _write_atomic(root / "latest", tag)
    _fsync_dir(root)
    LOG.info("checkpoint saved: %s", final)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def prune_checkpoints(root: str | Path, keep: int) -> None:
    """Remove all but the newest ``keep`` complete checkpoints, and stale temporary folders."""
    root = Path(root)
    complete = list_complete(root)
    for _, path in complete[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
        LOG.info("checkpoint removed (keeping the newest %d): %s", keep, path)
    for path in root.glob(TMP_PREFIX + "*"):
        shutil.rmtree(path, ignore_errors=True)


# Setting name -> the reason a checkpoint cannot be resumed when that setting changed.
_MISMATCH_REASONS = {
    "zero_stage": "DeepSpeed lays out the optimizer state differently at each ZeRO stage",
    "precision": "bf16 training keeps an fp32 master copy of the weights that fp32 training lacks",
    "model": "the weights have other shapes",
    "task": "the model has another output head",
    "data_manifest_sha256": "the saved loader position counts batches of the saved data set",
}


def engine_precision(engine: Any) -> str:
    """Return "bf16" or "fp32": the precision ``engine`` trains in."""
    return "bf16" if engine.bfloat16_enabled() else "fp32"


def check_settings(path: Path, marker: dict[str, Any], current: dict[str, Any]) -> None:
    """Raise CheckpointError when a setting in ``current`` differs from the checkpoint's.

    A setting the checkpoint did not record (an older checkpoint) is not compared.
    """
    saved_settings = {**marker.get("settings", {}), **marker}
    for name, value in current.items():
        if name not in saved_settings or saved_settings[name] == value:
            continue
        saved = saved_settings[name]
        if isinstance(value, dict) and isinstance(saved, dict):
            fields = sorted(key for key in {*saved, *value} if saved.get(key) != value.get(key))
            difference = ", ".join(f"{name}.{key}: {saved.get(key)!r} saved, {value.get(key)!r} "
                                   "now" for key in fields)
        else:
            difference = f"{name}: {saved!r} saved, {value!r} now"
        reason = _MISMATCH_REASONS.get(name, "the saved state depends on it")
        raise CheckpointError(
            f"checkpoint {path} cannot be resumed with this job's settings ({difference}): "
            f"{reason}. Resume with the saved value, or start a new run in another "
            "train.run_dir (from the exported weights, if they should carry over)")


def check_world_size(path: Path, world_size: int) -> dict[str, Any]:
    """Return the checkpoint's marker; raise CheckpointError if it was saved on another world size."""
    marker = read_marker(path)
    if marker is None:
        raise CheckpointError(f"checkpoint {path} is incomplete: it has no {MARKER}")
    saved = int(marker["world_size"])
    if saved != world_size:
        raise CheckpointError(
            f"checkpoint {path} was saved with world size {saved}, but this job has world size "
            f"{world_size}; ZeRO optimizer state is partitioned by rank and cannot be loaded on "
            f"another world size. Resume with {saved} ranks, or start a new run in another "
            "train.run_dir from the weights alone (finetune.pretrained or an exported model)")
    return marker


def load_checkpoint(engine: Any, path: str | Path,
                    settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load a complete checkpoint into ``engine`` on every rank; return this rank's client state.

    Values saved through ``per_rank`` come back as this rank's entry. Raises CheckpointError for
    an incomplete checkpoint, or a world size, ZeRO stage, precision or one of ``settings``
    (the values passed to ``save_checkpoint``) that differs from the checkpoint's.
    """
    path = Path(path)
    marker = check_world_size(path, _world_size())
    check_settings(path, marker, {"zero_stage": int(engine.zero_optimization_stage()),
                                  "precision": engine_precision(engine), **(settings or {})})
    load_path, state = engine.load_checkpoint(str(path.parent), tag=path.name,
                                              load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
    if load_path is None or state is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {path}; see its log above")
    rank = _rank()
    for key, values in state.pop("per_rank", {}).items():
        state[key] = values[rank]
    LOG.debug("rank %d loaded checkpoint %s at step %s", rank, path, state.get("step"))
    return state
