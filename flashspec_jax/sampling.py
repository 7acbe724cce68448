"""Sampling methods: small frozen dataclasses that are also pytrees.

Each method defines the *processed* distribution it samples from, as log
probabilities with -inf outside its support. Speculative decoding verifies
against exactly that distribution, so AR and speculative sampling agree.

Temperatures and top-p masses are pytree leaves, so a jitted generation takes
the sampler as an ordinary argument and a sweep over them compiles once; the
kind of sampler and top-k's k (a shape) are static. Values are validated when
they are concrete Python numbers.
"""

from __future__ import annotations

import numbers
from typing import Protocol

import jax
import jax.numpy as jnp
from flax import struct


class Sampler(Protocol):

  def log_probs(self, logits: jax.Array) -> jax.Array:
    """[..., V] logits -> [..., V] normalised log probabilities of the processed distribution."""

  def get_next_tokens(self, logits: jax.Array, rng: jax.Array) -> jax.Array:
    """[..., V] logits -> [...] int32 tokens."""


def _check_temperature(temperature: float) -> None:
  if isinstance(temperature, numbers.Number) and not temperature > 0:  # also rejects NaN
    raise ValueError(f"temperature must be > 0, got {temperature}; use Greedy() for temperature 0")


class _Stochastic:

  def get_next_tokens(self, logits, rng):
    return jax.random.categorical(rng, self.log_probs(logits)).astype(jnp.int32)


@struct.dataclass
class Greedy:
  """Argmax; as a distribution, the one-hot at the argmax (ties go to the lowest id)."""

  def log_probs(self, logits):
    top = jnp.argmax(logits, axis=-1)
    return jnp.where(jnp.arange(logits.shape[-1]) == top[..., None], 0.0, -jnp.inf)

  def get_next_tokens(self, logits, rng):
    del rng
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


@struct.dataclass
class Temperature(_Stochastic):
  temperature: float = 1.0

  def __post_init__(self):
    _check_temperature(self.temperature)

  def log_probs(self, logits):
    return jax.nn.log_softmax(logits.astype(jnp.float32) / self.temperature, axis=-1)


@struct.dataclass
class TopK(_Stochastic):
  """The k most likely tokens (ties at the k-th value are all kept), then temperature."""

  k: int = struct.field(pytree_node=False)
  temperature: float = 1.0

  def __post_init__(self):
    if self.k < 1:
      raise ValueError(f"top-k needs k >= 1, got {self.k}")
    _check_temperature(self.temperature)

  def log_probs(self, logits):
    logits = logits.astype(jnp.float32) / self.temperature
    kth = jax.lax.top_k(logits, min(self.k, logits.shape[-1]))[0][..., -1:]
    return jax.nn.log_softmax(jnp.where(logits >= kth, logits, -jnp.inf), axis=-1)


@struct.dataclass
class TopP(_Stochastic):
  """Nucleus sampling: the smallest set of most likely tokens whose mass reaches p."""

  p: float
  temperature: float = 1.0

  def __post_init__(self):
    if isinstance(self.p, numbers.Number) and not 0 < self.p <= 1:
      raise ValueError(f"top-p must be in (0, 1], got {self.p}")
    _check_temperature(self.temperature)

  def log_probs(self, logits):
    logp = jax.nn.log_softmax(logits.astype(jnp.float32) / self.temperature, axis=-1)
    sorted_logp = -jnp.sort(-logp, axis=-1)
    mass_before = jnp.cumsum(jnp.exp(sorted_logp), axis=-1) - jnp.exp(sorted_logp)
    # The last kept token is the one at which the mass reaches p; the first is always kept.
    num_kept = jnp.maximum(jnp.sum(mass_before < self.p, axis=-1, keepdims=True), 1)
    threshold = jnp.take_along_axis(sorted_logp, num_kept - 1, axis=-1)
    return jax.nn.log_softmax(jnp.where(logp >= threshold, logp, -jnp.inf), axis=-1)


@struct.dataclass
class Samplers:
  """The target's sampler, which defines the output distribution, and the one the
  drafters draw with (any distribution keeps the output exact)."""

  target: Sampler
  draft: Sampler

  @classmethod
  def same(cls, sampler: Sampler) -> Samplers:
    return cls(target=sampler, draft=sampler)


def make_sampler(temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Sampler:
  """The sampler for config-style knobs: temperature 0 is greedy, top_k 0 and top_p 1 are off."""
  if temperature < 0 or temperature != temperature:
    raise ValueError(f"temperature must be >= 0, got {temperature}")
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p must be in (0, 1], got {top_p}")
  if top_k < 0:
    raise ValueError(f"top_k must be >= 0 (0 turns it off), got {top_k}")
  if top_k and top_p < 1:
    raise ValueError("choose top_k or top_p, not both")
  if temperature == 0:
    return Greedy()
  if top_k:
    return TopK(top_k, temperature)
  if top_p < 1:
    return TopP(top_p, temperature)
  return Temperature(temperature)
