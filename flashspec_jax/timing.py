"""Timing on device and the bandwidth floor, measured in the same process.

Device work is asynchronous, so every timing blocks on the result. A program
that loops n times inside XLA is timed at two values of n and the difference
divided, which removes launch, dispatch and input-copy costs from per-step time.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from flashspec_jax.bandit import BanditState, EpsilonGreedy
from flashspec_jax.engine import SpecState, SpeculativeDecoder
from flashspec_jax.sampling import Sampler, Samplers


def wall_times(fn: Callable[[], Any], repeats: int, warmup: int = 2) -> list[float]:
  """Seconds per call of fn(), blocking on its result, after warm-up calls."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return times


def per_iteration(run: Callable[[int], Any], short: int, long: int, repeats: int) -> dict:
  """Seconds per loop iteration of run(n), from the medians at n=short and n=long."""
  short_times = wall_times(lambda: run(short), repeats)
  long_times = wall_times(lambda: run(long), repeats)
  seconds = (statistics.median(long_times) - statistics.median(short_times)) / (long - short)
  return dict(seconds=seconds, short=short, long=long, short_times=short_times,
              long_times=long_times)


def copy_bandwidth(num_bytes: int = 4 << 30, repeats: int = 20) -> dict:
  """Device memory bandwidth, counting bytes read plus bytes written, on random data.

  Two copies are timed: the runtime's device-to-device copy and an XLA
  elementwise pass. The faster sets `bytes_per_second`, the ceiling that floors
  are computed against.
  """
  x = jax.jit(lambda key: jax.random.uniform(key, (num_bytes // 2,)).astype(jnp.bfloat16))(
      jax.random.key(0))
  add_one = jax.jit(lambda a: a + jnp.bfloat16(1))
  methods = {
      "device_copy": lambda: jax.device_put(x, may_alias=False),
      "xla_elementwise": lambda: add_one(x),
  }
  measured = {}
  for name, fn in methods.items():
    times = wall_times(fn, repeats)
    measured[name] = dict(bytes_per_second=2 * x.nbytes / statistics.median(times), times=times)
  best = max(measured, key=lambda name: measured[name]["bytes_per_second"])
  return dict(bytes_per_second=measured[best]["bytes_per_second"], method=best,
              array_bytes=x.nbytes, methods=measured)


def per_step(step: Callable, params, state, steps: tuple[int, int], repeats: int) -> dict:
  """Seconds per call of step(params, state) -> state, run in a compiled loop from `state`."""
  @jax.jit
  def run_steps(params, state, num_steps):
    return jax.lax.fori_loop(0, num_steps, lambda _, s: step(params, s), state).seqs.seq_lens

  return per_iteration(lambda n: run_steps(params, state, jnp.int32(n)), *steps, repeats)


def held_on_first_arm(num_arms: int) -> BanditState:
  """A bandit state from which greedy, UCB1 and Thompson sampling choose arm 0 at
  every step.

  The choice is made at run time, unlike `Fixed(0)`, whose constant arm index
  XLA folds into a plain call of that arm's step: the dispatch over all the
  arms stays in the program. Every arm has a million pulls behind it, arm 0
  with mean reward 1 and the others 0, so no run's rewards move the means
  and UCB1's exploration bonus stays far below the gap.
  """
  pulls = 1e6
  return BanditState(counts=jnp.full((num_arms,), pulls),
                     sums=jnp.where(jnp.arange(num_arms) == 0, pulls, 0.0),
                     pulls=jnp.int32(pulls * num_arms))


def held_step_seconds(decoder: SpeculativeDecoder, params, prompts: tuple[jax.Array, jax.Array],
                      sampler: Sampler, steps: tuple[int, int], repeats: int
                      ) -> tuple[dict, SpecState]:
  """Seconds per `decoder.step` with the bandit held on arms[0] (`held_on_first_arm`),
  stepping on from the prompts (tokens [B, P], lengths [B]).

  The decoder is made to run that long: a greedy strategy, a budget and cache
  for `steps[1]` steps of its longest arm, no EOS. Returns the timing and the
  state after the prompts' prefill, which the loops start from (with one step body,
  its drafter settled as `run_steps` settles it, and the steps settled too).
  """
  tokens, lengths = prompts
  capacity = tokens.shape[1] + steps[1] * (decoder.max_gamma + 1) + decoder.max_gamma + 2
  decoder = dataclasses.replace(decoder, strategy=EpsilonGreedy(epsilon=0.0),
                                max_new_tokens=capacity, capacity=capacity, eos_ids=())
  state = jax.jit(decoder.init)(params, tokens, lengths, jax.random.key(0), sampler,
                                held_on_first_arm(len(decoder.arms)))
  samplers = Samplers.same(sampler)
  body = decoder.lone_settling_body  # stepped as run_steps steps it
  if body is not None:
    state = jax.jit(lambda params, state: decoder.settle(params, state, body))(params, state)
  return per_step(lambda p, s: decoder.step(p, s, samplers, body is not None), params, state,
                  steps, repeats), state
