"""Whole calls that hand a chooser's state on from one call to the next, as a stream
does, with the state donated (the engine's program) and not, against the fixed
drafter's program, in one process.

  python -m flashspec_jax.bench.carried_state --target=smollm2_135m

In the GPU streams, calls in which KL-UCB held the feature drafter at every step took
several ms longer than the fixed drafter's calls with the same steps, until the
engine's program took the chooser's state donated (docs/bandits.md); those figures
come from different sessions and machines. Here the six arms of
experiments/choosers_smollm2.py run on synthetic weights, KL-UCB held on the feature
drafter by its evidence, so that every program takes the same steps (recorded), and
the three programs take turns call by call, each round in another order.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
from absl import flags

from flashspec_jax import cli, engine, results
from flashspec_jax.bandit import AcceptanceKLUCB, Fixed
from flashspec_jax.bench.synthetic import SyntheticTarget
from flashspec_jax.drafters import NgramDrafter
from flashspec_jax.engine import Arm, SpeculativeDecoder
from flashspec_jax.environment import on_gpu
from flashspec_jax.kernels.verify import get_verify_fn
from flashspec_jax.sampling import Samplers, Temperature

_TARGET = flags.DEFINE_string("target", "smollm2_135m", "Target shape in configs/.")
_CONTEXT = flags.DEFINE_integer("context", 256, "Prompt tokens.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 128, "Tokens per call.")
_CALLS = flags.DEFINE_integer("calls", 30, "Timed calls per program.")
_OUT = flags.DEFINE_string("out", "results", "Results directory.")

# The arms' step costs the choosers streams ran with (--config.bandit.costs, in ms), in
# the order below: the chooser ranks arms by tokens per cost.
_COSTS = (1.48, 1.14, 1.14, 1.14, 5.07, 1.21)
# Drafts tested per arm in the held state: enough that no call's evidence moves it.
_EVIDENCE = 1e6


def held_state(decoder: SpeculativeDecoder):
  """A KL-UCB state whose evidence holds it on arm 0: every arm tested a million times,
  arm 0's drafts all accepted and the others' none."""
  state = decoder.chooser.init(len(decoder.arms))
  tested = jnp.full_like(state.tested, _EVIDENCE)
  return state.replace(tested=tested, accepted=tested.at[1:].set(0.0))


def bench(target: SyntheticTarget, prompts, new_tokens: int, calls: int) -> dict:
  """prompts: (tokens [1, P], lengths [1])."""
  unroll, vocab = on_gpu(), target.config.vocab_size
  ngram = NgramDrafter(vocab, 3)
  depth = max(1, target.config.num_layers * 26 // 30)
  arms = (target.feature_drafter_arm(4, unroll), Arm(ngram, 2), Arm(ngram, 4), Arm(ngram, 8),
          target.layer_skip_arm(depth, 4, unroll), Arm())
  arms = tuple(dataclasses.replace(arm, cost=cost) for arm, cost in zip(arms, _COSTS))
  held = SpeculativeDecoder(target.model, arms, new_tokens, eos_ids=(),
                            strategy=AcceptanceKLUCB(), verify_fn=get_verify_fn("auto"))
  fixed = dataclasses.replace(held, arms=arms[:1], strategy=Fixed(0))
  samplers, key = Samplers.same(Temperature(1.0)), jax.random.key(2)
  args = (target.params, *prompts, key, samplers)
  # The engine's program without the donation (pass_width is None: no compiler options).
  undonated = engine._PROGRAMS[False, False]  # pylint: disable=protected-access
  states = {"donated": held_state(held), "not donated": held_state(held)}
  lowered = {"fixed": fixed.lower(*args, None), "donated": held.lower(*args, states["donated"]),
             "not donated": undonated.lower(held, *args, states["not donated"])}
  # XLA compiles outside Python's lock: the programs compile side by side.
  with concurrent.futures.ThreadPoolExecutor(len(lowered)) as pool:
    compiled = dict(zip(lowered, pool.map(lambda program: program.compile(), lowered.values())))
  names = list(compiled)
  times, steps = {name: [] for name in names}, {}
  for call in range(calls + 2):  # the first two warm up
    # Rotated, so that no program always runs right after the same other.
    turn = call % len(names)
    for name in names[turn:] + names[:turn]:
      start = time.perf_counter()
      out = jax.block_until_ready(compiled[name](*args, states.get(name)))
      if call >= 2:
        times[name].append(time.perf_counter() - start)
      steps[name] = int(out.steps)
      if name in states:  # the chooser's: handed on to its next call
        states[name] = out.bandit
        assert not out.history.arm[:steps[name]].any(), "the chooser left the held arm"
  rows = [dict(program=name, steps=steps[name], call_ms=statistics.median(t) * 1e3,
               vs_fixed_ms=(statistics.median(t) - statistics.median(times["fixed"])) * 1e3,
               times=t) for name, t in times.items()]
  return dict(target=target.config.name, dtype=target.model.param_dtype.name,
              synthetic_weights=True, context=prompts[0].shape[1], new_tokens=new_tokens,
              unrolled_drafts=unroll, arms=[arm.name for arm in arms], calls=calls, rows=rows)


def main(argv):
  del argv
  target = SyntheticTarget.create(_TARGET.value)
  result = bench(target, target.prompts(1, _CONTEXT.value), _NEW_TOKENS.value, _CALLS.value)
  path = results.write("carried_state", result, directory=_OUT.value)
  print(f"\ncalls carrying KL-UCB's state, held on the feature drafter, {result['target']} "
        f"shape, synthetic weights -> {path}")
  print(f"{'program':>12} {'steps':>6} {'call ms':>9} {'vs fixed ms':>12}")
  for row in result["rows"]:
    print(f"{row['program']:>12} {row['steps']:>6} {row['call_ms']:>9.2f} "
          f"{row['vs_fixed_ms']:>12.2f}")


if __name__ == "__main__":
  cli.run(main)
