"""Multi-armed bandits over drafters, as pure functions on a pytree state.

Every strategy is a frozen dataclass (static under jit) with three pure
functions: `init(num_arms) -> state`, `select(state, key) -> arm` and
`update(state, arm, reward) -> state`, with rewards in [0, 1]. Arms never
pulled are selected first, lowest index first, by every learning strategy.
`select` is `choose(state, draw(state, key))`: the random numbers a strategy
uses are drawn apart from the rule that uses them, so the rule can be checked
against a plain-Python implementation fed the same numbers.

| strategy        | rule                                                                   |
|-----------------|------------------------------------------------------------------------|
| UCB1            | argmax mean_i + sqrt(2 ln t / n_i) (Auer, Cesa-Bianchi, Fischer 2002)  |
| Thompson        | a Beta(1 + S_i, 1 + N_i - S_i) posterior per arm, sampled each step;   |
|                 | a reward r in [0, 1] adds r to S_i (fractional Beta updates, exact for |
|                 | Bernoulli rewards; no extra randomness at update time)                 |
| DiscountedUCB   | UCB on counts and sums discounted by `discount` each pull (Garivier &  |
|                 | Moulines 2011): old evidence fades, so it tracks a moving best arm      |
| EpsilonGreedy   | best mean, or a uniform arm with probability epsilon                    |
| Fixed           | always `arm`                                                            |
| Oracle          | the arm with the best true mean, given for simulations                  |

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
    sums: [K] f32, summed rewards per arm (discounted likewise).
    pulls: [] int32, total pulls so far.
  """

  counts: jax.Array
  sums: jax.Array
  pulls: jax.Array

  @property
  def num_arms(self) -> int:
    return self.counts.shape[0]

  @property
  def means(self) -> jax.Array:
    return self.sums / jnp.maximum(self.counts, 1e-9)


def initial_state(num_arms: int) -> BanditState:
  return BanditState(counts=jnp.zeros((num_arms,), jnp.float32),
                     sums=jnp.zeros((num_arms,), jnp.float32), pulls=jnp.zeros((), jnp.int32))


def _record(state: BanditState, arm, reward, discount: float = 1.0) -> BanditState:
  chosen = jnp.arange(state.num_arms) == arm
  return dataclasses.replace(
      state, counts=discount * state.counts + chosen, sums=discount * state.sums + chosen * reward,
      pulls=state.pulls + 1)


# Proposals per Gamma draw in `sample_beta`: Marsaglia and Tsang's test accepts each
# with probability above 0.95 at shape >= 1, so all eight fail about once in 4e10 draws.
_GAMMA_PROPOSALS = 8


def _gamma(key: jax.Array, shape: jax.Array) -> jax.Array:
  """Gamma(shape) draws, shape > 0, by Marsaglia and Tsang's method with a fixed number
  of proposals; Gamma(a) = Gamma(a + 1) U^(1/a) for a < 1. If every proposal fails,
  the draw is the proposal's centre d.

  One draw of uniforms gives the proposals' normals (by the inverse error function, as
  jax.random.normal makes them), their tests and the boost: in the decode step each
  draw of its own is random-number work of its own (bench/step_kernels.py)."""
  d = shape + (shape < 1) - 1 / 3
  c = 1 / jnp.sqrt(9 * d)
  u = jax.random.uniform(key, (2 * _GAMMA_PROPOSALS + 1, *shape.shape),
                         minval=jnp.finfo(jnp.float32).tiny)
  x = jnp.sqrt(2.0) * jax.lax.erf_inv(jnp.maximum(2 * u[:_GAMMA_PROPOSALS] - 1,
                                                  jnp.nextafter(-1.0, 0.0)))
  test, boost = u[_GAMMA_PROPOSALS:-1], u[-1]
  v = (1 + c * x) ** 3
  accepted = (v > 0) & (jnp.log(test) < x**2 / 2 + d - d * v
                        + d * jnp.log(jnp.maximum(v, 1e-30)))
  first = jnp.argmax(accepted, axis=0)
  draw = jnp.where(accepted.any(axis=0),
                   d * jnp.take_along_axis(v, first[None], axis=0)[0], d)
  return jnp.where(shape < 1, draw * boost ** (1 / shape), draw)


