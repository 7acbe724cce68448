"""How a chooser did on a stream of prompt sets, against the fixed arms run beside it.

For each prompt set (chat, code, edit) the best fixed arm is the fixed method
with the highest tok/s on that set's prompts; the per-set oracle runs that
arm on each set. A chooser is compared with the best fixed arm over the whole
stream, with the best fixed arm of each set, and with the oracle; its steps on
arms other than the set's best, and the steps it took to settle on that arm
after each change of set, come from its history. `step_costs` splits where a
chooser's time went: its first calls, and calls that cost more than the steps of the
arms they ran, and prices its choices per set at its arms' calibrated costs.
`goals` checks a run against issue 14's four goals for a chooser.
"""

from __future__ import annotations

import collections
import glob
import json
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from flashspec_jax.drafters import host_waits

# A chooser has settled on an arm once it picks it this many times in a row.
SETTLED_RUN = 5

# What a chooser must reach on a stream (issue 14): its tok/s against the best fixed
# arm over the stream, against each set's best fixed arm, against the per-set oracle,
# and against AR on each set.
GOALS = dict(vs_best_fixed=1.0, worst_set_vs_best=0.95, vs_oracle=0.9, worst_set_vs_ar=1.0)


def seconds_and_tokens(records: Sequence[dict], method: str, kind: str) -> tuple[float, int]:
  """Wall seconds and tokens of `method` on the prompts of one set; a row is charged
  its share of its batch's time."""
  rows = [r for r in records if r["method"] == method and r["kind"] == kind]
  seconds = sum(r["batch_seconds"] / r["batch_rows"] for r in rows)
  return seconds, sum(r["new_tokens"] for r in rows)


def tokens_per_second(records: Sequence[dict], method: str, kind: str) -> float:
  seconds, tokens = seconds_and_tokens(records, method, kind)
  return tokens / seconds


def best_fixed_by_set(records: Sequence[dict], fixed: Sequence[str]) -> dict[str, str]:
  """The fixed method with the highest tok/s on each prompt set."""
  kinds = dict.fromkeys(r["kind"] for r in records)
  return {kind: max(fixed, key=lambda m: tokens_per_second(records, m, kind)) for kind in kinds}


def settle_steps(steps: Sequence[tuple[str, int]], best_arm: dict[str, int]) -> list[int | None]:
  """For each change of prompt set in the history, the steps until the chooser starts a
  run of SETTLED_RUN picks of that set's best arm (None if it never does)."""
  segments = []  # (set, arms picked), in stream order
  for kind, arm in steps:
    if not segments or segments[-1][0] != kind:
      segments.append((kind, []))
    segments[-1][1].append(arm)
  settled = []
  for kind, picks in segments[1:]:
    target = best_arm[kind]
    settled.append(next((j for j in range(len(picks) - SETTLED_RUN + 1)
                         if all(a == target for a in picks[j:j + SETTLED_RUN])), None))
  return settled


def compare(records: Sequence[dict], histories: dict[str, dict],
            fixed_arms: dict[str, str]) -> dict[str, dict[str, Any]]:
  """Per chooser: tok/s against the best fixed arm per set, the per-set oracle, its
  share of steps off each set's best arm, and its steps to settle after a change.

  fixed_arms maps each fixed method to the name of its arm as choosers' histories
  name arms ("ngram:3" -> "ngram_3:g4", "ar" -> "ar").
  """
  best = best_fixed_by_set(records, list(fixed_arms))
  kinds = list(best)
  oracle = [seconds_and_tokens(records, best[kind], kind) for kind in kinds]
  oracle_rate = sum(t for _, t in oracle) / sum(s for s, _ in oracle)
  out = {}
  for name, history in histories.items():
    by_set, seconds, tokens = {}, 0.0, 0
    for kind in kinds:
      s, t = seconds_and_tokens(records, name, kind)
      best_s, best_t = seconds_and_tokens(records, best[kind], kind)
      by_set[kind] = dict(tokens_per_second=t / s, best_fixed=best[kind],
                          vs_best_fixed=(t / s) / (best_t / best_s), seconds_lost=s - best_s)
      seconds, tokens = seconds + s, tokens + t
    arm_index = {kind: history["arms"].index(fixed_arms[best[kind]]) for kind in kinds
                 if fixed_arms[best[kind]] in history["arms"]}
    steps = history["steps"]
    off_best = [arm != arm_index.get(kind) for kind, arm in steps]
    out[name] = dict(by_set=by_set, vs_oracle=(tokens / seconds) / oracle_rate,
                     oracle_tokens_per_second=oracle_rate,
                     off_best_share=sum(off_best) / max(len(steps), 1),
                     settle_steps=settle_steps(steps, arm_index) if len(arm_index) == len(kinds)
                     else None)
  return out


