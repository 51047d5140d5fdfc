"""The ``bumblebee`` command: the demo chain and each of its steps.

    bumblebee demo                       generate, shard, pre-train, fine-tune, evaluate, register
    bumblebee generate --out DIR ...     the Ray data set job (same flags as launch/make_dataset.py)
    bumblebee pretrain [ARGS]            deepspeed launch/pretrain.py ARGS on this machine
    bumblebee finetune [ARGS]            deepspeed launch/finetune.py ARGS on this machine
    bumblebee evaluate --data DIR ...    AUROC, baselines and reconstruction on the test split
    bumblebee models list|alias|compare  registered models, aliases, versions side by side
    bumblebee info [--preset paper]      a model preset's shape and parameter count
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import subprocess
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
                        help="fine-tuned model: models:/name/version or @alias, an export folder, "
                             "a .safetensors file or a training result.json")
    parser.add_argument("--pretrained", default=None,
                        help="pre-trained model for the reconstruction study, in the same forms "
                             "(optional)")
    parser.add_argument("--out", required=True, help="folder for evaluation.json and plots")
    parser.add_argument("--task", default="toponium", choices=("toponium", "initial_state"))
    parser.add_argument("--tracking-uri", default="",
                        help="MLflow tracking URI (default: mlflow.db and mlartifacts/ in the "
                             "folder above --out)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the MLP baseline and bootstrap")


DEMO_TRACKING_URI = "sqlite:///runs/demo/mlflow.db"


def _add_models(subparsers) -> None:
    parser = subparsers.add_parser("models", help="list, alias and compare registered models")
    actions = parser.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="registered models with versions and aliases")
    alias = actions.add_parser("alias", help="point an alias (champion, challenger) at a version")
    alias.add_argument("name", help="registered model name, e.g. bumblebee-toponium")
    alias.add_argument("alias", help="alias to set, e.g. champion")
    alias.add_argument("version", help="version the alias points to")
    compare = actions.add_parser("compare", help="registered versions on the same test events")
    compare.add_argument("uris", nargs="+", help="models:/name/version or models:/name@alias")
    compare.add_argument("--data", required=True, help="data set folder holding manifest.json")
    compare.add_argument("--out", required=True, help="folder for compare.json and plots")
    compare.add_argument("--kind", choices=("classifier", "reconstruction"), default="classifier",
                         help="classifier: AUROC and ROC curves; reconstruction: resolutions")
    compare.add_argument("--task", default="toponium", choices=("toponium", "initial_state"))
    for action in (listing, alias, compare):
        action.add_argument("--tracking-uri", default=DEMO_TRACKING_URI,
                            help=f"MLflow tracking URI (default: the demo's, {DEMO_TRACKING_URI})")


def _require_store(tracking_uri: str) -> None:
    """Raise when ``tracking_uri`` names no store, rather than let MLflow create an empty one."""
    if not tracking_uri:
        raise ValueError(f"--tracking-uri is missing: a models:/ URI is looked up in an MLflow "
                         f"store, so pass the one that contains the model (the demo's is "
                         f"{DEMO_TRACKING_URI})")
    if tracking_uri.startswith("sqlite:///"):
        store = Path(tracking_uri[len("sqlite:///"):])
        if not store.is_file():
            raise FileNotFoundError(
                f"no MLflow store at {store.resolve()}; run the demo first, run this command "
                f"from the project folder, or pass --tracking-uri")


def _run_models(args) -> None:
    from bumblebee_dist.tracking import ModelRegistry, make_client

    _require_store(args.tracking_uri)
    if args.action == "alias":
        ModelRegistry(args.tracking_uri).set_alias(args.name, args.alias, args.version)
        print(f"{args.name}@{args.alias} -> version {args.version}")
        return
    if args.action == "list":
        client = make_client(args.tracking_uri)
        for model in client.search_registered_models():
            aliases: dict[str, list[str]] = {}
            for alias, version in (model.aliases or {}).items():
                aliases.setdefault(str(version), []).append(alias)
            for version in sorted(client.search_model_versions(f"name='{model.name}'"),
                                  key=lambda item: int(item.version)):
                marks = "".join(f"  @{alias}" for alias in sorted(aliases.get(str(version.version), [])))
                print(f"{model.name}/{version.version}{marks}  run {version.run_id}")
        return
    from bumblebee_dist.evaluate import compare

    data, out = Path(args.data), Path(args.out)
    if args.kind == "classifier":
        result = compare.compare_classifiers(args.uris, data, out, task=args.task,
                                             tracking_uri=args.tracking_uri)
    else:
        result = compare.compare_reconstruction(args.uris, data, out, tracking_uri=args.tracking_uri)
    print(compare.format_comparison(result))


def _add_info(subparsers) -> None:
    parser = subparsers.add_parser("info", help="print a model preset's shape and parameter count")
    parser.add_argument("--preset", default="paper", help="model preset: tiny, small or paper")


def _run_info(preset: str) -> None:
    from bumblebee_dist.config import model_preset
    from bumblebee_dist.model import BumblebeeEncoder, count_parameters

    config = model_preset(preset)
    model = BumblebeeEncoder(config, init_seed=None)
    print(f"preset {preset}: {config.num_layers} layers, width {config.hidden_size}, "
          f"{config.num_heads} heads, feed-forward {config.ffn_size}")
    print(f"parameters: {count_parameters(model):,}")


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
    _add_models(subparsers)
    _add_info(subparsers)
    return parser


def _launch_training(script: str, rest: list[str], ranks: int) -> None:
    from bumblebee_dist.launching import run_deepspeed, split_launcher_options
    from bumblebee_dist.train.entry import parse_job_args
    from bumblebee_dist.config import load_config

    # Check the config here, in one line, before the launcher spends its start-up on it.
    _, script_args = split_launcher_options(rest)
    job = parse_job_args(script, script_args)
    load_config(job.config, job.overrides, preset=job.preset)
    run_deepspeed(script, rest, num_ranks=ranks or None)


def _dispatch(argv: list[str]) -> int:
    if argv[:1] == ["generate"]:
        from data_prep.ray_job import main as generate_main

        generate_main(argv[1:])
        return 0
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command in ("pretrain", "finetune"):
        _launch_training(args.script, rest, args.ranks)
        return 0
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "demo":
        from bumblebee_dist.pipeline import run_demo

        settings = DemoSettings(**{field.name: getattr(args, field.name)
                                   for field in dataclasses.fields(DemoSettings)})
        run_demo(settings)
    elif args.command == "info":
        _run_info(args.preset)
    elif args.command == "models":
        _run_models(args)
    else:
        from bumblebee_dist.evaluate.run import run_evaluation

        if any(str(spec or "").startswith("models:/") for spec in (args.finetuned, args.pretrained)):
            _require_store(args.tracking_uri)
        run_evaluation(Path(args.data), args.finetuned, args.pretrained, Path(args.out),
                       task=args.task, tracking_uri=args.tracking_uri, seed=args.seed)
    return 0


def main(argv: list[str] | None = None, *, exit_on_error: bool = False) -> int:
    """Run the ``bumblebee`` command and return its exit status.

    From the command line (``exit_on_error``), an invalid input or a failed step prints one
    line naming it and exits with 2, and Ctrl-C exits with 130; called from Python, errors raise.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    _setup_logging()
    if not exit_on_error:
        return _dispatch(argv)
    from bumblebee_dist.config import ConfigError
    from bumblebee_dist.tracking import TrackingError
    from bumblebee_dist.train.preflight import LaunchError

    try:
        return _dispatch(argv)
    except KeyboardInterrupt:
        print("\ninterrupted; run the same command again to continue where it stopped",
              file=sys.stderr)
        return 130
    except (ConfigError, LaunchError, TrackingError, ValueError, KeyError, FileNotFoundError,
            FileExistsError, NotADirectoryError) as error:
        print(f"bumblebee: error: {error}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as error:
        print(f"bumblebee: error: {' '.join(map(str, error.cmd[:3]))} ... exited with "
              f"{error.returncode}; its log above names the cause", file=sys.stderr)
        return 2
    except Exception as error:
        from mlflow.exceptions import MlflowException

        if not isinstance(error, MlflowException):
            raise
        print(f"bumblebee: error: {error.message}", file=sys.stderr)
        return 2


def console_main() -> None:
    """Entry point of the installed ``bumblebee`` script."""
    sys.exit(main(exit_on_error=True))


if __name__ == "__main__":
    console_main()
