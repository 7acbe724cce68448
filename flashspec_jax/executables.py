"""Compiled programs kept whole on disk, so that a new process neither traces nor lowers.

JAX's persistent compilation cache (environment.enable_compilation_cache) spares a
new process XLA's compile, but it is keyed by the lowered program: the process
still traces and lowers every program before it can look, which is seconds for a
bandit over 30-layer models (results/compile_time/). This store keys a compiled
executable by what fixes it before tracing: the decoder (a frozen dataclass whose
repr spells out its configs), the inputs' tree, shapes, dtypes, shardings and
devices, the compiler options, the versions of JAX, jaxlib, Flax and the device
platform, JAX's settings, XLA_FLAGS, and a digest of this package's source as it
was imported, so an edited engine never loads a stale program. Functions in the
decoder (a custom verify_fn) enter the key by name, so two must not share one. It
lives in a folder of JAX's cache directory and is on exactly when that cache is.

A program is stored only when XLA compiled it in this process, that is when JAX's
cache missed it: one that JAX loaded from its cache, or handed back from memory
after such a load, serializes (on the CPU at least) without the code of its fused
kernels and fails when run after loading ("Function ... not found"). So after an
edit to the package, whose programs JAX's cache still holds, the store fills again
only as JAX's entries are compiled anew. Loading a file runs code from it, as
loading JAX's own cache entries does: the store trusts the directory JAX's cache
was given.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
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
# JAX's cache misses, per thread: XLA compiles side by side (pipeline.compile_ahead),
# and JAX records each miss in the thread that compiles.
_jax_cache_misses = threading.local()


def _count_jax_cache_miss(event: str, **kwargs) -> None:
  del kwargs
  if event == "/jax/compilation_cache/cache_misses":
    _jax_cache_misses.count = getattr(_jax_cache_misses, "count", 0) + 1


jax.monitoring.register_event_listener(_count_jax_cache_miss)


def _source_digest() -> str:
  """The package's Python source, hashed (the kernels are a subpackage kept elsewhere)."""
  from flashspec_jax import kernels  # pylint: disable=import-outside-toplevel
  roots = {pathlib.Path(__file__).parent, *map(pathlib.Path, kernels.__path__)}
  digest = hashlib.sha256()
  for root in sorted(roots):
    for path in sorted(root.rglob("*.py")):
      digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
  return digest.hexdigest()


# At import: a process whose files are edited afterwards still runs the code it imported.
_SOURCE_DIGEST = _source_digest()


def _describe(leaf) -> str:
  sharding = getattr(leaf, "sharding", None)
  devices = ([] if sharding is None else sharding.mesh.device_ids.tolist()
             if isinstance(sharding, jax.sharding.NamedSharding)
             else sorted(d.id for d in sharding.device_set))
  return f"{jax.typeof(leaf)!r}@{sharding}@{devices}"


def program_key(decoder, inputs, compiler_options: dict[str, Any] | None) -> str:
  """What fixes the executable `decoder.lower(*inputs).compile(compiler_options)` builds."""
  leaves, tree = jax.tree.flatten(inputs)
  devices = sorted({str(d.device_kind) for d in jax.devices()})
  versions = [importlib.metadata.version(name) for name in ("jax", "jaxlib", "flax")]
  # Every JAX setting, since some change what a trace computes (x64, the PRNG's
  # partitionable mode, default matmul precision); the rest only split the store.
  parts = [repr(decoder), str(tree), *map(_describe, leaves),
           repr(sorted((compiler_options or {}).items())), repr(versions),
           jax.default_backend(), jax.devices()[0].client.platform_version, repr(devices),
           str(jax.device_count()), os.environ.get("XLA_FLAGS", ""),
           repr(sorted(jax.config.values.items(), key=str)), _SOURCE_DIGEST]
  return hashlib.sha256(_ADDRESS.sub("", "\n".join(parts)).encode()).hexdigest()


def _path(key: str) -> pathlib.Path | None:
  directory = jax.config.jax_compilation_cache_dir
  # A remote cache (gs://...) is JAX's to read; the store keeps to local folders.
  if not jax.config.jax_enable_compilation_cache or not directory or "://" in directory:
    return None
  return pathlib.Path(directory) / _FOLDER / f"{key}.pkl"


def load(key: str, inputs) -> jax.stages.Compiled | None:
  """The stored executable for key, or None if there is none or it no longer loads."""
  path = _path(key)
  if path is None or not path.exists():
    return None
  # The inputs' client: an engine may run on the CPU beside a GPU.
  placed = next(leaf for leaf in jax.tree.leaves(inputs) if isinstance(leaf, jax.Array))
  client = next(iter(placed.sharding.device_set)).client
  try:
    with open(path, "rb") as file:
      payload, in_tree, out_tree, device_ids = pickle.load(file)
  except Exception as error:  # pylint: disable=broad-except
    # A damaged file: removed, so that the program can be stored again.
    logging.warning("stored program %s is unreadable (%s); compiling it again", path, error)
    path.unlink(missing_ok=True)
    return None
  try:
    by_id = {device.id: device for device in client.devices()}
    compiled = serialize_executable.deserialize_and_load(
        payload, in_tree, out_tree, backend=client,
        execution_devices=[by_id[i] for i in device_ids])
  except Exception as error:  # pylint: disable=broad-except
    # Out of device memory, say: the file stays for a later process.
    logging.warning("stored program %s did not load (%s); compiling it again", path, error)
    return None
  jax.monitoring.record_event("/flashspec/executables/hits")
  return compiled


def compile_and_store(key: str, lowered: jax.stages.Lowered,
                      compiler_options: dict[str, Any] | None = None) -> jax.stages.Compiled:
  """lowered, compiled; stored under key when XLA compiled it here (JAX's cache missed).

  A program that cannot be stored (a full or read-only disk) is still returned.
  """
  misses = getattr(_jax_cache_misses, "count", 0)
  compiled = lowered.compile(compiler_options)
  path = _path(key)
  if path is None or getattr(_jax_cache_misses, "count", 0) == misses:
    return compiled
  try:
    stored = (*serialize_executable.serialize(compiled),
              [device.id for device in compiled.runtime_executable().local_devices()])
    path.parent.mkdir(parents=True, exist_ok=True)
    with results.open_atomic(path, "wb") as file:
      pickle.dump(stored, file)
  except Exception as error:  # pylint: disable=broad-except
    logging.warning("compiled program not stored in %s: %s", path, error)
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
