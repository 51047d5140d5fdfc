"""Pre-train the encoder with masked particles under DeepSpeed.

    deepspeed --num_gpus 8 launch/pretrain.py --config configs/pretrain.yaml \
        data.path=runs/demo/data train.run_dir=runs/demo/pretrain

On a machine without GPUs, prefix ``DS_ACCELERATOR=cpu`` and pass ``--num_gpus 2`` for two
CPU ranks over gloo. On several nodes, start it through the launch wrapper, which checks the
hostfile first and makes the job stop if it gets fewer ranks than requested (docs/cluster.md):

    python -m bumblebee_dist.launching --hostfile hostfile --num_nodes 4 --num_gpus 8 \
        launch/pretrain.py --config configs/pretrain.yaml train.run_dir=/shared/runs/pt1

Everything else lives in ``bumblebee_dist.train.run``.
"""

from __future__ import annotations

import argparse

from bumblebee_dist.config import load_config
from bumblebee_dist.train.preflight import check_launch_world_size
from bumblebee_dist.train.run import run_pretraining


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; overrides may come before or after the options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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


def main(argv: list[str] | None = None) -> None:
    """Build the config and run the pre-training job."""
    args = parse_args(argv)
    check_launch_world_size(args.expected_world_size)
    config = load_config(args.config, args.overrides, preset=args.preset)
    run_pretraining(config, resume=args.resume)


if __name__ == "__main__":
    main()
