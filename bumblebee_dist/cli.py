"""The ``bumblebee`` command: the demo chain and each of its steps.

    bumblebee demo                       generate, shard, pre-train, fine-tune, evaluate, register
    bumblebee generate --out DIR ...     the Ray data set job (same flags as launch/make_dataset.py)
    bumblebee pretrain [ARGS]            deepspeed launch/pretrain.py ARGS on this machine
    bumblebee finetune [ARGS]            deepspeed launch/finetune.py ARGS on this machine
    bumblebee evaluate --data DIR ...    AUROC, baselines and reconstruction on the test split
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from bumblebee_dist.pipeline import DemoSettings


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")


def _add_demo(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="run every step on a small default data set")
    defaults = DemoSettings()
    helps = {
        "out": "output folder of the whole demo",
        "ttbar_events": "ttbar events to generate, before selection",
        "eta_t_events": "eta_t events to generate, before selection",
        "seed": "data set seed; the training seed is the same",
        "events_per_shard": "generated events per shard (one Ray task each)",
        "workers": "Ray worker processes for generation",
        "preset": "model preset: tiny, small or paper",
        "pretrain_epochs": "pre-training epochs over the train split",
        "finetune_epochs": "fine-tuning epochs over the train split",
        "num_ranks": "DeepSpeed ranks (0: one per GPU, or 2 CPU ranks without a GPU)",
        "max_tokens": "token budget of one packed micro-batch per rank",
    }
    for field in dataclasses.fields(DemoSettings):
        default = getattr(defaults, field.name)
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(default), default=default,
                            help=f"{helps[field.name]} (default: {default})")


def _add_training(subparsers, name: str, script: str) -> None:
    parser = subparsers.add_parser(
        name, help=f"run deepspeed {script} on this machine; other arguments go to the script")
    parser.add_argument("--ranks", type=int, default=0,
                        help="processes to start (default: one per GPU, or 2 CPU ranks)")
    parser.set_defaults(script=script)


def _add_evaluate(subparsers) -> None:
    parser = subparsers.add_parser("evaluate", help="evaluate fine-tuned and pre-trained models")
    parser.add_argument("--data", required=True, help="data set folder holding manifest.json")
    parser.add_argument("--finetuned", required=True,
                        help="fine-tuned export folder, .safetensors file or training result.json")
    parser.add_argument("--pretrained", default=None,
                        help="pre-trained export for the reconstruction study (optional)")
    parser.add_argument("--out", required=True, help="folder for evaluation.json and plots")
    parser.add_argument("--task", default="toponium", choices=("toponium", "initial_state"))
    parser.add_argument("--tracking-uri", default="", help="MLflow tracking URI (default: local SQLite)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the MLP baseline and bootstrap")


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="bumblebee", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_demo(subparsers)
    subparsers.add_parser("generate", help="generate and shard events with Ray", add_help=False)
    _add_training(subparsers, "pretrain", "launch/pretrain.py")
    _add_training(subparsers, "finetune", "launch/finetune.py")
    _add_evaluate(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``bumblebee`` command and return its exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _setup_logging()
    if argv[:1] == ["generate"]:
        from data_prep.ray_job import main as generate_main

        generate_main(argv[1:])
        return 0
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command in ("pretrain", "finetune"):
        from bumblebee_dist.launching import run_deepspeed

        run_deepspeed(args.script, rest, num_ranks=args.ranks or None)
        return 0
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "demo":
        from bumblebee_dist.pipeline import run_demo

        settings = DemoSettings(**{field.name: getattr(args, field.name)
                                   for field in dataclasses.fields(DemoSettings)})
        run_demo(settings)
        return 0
    from bumblebee_dist.evaluate.run import run_evaluation

    run_evaluation(Path(args.data), args.finetuned, args.pretrained, Path(args.out), task=args.task,
                   tracking_uri=args.tracking_uri, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
