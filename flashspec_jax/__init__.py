"""FlashSpec-JAX: exact, adaptive speculative decoding in JAX, Flax and Pallas.

The Python API mirrors the original FlashSpec's:

  from flashspec_jax import FlashSpec, FlashSpecConfig, BanditConfig, SamplingConfig
  from flashspec_jax import PALLAS_GPU_AVAILABLE   # the verify kernel can run here

Experiments run through `python run.py --config=experiments/<name>.py`.
"""

from flashspec_jax.api import (BanditConfig, FlashSpec, FlashSpecConfig, GenerationResult,
                               SamplingConfig)
from flashspec_jax.kernels.verify import PALLAS_GPU_AVAILABLE

__all__ = ["PALLAS_GPU_AVAILABLE", "BanditConfig", "FlashSpec", "FlashSpecConfig",
           "GenerationResult", "SamplingConfig"]
