"""What `run.py` hands off to: load, build prompts, run each method, time, report, save.

Every method of a run sees the same prompts in the same batches and order, so
their speeds are measured side by side. Each batch is compiled ahead of time
and timed apart from its compilation. A bandit method carries its bandit's
state from one batch to the next, so it adapts over the prompt stream.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from flashspec_jax import config as config_lib
from flashspec_jax import environment, plots, results
from flashspec_jax.bandit import Fixed, Strategy, make_strategy
from flashspec_jax.bandit.simulate import run_simulation
from flashspec_jax.bench import timing
from flashspec_jax.drafters import ModelDrafter, NgramDrafter
from flashspec_jax.engine import Arm, Reward, SpeculativeDecoder, reward_named
from flashspec_jax.generate import Decoder
from flashspec_jax.kernels.verify import get_verify_fn
from flashspec_jax.loading import TARGET_FLAG, LoadedModel, check_checkpoint, load_model
from flashspec_jax.loading.tokenizer import encode_chat
from flashspec_jax.models.llama import Llama
from flashspec_jax.prompts import load_prompts, read_prompt_file
from flashspec_jax.sampling import Samplers, make_sampler
from flashspec_jax.sequences import prepare_prompts, raise_on_nan, required_capacity

DRAFT_FLAG = "--config.draft_checkpoint_dir"

@dataclasses.dataclass
class Request:
  id: str
  kind: str
  token_ids: list[int]


@dataclasses.dataclass(frozen=True)
class Method:
  """Plain AR (no arms: a `generate.Decoder`), one arm, or a bandit over arms."""

  name: str
  arms: tuple[Arm, ...] = ()
  strategy: Strategy = Fixed(0)

  @property
  def is_bandit(self) -> bool:
    return len(self.arms) > 1


@dataclasses.dataclass
class Setup:
  """Everything a batch needs that does not change from batch to batch."""

  params: dict[str, Any]
  target: Llama
  sampler: Any
  max_new_tokens: int
  eos_ids: tuple[int, ...]
  reward: Reward
  verify_fn: Any
  bucket: int
  # XLA options for compiling each batch's program (bench.compile_time varies them).
  compiler_options: dict[str, Any] | None = None


def param_dtype(config: ml_collections.ConfigDict):
  if config.dtype == "auto":
    return jnp.bfloat16 if environment.on_gpu() else jnp.float32
  return jnp.dtype(config.dtype)


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
    prompts = [prompt for kind in config_lib.prompt_sets(config)
               for prompt in load_prompts(kind, config.prompts.num_per_set, config.prompts.split,
                                          config.prompts.seed)]
  ids = encode_chat(model.tokenizer, [p.conversation for p in prompts])
  return [Request(prompt.id, prompt.kind, row) for prompt, row in zip(prompts, ids)]


def build_arm(spec: config_lib.ArmSpec, config, target: LoadedModel, dtype,
              params: dict[str, Any], drafter_configs: dict[str, Any]) -> Arm:
  """The arm for a spec; a separate draft model is loaded once, into `params`."""
  gamma = spec.gamma or config.sampling.gamma
  if spec.kind == "ar":
    return Arm()
  # Unrolled draft steps run fastest on a GPU; on a CPU they mostly cost compile time.
  unroll = environment.on_gpu()
  if spec.kind == "layer_skip":  # config.validate has checked k against the target's layers
    return Arm(ModelDrafter(Llama(target.config, num_layers=int(spec.arg), param_dtype=dtype),
                            unroll=unroll), gamma)
  if spec.kind == "ngram":
    return Arm(NgramDrafter(target.config.vocab_size, int(spec.arg)), gamma)
  if spec.arg not in drafter_configs:
    drafter = load_model(spec.arg, config.draft_checkpoint_dir, config.synthetic_weights, dtype,
                         config.seed + 1, flag=DRAFT_FLAG)
    params["drafters"][spec.arg] = drafter.params
    drafter_configs[spec.arg] = drafter.config
  return Arm(ModelDrafter(Llama(drafter_configs[spec.arg], param_dtype=dtype), spec.arg,
                          unroll=unroll), gamma)


def check_checkpoints(config, target_flag: str = TARGET_FLAG,
                      draft_flag: str = DRAFT_FLAG) -> None:
  """Fails before any weights load if the target's or a draft model's checkpoint is
  missing or of another shape; the error names the flag (or field) to set."""
  if config.synthetic_weights:
    return
  check_checkpoint(config.target, config.checkpoint_dir, target_flag)
  specs = map(config_lib.ArmSpec.parse, config_lib.used_arms(config))
  for shape in sorted({spec.arg for spec in specs if spec.kind == "draft_model"}):
    check_checkpoint(shape, config.draft_checkpoint_dir, draft_flag)


def strategy_for(name: str, config) -> Strategy:
  kwargs = {"discounted_ucb": dict(discount=config.bandit.discount),
            "epsilon_greedy": dict(epsilon=config.bandit.epsilon)}.get(name, {})
  return make_strategy(name, **kwargs)


def build_methods(config, target: LoadedModel, dtype) -> tuple[list[Method], dict[str, Any]]:
  """The configured methods, their arms checked, and the params dict the engine expects."""
  params, drafter_configs = {"target": target.params, "drafters": {}}, {}
  build = lambda spec: build_arm(spec, config, target, dtype, params, drafter_configs)
  bandit_arms = (tuple(build(spec) for spec in config_lib.arm_specs(config))
                 if any(name.startswith("bandit:") for name in config_lib.method_names(config))
                 else ())
  methods = []
  for name in config_lib.method_names(config):
    kind, _, arg = name.partition(":")
    if name == "ar":
      methods.append(Method(name))
    elif kind == "bandit":
      methods.append(Method(name, bandit_arms, strategy_for(arg, config)))
    else:
      methods.append(Method(name, (build(config_lib.ArmSpec.parse(name)),)))
  target_model = Llama(target.config, param_dtype=dtype)
  for method in methods:
    if method.arms:  # a decoder checks its arms against the target when built
      SpeculativeDecoder(target_model, method.arms, config.sampling.max_new_tokens)
  return methods, params


def make_setup(config, model: LoadedModel, params: dict[str, Any], dtype) -> Setup:
  sampling = config.sampling
  return Setup(params=params, target=Llama(model.config, param_dtype=dtype),
               sampler=make_sampler(sampling.temperature, sampling.top_k, sampling.top_p),
               max_new_tokens=sampling.max_new_tokens,
               eos_ids=() if model.synthetic else model.config.eos_token_ids,
               reward=reward_named(config.bandit.reward),
               verify_fn=get_verify_fn(config.verify_impl),
               bucket=config.prompts.bucket)


def with_arm_costs(methods: list[Method], config, setup: Setup,
                   batch: list[Request] | None = None) -> list[Method]:
  """The methods with their bandit arms' step costs: config.bandit.costs, else timed on batch."""
  bandit_arms = next((m.arms for m in methods if m.is_bandit), ())
  if not bandit_arms:
    return methods
  costs = config_lib.floats(config.bandit.costs)
  if costs:
    bandit_arms = tuple(dataclasses.replace(a, cost=c) for a, c in zip(bandit_arms, costs))
  else:
    bandit_arms = calibrate_costs(bandit_arms, setup, batch, config.bandit.calibration_steps)
  return [dataclasses.replace(m, arms=bandit_arms) if m.is_bandit else m for m in methods]


