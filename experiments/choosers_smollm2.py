"""Choosers against every fixed arm on a held-out stream of chat, code and edit prompts.

  python run.py --config=experiments/choosers_smollm2.py
  python run.py --config=experiments/choosers_smollm2.py --config.prompts.order=interleaved
  python run.py --config=experiments/choosers_smollm2.py --config.sampling.temperature=1
  python run.py --config=experiments/choosers_smollm2.py --config.bandit.request_carry=0.25
  python run.py --config=experiments/choosers_smollm2.py --config.bandit.wait_cost=0.0001
  python run.py --config=experiments/choosers_smollm2.py --config.bandit.step_context=True
  python run.py --config=experiments/choosers_smollm2.py --config.bandit.commit=0.9
  python run.py --config=experiments/choosers_smollm2.py:tiny    # CI-sized

SmolLM2-135M, batch 1, 128 new tokens, eight held-out prompts per set, in
blocks of one set (or interleaved). Arms: n-gram lookup at gamma 2, 4 and 8
(one drafter, so choosing among them is an adaptive gamma), the feature
drafter eagle:smollm2, layer-skip at 26 layers and AR, each timed at start-up.
Methods, side by side on the same stream: AR, each fixed drafter, the reward
bandits (UCB1, Thompson) and the acceptance choosers (acceptance_thompson,
kl_ucb, hedge, and the contextual_thompson and contextual_kl_ucb that learn
n-gram lookup's acceptance per match length). The results file gives each
chooser's tok/s against the best fixed arm over the stream and per set, against
the per-set oracle, its share of steps off each set's best arm and its steps to
settle after a change of set (flashspec_jax/streams.py).
Expected, on the H200 (at fd5d527f, arm costs given by --config.bandit.costs=
0.0011398,0.0011398,0.0011398,0.0014824,0.0050665,0.0012117 as calibrated there;
about 3.5 minutes a run with its compiles, a minute once they are cached):
greedy, n-gram is the best fixed arm over the stream (1.76-1.77x AR), and contextual
KL-UCB runs at 1.14x it interleaved and 1.19x in blocks, at 0.95x or more of the
best fixed arm on every set and 0.99x and 1.03x the per-set oracle; contextual
Thompson at 1.13x and 1.20x; acceptance Thompson at 0.98x and 1.13x. At
temperature 1, eagle:smollm2 is the best fixed arm (1.34-1.40x AR) and the best
chooser runs at 0.95-1.00x it (contextual KL-UCB, contextual Thompson or KL-UCB,
by run), below 0.95x on chat or code. Those H200 runs predate the prompt prior
weighed by the target's probabilities (317bec7b); with it, at temperature 1 on an
H100 (25c7b046), the best chooser ran at 0.97-1.07x the drafter, by run, and at
0.90-0.91x on chat in two of three runs; greedy on the H100 (d2517145), contextual
KL-UCB ran at 1.20x n-gram interleaved and 1.24x in blocks, 1.04x or more on every
set and 1.06x and 1.10x the per-set oracle (contextual Thompson 1.19x both, 0.99x
on chat in blocks). With waits for the host priced at 0.1 ms (--config.bandit.wait_cost,
H100, a9206156), contextual Thompson ran at 1.20x n-gram interleaved and 1.23x in
blocks, 1.02x or more on every set, and plain KL-UCB fell to 0.91x interleaved
(docs/bandits.md, "Pricing the waits"). At temperature 1 on the H100 (685d496b),
waits priced at 0.05 ms, contextual Thompson met all four stream goals in three of four
runs (interleaved at seeds 0-2 and blocks; 0.97-1.02x the drafter over the stream,
0.92x on code at seed 0), and as often with --config.bandit.step_context (the
contextual choosers learn the feature drafter in n-gram lookup's context too;
0.94-1.05x); python -m flashspec_jax.bench.stream_goals checks each run against the
goals (docs/bandits.md, "Temperature 1 with waits priced"). All of that ran the
last-layer eagle:smollm2; with the fused one shipped since (H100, arm costs as
calibrated at 5515e4a3), the drafter is the best fixed arm greedy too (2.01-2.03x
AR) and the best chooser meets all four goals (contextual Thompson 1.08x it in
blocks, contextual KL-UCB 1.05x interleaved), while at temperature 1 (1.42-1.43x
AR), where it is every set's best arm, the best chooser runs at 0.960x it in blocks
and 0.999x interleaved (docs/bandits.md, "The fused-feature drafter"). With
--config.deterministic off, each
compile times its kernels and the replies change between runs, and so do these
ratios, by up to 0.11x (docs/bandits.md). On 2 CPU cores
(--config.sampling.max_new_tokens=64 --config.methods=ar,ngram:3,eagle:smollm2,
bandit:acceptance_thompson,bandit:kl_ucb,bandit:contextual_thompson,
bandit:contextual_kl_ucb, about 12 minutes per order, at b8072e82), contextual
Thompson runs at 1.12x the best fixed arm and 1.03x the per-set oracle in blocks,
1.09x and 1.00x interleaved, and at temperature 1 interleaved, where AR is the
CPU's best fixed arm, at 1.02x it (1.00x at 6000e59b, with the weighed prompt
prior: 0.96x, 1.01x and 1.05x it on chat, code and edit). With the fused drafter,
it ran the greedy interleaved stream at 1.11x the best fixed arm (the drafter) but
0.96x AR on chat (98612cf5), and the temperature-1 one at 0.97x AR, its best arm
(0e692e80).
With --config.bandit.commit=0.9 (a request the evidence is sure of runs its arm's
own program) at temperature 1 in blocks on an H100, KL-UCB ran at 0.929x the
drafter against 0.946x with commit off, acceptance Thompson 0.866x against 0.946x
(fa573b16; docs/bandits.md, "Committing a request to one arm"); since the test
runs on the host (c9a52b35, KL-UCB beside AR and the drafter alone), 0.977x
fresh and 0.978x from a tune-split prior, against 0.970x from that prior uncommitted.
The drafter at several gammas among the arms is an adaptive gamma for it:
  python run.py --config=experiments/choosers_smollm2.py --config.sampling.temperature=1 \
    --config.arms=ngram:3@2,ngram:3@4,ngram:3@8,eagle:smollm2@2,eagle:smollm2@3,\
eagle:smollm2@4,layer_skip:26,ar \
    --config.methods=ar,ngram:3,eagle:smollm2@2,eagle:smollm2@3,eagle:smollm2,layer_skip:26,\
bandit:acceptance_thompson,bandit:kl_ucb,bandit:contextual_thompson
On 2 CPU cores (blocks, --config.sampling.max_new_tokens=64, at 3628ab2f) the drafter
at gamma 3 was the best fixed arm (1.12x AR; gamma 4 1.02x) and the best chooser ran
at 0.97x it (contextual Thompson; docs/bandits.md, "The feature drafter's gamma at
temperature 1").
A chooser can start from an earlier run's state, e.g. one on the tune split:
  python run.py --config=experiments/choosers_smollm2.py --config.prompts.split=tune
  python run.py --config=experiments/choosers_smollm2.py --config.bandit.commit=0.9 \
    --config.bandit.initial_state=results/choosers_smollm2/<that run>.json
On an H100 (c9a52b35) 12 of KL-UCB's 24 held-out requests then ran committed to
the drafter, against 8 from a fresh state.
"""

from flashspec_jax.config import base_config, is_tiny, make_tiny


def get_config(arg=None):
  config = base_config()
  config.experiment = "choosers_smollm2"
  config.arms = "ngram:3@2,ngram:3@4,ngram:3@8,eagle:smollm2,layer_skip:26,ar"
  config.methods = ("ar,ngram:3,eagle:smollm2,layer_skip:26,bandit:ucb1,bandit:thompson,"
                    "bandit:acceptance_thompson,bandit:kl_ucb,bandit:hedge,"
                    "bandit:contextual_thompson,bandit:contextual_kl_ucb")
  config.prompts.split = "heldout"
  config.prompts.num_per_set = 8
  config.prompts.bucket = 512  # one program per method
  config.sampling.max_new_tokens = 128
  config.print_text = False
  if is_tiny(arg):
    make_tiny(config, synthetic=True)
    config.arms = "ngram:3@2,ngram:3@4,ar"
    config.methods = "ar,ngram:3,bandit:acceptance_thompson,bandit:hedge"
    config.bandit.costs = "1.1,1.1,1.0"  # given: no calibration in CI
  return config
