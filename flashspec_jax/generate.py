"""Autoregressive generation as one XLA program.

Padding scheme: prompts are right-padded into a [B, P] array and their true
lengths passed beside it. Row b's prompt fills slots [0, len_b) of its token
buffer and KV cache, and its generated tokens follow at len_b, len_b + 1, ...
Every row therefore decodes at its own position; the model's causal mask is
per row, so padding is never attended to.

`generate` is jitted whole: the prefill and a `lax.while_loop` over
`decode_step` compile into one executable with no host round trip per token.
`stream` drives the same `decode_step` from Python, one token per call.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from flashspec_jax.models.config import LlamaConfig
from flashspec_jax.models.llama import KVCache, Llama
from flashspec_jax.sampling import Sampler

PAD_ID = 0


@struct.dataclass(kw_only=True)
class DecodeState:
  """Everything the decode loop carries.

  Invariant: the cache holds every token of a row but its last one, which is
  fed to the model at the next step (`cache.lengths == seq_lens - 1`).

  Attributes:
    tokens: [B, L] int32, prompt then generated tokens; L = P + max_new_tokens.
    seq_lens: [B] int32, valid tokens per row.
    prompt_lens: [B] int32.
    cache: the target model's KV cache, capacity >= L.
    done: [B] bool, the row has emitted EOS, hit its budget or produced NaN logits.
    nan_rows: [B] bool, the row stopped because its logits were NaN.
    rng: PRNG key for the next step.
    step: [] int32, decode steps taken.
  """

  tokens: jax.Array
  seq_lens: jax.Array
  prompt_lens: jax.Array
  cache: KVCache
  done: jax.Array
  nan_rows: jax.Array
  rng: jax.Array
  step: jax.Array

  @property
  def num_generated(self) -> jax.Array:
    return self.seq_lens - self.prompt_lens


@struct.dataclass(kw_only=True)
class GenerationOutput:
  """Attributes:
    tokens: [B, max_new_tokens] int32, generated tokens, PAD_ID after each row's end.
    num_tokens: [B] int32, tokens generated per row (an EOS is counted).
    nan_rows: [B] bool, rows stopped early by NaN logits.
    steps: [] int32, decode steps the loop ran.
  """

  tokens: jax.Array
  num_tokens: jax.Array
  nan_rows: jax.Array
  steps: jax.Array


def prepare_prompts(prompts: Sequence[Sequence[int]], vocab_size: int) -> tuple[np.ndarray,
                                                                                 np.ndarray]:
  """Validates token-id prompts and right-pads them into ([B, P] tokens, [B] lengths)."""
  if not prompts:
    raise ValueError("no prompts given")
  lengths = np.array([len(p) for p in prompts], np.int32)
  if (lengths == 0).any():
    raise ValueError(f"prompts {np.flatnonzero(lengths == 0).tolist()} are empty")
  tokens = np.full((len(prompts), lengths.max()), PAD_ID, np.int32)
  for row, prompt in enumerate(prompts):
    ids = np.asarray(prompt)
    bad = (ids < 0) | (ids >= vocab_size)
    if bad.any():
      raise ValueError(f"prompt {row} holds token ids outside the vocabulary [0, {vocab_size}): "
                       f"{ids[bad][:5].tolist()}")
    tokens[row, :len(ids)] = ids
  return tokens, lengths


def required_capacity(config: LlamaConfig, prompt_width: int, max_new_tokens: int,
                      reserve: int = 0, cache_capacity: int | None = None,
                      padded_width: int | None = None) -> int:
  """Returns the cache capacity needed, or raises if it exceeds what is allowed.

  prompt_width is the longest real prompt, which bounds the positions used;
  padded_width, the width of the padded prompt buffer, only sizes the cache.
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  needed = max(prompt_width, padded_width or 0) + max_new_tokens + reserve
  if cache_capacity is not None and needed > cache_capacity:
    raise ValueError(
        f"prompt ({prompt_width} tokens) + max_new_tokens ({max_new_tokens})"
        + (f" + {reserve} speculative slots" if reserve else "")
        + f" = {needed} exceeds the KV cache capacity of {cache_capacity}")
  positions = prompt_width + max_new_tokens
  if positions > config.max_position_embeddings:
    raise ValueError(f"prompt ({prompt_width} tokens) + max_new_tokens ({max_new_tokens}) = "
                     f"{positions} exceeds the model's {config.max_position_embeddings} positions")
  return cache_capacity or needed


