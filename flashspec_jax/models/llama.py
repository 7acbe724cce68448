"""Llama-architecture decoder in Flax linen, with an explicit KV cache.

One call processes T new tokens per row, starting at that row's cache length,
so the same function serves prefill (T = prompt length), decode (T = 1), the
speculative verify pass (T = gamma + 1) and chunked cache catch-up.

Layers are unrolled in Python rather than looped: in a loop over weights
stacked on a layer axis, XLA copies each layer's weight slice out of the stack
before its matrix product, which made every decode step slower on an H200
(branch `experiment/layer-loop`; docs/architecture.md, "Compile time"). The
Q/K/V and gate/up projections are stored fused, which halves the number of
small GEMVs per layer at batch 1.

Axis letters used in this module:
  B batch, T new tokens, S cache slots, D model width, F MLP width,
  N query heads, K kv heads, G query heads per kv head, H head dim, V vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import struct

from flashspec_jax import sharding
from flashspec_jax.models.config import LlamaConfig


@struct.dataclass(kw_only=True)
class LayerCache:
  """Keys and values of one layer.

  Heads come before slots so that the attention dots batch over leading axes
  (B, K) and XLA needs no transposed copy of the cache at each step.

  Attributes:
    k: [B, K, S, H]
    v: [B, K, S, H]
  """

  k: jax.Array
  v: jax.Array


@struct.dataclass(kw_only=True)
class KVCache:
  """Per-layer keys and values plus how many slots each row holds.

  Rolling back rejected draft tokens is a change of `lengths` alone: slots at or
  beyond a row's length are masked out and overwritten by the next write.

  Attributes:
    layers: one LayerCache per layer.
    lengths: [B] int32, valid slots per row.
  """

  layers: tuple[LayerCache, ...]
  lengths: jax.Array

  @classmethod
  def init(cls, config: LlamaConfig, batch: int, capacity: int, dtype=jnp.bfloat16,
           num_layers: int | None = None) -> KVCache:
    shape = (batch, config.num_kv_heads, capacity, config.head_dim)
    layers = tuple(
        LayerCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))
        for _ in range(num_layers or config.num_layers))
    return cls(layers=layers, lengths=jnp.zeros((batch,), jnp.int32))


def rope_inverse_frequencies(config: LlamaConfig) -> jax.Array:
  """[H/2] inverse frequencies, with Llama 3's long-context rescaling if configured."""
  exponents = jnp.arange(0, config.head_dim, 2, dtype=jnp.float32) / config.head_dim
  inv_freq = 1.0 / (config.rope_theta ** exponents)
  scaling = config.rope_scaling
  if scaling is None:
    return inv_freq
  old_context = scaling.original_max_position_embeddings
  low_freq_wavelen = old_context / scaling.low_freq_factor
  high_freq_wavelen = old_context / scaling.high_freq_factor
  wavelen = 2 * jnp.pi / inv_freq
  scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
  smooth = (old_context / wavelen - scaling.low_freq_factor) / (
      scaling.high_freq_factor - scaling.low_freq_factor)
  smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
  is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
  return jnp.where(is_medium, smoothed, scaled)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotates x [B, T, *, H] by positions [B, T], in HF's rotate-half layout."""
  angles = positions[:, :, None].astype(jnp.float32) * inv_freq  # [B, T, H/2]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)


class RMSNorm(nn.Module):
  eps: float
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (normed.astype(x.dtype) * scale).astype(x.dtype)


def write_cache(cache: jax.Array, new: jax.Array, starts: jax.Array) -> jax.Array:
  """Writes new [B, T, K, H] into cache [B, K, S, H] at slots starts[b] + t.

  Writes past the end are dropped rather than clamped, so padding beyond a
  row's capacity can never overwrite valid entries.
  """
  batch, num_new = new.shape[:2]
  slots = starts[:, None] + jnp.arange(num_new)[None, :]  # [B, T]
  # Advanced indices split by a slice index the view as [B, T, K, H], new's layout. The
  # cast is explicit: training runs an f32 feature drafter over the bf16 target's cache.
  return cache.at[jnp.arange(batch)[:, None], :, slots].set(new.astype(cache.dtype),
                                                            mode="drop")


