"""BERT-style encoder over packed, unpadded events.

Shapes: E events, T packed tokens, F particle features, D model width, N heads, H head dim
(D = N * H), I feed-forward inner width.

Differences from BERT:

- pre-LN blocks, ``x + attn(LN(x))`` then ``x + ffn(LN(x))``, with one LayerNorm after the last
  block. BERT puts the LayerNorm after the residual sum (post-LN). That needs a careful learning
  rate warmup, because its gradients near the output are large at initialization. Pre-LN keeps
  the residual stream an identity path and trains stably with a short warmup and bf16, so this
  encoder uses pre-LN;
- no positional encoding: an event is a set, and permuting its particles permutes the output;
- attention runs on packed events through ``kernels.dispatch.unpadded_attention``, so no token
  attends to a token of another event and no padding is computed.

The model is a plain ``nn.Module``; it imports nothing of DeepSpeed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bumblebee_dist.config import ModelConfig
from bumblebee_dist.model.embedding import ParticleEmbedding
from bumblebee_dist.model.heads import ParticleHead
from bumblebee_dist.tokens import PDG_VOCABULARY_SIZE
from kernels import dispatch
from kernels.attention import validate_cu_seqlens

INIT_STD = 0.02  # BERT's initializer range
_RESIDUAL_PROJECTIONS = ("attn.out", "ffn.down")


class SelfAttention(nn.Module):
    """Multi-head self-attention within each packed event."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.hidden_size // config.num_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.out = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x_TD: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int):
        """Return (T, D); cu_seqlens must already be validated."""
        num_tokens = x_TD.shape[0]
        qkv_T3NH = self.qkv(x_TD).view(num_tokens, 3, self.num_heads, self.head_dim)
        q_TNH, k_TNH, v_TNH = qkv_T3NH.unbind(dim=1)
        out_TNH = dispatch.unpadded_attention(
            q_TNH, k_TNH, v_TNH, cu_seqlens, max_seqlen, validate=False
        )
        return self.out(out_TNH.reshape(num_tokens, self.num_heads * self.head_dim))


class FeedForward(nn.Module):
    """Position-wise feed-forward: D -> I, exact (erf) GELU, I -> D."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.up = nn.Linear(config.hidden_size, config.ffn_size)
        self.down = nn.Linear(config.ffn_size, config.hidden_size)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        """Return (T, D)."""
        return self.down(F.gelu(self.up(x_TD)))


class EncoderBlock(nn.Module):
    """One pre-LN transformer block: attention and feed-forward, each on a residual branch."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = SelfAttention(config)
        self.ffn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.ffn = FeedForward(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x_TD: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int):
        """Return (T, D)."""
        x_TD = x_TD + self.dropout(self.attn(self.attn_norm(x_TD), cu_seqlens, max_seqlen))
        return x_TD + self.dropout(self.ffn(self.ffn_norm(x_TD)))


class BumblebeeEncoder(nn.Module):
    """Masked-particle encoder: packed tokens in, one predicted particle vector per token out.

    ``init_seed`` initializes the weights with ``init_weights``; pass None to keep PyTorch's
    default initialization, for example when parameters are created partitioned and are
    initialized later.
    """

    def __init__(self, config: ModelConfig, init_seed: int | None = 0):
        super().__init__()
        config.validate()
        self.config = config
        self.embedding = ParticleEmbedding(config)
        self.blocks = nn.ModuleList(EncoderBlock(config) for _ in range(config.num_layers))
        self.final_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.head = ParticleHead(config)
        if init_seed is not None:
            init_weights(self, init_seed)

    def forward(
        self,
        features: torch.Tensor,
        pdg_index: torch.Tensor,
        level: torch.Tensor,
        mask: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
    ) -> torch.Tensor:
        """Predict (T, F) model-space features for every token.

        - features: (T, F) float model-space features, ignored in masked rows;
        - pdg_index: (T,) int64 rows of the PDG table;
        - level: (T,) int64, 1 reco and 0 gen;
        - mask: (T,) bool, True where a token is masked;
        - cu_seqlens: (E + 1,) int32 offsets starting at 0 and ending at T (int64 is converted);
        - max_seqlen: a Python int, at least the longest event.

        cu_seqlens is checked once here, which reads it on the host.
        """
        self._check_inputs(features, pdg_index, level, mask)
        cu_seqlens = validate_cu_seqlens(cu_seqlens, features.shape[0], max_seqlen=max_seqlen)
        x_TD = self.embedding(features, pdg_index, level, mask)
        for block in self.blocks:
            x_TD = block(x_TD, cu_seqlens, int(max_seqlen))
        return self.head(self.final_norm(x_TD))

    def _check_inputs(self, features, pdg_index, level, mask) -> None:
        expected = (features.shape[0], self.config.num_features)
        if features.ndim != 2 or tuple(features.shape) != expected:
            raise ValueError(
                f"features must have shape (T, F) with F = model.num_features = "
                f"{self.config.num_features}, got {tuple(features.shape)}"
            )
        for name, tensor in (("pdg_index", pdg_index), ("level", level), ("mask", mask)):
            if tuple(tensor.shape) != expected[:1]:
                raise ValueError(
                    f"{name} must have shape (T,) = ({expected[0]},), got {tuple(tensor.shape)}"
                )


@torch.no_grad()
def init_weights(model: BumblebeeEncoder, seed: int) -> None:
    """Initialize every parameter from ``seed``, identically on any device.

    Linear and embedding weights are drawn from N(0, 0.02^2) as in BERT; the two projections
    that end a residual branch use std 0.02 / sqrt(2 * num_layers), as in GPT-2, so the residual
    stream does not grow with depth. Biases are 0, LayerNorm weights 1. Values are drawn on the
    CPU from one generator in module order and then copied to the parameter's device.
    """
    generator = torch.Generator().manual_seed(seed)
    residual_std = INIT_STD / math.sqrt(2 * model.config.num_layers)
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            std = residual_std if name.endswith(_RESIDUAL_PROJECTIONS) else INIT_STD
            _fill_normal(module.weight, std, generator)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()


def _fill_normal(parameter: torch.Tensor, std: float, generator: torch.Generator) -> None:
    values = torch.randn(parameter.shape, generator=generator, dtype=torch.float32) * std
    parameter.copy_(values)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Return the number of parameter elements of ``model`` (shared tensors counted once)."""
    parameters = model.parameters()
    if trainable_only:
        parameters = (p for p in parameters if p.requires_grad)
    return sum(p.numel() for p in parameters)


def parameter_count_formula(config: ModelConfig) -> int:
    """Return the parameter count of ``BumblebeeEncoder(config)`` computed from the config alone."""
    width, inner, features = config.hidden_size, config.ffn_size, config.num_features
    attention = 3 * width * width + 3 * width + width * width + width
    feed_forward = width * inner + inner + inner * width + width
    block = attention + feed_forward + 2 * 2 * width
    embedding = features * width + width + (PDG_VOCABULARY_SIZE + 2 + 2) * width
    head = width * features + features
    return config.num_layers * block + embedding + 2 * width + head
