"""Delphes ROOT input: a Delphes-shaped tree written with uproot, read back into event blocks."""

from __future__ import annotations

import awkward as ak
import numpy as np
import pytest
import uproot

from bumblebee_dist.data.shards import read_manifest, read_shards
from bumblebee_dist.tokens import LEVEL_GEN, LEVEL_RECO
from data_prep import delphes
from data_prep.delphes import (
    DelphesConfig,
    DelphesFormatError,
    convert_chunk,
    main,
    read_chunks,
    required_branches,
    resolve_unique_ids,
)

TOP_MASS = 172.5
# Gen record of one dileptonic ttbar event, Delphes layout: (PID, Status, M1, M2).
# Positions: 0-1 beams, 2-3 gluons, 4-5 tops, 6 W+, 7 b, 8 W-, 9 bbar, 10 e+, 11 nu_e,
# 12 mu-, 13 nu_mu bar, 14-15 final copies of e+ and mu-.
GEN_RECORD = [
    (2212, 4, -1, -1), (2212, 4, -1, -1), (21, 21, 0, -1), (21, 21, 1, -1),
    (6, 22, 2, 3), (-6, 22, 2, 3), (24, 22, 4, -1), (5, 23, 4, -1), (-24, 22, 5, -1),
    (-5, 23, 5, -1), (-11, 23, 6, -1), (12, 23, 6, -1), (13, 23, 8, -1), (-14, 23, 8, -1),
    (-11, 1, 10, -1), (13, 1, 12, -1),
]
E_PLUS_FINAL, MU_MINUS_FINAL = 14, 15


def _uids(num_particles: int, event: int) -> np.ndarray:
    """Unique ids that differ from position + 1: a reversed, spaced sequence per event."""
    return (1000 + 7 * np.arange(num_particles)[::-1] + event).astype(np.uint32)


def _gen_event(rng: np.random.Generator, event: int) -> dict[str, np.ndarray]:
    rows = np.array(GEN_RECORD)
    size = len(rows)
    pt = rng.uniform(30.0, 120.0, size)
    pt[:2] = 0.0
    eta = rng.uniform(-2.0, 2.0, size)
    eta[0], eta[1] = 999.9, -999.9  # Delphes' value for pT = 0
    mass = np.zeros(size)
    mass[4:6] = TOP_MASS
    mass[[7, 9]] = 4.8
    return {"fUniqueID": _uids(size, event), "PID": rows[:, 0].astype(np.int32),
            "Status": rows[:, 1].astype(np.int32), "M1": rows[:, 2].astype(np.int32),
            "M2": rows[:, 3].astype(np.int32), "PT": pt.astype(np.float32),
            "Eta": eta.astype(np.float32), "Phi": rng.uniform(-3.1, 3.1, size).astype(np.float32),
            "Mass": mass.astype(np.float32)}


def delphes_events(num_events: int, seed: int = 0) -> dict[str, list]:
    """Per-collection lists of per-event field dicts of selectable dileptonic events."""
    rng = np.random.default_rng(seed)
    events = {"Electron": [], "Muon": [], "Jet": [], "MissingET": [], "Particle": [],
              "Photon": []}
    for event in range(num_events):
        gen = _gen_event(rng, event)
        events["Particle"].append(gen)
        uids = gen["fUniqueID"]
        events["Electron"].append({"PT": [60.0], "Eta": [0.5], "Phi": [1.0], "Charge": [1],
                                   "Particle": [int(uids[E_PLUS_FINAL])]})
        events["Muon"].append({"PT": [40.0], "Eta": [-0.3], "Phi": [-2.0], "Charge": [-1],
                               "Particle": [int(uids[MU_MINUS_FINAL])]})
        # Jet 0 is tagged at working point bit 0, jet 1 at bit 1 only, jet 2 at none.
        events["Jet"].append({"PT": [90.0, 70.0, 50.0], "Eta": [0.1, -1.0, 1.5],
                              "Phi": [2.5, -0.5, 0.0], "Mass": [10.0, 8.0, 6.0],
                              "BTag": [0b01, 0b10, 0]})
        events["MissingET"].append({"MET": [55.0], "Phi": [0.7]})
        events["Photon"].append({"PT": [], "Eta": []})
    return events


_DTYPES = {"Charge": np.int32, "BTag": np.uint32, "Particle": np.uint32, "fUniqueID": np.uint32,
           "PID": np.int32, "Status": np.int32, "M1": np.int32, "M2": np.int32}


