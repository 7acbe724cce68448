"""The pipeline every front end shares: load, build arms, prepare batches, generate.

api.py, the experiment runner and the compile-time benchmark go through it:
`build_methods` turns a validated config into methods (plain AR, one arm or a
bandit) and the params dict the engine takes, `make_setup` gathers what every
batch needs, and `compile_and_run` pads a batch to its prompt bucket, checks
its budget, runs the method's decoder and reports NaN rows. Each decoder's
program is compiled once per batch shape and kept in the Setup; `compile_ahead`
compiles a run's programs side by side before its first batch.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import pathlib
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from flashspec_jax import config as config_lib
from flashspec_jax import environment, executables, sharding, timing
from flashspec_jax.bandit import ACCEPTANCE_STRATEGIES, Fixed, Strategy, make_strategy
from flashspec_jax.drafters import FeatureDrafter, ModelDrafter, NgramDrafter
from flashspec_jax.engine import Arm, Reward, SpeculativeDecoder, reward_named, step_bodies
from flashspec_jax.generate import Decoder, slots_past_budget
from flashspec_jax.kernels.verify import get_verify_fn
from flashspec_jax.loading import (TARGET_FLAG, CheckpointError, LoadedModel, check_checkpoint,
                                   load_model)
from flashspec_jax.loading.eagle import feature_layers, load_drafter, shipped_path
from flashspec_jax.loading.tokenizer import encode_chat
from flashspec_jax.models import eagle
from flashspec_jax.models.config import model_config
from flashspec_jax.models.llama import Llama
from flashspec_jax.sampling import Samplers, make_sampler
from flashspec_jax.sequences import prepare_prompts, required_capacity

DRAFT_FLAG = "--config.draft_checkpoint_dir"


@dataclasses.dataclass
class Request:
  id: str
  kind: str
  token_ids: list[int]


def requests_of(prompts, tokenizer) -> list[Request]:
  """Requests of `prompts.Prompt`s, each its conversation in the chat template."""
  ids = encode_chat(tokenizer, [prompt.conversation for prompt in prompts])
  return [Request(prompt.id, prompt.kind, row) for prompt, row in zip(prompts, ids)]


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
  pass_width: int | None = None  # deterministic mode (config_lib.pass_width)
  mesh: Any = None  # the target's tensor-parallel mesh; None is one device
  # XLA options for compiling each batch's program (bench.compile_time varies them).
  compiler_options: dict[str, Any] | None = None
  # Compiled programs by (decoder, prompt shape): a later batch of the same shape
  # neither traces nor compiles again.
  programs: dict[tuple, Any] = dataclasses.field(default_factory=dict)


def load_target(config: ml_collections.ConfigDict, dtype, target_flag: str = TARGET_FLAG,
                draft_flag: str = DRAFT_FLAG) -> LoadedModel:
  """The target, after every check that needs no weights: checkpoints present and of its
  shape, and its weights fitting config.mesh's devices; in its shards with a mesh."""
  tp, shape, itemsize = sharding.parse_mesh(config.mesh), model_config(config.target), \
      jnp.dtype(dtype).itemsize
  sharding.check_fits(shape, tp, itemsize, sharding.device_memory())
  if tp > len(jax.devices()):
    raise ValueError(f"{config.target}: config.mesh = {config.mesh!r} needs {tp} devices, and "
                     f"{len(jax.devices())} {jax.default_backend()} device(s) are visible (its "
                     f"weights take {sharding.weight_bytes(shape, itemsize) / 1e9:.0f} GB, "
                     f"{sharding.weight_bytes(shape, itemsize, tp) / 1e9:.0f} GB per device at "
                     f"tp:{tp})")
  check_checkpoints(config, target_flag, draft_flag)
  return load_model(config.target, config.checkpoint_dir, config.synthetic_weights, dtype,
                    config.seed, mesh=sharding.mesh_for(config.mesh))