def bucket_width(width: int, smallest: int) -> int:
  """The padded width for prompts `width` wide: smallest * 2^k, the least that holds them.

  Geometric buckets keep the number of compiled programs logarithmic in the
  prompt length, for at most twice the width.
  """
  padded = smallest
  while padded < width:
    padded *= 2
  return padded


def _bucketed(tokens: np.ndarray, bucket: int) -> np.ndarray:
  return np.pad(tokens, ((0, 0), (0, bucket_width(tokens.shape[1], bucket) - tokens.shape[1])))


@dataclasses.dataclass(frozen=True)
class BatchRun:
  """One batch's output and where its time went.

  Attributes:
    output: the program's GenerationOutput or SpecOutput.
    seconds: the compiled call alone.
    lower_seconds: tracing the program and lowering it to StableHLO, which no
      cache saves in a new process.
    compile_seconds: XLA's compile, or loading the result from the persistent cache.
  """

  output: Any
  seconds: float
  lower_seconds: float
  compile_seconds: float


def compile_and_run(method: Method, setup: Setup, batch: list[Request], key,
                    bandit=None) -> BatchRun:
  """Compiles then times one batch."""
  max_new = setup.max_new_tokens
  tokens, lengths = prepare_prompts([r.token_ids for r in batch], setup.target.config.vocab_size)
  reserve = max((arm.gamma for arm in method.arms), default=-1) + 1
  padded = _bucketed(tokens, setup.bucket)
  capacity = required_capacity(setup.target.config, tokens.shape[1], max_new, reserve=reserve,
                          padded_width=padded.shape[1])
  tokens = padded
  args = jax.device_put((tokens, lengths, key, setup.sampler))
  start = time.perf_counter()
  if not method.arms:
    decoder = Decoder(setup.target, max_new, setup.eos_ids, capacity)
    inputs = (setup.params["target"], *args)
  else:
    decoder = SpeculativeDecoder(setup.target, method.arms, max_new, setup.eos_ids,
                                 method.strategy, setup.reward, capacity, setup.verify_fn)
    if bandit is None:
      bandit = method.strategy.init(len(method.arms))
    inputs = (setup.params, *args[:3], Samplers.same(args[3]), bandit)
  lowered = decoder.lower(*inputs)
  lowered_at = time.perf_counter()
  compiled = lowered.compile(setup.compiler_options)
  compiled_at = time.perf_counter()
  out = jax.block_until_ready(compiled(*inputs))
  seconds = time.perf_counter() - compiled_at
  if method.arms:
    raise_on_nan(out.nan_rows, out.nan_arm, decoder.arm_names)
  else:
    raise_on_nan(out.nan_rows)
  return BatchRun(out, seconds, lowered_at - start, compiled_at - lowered_at)


