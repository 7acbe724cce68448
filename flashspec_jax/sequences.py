"""Token sequences as both generation loops keep them, and the host-side checks before a run.

Padding scheme: prompts are right-padded into a [B, P] array and their true
lengths passed beside it. Row b's prompt fills slots [0, len_b) of its token
buffer and KV cache, and its generated tokens follow at len_b, len_b + 1, ...
Every row therefore decodes at its own position; the model's causal mask is
per row, so padding is never attended to.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from flashspec_jax.models.config import LlamaConfig

PAD_ID = 0


@struct.dataclass(kw_only=True)
class Sequences:
  """The token buffer and per-row bookkeeping that AR and speculative states share.

  Attributes:
    tokens: [B, L] int32, prompt then committed tokens.
    seq_lens: [B] int32, committed tokens per row.
    prompt_lens: [B] int32.
    done: [B] bool, the row has emitted EOS, hit its budget or produced NaN logits.
    nan_rows: [B] bool, the row stopped because logits were NaN.
    rng: PRNG key for the next step.
  """

  tokens: jax.Array
  seq_lens: jax.Array
  prompt_lens: jax.Array
  done: jax.Array
  nan_rows: jax.Array
  rng: jax.Array

  @property
  def num_generated(self) -> jax.Array:
    return self.seq_lens - self.prompt_lens

  @property
  def last_tokens(self) -> jax.Array:
    """[B] each row's newest committed token."""
    return self.tokens[jnp.arange(self.tokens.shape[0]), self.seq_lens - 1]

  def generated(self, max_new_tokens: int) -> jax.Array:
    """[B, max_new_tokens] tokens after each prompt, PAD_ID beyond each row's end."""
    batch, width = self.tokens.shape
    offsets = jnp.arange(max_new_tokens)[None, :]
    picked = self.tokens[jnp.arange(batch)[:, None],
                         jnp.minimum(self.prompt_lens[:, None] + offsets, width - 1)]
    return jnp.where(offsets < self.num_generated[:, None], picked, PAD_ID)


def still_running(state, max_steps: int) -> jax.Array:
  """Whether `state.step` is below max_steps and some row of `state.seqs` is not done."""
  return (state.step < max_steps) & ~jnp.all(state.seqs.done)


def loop_until_done(state, step: Callable, max_steps: int):
  """The generation loop both decoders compile: `state = step(state)` in a
  `lax.while_loop` until every row of `state.seqs` is done or `state.step`
  reaches max_steps."""
  return jax.lax.while_loop(lambda state: still_running(state, max_steps), step, state)


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


def check_max_new_tokens(max_new_tokens: int) -> None:
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")


def required_capacity(config: LlamaConfig, prompt_width: int, max_new_tokens: int,
                      reserve: int = 0, cache_capacity: int | None = None,
                      padded_width: int | None = None) -> int:
  """Returns the cache capacity needed, or raises if it exceeds what is allowed.

  prompt_width is the longest real prompt, which bounds the positions used;
  padded_width, the width of the padded prompt buffer, only sizes the cache.
  """
  check_max_new_tokens(max_new_tokens)
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


def raise_on_nan(nan_rows: jax.Array, nan_arm: jax.Array | None = None,
                 arm_names: Sequence[str] = ()) -> None:
  """Raises FloatingPointError naming what produced NaN logits: the target, or the
  drafter of arm arm_names[nan_arm[row]] (as the user wrote the arm)."""
  nan_rows = np.asarray(nan_rows)
  nan_arm = np.full(nan_rows.shape, -1) if nan_arm is None else np.asarray(nan_arm)
  culprits = [(f"the drafter of arm {arm_names[arm]!r}", nan_rows & (nan_arm == arm))
              for arm in sorted(set(nan_arm[nan_rows].tolist()) - {-1})]
  culprits.append(("the target model", nan_rows & (nan_arm < 0)))
  found = [f"{who} produced NaN logits for rows {np.flatnonzero(rows).tolist()}"
           for who, rows in culprits if rows.any()]
  if found:
    raise FloatingPointError("; ".join(found) + "; those rows were stopped instead of sampled")
