"""Multi-armed bandits over drafters, as pure functions on a pytree state.

Every strategy is a frozen dataclass (static under jit) with three pure
functions: `init(num_arms) -> state`, `select(state, key) -> arm` and
`update(state, arm, reward) -> state`, with rewards in [0, 1]. Arms never
pulled are selected first, lowest index first, by every learning strategy.

| strategy        | rule                                                                   |
|-----------------|------------------------------------------------------------------------|
| UCB1            | argmax mean_i + sqrt(2 ln t / n_i) (Auer, Cesa-Bianchi, Fischer 2002)  |
| Thompson        | Beta(1 + s_i, 1 + f_i) posterior per arm; a reward r counts as a success |
|                 | with probability r (the Bernoulli trick, Agrawal & Goyal 2012), which  |
|                 | keeps the Bernoulli regret guarantee for any reward in [0, 1]          |
| DiscountedUCB   | UCB on counts and sums discounted by `discount` each pull (Garivier &  |
|                 | Moulines 2011): old evidence fades, so it tracks a moving best arm      |
| EpsilonGreedy   | best mean, or a uniform arm with probability epsilon                    |
| Fixed           | always `arm`                                                            |
| Oracle          | the arm with the best true mean, given for simulations                  |

The Bernoulli trick needs randomness at update time; the state carries its own
PRNG key for it, so `update` stays a pure function of (state, arm, reward).
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass(kw_only=True)
class BanditState:
  """Attributes:
    counts: [K] f32, pulls per arm (discounted for DiscountedUCB).
    sums: [K] f32, summed rewards per arm (discounted likewise; successes for Thompson).
    pulls: [] int32, total pulls so far.
    key: PRNG key for randomness inside `update`.
  """

  counts: jax.Array
  sums: jax.Array
  pulls: jax.Array
  key: jax.Array

  @property
  def num_arms(self) -> int:
    return self.counts.shape[0]

  @property
  def means(self) -> jax.Array:
    return self.sums / jnp.maximum(self.counts, 1e-9)


def initial_state(num_arms: int, key: jax.Array | None = None) -> BanditState:
  return BanditState(counts=jnp.zeros((num_arms,), jnp.float32),
                     sums=jnp.zeros((num_arms,), jnp.float32), pulls=jnp.zeros((), jnp.int32),
                     key=jax.random.key(0) if key is None else key)


def _record(state: BanditState, arm, reward, discount: float = 1.0) -> BanditState:
  chosen = jnp.arange(state.num_arms) == arm
  return dataclasses.replace(
      state, counts=discount * state.counts + chosen, sums=discount * state.sums + chosen * reward,
      pulls=state.pulls + 1)


def _unpulled_first(state: BanditState, scores: jax.Array) -> jax.Array:
  """argmax of scores, except that an arm never pulled wins (the lowest such index)."""
  unpulled = state.counts == 0
  return jnp.where(unpulled.any(), jnp.argmax(unpulled), jnp.argmax(scores)).astype(jnp.int32)


class Strategy(Protocol):

  def init(self, num_arms: int, key: jax.Array | None = None) -> BanditState: ...

  def select(self, state: BanditState, key: jax.Array) -> jax.Array: ...

  def update(self, state: BanditState, arm, reward) -> BanditState: ...


class _Learner:

  def init(self, num_arms, key=None):
    return initial_state(num_arms, key)

  def update(self, state, arm, reward):
    return _record(state, arm, reward)


@dataclasses.dataclass(frozen=True)
class UCB1(_Learner):
  exploration: float = 2.0  # the 2 in sqrt(2 ln t / n)

  def select(self, state, key):
    del key
    bonus = jnp.sqrt(self.exploration * jnp.log(jnp.maximum(state.pulls, 1))
                     / jnp.maximum(state.counts, 1e-9))
    return _unpulled_first(state, state.means + bonus)


@dataclasses.dataclass(frozen=True)
class Thompson(_Learner):

  def select(self, state, key):
    samples = jax.random.beta(key, 1 + state.sums, 1 + state.counts - state.sums)
    return _unpulled_first(state, samples)

  def update(self, state, arm, reward):
    key, coin = jax.random.split(state.key)
    success = jax.random.uniform(coin) < reward
    return dataclasses.replace(_record(state, arm, success.astype(jnp.float32)), key=key)


@dataclasses.dataclass(frozen=True)
class DiscountedUCB(_Learner):
  discount: float = 0.99
  exploration: float = 2.0

  def __post_init__(self):
    if not 0 < self.discount <= 1:
      raise ValueError(f"discount must be in (0, 1], got {self.discount}")

  def select(self, state, key):
    del key
    total = jnp.maximum(state.counts.sum(), 1.0)
    bonus = jnp.sqrt(self.exploration * jnp.log(jnp.maximum(total, 1.0))
                     / jnp.maximum(state.counts, 1e-9))
    return _unpulled_first(state, state.means + bonus)

  def update(self, state, arm, reward):
    return _record(state, arm, reward, self.discount)


@dataclasses.dataclass(frozen=True)
class EpsilonGreedy(_Learner):
  epsilon: float = 0.1

  def __post_init__(self):
    if not 0 <= self.epsilon <= 1:
      raise ValueError(f"epsilon must be in [0, 1], got {self.epsilon}")

  def select(self, state, key):
    explore_key, arm_key = jax.random.split(key)
    explore = jax.random.uniform(explore_key) < self.epsilon
    random_arm = jax.random.randint(arm_key, (), 0, state.num_arms)
    return jnp.where(explore, random_arm, _unpulled_first(state, state.means)).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Fixed(_Learner):
  arm: int = 0

  def select(self, state, key):
    del state, key
    return jnp.int32(self.arm)


@dataclasses.dataclass(frozen=True)
class Oracle(_Learner):
  """Knows the true mean of each arm; after `switch_at` pulls, `means_after` apply."""

  means: tuple[float, ...]
  means_after: tuple[float, ...] | None = None
  switch_at: int | None = None

  def select(self, state, key):
    del key
    means = jnp.asarray(self.means)
    if self.means_after is not None:
      means = jnp.where(state.pulls >= self.switch_at, jnp.asarray(self.means_after), means)
    return jnp.argmax(means).astype(jnp.int32)


STRATEGIES = {"ucb1": UCB1, "thompson": Thompson, "discounted_ucb": DiscountedUCB,
              "epsilon_greedy": EpsilonGreedy, "fixed": Fixed}


def make_strategy(name: str, **kwargs) -> Strategy:
  if name not in STRATEGIES:
    raise ValueError(f"unknown bandit strategy {name!r}; known: {sorted(STRATEGIES)}")
  return STRATEGIES[name](**kwargs)
