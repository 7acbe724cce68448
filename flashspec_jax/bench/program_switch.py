"""What a fixed program's call costs right after another program's call, timed without a
profiler.

  python -m flashspec_jax.bench.program_switch --config=experiments/choosers_smollm2.py \
      --config.methods=eagle:smollm2,bandit:kl_ucb --config.sampling.temperature=1

The trace at 6a2af29b (docs/bandits.md, "Committing a request to one arm") found that
calls committed to the feature drafter spent longer updating recorded command buffers
than the fixed drafter's calls (a median of 5.9 ms a call against 1.8 ms), though they
run the same program for the same steps. The committed calls ran among the chooser's
own, the fixed drafter's in a block of their own; a program whose buffers moved since
its last call records its command buffers again. The profiler doubles every step's time
and scatters the host's, so this benchmark times a switch of programs without it. For
each prompt, the first method (a fixed arm) runs twice in a row, and the second call is
timed ("after itself"). Then each other method runs once, each followed by the first
method again ("after <method>"). Every call of the first method on a prompt takes the
same key, so they all make the same steps.
"""

from __future__ import annotations

import functools
import statistics

import jax
import tqdm
from absl import app, flags
from ml_collections import config_flags

from flashspec_jax import config as config_lib
from flashspec_jax import cli, environment, results
from flashspec_jax.pipeline import compile_and_run
from flashspec_jax.runner import prepare_generation


def switch_times(config, env: dict) -> list[dict]:
  """Per prompt: the first method's call after itself and after each other method's
  call (milliseconds and loop steps)."""
  config_lib.validate(config)
  prepared = prepare_generation(config, env)
  fixed, *others = prepared.methods
  if fixed.is_bandit or not others:
    raise app.UsageError("--config.methods: a fixed method first, then at least one other")
  states = dict(prepared.initial_states)  # each bandit's, as its last call left it
  rng, calls = jax.random.key(config.seed), []
  for batch in tqdm.tqdm(prepared.batches, desc="prompts", unit="prompt"):
    rng, key = jax.random.split(rng)
    run = functools.partial(compile_and_run, setup=prepared.setup, batch=batch, key=key)
    run(fixed)
    alone = run(fixed)
    after = {}
    for method in others:
      other = run(method, bandit=states.get(method.name))
      if method.is_bandit:
        states[method.name] = other.output.bandit
      again = run(fixed)
      after[method.name] = dict(ms=1e3 * again.seconds, steps=int(again.output.steps))
    calls.append(dict(id=batch[0].id, kind=batch[0].kind, steps=int(alone.output.steps),
                      after_itself_ms=1e3 * alone.seconds, after=after))
  return calls


def summarise(calls: list[dict]) -> dict[str, dict]:
  """Per other method: how much longer the first method's call took after it than after
  itself (ms; median, least and most over prompts), over prompts where both calls made
  the same steps."""
  summary, alone = {}, statistics.median(c["after_itself_ms"] for c in calls)
  for name in calls[0]["after"]:
    extra = [c["after"][name]["ms"] - c["after_itself_ms"] for c in calls
             if c["after"][name]["steps"] == c["steps"]]
    if not extra:
      raise ValueError(f"no prompt where {name} left the first method's steps unchanged")
    summary[name] = dict(prompts=len(extra), extra_ms_median=statistics.median(extra),
                         extra_ms_min=min(extra), extra_ms_max=max(extra),
                         after_itself_ms_median=alone)
  return summary


def define_flags() -> dict[str, flags.FlagHolder]:
  """The command line's flags; defined only when run as a program, as trace_calls' are."""
  return dict(
      config=config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                             lock_config=True),
      out=flags.DEFINE_string("out", "results", "Results directory."))


def main(argv, options: dict[str, flags.FlagHolder]):
  del argv
  env = environment.describe()  # captured as the run starts, as results.write asks
  config = options["config"].value
  if config is None:
    raise app.UsageError("give --config (a run.py config)")
  environment.enable_compilation_cache(config.compilation_cache_dir)
  calls = switch_times(config, env)
  summary = summarise(calls)
  path = results.write("program_switch", dict(config=config.to_dict(), summary=summary,
                                              calls=calls),
                       directory=options["out"].value, env=env)
  fixed = config_lib.method_names(config)[0]
  print(f"\n{fixed}'s call after another program's, against after its own -> {path}")
  print(f"{'after':<28} {'prompts':>7} {'alone ms':>9} {'extra ms: median':>17} "
        f"{'min':>7} {'max':>7}")
  for name, s in summary.items():
    print(f"{name:<28} {s['prompts']:>7} {s['after_itself_ms_median']:>9.2f} "
          f"{s['extra_ms_median']:>17.2f} {s['extra_ms_min']:>7.2f} {s['extra_ms_max']:>7.2f}")


if __name__ == "__main__":
  cli.run(functools.partial(main, options=define_flags()))
