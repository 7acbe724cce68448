"""Where a number came from: command, git sha, device, versions, date."""

from __future__ import annotations

import datetime
import os
import pathlib
import platform
import subprocess
import sys

import flax
import jax

REPO = pathlib.Path(__file__).resolve().parents[1]


def _git(*args: str) -> str:
  try:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def command_line() -> str:
  main = sys.modules.get("__main__")
  module = getattr(getattr(main, "__spec__", None), "name", None)
  argv = ["-m", module, *sys.argv[1:]] if module else sys.argv
  return " ".join(["python", *argv])


def describe() -> dict:
  """The environment record every results file carries.

  On machines that receive a copy of the tree without .git (the lent GPU), the
  sha and dirty flag come from FLASHSPEC_GIT_SHA and FLASHSPEC_GIT_DIRTY.
  """
  device = jax.devices()[0]
  return {
      "command": command_line(),
      "git_sha": os.environ.get("FLASHSPEC_GIT_SHA") or _git("rev-parse", "HEAD"),
      "git_dirty": (os.environ["FLASHSPEC_GIT_DIRTY"] == "1" if "FLASHSPEC_GIT_DIRTY" in os.environ
                    else bool(_git("status", "--porcelain", "--untracked-files=no"))),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "device": f"{device.platform}:{device.device_kind}",
      "num_devices": jax.device_count(),
      "jax": jax.__version__,
      "flax": flax.__version__,
      "python": platform.python_version(),
      "host": platform.node(),
      # XLA's options change what a program compiles to, and so its timings.
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }


def on_gpu() -> bool:
  """Whether computations placed nowhere in particular run on a GPU: the device of
  an enclosing `jax.default_device(...)` if any (an engine built for the CPU on a
  GPU host), else JAX's default backend."""
  device = jax.config.jax_default_device
  if device is None:
    return jax.default_backend() == "gpu"
  return (device if isinstance(device, str) else device.platform) in ("gpu", "cuda", "rocm")


def user_cache_dir() -> pathlib.Path:
  """FlashSpec's per-user cache: $FLASHSPEC_CACHE_DIR, else $XDG_CACHE_HOME/flashspec_jax,
  else ~/.cache/flashspec_jax."""
  if os.environ.get("FLASHSPEC_CACHE_DIR"):
    return pathlib.Path(os.environ["FLASHSPEC_CACHE_DIR"])
  base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
  return pathlib.Path(base) / "flashspec_jax"


def enable_compilation_cache(setting: str = "auto") -> pathlib.Path | None:
  """Turns on JAX's persistent compilation cache, so a later process loads what an
  earlier one compiled instead of compiling it again (seconds per program).

  setting: "auto" keeps a directory JAX was already given (JAX_COMPILATION_CACHE_DIR),
  else uses user_cache_dir()/xla; "" turns the cache off; anything else is the
  directory. Returns the directory in use, or None.
  """
  if not setting:
    jax.config.update("jax_enable_compilation_cache", False)
    return None
  if setting == "auto":
    setting = jax.config.jax_compilation_cache_dir or str(user_cache_dir() / "xla")
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_compilation_cache_dir", setting)
  # Every program, however fast it compiled: a run compiles dozens of small ones.
  # No size cap (jax_compilation_cache_max_size): its LRU eviction fails every write
  # to a directory that an uncapped process wrote to (it expects an access-time file
  # beside each entry; seen as "Error writing persistent compilation cache entry").
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  return pathlib.Path(setting)