def goals(run: dict) -> dict[str, dict[str, Any]]:
  """Per chooser of a stream run (a results file's dict): the four ratios of GOALS;
  the set with the lowest ratio to its best fixed arm (`worst_set`) and the one with
  the lowest ratio to AR (`worst_ar_set`); and which goals it met. Empty for a run
  without choosers, or without AR to hold them to."""
  records = run["records"]
  if not any(r["method"] == "ar" for r in records):
    return {}
  out = {}
  for name, summary in run["summaries"].items():
    if "stream" not in summary:
      continue
    by_set = summary["stream"]["by_set"]
    vs_ar = {kind: row["tokens_per_second"] / tokens_per_second(records, "ar", kind)
             for kind, row in by_set.items()}
    worst_set = min(by_set, key=lambda kind: by_set[kind]["vs_best_fixed"])
    worst_ar_set = min(vs_ar, key=vs_ar.get)
    ratios = dict(vs_best_fixed=summary["vs_best_fixed"],
                  worst_set_vs_best=by_set[worst_set]["vs_best_fixed"],
                  vs_oracle=summary["stream"]["vs_oracle"], worst_set_vs_ar=vs_ar[worst_ar_set])
    out[name] = ratios | dict(worst_set=worst_set, worst_ar_set=worst_ar_set,
                              met={goal: ratios[goal] >= floor for goal, floor in GOALS.items()})
  return out


def read_runs(patterns: Sequence[str]) -> list[tuple[str, dict]]:
  """The results files that match any of the globs, in name (so time) order, each with
  its path."""
  paths = sorted({path for pattern in patterns for path in glob.glob(pattern)})
  return [(path, json.loads(pathlib.Path(path).read_text())) for path in paths]


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


def _arm_name(method: str, gamma: int) -> str:
  """The bandit arm a fixed method runs: "ngram:3" at gamma 4 is "ngram_3:g4"."""
  spec, _, own_gamma = method.partition("@")
  return "ar" if spec == "ar" else f"{spec.replace(':', '_')}:g{own_gamma or gamma}"


