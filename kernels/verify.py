"""Speculative verification: accept test plus residual sampling (Leviathan et al. 2023, Alg. 1).

For each row, with draft tokens x_1..x_g drawn from q and target distributions
p_0..p_g (p_i scores the token at draft position i + 1; p_g is the bonus):

  accept x_i while u_i < min(1, p_i(x_i) / q_i(x_i))        (tested in log space)
  n = the number accepted before the first rejection (g if none)
  next ~ norm(max(0, p_n - q_n))   if n < g
  next ~ p_g                       if n = g

The output, x_1..x_n followed by next, is distributed exactly as sampling from p.

Randomness comes from a counter-based hash of (seed, row, counter) rather than
from jax.random, so that an implementation that streams over the vocabulary
can draw the noise for any element where it needs it, without reading an
array of noise, and any two implementations fed the same seeds agree exactly.
The next token is drawn by the exponential race: argmax_v r_v / E_v with
E_v ~ Exp(1) independent, which selects v with probability r_v / sum(r), so
the residual never needs normalising.

This module holds the pure-jnp reference; the Pallas kernel sits beside it
behind the same signature.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Counters [0, V) draw the race noise; V + i draws the accept test at position i.
_GOLDEN = 0x9E3779B9


def _mix32(x: jax.Array) -> jax.Array:
  """A 32-bit integer finaliser (lowbias32): every input bit affects every output bit."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def uniform_from_hash(seed: jax.Array, counter: jax.Array) -> jax.Array:
  """f32 uniform in (0, 1) from uint32 seed and counter (broadcast together)."""
  bits = _mix32(_mix32(seed.astype(jnp.uint32) ^ jnp.uint32(_GOLDEN))
                + counter.astype(jnp.uint32) * jnp.uint32(_GOLDEN))
  # 24 high bits, centred in their bucket: never exactly 0 or 1.
  return ((bits >> 8).astype(jnp.float32) + 0.5) * (1.0 / (1 << 24))


def accept_uniforms(seeds: jax.Array, gamma: int, vocab_size: int) -> jax.Array:
  """[B, gamma] uniforms u_i of the accept test."""
  return uniform_from_hash(seeds[:, None], vocab_size + jnp.arange(gamma)[None, :])


def accepted_counts(
    target_logp: jax.Array,  # [B, G+1, V] f32
    draft_logq: jax.Array,  # [B, G, V] f32
    draft_tokens: jax.Array,  # [B, G] int32
    seeds: jax.Array,  # [B] uint32
) -> jax.Array:
  """[B] int32: drafts accepted before the first rejection."""
  gamma, vocab = draft_logq.shape[1:]
  logp_draft = jnp.take_along_axis(target_logp[:, :gamma], draft_tokens[..., None], -1)[..., 0]
  logq_draft = jnp.take_along_axis(draft_logq, draft_tokens[..., None], -1)[..., 0]
  log_u = jnp.log(accept_uniforms(seeds, gamma, vocab))
  # log u < log p - log q, with p(x) = 0 always rejected and q(x) = 0 < p(x) accepted.
  accepted = (logp_draft > -jnp.inf) & ((logq_draft == -jnp.inf) | (log_u < logp_draft - logq_draft))
  return jnp.sum(jnp.cumprod(accepted, axis=1), axis=1).astype(jnp.int32)


def race_sample(weights: jax.Array, seeds: jax.Array) -> jax.Array:
  """[B] int32 drawn with probability proportional to weights [B, V] >= 0 (exponential race)."""
  exponentials = -jnp.log(uniform_from_hash(seeds[:, None], jnp.arange(weights.shape[1])[None, :]))
  return jnp.argmax(weights / exponentials, axis=1).astype(jnp.int32)


def verify_reference(
    target_logp: jax.Array,  # [B, G+1, V] f32, log p at each verified position
    draft_logq: jax.Array,  # [B, G, V] f32, log q the drafts were sampled from
    draft_tokens: jax.Array,  # [B, G] int32
    seeds: jax.Array,  # [B] uint32
) -> tuple[jax.Array, jax.Array]:
  """Returns (num_accepted [B] int32 in [0, G], next_token [B] int32)."""
  batch, gamma, _ = draft_logq.shape
  num_accepted = accepted_counts(target_logp, draft_logq, draft_tokens, seeds)
  rows = jnp.arange(batch)
  p = jnp.exp(target_logp[rows, num_accepted])  # [B, V]
  q = jnp.exp(draft_logq[rows, jnp.minimum(num_accepted, gamma - 1)])
  residual = jnp.where((num_accepted < gamma)[:, None], jnp.maximum(p - q, 0.0), p)
  # p == q at the rejected position has probability zero of rejecting; should rounding
  # get there anyway, fall back to p rather than sample from nothing.
  residual = jnp.where(jnp.sum(residual, axis=1, keepdims=True) > 0, residual, p)
  return num_accepted, race_sample(residual, seeds)