def is_stop_token(tokens: jax.Array, eos_ids: tuple[int, ...]) -> jax.Array:
  return jnp.isin(tokens, jnp.asarray(eos_ids, jnp.int32)) if eos_ids else jnp.zeros_like(
      tokens, bool)


def append_tokens(tokens: jax.Array, seq_lens: jax.Array, new: jax.Array,
                  num_new: jax.Array) -> jax.Array:
  """Writes new[b, :num_new[b]] at tokens[b, seq_lens[b]:]; other slots are left alone."""
  batch, width = new.shape
  slots = seq_lens[:, None] + jnp.arange(width)[None, :]
  slots = jnp.where(jnp.arange(width)[None, :] < num_new[:, None], slots, tokens.shape[1])
  return tokens.at[jnp.arange(batch)[:, None], slots].set(new, mode="drop")


def prefill(params, prompt_tokens, prompt_lens, rng, *, model: Llama, sampler: Sampler,
            max_new_tokens: int, eos_ids: tuple[int, ...], capacity: int) -> DecodeState:
  """Runs the prompts through the model and samples each row's first token."""
  batch, width = prompt_tokens.shape
  cache = KVCache.init(model.config, batch, capacity, dtype=model.param_dtype)
  logits, cache = model.apply(params, prompt_tokens, cache, num_valid=prompt_lens,
                              logits_index=prompt_lens - 1)
  rng, key = jax.random.split(rng)
  first = sampler.get_next_tokens(logits, key)
  nan_rows = jnp.isnan(logits).any(axis=-1)
  tokens = jnp.zeros((batch, width + max_new_tokens), jnp.int32)
  tokens = tokens.at[:, :width].set(prompt_tokens)
  tokens = append_tokens(tokens, prompt_lens, first[:, None], jnp.where(nan_rows, 0, 1))
  seq_lens = prompt_lens + jnp.where(nan_rows, 0, 1)
  done = nan_rows | is_stop_token(first, eos_ids) | (max_new_tokens <= 1)
  return DecodeState(tokens=tokens, seq_lens=seq_lens, prompt_lens=prompt_lens, cache=cache,
                     done=done, nan_rows=nan_rows, rng=rng, step=jnp.zeros((), jnp.int32))


def decode_step(params, state: DecodeState, *, model: Llama, sampler: Sampler,
                max_new_tokens: int, eos_ids: tuple[int, ...]) -> DecodeState:
  """Feeds each row's last token and appends one sampled token to rows not yet done."""
  batch = state.tokens.shape[0]
  last = state.tokens[jnp.arange(batch), state.seq_lens - 1]
  active = ~state.done
  logits, cache = model.apply(params, last[:, None], state.cache, num_valid=active.astype(jnp.int32))
  logits = logits[:, 0]
  rng, key = jax.random.split(state.rng)
  nan_rows = active & jnp.isnan(logits).any(axis=-1)
  emits = active & ~nan_rows
  new = sampler.get_next_tokens(logits, key)
  tokens = append_tokens(state.tokens, state.seq_lens, new[:, None], emits.astype(jnp.int32))
  seq_lens = state.seq_lens + emits
  done = (state.done | nan_rows | (emits & is_stop_token(new, eos_ids))
          | (seq_lens - state.prompt_lens >= max_new_tokens))
  return dataclasses.replace(state, tokens=tokens, seq_lens=seq_lens, cache=cache, done=done,
                             nan_rows=state.nan_rows | nan_rows, rng=rng, step=state.step + 1)


def generated_tokens(tokens: jax.Array, prompt_lens: jax.Array, seq_lens: jax.Array,
                     max_new_tokens: int) -> jax.Array:
  """[B, max_new_tokens] tokens after each prompt, PAD_ID beyond each row's end."""
  batch, width = tokens.shape
  offsets = jnp.arange(max_new_tokens)[None, :]
  picked = tokens[jnp.arange(batch)[:, None],
                  jnp.minimum(prompt_lens[:, None] + offsets, width - 1)]
  return jnp.where(offsets < (seq_lens - prompt_lens)[:, None], picked, PAD_ID)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "eos_ids", "capacity"))
