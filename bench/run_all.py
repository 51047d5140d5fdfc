"""Every benchmark of ``make bench``, each printing ratios measured side by side in one run.

    python -m bench.run_all [--data DIR]

1. events/s of each data preparation stage on a few hundred real Pythia events;
2. the Ray data set job with 2 local workers against 1, on the same events;
3. the loader on generated data: events/s and the packed vs padded token ratio. The data set is
   ``--data``, else the demo's (``runs/demo/data``) when it is complete, else a small one made
   here with the Ray job;
4. training on that data set: packed vs padded throughput, ZeRO model-state bytes per stage in
   fp32 and bf16, and the data-wait share of a short pre-training job;
5. the Triton kernels compiled for sm_80 and sm_90: registers, spills and shared memory of each
   launch, which needs no GPU. Kernel timings (``bench.kernels``) need one and are not run here.

Run it as a module from the repository root: as a script, ``bench/data_prep.py`` would hide the
``data_prep`` package.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

DEMO_DATA = Path("runs/demo/data")


def _complete(data: Path) -> bool:
    manifest = data / "manifest.json"
    return manifest.is_file() and bool(json.loads(manifest.read_text()).get("complete"))


def _run(module: str, *args: str) -> None:
    print(f"\n$ python -m {module} {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, "-m", module, *args], check=True)


def main() -> None:
    """Run the benchmarks in sequence."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="data set folder (default: the demo's)")
    args = parser.parse_args()

    _run("bench.data_prep", "--events", "300")
    _run("bench.data_scaling")
    data = args.data or (DEMO_DATA if _complete(DEMO_DATA) else None)
    with tempfile.TemporaryDirectory(prefix="bench-data-") as folder:
        if data is None:
            data = Path(folder) / "data"
            print(f"\nno complete demo data set in {DEMO_DATA}: generating a small one in {data}")
            _run("data_prep.ray_job", "--out", str(data), "--ttbar-events", "3000",
                 "--eta-t-events", "1500", "--events-per-shard", "500", "--workers", "2")
        _run("bench.loader", "--data", str(data), "--epochs", "3")
        _run("bench.train", "--data", str(data))
    _run("bench.kernel_compile")


if __name__ == "__main__":
    main()
