"""The data set job: one Ray task per shard, a manifest, resumable and reproducible.

Each sample's generated events are cut into shards of ``events_per_shard`` generated events (the
last shard of a sample may have fewer); a shard holds the events of its generation that pass the
selection. Shard k of a sample always gets the same seeds (``pipeline.detector_rng`` and
``generate.pythia_seed``), the same split and the same file name, so a retried or repeated task
rebuilds exactly the same bytes and replaces the file atomically.

Splits are assigned per sample by shard index: the first 80 % of the shards go to train, then
10 % to val, then 10 % to test, with at least one val and one test shard per sample (so a sample
needs at least 3 shards).

The manifest is rewritten after every finished shard with ``"complete": false`` and lists only
shards whose file is complete; the last write adds the feature statistics and sets
``"complete": true``. Running the job again with the same settings skips every shard listed with
a file of matching SHA-256 and rebuilds the others. A shard whose events all fail the selection
is not written; it is listed under ``empty_shards`` with its cut flow.

Locally the job starts Ray with ``num_workers`` CPUs. With ``RAY_ADDRESS`` set (as under
``ray job submit``) it joins that cluster instead; the output folder must then be on a file
system that every node writes to.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import ray
from tqdm import tqdm

from data_prep.generate import SAMPLES, generator_settings, get_sample, pythia_seed
from data_prep.pipeline import STAGES, PipelineConfig, ShardStats, shard_blocks
from data_prep.selection import CUT_NAMES, CutFlow
from data_prep.shards import (
    DEFAULT_BLOCK_EVENTS,
    MANIFEST_FORMAT_VERSION,
    MANIFEST_NAME,
    EmptyShardError,
    FeatureMoments,
    sha256_file,
    shard_relpath,
    write_json_atomic,
    write_shard,
)

logger = logging.getLogger("data_prep.ray_job")

VAL_FRACTION = 0.1
TEST_FRACTION = 0.1


@dataclass(frozen=True)
class ShardTask:
    """One shard to build: which sample, which index, how many events to generate, where."""

    sample: str
    index: int
    split: str
    n_events: int  # generated events
    path: str  # relative to the data set folder


def assign_splits(num_shards: int) -> list[str]:
    """Return the split of each shard index of one sample: train, then val, then test."""
    if num_shards < 3:
        raise ValueError(
            f"a sample needs at least 3 shards (one each for train, val and test), got "
            f"{num_shards}; lower events_per_shard or generate more events"
        )
    num_val = max(1, round(VAL_FRACTION * num_shards))
    num_test = max(1, round(TEST_FRACTION * num_shards))
    num_train = num_shards - num_val - num_test
    return ["train"] * num_train + ["val"] * num_val + ["test"] * num_test


def plan_shards(sample_events: dict[str, int], events_per_shard: int) -> list[ShardTask]:
    """Cut every sample's generated events into shard tasks; samples with 0 events get none."""
    if events_per_shard < 1:
        raise ValueError(f"events_per_shard={events_per_shard} must be >= 1")
    tasks = []
    for sample, total in sample_events.items():
        get_sample(sample)
        if total < 0:
            raise ValueError(f"{sample} events={total} must be >= 0")
        if total == 0:
            continue
        num_shards = math.ceil(total / events_per_shard)
        for index, split in enumerate(assign_splits(num_shards)):
            n_events = min(events_per_shard, total - index * events_per_shard)
            tasks.append(ShardTask(sample, index, split, n_events,
                                   shard_relpath(split, sample, index)))
    return tasks


def run_shard_task(out_dir: str, task: ShardTask, dataset_seed: int, config: PipelineConfig,
                   block_events: int) -> dict[str, Any]:
    """Build one shard: generate, simulate, select, write. Returns its manifest record."""
    stats = ShardStats()
    blocks = list(shard_blocks(task.sample, dataset_seed, task.index, task.n_events, config,
                               stats))
    start = time.perf_counter()
    record: dict[str, Any] = {
        "sample": task.sample, "index": task.index, "split": task.split,
        "generated": task.n_events, "pythia_seed": pythia_seed(dataset_seed, task.sample,
                                                               task.index),
        "cut_flow": stats.cut_flow.counts, "dropped_nonfinite": stats.dropped_nonfinite,
    }
    try:
        info = write_shard(Path(out_dir) / task.path, blocks, block_events=block_events)
    except EmptyShardError:
        record.update(path=None, events=0, tokens=0)
    else:
        record.update(path=task.path, events=info.events, tokens=info.tokens,
                      sha256=info.sha256, feature_moments=info.stats.moments)
    stats.seconds["writing"] += time.perf_counter() - start
    record["seconds"] = dict(stats.seconds)
    return record


