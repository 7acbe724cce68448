"""What `run.py` hands off to: load, build prompts, run each method, time, report, save.

Every method of a run sees the same prompts in the same batches and order, so
their speeds are measured side by side. Every program of the run is compiled
first, several side by side (pipeline.compile_ahead), and run once untimed
(pipeline.warm_up), so each batch's time is its run alone. A bandit
method carries its bandit's state from one batch to the next, so it adapts over
the prompt stream.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import itertools
import os
import time
from collections import Counter
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from flashspec_jax import config as config_lib
from flashspec_jax import distill, environment, plots, results, streams
from flashspec_jax.engine import acceptance_rates
from flashspec_jax.simulation import run_simulation
from flashspec_jax.loading import LoadedModel
from flashspec_jax.pipeline import (Method, Request, Setup, build_methods, check_checkpoints,
                                    committed_methods, compile_ahead, compile_and_run,
                                    load_target, make_setup, param_dtype, requests_of,
                                    warm_commit, warm_up, with_arm_costs)
from flashspec_jax.prompts import load_prompts, read_prompt_file, split_size


def build_requests(config: ml_collections.ConfigDict, model: LoadedModel) -> list[Request]:
  """The run's prompts, chosen by config.prompts alone (its own seed), so that runs
  with different sampling seeds compare the same prompts."""
  if model.synthetic:
    rng = np.random.default_rng(config.prompts.seed)
    count = config.batch_size * config.prompts.num_per_set
    return [Request(f"synthetic/{i}", "synthetic",
                    rng.integers(0, model.config.vocab_size, config.prompts.synthetic_length)
                    .tolist()) for i in range(count)]
  if config.prompts.file:
    prompts = read_prompt_file(config.prompts.file)
  else:
    by_set = [load_prompts(kind, config.prompts.num_per_set, config.prompts.split,
                           config.prompts.seed) for kind in config_lib.prompt_sets(config)]
    order = zip(*by_set) if config.prompts.order == "interleaved" else by_set
    prompts = [prompt for group in order for prompt in group]
  return requests_of(prompts, model.tokenizer)


def batched(requests: list[Request], size: int) -> list[list[Request]]:
  """The requests in order, in batches of `size` that each hold one prompt set (kind):
  a bandit's steps are credited to their batch's set."""
  batches = []
  for _, same_kind in itertools.groupby(requests, key=lambda request: request.kind):
    same_kind = list(same_kind)
    batches += [same_kind[i:i + size] for i in range(0, len(same_kind), size)]
  return batches


def load_bandit_states(path: str, methods) -> dict[str, Any]:
  """Each bandit method's state saved at the end of an earlier run (its results file's
  bandit_states), to start from; {} without a path."""
  if not path:
    return {}
  saved = config_lib.bandit_states(path)
  states = {}
  for method in methods:
    if method.is_bandit and method.name in saved:
      fresh = method.strategy.bind(method.arms).init(len(method.arms))
      fields = {}
      for name, value in saved[method.name].items():
        like = getattr(fresh, name)
        value = np.asarray(value, like.dtype)
        if value.size != like.size:
          raise ValueError(f"{path}: {method.name}'s saved {name} has shape {value.shape}, "
                           f"where its arms and contexts need {like.shape}")
        # Files written before the choosers kept evidence per context hold [K] for [K, 1].
        fields[name] = jnp.asarray(value.reshape(like.shape))
      states[method.name] = fresh.replace(**fields)
  return states


def summarize_method(records: list[dict], batch_seconds: list[float],
                     step_seconds: list[float]) -> dict[str, Any]:
  new_tokens = sum(r["new_tokens"] for r in records)
  summary = dict(prompts=len(records), new_tokens=new_tokens, seconds=sum(batch_seconds),
                 tokens_per_second=new_tokens / sum(batch_seconds),
                 step_ms_p50=1e3 * float(np.percentile(step_seconds, 50)),
                 step_ms_p99=1e3 * float(np.percentile(step_seconds, 99)))
  if "accepted" in records[0]:
    totals = {k: sum(r[k] for r in records) for k in ("steps", "tested", "accepted", "emitted")}
    summary |= acceptance_rates(**totals)
  return summary


def arm_shares(arm_names: list[str], steps: list[tuple[str, int]]) -> dict[str, dict[str, float]]:
  """Fraction of loop steps given to each arm, per prompt kind and overall."""
  shares = {}
  for kind in [*dict.fromkeys(k for k, _ in steps), "all"]:
    counts = Counter(arm for k, arm in steps if kind in (k, "all"))
    total = sum(counts.values())
    shares[kind] = {name: counts[i] / total for i, name in enumerate(arm_names)}
  return shares


def replies_equal_to_ar(records: list[dict]) -> dict[str, float]:
  """Per method, the share of its replies whose text is AR's for the same prompt: all
  of them, greedy, if the target's logits do not depend on the pass (docs/exactness.md)."""
  reference = {r["id"]: r["text"] for r in records if r["method"] == "ar"}
  by_method: dict[str, list[bool]] = {}
  for r in records:
    by_method.setdefault(r["method"], []).append(r["text"] == reference[r["id"]])
  return {name: sum(same) / len(same) for name, same in by_method.items()}


