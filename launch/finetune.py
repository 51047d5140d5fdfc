"""Fine-tune the encoder for event classification under DeepSpeed.

    deepspeed --num_gpus 8 launch/finetune.py --config configs/finetune.yaml \
        data.path=runs/demo/data train.run_dir=runs/demo/finetune \
        finetune.task=toponium finetune.pretrained=models:/bumblebee-pretrained@champion

On a machine without GPUs, prefix ``DS_ACCELERATOR=cpu`` and pass ``--num_gpus 2`` for two
CPU ranks over gloo. Everything else lives in ``bumblebee_dist.finetune``.
"""

from __future__ import annotations

from bumblebee_dist.finetune import run_finetuning
from bumblebee_dist.train.entry import run_entry_point


def main(argv: list[str] | None = None) -> None:
    """Build the config and run the fine-tuning job."""
    run_entry_point(__doc__.splitlines()[0], run_finetuning, argv)


if __name__ == "__main__":
    main()
