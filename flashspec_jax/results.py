"""Results files: every published number comes from one of these.

A run writes results/<name>/<date>_<sha>.json holding the environment record
(command, git sha and dirty flag, device, versions, date), the payload (config,
summary, raw timings) and, when given, per-prompt records, which also go to a
CSV beside it.
"""

from __future__ import annotations

import csv
import json
import os
import pathlib
from collections.abc import Sequence

from flashspec_jax import environment


def check_writable(directory: str | pathlib.Path) -> pathlib.Path:
  """Fails before any work starts if results could not be written."""
  directory = pathlib.Path(directory)
  try:
    directory.mkdir(parents=True, exist_ok=True)
  except OSError as error:
    raise ValueError(f"cannot create the results directory {directory}: {error}") from error
  if not os.access(directory, os.W_OK):
    raise ValueError(f"the results directory {directory} is not writable")
  return directory


def write(name: str, payload: dict, records: Sequence[dict] = (),
          directory: str | pathlib.Path = "results", env: dict | None = None) -> pathlib.Path:
  """Writes the results file; pass `env` captured when the run started, so the sha
  and dirty flag describe the code that ran."""
  env = env or environment.describe()
  out_dir = check_writable(pathlib.Path(directory) / name)
  stem = f"{env['date'][:10]}_{env['git_sha'][:8]}"
  path = out_dir / f"{stem}.json"
  body = {"environment": env, **payload}
  if records:
    body["records"] = list(records)
  path.write_text(json.dumps(body, indent=2, default=str) + "\n")
  if records:
    fields = sorted({key for record in records for key in record})
    with open(out_dir / f"{stem}.csv", "w", newline="") as f:
      writer = csv.DictWriter(f, fieldnames=fields)
      writer.writeheader()
      writer.writerows(records)
  return path
