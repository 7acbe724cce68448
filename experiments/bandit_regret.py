"""Bandit regret on stationary Bernoulli arms (no model): means [0.3, 0.7, 0.5].

  python run.py --config=experiments/bandit_regret.py
  python run.py --config=experiments/bandit_regret.py:tiny     # CI-sized

UCB1, Thompson, discounted UCB and epsilon-greedy, T = 10,000 pulls, 20 seeds,
against the UCB1 bound of Auer et al. (2002), 555 at this T. Writes the
regret per strategy and a PNG of the regret curves to results/bandit_regret/.
Expected: about a minute on 2 CPU cores; UCB1, Thompson and epsilon-greedy
below the bound, discounted UCB above it (it keeps exploring by design).
"""

from flashspec_jax.config import base_config, is_tiny


def get_config(arg=None):
  config = base_config()
  config.experiment = "bandit_regret"
  config.kind = "bandit_simulation"
  config.simulation.means = "0.3,0.7,0.5"
  config.simulation.horizon = 10_000
  config.simulation.seeds = 20
  if is_tiny(arg):
    config.experiment = "bandit_regret_tiny"
    config.simulation.horizon, config.simulation.seeds = 500, 2
  return config