def generate(params, prompt_tokens, prompt_lens, rng, *, model: Llama, sampler: Sampler,
             max_new_tokens: int, eos_ids: tuple[int, ...], capacity: int) -> GenerationOutput:
  """Prefill plus a `lax.while_loop` of decode steps, as one compiled program.

  The sampler is a pytree argument: changing its temperature does not
  recompile. `run_generate` validates host-side inputs and calls this.
  """
  state = prefill(params, prompt_tokens, prompt_lens, rng, model=model, sampler=sampler,
                  max_new_tokens=max_new_tokens, eos_ids=eos_ids, capacity=capacity)

  def should_continue(state: DecodeState):
    return (state.step < max_new_tokens) & ~jnp.all(state.done)

  step = functools.partial(decode_step, params, model=model, sampler=sampler,
                           max_new_tokens=max_new_tokens, eos_ids=eos_ids)
  state = jax.lax.while_loop(should_continue, step, state)
  return GenerationOutput(tokens=generated_tokens(state.tokens, state.prompt_lens, state.seq_lens,
                                                 max_new_tokens),
                          num_tokens=state.num_generated, nan_rows=state.nan_rows,
                          steps=state.step)


def run_generate(params, config: LlamaConfig, prompts: Sequence[Sequence[int]], *,
                 sampler: Sampler, max_new_tokens: int, rng: jax.Array,
                 eos_ids: tuple[int, ...] | None = None, cache_capacity: int | None = None,
                 param_dtype: Any = jnp.bfloat16) -> GenerationOutput:
  """Validates token-id prompts, then runs `generate`.

  Raises:
    ValueError: on empty prompts, ids outside the vocabulary or a budget beyond the cache.
    FloatingPointError: when a row's logits were NaN (the row is stopped, not sampled).
  """
  tokens, lengths = prepare_prompts(prompts, config.vocab_size)
  capacity = required_capacity(config, tokens.shape[1], max_new_tokens,
                               cache_capacity=cache_capacity)
  out = generate(params, jnp.asarray(tokens), jnp.asarray(lengths), rng,
                 model=Llama(config, param_dtype=param_dtype), sampler=sampler,
                 max_new_tokens=max_new_tokens,
                 eos_ids=config.eos_token_ids if eos_ids is None else tuple(eos_ids),
                 capacity=capacity)
  raise_on_nan(out.nan_rows)
  return out


def raise_on_nan(nan_rows: jax.Array, nan_arm: jax.Array | None = None,
                 arm_names: Sequence[str] = ()) -> None:
  """Raises FloatingPointError naming what produced NaN logits: the target, or the
  drafter of arm arm_names[nan_arm[row]]."""
  nan_rows = np.asarray(nan_rows)
  nan_arm = np.full(nan_rows.shape, -1) if nan_arm is None else np.asarray(nan_arm)
  culprits = [(f"the drafter of arm {arm_names[arm]!r}", nan_rows & (nan_arm == arm))
              for arm in sorted(set(nan_arm[nan_rows].tolist()) - {-1})]
  culprits.append(("the target model", nan_rows & (nan_arm < 0)))
  found = [f"{who} produced NaN logits for rows {np.flatnonzero(rows).tolist()}"
           for who, rows in culprits if rows.any()]
  if found:
    raise FloatingPointError("; ".join(found) + "; those rows were stopped instead of sampled")


def stream(params, config: LlamaConfig, prompts: Sequence[Sequence[int]], *, sampler: Sampler,
           max_new_tokens: int, rng: jax.Array, eos_ids: tuple[int, ...] | None = None,
           param_dtype: Any = jnp.bfloat16) -> Iterator[np.ndarray]:
  """Yields each row's newest token (or -1 once the row is done), one step at a time.

  Drives the same `prefill` and `decode_step` as `generate` from Python, for
  streaming and debugging; each step costs a host round trip.
  """
  tokens, lengths = prepare_prompts(prompts, config.vocab_size)
  capacity = required_capacity(config, tokens.shape[1], max_new_tokens)
  static = dict(model=Llama(config, param_dtype=param_dtype), sampler=sampler,
                max_new_tokens=max_new_tokens,
                eos_ids=config.eos_token_ids if eos_ids is None else tuple(eos_ids))
  state = jax.jit(functools.partial(prefill, capacity=capacity, **static))(
      params, jnp.asarray(tokens), jnp.asarray(lengths), rng)
  step = jax.jit(functools.partial(decode_step, **static))
  previous = np.asarray(lengths)
  while True:
    seq_lens = np.asarray(state.seq_lens)
    raise_on_nan(state.nan_rows)
    grew = seq_lens > previous
    newest = np.asarray(state.tokens)[np.arange(len(seq_lens)), seq_lens - 1]
    yield np.where(grew, newest, -1)
    previous = seq_lens
    if np.asarray(state.done).all():
      return
    state = step(params, state)
