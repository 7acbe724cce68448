"""AR, every fixed drafter and every bandit on the same held-out prompts, in one run.

  python run.py --config=experiments/baselines.py
  python run.py --config=experiments/baselines.py:tiny   # CPU-sized, synthetic tiny shapes

SmolLM2-135M-Instruct, greedy, gamma 4, 128 new tokens, two prompts of each
set from the held-out split (never used for tuning). Methods: AR, n-gram,
layer-skip at 20 and 26 layers, and UCB1, Thompson and discounted UCB over
those arms with goodput rewards. Writes results/baselines/. Expected: about
40 minutes on 2 CPU cores.
"""

from flashspec_jax.config import base_config, is_tiny, make_tiny


def get_config(arg=None):
  config = base_config()
  config.experiment = "baselines"
  config.arms = "ngram:3,layer_skip:20,layer_skip:26,ar"
  config.methods = ("ar,ngram:3,layer_skip:20,layer_skip:26,"
                    "bandit:ucb1,bandit:thompson,bandit:discounted_ucb")
  config.prompts.split = "heldout"
  config.prompts.num_per_set = 2
  config.sampling.max_new_tokens = 128
  config.print_text = False
  if is_tiny(arg):
    make_tiny(config, synthetic=True)
    config.arms = "ngram:3,layer_skip:2,ar"
    config.methods = "ar,ngram:3,layer_skip:2,bandit:thompson"
  return config
