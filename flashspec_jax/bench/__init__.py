"""Benchmarks: each prints a table and writes JSON under results/<name>/."""

from __future__ import annotations

import pathlib
from collections.abc import Callable

from absl import flags

from flashspec_jax import environment, results


def run_and_write(name: str, bench: Callable[..., dict],
                  options: dict[str, flags.FlagHolder]) -> tuple[dict, pathlib.Path]:
  """`bench` called with the values of `options` but --out, and the results file it
  gives, written to results/<name>/ under --out. The directory is checked before the
  run, and the environment captured as it starts, as results.write asks."""
  values = {option: holder.value for option, holder in options.items()}
  out = values.pop("out")
  results.check_writable(out)
  env = environment.describe()
  result = bench(**values)
  return result, results.write(name, result, directory=out, env=env)
