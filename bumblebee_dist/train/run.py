"""One training job from a resolved config: set up, resume, train, checkpoint, export, register.

Used by ``launch/pretrain.py`` and ``launch/finetune.py`` through ``run_job``. Every rank runs
this code; rank 0 alone logs, talks to MLflow and writes ``<run_dir>/result.json``:

    {"task", "first_loss", "last_loss", "last_val_loss", "steps", "skipped_steps",
     "events_seen", "tokens_seen", "epochs_completed", "world_size", "zero_stage",
     "precision", "export_path", "export_weights", "checkpoint", "mlflow_run_id",
     "tracking_uri", "registered_model", "registered_version", "resumed_from_step",
     "data_manifest_sha256"}
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from bumblebee_dist.config import RunConfig
from bumblebee_dist.data.loader import EventLoader
from bumblebee_dist.data.shards import read_manifest
from bumblebee_dist.features import FeatureStats
from bumblebee_dist.tracking import ModelRegistry, Tracker
from bumblebee_dist.train import checkpoint as ckpt
from bumblebee_dist.train.engine import DistInfo, build_engine, init_distributed
from bumblebee_dist.train.export import export_model
from bumblebee_dist.train.loop import Task, Trainer, TrainState

LOG = logging.getLogger(__name__)
RESULT_NAME = "result.json"
CONFIG_NAME = "config_resolved.json"
LOCK_NAME = ".lock"
EXPORT_DIR = "export"


def setup_logging(dist: DistInfo) -> None:
    """Log INFO from rank 0 only; other ranks log warnings and errors, prefixed with their rank."""
    level = logging.INFO if dist.is_main else logging.WARNING
    logging.basicConfig(level=level, stream=sys.stdout, force=True,
                        format=f"%(asctime)s [rank {dist.rank}] %(levelname)s %(name)s: %(message)s")
    for noisy in ("DeepSpeed", "deepspeed", "alembic", "mlflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch; every rank uses the same seed (the data order is per rank)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def sha256_file(path: str | Path) -> str:
    """SHA-256 of a file, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def broadcast(value: Any) -> Any:
    """Return rank 0's ``value`` on every rank (collective)."""
    if not torch.distributed.is_initialized():
        return value
    holder = [value]
    torch.distributed.broadcast_object_list(holder, src=0)
    return holder[0]


def build_loaders(config: RunConfig, task: Task, dist: DistInfo,
                  feature_stats: FeatureStats) -> tuple[EventLoader, EventLoader | None]:
    """Training loader (drop_last) and, when the data set has a val split, the validation loader."""
    common = dict(rank=dist.rank, world_size=dist.world_size, seed=config.train.seed,
                  mask_mode=task.mask_mode, feature_stats=feature_stats)
    train_loader = EventLoader.from_config(config.data, "train", drop_last=True, **common)
    manifest = read_manifest(config.data.path)
    if not manifest.shards_of("val"):
        if dist.is_main:
            LOG.warning("data set %s has no val split: validation is skipped", config.data.path)
        return train_loader, None
    return train_loader, EventLoader.from_config(config.data, "val", drop_last=False, **common)


def _client_state(trainer: Trainer) -> dict[str, Any]:
    return {"train_state": vars(trainer.state).copy(), "config": trainer.config.to_dict()}


def _per_rank_state(trainer: Trainer) -> dict[str, Any]:
    return {"loader": trainer.train_loader.state_dict(), "rng": ckpt.capture_rng_state()}


def make_checkpoint_saver(config: RunConfig, settings: dict[str, Any]) -> Callable[[Trainer], Path]:
    """Return the function the trainer calls (on every rank) to save a checkpoint."""
    def save(trainer: Trainer) -> Path:
        return ckpt.save_checkpoint(trainer.engine.engine, config.train.run_dir,
                                    trainer.state.step, _client_state(trainer),
                                    keep=config.train.keep_checkpoints,
                                    per_rank=_per_rank_state(trainer), settings=settings)
    return save


def checkpoint_settings(config: RunConfig, task: Task, manifest_sha: str) -> dict[str, Any]:
    """Return the settings a checkpoint records and a resumed job must match."""
    return {"model": dataclasses.asdict(config.model), "task": task.name,
            "data_manifest_sha256": manifest_sha}


class NothingTrainedError(RuntimeError):
    """Every optimizer step of a job was skipped: there is no trained model to export."""