def param_dtype(config: ml_collections.ConfigDict):
  if config.dtype == "auto":
    return jnp.bfloat16 if environment.on_gpu() else jnp.float32
  return jnp.dtype(config.dtype)


def build_arm(spec: config_lib.ArmSpec, config, target: LoadedModel, dtype,
              params: dict[str, Any], drafter_configs: dict[str, Any]) -> Arm:
  """The arm for a spec; a separate draft model is loaded once, into `params`."""
  gamma = spec.gamma or config.sampling.gamma
  if spec.kind == "ar":
    return Arm()
  # Unrolled draft steps run fastest on a GPU; on a CPU they mostly cost compile time
  # (config.draft_steps). N-gram arms share a step body of their widest gamma only on a
  # GPU, where a wider verify pass costs about the same (NgramDrafter.shares_step_body).
  unroll = config_lib.unrolled_drafts(config)
  if spec.kind == "layer_skip":  # config.validate has checked k against the target's layers
    return Arm(ModelDrafter(Llama(target.config, num_layers=int(spec.arg), param_dtype=dtype),
                            unroll=unroll), gamma)
  if spec.kind == "ngram":
    return Arm(NgramDrafter(target.config.vocab_size, int(spec.arg),
                            shares_step_body=environment.on_gpu()), gamma)
  if spec.kind == "eagle":
    layers = (() if spec.arg == "random"
              else feature_layers(eagle_weights(spec.arg, config), target.config))
    if spec.arg not in params["drafters"]:
      params["drafters"][spec.arg] = (
          eagle.init_params(target.config, jax.random.key(config.seed + 2), dtype)
          if spec.arg == "random" else load_drafter(eagle_weights(spec.arg, config), target.config,
                                                    dtype, params["target"]))
    return Arm(FeatureDrafter(Llama(target.config, param_dtype=dtype), spec.arg, unroll=unroll,
                              feature_layers=layers), gamma)
  if spec.arg not in drafter_configs:
    # load_target has checked the checkpoint, naming the draft flag (check_checkpoints).
    drafter = load_model(spec.arg, config.draft_checkpoint_dir, config.synthetic_weights, dtype,
                         config.seed + 1, with_tokenizer=False)
    params["drafters"][spec.arg] = drafter.params
    drafter_configs[spec.arg] = drafter.config
  return Arm(ModelDrafter(Llama(drafter_configs[spec.arg], param_dtype=dtype), spec.arg,
                          unroll=unroll), gamma)


def eagle_weights(name: str, config) -> pathlib.Path:
  """The weights file of the arm eagle:<name>: config.eagle_checkpoint's for it, else the
  shipped one."""
  paths = config_lib.eagle_checkpoints(config)
  path = paths.get(name, paths.get(None))
  return pathlib.Path(path) if path else shipped_path(name)


def check_checkpoints(config, target_flag: str = TARGET_FLAG,
                      draft_flag: str = DRAFT_FLAG) -> None:
  """Fails before any weights load if the target's or a draft model's checkpoint is
  missing or of another shape, or a feature drafter's weights file is missing, or made
  for another target; the error names the flag (or field) to set, or the file."""
  specs = config_lib.used_arm_specs(config)
  for name in sorted({spec.arg for spec in specs if spec.kind == "eagle"} - {"random"}):
    if not eagle_weights(name, config).is_file():
      raise CheckpointError(f"no weights for the feature drafter eagle:{name} at "
                            f"{eagle_weights(name, config)}: set --config.eagle_checkpoint, or "
                            f"use eagle:random for an untrained one")
    feature_layers(eagle_weights(name, config), model_config(config.target))  # its header
  if config.synthetic_weights:
    return
  check_checkpoint(config.target, config.checkpoint_dir, target_flag)
  for shape in sorted({spec.arg for spec in specs if spec.kind == "draft_model"}):
    check_checkpoint(shape, config.draft_checkpoint_dir, draft_flag)