def print_table(summaries: dict[str, dict], synthetic: bool) -> None:
  baseline = summaries.get("ar", {}).get("tokens_per_second")
  width = max(map(len, summaries)) + 2
  same = any("same_as_ar" in s for s in summaries.values())
  print(f"\n{'method':<{width}} {'tok/s':>9} {'alpha':>6} {'tau':>5} {'step p50 ms':>12} "
        f"{'step p99 ms':>12} {'vs AR':>6}" + (f" {'= AR':>5}" if same else ""))
  for name, s in summaries.items():
    speedup = f"{s['tokens_per_second'] / baseline:.2f}x" if baseline else "-"
    alpha = f"{s['alpha']:.3f}" if "alpha" in s else "-"
    tau = f"{s['tau']:.2f}" if "tau" in s else "-"
    print(f"{name:<{width}} {s['tokens_per_second']:>9.1f} {alpha:>6} {tau:>5} "
          f"{s['step_ms_p50']:>12.2f} {s['step_ms_p99']:>12.2f} {speedup:>6}"
          + (f" {s['same_as_ar']:>5.0%}" if "same_as_ar" in s else f" {'-':>5}" if same else ""))
  if synthetic:
    print("(synthetic weights: speeds only; acceptance of random drafters means nothing)")


@contextlib.contextmanager
def frozen_heap():
  """Keeps what exists now (prompt sets, tokenizer, host copies of weights, programs)
  out of the garbage collector's full collections while the block runs: over all of
  that, one full collection in a CPU stream run took long enough to show inside a
  timed call. Garbage frozen with it is collected after the block."""
  gc.freeze()
  try:
    yield
  finally:
    gc.unfreeze()


@dataclasses.dataclass(frozen=True)
class Prepared:
  """What a generation run times: its programs compiled and each run once."""

  model: LoadedModel
  methods: list[Method]
  setup: Setup
  batches: list[list[Request]]
  compile: dict[str, Any]  # seconds, threads, programs, warm_up_seconds
  # Where each bandit method starts: its state from config.bandit.initial_state's run
  # (absent: fresh).
  initial_states: dict[str, Any]


