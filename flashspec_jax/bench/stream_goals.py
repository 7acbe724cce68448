"""Each recorded stream run against issue 14's goals, chooser by chooser.

  python -m flashspec_jax.bench.stream_goals --runs='results/choosers_smollm2/*.json'

Reads each run's summaries and per-call records (no device needed) and checks every
chooser against streams.GOALS: its tok/s at least the best fixed arm's over the
stream, at least 0.95x each set's best fixed arm, within 10% of the per-set oracle,
and at least AR's on every set. One run is one sample of the stream's sampling and
timing noise, so runs are listed by device, temperature and options (those of the
same kind side by side, whatever commit ran them), and per kind of run each chooser
is counted in how many of the runs it took part in it met all four. Runs without AR
are left out.
"""

from __future__ import annotations

import functools
import pathlib

from absl import app, flags

from flashspec_jax import cli, results, streams


def describe(path: str, run: dict) -> dict:
  """What sets a stream run apart: device, sampling, order, seed and chooser options."""
  config = run["config"]
  return dict(run=path, device=run["environment"]["device"],
              temperature=config["sampling"]["temperature"], order=config["prompts"]["order"],
              seed=config["seed"], options=run_options(run))


def best_chooser(choosers: dict[str, dict]) -> str:
  """The chooser that met the most goals; of those, the fastest over the stream."""
  return max(choosers, key=lambda name: (sum(choosers[name]["met"].values()),
                                         choosers[name]["vs_best_fixed"]))


def tally(runs: list[dict]) -> list[dict]:
  """Runs grouped by device, temperature and options; per chooser, in how many of the
  group's runs it met all four goals, and in how many it ran."""
  groups = {}
  for run in runs:
    key = (run["device"], run["temperature"], run["options"])
    group = groups.setdefault(key, dict(device=key[0], temperature=key[1], options=key[2],
                                        all_met={}, ran={}))
    for name, chooser in run["choosers"].items():
      group["all_met"][name] = group["all_met"].get(name, 0) + all(chooser["met"].values())
      group["ran"][name] = group["ran"].get(name, 0) + 1
  return list(groups.values())


def define_flags() -> dict[str, flags.FlagHolder]:
  """The command line's flags; defined only when run as a program, so that tests can
  import this module beside other benchmarks that define flags of the same names."""
  return dict(runs=flags.DEFINE_list("runs", ["results/choosers_smollm2/*.json"],
                                     "Runs to read: globs, comma-separated."),
              out=flags.DEFINE_string("out", "results", "Results directory."))


def main(argv, options: dict[str, flags.FlagHolder]):
  del argv
  patterns = options["runs"].value
  found = streams.read_runs(patterns)
  if not found:
    raise app.UsageError(f"--runs: no file matches {','.join(patterns)!r}")
  runs = [describe(path, run) | dict(choosers=choosers, best_chooser=best_chooser(choosers))
          for path, run in found if (choosers := streams.goals(run))]
  runs.sort(key=lambda run: (run["device"], run["temperature"], run["options"], run["order"],
                             run["seed"]))
  groups = tally(runs)
  path = results.write("stream_goals", dict(goals=streams.GOALS, runs=runs, tally=groups),
                       directory=options["out"].value)
  print(f"\nstream goals -> {path}")
  print(f"{'run':<34} {'device':<22} {'T':>3} {'order':<11} {'seed':>4} {'options':<22} "
        f"{'best chooser':<28} {'vs best':>7} {'worst set':>14} {'vs oracle':>9} "
        f"{'vs AR':>11} {'met':>4}")
  for run in runs:
    name = run["best_chooser"]
    c = run["choosers"][name]
    print(f"{pathlib.Path(run['run']).name:<34} {run['device']:<22.22} "
          f"{run['temperature']:>3g} {run['order']:<11} {run['seed']:>4} "
          f"{run['options']:<22} {name:<28} {c['vs_best_fixed']:>7.3f} "
          f"{c['worst_set_vs_best']:>6.3f} ({c['worst_set']:<5}) {c['vs_oracle']:>9.3f} "
          f"{c['worst_set_vs_ar']:>5.3f} ({c['worst_ar_set']}) {sum(c['met'].values()):>2}/4")
  print("\nruns in which each chooser met all four goals:")
  for group in groups:
    print(f"  {group['device']}, T={group['temperature']:g}, {group['options']}: "
          + ", ".join(f"{name} {n}/{group['ran'][name]}" for name, n in group["all_met"].items()))


def run_options(run: dict) -> str:
  """The chooser options, and the engine's deterministic mode, that a run's config set
  away from their defaults, the fused-feature drafter, which replaced the last-layer
  one as eagle:smollm2, and the drafter's gammas where its arms hold several."""
  config = run["config"]
  bandit = config["bandit"]
  set_ = [f"wait_cost {bandit['wait_cost']:g}" if bandit.get("wait_cost") else "",
          "step_context" if bandit.get("step_context") else "",
          f"request_carry {bandit['request_carry']:g}"
          if bandit.get("request_carry", 1.0) != 1.0 else "",
          "deterministic" if config.get("deterministic") else "",
          "fused drafter" if results.fused_drafter(run) else "",
          "drafter at gammas " + ", ".join(map(str, gammas))
          if (gammas := results.drafter_gammas(run)) else ""]
  return ", ".join(s for s in set_ if s) or "defaults"


if __name__ == "__main__":
  cli.run(functools.partial(main, options=define_flags()))
