"""Baseline classifier: an MLP on a fixed-length vector of reco features.

The vector holds, per event: the two leptons (sorted by pT), the ``num_jets`` leading jets
(zero-padded, with a presence flag) and the missing transverse momentum. Each object contributes
its model-space features with phi replaced by (cos phi, sin phi), plus the lepton charge and
flavour. The same events feed the MLP and the transformer, so the AUROC comparison compares
models, not data.
"""

from __future__ import annotations

import numpy as np
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from bumblebee_dist.tokens import ETA, LEVEL_RECO, MASS, PDG_B, PDG_JET, PDG_MET, PHI, PT

NUM_LEPTONS = 2


def _object_columns(features: np.ndarray) -> np.ndarray:
    phi = features[:, PHI]
    return np.stack([features[:, PT], features[:, ETA], np.cos(phi), np.sin(phi),
                     features[:, MASS]], axis=1)


def _slot_in_event(selected: np.ndarray, event_of_token: np.ndarray) -> np.ndarray:
    """Rank of each selected token among the selected tokens of its event, in token order."""
    index = np.flatnonzero(selected)
    events = event_of_token[index]
    first = np.searchsorted(events, events, side="left")
    return np.arange(index.size) - first


def reco_feature_matrix(features: np.ndarray, pdg_id: np.ndarray, level: np.ndarray,
                        offsets: np.ndarray, *, num_jets: int = 6) -> np.ndarray:
    """Build the (E, K) MLP input from packed tokens in model space.

    Jets are taken in stored order, which is descending pT; leptons are sorted by pT here.
    """
    num_events = offsets.size - 1
    event_of_token = np.repeat(np.arange(num_events), np.diff(offsets))
    reco = level == LEVEL_RECO
    leptons = reco & np.isin(pdg_id, (11, -11, 13, -13))
    jets = reco & np.isin(pdg_id, (PDG_B, PDG_JET))
    met = reco & (pdg_id == PDG_MET)

    lepton_block = np.zeros((num_events, NUM_LEPTONS, 7))
    index = np.flatnonzero(leptons)
    slot = _slot_in_event(leptons, event_of_token)
    keep = slot < NUM_LEPTONS
    index, slot = index[keep], slot[keep]
    charge = -np.sign(pdg_id[index])  # PDG: 11 is e-, so a positive id means negative charge
    flavour = (np.abs(pdg_id[index]) == 13).astype(np.float64)
    lepton_block[event_of_token[index], slot] = np.column_stack(
        [_object_columns(features[index]), charge, flavour])
    order = np.argsort(-lepton_block[:, :, 0], axis=1)
    lepton_block = np.take_along_axis(lepton_block, order[:, :, None], axis=1)

    jet_block = np.zeros((num_events, num_jets, 7))
    index = np.flatnonzero(jets)
    slot = _slot_in_event(jets, event_of_token)
    keep = slot < num_jets
    index, slot = index[keep], slot[keep]
    btag = (pdg_id[index] == PDG_B).astype(np.float64)
    jet_block[event_of_token[index], slot] = np.column_stack(
        [_object_columns(features[index]), btag, np.ones(index.size)])

    met_block = np.zeros((num_events, 3))
    index = np.flatnonzero(met)
    met_block[event_of_token[index]] = np.column_stack(
        [features[index, PT], np.cos(features[index, PHI]), np.sin(features[index, PHI])])
    jet_count = np.bincount(event_of_token[jets], minlength=num_events)[:, None]
    return np.concatenate([lepton_block.reshape(num_events, -1), jet_block.reshape(num_events, -1),
                           met_block, jet_count], axis=1)


def train_mlp_classifier(inputs: np.ndarray, labels: np.ndarray, *, seed: int = 0,
                         hidden: tuple[int, ...] = (128, 128), max_iter: int = 200):
    """Fit a standardized MLP classifier with early stopping on a 10 % validation part."""
    model = make_pipeline(
        StandardScaler(),
        MLPClassifier(hidden_layer_sizes=hidden, early_stopping=True, validation_fraction=0.1,
                      max_iter=max_iter, random_state=seed),
    )
    model.fit(inputs, labels)
    return model
