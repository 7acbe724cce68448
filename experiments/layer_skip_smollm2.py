"""SmolLM2-135M-Instruct with the layer-skip self-drafter at several depths, against AR.

  python run.py --config=experiments/layer_skip_smollm2.py
  python run.py --config=experiments/layer_skip_smollm2.py:tiny   # CI-sized

Greedy, gamma 4, 128 new tokens, two chat, two code and two edit prompts, each
method on the same prompts in one run. Writes results/layer_skip_smollm2/.
Expected: about 15 minutes on 2 CPU cores. On a CPU every layer-skip depth is
slower than AR (a 5-token verify costs several 1-token steps there); alpha
grows with the drafter's depth.
"""

from flashspec_jax.config import base_config, is_tiny, make_tiny


def get_config(arg=None):
  config = base_config()
  config.experiment = "layer_skip_smollm2"
  config.methods = "ar,layer_skip:8,layer_skip:16,layer_skip:20,layer_skip:24,layer_skip:28"
  config.prompts.num_per_set = 2
  config.sampling.max_new_tokens = 128
  config.sampling.gamma = 4
  config.print_text = False
  if is_tiny(arg):
    make_tiny(config, synthetic=False)
    config.prompts.sets = "edit"
    config.methods = "ar,layer_skip:8"  # the shallowest drafter compiles fastest
  return config
