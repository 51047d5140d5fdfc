"""The whole chain on one machine: generate, shard, pre-train, fine-tune, evaluate, register.

Each step writes its result file when it completes and is skipped when that file exists. So a
demo that died or was stopped continues when started again. Generation skips complete shards,
and training resumes from its newest checkpoint.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

LOG = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[1]
SETTINGS_NAME = "demo_settings.json"

PRETRAINED_MODEL = "bumblebee-pretrained"
FINETUNED_MODEL = "bumblebee-toponium"


@dataclass
class DemoSettings:
    """Sizes of the demo; the defaults run in minutes on a 2-core CPU machine."""

    out: str = "runs/demo"  # everything the demo makes goes under this folder
    ttbar_events: int = 36000  # ttbar events generated (before selection)
    eta_t_events: int = 36000  # eta_t events generated (before selection)
    seed: int = 1  # data set seed; training seeds derive from it
    events_per_shard: int = 1000  # generated events per shard (one Ray task each)
    workers: int = 2  # Ray worker processes for generation
    preset: str = "small"  # model preset
    pretrain_epochs: int = 16
    finetune_epochs: int = 10
    max_tokens: int = 2048  # token budget of one packed micro-batch per rank
    num_ranks: int = 0  # DeepSpeed ranks; 0 = one per GPU, or 2 on a CPU-only machine

    @property
    def root(self) -> Path:
        """Output folder as an absolute Path, so every step and rank uses the same folder."""
        return Path(self.out).resolve()

    @property
    def tracking_uri(self) -> str:
        """MLflow store of the demo: a SQLite file beside its artifacts."""
        return f"sqlite:///{(self.root / 'mlflow.db').resolve()}"


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def step_generate(settings: DemoSettings) -> dict:
    """Generate and shard events with the Ray job, then track the data set; return the manifest."""
    from data_prep.ray_job import build_dataset

    manifest_path = build_dataset(
        settings.root / "data", ttbar_events=settings.ttbar_events,
        eta_t_events=settings.eta_t_events, seed=settings.seed,
        events_per_shard=settings.events_per_shard, num_workers=settings.workers)
    manifest = _read_json(Path(manifest_path))
    track_dataset(manifest, Path(manifest_path), settings.tracking_uri)
    return manifest


def track_dataset(manifest: dict, manifest_path: Path, tracking_uri: str) -> None:
    """Log the data set to MLflow: generator settings, cut flows, the manifest, validation plots."""
    from bumblebee_dist.config import TrackingConfig
    from bumblebee_dist.tracking import Tracker
    from data_prep.plots import load_samples, make_plots

    plots = make_plots(load_samples(manifest_path.parent), manifest_path.parent / "plots")
    tracker = Tracker(TrackingConfig(uri=tracking_uri, experiment="bumblebee-data",
                                     run_name="dataset"), manifest_path.parent, active=True)
    tracker.start()
    params = {"seed": manifest.get("seed"), "events": manifest.get("events")}
    metrics = {}
    for sample in manifest["samples"]:
        params[f"{sample['name']}/generator"] = "; ".join(sample["generator"]["settings"])
        metrics[f"selection_efficiency/{sample['name']}"] = sample["selection_efficiency"]
        for cut, count in sample["cut_flow"].items():
            metrics[f"cut_flow/{sample['name']}/{cut}"] = count
    tracker.log_params(params)
    tracker.log_metrics(metrics, step=0)
    tracker.log_artifact(manifest_path)
    for path in plots:
        tracker.log_artifact(path, artifact_path="validation_plots")
    tracker.finish()


def _training_args(settings: DemoSettings, kind: str, extra: list[str]) -> list[str]:
    run_dir = settings.root / kind
    return [
        "--config", str(REPO_ROOT / "configs" / f"{kind}.yaml"), "--preset", settings.preset, "--resume", "auto",
        f"data.path={settings.root / 'data'}", f"train.run_dir={run_dir}",
        f"train.seed={settings.seed}", f"tracking.uri={settings.tracking_uri}",
        f"data.max_tokens={settings.max_tokens}", *extra,
    ]


def step_pretrain(settings: DemoSettings) -> dict:
    """Pre-train with the DeepSpeed launcher; return the run's result.json."""
    from bumblebee_dist.launching import run_deepspeed

    args = _training_args(settings, "pretrain", [
        f"train.epochs={settings.pretrain_epochs}",
        f"tracking.registered_model={PRETRAINED_MODEL}"])
    run_deepspeed("launch/pretrain.py", args, num_ranks=settings.num_ranks or None)
    return _read_json(settings.root / "pretrain" / "result.json")


