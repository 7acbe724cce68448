"""Llama-3.1-8B-Instruct with the Llama-3.2-1B drafter and n-gram lookup, bandit on.

  python run.py --config=experiments/llama3_8b.py --config.checkpoint_dir=/path/to/Llama-3.1-8B-Instruct \
      --config.draft_checkpoint_dir=/path/to/Llama-3.2-1B-Instruct
  python run.py --config=experiments/llama3_8b.py --config.synthetic_weights=True   # speed only
  python run.py --config=experiments/llama3_8b.py:tiny    # CPU-sized, synthetic tiny shapes

Weights are looked for in checkpoints/llama3_8b/ and checkpoints/llama3.2_1b/
unless the checkpoint flags are set. Methods, side by side on the same
prompts: AR, each drafter alone (gamma 4), and UCB1 over {1B model, n-gram,
AR} with goodput rewards. Needs a GPU with about 20 GB free in bf16. Expected
result: not yet measured with real weights (no weights are available to this
project); with synthetic weights only the speeds mean anything.
"""

from flashspec_jax.config import base_config, is_tiny, make_tiny


def get_config(arg=None):
  config = base_config()
  config.experiment = "llama3_8b"
  config.target = "llama3_8b"
  config.arms = "draft_model:llama3.2_1b,ngram:3,ar"
  config.methods = "ar,draft_model:llama3.2_1b,ngram:3,bandit:ucb1"
  config.sampling.max_new_tokens = 256
  if is_tiny(arg):
    make_tiny(config, synthetic=True)
    config.arms = "draft_model:tiny_llama_draft,ngram:3,ar"
    config.methods = "ar,draft_model:tiny_llama_draft,bandit:ucb1"
    config.bandit.costs = "1.0,1.0,1.0"  # given: baselines:tiny covers timing them
  return config
