"""Delphes ROOT files to event blocks and shards, read with uproot.

A physicist with Delphes samples made elsewhere converts them here and uses the same data set
format, selection and token layout as the Pythia chain from then on. Per chunk of events:

1. ``read_chunks`` reads only the branches of ``required_branches`` (the collection fields below
   and each collection's ``<name>_size``). A missing branch raises DelphesFormatError naming the
   branch and the file, and so does an object count that differs from the size branch.
2. ``particle_batch`` turns the ``Particle`` collection into a ``generate.ParticleBatch``, with
   a system entry (PDG id 90) prepended so that positions follow Pythia's record layout, and
   ``truth.find_gen_objects`` finds tops, b quarks and W decay products by the same rules.
   Delphes stores ``M1`` and ``M2`` as 0-based positions in the event's ``Particle`` array, -1
   for none (``TreeWriter``, Delphes 3).
3. ``reco_events`` builds electrons, muons, jets and missing momentum as ``detector.RecoEvents``.
   A jet is b-tagged when bit ``btag_bit`` of ``Jet.BTag`` is set. Delphes writes one bit per
   b-tagging working point of its card.
4. ``selection.select`` and ``records.build_block`` apply the dilepton selection and build the
   tokens, exactly as for generated events.

References from reco leptons to gen particles (``Electron.Particle``, ``Muon.Particle``) hold
the unique id (``fUniqueID``) of the particle, not its position. Delphes resets the id counter per
event, and ids often equal position + 1, but not in general. ``resolve_unique_ids`` looks each id
up among the event's ``Particle.fUniqueID``. An id that no particle of the event has raises
DelphesFormatError naming the file, the event and the id. Id 0 is a null reference.
The resolved links feed the lepton truth-match count of ``ConversionStats``.

Event ids follow ``records.event_ids`` with the input file's position in the input list as the
shard index and the tree entry as the event index. Splits are assigned by tree entry: entry
modulo 10 equal to 0 goes to test, 1 to val, the rest to train.

NOTE: the test files are written by uproot with plain integer references. A TRef read from a
real Delphes file arrives as a record, and its ``ref`` field is taken as the unique id. That path
has not been run on a file written by Delphes itself.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import awkward as ak
import numpy as np
import uproot

from bumblebee_dist.data.block import EventBlock
from data_prep.detector import ELECTRON_MASS_GEV, MUON_MASS_GEV, Objects, RecoEvents
from data_prep.generate import SAMPLES, ParticleBatch, get_sample
from data_prep.physics import to_px_py_pz_e
from data_prep.records import DEFAULT_MAX_JETS, build_block
from data_prep.selection import CutFlow, SelectionConfig, select
from data_prep.shards import (
    DEFAULT_BLOCK_EVENTS,
    MANIFEST_FORMAT_VERSION,
    MANIFEST_NAME,
    FeatureMoments,
    ShardInfo,
    ShardStreamWriter,
    write_json_atomic,
)
from data_prep.truth import GenObjects, find_gen_objects, ttbar_mass

logger = logging.getLogger("data_prep.delphes")

# Fields read per collection; every collection also needs its "<name>_size" branch.
COLLECTION_FIELDS = {
    "Electron": ("PT", "Eta", "Phi", "Charge", "Particle"),
    "Muon": ("PT", "Eta", "Phi", "Charge", "Particle"),
    "Jet": ("PT", "Eta", "Phi", "Mass", "BTag"),
    "MissingET": ("MET", "Phi"),
    "Particle": ("fUniqueID", "PID", "Status", "M1", "M2", "PT", "Eta", "Phi", "Mass"),
}
PROCESS_BRANCH = "Event.ProcessID"
SYSTEM_PDG = 90
SPLITS = ("train", "val", "test")
_UID_SHIFT = 32


class DelphesFormatError(ValueError):
    """A Delphes file that the reader cannot use; the message names the file and the branch."""


@dataclass
class DelphesConfig:
    """Settings of the Delphes conversion."""

    sample: str = "ttbar"  # sample name in the manifest, one of generate.SAMPLES
    tree: str = "Delphes"
    btag_bit: int = 0  # bit of Jet.BTag of the chosen b-tagging working point
    process_code: int | None = None  # constant process code; None reads Event.ProcessID
    chunk_events: int = 10_000  # tree entries read per step
    max_jets: int = DEFAULT_MAX_JETS
    selection: SelectionConfig = field(default_factory=SelectionConfig)

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field."""
        get_sample(self.sample)
        if not 0 <= self.btag_bit < 32:
            raise ValueError(f"delphes.btag_bit={self.btag_bit} is invalid: must lie in [0, 32)")
        if self.chunk_events < 1:
            raise ValueError(f"delphes.chunk_events={self.chunk_events} is invalid: must be >= 1")
        self.selection.validate()


