"""A feature drafter (EAGLE, Li et al. 2024; EAGLE-3, Li et al. 2025): one Llama
block over the target's own hidden states.

Slot j of the drafter reads a pair (f_j, t_{j+1}): the target's feature after
token j and the embedding of the token that followed. The feature is the
target's final-normed hidden state, the vector its head reads (EAGLE), or the
residual streams after a few of its layers, low, middle and high, each normed and
projected together to one model width (EAGLE-3's fused features: what the
target knows before its head has narrowed it to the next token). The block's
output h_j predicts t_{j+2} through the target's frozen head. Drafting further,
the drafter reads its own output where the target's feature is not known yet:
(h_j, d_{j+2}) at slot j + 1, and so on. Its own weights are two input norms, a
projection fusing the pair, one block and a final norm, and for fused features
a norm per target layer and the projection `combine`; the embedding and head
are the target's.

A drafter may draft from a subset of the vocabulary (EAGLE-3's draft
vocabulary): its head is then those rows of the target's. Its q is zero off
the subset, which the accept test allows, so the output stays exact; at a
Llama-3-8B width the full head is two thirds of the drafter's bytes.

Training runs every position and draft step at once (`rollout_visibility`):
draft step k at slot j continues a chain that started from the target's
feature at slot j - k, so it attends to the target-feature slots up to j - k
and to its own chain's slots, exactly what it sees when drafting (EAGLE-3's
"training-time test").

Axis letters used in this module:
  B batch, T tokens, S cache slots, D model width, E two model widths, F the fused
  features' widths (one model width per target layer), V vocab.

Params of a drafter: {"params": the network's} and, for a drafter restricted
to a subset of the vocabulary, "vocabulary": {"ids": [V'] int32 sorted token
ids, "head": [V', D] those rows of the target's head} (`restrict_vocabulary`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from flashspec_jax.models.config import LlamaConfig
from flashspec_jax.models.llama import Block, LayerCache, RMSNorm, rope_inverse_frequencies


def valid_feature_layers(layers, num_layers: int) -> bool:
  """Whether layers name what a drafter may read of a target of num_layers layers (Llama's
  feature_layers): distinct integers in [0, num_layers]."""
  return (all(type(i) is int and 0 <= i <= num_layers for i in layers)
          and len(set(layers)) == len(layers))


def feature_width(config: LlamaConfig, num_feature_layers: int) -> int:
  """The width of the target's features for a drafter fusing that many layers (0: the
  final-normed state alone)."""
  return max(num_feature_layers, 1) * config.hidden_size


class FeatureDrafterNet(nn.Module):
  """The drafter's network, as wide as its target (`config` is the target's)."""

  config: LlamaConfig
  param_dtype: jnp.dtype = jnp.bfloat16
  # 0: the target's feature is its final-normed hidden state; k: the residual streams
  # after k of its layers, fused.
  num_feature_layers: int = 0

  @nn.compact
  def __call__(
      self,
      features: jax.Array,  # [B, T, D], or from a target of fused features [B, T, F]
      token_embeds: jax.Array,  # [B, T, D] embeddings of the tokens that followed
      layer_cache: LayerCache,
      starts: jax.Array,  # [B] int32, the slot of the first pair
      positions: jax.Array,  # [B, T] int32, rotary positions
      visible: jax.Array | None = None,  # [B or 1, T, S] bool; None is causal
      from_target: bool = False,
  ) -> tuple[jax.Array, jax.Array, LayerCache]:
    """Returns the block's output [B, T, D] (the next slot's feature), the same after
    the final norm (what the target's head reads) and the updated cache.

    from_target: features are the target's, as Llama returns them for this drafter's
    feature layers; otherwise they are the drafter's own outputs, one model width.
    """
    c = self.config
    eps = c.rms_norm_eps
    if from_target and self.num_feature_layers:
      if features.shape[-1] != feature_width(c, self.num_feature_layers):
        raise ValueError(f"features of width {features.shape[-1]} for a drafter fusing "
                         f"{self.num_feature_layers} target layers of width {c.hidden_size}")
      # Each layer's stream is normed apart: deeper layers' are far larger.
      layers = jnp.split(features, self.num_feature_layers, axis=-1)
      fused = jnp.concatenate([RMSNorm(eps, self.param_dtype, name=f"layer_norm_{i}")(layer)
                               for i, layer in enumerate(layers)], axis=-1)
      combine = self.param("combine", nn.initializers.normal(0.02),
                           (self.num_feature_layers * c.hidden_size, c.hidden_size),
                           self.param_dtype)
      features = jnp.einsum("BTF,FD->BTD", fused.astype(self.param_dtype), combine)
    fuse = self.param("fuse", nn.initializers.normal(0.02), (2 * c.hidden_size, c.hidden_size),
                      self.param_dtype)
    pair = jnp.concatenate([RMSNorm(eps, self.param_dtype, name="feature_norm")(features),
                            RMSNorm(eps, self.param_dtype, name="token_norm")(token_embeds)],
                           axis=-1)
    x = jnp.einsum("BTE,ED->BTD", pair.astype(self.param_dtype), fuse)
    # The drafter's own weights are replicated in the checkpoint's layout, whatever the
    # target's tensor-parallel layout (sharding.py).
    hidden, layer_cache = Block(dataclasses.replace(c, tp_shards=1), self.param_dtype,
                                name="block")(
        x, positions, layer_cache, starts, rope_inverse_frequencies(c), visible)
    return hidden, RMSNorm(eps, self.param_dtype, name="final_norm")(hidden), layer_cache


def rollout_visibility(width: int, steps: int, step: int) -> jax.Array:
  """[1, T, steps * T] which slots draft step `step` at position j attends to.

  The cache holds step s's keys at slots s * T + i. Step `step` at j sees the
  target-feature slots i <= j - step and, of each later step s <= step, the
  one slot of its own chain, i = j - step + s.
  """
  j = jnp.arange(width)[:, None, None]
  s = jnp.arange(steps)[None, :, None]
  i = jnp.arange(width)[None, None, :]
  chain = (s >= 1) & (s <= step) & (i == j - step + s)
  visible = ((s == 0) & (i <= j - step)) | chain  # [T, steps, T]
  return visible.reshape(1, width, steps * width)


def init_params(config: LlamaConfig, rng: jax.Array, param_dtype=jnp.bfloat16,
                num_feature_layers: int = 0) -> dict:
  """Random (untrained) drafter parameters for a target of this config, reading its
  final-normed features or the streams of `num_feature_layers` of its layers."""
  net = FeatureDrafterNet(config, param_dtype, num_feature_layers)
  shape = (1, config.num_kv_heads, 1, config.head_dim)
  cache = LayerCache(k=jnp.zeros(shape, param_dtype), v=jnp.zeros(shape, param_dtype))
  x = jnp.zeros((1, 1, config.hidden_size), param_dtype)
  features = jnp.zeros((1, 1, feature_width(config, num_feature_layers)), param_dtype)
  zeros = jnp.zeros((1,), jnp.int32)
  return jax.jit(functools.partial(net.init, from_target=True))(
      rng, features, x, cache, zeros, zeros[:, None])


def restrict_vocabulary(drafter_params: dict, target_params: dict, ids) -> dict:
  """The drafter's params, drafting only the tokens `ids` ([V'] distinct ids): its head
  is those rows of the target's, taken once here rather than at every draft step."""
  target = target_params["params"]
  unembedding = target.get("unembedding", target["embedding"])
  ids = np.sort(np.asarray(ids, np.int32))
  if not ids.size or np.any(np.diff(ids) == 0) or ids[0] < 0 or ids[-1] >= len(unembedding):
    raise ValueError(f"a draft vocabulary needs distinct token ids in [0, {len(unembedding)}), "
                     f"got {ids.size} ids from {ids[:1]} to {ids[-1:]}")
  ids = jnp.asarray(ids)
  return {"params": drafter_params["params"],
          "vocabulary": {"ids": ids, "head": jnp.take(unembedding, ids, axis=0)}}