def step_costs(run: dict) -> dict:
  """What bench/chooser_steps.py reports of one stream run (a results file's dict plus
  its "_path"), over each method's calls but its first: first calls against later
  ones; each chooser's steps against its arm mix at the run's calibrated costs; each
  call's excess, its time beyond the calibrated cost of the steps it ran (prefill,
  call overhead and stalls); the program's own cost per call, from calls held on one
  arm against that arm's fixed calls with the same steps (`held_call_overhead_ms`);
  and per prompt set, the chooser's speed against the set's best fixed arm had each
  call's excess been the best fixed arm's median (`at_mix_by_set`), or the chooser's
  own median, cutting its worst calls down (`at_own_median_by_set`). Last, each
  chooser's changes of step body per step, and over all the choosers' calls, what a
  change of body and a step add to a call's excess (`body_change_fit`), and what a
  wait for the host that a change adds does (`host_wait_fit`).

  Raises:
    ValueError: for a run at batch > 1 (its records are rows, not calls), or whose
      best fixed arm is none of the bandit's arms (no calibrated cost).
  """
  if any(r["batch_rows"] != 1 for r in run["records"]):
    raise ValueError(f"{run['_path']}: batch > 1; step costs need one call per record")
  costs = run["arm_costs"]
  fixed = sorted({r["method"] for r in run["records"] if not r["method"].startswith("bandit")})
  best = max(fixed, key=lambda m: _rate(_calls(run, m)[1:])[0])
  best_calls = _calls(run, best)[1:]
  best_rate, best_tau, best_step = _rate(best_calls)
  best_arm = _arm_name(best, run["config"]["sampling"]["gamma"])
  if best_arm not in costs:
    raise ValueError(f"{run['_path']}: the best fixed arm {best} is not among the bandit's "
                     f"arms {sorted(costs)}, so its calibrated cost is unknown")
  # The best fixed arm's steps beyond its calibrated cost: prefill and per-call work.
  per_call_share = best_step - costs[best_arm]
  best_excess = _excess_ms(best_calls, [r["loop_steps"] * costs[best_arm] for r in best_calls])
  best_by_set = {}
  for method in fixed:
    for kind, rate in _rates_by_set(_calls(run, method)[1:]).items():
      best_by_set[kind] = max(rate, best_by_set.get(kind, 0.0))
  on_gpu = run["environment"]["device"].startswith("gpu")
  choosers, change_rows, wait_rows = [], [], []
  for method, history in run["bandit_histories"].items():
    calls = _calls(run, method)
    first = _rate(calls[:1])[2]
    rate, tau, step = _rate(calls[1:])
    arms_per_call = [[history["arms"][a] for a in steps]
                     for steps in _arm_steps(run, method)[1:]]
    counts = collections.Counter(arm for arms in arms_per_call for arm in arms)
    shares = {arm: counts[arm] / sum(counts.values()) for arm in history["arms"]}
    mix = sum(share * costs[arm] for arm, share in shares.items())
    steps_seconds = [sum(costs[arm] for arm in arms) for arms in arms_per_call]
    excess = _excess_ms(calls[1:], steps_seconds)
    moves = [_body_moves(arms, history["arms"], on_gpu) for arms in arms_per_call]
    changes = [n for n, _ in moves]
    for arms, (n, waits), ms in zip(arms_per_call, moves, excess["calls"], strict=True):
      change_rows.append((method, len(arms), n, ms))
      wait_rows.append((method, len(arms), waits, ms))
    held = _held_call_overhead_ms(run, calls[1:], arms_per_call, fixed)
    priced = lambda excess_ms: {
        kind: rate / best_by_set[kind] for kind, rate in _rates_by_set(
            calls[1:], [seconds + excess_ms / 1e3 for seconds in steps_seconds]).items()}
    choosers.append(dict(
        method=method, first_call_ms_per_step=1e3 * first, ms_per_step=1e3 * step, tau=tau,
        vs_best_fixed=rate / best_rate, calibrated_mix_ms=1e3 * mix,
        estimated_vs_best_fixed=(tau / (mix + per_call_share)) / best_rate,
        shares=shares, call_excess_ms=excess, at_mix_by_set=priced(best_excess["median"]),
        at_own_median_by_set=priced(excess["median"]), held_call_overhead_ms=held,
        body_changes_per_step=sum(changes) / max(sum(map(len, arms_per_call)), 1)))
  return dict(run=run["_path"], device=run["environment"]["device"],
              temperature=run["config"]["sampling"]["temperature"],
              order=run["config"]["prompts"]["order"], best_fixed=best,
              best_fixed_first_call_ms_per_step=1e3 * _rate(_calls(run, best)[:1])[2],
              best_fixed_ms_per_step=1e3 * best_step, best_fixed_tau=best_tau,
              best_fixed_calibrated_ms=1e3 * costs[best_arm], best_fixed_call_excess_ms=best_excess,
              choosers=choosers, body_change_fit=_excess_fit(change_rows, "change"),
              host_wait_fit=_excess_fit(wait_rows, "wait"))


def _body(arm: str, on_gpu: bool) -> str:
  """The step body that runs a bandit arm (drafters.step_bodies): on a GPU n-gram lookup's
  arms at every gamma share one (drafters.NgramDrafter.shares_step_body); every other
  arm has its own."""
  return arm.partition(":")[0] if on_gpu and arm.startswith("ngram_") else arm


def _body_moves(arms: list[str], bandit_arms: list[str], on_gpu: bool) -> tuple[int, int]:
  """How often a call's steps moved from one step body to another (each move leaves a
  body's loop and enters another's), and the waits for the host those moves added
  (drafters.host_waits), with the bodies in the order of the bandit's arms, as the
  engine loops over them."""
  order = list(dict.fromkeys(_body(arm, on_gpu) for arm in bandit_arms))
  bodies = [order.index(_body(arm, on_gpu)) for arm in arms]
  pairs = list(zip(bodies, bodies[1:]))
  return (sum(a != b for a, b in pairs),
          sum(int(host_waits(a, b, len(order))) for a, b in pairs))