def prepare_generation(config: ml_collections.ConfigDict, env: dict) -> Prepared:
  """Loads the target and drafters, builds the methods and batches, times the arms
  (unless given), compiles every program and runs each once, and loads the bandits'
  starting states."""
  dtype = param_dtype(config)
  model = load_target(config, dtype)
  label = "SYNTHETIC WEIGHTS (speed only, text is meaningless)" if model.synthetic else model.source
  devices = f" x {model.config.tp_shards} (tensor parallel)" if model.config.tp_shards > 1 else ""
  print(f"target: {config.target} [{label}] on {env['device']}{devices}, "
        f"{jnp.dtype(dtype).name}")
  methods, params = build_methods(config, model, dtype)
  setup = make_setup(config, model, params, dtype)
  batches = batched(build_requests(config, model), config.batch_size)
  short = sum(len(batch) < config.batch_size for batch in batches)
  if short:
    print(f"{short} of {len(batches)} batches hold fewer than config.batch_size = "
          f"{config.batch_size} prompts: a batch holds prompts of one set (kind), in order")

  methods = with_arm_costs(methods, config, setup, batches[0])
  bandit_arms = next((m.arms for m in methods if m.is_bandit), ())
  if bandit_arms:
    print("arm costs (s/step): " + ", ".join(f"{a.name} {a.cost:.4f}" for a in bandit_arms))

  threads = config.compile_threads or max(1, (os.cpu_count() or 2) // 2)
  committed = [c for m in methods if config.bandit.commit for c in committed_methods(m)]
  jobs = [(m, b) for m in methods + committed for b in batches]
  compile_seconds = compile_ahead(jobs, setup, threads)
  start = time.perf_counter()
  for method in methods:
    warm_commit(method, config.bandit.commit)
  warm_up_seconds = warm_up(jobs, setup) + time.perf_counter() - start
  # From the disk caches a program loads rather than compiles, in a fraction of the time.
  print(f"compiled or loaded {len(setup.programs)} programs in {compile_seconds:.1f} s "
        f"({threads} at a time), ran each once in {warm_up_seconds:.1f} s")
  return Prepared(model, methods, setup, batches,
                  dict(seconds=compile_seconds, threads=threads, programs=len(setup.programs),
                       warm_up_seconds=warm_up_seconds),
                  load_bandit_states(config.bandit.initial_state, methods))


def run_generation(config: ml_collections.ConfigDict, env: dict
                   ) -> tuple[dict[str, Any], list[dict]]:
  """Runs every method on the prompts; returns (payload, per-prompt records)."""
  prepared = prepare_generation(config, env)
  model, methods, setup, batches = (prepared.model, prepared.methods, prepared.setup,
                                    prepared.batches)
  bandit_arms = next((m.arms for m in methods if m.is_bandit), ())
  records, summaries, histories, final_states = [], {}, {}, {}
  with frozen_heap():
    for method in tqdm.tqdm(methods, desc="methods", unit="method", disable=len(methods) < 2):
      rng = jax.random.key(config.seed)  # the same randomness for every method
      bandit, steps_by_kind = prepared.initial_states.get(method.name), []
      method_records, batch_seconds, step_seconds = [], [], []
      for batch in tqdm.tqdm(batches, desc=method.name, unit="batch", leave=False):
        rng, key = jax.random.split(rng)
        run = compile_and_run(method, setup, batch, key, bandit, config.bandit.commit)
        seconds = run.seconds
        # One transfer: indexing device arrays element by element would dispatch an op
        # (and compile a slice for each new length) per element.
        out = jax.device_get(run.output)
        token_lists = out.token_lists()
        batch_seconds.append(seconds)
        step_seconds.append(seconds / max(int(out.steps), 1))
        if method.is_bandit:
          bandit = run.output.bandit  # the device copy, for the next call
          steps_by_kind += [(batch[0].kind, arm) for arm in out.history.arm[:out.steps].tolist()]
        for row, request in enumerate(batch):
          ids = token_lists[row]
          record = dict(method=method.name, id=request.id, kind=request.kind,
                        prompt_tokens=len(request.token_ids), new_tokens=len(ids),
                        batch_seconds=seconds, batch_rows=len(batch),
                        loop_steps=int(out.steps),
                        text=None if model.tokenizer is None else model.tokenizer.decode(ids))
          if method.arms:
            record |= {name: int(getattr(out.metrics, name)[row])
                       for name in ("steps", "proposed", "tested", "accepted", "emitted")}
          if method.is_bandit and config.bandit.commit:
            record["committed"] = run.committed_arm >= 0
          method_records.append(record)
      summaries[method.name] = summarize_method(method_records, batch_seconds, step_seconds)
      if method.is_bandit:
        names = [arm.name for arm in method.arms]
        summaries[method.name]["arm_shares"] = arm_shares(names, steps_by_kind)
        histories[method.name] = dict(arms=names, steps=steps_by_kind)
        final_states[method.name] = jax.tree.map(lambda x: np.asarray(x).tolist(),
                                                 dataclasses.asdict(bandit))
      records += method_records

  if ("ar" in summaries and len(summaries) > 1 and config.sampling.temperature == 0
      and not model.synthetic):
    for name, share in replies_equal_to_ar(records).items():
      summaries[name]["same_as_ar"] = share

  fixed = {name: s["tokens_per_second"] for name, s in summaries.items()
           if name in config_lib.method_names(config) and not name.startswith("bandit:")}
  if histories and fixed:
    best = max(fixed, key=fixed.get)
    fixed_arms = {m.name: m.arms[0].name if m.arms else "ar" for m in methods
                  if m.name in fixed}
    for name, stream in streams.compare(records, histories, fixed_arms).items():
      summaries[name] |= dict(vs_best_fixed=summaries[name]["tokens_per_second"] / fixed[best],
                              best_fixed=best, stream=stream)

  if config.print_text:
    for record in records:
      if record["text"] is not None and record["method"] == methods[0].name:
        print(f"\n--- {record['id']} ({record['new_tokens']} tokens) ---\n{record['text']}")
  print_table(summaries, model.synthetic)
  payload = dict(config=config.to_dict(), synthetic_weights=model.synthetic,
                 weights=model.source, summaries=summaries, bandit_histories=histories,
                 bandit_states=final_states, arm_costs={a.name: a.cost for a in bandit_arms},
                 compile=prepared.compile)
  return payload, records


def write_generation(config, env, payload, records) -> dict[str, Any]:
  path = results.write(config.experiment, payload, records, directory=config.results_dir, env=env)
  for name, history in payload["bandit_histories"].items():
    plots.arm_timeline(history, path.with_name(f"{path.stem}_{name.replace(':', '_')}_arms.png"),
                       title=f"{name}: arm per step")
  print(f"results: {path}")
  return dict(summaries=payload["summaries"], records=records, path=str(path))


def run_sweep(config, env, field: str, values: list) -> dict[str, Any]:
  """One generation run per value of `field`; one results file and plot for all of them."""
  points, records = [], []
  for value in tqdm.tqdm(values, desc=f"sweep {field}", unit="point"):
    print(f"\n=== {field} = {value} ===")
    payload, point_records = run_generation(config_lib.with_override(config, field, value), env)
    points.append(dict(value=value, summaries=payload["summaries"]))
    records += [record | {"sweep_value": value} for record in point_records]
  payload = dict(config=config.to_dict(), sweep_field=field, points=points,
                 synthetic_weights=payload["synthetic_weights"], weights=payload["weights"],
                 bandit_histories={})
  path = results.write(config.experiment, payload, records, directory=config.results_dir, env=env)
  plots.sweep(points, field, path.with_suffix(".png"))
  print(f"results: {path}")
  return dict(points=points, records=records, path=str(path))


def run_kernel_bench(config, env) -> dict[str, Any]:
  from flashspec_jax.bench import verify_kernel
  k = config.kernel
  ints = lambda text: [int(x) for x in config_lib.split_list(text)]
  shapes = itertools.product(ints(k.batches), ints(k.gammas), ints(k.vocabs))
  result = verify_kernel.bench(shapes, ((4, 24), k.repeats), verify_kernel.VerifyTiling(),
                               k.interpret, int(k.copy_gib * 2**30))
  path = results.write(config.experiment, dict(config=config.to_dict(), **result),
                       [{k: v for k, v in row.items() if not k.startswith("raw")}
                        for row in result["rows"]], directory=config.results_dir, env=env)
  print(f"results: {path}")
  return dict(rows=result["rows"], path=str(path))


def check_inputs(config: ml_collections.ConfigDict) -> None:
  """Fails before any weights load if a checkpoint is missing or misfits, or a prompt set
  holds fewer prompts than asked for, at every point of a sweep."""
  if config.sweep:
    config_lib.for_each_sweep_point(config, _check_point_inputs)
  else:
    _check_point_inputs(config)


def _check_point_inputs(config: ml_collections.ConfigDict) -> None:
  check_checkpoints(config)
  if config.synthetic_weights or config.prompts.file:
    return
  for kind in config_lib.prompt_sets(config):
    size = split_size(kind, config.prompts.split)
    if config.prompts.num_per_set > size:
      raise ValueError(f"config.prompts.num_per_set = {config.prompts.num_per_set} is "
                       f"invalid: the {config.prompts.split} split holds {size} {kind} prompts")


def run(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Runs one experiment config end to end, writes its results and returns them."""
  config_lib.validate(config)
  results.check_writable(config.results_dir)
  environment.enable_compilation_cache(config.compilation_cache_dir)
  env = environment.describe()
  if config.kind == "bandit_simulation":
    return run_simulation(config, env)
  if config.kind == "kernel_bench":
    return run_kernel_bench(config, env)
  if config.kind == "train_drafter":
    return distill.train(config, env)
  check_inputs(config)
  sweep = config_lib.parse_sweep(config)
  if sweep is not None:
    return run_sweep(config, env, *sweep)
  return write_generation(config, env, *run_generation(config, env))
