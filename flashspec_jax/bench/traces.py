"""Reading a JAX profiler trace of generation calls back: per call, the GPU kernels,
their busy time, the device-to-host copies and the command-buffer launches.

Kept apart from bench/trace_calls.py, which defines absl flags on import, so that
tests and other tools can read traces.
"""

from __future__ import annotations

import gzip
import json
import pathlib
import statistics

import numpy as np

# Each traced call runs under a profiler annotation of this name and its index.
ANNOTATION = "flashspec call "


def _union_us(intervals: list[tuple[float, float]]) -> float:
  busy, end = 0.0, -np.inf
  for start, stop in sorted(intervals):
    if stop > end:
      busy += stop - max(start, end)
      end = stop
  return busy


def summarise(trace_dir: pathlib.Path, calls: list[dict]) -> dict:
  """Per call and per method: GPU kernels, busy time, device-to-host copies and
  command-buffer (CUDA graph) launches, each per loop step."""
  path = next(trace_dir.glob("**/perfetto_trace.json.gz"))
  events = json.load(gzip.open(path))
  events = events["traceEvents"] if isinstance(events, dict) else events
  process = {e["pid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
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
  rows = []
  for index, call in enumerate(calls):
    start, stop = windows[index]
    inside = [e for e in device if start <= e["ts"] < stop]
    copies = [e for e in inside if "memcpy" in e["name"].lower()]
    counts = dict(
        kernels=len(inside) - len(copies),
        device_to_host=sum("d2h" in e["name"].lower() for e in copies),
        graph_launches=sum(start <= e["ts"] < stop for e in graph_launches))
    wall_us = stop - start
    busy_us = _union_us([(e["ts"], e["ts"] + e["dur"]) for e in inside])
    steps = max(call["steps"], 1)
    rows.append(call | counts | dict(wall_us=wall_us, busy_us=busy_us, per_step=dict(
        wall_us=wall_us / steps, busy_us=busy_us / steps, idle_us=(wall_us - busy_us) / steps)
        | {name: count / steps for name, count in counts.items()}))
  methods = {}
  for row in rows:
    methods.setdefault(row["method"], []).append(row)
  summary = {name: {key: statistics.median(r["per_step"][key] for r in group)
                    for key in group[0]["per_step"]} | dict(calls=len(group))
             for name, group in methods.items()}
  return dict(trace_events=len(events), methods=summary, calls=rows)