def _excess_fit(rows: list[tuple[str, int, int, float]], event: str) -> dict | None:
  """Least squares over the choosers' later calls (method, steps, events, excess ms):
  each call's excess as a per-chooser intercept (prefill, call overhead) plus
  ms_per_step for each step and ms_per_<event> for each event (a change of step body,
  or a wait for the host it added), with their standard errors. None when the calls
  cannot tell the three apart."""
  methods = sorted({method for method, *_ in rows})
  design = np.zeros((len(rows), len(methods) + 2))
  for i, (method, steps, events, _) in enumerate(rows):
    design[i, methods.index(method)] = 1.0
    design[i, -2:] = steps, events
  excess = np.asarray([ms for *_, ms in rows])
  dof = len(rows) - design.shape[1]
  if dof <= 0 or np.linalg.matrix_rank(design) < design.shape[1]:
    return None
  coef, *_ = np.linalg.lstsq(design, excess, rcond=None)
  residual = excess - design @ coef
  errors = np.sqrt(np.diag(np.linalg.inv(design.T @ design)) * (residual @ residual) / dof)
  return {"ms_per_step": float(coef[-2]), "ms_per_step_se": float(errors[-2]),
          f"ms_per_{event}": float(coef[-1]), f"ms_per_{event}_se": float(errors[-1]),
          "intercept_ms": dict(zip(methods, map(float, coef[:-2]))), "calls": len(rows)}


def _held_call_overhead_ms(run: dict, calls: list[dict], arms_per_call: list[list[str]],
                           fixed: Sequence[str]) -> dict:
  """What the chooser's program costs beyond a fixed arm's, with the choice taken out: over
  the chooser's calls that ran one arm at every step and match, in loop steps and text,
  a later call of that arm's fixed method on the same prompt (the same tokens from the
  same steps), each call's milliseconds beyond that fixed call's; and their median
  (None with no such call). A call committed to its arm (config.bandit.commit) ran that
  arm's own program, not the chooser's, and is left out."""
  gamma = run["config"]["sampling"]["gamma"]
  fixed_by_arm = {_arm_name(method, gamma): method for method in fixed}
  fixed_calls = {(method, r["id"]): r for method in fixed for r in _calls(run, method)[1:]}
  extra = []
  for call, arms in zip(calls, arms_per_call, strict=True):
    if len(set(arms)) != 1 or arms[0] not in fixed_by_arm or call.get("committed"):
      continue
    twin = fixed_calls.get((fixed_by_arm[arms[0]], call["id"]))
    if (twin is not None and twin["loop_steps"] == call["loop_steps"]
        and twin["text"] == call["text"]):
      extra.append(1e3 * (call["batch_seconds"] - twin["batch_seconds"]))
  return dict(calls=extra, median=float(np.median(extra)) if extra else None)


def describe_held(held: dict) -> str:
  """`_held_call_overhead_ms` in a table cell: the median and, in brackets, the calls."""
  return "-" if held["median"] is None else f"{held['median']:.1f} ({len(held['calls'])})"


def _rates_by_set(calls: list[dict], seconds: list[float] | None = None) -> dict[str, float]:
  """Tokens per second of the calls on each prompt set, timed by `seconds` (one per
  call) where given, else as they ran."""
  tokens, spent = collections.Counter(), collections.Counter()
  for i, call in enumerate(calls):
    tokens[call["kind"]] += call["new_tokens"]
    spent[call["kind"]] += call["batch_seconds"] if seconds is None else seconds[i]
  return {kind: tokens[kind] / spent[kind] for kind in tokens}


def _excess_ms(calls: list[dict], steps_seconds: list[float]) -> dict:
  """Each call's milliseconds beyond `steps_seconds`, the calibrated cost of the steps
  it ran, and their median, 90th percentile and maximum."""
  excess = [1e3 * (call["batch_seconds"] - seconds)
            for call, seconds in zip(calls, steps_seconds, strict=True)]
  return dict(calls=excess, median=float(np.median(excess)),
              p90=float(np.percentile(excess, 90)), max=float(max(excess)))
