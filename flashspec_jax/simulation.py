"""The `bandit_simulation` experiment: strategies on Bernoulli arms, their regret,
its bound, and recovery after a switch of the means.

Every seed is a `lax.scan` over T pulls, vmapped over seeds, so a strategy's
whole experiment is one compiled program. Regret is the pseudo-regret
sum_t (mu*_t - mu_{a_t}), with the means in force at step t.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from flashspec_jax import config as config_lib
from flashspec_jax import plots, results
from flashspec_jax.bandit import Strategy
from flashspec_jax.pipeline import strategy_for


@dataclasses.dataclass(frozen=True)
class BernoulliArms:
  """Arms paying 1 with probability `means[i]`, which become `means_after` from pull
  `switch_at` on, if given."""

  means: tuple[float, ...]
  means_after: tuple[float, ...] | None = None
  switch_at: int | None = None


def ucb1_regret_bound(means, horizon: int) -> float:
  """Auer, Cesa-Bianchi & Fischer (2002), Theorem 1:
  sum over suboptimal arms of 8 ln T / gap, plus (1 + pi^2 / 3) times the sum of gaps."""
  best = max(means)
  gaps = [best - m for m in means if m < best]
  return sum(8 * math.log(horizon) / g for g in gaps) + (1 + math.pi**2 / 3) * sum(gaps)


def simulate(strategy: Strategy, arms: BernoulliArms, horizon: int, seeds: int,
             seed: int = 0) -> dict[str, np.ndarray]:
  """Runs the strategy for `horizon` pulls, once per seed.

  Returns [seeds, T] arrays: arm pulled, reward drawn, and cumulative regret.
  """
  before = jnp.asarray(arms.means, jnp.float32)
  after = before if arms.means_after is None else jnp.asarray(arms.means_after, jnp.float32)
  switch = horizon if arms.switch_at is None else arms.switch_at

  def one_seed(key):
    def pull(state, t):
      select_key, reward_key = jax.random.split(jax.random.fold_in(key, t))
      current = jnp.where(t >= switch, after, before)
      arm = strategy.select(state, select_key)
      reward = jax.random.bernoulli(reward_key, current[arm]).astype(jnp.float32)
      return strategy.update(state, arm, reward), (arm, reward, current.max() - current[arm])

    _, (pulled, rewards, gaps) = jax.lax.scan(pull, strategy.init(len(arms.means)),
                                              jnp.arange(horizon))
    return pulled, rewards, jnp.cumsum(gaps)

  keys = jax.random.split(jax.random.key(seed), seeds)
  pulled, rewards, regret = jax.jit(jax.vmap(one_seed))(keys)
  return dict(arms=np.asarray(pulled), rewards=np.asarray(rewards), regret=np.asarray(regret))


def recovery_steps(arms: np.ndarray, best_after: int, switch_at: int, window: int = 200,
                   share: float = 0.5) -> np.ndarray:
  """Per seed, pulls after the switch until `best_after` holds more than `share` of a
  trailing window of pulls (by default: until it is pulled most); -1 if that never
  happens before the horizon."""
  hits = (arms[:, switch_at:] == best_after).astype(np.float64)
  cumulative = np.concatenate([np.zeros((len(hits), 1)), np.cumsum(hits, axis=1)], axis=1)
  trailing = (cumulative[:, window:] - cumulative[:, :-window]) / window  # ends at t >= window
  reached = trailing > share
  return np.where(reached.any(axis=1), reached.argmax(axis=1) + window, -1)


def run_simulation(config, env: dict) -> dict:
  """The `bandit_simulation` experiment kind: every strategy on the same Bernoulli arms."""
  sim = config.simulation
  means = config_lib.floats(sim.means)
  means_after = config_lib.floats(sim.means_after) or None
  switch_at = sim.switch_at if means_after else None
  bound = ucb1_regret_bound(means, sim.horizon) if not means_after else None
  summaries, curves = {}, {}
  for name in config_lib.split_list(sim.strategies):
    out = simulate(strategy_for(name, config), BernoulliArms(means, means_after, switch_at),
                   sim.horizon, sim.seeds, config.seed)
    final = out["regret"][:, -1]
    summary = dict(regret_mean=float(final.mean()), regret_std=float(final.std()),
                   regret_per_seed=final.tolist())
    if means_after:
      recovered = recovery_steps(out["arms"], int(np.argmax(means_after)), switch_at)
      summary |= dict(recovery_steps_mean=float(recovered[recovered >= 0].mean())
                      if (recovered >= 0).any() else None,
                      recovered_seeds=int((recovered >= 0).sum()),
                      recovery_steps_per_seed=recovered.tolist())
    summaries[name] = summary
    curves[name] = out["regret"]
  payload = dict(config=config.to_dict(), ucb1_bound=bound, summaries=summaries)
  records = [dict(strategy=name, seed=seed, regret=regret)
             for name, s in summaries.items() for seed, regret in enumerate(s["regret_per_seed"])]
  path = results.write(config.experiment, payload, records, directory=config.results_dir,
                       env=env)
  plots.regret_curves(curves, path.with_suffix(".png"),
                      title=f"Bernoulli arms {means}" + (f" -> {means_after}" if means_after
                                                         else ""),
                      bound=bound, switch_at=switch_at)
  print(f"\n{'strategy':<16} {'regret at T':>14} {'recovery':>10}")
  for name, s in summaries.items():
    recovery = s.get("recovery_steps_mean")
    print(f"{name:<16} {s['regret_mean']:>8.1f} ± {s['regret_std']:<5.1f}"
          f"{'' if recovery is None else f'{recovery:>10.0f}'}")
  if bound is not None:
    print(f"UCB1 bound (Auer et al. 2002) at T={sim.horizon}: {bound:.1f}")
  print(f"results: {path}")
  return dict(summaries=summaries, path=str(path))