def strategy_for(name: str, config) -> Strategy:
  acceptance = dict(discount=config.bandit.acceptance_discount,
                    request_carry=config.bandit.request_carry)
  # Hedge draws its arm from its weights: it has no step cost to add waits to.
  priced = dict(acceptance, wait_cost=config.bandit.wait_cost)
  contextual = dict(priced, step_context=config.bandit.step_context)
  kwargs = {"discounted_ucb": dict(discount=config.bandit.discount),
            "epsilon_greedy": dict(epsilon=config.bandit.epsilon),
            **dict.fromkeys(ACCEPTANCE_STRATEGIES, priced), "hedge": acceptance,
            "contextual_thompson": contextual, "contextual_kl_ucb": contextual}.get(name, {})
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
  """With the target on a tensor-parallel mesh, the drafters' own weights are replicated
  over it (sharding.py)."""
  sampling = config.sampling
  mesh = sharding.mesh_of(params["target"])
  if mesh is not None:
    params = dict(params, drafters=sharding.replicated(params["drafters"], mesh))
  return Setup(params=params, target=Llama(model.config, param_dtype=dtype),
               sampler=make_sampler(sampling.temperature, sampling.top_k, sampling.top_p),
               max_new_tokens=sampling.max_new_tokens,
               eos_ids=() if model.synthetic else model.config.eos_token_ids,
               reward=reward_named(config.bandit.reward),
               verify_fn=get_verify_fn(config.verify_impl),
               bucket=config.prompts.bucket, pass_width=config_lib.pass_width(config),
               mesh=mesh)


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
    lower_seconds: tracing the program and lowering it to StableHLO (0 when the
      Setup held the program or the program store had it: see executables.py).
    compile_seconds: XLA's compile, or loading the program from the store (0 when
      the Setup held it).
    committed_arm: the arm a bandit's batch ran alone, committed (`compile_and_run`),
      or -1.
  """

  output: Any
  seconds: float
  lower_seconds: float
  compile_seconds: float
  committed_arm: int = -1


def _program(method: Method, setup: Setup, batch: list[Request], key, bandit=None):
  """The decoder a batch runs on, its inputs, and the Setup's key for its program."""
  max_new = setup.max_new_tokens
  tokens, lengths = prepare_prompts([r.token_ids for r in batch], setup.target.config.vocab_size)
  reserve = slots_past_budget(max((arm.gamma for arm in method.arms), default=-1) + 1,
                              setup.pass_width)
  padded = _bucketed(tokens, setup.bucket)
  capacity = required_capacity(setup.target.config, tokens.shape[1], max_new, reserve=reserve,
                               padded_width=padded.shape[1])
  args = sharding.replicated((padded, lengths, key, setup.sampler), setup.mesh)
  if not method.arms:
    decoder = Decoder(setup.target, max_new, setup.eos_ids, capacity,
                      pass_width=setup.pass_width)
    inputs = (setup.params["target"], *args)
  else:
    decoder = SpeculativeDecoder(setup.target, method.arms, max_new, setup.eos_ids,
                                 method.strategy, setup.reward, capacity, setup.verify_fn,
                                 setup.pass_width)
    if bandit is None:
      bandit = decoder.chooser.init(len(method.arms))  # bound: its shape follows the arms
    inputs = (setup.params, *args[:3], Samplers.same(args[3]), bandit)
  return decoder, inputs, (decoder, padded.shape)


