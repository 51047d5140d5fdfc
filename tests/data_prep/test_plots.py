"""Validation plots from a tiny data set written in the test."""

from __future__ import annotations

import numpy as np
import pytest

from bumblebee_dist.data.block import EventBlock
from data_prep.plots import PLOTS, gen_lepton_dphi, jet_multiplicity, load_samples, main
from data_prep.shards import (
    MANIFEST_FORMAT_VERSION,
    MANIFEST_NAME,
    FeatureMoments,
    shard_relpath,
    write_json_atomic,
    write_shard,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Tokens of one event: reco e-, mu+, b-tagged jet, two untagged jets, MET, then gen
# l+, l-, nu, nubar, b, bbar.
EVENT_PDG = (11, -13, 5, 41, 41, 40, -11, 13, 12, -14, 5, -5)
EVENT_LEVEL = (1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0)


def tiny_block(sample_id: int, num_events: int, seed: int) -> EventBlock:
    """Events of ``EVENT_PDG`` tokens with random kinematics."""
    rng = np.random.default_rng(seed)
    per_event = len(EVENT_PDG)
    total = num_events * per_event
    pdg = np.tile(np.array(EVENT_PDG, dtype=np.int32), num_events)
    features = np.zeros((total, 5), dtype=np.float32)
    features[:, 0] = rng.uniform(20.0, 200.0, total)
    features[:, 1] = rng.uniform(-2.4, 2.4, total)
    features[:, 2] = rng.uniform(-3.1, 3.1, total)
    features[:, 3] = np.where(np.isin(np.abs(pdg), (5, 41)), 10.0, 0.0)
    features[pdg == 40, 1] = 0.0
    features[:, 4] = (np.abs(pdg) == 5).astype(np.float32)
    return EventBlock(
        event_id=np.arange(num_events, dtype=np.int64) + (sample_id << 40),
        offsets=np.arange(num_events + 1, dtype=np.int64) * per_event,
        process_code=np.full(num_events, 601, dtype=np.int32),
        sample=np.full(num_events, sample_id, dtype=np.int8),
        m_ttbar_true=rng.uniform(340.0, 700.0, num_events).astype(np.float32),
        pdg_id=pdg,
        level=np.tile(np.array(EVENT_LEVEL, dtype=np.int8), num_events),
        features=features,
    )


@pytest.fixture
def tiny_dataset(tmp_path):
    """A data set of two samples, one train shard each, with a valid manifest."""
    root = tmp_path / "data"
    shards = []
    moments = FeatureMoments()
    for sample_id, name in enumerate(("ttbar", "eta_t")):
        path = shard_relpath("train", name, 0)
        info = write_shard(root / path, [tiny_block(sample_id, 30, sample_id)])
        moments.merge(info.stats)
        shards.append({"path": path, "split": "train", "sample": name, "events": info.events,
                       "tokens": info.tokens, "sha256": info.sha256})
    manifest = {
        "format_version": MANIFEST_FORMAT_VERSION,
        "samples": [{"name": "ttbar", "id": 0}, {"name": "eta_t", "id": 1}],
        "shards": shards,
        "feature_stats": moments.to_feature_stats(),
    }
    write_json_atomic(root / MANIFEST_NAME, manifest)
    return root


def test_plots_written_as_png(tiny_dataset, tmp_path):
    out = tmp_path / "plots"
    paths = main(["--data", str(tiny_dataset), "--out", str(out)])
    assert sorted(p.name for p in paths) == sorted(f"{spec.name}.png" for spec in PLOTS)
    for path in paths:
        assert path.is_file()
        content = path.read_bytes()
        assert content.startswith(PNG_SIGNATURE), path.name
        assert len(content) > 1000, path.name


def test_samples_loaded_by_name(tiny_dataset):
    samples = load_samples(tiny_dataset)
    assert sorted(samples) == ["eta_t", "ttbar"]
    assert samples["ttbar"].num_events == 30
    assert (samples["eta_t"].sample == 1).all()


def test_event_quantities(tiny_dataset):
    block = load_samples(tiny_dataset)["ttbar"]
    assert jet_multiplicity(block).tolist() == [3] * 30
    dphi = gen_lepton_dphi(block)
    assert dphi.shape == (30,)
    assert dphi.min() >= 0.0
    assert dphi.max() <= np.pi


def test_plots_logged_to_mlflow(tiny_dataset, tmp_path):
    mlflow = pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    main(["--data", str(tiny_dataset), "--out", str(tmp_path / "plots"), "--tracking-uri", uri,
          "--experiment", "plots-test"])
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("plots-test")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    logged = client.list_artifacts(runs[0].info.run_id, "validation_plots")
    assert sorted(item.path.split("/")[-1] for item in logged) == sorted(
        f"{spec.name}.png" for spec in PLOTS)
