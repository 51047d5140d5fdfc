"""Command line shared by the DeepSpeed entry points ``launch/pretrain.py`` and ``launch/finetune.py``."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable

from bumblebee_dist.config import ConfigError, RunConfig, load_config
from bumblebee_dist.data.block import BlockFormatError
from bumblebee_dist.data.packing import EventTooLongError
from bumblebee_dist.data.shards import ManifestError, ShardError
from bumblebee_dist.train.checkpoint import CheckpointError
from bumblebee_dist.train.preflight import LaunchError, check_launch_world_size
from bumblebee_dist.train.run import NothingTrainedError, RunDirBusyError

# Errors in the user's config, data or run folder rather than bugs: a job stopped by one prints
# its message on one line per rank and exits with status 2, without a traceback.
USER_ERRORS = (ConfigError, CheckpointError, ManifestError, ShardError, BlockFormatError,
               EventTooLongError, LaunchError, RunDirBusyError, NothingTrainedError,
               FileNotFoundError)


def parse_job_args(description: str, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse a training job's command line; overrides may come before or after the options."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="YAML or JSON config file")
    parser.add_argument("--preset", help="model preset: paper, small or tiny")
    parser.add_argument("--resume", default="auto",
                        help="auto: newest complete checkpoint in train.run_dir (default); "
                             "none: start fresh; or a checkpoint folder")
    parser.add_argument("--local_rank", type=int, default=None,
                        help="set by the deepspeed launcher; ranks are read from the environment")
    parser.add_argument("--expected_world_size", type=int, default=None,
                        help="ranks the job must have; set by bumblebee_dist.launching, and the "
                             "job stops when the launcher started another number")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value",
                        help="config overrides, applied after the file")
    return parser.parse_intermixed_args(argv)


def job_config(description: str, argv: list[str] | None = None) -> tuple[RunConfig, str]:
    """Parse the command line, check the world size, and return (config, resume)."""
    args = parse_job_args(description, argv)
    check_launch_world_size(args.expected_world_size)
    return load_config(args.config, args.overrides, preset=args.preset), args.resume


def run_entry_point(description: str, job: Callable[..., Any], argv: list[str] | None = None) -> None:
    """Parse the command line and run ``job(config, resume=...)``; report user errors in one line."""
    try:
        config, resume = job_config(description, argv)
        job(config, resume=resume)
        close_process_group()
    except USER_ERRORS as error:
        print(f"[rank {os.environ.get('RANK', '0')}] error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)


def close_process_group() -> None:
    """Destroy the process group once every rank is done, before the interpreter exits.

    Left to the interpreter's exit, the group's teardown sometimes aborted a rank with
    "terminate called without an active exception" (exit -6) after a job that had finished and
    written its result, and the launcher then reported the whole job as failed.
    """
    import torch

    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
