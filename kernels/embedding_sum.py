"""Token input embedding: projection of the particle vector plus three embedding lookups.

Shapes: T packed tokens, F particle features, D model width, P rows of the PDG-id table.

    out_TD = linear(where(mask, 0, features_TF)) + pdg_table[pdg_index]
             + level_table[level] + mask_table[mask]

The particle vector of a masked token is replaced by zeros before the projection. This uses
``torch.where`` rather than a product with a 0/1 mask, so no value of a masked token reaches the
output or the gradient of the projection, not even a NaN. Its PDG id and level stay visible.
This file holds the torch reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def check_embedding_sum_args(
    features: torch.Tensor,
    mask: torch.Tensor,
    pdg_index: torch.Tensor,
    level: torch.Tensor,
    proj_weight: torch.Tensor,
    pdg_table: torch.Tensor,
    level_table: torch.Tensor,
    mask_table: torch.Tensor,
) -> None:
    """Raise ValueError naming the argument whose shape or dtype does not fit the others."""
    if features.ndim != 2:
        raise ValueError(f"features must have shape (T, F), got {tuple(features.shape)}")
    num_tokens, num_features = features.shape
    width = proj_weight.shape[0]
    if proj_weight.shape != (width, num_features):
        raise ValueError(
            f"proj_weight must have shape (D, F) = (D, {num_features}), got "
            f"{tuple(proj_weight.shape)}"
        )
    if mask.dtype != torch.bool or mask.shape != (num_tokens,):
        raise ValueError(
            f"mask must be a ({num_tokens},) bool tensor (True = masked token), got shape "
            f"{tuple(mask.shape)} and {mask.dtype}"
        )
    for name, index in (("pdg_index", pdg_index), ("level", level)):
        if index.shape != (num_tokens,) or index.dtype.is_floating_point:
            raise ValueError(
                f"{name} must be a ({num_tokens},) integer tensor, got shape "
                f"{tuple(index.shape)} and {index.dtype}"
            )
    for name, table in (("pdg_table", pdg_table), ("level_table", level_table),
                        ("mask_table", mask_table)):
        if table.ndim != 2 or table.shape[1] != width:
            raise ValueError(f"{name} must have shape (rows, {width}), got {tuple(table.shape)}")


def embedding_sum_torch(
    features: torch.Tensor,
    mask: torch.Tensor,
    pdg_index: torch.Tensor,
    level: torch.Tensor,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor | None,
    pdg_table: torch.Tensor,
    level_table: torch.Tensor,
    mask_table: torch.Tensor,
) -> torch.Tensor:
    """Embed packed tokens, (T, D): see the module docstring for the formula.

    features: (T, F) model-space features; mask: (T,) bool, True where the token is masked;
    pdg_index: (T,) rows of ``pdg_table`` (P, D); level: (T,) 1 reco or 0 gen, rows of
    ``level_table`` (2, D); proj_weight (D, F) and proj_bias (D,) as in ``torch.nn.Linear``;
    mask_table: (2, D), row 1 for masked tokens.
    """
    check_embedding_sum_args(features, mask, pdg_index, level, proj_weight, pdg_table,
                             level_table, mask_table)
    visible_TF = torch.where(mask[:, None], torch.zeros_like(features), features)
    out_TD = F.linear(visible_TF, proj_weight, proj_bias)
    out_TD = out_TD + F.embedding(pdg_index.long(), pdg_table)
    out_TD = out_TD + F.embedding(level.long(), level_table)
    return out_TD + F.embedding(mask.long(), mask_table)
