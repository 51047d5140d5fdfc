"""The encoder, its token embedding and its output head; no DeepSpeed import."""

from bumblebee_dist.model.embedding import ParticleEmbedding
from bumblebee_dist.model.encoder import (
    BumblebeeEncoder,
    count_parameters,
    init_weights,
    parameter_count_formula,
)
from bumblebee_dist.model.heads import ParticleHead

__all__ = [
    "BumblebeeEncoder",
    "ParticleEmbedding",
    "ParticleHead",
    "count_parameters",
    "init_weights",
    "parameter_count_formula",
]
