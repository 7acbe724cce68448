"""Seconds to compile each program a user meets, cold and from the disk cache.

  python -m flashspec_jax.bench.compile_time --target=smollm2_135m

Builds the programs as run.py does (synthetic weights of the target's shape,
bf16 on a GPU, unrolled drafts there): plain AR, one arm (n-gram), and a bandit
over three arms (n-gram, layer-skip, AR). Each is compiled cold in a fresh
persistent cache, then a second process that shares the cache times its whole
first call: loading the program from disk (whole from the program store,
executables.py, so untraced) plus generating. What that process compiled anyway
is counted too (should be nothing). The second process allocates GPU memory as
it goes (XLA_PYTHON_CLIENT_PREALLOCATE=false): the first keeps the three quarters
of it that JAX took at its start, and on an 80 GB H100, profiled, the rest was
too little for a second such share (out of memory at its first call). So its
first call also grows its memory pool, which the first process's call does not. On a GPU
each program is also compiled under other XLA options (`--variants`, named in
VARIANTS): without the autotuning of matrix products, with cuBLAS in place of
Triton's matrix products, or both; each variant's run seconds weigh what it
costs in run time. Each row says whether the second process's call generated
the same tokens as the first's.

With --profile, both processes compile (or load) each program under JAX's profiler
and each row keeps the host's time by span name (bench/traces.host_self_times): XLA
names its passes and compile phases, so this says where a compile's and a load's
seconds go. The profiler slows what it watches, and a call's seconds then include
its own start, stop and export, so such a run's seconds are not the goal's figures;
its file says profiled (its lowering, timed with the compile, is None) and the
report keeps it out of the compile-time tables.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import jax
from absl import app, flags
from jax import monitoring

from flashspec_jax import config as config_lib
from flashspec_jax import cli, environment, pipeline, results, runner
from flashspec_jax.bench import traces
from flashspec_jax.loading import load_model

_TARGET = flags.DEFINE_string("target", "smollm2_135m", "Target shape in configs/.")
_ARMS = flags.DEFINE_string("arms", "ngram:3,layer_skip:26,ar", "The bandit's arms.")
_PROMPT = flags.DEFINE_integer("prompt_length", 100, "Prompt tokens (padded to its bucket).")
_DRAFT_STEPS = flags.DEFINE_enum("draft_steps", "auto", config_lib.DRAFT_STEPS,
                                 "How the drafters' steps compile (config.draft_steps).")
_NEW = flags.DEFINE_integer("max_new_tokens", 128, "New tokens per call.")
_OUT = flags.DEFINE_string("out", "results", "Results directory.")
_CACHE = flags.DEFINE_string("cache_dir", "", "Internal: the cache a second process reads.")
_VARIANT = flags.DEFINE_string("variant", "default", "Internal: the second process's variant.")
_PROFILE = flags.DEFINE_bool("profile", False, "Profile each program's compile (or load) and "
                             "keep the host's time by span name.")
_VARIANTS = flags.DEFINE_list("variants", "default,no_autotune,cublas",
                              "Compiler options to compare on a GPU (CPU runs default only).")

# Spans printed per profiled call; the file keeps traces.host_self_times' default.
_SPANS_SHOWN = 12

# Compiler options to compare, by name. XLA emits each matrix product it fuses as a
# Triton kernel of its own unless told to call cuBLAS instead. (jaxlib 0.11 always
# splits a GPU program's LLVM module across threads: the option to ask for that is gone.)
VARIANTS = {"default": None, "no_autotune": {"xla_gpu_autotune_level": 0},
            "cublas": {"xla_gpu_enable_triton_gemm": False},
            "cublas_no_autotune": {"xla_gpu_enable_triton_gemm": False,
                                   "xla_gpu_autotune_level": 0}}


def run_config(target: str, arms: str, prompt_length: int, max_new_tokens: int,
               draft_steps: str = "auto"):
  config = config_lib.base_config()
  config.target, config.synthetic_weights = target, True
  config.draft_steps = draft_steps
  config.methods = f"ar,{arms.split(',')[0]},bandit:ucb1"
  config.arms = arms
  # Given costs: this measures compiling the generation programs, not calibration's.
  config.bandit.costs = ",".join("1" for _ in config_lib.split_list(arms))
  config.prompts.synthetic_length = prompt_length
  config.prompts.num_per_set = 1
  config.sampling.max_new_tokens = max_new_tokens
  config_lib.validate(config)
  return config


_EVENTS = []
monitoring.register_event_listener(lambda event, **kwargs: _EVENTS.append(event))


def _profiled(prepare: Callable[[], float]) -> tuple[float, dict]:
  """prepare() under JAX's profiler: what it returns, and the host's spans by name."""
  # Without Python's spans: tracing a generation program makes millions of them,
  # which crowd XLA's out of the trace.
  options = jax.profiler.ProfileOptions()
  options.python_tracer_level = 0
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True, profiler_options=options):
      seconds = prepare()
    return seconds, traces.host_self_times(pathlib.Path(trace_dir))


def time_programs(config, variant: str, profile: bool = False) -> list[dict]:
  """Compiles and runs each method's program once; seconds of each, and cache events."""
  events = _EVENTS
  dtype = pipeline.param_dtype(config)
  model = load_model(config.target, synthetic=True, dtype=dtype, seed=config.seed)
  methods, params = pipeline.build_methods(config, model, dtype)
  # The random weights are made asynchronously: done before the first compile, they
  # take no cores from it and no spans in its profile.
  jax.block_until_ready(params)
  setup = dataclasses.replace(pipeline.make_setup(config, model, params, dtype),
                              compiler_options=VARIANTS[variant])
  methods = pipeline.with_arm_costs(methods, config, setup)
  (request,) = runner.build_requests(config, model)
  rows = []
  for method in methods:
    del events[:]
    row = dict(method=method.name, variant=variant, arms=[a.name for a in method.arms])
    start = time.perf_counter()
    if profile:
      # The profiler watches the program's compile (or load) alone, which then runs
      # unwatched: the one H100 run that traced a bandit program's run too failed in
      # it (CUDA_ERROR_LAUNCH_FAILED), and the run is not what this profiles.
      ahead, row["host_profile"] = _profiled(
          lambda: pipeline.compile_ahead([(method, [request])], setup, threads=1))
    run = pipeline.compile_and_run(method, setup, [request], jax.random.key(0))
    row |= dict(lower_seconds=None if profile else run.lower_seconds,
                compile_seconds=ahead if profile else run.compile_seconds,
                run_seconds=run.seconds, call_seconds=time.perf_counter() - start,
                cache_misses=events.count("/jax/compilation_cache/cache_misses"),
                cache_hits=events.count("/jax/compilation_cache/cache_hits"),
                store_loads=events.count("/flashspec/executables/hits"),
                tokens=run.output.token_lists())
    rows.append(row)
    jax.clear_caches()
  return rows