@dataclass
class ConversionStats:
    """Counters of a conversion, summed over chunks and files."""

    cut_flow: CutFlow = field(default_factory=CutFlow)
    leptons: int = 0  # reco leptons read
    leptons_linked: int = 0  # ... with a gen reference
    leptons_truth_matched: int = 0  # ... whose gen particle has the same PDG id


def required_branches(config: DelphesConfig) -> list[str]:
    """Return the names of every branch the conversion reads, in reading order."""
    names = []
    for collection, fields in COLLECTION_FIELDS.items():
        names += [f"{collection}.{name}" for name in fields]
        names.append(f"{collection}_size")
    if config.process_code is None:
        names.append(PROCESS_BRANCH)
    return names


def _resolve_keys(tree: Any, names: list[str], path: str) -> dict[str, str]:
    """Map each branch name to its key in ``tree``; Delphes nests ``Jet.PT`` as ``Jet/Jet.PT``."""
    keys = tree.keys(recursive=True, full_paths=True)
    by_name = {}
    for key in keys:
        by_name.setdefault(key.rsplit("/", 1)[-1], key)
    resolved = {}
    for name in names:
        if name not in by_name:
            raise DelphesFormatError(
                f"{path}: branch {name!r} not found in tree {tree.name!r}; the reader needs "
                f"{names}")
        resolved[name] = by_name[name]
    return resolved


def read_chunks(path: str | Path, config: DelphesConfig
                ) -> Iterator[tuple[int, dict[str, ak.Array]]]:
    """Yield (first tree entry, {branch name: array}) per chunk, reading only required branches.

    Raises DelphesFormatError for a missing tree or branch and for an object count that differs
    from its size branch.
    """
    path = str(path)
    names = required_branches(config)
    with uproot.open(path) as file:
        if config.tree not in file:
            raise DelphesFormatError(f"{path}: tree {config.tree!r} not found; keys: "
                                     f"{file.keys()}")
        tree = file[config.tree]
        keys = _resolve_keys(tree, names, path)
        for arrays, report in tree.iterate(list(keys.values()), step_size=config.chunk_events,
                                           library="ak", how=dict, report=True):
            chunk = {name: arrays[keys[name]] for name in names}
            check_sizes(chunk, path, report.tree_entry_start)
            yield report.tree_entry_start, chunk


def check_sizes(chunk: dict[str, ak.Array], path: str, first_entry: int) -> None:
    """Raise DelphesFormatError unless every field has ``<collection>_size`` objects per event."""
    for collection, fields in COLLECTION_FIELDS.items():
        sizes = np.asarray(chunk[f"{collection}_size"], dtype=np.int64)
        for name in fields:
            branch = f"{collection}.{name}"
            counts = np.asarray(ak.num(chunk[branch], axis=1), dtype=np.int64)
            bad = np.flatnonzero(counts != sizes)
            if bad.size:
                entry = first_entry + int(bad[0])
                raise DelphesFormatError(
                    f"{path}: branch {branch!r} has {int(counts[bad[0]])} objects in event "
                    f"{entry}, but {collection}_size is {int(sizes[bad[0]])} "
                    f"({bad.size} events differ in this chunk)")


def _flat(array: ak.Array, dtype: type) -> np.ndarray:
    return np.asarray(ak.to_numpy(ak.flatten(array, axis=1)), dtype=dtype)


def _unique_ids(array: ak.Array, path: str, branch: str) -> ak.Array:
    """Return the unique ids of a reference branch: plain integers, or a TRef's ``ref`` field."""
    fields = ak.fields(array)
    if fields:
        if "ref" not in fields:
            raise DelphesFormatError(
                f"{path}: reference branch {branch!r} has fields {fields}, expected 'ref' "
                "(a TRef) or plain integer unique ids")
        return array["ref"]
    return array


