"""Selected events to tokens, in raw physics units, collected into ``EventBlock``s.

Tokens of one event, in this order (the order carries no meaning for the model, it only makes
the output reproducible):

| tokens | level | PDG id | features (pT, eta, phi, m, b-tag) |
|---|---|---|---|
| the two selected leptons, by decreasing pT | reco | signed lepton id | pT, eta, phi, m, 0 |
| jets passing the jet cuts, by decreasing pT, at most ``max_jets`` | reco | 5 tagged, 41 not | pT, eta, phi, m, b-tag |
| missing transverse momentum | reco | 40 | MET, 0, phi, 0, 0 |
| l+, l-, nu, nubar from the W decays | gen | signed id | pT, eta, phi, m (0 for neutrinos), 0 |
| b, bbar from the top decays | gen | 5, -5 | pT, eta, phi, m, 1 |

pT and m in GeV, phi in [-pi, pi) after the float32 cast. Event ids are unique across a data set:
``event_id = sample_id * 2^56 + shard_index * 2^32 + event_index``, where ``event_index`` counts
generated events within the shard (before the selection), so an id also says which generated
event a token set came from.
"""

from __future__ import annotations

import numpy as np

from bumblebee_dist.data.block import EventBlock
from bumblebee_dist.tokens import LEVEL_GEN, LEVEL_RECO, NUM_FEATURES, PDG_MET
from data_prep.generate import ParticleBatch
from data_prep.physics import phi_float32, to_pt_eta_phi_m
from data_prep.selection import Selected
from data_prep.truth import GenObjects

DEFAULT_MAX_JETS = 10
_SAMPLE_SHIFT = 56
_SHARD_SHIFT = 32
MAX_SAMPLE_ID = 127
MAX_SHARD_INDEX = (1 << (_SAMPLE_SHIFT - _SHARD_SHIFT)) - 1
MAX_EVENT_INDEX = (1 << _SHARD_SHIFT) - 1
_GEN_TOKENS = 6


def event_ids(sample_id: int, shard_index: int, event_index: np.ndarray) -> np.ndarray:
    """Return int64 event ids from the sample id, shard index and per-shard event indices."""
    event_index = np.asarray(event_index, dtype=np.int64)
    if not 0 <= sample_id <= MAX_SAMPLE_ID:
        raise ValueError(f"sample_id={sample_id} must lie in [0, {MAX_SAMPLE_ID}]")
    if not 0 <= shard_index <= MAX_SHARD_INDEX:
        raise ValueError(f"shard_index={shard_index} must lie in [0, {MAX_SHARD_INDEX}]")
    if event_index.size and (event_index.min() < 0 or event_index.max() > MAX_EVENT_INDEX):
        raise ValueError(f"event indices must lie in [0, {MAX_EVENT_INDEX}]")
    return (np.int64(sample_id) << _SAMPLE_SHIFT) + (np.int64(shard_index) << _SHARD_SHIFT) \
        + event_index


def _rank_within_event(event: np.ndarray) -> np.ndarray:
    """Return each row's position within its event, for rows sorted by event."""
    if event.size == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.searchsorted(event, event, side="left")
    return np.arange(event.size) - starts


def _gen_features(batch: ParticleBatch, gen: GenObjects,
                  events: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (pdg ids, float64 features) of the gen tokens of ``events``, (P*6,) and (P*6, F)."""
    index = gen.indices()[events].reshape(-1)
    kin = to_pt_eta_phi_m(batch.px[index], batch.py[index], batch.pz[index], batch.e[index])
    pdg = batch.pdg_id[index]
    neutrino = np.isin(np.abs(pdg), (12, 14))
    bottom = np.abs(pdg) == 5
    features = np.stack([kin.pt, kin.eta, kin.phi, np.where(neutrino, 0.0, batch.m[index]),
                         bottom.astype(np.float64)], axis=1)
    return pdg, features


def build_block(batch: ParticleBatch, gen: GenObjects, m_ttbar: np.ndarray, selected: Selected,
                reco_met: tuple[np.ndarray, np.ndarray], *, sample_id: int, shard_index: int,
                first_event_index: int, max_jets: int = DEFAULT_MAX_JETS) -> EventBlock:
    """Build the tokens of the events that passed the selection as one validated EventBlock.

    ``first_event_index`` is the shard-level index of the batch's first generated event.
    """
    events = np.flatnonzero(selected.passed)
    position = np.full(batch.num_events, -1, dtype=np.int64)
    position[events] = np.arange(events.size)
    met, met_phi = reco_met

    leptons = selected.leptons.take(selected.passed[selected.leptons.event])
    order = np.lexsort((-leptons.pt, leptons.event))
    leptons = leptons.take(order)
    jets = selected.jets.take(selected.passed[selected.jets.event])
    jets = jets.take(np.lexsort((-jets.pt, jets.event)))
    jets = jets.take(_rank_within_event(jets.event) < max_jets)
    gen_pdg, gen_features = _gen_features(batch, gen, events)

    zeros_l, zeros_e = np.zeros(leptons.event.size), np.zeros(events.size)
    groups = [
        (leptons.event, leptons.pdg_id, LEVEL_RECO,
         [leptons.pt, leptons.eta, leptons.phi, leptons.m, zeros_l]),
        (jets.event, jets.pdg_id, LEVEL_RECO, [jets.pt, jets.eta, jets.phi, jets.m, jets.btag]),
        (events, np.full(events.size, PDG_MET), LEVEL_RECO,
         [met[events], zeros_e, met_phi[events], zeros_e, zeros_e]),
        (np.repeat(events, _GEN_TOKENS), gen_pdg, LEVEL_GEN, list(gen_features.T)),
    ]
    token_event = np.concatenate([g[0] for g in groups])
    group_id = np.concatenate([np.full(g[0].size, i) for i, g in enumerate(groups)])
    # Within a group the rows are already in token order; a stable sort keeps that order.
    order = np.lexsort((group_id, position[token_event]))
    features = np.concatenate([np.stack(g[3], axis=1) for g in groups])[order]
    features_f32 = features.astype(np.float32)
    features_f32[:, 2] = phi_float32(features[:, 2])
    pdg_id = np.concatenate([g[1] for g in groups]).astype(np.int32)[order]
    level = np.concatenate([np.full(g[0].size, g[2]) for g in groups]).astype(np.int8)[order]

    lengths = np.bincount(position[token_event], minlength=events.size)
    offsets = np.zeros(events.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    block = EventBlock(
        event_id=event_ids(sample_id, shard_index, first_event_index + events),
        offsets=offsets,
        process_code=batch.process_code[events].astype(np.int32),
        sample=np.full(events.size, sample_id, dtype=np.int8),
        m_ttbar_true=m_ttbar[events].astype(np.float32),
        pdg_id=pdg_id,
        level=level,
        features=features_f32.reshape(-1, NUM_FEATURES),
    )
    block.validate(f"sample {sample_id} shard {shard_index} batch at event {first_event_index}")
    return block
