"""PNG figures that sit beside the results files they are drawn from."""

from __future__ import annotations

import pathlib

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from flashspec_jax import results  # noqa: E402


def _save(fig: plt.Figure, path: pathlib.Path) -> pathlib.Path:
  try:
    fig.tight_layout()
    with results.open_atomic(path, "wb") as file:
      fig.savefig(file, format="png", dpi=120)
  finally:
    plt.close(fig)
  return path


def regret_curves(curves: dict[str, np.ndarray], path: pathlib.Path, title: str,
                  bound: float | None = None, switch_at: int | None = None) -> pathlib.Path:
  """Mean cumulative regret per strategy over seeds ([seeds, T] each), with a 10-90% band."""
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for name, regret in curves.items():
    steps = np.arange(1, regret.shape[1] + 1)
    ax.plot(steps, regret.mean(axis=0), label=name)
    ax.fill_between(steps, np.percentile(regret, 10, axis=0), np.percentile(regret, 90, axis=0),
                    alpha=0.2)
  if bound is not None:
    ax.axhline(bound, color="black", linestyle="--", label=f"UCB1 bound at T ({bound:.0f})")
  if switch_at:
    ax.axvline(switch_at, color="grey", linestyle=":", label="best arm changes")
  ax.set(xlabel="pulls", ylabel="cumulative regret", title=title)
  ax.legend()
  return _save(fig, path)


def arm_timeline(history: dict, path: pathlib.Path, title: str) -> pathlib.Path:
  """The arm chosen at every loop step, with the prompt kind of each segment shaded."""
  steps = history["steps"]
  arms = np.array([arm for _, arm in steps])
  fig, ax = plt.subplots(figsize=(9, 3.5))
  start = 0
  for i, kind in enumerate(dict.fromkeys(k for k, _ in steps)):
    end = start + sum(1 for k, _ in steps if k == kind)
    ax.axvspan(start, end, color=f"C{i}", alpha=0.08)
    ax.text((start + end) / 2, len(history["arms"]) - 0.4, kind, ha="center")
    start = end
  ax.scatter(np.arange(len(arms)), arms, s=4, color="black")
  ax.set(yticks=range(len(history["arms"])), yticklabels=history["arms"], xlabel="loop step",
         title=title, ylim=(-0.5, len(history["arms"]) - 0.1))
  return _save(fig, path)


def sweep(points: list[dict], field: str, path: pathlib.Path) -> pathlib.Path:
  """Throughput and alpha of every method against the swept value."""
  values = [p["value"] for p in points]
  methods = list(points[0]["summaries"])
  fig, (speed, alpha) = plt.subplots(1, 2, figsize=(10, 4))
  for name in methods:
    speed.plot(values, [p["summaries"][name]["tokens_per_second"] for p in points], "o-",
               label=name)
    if "alpha" in points[0]["summaries"][name]:
      alpha.plot(values, [p["summaries"][name]["alpha"] for p in points], "o-", label=name)
  speed.set(xlabel=field, ylabel="tokens / s", title="throughput")
  alpha.set(xlabel=field, ylabel="alpha", title="acceptance (to the first rejection)")
  for ax in (speed, alpha):
    ax.set_xscale("log", base=2)
    if ax.get_legend_handles_labels()[0]:  # an AR-only sweep has no alpha
      ax.legend()
  return _save(fig, path)


def training(curve: list[dict], validation: dict[str, dict], path: pathlib.Path) -> pathlib.Path:
  """A drafter's training loss, and its greedy chain acceptance per draft position on
  the validation split, per prompt kind."""
  fig, (loss, accept) = plt.subplots(1, 2, figsize=(10, 4))
  loss.plot([p["step"] for p in curve], [p["loss"] for p in curve])
  loss.set(xlabel="step", ylabel="soft cross-entropy (mean over draft steps)", title="training",
           yscale="log")
  for kind, stats in validation.items():
    positions = np.arange(1, len(stats["step_acceptance"]) + 1)
    accept.plot(positions, stats["step_acceptance"], "o-", label=kind)
  accept.set(xlabel="draft position", ylabel="accepted (greedy, whole chain)", ylim=(0, 1),
             title="validation", xticks=np.arange(1, 1 + max(
                 (len(s["step_acceptance"]) for s in validation.values()), default=1)))
  accept.legend()
  return _save(fig, path)
