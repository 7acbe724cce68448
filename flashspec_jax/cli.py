"""run.py and the benchmarks at the terminal: an error is one or two lines, and so is Ctrl-C.

  error: <message>    exit 1; with --verbose, the traceback instead
  interrupted         exit 130 (128 + SIGINT), leaving no results file half written

run.py calls install() once its imports are done; the benchmarks (flashspec_jax/bench/)
start through run(main), which does the same.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
import traceback
import types
from collections.abc import Callable

from absl import app, flags
import tqdm

from flashspec_jax import results

VERBOSE = flags.DEFINE_bool("verbose", False, "Print the traceback of an error.")
# Errors whose message says all there is to say, unlike a bug's: bad flags,
# configs or checkpoints, NaN logits (FloatingPointError), unreadable files.
EXPECTED = (flags.Error, ValueError, FloatingPointError, OSError)


def install() -> None:
  sys.excepthook = print_error
  exit_on_interrupt()


def run(main: Callable[[list[str]], None]) -> None:
  """absl's app.run(main) with install()'s errors and Ctrl-C."""
  install()
  app.run(main, flags_parser=parse_flags)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing for app.run, whose errors, a config file that raises among
  them, come out as print_error's line rather than absl's traceback and usage."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as error:
    if _verbose_asked(argv):
      raise
    # ml_collections wraps an error raised in a config file, traceback and all; the
    # first error of the chain is the file's own.
    cause = error
    while cause.__context__ is not None:
      cause = cause.__context__
    message = " ".join(str(cause).split())
    if cause is not error:
      message = f"{str(error).partition(': ')[0]}: {type(cause).__name__}: {message}"
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def _verbose_asked(argv: list[str]) -> bool:
  """Whether argv holds --verbose, read by hand where absl has not parsed it (yet)."""
  return any(arg in ("--verbose", "--verbose=true", "--verbose=True", "--verbose=1")
             for arg in argv)


def print_error(kind: type[BaseException], error: BaseException,
                trace: types.TracebackType | None) -> None:
  """sys.excepthook, which also sees the errors raised while absl parses the flags."""
  # A bad flag fails before absl has parsed --verbose.
  if VERBOSE.value if flags.FLAGS.is_parsed() else _verbose_asked(sys.argv):
    sys.__excepthook__(kind, error, trace)
  else:
    # Through tqdm, so that a progress bar the error cut short keeps its own line.
    tqdm.tqdm.write(f"error: {describe(error)}", file=sys.stderr)


def describe(error: BaseException) -> str:
  """One line, two for a bug."""
  # ml_collections raises AttributeError(KeyError(message)) for a config field that
  # does not exist, set on the command line or in a config file.
  if isinstance(error, AttributeError) and error.args and isinstance(error.args[0], KeyError):
    return _missing_field(str(error.args[0].args[0]), error.__traceback__)
  # ...and a bare KeyError for a missing group on a --config.<path> flag's way (a bug's
  # KeyError from a ConfigDict names no flag's group, and stays a bug).
  if (isinstance(error, KeyError) and error.args and _raised_in_ml_collections(error)
      and _flag_with_group(_quoted_key(str(error.args[0])))):
    return _missing_field(str(error.args[0]), error.__traceback__)
  # A --config file that cannot be loaded: ml_collections lists where it looked,
  # with the reason last.
  if isinstance(error, OSError) and str(error).startswith("Configuration is not available"):
    return f"cannot load the config file: {str(error).splitlines()[-1].strip()}"
  if isinstance(error, EXPECTED):
    return str(error)
  first_line = str(error).partition("\n")[0]
  return f"{type(error).__name__}: {first_line}\n(run with --verbose for the traceback)"


def _missing_field(message: str, trace: types.TracebackType | None) -> str:
  """A config field that does not exist, named where it was set: the line of the
  --config file that set it, else the --config.<path> flag. ml_collections' message
  names only the path's last part ('Key "x" does not exist ... Other fields present:
  ...' from a file, "'x'" from a flag), perhaps followed by 'Did you mean "y" instead
  of "x"?'."""
  key = _quoted_key(message)
  suggestion = re.search(r'Did you mean "([^"]+)"', message)
  hint = f' (did you mean "{suggestion[1]}"?)' if suggestion else ""
  # The file loads before any --config.<path> flag applies, so its error comes first.
  files = {os.path.realpath(path) for path in _config_files(sys.argv[1:])}
  for frame, line in reversed(list(traceback.walk_tb(trace))):
    if os.path.realpath(frame.f_code.co_filename) in files:
      return f"{frame.f_code.co_filename}:{line}: no config field {key!r}{hint}"
  for arg in sys.argv[1:]:
    flag = arg.partition("=")[0]
    if flag.startswith("--config.") and flag.split(".")[-1] == key:
      return f"{flag}: no such config field{hint}"
  flag = _flag_with_group(key)
  if flag:
    return f"{flag}: no config group {key!r}{hint}"
  return f"no config field {key!r}{hint}"


def _quoted_key(message: str) -> str:
  quoted = re.search(r"""["']([^"']+)["']""", message)
  return quoted[1] if quoted else message


def _flag_with_group(key: str) -> str | None:
  """The --config.<path> flag in sys.argv whose path runs through the group `key`."""
  for arg in sys.argv[1:]:
    flag = arg.partition("=")[0]
    if flag.startswith("--config.") and key in flag.split(".")[1:-1]:
      return flag
  return None


def _raised_in_ml_collections(error: BaseException) -> bool:
  frames = list(traceback.walk_tb(error.__traceback__))
  return bool(frames) and f"{os.sep}ml_collections{os.sep}" in frames[-1][0].f_code.co_filename


def _config_files(argv: list[str]) -> list[str]:
  """The --config=<file>[:<arg>] files named in argv (either form of the flag)."""
  values = [arg.partition("=")[2] for arg in argv if arg.startswith("--config=")]
  values += [value for flag, value in zip(argv, argv[1:]) if flag == "--config"]
  return [value.partition(":")[0] for value in values]


def exit_on_interrupt() -> None:
  """Makes SIGINT print "interrupted" and exit 130 at once, wherever the main thread is.

  A Python signal handler runs only when the main thread next executes bytecode,
  which during an XLA compile can be many seconds away; and unwinding from it
  tears the interpreter down with XLA's threads still running, the likely cause
  of the segfaults (exit -11) seen on a GPU. So the C-level handler only writes
  the signal number to a pipe (signal.set_wakeup_fd), a thread blocked on the
  pipe wakes at once, and it ends the process with os._exit, which skips the
  teardown.
  """
  read_fd, write_fd = os.pipe()
  os.set_blocking(write_fd, False)  # the C handler must never wait
  signal.set_wakeup_fd(write_fd)
  # The wakeup fd hears only signals with a Python handler; this one leaves the work to the thread.
  signal.signal(signal.SIGINT, lambda signum, frame: None)
  threading.Thread(target=_exit_when_interrupted, args=(read_fd,), daemon=True).start()


def _exit_when_interrupted(read_fd: int) -> None:
  while signal.SIGINT not in os.read(read_fd, 64):
    pass
  # Nothing below may keep the process alive, such as a flush to a stalled reader.
  threading.Timer(2.0, os._exit, [130]).start()
  results.abandon_writes()
  sys.stdout.flush()
  # A progress bar leaves its line unended: the word goes on a line of its own.
  os.write(sys.stderr.fileno(), b"\ninterrupted\n" if tqdm.tqdm._instances else b"interrupted\n")
  os._exit(130)
