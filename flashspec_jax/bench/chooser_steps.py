"""Where the choosers' time goes in recorded stream runs: first calls, and steps that cost
more than the arms they ran.

  python -m flashspec_jax.bench.chooser_steps --runs='results/choosers_smollm2/*.json'

Reads each run's per-call records and bandit histories (no device needed). For each
chooser and the best fixed arm it reports milliseconds per loop step on the first
call and on the rest; tokens per step; the rest's speed against the best fixed arm's
(also without its first call); and what a step of the chooser's arm mix costs at the
run's calibrated arm costs, plus the per-call share the best fixed arm pays beyond
its own calibrated cost (prefill, call overhead). From that it estimates the
chooser's speed had each of its steps cost what its arm costs alone: how much of
its shortfall is its choices and how much the program's steps. Held calls take
the choices out: the chooser's calls that ran one arm at every step and match that
arm's fixed call on the same prompt step for step, each against that call (not those
committed to the arm, config.bandit.commit, which ran the arm's own program). Last,
each later call's excess: its time beyond the calibrated cost of the steps it ran (median,
90th percentile and maximum), which tells a cost paid by every step from one paid
by some calls only. And per prompt set, the chooser's speed against the set's best
fixed arm had each call cost its steps' calibrated costs plus the best fixed arm's
median call excess, or plus the chooser's own median (its worst calls cut down).
Per run, a least-squares fit of the choosers' call excess on their steps and their
changes of step body tells what each change costs (on a GPU, waits for the host), and
a second fit on the waits those changes added (drafters.host_waits) what each wait costs.
"""

from __future__ import annotations

import pathlib

from absl import app, flags

from flashspec_jax import cli, results, streams

_RUNS = flags.DEFINE_list("runs", ["results/choosers_smollm2/*.json"],
                          "Runs to read: globs, comma-separated.")
_OUT = flags.DEFINE_string("out", "results", "Results directory.")


def main(argv):
  del argv
  found = streams.read_runs(_RUNS.value)
  if not found:
    raise app.UsageError(f"--runs: no file matches {','.join(_RUNS.value)!r}")
  runs = [streams.step_costs(run | {"_path": path}) for path, run in found
          if run.get("bandit_histories")]
  path = results.write("chooser_steps", dict(runs=runs), directory=_OUT.value)
  print(f"\nchooser steps -> {path}")
  print(f"{'run':<34} {'method':<28} {'1st ms/step':>11} {'ms/step':>8} {'mix ms':>7} "
        f"{'tau':>5} {'vs best':>7} {'at mix':>7} {'call excess ms: median p90 max':>31} "
        f"{'held ms (calls)':>15}")
  for run in runs:
    name = pathlib.Path(run["run"]).name
    print(f"{name:<34} {run['best_fixed'] + ' (best fixed)':<28} "
          f"{run['best_fixed_first_call_ms_per_step']:>11.2f} "
          f"{run['best_fixed_ms_per_step']:>8.3f} "
          f"{run['best_fixed_calibrated_ms']:>7.3f} {run['best_fixed_tau']:>5.2f} {'':>15}"
          f"{_excess(run['best_fixed_call_excess_ms'])}")
    for c in run["choosers"]:
      print(f"{'':<34} {c['method']:<28} {c['first_call_ms_per_step']:>11.2f} "
            f"{c['ms_per_step']:>8.3f} {c['calibrated_mix_ms']:>7.3f} {c['tau']:>5.2f} "
            f"{c['vs_best_fixed']:>7.2f} {c['estimated_vs_best_fixed']:>7.2f}"
            f"{_excess(c['call_excess_ms'])} "
            f"{streams.describe_held(c['held_call_overhead_ms']):>15}"
            "  by set, at mix / at own median: "
            + ", ".join(f"{kind} {ratio:.2f} / {c['at_own_median_by_set'][kind]:.2f}"
                        for kind, ratio in c["at_mix_by_set"].items())
            + f"; body changes per step {c['body_changes_per_step']:.2f}")
    if fit := run["body_change_fit"]:
      print(f"{'':<34} each change of step body adds {1e3 * fit['ms_per_change']:.0f} "
            f"+- {1e3 * fit['ms_per_change_se']:.0f} us to a call, each step "
            f"{1e3 * fit['ms_per_step']:.0f} +- {1e3 * fit['ms_per_step_se']:.0f} us "
            f"(least squares over {fit['calls']} calls)")
    if fit := run["host_wait_fit"]:
      print(f"{'':<34} each wait for the host a change adds costs {1e3 * fit['ms_per_wait']:.0f} "
            f"+- {1e3 * fit['ms_per_wait_se']:.0f} us")


def _excess(excess: dict) -> str:
  return f" {excess['median']:>11.1f} {excess['p90']:>9.1f} {excess['max']:>9.1f}"


if __name__ == "__main__":
  cli.run(main)
