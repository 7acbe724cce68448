"""Llama-3.1-70B-Instruct with Llama-3.1-8B and Llama-3.2-1B drafters, bandit on.

  python run.py --config=experiments/llama3_70b.py --config.checkpoint_dir=/path/to/Llama-3.1-70B-Instruct
  python run.py --config=experiments/llama3_70b.py --config.synthetic_weights=True
  python run.py --config=experiments/llama3_70b.py:tiny   # CPU-sized, synthetic tiny shapes

Weights are looked for in checkpoints/llama3_70b/, checkpoints/llama3_8b/ and
checkpoints/llama3.2_1b/. Methods: AR, each model drafter alone, and UCB1 over
{8B, 1B, n-gram, AR}. The 70B target in bf16 (about 141 GB) does not fit on
one H200, so it is split over two GPUs (config.mesh = "tp:2", sharding.py); on
fewer devices the run stops before loading and says what it needs.
Expected runtime and result: not measured yet; the 70B weights are not here,
and the two-GPU runs of synthetic weights are still to come (issue 15).
"""

from flashspec_jax.config import base_config, is_tiny, make_tiny


def get_config(arg=None):
  config = base_config()
  config.experiment = "llama3_70b"
  config.target = "llama3_70b"
  config.arms = "draft_model:llama3_8b,draft_model:llama3.2_1b,ngram:3,ar"
  config.methods = "ar,draft_model:llama3_8b,draft_model:llama3.2_1b,bandit:ucb1"
  config.sampling.max_new_tokens = 256
  config.mesh = "tp:2"
  if is_tiny(arg):
    make_tiny(config, synthetic=True)
    config.mesh = ""
    config.arms = "draft_model:tiny_llama_draft,layer_skip:2,ngram:3,ar"
    config.methods = "ar,draft_model:tiny_llama_draft,layer_skip:2,bandit:ucb1"
    config.bandit.costs = "1.0,1.0,1.0,1.0"  # given: baselines:tiny covers timing them
  return config
