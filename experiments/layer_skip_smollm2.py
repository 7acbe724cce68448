"""SmolLM2-135M-Instruct with the layer-skip self-drafter at several depths, against AR.

  python run.py --config=experiments/layer_skip_smollm2.py

Greedy, gamma 4, 128 new tokens, two chat, two code and two edit prompts, each
method on the same prompts in one run. Writes results/layer_skip_smollm2/.
Expected: about 10 minutes on 2 CPU cores; AR row first, then alpha, tau and
speed of each drafter depth, with the speedup against AR.
"""

from flashspec_jax.config import base_config


def get_config(arg=None):
  del arg
  config = base_config()
  config.experiment = "layer_skip_smollm2"
  config.methods = "ar,layer_skip:8,layer_skip:16,layer_skip:20,layer_skip:24,layer_skip:28"
  config.prompts.num_per_set = 2
  config.sampling.max_new_tokens = 128
  config.sampling.gamma = 4
  config.print_text = False
  return config
