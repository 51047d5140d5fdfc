"""Jet clustering with FastJet: anti-kt, R = 0.4, many events in one call.

The inputs are flat particle columns with an event index; the events of a batch are clustered
together through FastJet's awkward-array interface, which loops over events in C++. An event with
no input particle, or too few to reach the pT threshold, gets no jet.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import awkward as ak
import fastjet
import numpy as np

JET_RADIUS = 0.4
_banner_shown = False


def _print_banner_silently() -> None:
    """Let FastJet print its once-per-process banner into /dev/null.

    FastJet 3.5 writes the banner to the C++ stdout on the first clustering of a process, and its
    Python package exposes no switch for it. Every Ray worker would otherwise print 20 lines.
    """
    global _banner_shown
    if _banner_shown:
        return
    _banner_shown = True
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
            single = ak.Array([[{"px": 1.0, "py": 0.0, "pz": 0.0, "E": 1.0}]])
            fastjet.ClusterSequence(single, fastjet.JetDefinition(fastjet.antikt_algorithm, JET_RADIUS))
    finally:
        os.dup2(saved, 1)
        os.close(saved)


@dataclass
class FourVectors:
    """Flat four-vectors of several events: ``event`` (K,) int64, momenta (K,) float64 in GeV."""

    event: np.ndarray
    px: np.ndarray
    py: np.ndarray
    pz: np.ndarray
    e: np.ndarray


def cluster_jets(particles: FourVectors, num_events: int, *, radius: float = JET_RADIUS,
                 min_pt: float = 20.0) -> FourVectors:
    """Cluster anti-kt jets of the given radius per event and keep those with pT >= ``min_pt``.

    ``particles.event`` must be sorted (events in order); events without particles are allowed.
    Jets come back sorted by event, then by decreasing pT.
    """
    if particles.event.size and np.any(np.diff(particles.event) < 0):
        raise ValueError("cluster_jets: particles.event must be sorted by event")
    counts = np.bincount(particles.event, minlength=num_events).astype(np.int64)
    if counts.size != num_events:
        raise ValueError(
            f"cluster_jets: event index {int(particles.event.max())} is out of range for "
            f"num_events={num_events}"
        )
    empty = FourVectors(*(np.zeros(0, dtype=dtype) for dtype in (np.int64, *[np.float64] * 4)))
    if num_events == 0 or counts.sum() == 0:
        return empty
    inputs = ak.unflatten(
        ak.zip({"px": particles.px, "py": particles.py, "pz": particles.pz, "E": particles.e}),
        counts,
    )
    _print_banner_silently()
    definition = fastjet.JetDefinition(fastjet.antikt_algorithm, radius)
    sequence = fastjet.ClusterSequence(inputs, definition)
    jets = sequence.inclusive_jets(min_pt=min_pt)
    jet_counts = ak.to_numpy(ak.num(jets)).astype(np.int64)
    flat = ak.flatten(jets)
    result = FourVectors(
        event=np.repeat(np.arange(num_events, dtype=np.int64), jet_counts),
        px=ak.to_numpy(flat.px).astype(np.float64),
        py=ak.to_numpy(flat.py).astype(np.float64),
        pz=ak.to_numpy(flat.pz).astype(np.float64),
        e=ak.to_numpy(flat.E).astype(np.float64),
    )
    pt = np.hypot(result.px, result.py)
    order = np.lexsort((-pt, result.event))
    return FourVectors(*(getattr(result, name)[order] for name in ("event", "px", "py", "pz", "e")))
