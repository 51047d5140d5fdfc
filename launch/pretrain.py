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

from bumblebee_dist.train.entry import job_config
from bumblebee_dist.train.run import run_pretraining


def main(argv: list[str] | None = None) -> None:
    """Build the config and run the pre-training job."""
    config, resume = job_config(__doc__.splitlines()[0], argv)
    run_pretraining(config, resume=resume)


if __name__ == "__main__":
    main()
