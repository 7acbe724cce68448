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
  }


def on_gpu() -> bool:
  return jax.default_backend() == "gpu"
