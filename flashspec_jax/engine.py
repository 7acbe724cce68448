"""Exact speculative decoding as one XLA program.

`speculative_generate` is jitted whole: prefill, then a `lax.while_loop` whose
body (`speculative_step`) drafts gamma tokens, scores them with one target
forward of gamma + 1 tokens, verifies, appends and rolls both caches back by
a length update. Metrics accumulate on device in the loop state.

Per-row bookkeeping follows `generate`: prompts are right-padded, each row's
tokens continue right after its own prompt, and the target cache holds every
committed token but the last. Each row accepts its own number of drafts, and
emits at most its remaining budget, stopping at its first EOS, so what is
returned never overshoots max_new_tokens.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from flashspec_jax.drafters import ModelDrafter
from flashspec_jax.generate import (GenerationOutput, append_tokens, check_budget,
                                    generated_tokens, is_stop_token, prefill, prepare_prompts,
                                    raise_on_nan)
from flashspec_jax.kernels.verify import get_verify_fn
from flashspec_jax.models.llama import KVCache, Llama
from flashspec_jax.sampling import Sampler

# (target_logp [B, G+1, V], draft_logq [B, G, V], draft_tokens [B, G], seeds [B])
#   -> (num_accepted [B], next_token [B])
VerifyFn = Callable[..., tuple[jax.Array, jax.Array]]


@struct.dataclass(kw_only=True)
class SpecMetrics:
  """Device-side counters, per row.

  Attributes:
    steps: [B] int32, speculative steps the row took part in.
    proposed: [B] int32, draft tokens proposed (gamma per step).
    tested: [B] int32, drafts the accept test reached: n + 1 on a rejection, gamma if none.
    accepted: [B] int32, drafts accepted.
    emitted: [B] int32, tokens appended (accepted + the corrected or bonus token,
      less what EOS or the budget cut).
    accept_hist: [B, gamma + 1] int32, steps by number of drafts accepted.
  """

  steps: jax.Array
  proposed: jax.Array
  tested: jax.Array
  accepted: jax.Array
  emitted: jax.Array
  accept_hist: jax.Array

  @classmethod
  def zeros(cls, batch: int, gamma: int) -> SpecMetrics:
    z = jnp.zeros((batch,), jnp.int32)
    return cls(steps=z, proposed=z, tested=z, accepted=z, emitted=z,
               accept_hist=jnp.zeros((batch, gamma + 1), jnp.int32))


@struct.dataclass(kw_only=True)
class SpecState:
  """The speculative loop's carry.

  Attributes:
    tokens: [B, L] int32, prompt then committed tokens; L = P + max_new + gamma + 1.
    seq_lens: [B] int32, committed tokens per row.
    prompt_lens: [B] int32.
    target_cache: holds seq_lens - 1 tokens per row between steps.
    drafter_cache: holds at most seq_lens - 1 tokens per row between steps.
    done: [B] bool.
    nan_rows: [B] bool, rows stopped because target or draft logits were NaN.
    rng: PRNG key.
    step: [] int32, loop iterations.
    metrics: SpecMetrics.
  """

  tokens: jax.Array
  seq_lens: jax.Array
  prompt_lens: jax.Array
  target_cache: KVCache
  drafter_cache: Any
  done: jax.Array
  nan_rows: jax.Array
  rng: jax.Array
  step: jax.Array
  metrics: SpecMetrics


@struct.dataclass(kw_only=True)
class SpecOutput(GenerationOutput):
  """GenerationOutput plus the loop's metrics (see SpecMetrics)."""

  metrics: SpecMetrics


def emitted_counts(new_tokens, num_accepted, remaining, eos_ids):
  """Tokens each row keeps of new_tokens [B, G+1]: accepted + 1, cut after the first EOS
  and at the remaining budget."""
  width = new_tokens.shape[1]
  position = jnp.arange(width)[None, :]
  in_step = position <= num_accepted[:, None]
  stops = is_stop_token(new_tokens, eos_ids) & in_step
  first_stop = jnp.where(stops.any(axis=1), jnp.argmax(stops, axis=1), width)
  return jnp.minimum(jnp.minimum(num_accepted + 1, first_stop + 1), remaining)