def write_delphes(path, events, *, drop=(), size_shift=None, process_ids=None):
    """Write ``events`` as a Delphes-shaped tree: jagged ``<C>.<field>`` and ``<C>_size``.

    ``drop`` leaves collections out; ``size_shift`` = (collection, event, delta) corrupts a size.
    """
    data = {}
    for collection, rows in events.items():
        if collection in drop:
            continue
        fields = {name: ak.Array([np.asarray(row[name], dtype=_DTYPES.get(name, np.float32))
                                  for row in rows]) for name in rows[0]}
        data[collection] = ak.zip(fields)
        sizes = np.array([len(row[next(iter(row))]) for row in rows], dtype=np.int32)
        if size_shift and size_shift[0] == collection:
            sizes[size_shift[1]] += size_shift[2]
        data[f"{collection}_size"] = sizes
    if process_ids is not None:
        data["Event"] = ak.zip({"ProcessID": ak.Array([[p] for p in process_ids])})
        data["Event_size"] = np.ones(len(process_ids), dtype=np.int32)
    with uproot.recreate(path) as file:
        # uproot's own counters are named n<collection>, so <collection>_size can be set freely.
        file.mktree("Delphes", {name: value.type if isinstance(value, ak.Array) else value.dtype
                                for name, value in data.items()},
                    counter_name=lambda counted: f"n{counted}",
                    field_name=lambda outer, inner: f"{outer}.{inner}")
        file["Delphes"].extend(data)
    return path


def _read_all(path, config):
    return list(read_chunks(path, config))


def test_reads_only_listed_branches(tmp_path, monkeypatch):
    path = write_delphes(tmp_path / "events.root", delphes_events(4))
    requested = []
    original = uproot.TTree.iterate

    def spy(self, expressions=None, *args, **kwargs):
        requested.append(list(expressions))
        return original(self, expressions, *args, **kwargs)

    monkeypatch.setattr(uproot.TTree, "iterate", spy)
    config = DelphesConfig(process_code=601)
    chunks = _read_all(path, config)
    assert requested == [required_branches(config)]
    assert set(chunks[0][1]) == set(required_branches(config))
    assert not any(name.startswith("Photon") for name in requested[0])


def test_sizes_match_object_counts(tmp_path):
    path = write_delphes(tmp_path / "events.root", delphes_events(3))
    (_, chunk), = _read_all(path, DelphesConfig(process_code=601))
    assert np.asarray(chunk["Jet_size"]).tolist() == [3, 3, 3]
    assert ak.num(chunk["Jet.PT"]).tolist() == [3, 3, 3]


def test_size_mismatch_names_branch(tmp_path):
    path = write_delphes(tmp_path / "events.root", delphes_events(3), size_shift=("Jet", 2, 1))
    with pytest.raises(DelphesFormatError, match=r"'Jet\.PT' has 3 objects in event 2"):
        _read_all(path, DelphesConfig(process_code=601))


@pytest.mark.parametrize("collection", ["Muon", "MissingET", "Particle"])
def test_missing_branch_named(tmp_path, collection):
    path = write_delphes(tmp_path / "events.root", delphes_events(2), drop=(collection,))
    with pytest.raises(DelphesFormatError, match=rf"branch '{collection}\.\w+' not found"):
        _read_all(path, DelphesConfig(process_code=601))


def test_missing_process_branch_named(tmp_path):
    path = write_delphes(tmp_path / "events.root", delphes_events(2))
    with pytest.raises(DelphesFormatError, match=r"branch 'Event\.ProcessID' not found"):
        _read_all(path, DelphesConfig())


def test_unique_ids_resolved_by_lookup():
    uids = ak.Array([[30, 10, 20], [], [7, 5]])
    refs = ak.Array([[20, 30], [], [5, 0]])
    position = resolve_unique_ids(uids, refs, "f.root", "Electron.Particle", 100)
    assert position.tolist() == [2, 0, 1, -1]


def test_unknown_unique_id_names_event():
    uids = ak.Array([[1, 2, 3], [4, 5]])
    refs = ak.Array([[3], [6]])
    with pytest.raises(DelphesFormatError, match="event 101 refers to unique id 6"):
        resolve_unique_ids(uids, refs, "f.root", "Muon.Particle", 100)


def test_repeated_unique_id_rejected():
    with pytest.raises(DelphesFormatError, match="event 0 repeats unique id 4"):
        resolve_unique_ids(ak.Array([[4, 4]]), ak.Array([[4]]), "f.root", "Muon.Particle", 0)


