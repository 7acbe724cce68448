"""The bandit choosing drafters for SmolLM2-135M over a stream that changes domain.

  python run.py --config=experiments/bandit_smollm2.py
  python run.py --config=experiments/bandit_smollm2.py:tiny     # CI-sized

Arms: n-gram prompt lookup, the layer-skip self-drafter at 20 and 26 of 30
layers, the trained feature drafter eagle:smollm2 (gamma 4 each), and plain
AR steps. The stream is two chat prompts, then two
code prompts, then two copy-heavy edit prompts, one at a time; each bandit
keeps its state across the stream. Rewards are goodput, with each arm's cost
timed at start-up. Every fixed arm and every bandit runs on the same stream in
the same run, so tok/s against each fixed arm and against the best fixed arm
in hindsight are side by side. Writes results/bandit_smollm2/ with the arm
shares per segment and a PNG of the arm chosen at each step.
Expected: about 30 minutes on 2 CPU cores; no bandit beats the best fixed arm
(n-gram lookup) there (docs/bandits.md says why). The H200 file in results/
came from

  python run.py --config=experiments/bandit_smollm2.py \
    --config.methods=ar,ngram:3,layer_skip:20,layer_skip:26,bandit:ucb1 \
    --config.prompts.bucket=512

in about 4 minutes, most of it compiling (one bucket halves the programs).
The results files of both devices predate the eagle:smollm2 arm; rerunning
this config adds it.
"""

from flashspec_jax.config import base_config, is_tiny, make_tiny


def get_config(arg=None):
  config = base_config()
  config.experiment = "bandit_smollm2"
  config.arms = "ngram:3,layer_skip:20,layer_skip:26,eagle:smollm2,ar"
  config.methods = ("ar,ngram:3,layer_skip:20,layer_skip:26,eagle:smollm2,"
                    "bandit:ucb1,bandit:thompson,bandit:discounted_ucb")
  config.prompts.sets = "chat,code,edit"
  config.prompts.num_per_set = 2
  config.sampling.max_new_tokens = 128
  config.prompts.bucket = 256  # fewer distinct prompt widths, fewer programs to compile
  config.print_text = False
  if is_tiny(arg):
    make_tiny(config, synthetic=False)
    config.arms = "ngram:3,ar"
    config.methods = "ar,bandit:ucb1"
    # Given, not timed: baselines:tiny covers start-up calibration, which would
    # double this run's CPU time.
    config.bandit.costs = "1.0,1.0"
  return config