def speculative_step(params, state: SpecState, *, target: Llama, drafter: ModelDrafter,
                     gamma: int, target_sampler: Sampler, draft_sampler: Sampler,
                     max_new_tokens: int, eos_ids: tuple[int, ...],
                     verify_fn: VerifyFn) -> SpecState:
  """Draft, verify with one target pass, append, roll back. Rows already done do not change."""
  batch = state.tokens.shape[0]
  active = ~state.done
  rng, draft_key, verify_key = jax.random.split(state.rng, 3)

  drafter_cache, draft_tokens, draft_logq = drafter.propose(
      params, state.drafter_cache, state.tokens, state.seq_lens, gamma, draft_sampler, draft_key)

  last = state.tokens[jnp.arange(batch), state.seq_lens - 1]
  scored = jnp.concatenate([last[:, None], draft_tokens], axis=1)  # [B, G+1]
  logits, target_cache = target.apply(params["target"], scored, state.target_cache)
  target_logp = target_sampler.log_probs(logits)  # [B, G+1, V]

  seeds = jax.random.bits(verify_key, (batch,), jnp.uint32)
  num_accepted, next_token = verify_fn(target_logp, draft_logq, draft_tokens, seeds)

  nan_rows = active & (jnp.isnan(logits).any(axis=(1, 2)) | jnp.isnan(draft_logq).any(axis=(1, 2)))
  live = active & ~nan_rows
  position = jnp.arange(gamma + 1)[None, :]
  new_tokens = jnp.where(position == num_accepted[:, None], next_token[:, None],
                         jnp.pad(draft_tokens, ((0, 0), (0, 1))))
  remaining = max_new_tokens - (state.seq_lens - state.prompt_lens)
  emitted = jnp.where(live, emitted_counts(new_tokens, num_accepted, remaining, eos_ids), 0)

  tokens = append_tokens(state.tokens, state.seq_lens, new_tokens, emitted)
  seq_lens = state.seq_lens + emitted
  target_cache = dataclasses.replace(target_cache, lengths=seq_lens - 1)
  drafter_cache = drafter.rollback(drafter_cache, seq_lens)

  emits_stop = (is_stop_token(new_tokens, eos_ids) & (position < emitted[:, None])).any(axis=1)
  done = (state.done | nan_rows | emits_stop
          | (seq_lens - state.prompt_lens >= max_new_tokens))

  m = state.metrics
  count = live.astype(jnp.int32)
  metrics = SpecMetrics(
      steps=m.steps + count,
      proposed=m.proposed + count * gamma,
      tested=m.tested + count * jnp.minimum(num_accepted + 1, gamma),
      accepted=m.accepted + count * num_accepted,
      emitted=m.emitted + emitted,
      accept_hist=m.accept_hist + count[:, None] * (position == num_accepted[:, None]),
  )
  return dataclasses.replace(
      state, tokens=tokens, seq_lens=seq_lens, target_cache=target_cache,
      drafter_cache=drafter_cache, done=done, nan_rows=state.nan_rows | nan_rows, rng=rng,
      step=state.step + 1, metrics=metrics)


def init_state(params, prompt_tokens, prompt_lens, rng, *, target: Llama, drafter: ModelDrafter,
               gamma: int, target_sampler: Sampler, max_new_tokens: int,
               eos_ids: tuple[int, ...], capacity: int) -> SpecState:
  """Prefills target and drafter; the target samples each row's first token."""
  ar = prefill(params["target"], prompt_tokens, prompt_lens, rng, model=target,
               sampler=target_sampler, max_new_tokens=max_new_tokens, eos_ids=eos_ids,
               capacity=capacity)
  # The AR state's buffer has no room for a step's gamma + 1 tokens past the budget.
  tokens = jnp.pad(ar.tokens, ((0, 0), (0, gamma + 1)))
  return SpecState(
      tokens=tokens, seq_lens=ar.seq_lens, prompt_lens=prompt_lens, target_cache=ar.cache,
      drafter_cache=drafter.init(params, prompt_tokens, prompt_lens, capacity),
      done=ar.done, nan_rows=ar.nan_rows, rng=ar.rng, step=jnp.zeros((), jnp.int32),
      metrics=SpecMetrics.zeros(prompt_tokens.shape[0], gamma))


@functools.partial(jax.jit, static_argnames=(
    "target", "drafter", "gamma", "max_new_tokens", "eos_ids", "capacity", "verify_fn"))