def test_lepton_links_in_file(tmp_path):
    events = delphes_events(3)
    path = write_delphes(tmp_path / "events.root", events)
    config = DelphesConfig(process_code=601)
    stats = delphes.ConversionStats()
    for first_entry, chunk in _read_all(path, config):
        convert_chunk(chunk, config, stats, path=str(path), file_index=0,
                      first_entry=first_entry)
    assert stats.leptons == 6
    assert stats.leptons_linked == 6
    assert stats.leptons_truth_matched == 6


def test_dangling_reference_names_event(tmp_path):
    events = delphes_events(3)
    events["Muon"][1]["Particle"] = [5]  # no particle of event 1 has id 5
    path = write_delphes(tmp_path / "events.root", events)
    config = DelphesConfig(process_code=601)
    (first_entry, chunk), = _read_all(path, config)
    with pytest.raises(DelphesFormatError, match="'Muon.Particle' of event 1 .* unique id 5"):
        convert_chunk(chunk, config, delphes.ConversionStats(), path=str(path), file_index=0,
                      first_entry=first_entry)


def test_tokens_of_converted_event(tmp_path):
    events = delphes_events(2)
    path = write_delphes(tmp_path / "events.root", events, process_ids=[601, 602])
    config = DelphesConfig()
    (first_entry, chunk), = _read_all(path, config)
    block = convert_chunk(chunk, config, delphes.ConversionStats(), path=str(path),
                          file_index=0, first_entry=first_entry)
    assert block.num_events == 2
    assert block.process_code.tolist() == [601, 602]
    tokens = slice(block.offsets[0], block.offsets[1])
    pdg, level = block.pdg_id[tokens], block.level[tokens]
    assert pdg[level == LEVEL_RECO].tolist() == [-11, 13, 5, 41, 41, 40]
    assert pdg[level == LEVEL_GEN].tolist() == [-11, 13, 12, -14, 5, -5]
    gen = events["Particle"][0]
    gen_pt = block.features[tokens][level == LEVEL_GEN, 0]
    assert gen_pt.tolist() == gen["PT"][[10, 12, 11, 13, 7, 9]].tolist()
    assert block.m_ttbar_true[0] == pytest.approx(_pair_mass(gen, 4, 5), rel=1e-5)


def test_btag_working_point_bit(tmp_path):
    path = write_delphes(tmp_path / "events.root", delphes_events(1))
    for bit, expected in ((0, [5, 41, 41]), (1, [41, 5, 41])):
        config = DelphesConfig(process_code=601, btag_bit=bit)
        (first_entry, chunk), = _read_all(path, config)
        block = convert_chunk(chunk, config, delphes.ConversionStats(), path=str(path),
                              file_index=0, first_entry=first_entry)
        reco_jets = np.isin(block.pdg_id, (5, 41)) & (block.level == LEVEL_RECO)
        assert block.pdg_id[reco_jets].tolist() == expected


def _pair_mass(gen, first, second):
    total = np.zeros(4)
    for index in (first, second):
        pt, eta, phi, mass = (float(gen[name][index]) for name in ("PT", "Eta", "Phi", "Mass"))
        p = np.array([pt * np.cos(phi), pt * np.sin(phi), pt * np.sinh(eta)])
        total += np.append(p, np.sqrt(p @ p + mass * mass))
    return np.sqrt(total[3] ** 2 - total[:3] @ total[:3])


def test_command_writes_shards_and_manifest(tmp_path):
    inputs = [write_delphes(tmp_path / f"events{i}.root", delphes_events(20, seed=i))
              for i in range(2)]
    out = tmp_path / "data"
    main(["--input", *map(str, inputs), "--out", str(out), "--sample", "eta_t",
          "--process-code", "1042", "--shard-events", "15", "--chunk-events", "8"])
    manifest = read_manifest(out)
    splits = {split: sum(s.events for s in manifest.shards_of(split))
              for split in ("train", "val", "test")}
    assert splits == {"train": 32, "val": 4, "test": 4}
    assert max(s.events for s in manifest.shards) <= 15
    blocks = read_shards(manifest, manifest.shards).blocks
    ids = np.concatenate([b.event_id for b in blocks])
    assert np.unique(ids).size == 40
    assert all((b.sample == 1).all() for b in blocks)
    eta_t = next(s for s in manifest.samples if s["name"] == "eta_t")
    assert eta_t["cut_flow"]["generated"] == 40
    assert eta_t["cut_flow"]["one_btag"] == 40
    with pytest.raises(FileExistsError, match="new folder"):
        main(["--input", str(inputs[0]), "--out", str(out), "--process-code", "601"])
