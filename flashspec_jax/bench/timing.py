"""Timing on device and the bandwidth floor, measured in the same process.

Device work is asynchronous, so every timing blocks on the result. A program
that loops n times inside XLA is timed at two values of n and the difference
divided, which removes launch, dispatch and input-copy costs from per-step time.
"""

from __future__ import annotations

import json
import pathlib
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from flashspec_jax import environment


def wall_times(fn: Callable[[], Any], repeats: int, warmup: int = 2) -> list[float]:
  """Seconds per call of fn(), blocking on its result, after warm-up calls."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return times


def per_iteration(run: Callable[[int], Any], short: int, long: int, repeats: int) -> dict:
  """Seconds per loop iteration of run(n), from the medians at n=short and n=long."""
  short_times = wall_times(lambda: run(short), repeats)
  long_times = wall_times(lambda: run(long), repeats)
  seconds = (statistics.median(long_times) - statistics.median(short_times)) / (long - short)
  return dict(seconds=seconds, short=short, long=long, short_times=short_times,
              long_times=long_times)


def copy_bandwidth(num_bytes: int = 4 << 30, repeats: int = 20) -> dict:
  """Device copy bandwidth, counting bytes read plus bytes written, on random data."""
  x = jax.jit(lambda key: jax.random.uniform(key, (num_bytes // 2,)).astype(jnp.bfloat16))(
      jax.random.key(0))
  copy = jax.jit(lambda a: a + jnp.bfloat16(1))
  times = wall_times(lambda: copy(x), repeats)
  return dict(bytes_per_second=2 * x.nbytes / statistics.median(times), array_bytes=x.nbytes,
              times=times)


def write_results(name: str, payload: dict, directory: str | pathlib.Path = "results") -> pathlib.Path:
  """Writes payload plus the environment record to <directory>/<name>/<date>_<sha>.json."""
  env = environment.describe()
  out_dir = pathlib.Path(directory) / name
  out_dir.mkdir(parents=True, exist_ok=True)
  path = out_dir / f"{env['date'][:10]}_{env['git_sha'][:8]}.json"
  path.write_text(json.dumps({"environment": env, **payload}, indent=2) + "\n")
  return path
