"""Bandit regret when the best arm changes half way (no model).

  python run.py --config=experiments/bandit_switching.py
  python run.py --config=experiments/bandit_switching.py:tiny     # CI-sized

Bernoulli means [0.3, 0.7, 0.5] for 5,000 pulls, then [0.7, 0.3, 0.5]; 20
seeds. Reports regret and recovery time: the pulls after the switch until the
new best arm holds 90% of a trailing window of 200. Writes
results/bandit_switching/ with a PNG. Expected: about a minute on 2 CPU cores;
discounted UCB recovers in a few hundred pulls, UCB1 and Thompson far later.
"""

from flashspec_jax.config import base_config


def get_config(arg=None):
  config = base_config()
  config.experiment = "bandit_switching"
  config.kind = "bandit_simulation"
  config.simulation.means = "0.3,0.7,0.5"
  config.simulation.means_after = "0.7,0.3,0.5"
  config.simulation.horizon = 10_000
  config.simulation.switch_at = 5_000
  config.simulation.seeds = 20
  if arg == "tiny":
    config.experiment = "bandit_switching_tiny"
    config.simulation.horizon, config.simulation.switch_at, config.simulation.seeds = 1000, 500, 2
  elif arg is not None:
    raise ValueError(f"unknown argument {arg!r}; use ':tiny' or nothing")
  return config
