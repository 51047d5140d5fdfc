"""Events per second of each data preparation stage, on a few hundred real events.

    python -m bench.data_prep --events 300 --sample ttbar

Run it as a module from the repository root: as a script (``python bench/data_prep.py``) its
own name would hide the ``data_prep`` package. Generation includes Pythia's initialization (about 1 s), as a shard task pays it too.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from data_prep.pipeline import STAGES, PipelineConfig, ShardStats, shard_blocks
from data_prep.shards import write_shard


def main() -> None:
    """Run one shard's chain and print events/s per stage on one core."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=300, help="events to generate")
    parser.add_argument("--sample", default="ttbar", help="ttbar or eta_t")
    parser.add_argument("--batch-size", type=int, default=100, help="events per batch")
    args = parser.parse_args()

    stats = ShardStats()
    config = PipelineConfig(batch_size=args.batch_size)
    blocks = list(shard_blocks(args.sample, 1, 0, args.events, config, stats))
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        info = write_shard(Path(folder) / "bench-00000.tar", blocks)
        stats.seconds["writing"] += time.perf_counter() - start
    total = sum(stats.seconds.values())
    print(f"{args.sample}: {args.events} generated, {info.events} selected, "
          f"{info.tokens} tokens")
    for stage in (*STAGES, "writing"):
        seconds = stats.seconds[stage]
        print(f"{stage:>11}: {args.events / seconds:10.0f} events/s  ({seconds:6.2f} s)")
    print(f"{'all':>11}: {args.events / total:10.0f} events/s  ({total:6.2f} s)")


if __name__ == "__main__":
    main()
