"""Fused ops of the encoder and the pre-training loss: torch references, Triton kernels, and the
dispatcher (``kernels.dispatch``) that picks one per call."""

from kernels.dispatch import embedding_sum, masked_mse, unpadded_attention

__all__ = ["embedding_sum", "masked_mse", "unpadded_attention"]
