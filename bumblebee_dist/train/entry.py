"""Command line shared by the DeepSpeed entry points ``launch/pretrain.py`` and ``launch/finetune.py``."""

from __future__ import annotations

import argparse

from bumblebee_dist.config import RunConfig, load_config
from bumblebee_dist.train.preflight import check_launch_world_size


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
