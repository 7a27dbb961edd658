"""Streaming generation: causal block sampling with caches, clip by clip."""

from .causal_dit import CausalDiT
from .sampler import CausalSampler, GenerationCancelled, Progress, SamplerSettings

__all__ = ["CausalDiT", "CausalSampler", "GenerationCancelled", "Progress", "SamplerSettings"]