def check_trained(state: TrainState, task: Task, data_path: str) -> None:
    """Raise NothingTrainedError when no optimizer step of the run updated the model."""
    if state.step > state.skipped_steps:
        return
    raise NothingTrainedError(
        f"none of the {state.step} optimizer steps updated the model ({state.skipped_steps} "
        f"skipped, {state.events_seen} events seen), so nothing is exported or registered. "
        f"Check that the train split of {data_path} has events for task {task.name!r}; the log "
        "names the reason of each skip")


class RunDirBusyError(RuntimeError):
    """Another job has the run folder locked; the message names the folder and the lock holder."""


def lock_run_dir(run_dir: Path) -> Any:
    """Take the run folder's lock for this process's lifetime, or raise RunDirBusyError.

    Two jobs in one folder would prune each other's checkpoints and interleave their logs. The
    lock is an flock on ``<run_dir>/.lock``, which the kernel releases when the process ends,
    however it ends. NOTE: flock on network file systems depends on the server; on NFS it may
    not exclude a job on another node.
    """
    import fcntl
    import socket

    handle = open(run_dir / LOCK_NAME, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise RunDirBusyError(
            f"train.run_dir {run_dir} is in use by {holder}; wait for that job to end, stop it, "
            "or choose another train.run_dir") from None
    handle.truncate(0)
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    return handle


def resume_state(engine, train_loader: EventLoader, path: Path | None,
                 settings: dict[str, Any] | None = None) -> TrainState:
    """Load checkpoint ``path`` (or nothing) and return the training state to continue from."""
    if path is None:
        return TrainState()
    saved = ckpt.load_checkpoint(engine, path, settings)
    state = TrainState(**saved["train_state"])
    try:
        train_loader.load_state_dict(saved["loader"])
    except ValueError as error:
        raise ckpt.CheckpointError(f"checkpoint {path} cannot be resumed: {error}") from error
    ckpt.restore_rng_state(saved["rng"])
    state.resumed_from_step = state.step
    LOG.info("resumed from %s at step %d (epoch %d)", path, state.step, state.epoch)
    return state


def _start_tracking(config: RunConfig, dist: DistInfo, state: TrainState, task: Task,
                    manifest_sha: str) -> Tracker:
    tracker = Tracker(config.tracking, config.train.run_dir, active=dist.is_main)
    run_id = tracker.start(state.mlflow_run_id, state.resumed_from_step,
                           tags={"task": task.name, "data.manifest_sha256": manifest_sha})
    tracker.log_params({**config.to_dict(), "data_manifest_sha256": manifest_sha,
                        "world_size": dist.world_size})
    state.mlflow_run_id = broadcast(run_id)
    return tracker


def run_job(config: RunConfig, task: Task, model: torch.nn.Module, dist: DistInfo,
            resume: str = "auto", metadata: dict[str, Any] | None = None,
            feature_stats: FeatureStats | None = None) -> dict[str, Any] | None:
    """Train ``model`` on ``task`` as configured; return result.json's content on rank 0.

    ``resume``: "auto", "none" or a checkpoint path (see ``checkpoint.resolve_resume``).
    ``metadata`` is added to the export's config.json. ``feature_stats`` standardize the inputs
    (a pre-trained model's own); by default the data set manifest's. The export records them.
    """
    run_dir = Path(config.train.run_dir)
    lock, busy = None, ""  # the lock lasts while ``lock`` is referenced, so until this returns
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            lock = lock_run_dir(run_dir)
        except RunDirBusyError as error:
            busy = str(error)
    busy = broadcast(busy)
    if busy:
        raise RunDirBusyError(busy)
    manifest = read_manifest(config.data.path)
    settings = checkpoint_settings(config, task, sha256_file(manifest.path))
    own_stats = FeatureStats.from_manifest(manifest.feature_stats)
    feature_stats = feature_stats or own_stats
    if dist.is_main and feature_stats != own_stats:
        LOG.info("inputs are standardized with the starting model's feature statistics, not "
                 "those of %s", manifest.path)
    engine = build_engine(model, config.train, dist)
    train_loader, val_loader = build_loaders(config, task, dist, feature_stats)
    resume_path = broadcast(ckpt.resolve_resume(resume, run_dir) if dist.is_main else None)
    state = resume_state(engine.engine, train_loader, resume_path, settings)
    if dist.is_main:  # after the resume checks, so a rejected resume leaves the file as it was
        config.save(run_dir / CONFIG_NAME)
    manifest_sha = settings["data_manifest_sha256"]
    tracker = _start_tracking(config, dist, state, task, manifest_sha)
    trainer = Trainer(config, task, engine, train_loader, val_loader, tracker, state,
                      save_checkpoint=make_checkpoint_saver(config, settings))
    LOG.info("%s: preset %s, %s parameters, %d ranks, ZeRO stage %d, %d train events, "
             "up to %d tokens per micro-batch, %d optimizer steps; resolved config in %s",
             task.name, config.model_preset, f"{trainer.num_parameters:,}", dist.world_size,
             config.train.zero_stage, train_loader.num_events, config.data.max_tokens,
             trainer.total_steps, run_dir / CONFIG_NAME)
    try:
        trainer.train()
        check_trained(trainer.state, task, config.data.path)
        trainer.run_validation()
        final_checkpoint = trainer.save_checkpoint(trainer)
        result = _finish(config, trainer, tracker, final_checkpoint, manifest_sha,
                         {"feature_stats": feature_stats.to_manifest(), **(metadata or {})})
    except BaseException:
        tracker.finish("FAILED")
        raise
    return result


def _finish(config: RunConfig, trainer: Trainer, tracker: Tracker, final_checkpoint: Path,
            manifest_sha: str,
            metadata: dict[str, Any]) -> dict[str, Any] | None:
    """Export on every rank; on rank 0 log the model, register it and write result.json."""
    export_dir = Path(config.train.run_dir) / EXPORT_DIR
    # metadata carries "feature_stats", the statistics the inputs were standardized with: they
    # belong to the model, so evaluation on another data set scales its features the same way.
    export_meta = {"task": trainer.task.name, "step": trainer.state.step,
                   "model_preset": config.model_preset, "data_manifest_sha256": manifest_sha,
                   "mlflow_run_id": trainer.state.mlflow_run_id, **metadata}
    exported = export_model(trainer.engine.engine.module, config.model, export_dir, export_meta)
    if not trainer.dist.is_main:
        return None
    tracker.log_artifact(Path(config.train.run_dir) / CONFIG_NAME)
    model_uri = tracker.log_model(exported)
    version = _register(config, tracker, model_uri)
    result = _result(config, trainer, tracker, exported, final_checkpoint, version, manifest_sha)
    _write_json(Path(config.train.run_dir) / RESULT_NAME, result)
    tracker.log_artifact(Path(config.train.run_dir) / RESULT_NAME)
    tracker.finish("FINISHED")
    LOG.info("result written to %s", Path(config.train.run_dir) / RESULT_NAME)
    return result


def _register(config: RunConfig, tracker: Tracker, model_uri: str | None) -> str | None:
    name = config.tracking.registered_model
    if not name or not tracker.active:
        return None
    if model_uri is None:
        LOG.warning("model not registered as %s: logging the export to MLflow failed", name)
        return None
    try:
        registry = ModelRegistry(tracker.tracking_uri, config.tracking.retries)
        return registry.register(name, model_uri, tracker.run_id, config.tracking.aliases)
    except Exception as error:  # a tracking failure must not fail a finished training job
        LOG.warning("registering the model as %s failed: %s: %s", name, type(error).__name__, error)
        return None


def _result(config: RunConfig, trainer: Trainer, tracker: Tracker, exported: Path,
            final_checkpoint: Path, version: str | None, manifest_sha: str) -> dict[str, Any]:
    state = trainer.state
    return {
        "task": trainer.task.name, "first_loss": state.first_loss, "last_loss": state.last_loss,
        "last_val_loss": state.last_val_loss, "steps": state.step,
        "skipped_steps": state.skipped_steps, "events_seen": state.events_seen,
        "tokens_seen": state.tokens_seen, "epochs_completed": state.epoch,
        "world_size": trainer.dist.world_size, "zero_stage": config.train.zero_stage,
        "precision": trainer.engine.precision, "export_path": str(exported.resolve()),
        "export_weights": str((exported / "model.safetensors").resolve()),
        "checkpoint": str(final_checkpoint.resolve()), "mlflow_run_id": state.mlflow_run_id,
        "tracking_uri": tracker.tracking_uri if tracker.active else None,
        "registered_model": config.tracking.registered_model or None,
        "registered_version": version, "resumed_from_step": state.resumed_from_step,
        "data_manifest_sha256": manifest_sha,
    }


def _write_json(path: Path, content: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(content, indent=2) + "\n")
    os.replace(tmp, path)


def run_pretraining(config: RunConfig, resume: str = "auto") -> dict[str, Any] | None:
    """Pre-train ``BumblebeeEncoder(config.model)`` with masked particles; see ``run_job``."""
    from bumblebee_dist.model import BumblebeeEncoder
    from bumblebee_dist.train.loop import PretrainTask

    dist = init_distributed()
    setup_logging(dist)
    seed_everything(config.train.seed)
    model = BumblebeeEncoder(config.model, init_seed=config.train.seed)
    return run_job(config, PretrainTask(), model, dist, resume)
