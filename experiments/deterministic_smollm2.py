"""Deterministic mode's cost, and its point: replies equal to AR's, mode off and on.

  python run.py --config=experiments/deterministic_smollm2.py
  python run.py --config=experiments/deterministic_smollm2.py --config.batch_size=8 \
    --config.prompts.num_per_set=8
  python run.py --config=experiments/deterministic_smollm2.py:tiny    # CI-sized

SmolLM2-135M, greedy, gamma 4, 128 new tokens, five held-out prompts per set
(chat, code, edit). AR, each drafter alone and a UCB1 bandit over n-gram and
layer-skip run with config.deterministic off and on, in one run (a sweep), so
their tok/s compare side by side; the table's "= AR" column is the share of
replies whose text is AR's (docs/exactness.md).
Expected: on the CPU in bf16 (--config.dtype=bfloat16 --config.methods=ar,ngram:3,
eagle:smollm2 --config.prompts.num_per_set=2 --config.sampling.max_new_tokens=64,
about 3 minutes) n-gram's and eagle's replies equalled AR's on 2 of 6 prompts
with the mode off and on all 6 with it on, and AR ran at 0.62x its speed with
it on (results/deterministic_smollm2/). In f32 with the mode off the tests see
greedy speculation equal AR (tests/test_engine.py). On the H200 (bf16, the
commands above, about 6 and 5 minutes) 47% (batch 1) and 54% (batch 8) of the
speculative replies equalled AR's with the mode off and all with it on; it cost
AR 1% and 16% of its speed and the speculative methods at most 11%.
"""

from flashspec_jax.config import base_config, is_tiny, make_tiny


def get_config(arg=None):
  config = base_config()
  config.experiment = "deterministic_smollm2"
  config.methods = "ar,ngram:3,layer_skip:26,eagle:smollm2,bandit:ucb1"
  config.arms = "ngram:3,layer_skip:26"
  config.sweep = "deterministic=False,True"
  config.prompts.split = "heldout"
  config.prompts.num_per_set = 5
  config.prompts.bucket = 256
  config.sampling.max_new_tokens = 128
  config.sampling.gamma = 4
  config.print_text = False
  if is_tiny(arg):
    make_tiny(config, synthetic=True)
    config.methods = "ar,ngram:3"
  return config
