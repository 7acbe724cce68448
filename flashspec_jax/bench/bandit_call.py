"""Whole generate calls of the bandit program, held on the n-gram arm, against the fixed
n-gram program: what having other arms in the program costs per call and per step.

  python -m flashspec_jax.bench.bandit_call --target=smollm2_135m

The bandit_smollm2 run on the H200 took 3.1-3.3 ms per loop step on prompts
where UCB1 chose the n-gram arm at every step, against 1.4 ms for the fixed
n-gram program (results/bandit_smollm2/2026-11-29_021c0fc4.json). Here a bandit
(greedy unless `--strategy` says otherwise) is held on the n-gram arm at run
time (`timing.held_on_first_arm`), so every program does the same work per step
and differs only in the arms it holds: AR; layer-skip arms and AR; an untrained
feature drafter, to which every target pass hands its features; and the six
arms of experiments/choosers_smollm2.py, whose Hedge steps in the H200 streams cost
0.35-0.68 ms more than its arm mix at calibrated costs (bench/chooser_steps.py); held
on one arm here, that program cost 1.04x the fixed one (docs/bandits.md). Two programs
move between n-gram and the feature drafter on a fixed schedule (`Cycle`), every
step and every 8 steps, to time what switching costs against the two arms' own
programs (fixed n-gram and fixed eagle), weighted by the steps each arm took. Each
program runs at two lengths, which split its time into a part per loop step and a
part per call; each also records the cache buffers its compiled loop copies
(`bench.hlo.buffer_copies`).
Synthetic weights; every program takes the same steps on the same inputs
(recorded).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from flashspec_jax import cli, results
from flashspec_jax.bandit import UCB1, Cycle, EpsilonGreedy, Fixed, Thompson, initial_state
from flashspec_jax import timing
from flashspec_jax.bench.hlo import buffer_copies, cache_shapes
from flashspec_jax.bench.synthetic import SyntheticTarget
from flashspec_jax.drafters import NgramDrafter
from flashspec_jax.engine import Arm, SpeculativeDecoder
from flashspec_jax.environment import on_gpu
from flashspec_jax.kernels.verify import get_verify_fn
from flashspec_jax.sampling import Greedy, Samplers, Temperature

STRATEGIES = {"greedy": EpsilonGreedy(epsilon=0.0), "ucb1": UCB1(), "thompson": Thompson()}

_TARGET = flags.DEFINE_string("target", "smollm2_135m", "Target shape in configs/.")
_DEPTHS = flags.DEFINE_list("layer_skip", ["20", "26"], "Depths of the idle layer-skip arms.")
_BATCH = flags.DEFINE_integer("batch", 1, "Batch size.")
_GAMMA = flags.DEFINE_integer("gamma", 4, "Draft tokens per step.")
_CONTEXT = flags.DEFINE_integer("context", 256, "Prompt tokens.")
_NEW_TOKENS = flags.DEFINE_list("new_tokens", ["32", "128"],
                                "Tokens per call; two lengths split per-step from per-call time.")
_REPEATS = flags.DEFINE_integer("repeats", 7, "Timed calls per program.")
_UNROLL = flags.DEFINE_bool("unroll", None, "Unroll draft steps (default: on a GPU, as run.py).")
_STRATEGY = flags.DEFINE_enum("strategy", "greedy", sorted(STRATEGIES),
                              "The bandit strategy that is held on the n-gram arm.")
_SAMPLER = flags.DEFINE_enum("sampler", "temperature", ["temperature", "greedy"],
                             "Target and draft sampling: temperature 1 or greedy.")
_PROGRAMS = flags.DEFINE_multi_string(
    "program", [], "Only this program (a name as in the table; repeat the flag for more; none: "
    "all). The fixed programs it is compared with run too.")
_OUT = flags.DEFINE_string("out", "results", "Results directory.")
_HLO_DIR = flags.DEFINE_string("hlo_dir", "", "If set, write each optimized program here.")


@dataclasses.dataclass(frozen=True)
class Programs:
  """The arms to build programs from, and how each program is held and sampled."""

  gamma: int
  depths: tuple[int, ...]  # of the idle layer-skip arms
  unroll: bool
  strategy: str = "greedy"
  sampler: str = "temperature"
  only: tuple[str, ...] = ()  # program names; empty: all


def _calls_on_copies(compiled, args, bandit, count: int):
  """A function making `count` calls compiled(*args, state), each on its own copy of
  bandit: the program takes the state donated, and every timed call starts from the
  same one. The copies are made before the first call, outside any timing."""
  copies = iter(jax.block_until_ready([jax.tree.map(jnp.copy, bandit) for _ in range(count)]))
  return lambda: compiled(*args, next(copies))


def bench(target: SyntheticTarget, prompts, programs: Programs, new_tokens: list[int],
          repeats: int, hlo_dir: str = "") -> dict:
  """prompts: (tokens [B, P], lengths [B]); each program runs at both new_tokens lengths."""
  gamma, config = programs.gamma, target.config
  params, (prompt, lengths) = target.params, prompts
  drafter = NgramDrafter(config.vocab_size, 3)
  ngram = Arm(drafter, gamma)
  layer_skip = tuple(target.layer_skip_arm(d, gamma, programs.unroll) for d in programs.depths)
  eagle = target.feature_drafter_arm(gamma, programs.unroll)
  arm_sets = {"fixed n-gram": (ngram,), "held: n-gram, ar": (ngram, Arm()),
              "held: n-gram, layer-skip, ar": (ngram, *layer_skip, Arm()),
              # Every target pass hands its features over while the feature drafter is held.
              "held: n-gram, eagle": (ngram, eagle),
              # experiments/choosers_smollm2.py's arms: n-gram at three gammas, eagle,
              # the deepest layer-skip, AR.
              "held: six arms": (ngram, Arm(drafter, 2), Arm(drafter, 8), eagle, layer_skip[-1],
                                 Arm()),
              "fixed eagle": (eagle,),
              # Moving between arms, which a held bandit never does: the feature
              # drafter catches up on the tokens n-gram's steps committed.
              "cycle n-gram/eagle, every step": (ngram, eagle),
              "cycle n-gram/eagle, every 8 steps": (ngram, eagle)}
  schedules = {"cycle n-gram/eagle, every step": Cycle(1),
               "cycle n-gram/eagle, every 8 steps": Cycle(8)}
  if programs.only:
    unknown = set(programs.only) - set(arm_sets)
    if unknown:
      raise ValueError(f"--program: unknown {sorted(unknown)}; known: {list(arm_sets)}")
    references = {"fixed n-gram"} | ({"fixed eagle"} if set(programs.only) & set(schedules)
                                     else set())
    arm_sets = {name: arms for name, arms in arm_sets.items()
                if name in set(programs.only) | references}
  key = jax.random.key(2)
  sampler = Greedy() if programs.sampler == "greedy" else Temperature(1.0)
  samplers = Samplers.same(sampler)
  calls = []
  for (name, arms), tokens in itertools.product(arm_sets.items(), new_tokens):
    if name in schedules:
      held, bandit = schedules[name], initial_state(len(arms))
    elif len(arms) == 1:
      held, bandit = Fixed(0), None
    else:
      held, bandit = STRATEGIES[programs.strategy], timing.held_on_first_arm(len(arms))
    decoder = SpeculativeDecoder(target.model, arms, tokens, eos_ids=(), strategy=held,
                                 verify_fn=get_verify_fn("auto"))
    calls.append((name, arms, tokens, decoder, bandit,
                  decoder.lower(params, prompt, lengths, key, samplers, bandit)))
  # XLA compiles outside Python's lock: the programs compile side by side.
  start = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
    executables = list(pool.map(lambda call: call[-1].compile(), calls))
  compile_seconds = time.perf_counter() - start
  rows = []
  for (name, arms, tokens, decoder, bandit, _), compiled in zip(calls, executables):
    hlo = compiled.as_text()
    if hlo_dir:
      pathlib.Path(hlo_dir).mkdir(parents=True, exist_ok=True)
      (pathlib.Path(hlo_dir) / f"{len(rows)}.hlo.txt").write_text(hlo)
    state = jax.eval_shape(decoder.init, params, prompt, lengths, key, sampler, bandit)
    # wall_times' two warm-up calls and the repeats, then the call whose output is read.
    call = _calls_on_copies(compiled, (params, prompt, lengths, key, samplers), bandit,
                            repeats + 3)
    times = timing.wall_times(call, repeats)
    out = call()
    steps = int(out.steps)
    call_ms = statistics.median(times) * 1e3
    rows.append(dict(program=name, arms=[a.name for a in arms], new_tokens=tokens,
                     arm_pulls=[int((out.history.arm == i).sum()) for i in range(len(arms))],
                     steps=steps, call_ms=call_ms,
                     cache_copies_in_loop=len(buffer_copies(hlo, cache_shapes(state))),
                     times=times))
  programs_summary = []
  for name in arm_sets:
    short, long = (r for r in rows if r["program"] == name)  # new_tokens in the given order
    per_step = (long["call_ms"] - short["call_ms"]) / (long["steps"] - short["steps"])
    programs_summary.append(dict(program=name, ms_per_step=per_step,
                                 ms_per_call=short["call_ms"] - per_step * short["steps"],
                                 cache_copies_in_loop=long["cache_copies_in_loop"]))
  by_name = {summary["program"]: summary for summary in programs_summary}
  for summary in programs_summary:
    name = summary["program"]
    summary["step_vs_fixed"] = summary["ms_per_step"] / programs_summary[0]["ms_per_step"]
    if name in schedules:
      # Against the arms' own programs, weighted by the steps each arm took between the
      # short call and the long one, which the per-step time comes from.
      short, long = (r for r in rows if r["program"] == name)
      pulls = [b - a for a, b in zip(short["arm_pulls"], long["arm_pulls"])]
      alone = [by_name[f"fixed {arm}"]["ms_per_step"] for arm in ("n-gram", "eagle")]
      summary["step_vs_arms_alone"] = summary["ms_per_step"] * sum(pulls) / sum(
          n * ms for n, ms in zip(pulls, alone))
  batch, context = prompt.shape
  return dict(target=config.name, dtype=target.model.param_dtype.name, synthetic_weights=True,
              batch=batch, gamma=gamma, context=context, new_tokens=new_tokens,
              unrolled_drafts=programs.unroll, strategy=programs.strategy,
              sampler=programs.sampler, compile_seconds=compile_seconds,
              programs=programs_summary, rows=rows)


def main(argv):
  del argv
  if len(_NEW_TOKENS.value) != 2:
    raise app.UsageError("--new_tokens takes two lengths, shorter first")
  unroll = on_gpu() if _UNROLL.value is None else _UNROLL.value
  target = SyntheticTarget.create(_TARGET.value)
  programs = Programs(_GAMMA.value, tuple(int(d) for d in _DEPTHS.value), unroll,
                      _STRATEGY.value, _SAMPLER.value, tuple(_PROGRAMS.value))
  result = bench(target, target.prompts(_BATCH.value, _CONTEXT.value), programs,
                 [int(n) for n in _NEW_TOKENS.value], _REPEATS.value, _HLO_DIR.value)
  path = results.write("bandit_call", result, directory=_OUT.value)
  print(f"\nwhole calls held on the n-gram arm, {result['target']} shape, synthetic weights "
        f"-> {path}")
  print(f"{len(result['rows'])} programs compiled side by side in "
        f"{result['compile_seconds']:.1f} s")
  print(f"{'program':>36} {'new tokens':>10} {'steps':>6} {'call ms':>9}")
  for row in result["rows"]:
    print(f"{row['program']:>36} {row['new_tokens']:>10} {row['steps']:>6} "
          f"{row['call_ms']:>9.2f}")
  print(f"\n{'program':>36} {'ms/step':>8} {'vs fixed':>9} {'vs arms':>8} {'ms/call':>8} "
        f"{'cache copies in loop':>21}")
  for p in result["programs"]:
    alone = f"{p['step_vs_arms_alone']:.3f}" if "step_vs_arms_alone" in p else "-"
    print(f"{p['program']:>36} {p['ms_per_step']:>8.3f} {p['step_vs_fixed']:>9.3f} "
          f"{alone:>8} {p['ms_per_call']:>8.2f} {p['cache_copies_in_loop']:>21}")

if __name__ == "__main__":
  cli.run(main)
