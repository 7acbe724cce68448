"""Llama-3.1-8B-Instruct target.

  python run.py --config=experiments/llama3_8b.py --config.checkpoint_dir=/path/to/Llama-3.1-8B-Instruct
  python run.py --config=experiments/llama3_8b.py --config.synthetic_weights=True   # speed only

Weights are looked for in checkpoints/llama3_8b/ unless checkpoint_dir is set.
Needs a GPU with about 20 GB free in bf16.
"""

from flashspec_jax.config import base_config


def get_config(arg=None):
  del arg
  config = base_config()
  config.experiment = "llama3_8b"
  config.target = "llama3_8b"
  config.sampling.max_new_tokens = 256
  return config
