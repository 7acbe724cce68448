"""What the model benchmarks share: a target of a known shape with random weights,
random prompts for it, and drafter arms over it.

A step's time depends on shapes, not on weight values, so the benchmarks run
on synthetic weights (and their results say so).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from flashspec_jax import sharding
from flashspec_jax.drafters import FeatureDrafter, ModelDrafter
from flashspec_jax.engine import Arm
from flashspec_jax.environment import on_gpu
from flashspec_jax.models.config import LlamaConfig, model_config
from flashspec_jax.models import eagle
from flashspec_jax.models.llama import Llama, init_params


def default_dtype() -> jnp.dtype:
  """bf16 on a GPU, as run.py runs there; f32 on a CPU, which has no fast bf16 GEMMs."""
  return jnp.dtype(jnp.bfloat16 if on_gpu() else jnp.float32)


@dataclasses.dataclass(frozen=True)
class SyntheticTarget:
  """A target model with random weights, and the params dict the engine takes.

  Attributes:
    model: the target.
    params: {"target": its params, "drafters": {name: a draft model's params}}.
  """

  model: Llama
  params: dict[str, Any]

  @classmethod
  def create(cls, shape: str, dtype: Any = None, mesh: Mesh | None = None) -> SyntheticTarget:
    """The shape named in configs/, in `dtype` (default_dtype() if None); with a
    tensor-parallel mesh, created in its shards (sharding.py)."""
    dtype = jnp.dtype(dtype or default_dtype())
    config = sharding.sharded_config(model_config(shape), sharding.degree(mesh))
    return cls(Llama(config, param_dtype=dtype),
               {"target": init_params(config, jax.random.key(0), dtype, mesh), "drafters": {}})

  @property
  def config(self) -> LlamaConfig:
    return self.model.config

  @property
  def mesh(self) -> Mesh | None:
    """The tensor-parallel mesh the target is split over; drafters are replicated on it."""
    return sharding.mesh_of(self.params["target"])

  def prompts(self, batch: int, context: int) -> tuple[jax.Array, jax.Array]:
    """([B, context] random tokens, [B] lengths): every row a full `context` tokens."""
    tokens = jax.random.randint(jax.random.key(1), (batch, context), 0, self.config.vocab_size)
    return tokens, jnp.full((batch,), context, jnp.int32)

  def layer_skip_arm(self, depth: int, gamma: int, unroll: bool) -> Arm:
    """The target's first `depth` layers drafting `gamma` tokens."""
    return Arm(ModelDrafter(Llama(self.config, num_layers=depth,
                                  param_dtype=self.model.param_dtype), unroll=unroll), gamma)

  def draft_model_arm(self, shape: str, gamma: int) -> Arm:
    """A separate draft model of `shape` with random weights, its params added here."""
    config = model_config(shape)
    self.params["drafters"][shape] = sharding.replicated(
        init_params(config, jax.random.key(1), self.model.param_dtype), self.mesh)
    return Arm(ModelDrafter(Llama(config, param_dtype=self.model.param_dtype), shape), gamma)

  def feature_drafter_arm(self, gamma: int, unroll: bool = True, vocabulary: int = 0) -> Arm:
    """An untrained feature drafter (eagle) as wide as the target, its params added here;
    vocabulary > 0 restricts it to that many random tokens (which ones does not change
    its time)."""
    drafter = eagle.init_params(self.config, jax.random.key(2), self.model.param_dtype)
    if vocabulary:
      ids = jax.random.permutation(jax.random.key(3), self.config.vocab_size)[:vocabulary]
      drafter = eagle.restrict_vocabulary(drafter, self.params["target"], ids)
    self.params["drafters"]["eagle"] = sharding.replicated(drafter, self.mesh)
    return Arm(FeatureDrafter(self.model, "eagle", unroll=unroll), gamma)
