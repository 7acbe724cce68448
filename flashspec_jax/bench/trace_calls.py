"""Where a generation call's time goes on the GPU: kernels, copies and idle time per
loop step, read from a JAX profiler trace of whole calls.

  python -m flashspec_jax.bench.trace_calls --config=experiments/choosers_smollm2.py \
      --config.methods=eagle:smollm2,bandit:kl_ucb --config.prompts.num_per_set=2

Builds the config's methods and prompts as run.py does, compiles and warms up
every program, then runs each method over the prompts once more inside one
profiler trace, each call under its own annotation. From the trace, per call:
the GPU kernels launched and their busy time (the union of their intervals),
the device-to-host copies (each a point where the host waits on the GPU: an XLA
while loop's or conditional's predicate, or a result), and the call's wall time;
per method, each divided by the loop steps the calls took. A chooser's step that
costs more than its arm's step in a fixed program either does more GPU work or
leaves the GPU idle longer; this tells the two apart. A chooser's call that
costs more than the fixed arm's call with the same steps (bench/chooser_steps.py:
held calls) spends it before its first GPU work, after its last, or in host work,
so per call it also gives those two edges and the host's longest spans by name.
With --config.bandit.commit (and --config.bandit.initial_state, a state to start
from), the calls a bandit ran committed to one arm are summarised apart, as
"<method> (committed)".
--trace=<dir> summarises a trace written earlier (with the calls.json beside it)
instead of running.
"""

from __future__ import annotations

import functools
import json
import pathlib
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from flashspec_jax import config as config_lib
from flashspec_jax import cli, environment, results
from flashspec_jax.bench import traces
from flashspec_jax.pipeline import compile_and_run
from flashspec_jax.runner import prepare_generation


def traced_calls(config, env: dict, trace_dir: pathlib.Path) -> list[dict]:
  """Runs every method over the config's prompts, one batch a call, inside one trace
  (its programs compiled and run once before it); returns each call's method (a
  bandit's committed calls as "<method> (committed)"), prompt id and set, loop steps
  and seconds."""
  config_lib.validate(config)
  prepared = prepare_generation(config, env)
  calls = []
  with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
    for method in prepared.methods:
      rng, bandit = jax.random.key(config.seed), prepared.initial_states.get(method.name)
      for batch in prepared.batches:
        rng, key = jax.random.split(rng)
        with jax.profiler.TraceAnnotation(f"{traces.ANNOTATION}{len(calls)}"):
          run = compile_and_run(method, prepared.setup, batch, key, bandit, config.bandit.commit)
        if method.is_bandit:
          bandit = run.output.bandit
        # A committed call runs its arm's own program: summarised apart from the held ones.
        name = method.name + (" (committed)" if run.committed_arm >= 0 else "")
        calls.append(dict(method=name, id=batch[0].id, kind=batch[0].kind,
                          steps=int(run.output.steps), seconds=run.seconds))
  return calls


def define_flags() -> dict[str, flags.FlagHolder]:
  """The command line's flags; defined only when run as a program, so that tests can
  import this module beside other benchmarks that define flags of the same names."""
  return dict(
      config=config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                             lock_config=True),
      trace=flags.DEFINE_string("trace", "", "Summarise this trace directory instead of "
                                "running."),
      trace_dir=flags.DEFINE_string("trace_dir", "/tmp/flashspec_trace",
                                    "Where a run writes its trace (tens of MB; not results/)."),
      out=flags.DEFINE_string("out", "results", "Results directory."))


def main(argv, options: dict[str, flags.FlagHolder]):
  del argv
  env = environment.describe()  # captured as the run starts, as results.write asks
  if options["trace"].value:
    trace_dir = pathlib.Path(options["trace"].value)
    recorded = json.loads((trace_dir / "calls.json").read_text())
    calls, config = recorded["calls"], recorded["config"]
    # The trace's run, where it ran; this process only read it.
    env = recorded["environment"] | dict(summarised_by=" ".join(sys.argv),
                                         summarised_at=env["git_sha"])
  else:
    if options["config"].value is None:
      raise app.UsageError("give --config (a run.py config) or --trace")
    config = options["config"].value
    environment.enable_compilation_cache(config.compilation_cache_dir)
    trace_dir = pathlib.Path(options["trace_dir"].value)
    calls = traced_calls(config, env, trace_dir)
    config = config.to_dict()
    (trace_dir / "calls.json").write_text(json.dumps(dict(calls=calls, config=config,
                                                          environment=env)))
  summary = traces.summarise(trace_dir, calls)
  path = results.write("trace_calls", dict(config=config, **summary),
                       directory=options["out"].value, env=env)
  print(f"\nGPU time per loop step, median over calls -> {path}")
  print(f"{'method':<36} {'calls':>5} {'wall us':>8} {'busy us':>8} {'idle us':>8} "
        f"{'kernels':>8} {'DtoH':>6} {'graphs':>7} {'updates':>7} {'update us':>9}")
  for name, s in summary["methods"].items():
    print(f"{name:<36} {s['calls']:>5} {s['wall_us']:>8.1f} {s['busy_us']:>8.1f} "
          f"{s['idle_us']:>8.1f} {s['kernels']:>8.1f} {s['device_to_host']:>6.2f} "
          f"{s['graph_launches']:>7.2f} {s['graph_updates']:>7.2f} {s['graph_update_us']:>9.1f}")
  print(f"\nPer call, median over calls\n{'method':<36} {'wall ms':>8} {'busy ms':>8} "
        f"{'lead us':>8} {'tail us':>8}  longest host spans (ms)")
  for name, s in summary["per_call"].items():
    spans = ", ".join(f"{span} {us / 1e3:.2f}" for span, us in list(s["host_us"].items())[:4])
    print(f"{name:<36} {s['wall_us'] / 1e3:>8.2f} {s['busy_us'] / 1e3:>8.2f} "
          f"{s['lead_us']:>8.0f} {s['tail_us']:>8.0f}  {spans}")


if __name__ == "__main__":
  cli.run(functools.partial(main, options=define_flags()))
