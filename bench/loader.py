"""Measure the event loader: events per second and packed against padded tokens.

Usage: python bench/loader.py [--data DIR] [--events 200000] [--max-tokens 4096] [--num-workers 0]

Without ``--data`` a synthetic data set (``bumblebee_dist.data.synthetic``) is written to a
temporary folder. Three rates are printed, all on one rank:

- load: reading the shards (tar stream, SHA-256, npy decode, validation), jet cap and feature
  transform, per second of wall time;
- iterate: cutting, gathering, masking and packing batches, per second of wall time;
- end to end: events over load plus iterate time for one epoch.

The token ratio compares the packed tokens with the tokens a padded batch of the same events
would hold (events x longest event of the batch); 1.0 means no padding would be needed.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bumblebee_dist.data.loader import MASK_MODES, EventLoader
from bumblebee_dist.data.synthetic import write_dataset


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, help="data set folder; default: write a synthetic one")
    parser.add_argument("--split", default="train", help="split to read")
    parser.add_argument("--events", type=int, default=200_000,
                        help="events of the synthetic data set")
    parser.add_argument("--shard-events", type=int, default=20_000,
                        help="events per synthetic shard")
    parser.add_argument("--max-tokens", type=int, default=4096, help="token budget per batch")
    parser.add_argument("--max-jets", type=int, default=8, help="reco jets kept per event")
    parser.add_argument("--mask-mode", choices=MASK_MODES, default="pretrain")
    parser.add_argument("--num-workers", type=int, default=0, help="loader worker processes")
    parser.add_argument("--epochs", type=int, default=2, help="epochs to iterate")
    return parser.parse_args()


def run(data: Path, args: argparse.Namespace) -> None:
    """Load the split once, iterate it for the requested epochs and print the rates."""
    start = time.perf_counter()
    loader = EventLoader(data, args.split, max_tokens=args.max_tokens, max_jets=args.max_jets,
                         mask_mode=args.mask_mode, num_workers=args.num_workers)
    load_s = time.perf_counter() - start
    print(f"load: {loader.num_events} events in {load_s:.2f} s, "
          f"{loader.num_events / load_s:,.0f} events/s")
    rates = []
    for epoch in range(args.epochs):
        events = packed = padded = batches = 0
        start = time.perf_counter()
        for batch in loader:
            events += batch.num_events
            packed += batch.num_tokens
            padded += batch.num_events * batch.max_seqlen
            batches += 1
        iterate_s = time.perf_counter() - start
        print(f"epoch {epoch}: {events} events in {batches} batches, iterate "
              f"{events / iterate_s:,.0f} events/s, end to end "
              f"{events / (load_s + iterate_s):,.0f} events/s, "
              f"packed/padded tokens {packed / padded:.3f}")
        rates.append(events / iterate_s)
    cores = max(1, args.num_workers)
    per_core = min(rates) / cores
    print(f"target: >= 50,000 events/s per worker core; the slowest epoch iterated "
          f"{per_core:,.0f} per core ({cores} core{'s' if cores > 1 else ''}): "
          f"{'met' if per_core >= 50_000 else 'missed'}. The load step runs once per job.")


def main() -> None:
    args = parse_args()
    if args.data is not None:
        run(args.data, args)
        return
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as folder:
        full, rest = divmod(args.events, args.shard_events)
        counts = [args.shard_events] * full + ([rest] if rest else [])
        start = time.perf_counter()
        write_dataset(folder, {args.split: counts}, block_events=2000)
        print(f"wrote {args.events} synthetic events in {len(counts)} shards "
              f"in {time.perf_counter() - start:.1f} s")
        run(Path(folder), args)


if __name__ == "__main__":
    main()
