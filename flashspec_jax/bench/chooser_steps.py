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
its shortfall is its choices and how much the program's steps.
"""

from __future__ import annotations

import glob
import json
import pathlib

import numpy as np
from absl import app, flags

from flashspec_jax import results

_RUNS = flags.DEFINE_string("runs", "results/choosers_smollm2/*.json", "Runs to read (a glob).")
_OUT = flags.DEFINE_string("out", "results", "Results directory.")


def _calls(run: dict, method: str) -> list[dict]:
  return [r for r in run["records"] if r["method"] == method]


def _rate(calls: list[dict]) -> tuple[float, float, float]:
  """(tokens per second, tokens per step, seconds per step) over the calls."""
  tokens = sum(r["new_tokens"] for r in calls)
  steps = sum(r["loop_steps"] for r in calls)
  seconds = sum(r["batch_seconds"] for r in calls)
  return tokens / seconds, tokens / steps, seconds / steps


def _arm_steps(run: dict, method: str) -> list[list[int]]:
  """Each call's arm per loop step, split from the method's stream history."""
  arms = [arm for _, arm in run["bandit_histories"][method]["steps"]]
  out, start = [], 0
  for call in _calls(run, method):
    out.append(arms[start:start + call["loop_steps"]])
    start += call["loop_steps"]
  return out


def analyse(run: dict) -> dict:
  costs = run["arm_costs"]
  fixed = sorted({r["method"] for r in run["records"] if not r["method"].startswith("bandit")})
  best = max(fixed, key=lambda m: _rate(_calls(run, m))[0])
  best_rate, best_tau, best_step = _rate(_calls(run, best)[1:])
  best_arm = (f"{best.replace(':', '_')}:g{run['config']['sampling']['gamma']}" if best != "ar"
              else "ar")
  # The best fixed arm's steps beyond its calibrated cost: prefill and per-call work.
  per_call_share = best_step - costs[best_arm]
  choosers = []
  for method, history in run["bandit_histories"].items():
    calls = _calls(run, method)
    first = calls[0]["batch_seconds"] / calls[0]["loop_steps"]
    rate, tau, step = _rate(calls[1:])
    later = [a for steps in _arm_steps(run, method)[1:] for a in steps]
    shares = np.bincount(later, minlength=len(history["arms"])) / len(later)
    mix = float(sum(share * costs[arm] for share, arm in zip(shares, history["arms"])))
    choosers.append(dict(
        method=method, first_call_ms_per_step=1e3 * first, ms_per_step=1e3 * step, tau=tau,
        vs_best_fixed=rate / best_rate, calibrated_mix_ms=1e3 * mix,
        estimated_vs_best_fixed=(tau / (mix + per_call_share)) / best_rate,
        shares=dict(zip(history["arms"], shares.tolist()))))
  return dict(run=run["_path"], device=run["environment"]["device"],
              temperature=run["config"]["sampling"]["temperature"],
              order=run["config"]["prompts"]["order"], best_fixed=best,
              best_fixed_first_call_ms_per_step=1e3 * _calls(run, best)[0]["batch_seconds"]
              / _calls(run, best)[0]["loop_steps"],
              best_fixed_ms_per_step=1e3 * best_step, best_fixed_tau=best_tau,
              best_fixed_calibrated_ms=1e3 * costs[best_arm], choosers=choosers)


def main(argv):
  del argv
  paths = sorted(glob.glob(_RUNS.value))
  if not paths:
    raise app.UsageError(f"--runs: no file matches {_RUNS.value!r}")
  runs = []
  for path in paths:
    run = json.loads(pathlib.Path(path).read_text())
    if run.get("bandit_histories"):
      runs.append(analyse(run | {"_path": path}))
  path = results.write("chooser_steps", dict(runs=runs), directory=_OUT.value)
  print(f"\nchooser steps -> {path}")
  print(f"{'run':<34} {'method':<28} {'1st ms/step':>11} {'ms/step':>8} {'mix ms':>7} "
        f"{'tau':>5} {'vs best':>7} {'at mix':>7}")
  for run in runs:
    name = pathlib.Path(run["run"]).name
    print(f"{name:<34} {run['best_fixed'] + ' (best fixed)':<28} "
          f"{run['best_fixed_first_call_ms_per_step']:>11.2f} {run['best_fixed_ms_per_step']:>8.3f} "
          f"{run['best_fixed_calibrated_ms']:>7.3f} {run['best_fixed_tau']:>5.2f}")
    for c in run["choosers"]:
      print(f"{'':<34} {c['method']:<28} {c['first_call_ms_per_step']:>11.2f} "
            f"{c['ms_per_step']:>8.3f} {c['calibrated_mix_ms']:>7.3f} {c['tau']:>5.2f} "
            f"{c['vs_best_fixed']:>7.2f} {c['estimated_vs_best_fixed']:>7.2f}")


if __name__ == "__main__":
  app.run(main)