def bench(target: str, arms: str, prompt_length: int, max_new_tokens: int,
          variants: list[str], profile: bool = False, draft_steps: str = "auto") -> dict:
  config = run_config(target, arms, prompt_length, max_new_tokens, draft_steps)
  cold, warm = [], []
  with tempfile.TemporaryDirectory() as cache:
    environment.enable_compilation_cache(cache)
    for variant in variants if environment.on_gpu() else ["default"]:
      cold += time_programs(config, variant, profile)
      child = subprocess.run(
          [sys.executable, "-m", "flashspec_jax.bench.compile_time", f"--target={target}",
           f"--arms={arms}", f"--prompt_length={prompt_length}",
           f"--max_new_tokens={max_new_tokens}", f"--cache_dir={cache}", f"--variant={variant}",
           f"--profile={profile}", f"--draft_steps={draft_steps}"],
          capture_output=True, text=True,
          env=os.environ | {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"})
      if child.returncode:
        raise RuntimeError(f"the second process ({variant}) exited with {child.returncode}:\n"
                           + "\n".join(child.stderr.splitlines()[-30:]))
      warm += json.loads(child.stdout.splitlines()[-1])
  profiles = [dict(cold_host_profile=c.pop("host_profile"),
                   cached_host_profile=w.pop("host_profile")) if profile else {}
              for c, w in zip(cold, warm)]
  # compile and load seconds include the lowering, as a user waits for both.
  rows = [dict(method=c["method"], variant=c["variant"], arms=c["arms"],
               cold_compile_seconds=(c["lower_seconds"] or 0.0) + c["compile_seconds"],
               cold_lower_seconds=c["lower_seconds"],
               cold_call_seconds=c["call_seconds"], run_seconds=c["run_seconds"],
               cached_load_seconds=(w["lower_seconds"] or 0.0) + w["compile_seconds"],
               cached_lower_seconds=w["lower_seconds"], cached_call_seconds=w["call_seconds"],
               cached_run_seconds=w["run_seconds"], compiles_with_warm_cache=w["cache_misses"],
               cached_untraced=w["store_loads"] > 0,
               cached_same_tokens=w["tokens"] == c["tokens"], **profile_of,
               raw=dict(cold=c, warm=w))
          for c, w, profile_of in zip(cold, warm, profiles)]
  return dict(target=target, dtype=jax.numpy.dtype(pipeline.param_dtype(config)).name,
              synthetic_weights=True, batch=1, prompt_length=prompt_length,
              prompt_bucket=pipeline.bucket_width(prompt_length, config.prompts.bucket),
              max_new_tokens=max_new_tokens, draft_steps=draft_steps,
              unrolled_drafts=config_lib.unrolled_drafts(config),
              second_process_preallocates=False, profiled=profile, rows=rows)


def main(argv):
  del argv
  if _CACHE.value:  # the second process: read the parent's cache, report as JSON
    environment.enable_compilation_cache(_CACHE.value)
    config = run_config(_TARGET.value, _ARMS.value, _PROMPT.value, _NEW.value,
                        _DRAFT_STEPS.value)
    print(json.dumps(time_programs(config, _VARIANT.value, _PROFILE.value)))
    return
  unknown = set(_VARIANTS.value) - set(VARIANTS)
  if unknown:
    raise app.UsageError(f"--variants: unknown {sorted(unknown)}; known: {sorted(VARIANTS)}")
  result = bench(_TARGET.value, _ARMS.value, _PROMPT.value, _NEW.value, _VARIANTS.value,
                 _PROFILE.value, _DRAFT_STEPS.value)
  path = results.write("compile_time", result, directory=_OUT.value)
  for row in result["rows"] if result["profiled"] else []:
    for call in ("cold", "cached"):
      profile = row[f"{call}_host_profile"]
      print(f"\n{row['method']} ({row['variant']}), {call}: the host's own seconds by span, "
            f"summed over {profile['threads']} threads")
      for name, seconds in list(profile["self_seconds"].items())[:_SPANS_SHOWN]:
        print(f"  {seconds:8.2f}  {name}")
  print(f"\ncompile time, {result['target']} shape ({result['dtype']}, synthetic weights), "
        f"{result['prompt_length']}-token prompt, {result['max_new_tokens']} new tokens -> {path}")
  print(f"{'method':<14} {'variant':<12} {'cold compile s':>14} {'lowering s':>10} "
        f"{'cached load s':>13} {'cached call s':>13} {'run s':>7} {'recompiled':>10} "
        f"{'untraced':>8} {'same tokens':>11}")
  for row in result["rows"]:
    lowering = "-" if row["cold_lower_seconds"] is None else f"{row['cold_lower_seconds']:.2f}"
    print(f"{row['method']:<14} {row['variant']:<12} {row['cold_compile_seconds']:>14.2f} "
          f"{lowering:>10} "
          f"{row['cached_load_seconds']:>13.2f} {row['cached_call_seconds']:>13.2f} "
          f"{row['cached_run_seconds']:>7.3f} {row['compiles_with_warm_cache']:>10} "
          f"{str(row['cached_untraced']):>8} {str(row['cached_same_tokens']):>11}")


if __name__ == "__main__":
  cli.run(main)