def calibrate_costs(arms: tuple[Arm, ...], setup: Setup, batch: list[Request],
                    steps: int) -> tuple[Arm, ...]:
  """Each arm's cost: its seconds per step, stepping alone from the first batch's prompts.

  Timed as the slope between loops of 2 and 2 + `steps` steps inside one compiled
  program, so neither the prefill nor dispatch counts.
  """
  tokens, lengths = prepare_prompts([r.token_ids for r in batch], setup.target.config.vocab_size)
  tokens = _bucketed(tokens, setup.bucket)
  calibrated = []
  for arm in tqdm.tqdm(arms, desc="calibrating arm costs", unit="arm", leave=False):
    decoder = SpeculativeDecoder(setup.target, (arm,), 1, reward=setup.reward,
                                 verify_fn=setup.verify_fn)
    measured, _ = timing.held_step_seconds(decoder, setup.params, (tokens, lengths),
                                           setup.sampler, (2, 2 + steps), repeats=3)
    calibrated.append(dataclasses.replace(arm, cost=max(measured["seconds"], 1e-6)))
  jax.clear_caches()
  return tuple(calibrated)


def summarize_method(records: list[dict], batch_seconds: list[float],
                     step_seconds: list[float]) -> dict[str, Any]:
  new_tokens = sum(r["new_tokens"] for r in records)
  summary = dict(prompts=len(records), new_tokens=new_tokens, seconds=sum(batch_seconds),
                 tokens_per_second=new_tokens / sum(batch_seconds),
                 step_ms_p50=1e3 * float(np.percentile(step_seconds, 50)),
                 step_ms_p99=1e3 * float(np.percentile(step_seconds, 99)))
  if "accepted" in records[0]:
    totals = {k: sum(r[k] for r in records) for k in ("steps", "tested", "accepted", "emitted")}
    summary |= dict(alpha=totals["accepted"] / max(totals["tested"], 1),
                    tau=totals["emitted"] / max(totals["steps"], 1))
  return summary


def arm_shares(arm_names: list[str], steps: list[tuple[str, int]]) -> dict[str, dict[str, float]]:
  """Fraction of loop steps given to each arm, per prompt kind and overall."""
  shares = {}
  for kind in [*dict.fromkeys(k for k, _ in steps), "all"]:
    counts = Counter(arm for k, arm in steps if kind in (k, "all"))
    total = sum(counts.values())
    shares[kind] = {name: counts[i] / total for i, name in enumerate(arm_names)}
  return shares


def print_table(summaries: dict[str, dict], synthetic: bool) -> None:
  baseline = summaries.get("ar", {}).get("tokens_per_second")
  width = max(map(len, summaries)) + 2
  print(f"\n{'method':<{width}} {'tok/s':>9} {'alpha':>6} {'tau':>5} {'step p50 ms':>12} "
        f"{'step p99 ms':>12} {'vs AR':>6}")
  for name, s in summaries.items():
    speedup = f"{s['tokens_per_second'] / baseline:.2f}x" if baseline else "-"
    alpha = f"{s['alpha']:.3f}" if "alpha" in s else "-"
    tau = f"{s['tau']:.2f}" if "tau" in s else "-"
    print(f"{name:<{width}} {s['tokens_per_second']:>9.1f} {alpha:>6} {tau:>5} "
          f"{s['step_ms_p50']:>12.2f} {s['step_ms_p99']:>12.2f} {speedup:>6}")
  if synthetic:
    print("(synthetic weights: speeds only; acceptance of random drafters means nothing)")