def compile_ahead(jobs: list[tuple[Method, list[Request]]], setup: Setup, threads: int) -> float:
  """Loads or compiles the programs these (method, batch) pairs need and the Setup lacks;
  returns the seconds it took.

  Tracing and lowering hold Python's lock, so programs are lowered in turn; XLA
  loads stored programs and compiles outside it, `threads` programs side by side,
  which pays on a GPU host, where one program's compile keeps few of its cores busy
  (and a stored bandit program took 6.9 s to load on the H200).
  """
  start = time.perf_counter()
  needed = {}
  for method, batch in jobs:
    decoder, inputs, program = _program(method, setup, batch, jax.random.key(0))
    if program not in setup.programs:
      needed.setdefault(program, (decoder, inputs))
  keys = {program: executables.program_key(decoder, inputs, setup.compiler_options)
          for program, (decoder, inputs) in needed.items()}
  with concurrent.futures.ThreadPoolExecutor(max(threads, 1)) as pool:
    stored = dict(zip(needed, pool.map(
        lambda program: executables.load(keys[program], needed[program][1]), needed)))
    lowered = {program: decoder.lower(*inputs) for program, (decoder, inputs) in needed.items()
               if stored[program] is None}
    compiled = pool.map(lambda program: executables.compile_and_store(
        keys[program], lowered[program], setup.compiler_options), lowered)
    setup.programs.update({p: c for p, c in stored.items() if c is not None})
    setup.programs.update(zip(lowered, compiled))
  return time.perf_counter() - start


def warm_up(jobs: list[tuple[Method, list[Request]]], setup: Setup) -> float:
  """Runs each program these jobs need once, untimed; returns the seconds it took.

  A program's first run is slower than its later ones: on a GPU an executable loads
  its kernels when it first runs, and in the H200 choosers runs each bandit program's
  first call took 1.8-3.1x the time per step of its later ones, and on the CPU up to
  1.7x (bench/chooser_steps.py), which a stream of short calls would count against
  the bandit.
  """
  start = time.perf_counter()
  warmed = set()
  for method, batch in jobs:
    _, inputs, program = _program(method, setup, batch, jax.random.key(0))
    if program not in warmed:
      warmed.add(program)
      jax.block_until_ready(setup.programs[program](*inputs))
  return time.perf_counter() - start


def committing_chooser(method: Method) -> Strategy | None:
  """The bandit's chooser bound to its arms, if it can commit a request to one arm
  (`compile_and_run`); else None."""
  chooser = method.strategy.bind(method.arms) if method.is_bandit else None
  return chooser if getattr(chooser, "commits", False) else None


def committed_method(method: Method, arm: Arm) -> Method:
  """The one-arm method a bandit's request runs when committed to `arm`. An arm's cost
  steers only a chooser, so it runs at the default cost: a fixed method of the same
  drafter arm then shares its program."""
  return Method(f"{method.name}@{arm.name}", (dataclasses.replace(arm, cost=1.0),))


def committed_methods(method: Method) -> list[Method]:
  """The one-arm methods a bandit's requests may commit to, one per arm (none for a
  chooser that never commits)."""
  if committing_chooser(method) is None:
    return []
  return [committed_method(method, arm) for arm in method.arms]


def _host_device():
  """Where a chooser's commit test and learning run: the host's CPU. On a GPU, small
  programs of their own would allocate between the fixed program's calls and can
  move its buffers, and a program whose buffers moved records its command buffers
  again (docs/bandits.md, "Committing a request to one arm")."""
  try:
    return jax.devices("cpu")[0]
  except RuntimeError:  # JAX_PLATFORMS leaves the CPU out
    return jax.devices()[0]


@functools.partial(jax.jit, static_argnums=(0, 2))
def _commit_test(chooser, state, confidence):
  return chooser.committed_arm(state, confidence)


@functools.partial(jax.jit, static_argnums=0)
def _learn_committed(chooser, state, arm, steps, accepted, tested):
  return chooser.learn_committed(state, arm, steps, accepted, tested)


def warm_commit(method: Method, confidence: float) -> None:
  """Compiles a bandit's commit test and learning (`compile_and_run`) for the host,
  on its fresh state, so that no timed call pays for it."""
  chooser = committing_chooser(method) if confidence else None
  if chooser is not None:
    state = jax.device_put(chooser.init(len(method.arms)), _host_device())
    zero = np.int32(0)
    jax.block_until_ready((_commit_test(chooser, state, confidence),
                           _learn_committed(chooser, state, zero, np.int32(1), zero, zero)))


