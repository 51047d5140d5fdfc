"""Output head: each token's final hidden state back to a particle vector.

Shapes: T packed tokens, D model width, F particle features.

The same head serves pre-training (the masked particles' model-space features) and fine-tuning,
where the first component of the class token's predicted vector is the classifier score.
"""

from __future__ import annotations

import torch
from torch import nn

from bumblebee_dist.config import ModelConfig


class ParticleHead(nn.Module):
    """Linear map from the (T, D) final hidden states to (T, F) model-space features."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.proj = nn.Linear(config.hidden_size, config.num_features)

    def forward(self, hidden_TD: torch.Tensor) -> torch.Tensor:
        """Return (T, F) predictions."""
        return self.proj(hidden_TD)