def split_fused(fused: jax.Array, sizes: tuple[int, ...], shards: int) -> list[jax.Array]:
  """The parts of a fused product's last axis, each in its own order.

  With shards > 1 the axis holds `shards` blocks, each with its share of every
  part in turn (sharding.shard_major), so that a device holding one block holds
  whole heads of q, k and v, or matching columns of gate and up.
  """
  if shards == 1:
    return jnp.split(fused, np.cumsum(sizes)[:-1].tolist(), axis=-1)
  *lead, _ = fused.shape
  blocks = fused.reshape(*lead, shards, sum(sizes) // shards)
  parts = jnp.split(blocks, np.cumsum([size // shards for size in sizes])[:-1].tolist(), axis=-1)
  return [part.reshape(*lead, -1) for part in parts]


class Attention(nn.Module):
  config: LlamaConfig
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(self, x, positions, layer_cache: LayerCache, starts, inv_freq, visible=None):
    """visible: [B or 1, T, S] bool, which cache slots each new token attends to;
    None is causal by position."""
    c = self.config
    init = nn.initializers.normal(0.02)
    qkv_w = self.param("qkv", init, (c.hidden_size, (c.num_heads + 2 * c.num_kv_heads) * c.head_dim),
                       self.param_dtype)
    out_w = self.param("out", init, (c.num_heads * c.head_dim, c.hidden_size), self.param_dtype)

    batch, num_new, _ = x.shape
    qkv = jnp.einsum("BTD,DE->BTE", x, qkv_w)
    q, k, v = split_fused(qkv, (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim,
                                c.num_kv_heads * c.head_dim), c.tp_shards)
    q = apply_rope(q.reshape(batch, num_new, c.num_heads, c.head_dim), positions, inv_freq)
    k = apply_rope(k.reshape(batch, num_new, c.num_kv_heads, c.head_dim), positions, inv_freq)
    v = v.reshape(batch, num_new, c.num_kv_heads, c.head_dim)

    layer_cache = LayerCache(k=write_cache(layer_cache.k, k, starts),
                             v=write_cache(layer_cache.v, v, starts))

    q = q.reshape(batch, num_new, c.num_kv_heads, c.num_groups, c.head_dim)
    scores = jnp.einsum("BTKGH,BKSH->BKGTS", q, layer_cache.k,
                        preferred_element_type=jnp.float32) * c.head_dim**-0.5
    if visible is None:
      slots = jnp.arange(layer_cache.k.shape[2])
      visible = slots[None, None, :] <= positions[:, :, None]  # [B, T, S], causal over the cache
    scores = jnp.where(visible[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
    out = jnp.einsum("BKGTS,BKSH->BTKGH", probs, layer_cache.v)
    out = out.reshape(batch, num_new, c.num_heads * c.head_dim)
    return jnp.einsum("BTE,ED->BTD", out, out_w), layer_cache


class MLP(nn.Module):
  config: LlamaConfig
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    c = self.config
    init = nn.initializers.normal(0.02)
    gate_up_w = self.param("gate_up", init, (c.hidden_size, 2 * c.intermediate_size),
                           self.param_dtype)
    down_w = self.param("down", init, (c.intermediate_size, c.hidden_size), self.param_dtype)
    gate, up = split_fused(jnp.einsum("BTD,DF->BTF", x, gate_up_w),
                           (c.intermediate_size, c.intermediate_size), c.tp_shards)
    return jnp.einsum("BTF,FD->BTD", nn.silu(gate) * up, down_w)


class Block(nn.Module):
  config: LlamaConfig
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(self, x, positions, layer_cache, starts, inv_freq, visible=None):
    eps = self.config.rms_norm_eps
    attn_out, layer_cache = Attention(self.config, self.param_dtype, name="attn")(
        RMSNorm(eps, self.param_dtype, name="attn_norm")(x), positions, layer_cache, starts,
        inv_freq, visible)
    x = x + attn_out
    x = x + MLP(self.config, self.param_dtype, name="mlp")(
        RMSNorm(eps, self.param_dtype, name="mlp_norm")(x))
    return x, layer_cache


class Llama(nn.Module):
  """Llama decoder. With `num_layers` < config.num_layers it is the layer-skip
  self-drafter: the first layers, the final norm and the head, applied to the
  full model's parameters (linen ignores the unused layers)."""

  config: LlamaConfig
  num_layers: int | None = None
  param_dtype: jnp.dtype = jnp.bfloat16

  @property
  def depth(self) -> int:
    """The layers this model runs."""
    return self.num_layers or self.config.num_layers

  @nn.compact
  def __call__(
      self,
      tokens: jax.Array,  # [B, T] int32
      cache: KVCache,
      num_valid: jax.Array | None = None,  # [B] int32, real tokens per row; default T
      logits_index: jax.Array | None = None,  # [B] int32, the one position to score per row
      return_features: bool = False,
      feature_layers: tuple[int, ...] = (),
  ) -> tuple[jax.Array, KVCache] | tuple[jax.Array, KVCache, jax.Array]:
    """Appends tokens to the cache and returns f32 logits.

    Returns:
      logits: [B, T, V], or [B, V] when logits_index is given.
      cache: the updated cache; each row's length grows by num_valid.
      features: only with return_features, at every position, for feature drafters:
        [B, T, D] the hidden state the head reads (after the final norm); or, given
        feature_layers, [B, T, len(feature_layers) * D] one such state per entry, side
        by side (EAGLE-3's fused features): for i < the model's layers, the residual
        stream after layer i (0-based); for i equal to it, the final-normed state.
    """
    c = self.config
    num_layers = self.depth
    if len(cache.layers) != num_layers:
      raise ValueError(f"cache has {len(cache.layers)} layers, model runs {num_layers}")
    embedding = self.param("embedding", nn.initializers.normal(1.0), (c.vocab_size, c.hidden_size),
                           self.param_dtype)
    starts = cache.lengths
    positions = starts[:, None] + jnp.arange(tokens.shape[1])[None, :]  # [B, T]
    inv_freq = rope_inverse_frequencies(c)

    if any(not 0 <= i <= num_layers for i in feature_layers):
      raise ValueError(f"feature layers {feature_layers} outside [0, {num_layers}] (the "
                       f"model's layers, then its final-normed state)")
    x = jnp.take(embedding, tokens, axis=0)
    layers, hidden = [], {}
    for i in range(num_layers):
      x, layer_cache = Block(c, self.param_dtype, name=f"layer_{i}")(
          x, positions, cache.layers[i], starts, inv_freq)
      layers.append(layer_cache)
      if i in feature_layers:
        hidden[i] = x
    if num_valid is None:
      num_valid = jnp.full_like(starts, tokens.shape[1])
    cache = KVCache(layers=tuple(layers), lengths=starts + num_valid)

    # The norm is per position, so only the scored positions are normalised for the
    # head, and the same way whether or not features are asked for: logits never
    # depend on it (deterministic mode compares programs that differ in this).
    final_norm = RMSNorm(c.rms_norm_eps, self.param_dtype, name="final_norm")
    features = None
    if return_features:
      hidden[num_layers] = final_norm(x)
      features = jnp.concatenate([hidden[i] for i in feature_layers or (num_layers,)], axis=-1)
    if logits_index is not None:
      x = jnp.take_along_axis(x, logits_index[:, None, None], axis=1)[:, 0]
    x = final_norm(x)
    if c.tie_word_embeddings:
      unembedding = embedding
    else:
      unembedding = self.param("unembedding", nn.initializers.normal(0.02),
                               (c.vocab_size, c.hidden_size), self.param_dtype)
    logits = jnp.einsum("...D,VD->...V", x, unembedding, preferred_element_type=jnp.float32)
    return (logits, cache) if features is None else (logits, cache, features)


def lm_head(params, normed: jax.Array) -> jax.Array:
  """f32 logits [..., V] from final-normed hidden states [..., D] (Llama's features), through
  the model's head (its embedding when the two are tied), as its own call computes them."""
  weights = params["params"]
  unembedding = weights.get("unembedding", weights["embedding"])
  return jnp.einsum("...D,VD->...V", normed, unembedding, preferred_element_type=jnp.float32)


def init_params(config: LlamaConfig, rng: jax.Array, param_dtype=jnp.bfloat16,
                mesh: jax.sharding.Mesh | None = None) -> dict:
  """Random parameters, created on device in one jitted call (synthetic weights); with a
  mesh, created in their tensor-parallel shards (sharding.py), never whole on one device."""
  model = Llama(config, param_dtype=param_dtype)
  cache = jax.eval_shape(lambda: KVCache.init(config, 1, 1, dtype=param_dtype))
  args = (rng, jnp.zeros((1, 1), jnp.int32),
          jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), cache))
  shardings = None if mesh is None else sharding.param_shardings(
      jax.eval_shape(model.init, *args), mesh)
  return jax.jit(model.init, out_shardings=shardings)(*args)
