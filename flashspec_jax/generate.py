"""Autoregressive generation as one XLA program.

A `Decoder` holds the static settings (model, budget, EOS ids, cache size)
and is jitted with itself static. `generate` compiles the prefill (`init`) and
a `lax.while_loop` over `step` into one executable with no host round trip per
token; `stream` drives the same `init` and `step` from Python, one token per
call. The speculative engine prefills through the same `init`.

Deterministic mode (`pass_width`) makes a row's logits independent of how many
tokens share its pass, so that greedy speculative decoding reproduces greedy AR
bit for bit: every pass after the prefill is `pass_width` tokens wide (a decode
step pads its one token), and the program is compiled with XLA's autotuning off
(`FIXED_KERNELS`), so that every program runs a product of a given shape with the
same kernel. docs/exactness.md gives the argument.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from flashspec_jax.models.llama import KVCache, Llama
from flashspec_jax.sampling import Sampler
from flashspec_jax.sequences import (Sequences, append_tokens, check_max_new_tokens,
                                     is_stop_token, loop_until_done, prepare_prompts,
                                     raise_on_nan, required_capacity)


# XLA options of deterministic mode: without autotuning, XLA picks each product's
# kernel by fixed rules rather than by timing it, so two programs (or two
# compiles) that run a product of one shape run the same kernel.
FIXED_KERNELS = {"xla_gpu_autotune_level": 0}


def model_pass(model: Llama, params, tokens: jax.Array, cache: KVCache,
               pass_width: int | None = None, **kwargs):
  """model.apply on tokens [B, T], padded to pass_width tokens when given; returns T rows.

  The pad tokens' keys and values land past every row's length, where nothing
  reads them before a later pass overwrites them (like rejected drafts'), and the
  cache's lengths grow by T. The logits pass an optimization barrier before the
  pad rows are cut, so that XLA cannot narrow the head's product to the rows
  kept: every row of every pass goes through the same kernels.
  """
  width = tokens.shape[1]
  if pass_width is None:
    return model.apply(params, tokens, cache, **kwargs)
  if pass_width < width:
    raise ValueError(f"a pass of {width} tokens does not fit the pass width {pass_width}")
  kwargs.setdefault("num_valid", jnp.full(tokens.shape[:1], width, jnp.int32))
  logits, cache, *features = model.apply(
      params, jnp.pad(tokens, ((0, 0), (0, pass_width - width))), cache, **kwargs)
  logits = jax.lax.optimization_barrier(logits)[:, :width]
  return (logits, cache, *(f[:, :width] for f in features))


def slots_past_budget(reserve: int, pass_width: int | None) -> int:
  """Token and cache slots past the budget: reserve, or in deterministic mode at least
  pass_width, which every decoder of one run shares, so that attention spans one cache
  width in every program."""
  return reserve if pass_width is None else max(reserve, pass_width)


@struct.dataclass(kw_only=True)
class DecodeState:
  """Everything the decode loop carries.

  Attributes:
    seqs: the token buffer and per-row bookkeeping; L = P + max_new_tokens + reserve.
    cache: the model's KV cache. It holds every token of a row but its last one,
      which is fed to the model at the next step (`cache.lengths == seq_lens - 1`).
    step: [] int32, decode steps taken.
  """

  seqs: Sequences
  cache: KVCache
  step: jax.Array


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

  def token_lists(self) -> list[list[int]]:
    """Each row's generated tokens, fetched in one transfer: indexing device arrays
    row by row dispatches an op per row, and compiles a slice per new length."""
    tokens, num_tokens = jax.device_get((self.tokens, self.num_tokens))
    return [row[:count].tolist() for row, count in zip(tokens, num_tokens)]


@dataclasses.dataclass(frozen=True)
class Decoder:
  """Plain autoregressive decoding; params, state and the sampler are passed in.

  Hashable, and jitted with itself static, so each distinct decoder compiles
  once per input shape. The sampler is a pytree argument: changing its
  temperature does not recompile.

  Attributes:
    model: the model.
    max_new_tokens: the budget per row.
    eos_ids: tokens that end a row; None is the model config's.
    capacity: KV cache slots, at least P + max_new_tokens + reserve; None is
      just enough for the prompts' width P.
    reserve: token and cache slots past the budget, for a speculative step
      that writes up to gamma + 1 tokens beyond it.
    pass_width: deterministic mode: every decode step is a pass this many
      tokens wide (see `model_pass`), as wide as the speculative decoder's
      verify passes it is compared with; None runs one-token steps.
  """

  model: Llama
  max_new_tokens: int
  eos_ids: tuple[int, ...] | None = None
  capacity: int | None = None
  reserve: int = 0
  pass_width: int | None = None

  def __post_init__(self):
    check_max_new_tokens(self.max_new_tokens)
    if self.pass_width is not None and self.pass_width < 1:
      raise ValueError(f"pass_width must be >= 1, got {self.pass_width}")

  @property
  def stop_ids(self) -> tuple[int, ...]:
    return self.model.config.eos_token_ids if self.eos_ids is None else self.eos_ids

  def cache_capacity(self, prompt_width: int) -> int:
    return self.capacity or prompt_width + self.max_new_tokens + self.slots_past_budget

  @property
  def slots_past_budget(self) -> int:
    return slots_past_budget(self.reserve, self.pass_width)

  def init(self, params, prompt_tokens, prompt_lens, rng, sampler: Sampler) -> DecodeState:
    """Runs the prompts through the model and samples each row's first token."""
    return self.prefill(params, prompt_tokens, prompt_lens, rng, sampler)[0]

  def prefill(self, params, prompt_tokens, prompt_lens, rng, sampler: Sampler,
              with_features: bool = False, feature_layers: tuple[int, ...] = ()
              ) -> tuple[DecodeState, jax.Array | None]:
    """`init`, also returning the model's features [B, P, D or F] of the prompts if asked
    (see Llama's return_features and feature_layers)."""
    batch, width = prompt_tokens.shape
    cache = KVCache.init(self.model.config, batch, self.cache_capacity(width),
                         dtype=self.model.param_dtype)
    logits, cache, *features = self.model.apply(
        params, prompt_tokens, cache, num_valid=prompt_lens, logits_index=prompt_lens - 1,
        return_features=with_features, feature_layers=feature_layers)
    rng, key = jax.random.split(rng)
    first = sampler.get_next_tokens(logits, key)
    nan_rows = jnp.isnan(logits).any(axis=-1)
    emits = jnp.where(nan_rows, 0, 1)
    tokens = jnp.zeros((batch, width + self.max_new_tokens + self.reserve), jnp.int32)
    tokens = append_tokens(tokens.at[:, :width].set(prompt_tokens), prompt_lens, first[:, None],
                           emits)
    done = nan_rows | is_stop_token(first, self.stop_ids) | (self.max_new_tokens <= 1)
    seqs = Sequences(tokens=tokens, seq_lens=prompt_lens + emits, prompt_lens=prompt_lens,
                     done=done, nan_rows=nan_rows, rng=rng)
    state = DecodeState(seqs=seqs, cache=cache, step=jnp.zeros((), jnp.int32))
    return state, (features[0] if features else None)

  def step(self, params, state: DecodeState, sampler: Sampler) -> DecodeState:
    """Feeds each row's last token and appends one sampled token to rows not yet done."""
    seqs = state.seqs
    active = ~seqs.done
    logits, cache = model_pass(self.model, params, seqs.last_tokens[:, None], state.cache,
                               self.pass_width, num_valid=active.astype(jnp.int32))
    logits = logits[:, 0]
    rng, key = jax.random.split(seqs.rng)
    nan_rows = active & jnp.isnan(logits).any(axis=-1)
    emits = active & ~nan_rows
    new = sampler.get_next_tokens(logits, key)
    seq_lens = seqs.seq_lens + emits
    done = (seqs.done | nan_rows | (emits & is_stop_token(new, self.stop_ids))
            | (seq_lens - seqs.prompt_lens >= self.max_new_tokens))
    seqs = seqs.replace(
        tokens=append_tokens(seqs.tokens, seqs.seq_lens, new[:, None], emits.astype(jnp.int32)),
        seq_lens=seq_lens, done=done, nan_rows=seqs.nan_rows | nan_rows, rng=rng)
    return DecodeState(seqs=seqs, cache=cache, step=state.step + 1)

  def generate(self, params, prompt_tokens, prompt_lens, rng,
               sampler: Sampler) -> GenerationOutput:
    """Prefill plus a `lax.while_loop` of decode steps, as one compiled program.

    Args:
      params: the model's params.
      prompt_tokens: [B, P] int32, right-padded.
      prompt_lens: [B] int32.
      rng: PRNG key.
      sampler: a pytree.
    """
    return self._program(self, params, prompt_tokens, prompt_lens, rng, sampler)

  def lower(self, *args) -> jax.stages.Lowered:
    """`generate`'s program for these arguments, lowered and ready to compile."""
    return self._program.lower(self, *args)

  @property
  def _program(self):
    return _generate if self.pass_width is None else _generate_fixed_kernels

  def checked(self, out: GenerationOutput) -> GenerationOutput:
    """`out`, once the host has seen no NaN rows in it.

    Raises:
      FloatingPointError: when a row's logits were NaN (the row was stopped, not sampled).
    """
    raise_on_nan(out.nan_rows)
    return out

  def prepare(self, prompts: Sequence[Sequence[int]]) -> tuple[jax.Array, jax.Array]:
    """([B, P] tokens, [B] lengths) for token-id prompts, checked on the host against
    the vocabulary, the cache and the model's positions."""
    tokens, lengths = prepare_prompts(prompts, self.model.config.vocab_size)
    required_capacity(self.model.config, tokens.shape[1], self.max_new_tokens,
                      reserve=self.reserve, cache_capacity=self.capacity)
    return jnp.asarray(tokens), jnp.asarray(lengths)


def _generate_body(decoder: Decoder, params, prompt_tokens, prompt_lens, rng,
                   sampler: Sampler) -> GenerationOutput:
  state = decoder.init(params, prompt_tokens, prompt_lens, rng, sampler)
  state = loop_until_done(state, lambda state: decoder.step(params, state, sampler),
                          decoder.max_new_tokens)
  return GenerationOutput(tokens=state.seqs.generated(decoder.max_new_tokens),
                          num_tokens=state.seqs.num_generated, nan_rows=state.seqs.nan_rows,
                          steps=state.step)


_generate = jax.jit(_generate_body, static_argnums=0)
_generate_fixed_kernels = jax.jit(_generate_body, static_argnums=0,
                                  compiler_options=FIXED_KERNELS)


def run_generate(params, decoder: Decoder, prompts: Sequence[Sequence[int]], rng,
                 sampler: Sampler) -> GenerationOutput:
  """Validates token-id prompts and the budget on the host, then runs `generate`.

  Raises:
    ValueError: on empty prompts, ids outside the vocabulary or a budget beyond the cache.
    FloatingPointError: when a row's logits were NaN (the row is stopped, not sampled).
  """
  return decoder.checked(decoder.generate(params, *decoder.prepare(prompts), rng, sampler))


def stream(params, decoder: Decoder, prompts: Sequence[Sequence[int]], rng,
           sampler: Sampler) -> Iterator[np.ndarray]:
  """Yields each row's newest token (or -1 once the row is done), one step at a time.

  Drives the same `init` and `step` as `generate` from Python, for streaming
  and debugging; each step costs a host round trip.
  """
  tokens, lengths = decoder.prepare(prompts)
  state = jax.jit(decoder.init)(params, tokens, lengths, rng, sampler)
  step = jax.jit(decoder.step)
  previous = np.asarray(lengths)
  while True:
    seq_lens = np.asarray(state.seqs.seq_lens)
    raise_on_nan(state.seqs.nan_rows)
    grew = seq_lens > previous
    newest = np.asarray(state.seqs.tokens)[np.arange(len(seq_lens)), seq_lens - 1]
    yield np.where(grew, newest, -1)
    previous = seq_lens
    if np.asarray(state.seqs.done).all():
      return
    state = step(params, state, sampler)
