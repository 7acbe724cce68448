"""bench/traces reads a profiler trace back: kernels, busy time, device-to-host
copies, command-buffer launches and updates per loop step, each call within its annotation,
and per call the time around its GPU activity and the host's spans."""

import gzip
import json

import pytest

from flashspec_jax.bench import traces


def test_a_trace_is_split_by_call_and_counted_per_step(tmp_path):
  gpu, host, stream, other = 1, 2, 7, 8
  events = [
      dict(ph="M", pid=gpu, name="process_name", args=dict(name="/device:GPU:0")),
      dict(ph="M", pid=host, name="process_name", args=dict(name="/host:CPU")),
      dict(ph="M", pid=gpu, tid=stream, name="thread_name", args=dict(name="Stream #14(Compute)")),
      dict(ph="M", pid=gpu, tid=other, name="thread_name", args=dict(name="XLA Ops")),
      # Call 0: 1,000 us, 2 steps; two kernels overlapping by 10 us, one D2H copy, two
      # graphs, the first recorded again (40 us) before its launch.
      dict(ph="X", pid=host, tid=1, ts=0, dur=1000, name=traces.ANNOTATION + "0"),
      dict(ph="X", pid=gpu, tid=stream, ts=100, dur=50, name="loop_fusion"),
      dict(ph="X", pid=gpu, tid=stream, ts=140, dur=30, name="gemm_fusion"),
      dict(ph="X", pid=gpu, tid=stream, ts=300, dur=2, name="MemcpyD2H"),
      dict(ph="X", pid=gpu, tid=other, ts=100, dur=70, name="loop_fusion"),  # a derived line
      dict(ph="X", pid=host, tid=1, ts=40, dur=40, name="command_buffer::update"),
      dict(ph="X", pid=host, tid=1, ts=90, dur=5, name="command_buffer::execute"),
      dict(ph="X", pid=host, tid=1, ts=290, dur=5, name="command_buffer::execute"),
      # Call 1: 400 us, 1 step; one kernel. Events outside both calls count for neither.
      dict(ph="X", pid=host, tid=1, ts=2000, dur=400, name=traces.ANNOTATION + "1"),
      dict(ph="X", pid=gpu, tid=stream, ts=2100, dur=100, name="loop_fusion"),
      dict(ph="X", pid=gpu, tid=stream, ts=5000, dur=100, name="loop_fusion"),
  ]
  with gzip.open(tmp_path / "perfetto_trace.json.gz", "wt") as file:
    json.dump(dict(traceEvents=events), file)
  calls = [dict(method="a", id="p0", kind="chat", steps=2, seconds=0.001),
           dict(method="b", id="p0", kind="chat", steps=1, seconds=0.0004)]
  summary = traces.summarise(tmp_path, calls)
  a, b = summary["methods"]["a"], summary["methods"]["b"]
  assert a == pytest.approx(dict(wall_us=500, busy_us=36, idle_us=464, kernels=1,
                                 device_to_host=0.5, graph_launches=1, graph_updates=0.5,
                                 graph_update_us=20, calls=1))
  assert b == pytest.approx(dict(wall_us=400, busy_us=100, idle_us=300, kernels=1,
                                 device_to_host=0, graph_launches=0, graph_updates=0,
                                 graph_update_us=0, calls=1))
  # Per call: 100 us before call 0's first kernel, 698 after its D2H copy; the host's
  # two graph launches, 5 us each, add up under one name.
  per_call = summary["per_call"]["a"]
  assert (per_call["lead_us"], per_call["tail_us"]) == pytest.approx((100, 698))
  assert per_call["host_us"] == pytest.approx({"command_buffer::execute": 10,
                                               "command_buffer::update": 40})
  assert summary["per_call"]["b"]["host_us"] == {}


def test_host_spans_are_summed_by_their_own_time(tmp_path):
  gpu, host = 1, 2
  events = [
      dict(ph="M", pid=gpu, name="process_name", args=dict(name="/device:GPU:0")),
      dict(ph="M", pid=host, name="process_name", args=dict(name="/host:CPU")),
      # One thread: compile encloses passes, one of which encloses a sub-pass.
      dict(ph="X", pid=host, tid=1, ts=0, dur=100, name="compile"),
      dict(ph="X", pid=host, tid=1, ts=10, dur=30, name="pass"),
      dict(ph="X", pid=host, tid=1, ts=20, dur=10, name="sub-pass"),
      dict(ph="X", pid=host, tid=1, ts=50, dur=10, name="pass"),
      # Another thread's span of the same name adds up; the GPU's lines count for nothing.
      dict(ph="X", pid=host, tid=2, ts=0, dur=10, name="compile"),
      # A span that outlives the one it starts in takes only their overlap from it; an
      # empty span takes nothing.
      dict(ph="X", pid=host, tid=3, ts=0, dur=10, name="wait"),
      dict(ph="X", pid=host, tid=3, ts=5, dur=10, name="straddle"),
      dict(ph="X", pid=host, tid=3, ts=7, dur=0, name="empty"),
      dict(ph="X", pid=gpu, tid=7, ts=0, dur=500, name="loop_fusion"),
  ]
  with gzip.open(tmp_path / "perfetto_trace.json.gz", "wt") as file:
    json.dump(dict(traceEvents=events), file)
  spans = traces.host_self_times(tmp_path)
  assert spans["threads"] == 3
  assert spans["self_seconds"] == pytest.approx({"compile": 70e-6, "pass": 30e-6,
                                                 "sub-pass": 10e-6, "straddle": 10e-6,
                                                 "wait": 5e-6, "empty": 0})
  assert list(spans["self_seconds"])[:3] == ["compile", "pass", "sub-pass"]
  assert spans["inclusive_seconds"] == pytest.approx({"compile": 110e-6, "pass": 40e-6,
                                                      "sub-pass": 10e-6, "straddle": 10e-6,
                                                      "wait": 10e-6, "empty": 0})
  assert list(traces.host_self_times(tmp_path, top=1)["self_seconds"]) == ["compile"]