def particle_batch(chunk: dict[str, ak.Array], process_code: np.ndarray, path: str,
                   first_entry: int) -> ParticleBatch:
    """Build the gen record of a chunk as a ParticleBatch, entry 0 of each event a system entry.

    ``M1`` and ``M2`` shift by one (-1, no mother, becomes the system entry). A mother position
    outside the event raises DelphesFormatError naming the event and the value.
    """
    sizes = np.asarray(chunk["Particle_size"], dtype=np.int64)
    num_events = sizes.size
    counts = sizes + 1
    offsets = np.zeros(num_events + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    system = offsets[:-1]
    stored = np.ones(int(offsets[-1]), dtype=bool)
    stored[system] = False
    particle_event = np.repeat(np.arange(num_events), sizes)

    def column(name: str, dtype: type, fill: float) -> np.ndarray:
        values = np.full(int(offsets[-1]), fill, dtype=dtype)
        values[stored] = _flat(chunk[f"Particle.{name}"], dtype)
        return values

    mothers = [_mother_column(chunk, name, sizes, particle_event, path, first_entry)
               for name in ("M1", "M2")]
    pt, eta, phi = (column(name, np.float64, 0.0) for name in ("PT", "Eta", "Phi"))
    mass = np.maximum(column("Mass", np.float64, 0.0), 0.0)
    # Delphes stores eta = +-999.9 for pT = 0 (the beams); pz is not recoverable from it.
    eta = np.where(pt > 0.0, eta, 0.0)
    px, py, pz, energy = to_px_py_pz_e(pt, eta, phi, mass)
    mother1 = np.zeros(int(offsets[-1]), dtype=np.int32)
    mother2 = np.zeros(int(offsets[-1]), dtype=np.int32)
    mother1[stored], mother2[stored] = mothers
    pdg = column("PID", np.int32, SYSTEM_PDG)
    return ParticleBatch(
        offsets=offsets, pdg_id=pdg, status=column("Status", np.int32, -11),
        mother1=mother1, mother2=mother2, px=px, py=py, pz=pz, e=energy, m=mass,
        charge=np.zeros(pdg.size, dtype=np.float32),  # not stored in the chosen branches
        process_code=np.asarray(process_code, dtype=np.int32),
    )


def _mother_column(chunk: dict[str, ak.Array], name: str, sizes: np.ndarray,
                   particle_event: np.ndarray, path: str, first_entry: int) -> np.ndarray:
    """Return Particle.<name> + 1 (positions after the system entry), checked against sizes."""
    values = _flat(chunk[f"Particle.{name}"], np.int64)
    bad = np.flatnonzero((values < -1) | (values >= sizes[particle_event]))
    if bad.size:
        event = int(particle_event[bad[0]])
        raise DelphesFormatError(
            f"{path}: branch 'Particle.{name}' of event {first_entry + event} is "
            f"{int(values[bad[0]])}, outside the event's {int(sizes[event])} particles "
            "(valid: -1 for none, or a position in the event's Particle array)")
    return (values + 1).astype(np.int32)


def resolve_unique_ids(particle_uids: ak.Array, references: ak.Array, path: str,
                       branch: str, first_entry: int) -> np.ndarray:
    """Return the position in its event's particle array of every referenced particle.

    ``particle_uids`` and ``references`` are jagged per event; the result is flat, one entry per
    reference in event order, -1 for a null reference (id 0). Raises DelphesFormatError naming
    the event and the id when no particle of the event has that id or an event repeats an id.
    """
    uid_counts = np.asarray(ak.num(particle_uids, axis=1), dtype=np.int64)
    ref_counts = np.asarray(ak.num(references, axis=1), dtype=np.int64)
    uids = _flat(particle_uids, np.int64)
    refs = _flat(references, np.int64)
    uid_event = np.repeat(np.arange(uid_counts.size), uid_counts)
    ref_event = np.repeat(np.arange(ref_counts.size), ref_counts)
    # One sorted key per (event, id), so a single searchsorted resolves every reference.
    keys = (uid_event << _UID_SHIFT) + uids
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    repeated = np.flatnonzero(np.diff(sorted_keys) == 0)
    if repeated.size:
        first = order[repeated[0]]
        raise DelphesFormatError(
            f"{path}: event {first_entry + int(uid_event[first])} repeats unique id "
            f"{int(uids[first])} in 'Particle.fUniqueID'")
    position = np.full(refs.size, -1, dtype=np.int64)
    if sorted_keys.size == 0:
        found = np.zeros(refs.size, dtype=bool)
    else:
        ref_keys = (ref_event << _UID_SHIFT) + refs
        slot = np.minimum(np.searchsorted(sorted_keys, ref_keys), sorted_keys.size - 1)
        found = sorted_keys[slot] == ref_keys
        starts = np.concatenate([[0], np.cumsum(uid_counts)[:-1]])
        position[found] = order[slot[found]] - starts[ref_event[found]]
    missing = np.flatnonzero(~found & (refs != 0))
    if missing.size:
        raise DelphesFormatError(
            f"{path}: {branch!r} of event {first_entry + int(ref_event[missing[0]])} refers to "
            f"unique id {int(refs[missing[0]])}, which no particle of the event has")
    return position


def _lepton_objects(chunk: dict[str, ak.Array], collection: str, pdg: int,
                    mass: float) -> Objects:
    counts = np.asarray(chunk[f"{collection}_size"], dtype=np.int64)
    charge = _flat(chunk[f"{collection}.Charge"], np.int64)
    # A negative lepton has a positive PDG id (e- is 11).
    return Objects(
        event=np.repeat(np.arange(counts.size), counts),
        pdg_id=(-np.sign(charge) * pdg).astype(np.int32),
        pt=_flat(chunk[f"{collection}.PT"], np.float64),
        eta=_flat(chunk[f"{collection}.Eta"], np.float64),
        phi=_flat(chunk[f"{collection}.Phi"], np.float64),
        m=np.full(charge.size, mass),
        btag=np.zeros(charge.size),
    )


def _sorted_objects(objects: Objects) -> Objects:
    """Sort by event, then by decreasing pT."""
    return objects.take(np.lexsort((-objects.pt, objects.event)))


def reco_events(chunk: dict[str, ak.Array], config: DelphesConfig, path: str,
                first_entry: int) -> RecoEvents:
    """Build leptons, jets and missing momentum of a chunk as the detector simulation does."""
    electrons = _lepton_objects(chunk, "Electron", 11, ELECTRON_MASS_GEV)
    muons = _lepton_objects(chunk, "Muon", 13, MUON_MASS_GEV)
    leptons = Objects(*(np.concatenate([getattr(electrons, name), getattr(muons, name)])
                        for name in ("event", "pdg_id", "pt", "eta", "phi", "m", "btag")))
    jet_counts = np.asarray(chunk["Jet_size"], dtype=np.int64)
    btag = ((_flat(chunk["Jet.BTag"], np.int64) >> config.btag_bit) & 1).astype(np.float64)
    jets = Objects(
        event=np.repeat(np.arange(jet_counts.size), jet_counts),
        pdg_id=np.where(btag > 0, 5, 41).astype(np.int32),
        pt=_flat(chunk["Jet.PT"], np.float64), eta=_flat(chunk["Jet.Eta"], np.float64),
        phi=_flat(chunk["Jet.Phi"], np.float64), m=_flat(chunk["Jet.Mass"], np.float64),
        btag=btag,
    )
    met_counts = np.asarray(chunk["MissingET_size"], dtype=np.int64)
    if np.any(met_counts != 1):
        bad = int(np.flatnonzero(met_counts != 1)[0])
        raise DelphesFormatError(
            f"{path}: event {first_entry + bad} has {int(met_counts[bad])} MissingET entries, "
            "expected exactly 1")
    met = _flat(chunk["MissingET.MET"], np.float64)
    met_phi = _flat(chunk["MissingET.Phi"], np.float64)
    return RecoEvents(leptons=_sorted_objects(leptons), jets=_sorted_objects(jets), met=met,
                      met_phi=met_phi, dropped_nonfinite=0)


def _process_codes(chunk: dict[str, ak.Array], config: DelphesConfig) -> np.ndarray:
    num_events = len(chunk["Particle_size"])
    if config.process_code is not None:
        return np.full(num_events, config.process_code, dtype=np.int32)
    return np.asarray(ak.to_numpy(ak.firsts(chunk[PROCESS_BRANCH], axis=1)), dtype=np.int32)


def _count_lepton_links(chunk: dict[str, ak.Array], stats: ConversionStats, path: str,
                        first_entry: int) -> None:
    """Resolve the reco leptons' gen references and count those matching in PDG id."""
    pids = _flat(chunk["Particle.PID"], np.int64)
    starts = np.concatenate([[0], np.cumsum(np.asarray(chunk["Particle_size"]))[:-1]])
    for collection, flavour in (("Electron", 11), ("Muon", 13)):
        branch = f"{collection}.Particle"
        position = resolve_unique_ids(chunk["Particle.fUniqueID"],
                                      _unique_ids(chunk[branch], path, branch), path, branch,
                                      first_entry)
        counts = np.asarray(chunk[f"{collection}_size"], dtype=np.int64)
        event = np.repeat(np.arange(counts.size), counts)
        linked = position >= 0
        gen_pid = pids[starts[event[linked]] + position[linked]]
        stats.leptons += int(position.size)
        stats.leptons_linked += int(linked.sum())
        stats.leptons_truth_matched += int(np.count_nonzero(np.abs(gen_pid) == flavour))


def _finite_gen(batch: ParticleBatch, gen: GenObjects) -> np.ndarray:
    index = np.maximum(gen.indices(), 0)
    finite = np.ones(index.shape, dtype=bool)
    for column in (batch.px, batch.py, batch.pz, batch.e, batch.m):
        finite &= np.isfinite(column[index])
    return finite.all(axis=1)


def convert_chunk(chunk: dict[str, ak.Array], config: DelphesConfig, stats: ConversionStats,
                  *, path: str, file_index: int, first_entry: int) -> EventBlock:
    """Select the events of one chunk and return their tokens as a validated EventBlock."""
    batch = particle_batch(chunk, _process_codes(chunk, config), path, first_entry)
    gen = find_gen_objects(batch)
    m_ttbar = ttbar_mass(batch, gen)
    gen_ok = gen.complete & _finite_gen(batch, gen)
    reco = reco_events(chunk, config, path, first_entry)
    _count_lepton_links(chunk, stats, path, first_entry)
    selected = select(reco, gen_ok, config.selection)
    stats.cut_flow.add(selected.cut_flow)
    return build_block(batch, gen, m_ttbar, selected, (reco.met, reco.met_phi),
                       sample_id=get_sample(config.sample).sample_id, shard_index=file_index,
                       first_event_index=first_entry, max_jets=config.max_jets)


def split_of_entries(entries: np.ndarray) -> np.ndarray:
    """Return the split index (0 train, 1 val, 2 test) of each tree entry."""
    remainder = np.asarray(entries, dtype=np.int64) % 10
    return np.select([remainder == 0, remainder == 1], [2, 1], 0)


def convert_files(inputs: list[str | Path], out_dir: str | Path, config: DelphesConfig, *,
                  shard_events: int = 10_000,
                  block_events: int = DEFAULT_BLOCK_EVENTS) -> Path:
    """Convert Delphes files into shards and a manifest under ``out_dir``; return the manifest.

    Raises FileExistsError when ``out_dir`` already contains a manifest, and RuntimeError when no
    event passes the selection or the train split is empty.
    """
    config.validate()
    out = Path(out_dir)
    if (out / MANIFEST_NAME).exists():
        raise FileExistsError(f"{out / MANIFEST_NAME} exists; convert into a new folder")
    writers = [ShardStreamWriter(out / "shards" / split, config.sample, shard_events,
                                 block_events=block_events) for split in SPLITS]
    stats = ConversionStats()
    for file_index, path in enumerate(inputs):
        for first_entry, chunk in read_chunks(path, config):
            block = convert_chunk(chunk, config, stats, path=str(path), file_index=file_index,
                                  first_entry=first_entry)
            entries = block.event_id & ((1 << 32) - 1)
            split = split_of_entries(entries)
            for index, writer in enumerate(writers):
                writer.add(block.take_events(np.flatnonzero(split == index)))
        logger.info("%s converted; cut flow so far %s", path, stats.cut_flow.counts)
    shards = {split: writer.close() for split, writer in zip(SPLITS, writers)}
    manifest = _manifest(inputs, config, stats, shards, out)
    write_json_atomic(out / MANIFEST_NAME, manifest)
    logger.info("%d events in %d shards; %d of %d reco leptons linked to a gen particle of the "
                "same flavour", manifest["events"], len(manifest["shards"]),
                stats.leptons_truth_matched, stats.leptons)
    return out / MANIFEST_NAME


def _manifest(inputs: list[str | Path], config: DelphesConfig, stats: ConversionStats,
              shards: dict[str, list[ShardInfo]], out: Path) -> dict[str, Any]:
    records = [{"path": info.path.relative_to(out).as_posix(), "split": split,
                "sample": config.sample, "events": info.events, "tokens": info.tokens,
                "sha256": info.sha256} for split, infos in shards.items() for info in infos]
    if not records:
        raise RuntimeError(f"0 events passed the selection in {len(inputs)} Delphes files; "
                           f"cut flow {stats.cut_flow.counts}")
    if not shards["train"]:
        raise RuntimeError("the train split contains no event, so the feature statistics cannot "
                           "be computed; convert more events")
    moments = FeatureMoments()
    for info in shards["train"]:
        moments.merge(info.stats)
    source = {"source": "delphes", "files": [str(p) for p in inputs], "tree": config.tree,
              "btag_bit": config.btag_bit, "branches": required_branches(config)}
    samples = []
    for spec in sorted(SAMPLES.values(), key=lambda s: s.sample_id):
        flow = stats.cut_flow if spec.name == config.sample else CutFlow()
        samples.append({"name": spec.name, "id": spec.sample_id,
                        "process_codes": list(spec.process_codes),
                        "generator": source if spec.name == config.sample else None,
                        "cut_flow": flow.counts, "selection_efficiency": flow.efficiency()})
    return {
        "format_version": MANIFEST_FORMAT_VERSION, "complete": True, "samples": samples,
        "shards": records, "events": sum(r["events"] for r in records),
        "tokens": sum(r["tokens"] for r in records),
        "lepton_links": {"leptons": stats.leptons, "linked": stats.leptons_linked,
                         "same_flavour": stats.leptons_truth_matched},
        "feature_stats": moments.to_feature_stats(),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line of the Delphes conversion."""
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.delphes",
        description="Convert Delphes ROOT files into WebDataset shards and a manifest, with the "
                    "same dilepton selection and tokens as the generated data sets.")
    parser.add_argument("--input", nargs="+", required=True, help="Delphes ROOT files")
    parser.add_argument("--out", required=True, help="new output data set folder")
    parser.add_argument("--sample", default="ttbar", choices=sorted(SAMPLES),
                        help="sample the events belong to")
    parser.add_argument("--tree", default="Delphes", help="name of the Delphes tree")
    parser.add_argument("--btag-bit", type=int, default=0,
                        help="bit of Jet.BTag of the b-tagging working point")
    parser.add_argument("--process-code", type=int, default=None,
                        help=f"process code of every event; default: read {PROCESS_BRANCH}")
    parser.add_argument("--shard-events", type=int, default=10_000,
                        help="selected events per shard")
    parser.add_argument("--block-events", type=int, default=DEFAULT_BLOCK_EVENTS,
                        help="selected events per block inside a shard")
    parser.add_argument("--chunk-events", type=int, default=10_000,
                        help="tree entries read per step")
    parser.add_argument("--max-jets", type=int, default=DEFAULT_MAX_JETS,
                        help="reco jets kept per event, highest pT first")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    """Run the conversion from the command line; return the manifest path."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    config = DelphesConfig(sample=args.sample, tree=args.tree, btag_bit=args.btag_bit,
                           process_code=args.process_code, chunk_events=args.chunk_events,
                           max_jets=args.max_jets)
    return convert_files(args.input, args.out, config, shard_events=args.shard_events,
                         block_events=args.block_events)


if __name__ == "__main__":
    main()