def compile_and_run(method: Method, setup: Setup, batch: list[Request], key,
                    bandit=None, commit: float = 0.0) -> BatchRun:
  """Runs one batch, loading or compiling its program first unless the Setup holds it;
  times each.

  commit > 0: a bandit whose evidence says one arm beats every other (its chooser's
  `committed_arm`, at confidence `commit`) runs the batch on that arm's own
  program, without the chooser's work in each step, then learns from the batch's
  totals; the output is the bandit's, its history that arm at every step, its
  state on the host. The seconds count the test and the learning (`warm_commit`
  compiles both).
  """
  chooser = committing_chooser(method) if commit and bandit is not None else None
  if chooser is not None:
    start = time.perf_counter()
    # may_alias: a state already there is taken as it is, not copied by a program of
    # its own inside the timed call.
    state = jax.device_put(bandit, _host_device(), may_alias=True)
    arm = int(_commit_test(chooser, state, commit))
    test_seconds = time.perf_counter() - start
    if arm >= 0:
      run = compile_and_run(committed_method(method, method.arms[arm]), setup, batch, key)
      start = time.perf_counter()
      steps, metrics, arms = jax.device_get((run.output.steps, run.output.metrics,
                                             run.output.history.arm))
      state = jax.block_until_ready(_learn_committed(
          chooser, state, np.int32(arm), np.int32(steps), np.int32(metrics.accepted.sum()),
          np.int32(metrics.tested.sum())))
      history = run.output.history.replace(arm=np.where(arms >= 0, arm, -1).astype(np.int32))
      return dataclasses.replace(
          run, output=run.output.replace(bandit=state, history=history),
          seconds=run.seconds + test_seconds + time.perf_counter() - start, committed_arm=arm)
    # Back where the program reads it, from the host if a committed request left it there.
    bandit = (jax.device_put(bandit, jax.devices()[0], may_alias=True) if setup.mesh is None
              else sharding.replicated(bandit, setup.mesh))
  decoder, inputs, program = _program(method, setup, batch, key, bandit)
  lower_seconds = compile_seconds = 0.0
  if program not in setup.programs:
    setup.programs[program], lower_seconds, compile_seconds = executables.load_or_compile(
        decoder, inputs, setup.compiler_options)
  start = time.perf_counter()
  out = jax.block_until_ready(setup.programs[program](*inputs))
  return BatchRun(decoder.checked(out), time.perf_counter() - start, lower_seconds,
                  compile_seconds)


def calibrate_costs(arms: tuple[Arm, ...], setup: Setup, batch: list[Request],
                    steps: int) -> tuple[Arm, ...]:
  """Each arm's cost: its seconds per step, stepping alone from the first batch's prompts.

  Timed once per step body (`drafters.step_bodies`), whose arms all run the same
  program (the widest gamma's), as the slope between loops of 2 and 2 + `steps`
  steps inside one compiled program, so neither the prefill nor dispatch counts.
  """
  tokens, lengths = prepare_prompts([r.token_ids for r in batch], setup.target.config.vocab_size)
  tokens = _bucketed(tokens, setup.bucket)
  costs = {}
  for body in tqdm.tqdm(step_bodies(arms), desc="calibrating arm costs", unit="body",
                        leave=False):
    decoder = SpeculativeDecoder(setup.target, tuple(arms[i] for i in body), 1,
                                 reward=setup.reward, verify_fn=setup.verify_fn,
                                 pass_width=setup.pass_width)
    # The timing holds the bandit on the body's first arm; every arm of it runs its program.
    measured, _ = timing.held_step_seconds(decoder, setup.params, (tokens, lengths),
                                           setup.sampler, (2, 2 + steps), repeats=3)
    seconds = measured["seconds"]
    if seconds <= 0:  # noise swamped the difference; the long loop's time per step bounds it
      seconds = statistics.median(measured["long_times"]) / measured["long"]
    costs |= dict.fromkeys(body, seconds)
  jax.clear_caches()
  return tuple(dataclasses.replace(arm, cost=costs[i]) for i, arm in enumerate(arms))