def speculative_generate(params, prompt_tokens, prompt_lens, rng, *, target: Llama,
                         drafter: ModelDrafter, gamma: int, target_sampler: Sampler,
                         draft_sampler: Sampler, max_new_tokens: int, eos_ids: tuple[int, ...],
                         capacity: int, verify_fn: VerifyFn | None = None) -> SpecOutput:
  """Speculative generation, compiled into one program.

  Args:
    params: {"target": target params, "drafters": {key: drafter params}}.
    prompt_tokens: [B, P] int32, right-padded.
    prompt_lens: [B] int32.
    rng: PRNG key.
    capacity: KV cache slots, at least P + max_new_tokens + gamma + 1.
    verify_fn: see kernels/verify.py; None is the Pallas kernel on a GPU and the
      jnp reference elsewhere.
  """
  verify_fn = verify_fn or get_verify_fn("auto")
  state = init_state(params, prompt_tokens, prompt_lens, rng, target=target, drafter=drafter,
                     gamma=gamma, target_sampler=target_sampler, max_new_tokens=max_new_tokens,
                     eos_ids=eos_ids, capacity=capacity)

  def should_continue(state: SpecState):
    return (state.step < max_new_tokens) & ~jnp.all(state.done)

  step = functools.partial(
      speculative_step, params, target=target, drafter=drafter, gamma=gamma,
      target_sampler=target_sampler, draft_sampler=draft_sampler, max_new_tokens=max_new_tokens,
      eos_ids=eos_ids, verify_fn=verify_fn)
  state = jax.lax.while_loop(should_continue, step, state)
  return SpecOutput(tokens=generated_tokens(state.tokens, state.prompt_lens, state.seq_lens,
                                            max_new_tokens),
                    num_tokens=state.seq_lens - state.prompt_lens, nan_rows=state.nan_rows,
                    steps=state.step, metrics=state.metrics)


def check_speculative_inputs(target: Llama, drafter: ModelDrafter, gamma: int) -> None:
  if drafter.vocab_size != target.config.vocab_size:
    raise ValueError(f"drafter vocabulary ({drafter.vocab_size}) differs from the target's "
                     f"({target.config.vocab_size}); speculative decoding needs one vocabulary")
  if gamma < 1:
    raise ValueError(f"gamma must be >= 1, got {gamma}")


def run_speculative(params, target: Llama, drafter: ModelDrafter,
                    prompts: Sequence[Sequence[int]], *, gamma: int, target_sampler: Sampler,
                    draft_sampler: Sampler | None = None, max_new_tokens: int, rng,
                    eos_ids: tuple[int, ...] | None = None, cache_capacity: int | None = None,
                    verify_fn: VerifyFn | None = None) -> SpecOutput:
  """Validates inputs, then runs `speculative_generate`.

  The drafter samples with draft_sampler (the target's by default); exactness
  holds for any drafter distribution.

  Raises:
    ValueError: on mismatched vocabularies, gamma < 1, or a budget the cache cannot hold.
    FloatingPointError: when a row's target or draft logits were NaN.
  """
  check_speculative_inputs(target, drafter, gamma)
  tokens, lengths = prepare_prompts(prompts, target.config.vocab_size)
  capacity = check_budget(target.config, tokens.shape[1], max_new_tokens, reserve=gamma + 1,
                          cache_capacity=cache_capacity)
  out = speculative_generate(
      params, jnp.asarray(tokens), jnp.asarray(lengths), rng, target=target, drafter=drafter,
      gamma=gamma, target_sampler=target_sampler, draft_sampler=draft_sampler or target_sampler,
      max_new_tokens=max_new_tokens,
      eos_ids=target.config.eos_token_ids if eos_ids is None else tuple(eos_ids),
      capacity=capacity, verify_fn=verify_fn)
  raise_on_nan(out.nan_rows)
  return out


def summarize(metrics: SpecMetrics) -> dict[str, Any]:
  """Host-side report of the device metrics, over all rows.

  alpha counts only the drafts the accept test reached (it stops at the first
  rejection); tau is tokens emitted per speculative step.
  """
  m = jax.tree.map(np.asarray, metrics)
  steps, tested = int(m.steps.sum()), int(m.tested.sum())
  hist = m.accept_hist.sum(axis=0)
  return {
      "steps": steps,
      "proposed": int(m.proposed.sum()),
      "tested": tested,
      "accepted": int(m.accepted.sum()),
      "emitted": int(m.emitted.sum()),
      "alpha": int(m.accepted.sum()) / tested if tested else float("nan"),
      "tau": int(m.emitted.sum()) / steps if steps else float("nan"),
      "mean_accepted": int(m.accepted.sum()) / steps if steps else float("nan"),
      "accept_hist": hist.tolist(),
  }
