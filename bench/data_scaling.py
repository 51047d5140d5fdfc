"""Scaling of the Ray data set job: the same events with 1 and with 2 local workers.

    python -m bench.data_scaling [--events 1200] [--events-per-shard 150]

Each configuration runs the real job (Pythia, clustering, detector, selection, shard writing)
in its own process, one after the other, on the same generated-event count and seed. The
printed ratio is events/s with 2 workers over events/s with 1; the ideal is 2.0 on a machine
with 2 idle cores. Ray start-up (a few seconds) is inside the timing, as a user pays it too.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def time_job(out: Path, workers: int, events: int, events_per_shard: int) -> float:
    """Run the data set job in a fresh process; return its wall time in seconds."""
    command = [sys.executable, "-m", "data_prep.ray_job", "--out", str(out),
               "--ttbar-events", str(events), "--eta-t-events", str(events // 2),
               "--events-per-shard", str(events_per_shard), "--workers", str(workers),
               "--seed", "11"]
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    """Time 1 and 2 workers and print the rates and their ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1200,
                        help="ttbar events to generate; half as many eta_t events are added")
    parser.add_argument("--events-per-shard", type=int, default=150,
                        help="generated events per shard (one Ray task each)")
    args = parser.parse_args()
    total = args.events + args.events // 2
    rates = {}
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as folder:
        for workers in (1, 2):
            seconds = time_job(Path(folder) / f"workers{workers}", workers, args.events,
                               args.events_per_shard)
            rates[workers] = total / seconds
            print(f"{workers} worker(s): {total} generated events in {seconds:.1f} s, "
                  f"{rates[workers]:.1f} events/s")
    print(f"scaling 2 workers / 1 worker: {rates[2] / rates[1]:.2f} (ideal 2.00)")


if __name__ == "__main__":
    main()