def step_finetune(settings: DemoSettings) -> dict:
    """Fine-tune the pre-trained model of this demo on toponium vs ttbar; return result.json.

    It starts from the exact registry version the pre-training step registered (not an alias,
    which an earlier demo in the same store may hold), or from its export when none was
    registered.
    """
    from bumblebee_dist.launching import run_deepspeed

    pretrain = _read_json(settings.root / "pretrain" / "result.json")
    version = pretrain.get("registered_version")
    source = (f"models:/{pretrain['registered_model']}/{version}" if version
              else pretrain["export_path"])
    args = _training_args(settings, "finetune", [
        f"train.epochs={settings.finetune_epochs}", "finetune.task=toponium",
        f"finetune.pretrained={source}", f"tracking.registered_model={FINETUNED_MODEL}"])
    run_deepspeed("launch/finetune.py", args, num_ranks=settings.num_ranks or None)
    return _read_json(settings.root / "finetune" / "result.json")


def step_evaluate(settings: DemoSettings) -> dict:
    """Evaluate both models and the MLP baseline on the test split; return evaluation.json."""
    from bumblebee_dist.evaluate.run import run_evaluation

    return run_evaluation(
        data_path=settings.root / "data",
        finetuned=settings.root / "finetune" / "result.json",
        pretrained=settings.root / "pretrain" / "result.json",
        out_dir=settings.root / "evaluation", task="toponium",
        tracking_uri=settings.tracking_uri, seed=settings.seed)


def _is_complete(path: Path) -> bool:
    """Return whether the result file exists and, for a manifest, marks every shard written."""
    if not path.is_file():
        return False
    return path.name != "manifest.json" or bool(_read_json(path).get("complete"))


STEPS = (
    ("generate and shard", "data/manifest.json", step_generate),
    ("pre-train", "pretrain/result.json", step_pretrain),
    ("fine-tune", "finetune/result.json", step_finetune),
    ("evaluate", "evaluation/evaluation.json", step_evaluate),
)


class SettingsMismatchError(ValueError):
    """A demo folder contains results made with other settings than the ones requested."""


def check_settings(settings: DemoSettings) -> None:
    """Raise SettingsMismatchError when the output folder was made with other settings.

    Complete steps are skipped on a new start, so their results must come from the same
    settings. A changed size needs a new ``--out`` folder.
    """
    path = settings.root / SETTINGS_NAME
    if not path.is_file():
        return
    saved = _read_json(path)
    requested = asdict(settings)
    changed = [f"{key}: {saved.get(key)!r} -> {value!r}" for key, value in requested.items()
               if key != "out" and saved.get(key) != value]
    if changed:
        raise SettingsMismatchError(
            f"{settings.root} contains a demo made with other settings ({'; '.join(changed)}); "
            f"pass a new --out folder, or delete {settings.root} to start over")


def run_demo(settings: DemoSettings) -> dict:
    """Run every step not yet complete, then print and save the summary table."""
    check_settings(settings)
    settings.root.mkdir(parents=True, exist_ok=True)
    (settings.root / SETTINGS_NAME).write_text(json.dumps(asdict(settings), indent=2) + "\n")
    results, timings = {}, {}
    for number, (name, result_file, step) in enumerate(STEPS, start=1):
        result_path = settings.root / result_file
        if _is_complete(result_path):
            LOG.info("[%d/%d] %s: already complete (%s), skipped", number, len(STEPS), name, result_path)
            results[name] = _read_json(result_path)
            continue
        LOG.info("[%d/%d] %s ...", number, len(STEPS), name)
        start = time.perf_counter()
        results[name] = step(settings)
        timings[name] = time.perf_counter() - start
        LOG.info("[%d/%d] %s done in %.0f s", number, len(STEPS), name, timings[name])
    from bumblebee_dist.summary import build_summary, format_summary

    summary = build_summary(results, timings)
    (settings.root / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(format_summary(summary))
    LOG.info("summary saved to %s", settings.root / "summary.json")
    return summary