def run_generation(config: ml_collections.ConfigDict, env: dict
                   ) -> tuple[dict[str, Any], list[dict]]:
  """Runs every method on the prompts; returns (payload, per-prompt records)."""
  check_checkpoints(config)
  dtype = param_dtype(config)
  model = load_model(config.target, config.checkpoint_dir, config.synthetic_weights, dtype,
                     config.seed)
  label = "SYNTHETIC WEIGHTS (speed only, text is meaningless)" if model.synthetic else model.source
  print(f"target: {config.target} [{label}] on {env['device']}, {jnp.dtype(dtype).name}")
  methods, params = build_methods(config, model, dtype)
  setup = make_setup(config, model, params, dtype)
  requests = build_requests(config, model)
  batches = [requests[i:i + config.batch_size]
             for i in range(0, len(requests), config.batch_size)]

  methods = with_arm_costs(methods, config, setup, batches[0])
  bandit_arms = next((m.arms for m in methods if m.is_bandit), ())
  if bandit_arms:
    print("arm costs (s/step): " + ", ".join(f"{a.name} {a.cost:.4f}" for a in bandit_arms))

  records, summaries, histories = [], {}, {}
  for method in tqdm.tqdm(methods, desc="methods", unit="method", disable=len(methods) < 2):
    rng = jax.random.key(config.seed)  # the same randomness for every method
    bandit, steps_by_kind = None, []
    method_records, batch_seconds, step_seconds = [], [], []
    for batch in tqdm.tqdm(batches, desc=method.name, unit="batch", leave=False):
      rng, key = jax.random.split(rng)
      run = compile_and_run(method, setup, batch, key, bandit)
      out, seconds = run.output, run.seconds
      batch_seconds.append(seconds)
      step_seconds.append(seconds / max(int(out.steps), 1))
      if method.is_bandit:
        bandit = out.bandit
        steps_by_kind += [(batch[0].kind, int(a)) for a in out.history.arm[:int(out.steps)]]
      for row, request in enumerate(batch):
        ids = np.asarray(out.tokens[row, :out.num_tokens[row]]).tolist()
        record = dict(method=method.name, id=request.id, kind=request.kind,
                      prompt_tokens=len(request.token_ids), new_tokens=len(ids),
                      batch_seconds=seconds, lower_seconds=run.lower_seconds,
                      compile_seconds=run.compile_seconds,
                      loop_steps=int(out.steps),
                      text=None if model.tokenizer is None else model.tokenizer.decode(ids))
        if method.arms:
          record |= {name: int(getattr(out.metrics, name)[row])
                     for name in ("steps", "proposed", "tested", "accepted", "emitted")}
        method_records.append(record)
    # Each method's programs are compiled for it alone; let them go before the next.
    jax.clear_caches()
    summaries[method.name] = summarize_method(method_records, batch_seconds, step_seconds)
    if method.is_bandit:
      names = [arm.name for arm in method.arms]
      summaries[method.name]["arm_shares"] = arm_shares(names, steps_by_kind)
      histories[method.name] = dict(arms=names, steps=steps_by_kind)
    records += method_records

  fixed = {name: s["tokens_per_second"] for name, s in summaries.items()
           if name in config_lib.method_names(config) and not name.startswith("bandit:")}
  if histories and fixed:
    best = max(fixed, key=fixed.get)
    for name in histories:
      summaries[name]["vs_best_fixed"] = summaries[name]["tokens_per_second"] / fixed[best]
      summaries[name]["best_fixed"] = best

  if config.print_text:
    for record in records:
      if record["text"] is not None and record["method"] == methods[0].name:
        print(f"\n--- {record['id']} ({record['new_tokens']} tokens) ---\n{record['text']}")
  print_table(summaries, model.synthetic)
  payload = dict(config=config.to_dict(), synthetic_weights=model.synthetic,
                 weights=model.source, summaries=summaries, bandit_histories=histories,
                 arm_costs={a.name: a.cost for a in bandit_arms})
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
  result = verify_kernel.bench(ints(k.batches), ints(k.gammas), ints(k.vocabs), (4, 24),
                               k.repeats, verify_kernel.VerifyTiling(), k.interpret,
                               int(k.copy_gib * 2**30))
  path = results.write(config.experiment, dict(config=config.to_dict(), **result),
                       [{k: v for k, v in row.items() if not k.startswith("raw")}
                        for row in result["rows"]], directory=config.results_dir, env=env)
  print(f"results: {path}")
  return dict(rows=result["rows"], path=str(path))


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
  sweep = config_lib.parse_sweep(config)
  if sweep is not None:
    return run_sweep(config, env, *sweep)
  return write_generation(config, env, *run_generation(config, env))
