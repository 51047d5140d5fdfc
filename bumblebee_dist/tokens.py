"""Token vocabulary shared by data preparation, training and evaluation.

A token is one particle: a signed PDG id, a level (reco = 1, gen = 0) and a particle vector of
``NUM_FEATURES`` values (pT, eta, phi, m, b-tag). Physics objects without a particle PDG id use the
conventional ids below: 5 for a b-tagged reco jet, 41 for an untagged reco jet, 40 for the missing
transverse momentum. The class token of fine-tuning uses the reserved id ``CLASS_TOKEN_PDG`` = 100,
which no particle or object of an event uses.
"""

from __future__ import annotations

import numpy as np

FEATURE_NAMES = ("pt", "eta", "phi", "m", "btag")
NUM_FEATURES = len(FEATURE_NAMES)
PT, ETA, PHI, MASS, BTAG = range(NUM_FEATURES)

LEVEL_GEN = 0
LEVEL_RECO = 1

PDG_B = 5
PDG_MET = 40
PDG_JET = 41
CLASS_TOKEN_PDG = 100
PDG_LEPTONS = (11, -11, 13, -13)
PDG_NEUTRINOS = (12, -12, 14, -14)

# Every PDG id a token may carry, in the order of the embedding table rows.
PDG_VOCABULARY = (-14, -13, -12, -11, -5, 5, 11, 12, 13, 14, PDG_MET, PDG_JET, CLASS_TOKEN_PDG)
PDG_VOCABULARY_SIZE = len(PDG_VOCABULARY)

# Lookup table from PDG id + offset to its row; -1 marks ids outside the vocabulary.
_PDG_OFFSET = 14
_PDG_TO_INDEX = np.full(CLASS_TOKEN_PDG + _PDG_OFFSET + 1, -1, dtype=np.int64)
for _row, _pdg in enumerate(PDG_VOCABULARY):
    _PDG_TO_INDEX[_pdg + _PDG_OFFSET] = _row


def pdg_to_index(pdg_id: np.ndarray) -> np.ndarray:
    """Map signed PDG ids to embedding rows; raise ValueError naming the first unknown id."""
    pdg_id = np.asarray(pdg_id, dtype=np.int64)
    shifted = pdg_id + _PDG_OFFSET
    inside = (shifted >= 0) & (shifted < _PDG_TO_INDEX.size)
    index = np.full(pdg_id.shape, -1, dtype=np.int64)
    index[inside] = _PDG_TO_INDEX[shifted[inside]]
    unknown = index < 0
    if unknown.any():
        raise ValueError(
            f"PDG id {int(pdg_id[unknown][0])} is not in the token vocabulary "
            f"{PDG_VOCABULARY}; {int(unknown.sum())} tokens have unknown ids"
        )
    return index
