"""Results files: every published number comes from one of these.

A run writes results/<name>/<date>T<time>Z_<sha>.json holding the environment
record (command, git sha and dirty flag, device, versions, date), the payload
(config, summary, raw timings) and, when given, per-prompt records, which also
go to a CSV beside it. No file is ever replaced: a run started in the same
second as another, at the same commit, gets a -2, -3, ... suffix. Every file
appears whole or not at all (open_atomic), even if the run is interrupted.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import functools
import io
import itertools
import json
import os
import pathlib
import threading
from collections.abc import Iterator, Sequence
from typing import IO

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
  started = datetime.datetime.fromisoformat(env["date"]).astimezone(datetime.timezone.utc)
  stem = f"{started:%Y-%m-%dT%H%M%SZ}_{env['git_sha'][:8]}"
  body = {"environment": env, **payload}
  if records:
    body["records"] = list(records)
  text = _json_text(body) + "\n"
  table = _csv_text(records) if records else None
  # Whoever creates <stem>.json owns the stem, so the CSV and the plots beside it
  # need no check of their own. The CSV is renamed into place after the JSON (an
  # ExitStack ends the last block first), and neither appears if a write fails.
  for n in itertools.count(1):
    path = out_dir / (f"{stem}.json" if n == 1 else f"{stem}-{n}.json")
    try:
      with contextlib.ExitStack() as files:
        if table:
          files.enter_context(open_atomic(path.with_suffix(".csv"), "w", newline="")).write(table)
        files.enter_context(open_atomic(path, "x")).write(text)
    except FileExistsError:
      continue
    return path


def _json_text(value, indent: str = "") -> str:
  """JSON with a line per dict entry and each list of plain values on one line: a
  stream run's per-step lists, one number a line, made its file nearly twice as big."""
  inner = indent + "  "
  if isinstance(value, dict) and value:
    # A key as json.dumps writes one: True as "true", 1.5 as "1.5".
    entries = (f"{inner}{json.dumps({key: 0})[1:-4]}: {_json_text(item, inner)}"
               for key, item in value.items())
    return "{\n" + ",\n".join(entries) + f"\n{indent}}}"
  if isinstance(value, (list, tuple)) and any(isinstance(item, (dict, list, tuple))
                                              for item in value):
    return "[\n" + ",\n".join(inner + _json_text(item, inner) for item in value) + f"\n{indent}]"
  return json.dumps(value, default=str)


def _csv_text(records: Sequence[dict]) -> str:
  table = io.StringIO()
  writer = csv.DictWriter(table, fieldnames=sorted({key for record in records for key in record}))
  writer.writeheader()
  writer.writerows(records)
  return table.getvalue()


# Temporary files of the writes in progress. The lock guards their creation, so
# that abandon_writes, which keeps it, knows of every one that will ever exist.
_in_flight: set[pathlib.Path] = set()
_creating = threading.Lock()


@contextlib.contextmanager
def open_atomic(path: str | pathlib.Path, mode: str = "w", **kwargs) -> Iterator[IO]:
  """Opens a temporary file beside `path` for the block to write; it becomes `path`
  in one rename when the block ends, and is removed if the block raises.

  mode is "w" (replace `path`) or "x" (raise FileExistsError if `path` exists),
  with "b" for bytes; kwargs go to open().
  """
  path = pathlib.Path(path)
  temporary = path.with_name(f".{path.name}.{os.urandom(4).hex()}.tmp")
  with _creating:
    # The block gets an open file rather than a name, so nothing can create the
    # temporary file again after abandon_writes has removed it.
    file = open(temporary, mode.replace("w", "x"), **kwargs)
    _in_flight.add(temporary)
  try:
    with file:
      yield file
    if "x" in mode:
      os.link(temporary, path)  # unlike a rename, fails if `path` exists
    else:
      os.replace(temporary, path)
  finally:
    temporary.unlink(missing_ok=True)
    _in_flight.discard(temporary)


def abandon_writes() -> None:
  """Removes the temporary files of unfinished writes and blocks new ones, for a
  handler that is about to end the process in the middle of whatever it was doing."""
  _creating.acquire()
  for temporary in _in_flight.copy():
    temporary.unlink(missing_ok=True)


# eagle:smollm2 reads EAGLE-3's fused features (the streams after layers 2, 15 and 27)
# since the commit that shipped them; before, it read the last layer's. Runs at the
# training's commit read them from where training wrote them on the device machine
# (the model card gives the file's sha256); later runs that name that path read whatever
# was trained there next. Runs are told apart by date, which assumes each ran a checkout
# of its day.
FUSED_DRAFTER_SHIPPED = "2026-12-07T08:23:14+00:00"
FUSED_DRAFTER_UNCOMMITTED = ("5515e4a3", "/root/new/model.safetensors")


def fused_drafter(data: dict) -> bool:
  """Whether a results file's eagle:smollm2 is the fused-feature drafter (a file without
  a config, a benchmark's, ran the shipped weights of its day)."""
  from flashspec_jax.config import parse_eagle_checkpoint  # config imports the engine
  env = data["environment"]
  given = parse_eagle_checkpoint(data.get("config", {}).get("eagle_checkpoint", ""))
  path = given.get(None) or given.get("smollm2")
  if path:
    return (env["git_sha"][:8], path) == FUSED_DRAFTER_UNCOMMITTED
  return env["date"] >= FUSED_DRAFTER_SHIPPED


def drafter_gammas(data: dict) -> tuple[int, ...]:
  """The gammas of a run's feature-drafter arms (config.arms) when there are several: a
  stream whose choosers could pick the drafter's gamma; () otherwise."""
  from flashspec_jax.config import ArmSpec  # config imports the engine
  config = data["config"]
  drafters = [spec for spec in map(ArmSpec.parse, config["arms"].split(","))
              if spec.kind == "eagle"]
  if len(drafters) < 2:
    return ()
  return tuple(spec.gamma or config["sampling"]["gamma"] for spec in drafters)


def wrote_shipped_drafter(data: dict) -> bool:
  """Whether a training results file is the run that wrote the shipped eagle:smollm2:
  the weights' header names that run's commit and steps. Later runs of the recipe
  (the full schedule, say) are results without being what the package ships."""
  header = _shipped_drafter_header()
  return (data["environment"]["git_sha"] == header.get("git_sha")
          and str(data["steps"]) == header.get("steps"))


@functools.cache
def _shipped_drafter_header() -> dict[str, str]:
  """The shipped eagle:smollm2's header, read once for every file the report weighs."""
  import safetensors  # pylint: disable=import-outside-toplevel
  from flashspec_jax.loading.eagle import shipped_path  # loading imports jax
  with safetensors.safe_open(str(shipped_path("smollm2")), "numpy") as file:
    return file.metadata() or {}
