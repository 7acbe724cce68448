"""Bandit strategies against plain-Python implementations, and their regret."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from flashspec_jax.bandit import (Cycle, DiscountedUCB, EpsilonGreedy, Fixed, Oracle, Thompson,
                                  UCB1, initial_state, make_strategy, sample_beta)
from flashspec_jax.simulation import BernoulliArms, recovery_steps, simulate, ucb1_regret_bound


class PyBandit:
  """Plain-Python counts and sums, discounted by `discount` at every pull."""

  def __init__(self, num_arms, discount=1.0):
    self.counts, self.sums, self.discount = [0.0] * num_arms, [0.0] * num_arms, discount

  def update(self, arm, reward):
    for i in range(len(self.counts)):
      self.counts[i] *= self.discount
      self.sums[i] *= self.discount
    self.counts[arm] += 1
    self.sums[arm] += reward

  def unpulled(self):
    return next((i for i, n in enumerate(self.counts) if n == 0), None)

  def mean(self, i):
    return self.sums[i] / self.counts[i]

  @staticmethod
  def argmax(values):
    return max(range(len(values)), key=lambda i: (values[i], -i))


class PyUCB1(PyBandit):

  def select(self, draws):
    if self.unpulled() is not None:
      return self.unpulled()
    t = sum(self.counts)
    return self.argmax([self.mean(i) + math.sqrt(2 * math.log(t) / n)
                        for i, n in enumerate(self.counts)])


class PyDiscountedUCB(PyUCB1):
  pass  # the same rule, on discounted counts: ln of their sum, not of the step


class PyThompson(PyBandit):

  def select(self, draws):  # draws: one posterior sample per arm
    if self.unpulled() is not None:
      return self.unpulled()
    return self.argmax(list(draws))


class PyEpsilonGreedy(PyBandit):

  def __init__(self, num_arms, epsilon):
    super().__init__(num_arms)
    self.epsilon = epsilon

  def select(self, draws):
    u, random_arm = draws
    if u < self.epsilon:
      return int(random_arm)
    if self.unpulled() is not None:
      return self.unpulled()
    return self.argmax([self.mean(i) for i in range(len(self.counts))])


MEANS = (0.3, 0.7, 0.5, 0.45)
PAIRS = {
    "ucb1": (UCB1(), lambda: PyUCB1(4)),
    "thompson": (Thompson(), lambda: PyThompson(4)),
    "discounted_ucb": (DiscountedUCB(0.95), lambda: PyDiscountedUCB(4, 0.95)),
    "epsilon_greedy": (EpsilonGreedy(0.2), lambda: PyEpsilonGreedy(4, 0.2)),
}


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_strategy_matches_python_reference(name):
  strategy, make_reference = PAIRS[name]
  reference = make_reference()
  state = strategy.init(len(MEANS))
  select, update = jax.jit(strategy.select), jax.jit(strategy.update)
  rng = np.random.default_rng(0)
  for t in range(300):
    key = jax.random.fold_in(jax.random.key(1), t)
    draws = jax.tree.map(np.asarray, strategy.draw(state, key))
    arm = int(select(state, key))
    assert arm == reference.select(draws), f"step {t}"
    # Fractional rewards: the strategies take any reward in [0, 1].
    reward = float(rng.random() < MEANS[arm]) * 0.5 + 0.5 * rng.random()
    state = update(state, arm, reward)
    reference.update(arm, reward)
  np.testing.assert_allclose(state.counts, reference.counts, rtol=1e-5)
  np.testing.assert_allclose(state.sums, reference.sums, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["ucb1", "thompson", "discounted_ucb"])
def test_unpulled_arms_go_first(name):
  strategy = make_strategy(name)
  state = strategy.init(5)
  for expected in range(5):
    arm = int(strategy.select(state, jax.random.key(expected)))
    assert arm == expected
    state = strategy.update(state, arm, 0.0 if arm else 1.0)


def test_fixed_and_oracle():
  assert int(Fixed(2).select(Fixed(2).init(3), jax.random.key(0))) == 2
  oracle = Oracle(means=(0.1, 0.9, 0.5), means_after=(0.8, 0.1, 0.5), switch_at=10)
  state = oracle.init(3)
  assert int(oracle.select(state, jax.random.key(0))) == 1
  state = state.replace(pulls=jnp.int32(10))
  assert int(oracle.select(state, jax.random.key(0))) == 0


def test_bad_strategy_settings_are_rejected():
  with pytest.raises(ValueError, match="unknown bandit strategy 'ucb2'"):
    make_strategy("ucb2")
  with pytest.raises(ValueError, match="discount must be in \\(0, 1\\]"):
    DiscountedUCB(1.5)
  with pytest.raises(ValueError, match="epsilon must be in \\[0, 1\\]"):
    EpsilonGreedy(-0.1)


def test_ucb1_regret_bound_value():
  # 8 ln(10^4) (1/0.4 + 1/0.2) + (1 + pi^2/3)(0.4 + 0.2)
  assert ucb1_regret_bound((0.3, 0.7, 0.5), 10_000) == pytest.approx(555.2, abs=0.1)


def test_ucb1_and_thompson_stay_under_the_ucb1_bound():
  horizon, means = 3000, (0.3, 0.7, 0.5)
  bound = ucb1_regret_bound(means, horizon)
  for strategy in (UCB1(), Thompson()):
    regret = simulate(strategy, BernoulliArms(means), horizon, seeds=8)["regret"]
    assert regret[:, -1].mean() < bound, strategy
    # Logarithmic, not linear: the second half adds much less regret than the first.
    assert (regret[:, -1] - regret[:, horizon // 2]).mean() < 0.5 * regret[:, horizon // 2].mean()
  oracle = simulate(Oracle(means), BernoulliArms(means), horizon, seeds=2)["regret"]
  assert (oracle == 0).all()


def test_discounted_ucb_tracks_the_new_best_arm():
  out = simulate(DiscountedUCB(0.995), BernoulliArms((0.2, 0.8), (0.8, 0.2), switch_at=2000),
                 horizon=4000, seeds=6)
  assert (out["arms"][:, 3000:] == 0).mean() > 0.7
  recovered = recovery_steps(out["arms"], best_after=0, switch_at=2000)
  assert (recovered > 0).all()


def test_recovery_steps_counts_from_the_switch():
  arms = np.zeros((2, 1000), np.int32)
  arms[0, 500 + 50:] = 1  # switches to arm 1 fifty steps after the switch
  recovered = recovery_steps(arms, best_after=1, switch_at=500, window=100, share=0.9)
  assert recovered[0] == 50 + 91 and recovered[1] == -1  # 91 of the last 100 pulls
  assert recovery_steps(arms, best_after=1, switch_at=500, window=100)[0] == 50 + 51


def test_cycle_pulls_the_arms_in_turn_whatever_they_earn():
  strategy, state, chosen = Cycle(every=2), initial_state(3), []
  for reward in (1.0, 0.0, 0.0, 1.0, 0.5, 0.0, 1.0):
    arm = strategy.select(state, jax.random.key(0))
    chosen.append(int(arm))
    state = strategy.update(state, arm, reward)
  assert chosen == [0, 0, 1, 1, 2, 2, 0]


def beta_draws(sampler, a, b, n=20_000):
  keys = jax.random.split(jax.random.key(7), n)
  return np.asarray(jax.vmap(lambda k: sampler(k, jnp.float32(a), jnp.float32(b)))(keys))


@pytest.mark.parametrize("a, b", [(1.0, 1.0), (0.3, 2.0), (5.0, 40.0), (300.0, 20.0)])
def test_loop_free_beta_draws_follow_the_beta_distribution(a, b):
  """Kolmogorov-Smirnov against scipy's Beta; lowered for a GPU, the sampler holds no loop
  (on the CPU JAX lowers threefry's rounds to one, on a GPU it unrolls them)."""
  assert stats.kstest(beta_draws(sample_beta, a, b), stats.beta(a, b).cdf).pvalue > 1e-3

  def lowered_for_a_gpu(sampler):
    return jax.jit(sampler).trace(jax.random.key(0), jnp.ones(3), jnp.ones(3)).lower(
        lowering_platforms=("cuda",)).as_text()
  assert "while" not in lowered_for_a_gpu(sample_beta)
  assert "while" in lowered_for_a_gpu(jax.random.beta)  # what it replaces


@pytest.mark.parametrize("a, b", [(1.0, 1.0), (1.0, 3.0)])
def test_the_beta_test_rejects_proposals_taken_unchecked(a, b):
  """The test above, on Marsaglia and Tsang's proposals without their acceptance test."""
  def gamma(key, shape):
    proposal_key, boost_key = jax.random.split(key)
    d = shape + (shape < 1) - 1 / 3
    draw = d * jnp.maximum(1 + jax.random.normal(proposal_key) / jnp.sqrt(9 * d), 1e-3) ** 3
    return jnp.where(shape < 1, draw * jax.random.uniform(boost_key) ** (1 / shape), draw)

  def unchecked(key, a, b):
    x, y = gamma(jax.random.fold_in(key, 0), a), gamma(jax.random.fold_in(key, 1), b)
    return x / (x + y)
  assert stats.kstest(beta_draws(unchecked, a, b), stats.beta(a, b).cdf).pvalue < 1e-6
