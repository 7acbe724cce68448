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

Inputs are normalised log probabilities, not logits. The accept test needs
p and q at the draft tokens only (2G scalars); the residual needs one row of p
and q (2V floats). From logits the kernel would also need the normaliser of
every position the accept test touches, a pass over (2G + 1) V floats, i.e.
about 4.5 MB instead of 1 MB per row at G = 4, V = 128256 in f32. The
normalised distributions exist anyway: top-k, top-p and temperature are
applied by the sampler, outside the kernel, exactly as for AR sampling.

This module holds the pure-jnp reference (`verify_reference`) and the Pallas
kernel (`verify_pallas`, Triton lowering: each batch row split into shares of
vocabulary tiles, one program per share, `VerifyTiling.num_splits`), which agree
exactly given the same seeds.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from flashspec_jax.environment import on_gpu

# Counters [0, V) draw the race noise; V + i draws the accept test at position i.
_GOLDEN = 0x9E3779B9


def _mix32(x: jax.Array) -> jax.Array:
  """A 32-bit integer finaliser (lowbias32): every input bit affects every output bit."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def uniform_from_bits(bits: jax.Array) -> jax.Array:
  """uint32 -> f32 in (0, 1): the 23 high bits, centred in their bucket.

  Every value, from 2**-24 to 1 - 2**-24, is exact in f32, so u is never 0 or 1
  and -log(u) is never 0 (with 24 bits, 1 - 2**-25 would round to 1).
  """
  return ((bits >> 9).astype(jnp.float32) + 0.5) * (1.0 / (1 << 23))


def uniform_from_hash(seed: jax.Array, counter: jax.Array) -> jax.Array:
  """f32 uniform in (0, 1) from uint32 seed and counter (broadcast together)."""
  return uniform_from_bits(_mix32(_mix32(seed.astype(jnp.uint32) ^ jnp.uint32(_GOLDEN))
                                  + counter.astype(jnp.uint32) * jnp.uint32(_GOLDEN)))


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


@dataclasses.dataclass(frozen=True)
class VerifyTiling:
  """Launch parameters of the Pallas kernel.

  Attributes:
    block_v: vocabulary elements per tile of the residual pass (a power of two).
    num_warps: warps per program (a power of two, 1 to 32).
    num_stages: software-pipelining depth of the tile loop.
    splits: programs per row, each racing over a contiguous share of the
      vocabulary; None picks enough to give every multiprocessor work at small
      batch (the winners of the shares are combined after the kernel).
  """

  block_v: int = 1024
  num_warps: int = 4
  num_stages: int = 2
  splits: int | None = None

  def __post_init__(self):
    if self.block_v < 16 or self.block_v & (self.block_v - 1):
      raise ValueError(f"{self.block_v=} must be a power of two >= 16")
    if not 1 <= self.num_warps <= 32 or self.num_warps & (self.num_warps - 1):
      raise ValueError(f"{self.num_warps=} must be a power of two in [1, 32]")
    if self.num_stages < 1:
      raise ValueError(f"{self.num_stages=} must be >= 1")
    if self.splits is not None and self.splits < 1:
      raise ValueError(f"{self.splits=} must be >= 1")

  def num_splits(self, batch: int, vocab: int) -> int:
    tiles = -(-vocab // self.block_v)
    if self.splits is not None:
      return min(self.splits, tiles)
    return max(1, min(tiles, -(-2 * _MULTIPROCESSORS // batch)))


# An H100/H200 has 132; the split heuristic only needs the order of magnitude.
_MULTIPROCESSORS = 132


def _verify_kernel(
    target_logp_ref,  # [G+1, V] f32
    draft_logq_ref,  # [G, V] f32
    draft_tokens_ref,  # [G] int32
    seed_ref,  # [] uint32
    *refs,  # with poisoning, inputs aliased to the outputs; then the outputs, per program:
    # num_accepted [] int32; the race winners over this program's share, of the residual
    # and of p (for the fallback): key [] f32, index [] int32, p key, p index; and the
    # residual mass of the share [] f32.
    gamma: int, vocab: int, block_v: int, tiles_per_split: int):
  num_accepted_ref, key_ref, index_ref, p_key_ref, p_index_ref, mass_ref = refs[-6:]
  seed = seed_ref[...]

  # Accept test, vectorised over the (padded) draft positions: 2G gathered scalars.
  padded = pl.next_power_of_2(gamma)
  position = jnp.minimum(jnp.arange(padded), gamma - 1)
  tokens = draft_tokens_ref[position]
  logp, logq = target_logp_ref[position, tokens], draft_logq_ref[position, tokens]
  log_u = jnp.log(uniform_from_hash(seed, vocab + position))
  accepted = (logp > -jnp.inf) & ((logq == -jnp.inf) | (log_u < logp - logq))
  first_rejected = jnp.where(accepted, padded, position)
  num_accepted = jnp.minimum(jnp.min(first_rejected), gamma).astype(jnp.int32)
  use_residual = num_accepted < gamma
  q_row = jnp.minimum(num_accepted, gamma - 1)

  # Exponential race over this program's share, one tile at a time. Each lane
  # keeps its own running winner; lanes are reduced once, after the loop.
  first_tile = pl.program_id(1) * tiles_per_split
  lanes = jnp.arange(block_v)

  def race_tile(t, carry):
    best_key, best_index, best_p_key, best_p_index, mass = carry
    start = (first_tile + t) * block_v
    index = start + lanes
    valid = index < vocab
    window = pl.ds(start, block_v)
    p = jnp.exp(plgpu.load(target_logp_ref.at[num_accepted, window], mask=valid,
                           other=-jnp.inf))
    q = jnp.exp(plgpu.load(draft_logq_ref.at[q_row, window], mask=valid, other=-jnp.inf))
    residual = jnp.where(use_residual, jnp.maximum(p - q, 0.0), p)
    exponentials = -jnp.log(uniform_from_hash(seed, index))
    key, p_key = residual / exponentials, p / exponentials
    # Strictly greater: each lane keeps its earliest winner.
    better, p_better = key > best_key, p_key > best_p_key
    return (jnp.where(better, key, best_key), jnp.where(better, index, best_index),
            jnp.where(p_better, p_key, best_p_key), jnp.where(p_better, index, best_p_index),
            mass + residual)

  minus_one = jnp.full((block_v,), -1.0, jnp.float32)
  zero_index = jnp.zeros((block_v,), jnp.int32)
  tiles = jnp.minimum(tiles_per_split, pl.cdiv(vocab, block_v) - first_tile)
  best_key, best_index, best_p_key, best_p_index, mass = jax.lax.fori_loop(
      0, tiles, race_tile, (minus_one, zero_index, minus_one, zero_index, jnp.zeros_like(minus_one)))

  def earliest_winner(keys, indices):
    top = jnp.max(keys)
    return top, jnp.min(jnp.where(keys == top, indices, vocab))

  num_accepted_ref[...] = num_accepted
  key_ref[...], index_ref[...] = earliest_winner(best_key, best_index)
  p_key_ref[...], p_index_ref[...] = earliest_winner(best_p_key, best_p_index)
  mass_ref[...] = jnp.sum(mass)


def verify_kernel_call(inputs: tuple[jax.Array, ...], *, tiling: VerifyTiling,
                       interpret: bool = False, poison: float | None = None):
  """The raw kernel: six [B, S] arrays, one entry per program (see `_verify_kernel`).

  inputs: (target_logp, draft_logq, draft_tokens, seeds), as `verify_reference`
  takes them. With `poison`, every output starts filled with that value, so an
  element the kernel fails to write keeps it.
  """
  target_logp, draft_logq, draft_tokens, seeds = inputs
  batch, gamma, vocab = draft_logq.shape
  splits = tiling.num_splits(batch, vocab)
  tiles_per_split = -(-(-(-vocab // tiling.block_v)) // splits)
  kernel = functools.partial(_verify_kernel, gamma=gamma, vocab=vocab, block_v=tiling.block_v,
                             tiles_per_split=tiles_per_split)
  row = lambda b, s: (b, 0, 0)
  dtypes = (jnp.int32, jnp.float32, jnp.int32, jnp.float32, jnp.int32, jnp.float32)
  out_specs = [pl.BlockSpec((None, None), lambda b, s: (b, s))] * len(dtypes)
  out_shape = [jax.ShapeDtypeStruct((batch, splits), dtype) for dtype in dtypes]
  operands = [target_logp.astype(jnp.float32), draft_logq.astype(jnp.float32), draft_tokens,
            seeds.astype(jnp.uint32)]
  in_specs = [pl.BlockSpec((None, gamma + 1, vocab), row), pl.BlockSpec((None, gamma, vocab), row),
              pl.BlockSpec((None, gamma), lambda b, s: (b, 0)),
              pl.BlockSpec((None,), lambda b, s: (b,))]
  aliases = {}
  if poison is not None:
    operands += [jnp.full(o.shape, poison, o.dtype) for o in out_shape]
    in_specs += out_specs
    aliases = {4 + i: i for i in range(len(out_shape))}
  return pl.pallas_call(
      kernel,
      grid=(batch, splits),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      input_output_aliases=aliases,
      compiler_params=plgpu.CompilerParams(num_warps=tiling.num_warps,
                                           num_stages=tiling.num_stages),
      interpret=interpret,
      name="speculative_verify",
  )(*operands)


@functools.partial(jax.jit, static_argnames=("tiling", "interpret"))
def verify_pallas(
    target_logp: jax.Array,  # [B, G+1, V] f32
    draft_logq: jax.Array,  # [B, G, V] f32
    draft_tokens: jax.Array,  # [B, G] int32
    seeds: jax.Array,  # [B] uint32
    *,
    tiling: VerifyTiling = VerifyTiling(),
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """The fused Pallas kernel; same contract as `verify_reference`.

  The grid is (B, splits): every program of a row runs the accept test (O(G))
  and races over its share of the vocabulary; the shares' winners are combined
  here, in one small XLA reduction.
  """
  num_accepted, key, index, p_key, p_index, mass = verify_kernel_call(
      (target_logp, draft_logq, draft_tokens, seeds), tiling=tiling, interpret=interpret)
  # Shares are contiguous, so the first share holding the top key holds the
  # earliest index with that key, as jnp.argmax picks.
  pick = lambda keys, indices: jnp.take_along_axis(
      indices, jnp.argmax(keys, axis=1, keepdims=True), axis=1)[:, 0]
  next_token = jnp.where(mass.sum(axis=1) > 0, pick(key, index), pick(p_key, p_index))
  return num_accepted[:, 0], next_token


# True where the Triton lowering of Pallas can run: a GPU is JAX's default backend.
# get_verify_fn asks environment.on_gpu() instead, which also sees an engine placed
# on the CPU of a GPU host.
PALLAS_GPU_AVAILABLE = jax.default_backend() == "gpu"

VERIFY_IMPLS = ("auto", "reference", "pallas", "pallas_interpret")


@functools.cache
def _log_reference_fallback() -> None:
  logging.debug("no GPU for the Pallas verify kernel; using the jnp reference")


def verify_where_lowered(target_logp, draft_logq, draft_tokens, seeds):
  """The Pallas kernel in a program lowered for a CUDA GPU, the reference in one lowered
  for anything else: where the program runs decides, not JAX's default backend (on a GPU
  host, a program over a mesh of CPU devices ran the Triton kernel on CPU arrays and
  failed: "Only interpret mode is supported on CPU backend")."""
  return jax.lax.platform_dependent(target_logp, draft_logq, draft_tokens, seeds,
                                    cuda=verify_pallas, default=verify_reference)


def get_verify_fn(impl: str = "auto"):
  """The verify function for a config name; 'auto' is Pallas where computations run on a
  GPU (see environment.on_gpu; `verify_where_lowered`), else the reference."""
  if impl not in VERIFY_IMPLS:
    raise ValueError(f"unknown verify implementation {impl!r}; known: {VERIFY_IMPLS}")
  gpu = on_gpu()
  if impl == "auto":
    if not gpu:
      _log_reference_fallback()
    return verify_where_lowered if gpu else verify_reference
  if impl == "reference":
    return verify_reference
  if impl == "pallas" and not gpu:
    raise ValueError("verify_impl='pallas' needs a CUDA GPU; use 'auto', 'reference' or "
                     "'pallas_interpret'")
  return functools.partial(verify_pallas, interpret=impl == "pallas_interpret")