def sample_beta(key: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
  """Beta(a, b) draws as X / (X + Y), X ~ Gamma(a), Y ~ Gamma(b), without loops, both
  Gammas from one draw of uniforms.

  jax.random.beta draws its Gammas in rejection loops, and on a GPU each turn of a
  loop inside the decode step waits for the host to test its condition. In the H200
  streams acceptance Thompson's steps cost 0.67-0.87 ms beyond its arm mix, against
  0.35-0.68 ms for Hedge, which chose much the same arms without a loop
  (streams.step_costs).
  """
  a, b = jnp.broadcast_arrays(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
  x, y = _gamma(key, jnp.stack([a, b]))
  return x / (x + y)


def _unpulled_first(state: BanditState, scores: jax.Array) -> jax.Array:
  """argmax of scores, except that an arm never pulled wins (the lowest such index)."""
  unpulled = state.counts == 0
  return jnp.where(unpulled.any(), jnp.argmax(unpulled), jnp.argmax(scores)).astype(jnp.int32)


@struct.dataclass(kw_only=True)
class Feedback:
  """What one engine step teaches a strategy.

  Attributes:
    reward: [] f32 in [0, 1], the step's reward for the arm that ran.
    accepted: [K, C] f32, drafts accepted, summed over the step's live rows, for the
      arm that ran and for arms the engine scored for free against the committed
      tokens (see acceptance.py), in the context each row was in (C = the
      strategy's num_contexts); 0 for the others.
    tested: [K, C] f32, drafts tested likewise.
    rows: [] f32, the step's live rows.
  """

  reward: jax.Array
  accepted: jax.Array
  tested: jax.Array
  rows: jax.Array


class Strategy(Protocol):

  def init(self, num_arms: int) -> BanditState: ...

  # Contexts per arm the strategy tells apart (Drafter.num_contexts); 1 for all but the
  # contextual acceptance choosers.
  num_contexts: int

  def select(self, state: BanditState, key: jax.Array,
             weights: jax.Array | None = None) -> jax.Array:
    """The next arm; weights [K, num_contexts]: the rows in each arm's contexts now."""

  def learn(self, state: BanditState, arm, feedback: Feedback) -> BanditState:
    """The state after the engine's step with `arm`."""

  def bind(self, arms) -> Strategy:
    """The strategy for these engine arms (their gammas, costs and drafters)."""


class _RunningMeans:
  """Shared plumbing: each arm's pulls and running mean reward, and select =
  choose(draw). Fixed and Oracle choose without the means but keep them for the
  reports, which read pulls and means from every strategy's state. They learn
  from the step's reward alone."""

  uses_free_feedback = False
  num_contexts = 1

  def init(self, num_arms):
    return initial_state(num_arms)

  def bind(self, arms):
    del arms
    return self

  def update(self, state, arm, reward):
    return _record(state, arm, reward)

  def learn(self, state, arm, feedback):
    return self.update(state, arm, feedback.reward)

  def draw(self, state, key):
    """The random numbers `choose` uses (none for deterministic strategies)."""
    del state, key
    return None

  def select(self, state, key, weights=None):
    del weights  # one context per arm
    return self.choose(state, self.draw(state, key))


@dataclasses.dataclass(frozen=True)
class UCB1(_RunningMeans):
  exploration: float = 2.0  # the 2 in sqrt(2 ln t / n)

  def choose(self, state, draws):
    del draws
    bonus = jnp.sqrt(self.exploration * jnp.log(jnp.maximum(state.pulls, 1))
                     / jnp.maximum(state.counts, 1e-9))
    return _unpulled_first(state, state.means + bonus)


@dataclasses.dataclass(frozen=True)
class Thompson(_RunningMeans):

  def draw(self, state, key):
    """[K] samples from each arm's Beta posterior."""
    return sample_beta(key, 1 + state.sums, 1 + state.counts - state.sums)

  def choose(self, state, draws):
    return _unpulled_first(state, draws)


@dataclasses.dataclass(frozen=True)
class DiscountedUCB(_RunningMeans):
  discount: float = 0.995  # evidence fades over about 1 / (1 - discount) = 200 pulls
  exploration: float = 2.0

  def __post_init__(self):
    if not 0 < self.discount <= 1:
      raise ValueError(f"discount must be in (0, 1], got {self.discount}")

  def choose(self, state, draws):
    del draws
    total = jnp.maximum(state.counts.sum(), 1.0)
    bonus = jnp.sqrt(self.exploration * jnp.log(jnp.maximum(total, 1.0))
                     / jnp.maximum(state.counts, 1e-9))
    return _unpulled_first(state, state.means + bonus)

  def update(self, state, arm, reward):
    return _record(state, arm, reward, self.discount)


@dataclasses.dataclass(frozen=True)
class EpsilonGreedy(_RunningMeans):
  epsilon: float = 0.1

  def __post_init__(self):
    if not 0 <= self.epsilon <= 1:
      raise ValueError(f"epsilon must be in [0, 1], got {self.epsilon}")

  def draw(self, state, key):
    """(u, arm): explore when u < epsilon, then with that uniformly drawn arm."""
    explore_key, arm_key = jax.random.split(key)
    return jax.random.uniform(explore_key), jax.random.randint(arm_key, (), 0, state.num_arms)

  def choose(self, state, draws):
    u, random_arm = draws
    return jnp.where(u < self.epsilon, random_arm,
                     _unpulled_first(state, state.means)).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Fixed(_RunningMeans):
  arm: int = 0

  def bind(self, arms):
    if not 0 <= self.arm < len(arms):
      raise ValueError(f"Fixed({self.arm}) names no arm of {len(arms)}")
    return self

  def choose(self, state, draws):
    del state, draws
    return jnp.int32(self.arm)


@dataclasses.dataclass(frozen=True)
class Cycle(_RunningMeans):
  """Pulls the arms in turn, `every` steps each, whatever they earn: a fixed schedule
  of switches, to time what moving between arms costs (bench/bandit_call.py)."""

  every: int = 1

  def choose(self, state, draws):
    del draws
    return (state.pulls // self.every % state.num_arms).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Oracle(_RunningMeans):
  """Knows the true mean of each arm; after `switch_at` pulls, `means_after` apply."""

  means: tuple[float, ...]
  means_after: tuple[float, ...] | None = None
  switch_at: int | None = None

  def bind(self, arms):
    if len(self.means) != len(arms):
      raise ValueError(f"Oracle has {len(self.means)} means for {len(arms)} arms")
    return self

  def choose(self, state, draws):
    del draws
    means = jnp.asarray(self.means)
    if self.means_after is not None:
      means = jnp.where(state.pulls >= self.switch_at, jnp.asarray(self.means_after), means)
    return jnp.argmax(means).astype(jnp.int32)


STRATEGIES = {"ucb1": UCB1, "thompson": Thompson, "discounted_ucb": DiscountedUCB,
              "epsilon_greedy": EpsilonGreedy, "fixed": Fixed}
