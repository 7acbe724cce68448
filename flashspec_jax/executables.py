"""Compiled programs kept whole on disk, so that a new process neither traces nor lowers.

JAX's persistent compilation cache (environment.enable_compilation_cache) spares a
new process XLA's compile, but it is keyed by the lowered program: the process
still traces and lowers every program before it can look, which is seconds for a
bandit over 30-layer models (results/compile_time/). This store keys a compiled
executable by what fixes it before tracing: the decoder (a frozen dataclass whose
repr spells out its configs), the inputs' tree, shapes, dtypes and shardings, the
compiler options, JAX's version, settings and devices, XLA_FLAGS, and a digest
of this package's source, so an edited engine never loads a stale program. It lives in a
folder of JAX's cache directory and is on exactly when that cache is.

Only programs this process compiled are stored: one that JAX loaded from its own
cache serializes (on the CPU at least) without the code of its fused kernels, and
fails when run after loading ("Function ... not found"). Loading runs code from the
file, like JAX's own cache: only this user's cache directory is read.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import pathlib
import pickle
import re
import threading
import time
from typing import Any

import jax
from jax.experimental import serialize_executable

from flashspec_jax import results

_FOLDER = "flashspec_programs"
_ADDRESS = re.compile(r" at 0x[0-9a-f]+")
# JAX's cache hits, per thread: XLA compiles side by side (pipeline.compile_ahead), and
# JAX records each hit in the thread that compiles.
_jax_cache_hits = threading.local()


def _count_jax_cache_hit(event: str, **kwargs) -> None:
  del kwargs
  if event == "/jax/compilation_cache/cache_hits":
    _jax_cache_hits.count = getattr(_jax_cache_hits, "count", 0) + 1


jax.monitoring.register_event_listener(_count_jax_cache_hit)


@functools.cache
def _source_digest() -> str:
  """The package's Python source, hashed: the kernels are a subpackage on disk elsewhere."""
  from flashspec_jax import kernels  # pylint: disable=import-outside-toplevel
  roots = {pathlib.Path(__file__).parent, pathlib.Path(kernels.__file__).parent}
  digest = hashlib.sha256()
  for root in sorted(roots):
    for path in sorted(root.rglob("*.py")):
      digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
  return digest.hexdigest()


def _describe(leaf) -> str:
  sharding = getattr(leaf, "sharding", None)
  return f"{jax.typeof(leaf)!r}@{sharding}"


def program_key(decoder, inputs, compiler_options: dict[str, Any] | None) -> str:
  """What fixes the executable `decoder.lower(*inputs).compile(compiler_options)` builds."""
  leaves, tree = jax.tree.flatten(inputs)
  devices = sorted({str(d.device_kind) for d in jax.devices()})
  # Every JAX setting, since some change what a trace computes (x64, the PRNG's
  # partitionable mode, default matmul precision); the rest only split the store.
  parts = [repr(decoder), str(tree), *map(_describe, leaves),
           repr(sorted((compiler_options or {}).items())), jax.__version__,
           jax.default_backend(), repr(devices), str(jax.device_count()),
           os.environ.get("XLA_FLAGS", ""), repr(sorted(jax.config.values.items(), key=str)),
           _source_digest()]
  return hashlib.sha256(_ADDRESS.sub("", "\n".join(parts)).encode()).hexdigest()


def _path(key: str) -> pathlib.Path | None:
  if not jax.config.jax_enable_compilation_cache or not jax.config.jax_compilation_cache_dir:
    return None
  return pathlib.Path(jax.config.jax_compilation_cache_dir) / _FOLDER / f"{key}.pkl"


def load(key: str, inputs) -> jax.stages.Compiled | None:
  """The stored executable for key, or None if there is none or it no longer loads."""
  path = _path(key)
  if path is None or not path.exists():
    return None
  # The inputs' client: an engine may run on the CPU beside a GPU.
  client = next(iter(jax.tree.leaves(inputs)[0].sharding.device_set)).client
  try:
    with open(path, "rb") as file:
      payload, in_tree, out_tree, device_ids = pickle.load(file)
    by_id = {device.id: device for device in client.devices()}
    compiled = serialize_executable.deserialize_and_load(
        payload, in_tree, out_tree, backend=client,
        execution_devices=[by_id[i] for i in device_ids])
  except Exception as error:  # pylint: disable=broad-except
    # A file from an older JAX, or cut short by a full disk: compile again.
    logging.warning("compiled program %s did not load (%s); compiling it again", path, error)
    path.unlink(missing_ok=True)
    return None
  jax.monitoring.record_event("/flashspec/executables/hits")
  return compiled


def compile_and_store(key: str, lowered: jax.stages.Lowered,
                      compiler_options: dict[str, Any] | None = None) -> jax.stages.Compiled:
  """lowered, compiled; stored under key unless JAX took it from its own cache."""
  hits = getattr(_jax_cache_hits, "count", 0)
  compiled = lowered.compile(compiler_options)
  path = _path(key)
  if path is None or getattr(_jax_cache_hits, "count", 0) != hits:
    return compiled
  try:
    stored = (*serialize_executable.serialize(compiled),
              [device.id for device in compiled.runtime_executable().local_devices()])
  except (ValueError, NotImplementedError) as error:
    logging.info("compiled program not stored: %s", error)
    return compiled
  path.parent.mkdir(parents=True, exist_ok=True)
  with results.open_atomic(path, "wb") as file:
    pickle.dump(stored, file)
  return compiled


def load_or_compile(decoder, inputs, compiler_options=None) -> tuple[Any, float, float]:
  """decoder's executable for inputs, from the store or lowered and compiled (then
  stored); with the seconds spent lowering and compiling (or loading)."""
  start = time.perf_counter()
  key = program_key(decoder, inputs, compiler_options)
  compiled = load(key, inputs)
  if compiled is not None:
    return compiled, 0.0, time.perf_counter() - start
  lowered = decoder.lower(*inputs)
  lowered_at = time.perf_counter()
  compiled = compile_and_store(key, lowered, compiler_options)
  return compiled, lowered_at - start, time.perf_counter() - lowered_at
