"""Reading a JAX profiler trace of generation calls back: per call, the GPU kernels,
their busy time, the device-to-host copies, the command-buffer launches and the
host's re-recordings of command buffers; and what
a step count cannot explain: the time before the first and after the last GPU
activity, and the host's own spans by name. And, for any trace, the host's time by
span name (host_self_times), which under a compile names XLA's passes and phases.

Kept apart from bench/trace_calls.py, which runs the calls, so that tests and other
tools can read traces without running any.
"""

from __future__ import annotations

import bisect
import collections
import gzip
import json
import pathlib
import statistics

import numpy as np

# Each traced call runs under a profiler annotation of this name and its index.
ANNOTATION = "flashspec call "
# Host spans kept per call, the longest in total by name.
HOST_SPANS = 12


def _union_us(intervals: list[tuple[float, float]]) -> float:
  busy, end = 0.0, -np.inf
  for start, stop in sorted(intervals):
    if stop > end:
      busy += stop - max(start, end)
      end = stop
  return busy


def _load(trace_dir: pathlib.Path) -> tuple[list[dict], dict[int, str]]:
  """The trace's events, and its processes' names by pid."""
  path = next(trace_dir.glob("**/perfetto_trace.json.gz"), None)
  if path is None:
    raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}")
  with gzip.open(path, "rt") as file:
    events = json.load(file)
  events = events["traceEvents"] if isinstance(events, dict) else events
  return events, {e["pid"]: e["args"]["name"] for e in events
                  if e.get("ph") == "M" and e.get("name") == "process_name"}


def host_self_times(trace_dir: pathlib.Path, top: int = 30) -> dict:
  """Where the host's time went, by span name: each span's own time (how long it was
  open, waiting included, less the time its children on the same thread were open),
  summed over the host's threads, the `top` largest, and the same names' inclusive
  sums. XLA names its compile passes and phases as spans, so under a compile this
  says which of them the seconds went to. Summed over threads these are
  thread-seconds: a thread that waits for others counts its wait as its own."""
  events, process = _load(trace_dir)
  threads = collections.defaultdict(list)
  for e in events:
    if e.get("ph") == "X" and "GPU" not in process.get(e["pid"], ""):
      threads[e["pid"], e["tid"]].append(e)
  own, inclusive = collections.Counter(), collections.Counter()
  for spans in threads.values():
    stack = []  # the open spans enclosing the current one, innermost last
    for e in sorted(spans, key=lambda e: (e["ts"], -e["dur"])):
      while stack and stack[-1]["ts"] + stack[-1]["dur"] <= e["ts"]:
        stack.pop()
      if stack:  # a span that outlives its parent takes only their overlap from it
        parent_end = stack[-1]["ts"] + stack[-1]["dur"]
        own[stack[-1]["name"]] -= min(e["ts"] + e["dur"], parent_end) - e["ts"]
      own[e["name"]] += e["dur"]
      inclusive[e["name"]] += e["dur"]
      stack.append(e)
  names = [name for name, _ in own.most_common(top)]
  return dict(threads=len(threads),
              self_seconds={name: own[name] / 1e6 for name in names},
              inclusive_seconds={name: inclusive[name] / 1e6 for name in names})


def summarise(trace_dir: pathlib.Path, calls: list[dict]) -> dict:
  """Per call and per method: GPU kernels, busy time, device-to-host copies,
  command-buffer (CUDA graph) launches and updates, and the host's microseconds in
  those updates, each per loop step; and per call (medians per
  method under "per_call"): microseconds from the call's start to its first GPU
  activity (lead_us) and from its last to its end (tail_us), and the host's spans,
  summed by name (nested spans each count), the HOST_SPANS longest."""
  events, process = _load(trace_dir)
  thread = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
            if e.get("ph") == "M" and e.get("name") == "thread_name"}
  spans = [e for e in events if e.get("ph") == "X"]
  windows = {int(e["name"][len(ANNOTATION):]): (e["ts"], e["ts"] + e["dur"]) for e in spans
             if e["name"].startswith(ANNOTATION)}
  # GPU activity lies on the device's stream lines; derived lines (XLA Ops, XLA
  # Modules), where a trace has them, repeat the same intervals.
  device = [e for e in spans if "GPU" in process.get(e["pid"], "")
            and thread.get((e["pid"], e.get("tid")), "").startswith("Stream")]
  graph_launches = [e for e in spans if e["name"] == "command_buffer::execute"]
  # XLA records a command buffer again, on the host, when the buffers its commands
  # read or write have moved since its last launch; a step that does so pays it.
  graph_updates = [e for e in spans if e["name"] == "command_buffer::update"]
  host = sorted((e for e in spans if "GPU" not in process.get(e["pid"], "")
                 and not e["name"].startswith(ANNOTATION)), key=lambda e: e["ts"])
  host_starts = [e["ts"] for e in host]
  rows = []
  for index, call in enumerate(calls):
    start, stop = windows[index]
    inside = [e for e in device if start <= e["ts"] < stop]
    copies = [e for e in inside if "memcpy" in e["name"].lower()]
    updates = [e for e in graph_updates if start <= e["ts"] < stop]
    counts = dict(
        kernels=len(inside) - len(copies),
        device_to_host=sum("d2h" in e["name"].lower() for e in copies),
        graph_launches=sum(start <= e["ts"] < stop for e in graph_launches),
        graph_updates=len(updates),
        graph_update_us=sum(e["dur"] for e in updates))
    wall_us = stop - start
    busy_us = _union_us([(e["ts"], e["ts"] + e["dur"]) for e in inside])
    steps = max(call["steps"], 1)
    host_us = collections.Counter()
    for e in host[bisect.bisect_left(host_starts, start):bisect.bisect_left(host_starts, stop)]:
      host_us[e["name"]] += e["dur"]
    edges = dict(lead_us=min(e["ts"] for e in inside) - start,
                 tail_us=stop - max(e["ts"] + e["dur"] for e in inside)) if inside else {}
    rows.append(call | counts | edges | dict(
        host_us=dict(host_us.most_common(HOST_SPANS)), wall_us=wall_us, busy_us=busy_us,
        per_step=dict(wall_us=wall_us / steps, busy_us=busy_us / steps,
                      idle_us=(wall_us - busy_us) / steps)
        | {name: count / steps for name, count in counts.items()}))
  methods = {}
  for row in rows:
    methods.setdefault(row["method"], []).append(row)
  summary = {name: {key: statistics.median(r["per_step"][key] for r in group)
                    for key in group[0]["per_step"]} | dict(calls=len(group))
             for name, group in methods.items()}
  per_call = {name: {key: statistics.median(r.get(key, 0.0) for r in group)
                     for key in ("wall_us", "busy_us", "lead_us", "tail_us")}
              | dict(host_us=_median_by_name([r["host_us"] for r in group]))
              for name, group in methods.items()}
  return dict(trace_events=len(events), methods=summary, per_call=per_call, calls=rows)


def _median_by_name(spans: list[dict[str, float]]) -> dict[str, float]:
  """Per span name, the median over calls (0 where a call lacks it), the HOST_SPANS
  largest."""
  names = set().union(*spans)
  medians = {name: statistics.median(s.get(name, 0.0) for s in spans) for name in names}
  return dict(sorted(medians.items(), key=lambda item: -item[1])[:HOST_SPANS])
