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

from bumblebee_dist.train.entry import run_entry_point
from bumblebee_dist.train.run import run_pretraining


def main(argv: list[str] | None = None) -> None:
    """Build the config and run the pre-training job."""
    run_entry_point(__doc__.splitlines()[0], run_pretraining, argv)


if __name__ == "__main__":
    main()
