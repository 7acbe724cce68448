"""Bandit regret when the best arm changes half way (no model).

  python run.py --config=experiments/bandit_switching.py
  python run.py --config=experiments/bandit_switching.py:tiny     # CI-sized

Bernoulli means [0.3, 0.7, 0.5] for 5,000 pulls, then [0.7, 0.3, 0.5]; 20
seeds. Reports regret and recovery time: the pulls after the switch until the
new best arm is pulled most in a trailing window of 200 pulls. Writes
results/bandit_switching/ with a PNG. Expected: about a minute on 2 CPU
cores; see the README for the measured regret and recovery of each strategy.
"""

from flashspec_jax.config import base_config, is_tiny


def get_config(arg=None):
  config = base_config()
  config.experiment = "bandit_switching"
  config.kind = "bandit_simulation"
  config.simulation.means = "0.3,0.7,0.5"
  config.simulation.means_after = "0.7,0.3,0.5"
  config.simulation.horizon = 10_000
  config.simulation.switch_at = 5_000
  config.simulation.seeds = 20
  if is_tiny(arg):
    config.experiment = "bandit_switching_tiny"
    config.simulation.horizon, config.simulation.switch_at, config.simulation.seeds = 1000, 500, 2
  return config