def _job_settings(sample_events: dict[str, int], seed: int, events_per_shard: int,
                  block_events: int, config: PipelineConfig) -> dict[str, Any]:
    """Everything that decides the bytes of the shards; a resumed job must match it."""
    return {"seed": seed, "sample_events": sample_events, "events_per_shard": events_per_shard,
            "block_events": block_events, "pipeline": dataclasses.asdict(config)}


def _load_previous(manifest_path: Path, settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Return the reusable shard records of an earlier run, keyed by (sample, index)."""
    if not manifest_path.is_file():
        return {}
    previous = json.loads(manifest_path.read_text())
    if previous.get("job") != settings:
        raise ValueError(
            f"{manifest_path} was written with other settings ({previous.get('job')}); "
            f"use a new output folder or the same settings ({settings})"
        )
    reusable = {}
    for record in previous.get("shards", []) + previous.get("empty_shards", []):
        path = record.get("path")
        if path and not ((manifest_path.parent / path).is_file()
                         and sha256_file(manifest_path.parent / path) == record.get("sha256")):
            continue
        reusable[(record["sample"], record["index"])] = record
    return reusable


def _manifest(records: list[dict[str, Any]], settings: dict[str, Any], complete: bool
              ) -> dict[str, Any]:
    records = sorted(records, key=lambda r: (get_sample(r["sample"]).sample_id, r["index"]))
    samples = []
    for spec in sorted(SAMPLES.values(), key=lambda s: s.sample_id):
        cut_flow = CutFlow()
        for record in records:
            if record["sample"] == spec.name:
                cut_flow.add(record["cut_flow"])
        samples.append({
            "name": spec.name, "id": spec.sample_id, "process_codes": list(spec.process_codes),
            "generator": {"pythia8mc": pythia8mc_version(),
                          "settings": generator_settings(spec.name),
                          "seed": "Random:seed per shard, see pythia_seed in each shard record"},
            "cut_flow": cut_flow.counts, "selection_efficiency": cut_flow.efficiency(),
        })
    written = [r for r in records if r["path"]]
    manifest = {
        "format_version": MANIFEST_FORMAT_VERSION, "complete": complete, "seed": settings["seed"],
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "job": settings, "samples": samples, "shards": written,
        "empty_shards": [r for r in records if not r["path"]],
        "events": sum(r["events"] for r in written), "tokens": sum(r["tokens"] for r in written),
    }
    moments = FeatureMoments()
    for record in written:
        if record["split"] == "train":
            moments.merge(FeatureMoments(moments={k: list(v) for k, v
                                                  in record["feature_moments"].items()}))
    if moments.moments["log_pt"][0] > 0:
        manifest["feature_stats"] = moments.to_feature_stats()
    return manifest


def pythia8mc_version() -> str:
    """Return the installed pythia8mc version."""
    return importlib.metadata.version("pythia8mc")


def _init_ray(num_workers: int) -> bool:
    """Connect to Ray; return True when this call started it (so the job shuts it down)."""
    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        logger.info("joining the Ray cluster at RAY_ADDRESS=%s", os.environ["RAY_ADDRESS"])
        ray.init()
    else:
        logger.info("starting a local Ray with %d CPUs", num_workers)
        ray.init(num_cpus=num_workers, include_dashboard=False, configure_logging=False)
    return True


def build_dataset(out_dir: str | Path, *, ttbar_events: int, eta_t_events: int, seed: int,
                  events_per_shard: int, num_workers: int = 2,
                  block_events: int = DEFAULT_BLOCK_EVENTS,
                  config: PipelineConfig | None = None, task_retries: int = 2) -> Path:
    """Generate, simulate, select and shard both samples with Ray; return the manifest path.

    ``ttbar_events`` and ``eta_t_events`` count generated events; the shards hold those that
    pass the selection. Reruns with the same arguments skip the shards already complete.
    Raises RuntimeError when no event at all passes the selection.
    """
    if num_workers < 1:
        raise ValueError(f"num_workers={num_workers} is invalid: the job needs at least 1 worker")
    config = config or PipelineConfig()
    config.selection.validate()
    out = Path(out_dir)
    manifest_path = out / MANIFEST_NAME
    sample_events = {"ttbar": int(ttbar_events), "eta_t": int(eta_t_events)}
    settings = _job_settings(sample_events, int(seed), events_per_shard, block_events, config)
    tasks = plan_shards(sample_events, events_per_shard)
    previous = _load_previous(manifest_path, settings)
    records = [previous[(t.sample, t.index)] for t in tasks if (t.sample, t.index) in previous]
    pending = [t for t in tasks if (t.sample, t.index) not in previous]
    logger.info("%d shards planned, %d already complete, %d to build",
                len(tasks), len(records), len(pending))

    start = time.perf_counter()
    built: list[dict[str, Any]] = []
    if pending:
        started_ray = _init_ray(num_workers)
        try:
            remote = ray.remote(num_cpus=1, max_retries=task_retries,
                                retry_exceptions=task_retries > 0)(run_shard_task)
            futures = [remote.remote(str(out), task, int(seed), config, block_events)
                       for task in pending]
            with tqdm(total=len(tasks), initial=len(records), unit="shard") as progress:
                while futures:
                    done, futures = ray.wait(futures, num_returns=1)
                    built.append(ray.get(done[0]))
                    records.append(built[-1])
                    write_json_atomic(manifest_path, _manifest(records, settings, complete=False))
                    progress.update(1)
        finally:
            # A local Ray left running would keep its idle workers through the training steps.
            if started_ray:
                ray.shutdown()
    manifest = _manifest(records, settings, complete=True)
    if manifest["events"] == 0:
        write_json_atomic(manifest_path, manifest)
        raise RuntimeError(
            f"0 events passed the selection in {len(tasks)} shards; no shard was written "
            f"(cut flows in {manifest_path})"
        )
    write_json_atomic(manifest_path, manifest)
    _log_summary(manifest, built, time.perf_counter() - start)
    return manifest_path


def _log_summary(manifest: dict[str, Any], built: list[dict[str, Any]], wall: float) -> None:
    for sample in manifest["samples"]:
        flow = sample["cut_flow"]
        logger.info("%s: %d events generated, %d selected (efficiency %.3f); cut flow %s",
                    sample["name"], flow["generated"], flow[CUT_NAMES[-1]],
                    sample["selection_efficiency"], flow)
    generated = sum(r["generated"] for r in built)
    if not built or wall <= 0:
        return
    seconds = {stage: sum(r["seconds"].get(stage, 0.0) for r in built)
               for stage in (*STAGES, "writing")}
    rates = {stage: (generated / value if value > 0 else float("inf"))
             for stage, value in seconds.items()}
    logger.info("throughput/events_per_s=%.1f over %.1f s wall for %d generated events",
                generated / wall, wall, generated)
    logger.info("per-stage events_per_s per core: %s",
                ", ".join(f"{stage}={rate:.0f}" for stage, rate in rates.items()))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line of the data set job."""
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.ray_job",
        description="Generate ttbar and eta_t events with Pythia 8, simulate a detector, select "
                    "dilepton events and write WebDataset shards with a manifest.")
    parser.add_argument("--out", required=True, help="output data set folder")
    parser.add_argument("--ttbar-events", type=int, required=True,
                        help="ttbar events to generate (before the selection)")
    parser.add_argument("--eta-t-events", type=int, required=True,
                        help="eta_t events to generate (before the selection)")
    parser.add_argument("--seed", type=int, default=1, help="data set seed (non-negative int)")
    parser.add_argument("--events-per-shard", type=int, default=1000,
                        help="generated events per shard, one Ray task each")
    parser.add_argument("--block-events", type=int, default=DEFAULT_BLOCK_EVENTS,
                        help="selected events per block inside a shard")
    parser.add_argument("--workers", type=int, default=2,
                        help="CPUs of the local Ray (ignored when RAY_ADDRESS is set)")
    parser.add_argument("--batch-size", type=int, default=PipelineConfig.batch_size,
                        help="events per Pythia batch and per vectorized processing step")
    parser.add_argument("--max-jets", type=int, default=PipelineConfig.max_jets,
                        help="reco jets kept per event, highest pT first")
    parser.add_argument("--task-retries", type=int, default=2,
                        help="retries of a failed shard task")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    """Run the job from the command line; return the manifest path."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    if args.seed < 0:
        raise SystemExit(f"--seed={args.seed} is invalid: must be >= 0")
    config = PipelineConfig(batch_size=args.batch_size, max_jets=args.max_jets)
    return build_dataset(args.out, ttbar_events=args.ttbar_events,
                         eta_t_events=args.eta_t_events, seed=args.seed,
                         events_per_shard=args.events_per_shard, num_workers=args.workers,
                         block_events=args.block_events, config=config,
                         task_retries=args.task_retries)


if __name__ == "__main__":
    main()
