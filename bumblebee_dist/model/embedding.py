"""Token input embedding of the encoder.

Shapes: T packed tokens, F particle features, D model width, P = ``PDG_VOCABULARY_SIZE``.

A token's embedding is linear(particle vector) + PDG-id embedding + level embedding + mask
embedding. The particle vector of a masked token is zeroed before the projection, so its values
never reach the model. Its PDG id and level stay visible, because they say what to predict.
The sum runs through ``kernels.dispatch.embedding_sum``.
"""

from __future__ import annotations

import torch
from torch import nn

from bumblebee_dist.config import ModelConfig
from bumblebee_dist.tokens import PDG_VOCABULARY_SIZE
from kernels import dispatch


class ParticleEmbedding(nn.Module):
    """Embed packed tokens: (T, F) features plus PDG row, level and mask status -> (T, D)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        width = config.hidden_size
        self.proj = nn.Linear(config.num_features, width)
        self.pdg = nn.Embedding(PDG_VOCABULARY_SIZE, width)
        self.level = nn.Embedding(2, width)  # row 1 reco, row 0 gen
        self.mask = nn.Embedding(2, width)  # row 1 masked, row 0 visible

    def forward(
        self,
        features_TF: torch.Tensor,
        pdg_index_T: torch.Tensor,
        level_T: torch.Tensor,
        mask_T: torch.Tensor,
    ) -> torch.Tensor:
        """Return the (T, D) input embedding; ``mask_T`` is bool, True where a token is masked."""
        return dispatch.embedding_sum(
            features_TF, mask_T, pdg_index_T, level_T, self.proj.weight, self.proj.bias,
            self.pdg.weight, self.level.weight, self.mask.weight,
        )
