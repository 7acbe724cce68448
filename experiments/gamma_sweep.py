"""Throughput and alpha against gamma in {1, 2, 4, 8, 16}: SmolLM2-135M, layer-skip and n-gram.

  python run.py --config=experiments/gamma_sweep.py
  python run.py --config=experiments/gamma_sweep.py:tiny   # CPU-sized, synthetic tiny shapes

A sweep over config.sampling.gamma: each point runs AR, the layer-skip drafter
at 26 of 30 layers and n-gram lookup on the same chat, code and edit prompts
(greedy, 128 new tokens). Writes one file with every point and a PNG of tok/s
and alpha against gamma to results/gamma_sweep/ (:tiny to gamma_sweep_tiny/).
Expected: about 40 minutes on 2 CPU cores; alpha falls and tau rises with gamma.
"""

from flashspec_jax.config import base_config, is_tiny, make_tiny


def get_config(arg=None):
  config = base_config()
  config.experiment = "gamma_sweep"
  config.methods = "ar,layer_skip:26,ngram:3"
  config.sweep = "sampling.gamma=1,2,4,8,16"
  config.sampling.max_new_tokens = 128
  config.print_text = False
  if is_tiny(arg):
    make_tiny(config, synthetic=True)
    config.methods = "ar,layer_skip:2,ngram:3"
    config.sweep = "sampling.gamma=1,2"
  return config
