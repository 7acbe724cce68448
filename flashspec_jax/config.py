"""The experiment config schema: every field `run.py` understands, with its default.

Experiment files in `experiments/` start from `base_config()` and change
fields; the config is locked, so a misspelt field, in a file or a flag, fails at
parse time with ml_collections' message naming it. `validate` checks values.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Callable

import ml_collections

from flashspec_jax import environment, sharding
from flashspec_jax.bandit import ENGINE_STRATEGIES, STRATEGIES
from flashspec_jax.engine import MAX_GAMMA, REWARDS
from flashspec_jax.kernels.verify import VERIFY_IMPLS, get_verify_fn
from flashspec_jax.models.config import known_shapes, model_config
from flashspec_jax.models.eagle import valid_feature_layers
from flashspec_jax.prompts import PROMPT_SETS, SPLITS, read_prompt_file

DTYPES = ("auto", "float32", "bfloat16")
DRAFT_STEPS = ("auto", "unrolled", "loop")
KINDS = ("generate", "bandit_simulation", "kernel_bench", "train_drafter")
# Arms: "ar", "layer_skip:<k>" (the target's first k layers draft),
# "draft_model:<shape>" (a separate model of a shape in configs/) and
# "ngram:<n>" (prompt lookup with matches up to n tokens) and "eagle:<name>" (a
# feature drafter: the shipped weights flashspec_jax/weights/eagle_<name>/, or
# config.eagle_checkpoint's; "eagle:random" is untrained), each optionally
# followed by "@<gamma>". A method is an arm, run alone, or "bandit:<strategy>",
# which chooses among config.arms at every step.
ARM_KINDS = ("ar", "layer_skip", "draft_model", "ngram", "eagle")
ARM_FORMS = (f"ar, layer_skip:<k>, draft_model:<shape>, ngram:<n>, eagle:<name>, each with an "
             f"optional @<gamma> in [1, {MAX_GAMMA}]")
# The strategies a user may name for bandit:<strategy>; "fixed" is the engine's own, for
# a method that runs one arm.
CHOOSERS = tuple(sorted(set(ENGINE_STRATEGIES) - {"fixed"}))


@dataclasses.dataclass(frozen=True)
class ArmSpec:
  kind: str
  arg: str = ""
  gamma: int | None = None  # None: config.sampling.gamma

  @classmethod
  def parse(cls, text: str) -> ArmSpec:
    """Parses an arm; raises ValueError on anything else."""
    body, _, gamma = text.partition("@")
    kind, _, arg = body.partition(":")
    valid = (kind == "ar" and not arg and not gamma) or (
        kind in ("layer_skip", "ngram") and arg.isdigit() and int(arg) >= 1) or (
        kind in ("draft_model", "eagle") and bool(arg))
    if not valid or (gamma and not (gamma.isdigit() and 1 <= int(gamma) <= MAX_GAMMA)):
      raise ValueError(f"{text!r} is not an arm")
    return cls(kind, arg, int(gamma) if gamma else None)


def base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.experiment = "default"
  # generate, bandit_simulation (Bernoulli arms, no model) or kernel_bench
  # (the verify kernel against its reference).
  config.kind = "generate"
  # A sweep runs the experiment once per value of one field, e.g.
  # "sampling.gamma=1,2,4,8,16", and writes one results file with all points.
  config.sweep = ""
  config.methods = "ar"  # comma-separated; all run on the same prompts, side by side
  config.arms = "ngram:3,layer_skip:20,ar"  # what bandit:<strategy> methods choose among
  # A model shape in configs/; its weights come from checkpoint_dir, the default
  # place for that model, or random weights when synthetic_weights is set.
  config.target = "smollm2_135m"
  config.checkpoint_dir = ""
  config.draft_checkpoint_dir = ""  # for a draft_model method; "" = its default place
  # A .safetensors for every eagle:<name> arm, or "<name>=<path>,..." for some, the
  # others shipped (two drafters side by side in one run); "" = the shipped ones.
  config.eagle_checkpoint = ""
  config.synthetic_weights = False
  config.dtype = "auto"  # bfloat16 on GPU, float32 on CPU
  config.seed = 0  # sampling and synthetic weights; prompts.seed picks the prompts
  config.batch_size = 1
  # Tensor parallelism over this many devices ("tp:<n>"; "" is one device): the target
  # is split Megatron-style with JAX's sharding, the rest replicated (sharding.py).
  config.mesh = ""
  config.results_dir = "results"
  config.print_text = True
  # Compiled programs persist here across runs: "auto" is a per-user cache
  # directory (see environment.user_cache_dir), "" turns it off.
  config.compilation_cache_dir = "auto"
  # Programs XLA compiles side by side before a run's first batch; 0 is half the
  # CPU cores (one program's compile keeps few cores busy on a GPU host).
  config.compile_threads = 0

  config.prompts = ml_collections.ConfigDict()
  config.prompts.sets = "chat,code,edit"  # comma-separated, from PROMPT_SETS
  config.prompts.num_per_set = 1
  config.prompts.split = "tune"
  # "blocks": all prompts of one set, then the next set's; "interleaved": one of each in turn.
  config.prompts.order = "blocks"
  # Which prompts run; apart from config.seed, so two sampling seeds see the same prompts.
  config.prompts.seed = 0
  # A JSONL file of your own prompts, one {"text": ...} or {"messages": [...]} per
  # line with an optional "kind"; when set, it replaces sets, num_per_set and split.
  config.prompts.file = ""
  config.prompts.synthetic_length = 128  # prompt tokens per row with synthetic weights
  # Prompt widths are padded up to this smallest bucket times a power of two, so
  # that prompts of similar length share one compiled program: few programs,
  # at most twice the width.
  config.prompts.bucket = 64

  config.sampling = ml_collections.ConfigDict()
  config.sampling.temperature = 0.0  # 0 is greedy
  config.sampling.top_k = 0  # 0 is off
  config.sampling.top_p = 1.0  # 1 is off
  config.sampling.max_new_tokens = 64
  config.sampling.gamma = 4  # draft tokens per speculative step
  # auto: the Pallas kernel on a GPU, the jnp reference elsewhere.
  config.verify_impl = "auto"
  # How a model drafter's gamma draft steps compile: "unrolled" (the fastest steps on a
  # GPU, at the price of gamma - 1 copies of a draft step in the program), "loop" (one:
  # a faster compile and a smaller program) or "auto" (unrolled on a GPU, else a loop).
  config.draft_steps = "auto"
  # Greedy speculative output equal to greedy AR's bit for bit, in any dtype: every
  # target pass after the prefill, AR steps too, is `pass_width(config)` tokens wide,
  # and XLA picks kernels without autotuning (docs/exactness.md).
  config.deterministic = False

  config.bandit = ml_collections.ConfigDict()
  config.bandit.reward = "goodput"  # or "acceptance"
  # Step cost of each arm of config.arms, comma-separated, for the goodput
  # reward; "" times each arm at start-up, stepping alone for calibration_steps.
  config.bandit.costs = ""
  config.bandit.calibration_steps = 8
  config.bandit.discount = 0.995  # discounted_ucb
  # The acceptance choosers (acceptance_thompson, kl_ucb, hedge and the contextual
  # ones): per step, on the drafts seen; evidence fades over about 1 / (1 - discount)
  # steps, so a change of domain is followed.
  config.bandit.acceptance_discount = 0.99
  # The same choosers: at each new request, on the evidence carried from earlier ones,
  # so that a request's own first steps outweigh the last request's sooner.
  config.bandit.request_carry = 1.0
  # The same choosers but Hedge: what one wait for the host costs, in the costs' unit.
  # On a GPU a step in another step body than the last step's waits for the host once
  # more for each loop it passes (drafters.host_waits), and the choosers add those
  # waits to the arm's cost (bench/chooser_steps.py fits a wait's cost from stream
  # runs); 0 lets them change body for free.
  config.bandit.wait_cost = 0.0
  # The contextual choosers: learn a model drafter's acceptance in n-gram lookup's
  # context too, not as one mean (bandit/acceptance.py, step_context).
  config.bandit.step_context = False
  # The acceptance choosers but Hedge: > 0 runs a request on one arm's own program,
  # without the chooser's work in its steps, where KL confidence bounds at this level
  # (nominal: no union over arms and contexts) on the drafters' acceptance say the arm
  # yields more tokens per cost than any other in every context seen so far; 0 never
  # commits (bandit/acceptance.py, committed_arm). No clear gain yet (docs/bandits.md).
  config.bandit.commit = 0.0
  # A results file of an earlier run: its bandit methods' final states are where this
  # run's same-named methods start ("" starts fresh).
  config.bandit.initial_state = ""
  config.bandit.epsilon = 0.1  # epsilon_greedy

  config.simulation = ml_collections.ConfigDict()
  config.simulation.strategies = "ucb1,thompson,discounted_ucb,epsilon_greedy"
  config.simulation.means = "0.3,0.7,0.5"
  config.simulation.means_after = ""  # "" keeps the means; else they change at switch_at
  config.simulation.switch_at = 0
  config.simulation.horizon = 10_000
  config.simulation.seeds = 20

  config.kernel = ml_collections.ConfigDict()
  config.kernel.batches = "1,8,32,128"
  config.kernel.gammas = "1,4,8,16"
  config.kernel.vocabs = "32000,128256"
  config.kernel.repeats = 5
  config.kernel.interpret = False  # True runs the kernel in Pallas interpret mode (CPU)
  config.kernel.copy_gib = 4.0

  # kind = "train_drafter": self-distils a feature drafter (flashspec_jax/distill.py)
  # on the target's answers to tune-split prompts of config.prompts.sets.
  config.train = ml_collections.ConfigDict()
  config.train.prompts_per_set = 1000  # at most; fewer where the tune split holds fewer
  config.train.later_chat_turns = 0  # at most this many later user turns of tune-split chats
  config.train.max_prompt_tokens = 384  # longer prompts are left out
  config.train.answer_tokens = 256
  config.train.answer_temperature = 0.0  # how the target answers (0 is greedy)
  config.train.sampled_answers = 0  # more answers to each prompt, sampled at temperature 1
  config.train.generate_batch = 64
  config.train.max_tokens = 640  # sequences are cut to this many tokens
  config.train.validation_fraction = 0.05
  config.train.rollout_steps = 4  # draft steps trained at once (training-time test)
  config.train.draft_vocabulary = 0  # > 0: draft only the answers' most frequent tokens
  # The target layers the drafter reads, fused (EAGLE-3), e.g. "2,15,27": comma-separated,
  # 0-based, the layer count for the final-normed state; "" reads that state alone (EAGLE).
  config.train.feature_layers = ""
  config.train.steps = 2000
  config.train.max_seconds = 0.0  # > 0: stop training after this long, whatever the step
  config.train.batch_size = 16
  config.train.learning_rate = 1e-3
  config.train.warmup_steps = 100
  config.train.weight_decay = 0.01
  config.train.grad_clip = 1.0
  config.train.log_every = 20
  config.train.checkpoint_every = 500
  config.train.workdir = ""  # keeps the sequences and checkpoints to resume from; "" none
  config.train.output = ""  # the drafter's .safetensors; "" puts it beside the results file
  # Locked here, not only once run.py has the file's config: a misspelt field set in
  # an experiment file is refused too.
  config.lock()
  return config


def is_tiny(arg: str | None) -> bool:
  """Experiment files take no argument, or ':tiny' for their CPU-sized variant."""
  if arg not in (None, "tiny"):
    raise ValueError(f"unknown config argument {arg!r}; use ':tiny' or nothing")
  return arg == "tiny"


def make_tiny(config: ml_collections.ConfigDict, *, synthetic: bool
              ) -> ml_collections.ConfigDict:
  """The CPU-sized variant of a generation experiment: few tokens, one prompt per set, and
  one compiled program per method; `synthetic` swaps the target for random tiny_llama weights."""
  config.experiment += "_tiny"
  if synthetic:
    config.target, config.synthetic_weights = "tiny_llama", True
  config.prompts.num_per_set = 1
  # Holds the first prompt of every set (SmolLM2 chat template: at most 220
  # tokens), so one program per method; a wider bucket slows every decode step.
  config.prompts.bucket = 256
  config.sampling.max_new_tokens = min(config.sampling.max_new_tokens, 8)
  config.bandit.calibration_steps = 2
  config.print_text = False
  return config


def parse_sweep(config: ml_collections.ConfigDict) -> tuple[str, list] | None:
  """(field, values) of config.sweep, values typed like the field; None without a sweep."""
  if not config.sweep:
    return None
  field, _, values = config.sweep.partition("=")
  node = config
  for part in field.split("."):
    node = node[part]  # KeyError for an unknown field
  if isinstance(node, bool):
    booleans = {"1": True, "true": True, "0": False, "false": False}
    return field, [booleans[v.lower()] for v in split_list(values)]  # KeyError for others
  return field, [type(node)(v) for v in split_list(values)]


def sweep_points(config: ml_collections.ConfigDict) -> list[tuple[str, ml_collections.ConfigDict]]:
  """("<field>=<value>", the config it runs) for each point of config.sweep; [] without one."""
  sweep = parse_sweep(config)
  if sweep is None:
    return []
  field, values = sweep
  return [(f"{field}={value}", with_override(config, field, value)) for value in values]


def for_each_sweep_point(config: ml_collections.ConfigDict,
                         check: Callable[[ml_collections.ConfigDict], None]) -> None:
  """check(point) for every point of config.sweep, before the first runs: a bad one found
  at its turn loses the points run before it, which are written once all have run. A
  ValueError names its point."""
  for label, point in sweep_points(config):
    try:
      check(point)
    except ValueError as error:
      raise ValueError(f"config.sweep's point {label}: {error}") from None


def with_override(config: ml_collections.ConfigDict, field: str, value):
  config = config.copy_and_resolve_references()
  *parents, leaf = field.split(".")
  node = config
  for parent in parents:
    node = node[parent]
  node[leaf] = value
  config.sweep = ""
  return config


def split_list(text: str) -> list[str]:
  return [item.strip() for item in text.split(",") if item.strip()]


def prompt_sets(config: ml_collections.ConfigDict) -> list[str]:
  return split_list(config.prompts.sets)


def method_names(config: ml_collections.ConfigDict) -> list[str]:
  return split_list(config.methods)


def arm_specs(config: ml_collections.ConfigDict) -> list[ArmSpec]:
  return [ArmSpec.parse(text) for text in split_list(config.arms)]


def floats(text: str) -> list[float]:
  return [float(x) for x in split_list(text)]


def _parses(parse, text) -> bool:
  try:
    parse(text)
  except (ValueError, KeyError, AttributeError):
    return False
  return True


def feature_layers(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """config.train.feature_layers, as FeatureDrafter.feature_layers takes them."""
  return tuple(int(x) for x in split_list(config.train.feature_layers))


def _ints(text: str) -> list[int]:
  values = [int(x) for x in split_list(text)]
  if not values or min(values) < 1:
    raise ValueError(text)
  return values


def _sweep_or_raise(config):
  sweep = parse_sweep(config)
  if sweep is not None and (not sweep[1] or sweep[0] == "sweep"):
    raise ValueError(config.sweep)


def _valid_method(name: str) -> bool:
  kind, _, arg = name.partition(":")
  if kind == "bandit":
    return arg in CHOOSERS
  return _parses(ArmSpec.parse, name)


def _arm_fits(spec: ArmSpec, target) -> bool:
  """Whether the arm can draft for the target shape: layer-skip keeps fewer layers
  than the target has, and a draft model is a known shape with the target's vocabulary."""
  if spec.kind == "layer_skip":
    return int(spec.arg) < target.num_layers
  if spec.kind == "draft_model":
    return spec.arg in known_shapes() and model_config(spec.arg).vocab_size == target.vocab_size
  return True


def unrolled_drafts(config: ml_collections.ConfigDict) -> bool:
  """Whether model drafters unroll their draft steps (config.draft_steps)."""
  if config.draft_steps == "auto":
    return environment.on_gpu()
  return config.draft_steps == "unrolled"


def pass_width(config: ml_collections.ConfigDict) -> int | None:
  """Deterministic mode's width of every target pass: the largest gamma of the run
  (sampling.gamma or an arm's @gamma) + 1, so that AR and every arm of one config
  share it; None when the mode is off."""
  if not config.deterministic:
    return None
  gammas = [ArmSpec.parse(name).gamma or 0 for name in used_arms(config)]
  return max([config.sampling.gamma, *gammas]) + 1


def eagle_checkpoints(config: ml_collections.ConfigDict) -> dict[str | None, str]:
  """config.eagle_checkpoint by arm name, None standing for every eagle arm."""
  return parse_eagle_checkpoint(config.eagle_checkpoint)


def parse_eagle_checkpoint(text: str) -> dict[str | None, str]:
  """An eagle_checkpoint value (one path for every eagle arm, or name=path pairs) by arm
  name, None standing for every eagle arm."""
  if not text or "=" not in text:
    pairs = {None: text} if text else {}
  else:
    pairs = dict(item.partition("=")[::2] for item in split_list(text))
  if any(name == "" or not path.endswith(".safetensors") for name, path in pairs.items()):
    raise ValueError(text)
  return pairs


def _eagle_checkpoints_read(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError if config.eagle_checkpoint names a file for no eagle arm the run
  builds at any point of its sweep: it would be silently unread."""
  used = _arm_args(config, "eagle")
  if any(not used if name is None else name not in used for name in eagle_checkpoints(config)):
    raise ValueError(config.eagle_checkpoint)


def _arm_args(config: ml_collections.ConfigDict, kind: str) -> set[str]:
  """The args of the arms of this kind (eagle:<name>, draft_model:<shape>) that the run
  builds at any point of its sweep; a point whose arms do not parse is left to its own
  validation."""
  points = [config] + ([point for _, point in sweep_points(config)]
                        if _parses(parse_sweep, config) else [])
  args = set()
  for point in points:
    if _parses(used_arm_specs, point):
      args |= {spec.arg for spec in used_arm_specs(point) if spec.kind == kind}
  return args


def bandit_states(path: str) -> dict:
  """The bandit states in an earlier run's results file; ValueError if it is none."""
  if not pathlib.Path(path).is_file():
    raise ValueError(path)
  data = json.loads(pathlib.Path(path).read_text())
  if not isinstance(data, dict) or not isinstance(data.get("bandit_states", {}), dict):
    raise ValueError(path)
  return data.get("bandit_states", {})


def used_arms(config: ml_collections.ConfigDict) -> list[str]:
  """The arms the run builds: each method that is an arm, and config.arms if a bandit runs."""
  names = [n for n in method_names(config) if not n.startswith("bandit:")]
  if any(n.startswith("bandit:") for n in method_names(config)):
    names += split_list(config.arms)
  return names


def used_arm_specs(config: ml_collections.ConfigDict) -> list[ArmSpec]:
  return list(map(ArmSpec.parse, used_arms(config)))


def _arms_fit(config: ml_collections.ConfigDict) -> str | None:
  """The first arm the run builds that cannot draft for config.target, or None."""
  target = model_config(config.target)
  return next((n for n in used_arms(config) if not _arm_fits(ArmSpec.parse(n), target)), None)


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first field whose value is invalid."""
  sim = config.simulation
  means_ok = _parses(floats, sim.means) and _parses(floats, sim.means_after)
  checks = [
      ("kind", config.kind in KINDS, f"one of {KINDS}"),
      ("methods", bool(method_names(config)) and all(map(_valid_method, method_names(config)))
       and len(set(method_names(config))) == len(method_names(config)),
       f"distinct comma-separated methods: arms ({ARM_FORMS}) or bandit:<strategy>, one of "
       f"{list(CHOOSERS)}"),
      ("arms", bool(split_list(config.arms)) and _parses(arm_specs, config),
       f"comma-separated arms: {ARM_FORMS}"),
      ("dtype", config.dtype in DTYPES, f"one of {DTYPES}"),
      ("batch_size", config.batch_size >= 1, ">= 1"),
      ("compile_threads", config.compile_threads >= 0, ">= 0 (0 is half the CPU cores)"),
      ("mesh", _parses(sharding.parse_mesh, config.mesh), "'' (one device) or 'tp:<n>'"),
      ("mesh", not config.mesh or config.kind != "train_drafter",
       "'' when training a drafter, which runs on one device"),
      ("prompts.sets", bool(prompt_sets(config))
       and set(prompt_sets(config)) <= set(PROMPT_SETS), f"a comma-separated subset of "
       f"{PROMPT_SETS}"),
      ("prompts.num_per_set", config.prompts.num_per_set >= 1, ">= 1"),
      ("prompts.split", config.prompts.split in SPLITS, f"one of {SPLITS}"),
      ("prompts.order", config.prompts.order in ("blocks", "interleaved"),
       "blocks or interleaved"),
      ("prompts.order", config.prompts.order == "blocks" or config.batch_size == 1,
       "blocks when batch_size > 1 (a batch must hold one prompt set, so that each step is "
       "credited to one set)"),
      ("prompts.synthetic_length", config.prompts.synthetic_length >= 1, ">= 1"),
      ("prompts.bucket", config.prompts.bucket >= 1, ">= 1"),
      ("sampling.temperature", config.sampling.temperature >= 0, ">= 0 (0 is greedy)"),
      ("target", config.target in known_shapes(), f"one of the shapes in configs/: "
       f"{known_shapes()}"),
      ("sampling.top_k", config.sampling.top_k >= 0, ">= 0 (0 is off)"),
      ("sampling.top_k", config.sampling.top_k == 0 or config.sampling.top_p == 1,
       "0 while sampling.top_p < 1: choose top_k or top_p, not both"),
      ("sampling.top_p", 0 < config.sampling.top_p <= 1, "in (0, 1]"),
      ("sampling.max_new_tokens", config.sampling.max_new_tokens >= 1, ">= 1"),
      ("sampling.gamma", 1 <= config.sampling.gamma <= MAX_GAMMA, f"in [1, {MAX_GAMMA}] "
       f"(see engine.MAX_GAMMA for why)"),
      ("draft_steps", config.draft_steps in DRAFT_STEPS, f"one of {DRAFT_STEPS}"),
      ("verify_impl", config.verify_impl in VERIFY_IMPLS and _parses(get_verify_fn,
                                                                      config.verify_impl),
       f"one of {VERIFY_IMPLS}; 'pallas' needs a CUDA GPU"),
      ("bandit.reward", config.bandit.reward in REWARDS, f"one of {REWARDS}"),
      ("bandit.costs", _parses(floats, config.bandit.costs) and (
          not split_list(config.bandit.costs) or (
              len(split_list(config.bandit.costs)) == len(split_list(config.arms))
              and min(floats(config.bandit.costs)) > 0)),
       "empty (calibrate) or one positive cost per arm"),
      ("bandit.calibration_steps", config.bandit.calibration_steps >= 1, ">= 1"),
      ("bandit.discount", 0 < config.bandit.discount <= 1, "in (0, 1]"),
      ("bandit.acceptance_discount", 0 < config.bandit.acceptance_discount <= 1, "in (0, 1]"),
      ("bandit.request_carry", 0 < config.bandit.request_carry <= 1, "in (0, 1]"),
      ("bandit.wait_cost", config.bandit.wait_cost >= 0, ">= 0"),
      ("bandit.commit", 0 <= config.bandit.commit < 1, "in [0, 1) (0 never commits)"),
      # A committed request teaches only its own arm: unless evidence fades, the
      # others' bounds never widen and the first commit lasts for good.
      ("bandit.commit", not config.bandit.commit or config.bandit.acceptance_discount < 1
       or config.bandit.request_carry < 1,
       "0 (off) unless acceptance_discount or request_carry is below 1"),
      ("bandit.initial_state", not config.bandit.initial_state
       or _parses(bandit_states, config.bandit.initial_state),
       "empty or the results file of an earlier run (a JSON object, whose bandit_states "
       "are where this run's bandits start)"),
      ("bandit.epsilon", 0 <= config.bandit.epsilon <= 1, "in [0, 1]"),
      ("simulation.strategies", split_list(sim.strategies) and set(split_list(sim.strategies))
       <= set(STRATEGIES), f"a comma-separated subset of {sorted(STRATEGIES)}"),
      ("simulation.means", means_ok and len(floats(sim.means)) >= 2
       and all(0 <= m <= 1 for m in floats(sim.means)), "two or more means in [0, 1]"),
      ("simulation.means_after", means_ok and len(floats(sim.means_after)) in (
          0, len(floats(sim.means))), "empty, or as many means as simulation.means"),
      ("simulation.switch_at", 0 <= sim.switch_at < sim.horizon, "in [0, horizon)"),
      ("simulation.horizon", sim.horizon >= 1, ">= 1"),
      ("simulation.seeds", sim.seeds >= 1, ">= 1"),
      ("sweep", _parses(_sweep_or_raise, config), "empty or <field>=<v1>,<v2>,... naming an "
       "existing field, with values of its type (true or false for a flag)"),
      ("kernel.batches", _parses(_ints, config.kernel.batches), "comma-separated integers"),
      ("kernel.gammas", _parses(_ints, config.kernel.gammas), "comma-separated integers"),
      ("kernel.vocabs", _parses(_ints, config.kernel.vocabs), "comma-separated integers"),
      ("draft_checkpoint_dir", not config.draft_checkpoint_dir
       or bool(_arm_args(config, "draft_model")),
       "empty unless a draft_model:<shape> arm runs, whose checkpoint it is: it would be "
       "silently unread"),
      ("eagle_checkpoint", _parses(_eagle_checkpoints_read, config),
       "empty, a .safetensors file for the eagle arms the run builds, or "
       "<name>=<file>.safetensors pairs, comma-separated, each naming an eagle:<name> arm the "
       "run builds"),
      *[(f"train.{name}", config.train[name] >= 1, ">= 1") for name in (
          "prompts_per_set", "max_prompt_tokens", "answer_tokens", "generate_batch",
          "max_tokens", "rollout_steps", "steps", "batch_size", "log_every",
          "checkpoint_every")],
      ("train.later_chat_turns", config.train.later_chat_turns >= 0, ">= 0"),
      ("train.sampled_answers", config.train.sampled_answers >= 0, ">= 0"),
      ("train.answer_temperature", config.train.answer_temperature >= 0, ">= 0 (0 is greedy)"),
      ("train.validation_fraction", 0 < config.train.validation_fraction < 1, "in (0, 1)"),
      ("train.learning_rate", config.train.learning_rate > 0, "> 0"),
      ("train.grad_clip", config.train.grad_clip > 0, "> 0 (the gradients' largest norm)"),
      *[(f"train.{name}", config.train[name] >= 0, ">= 0") for name in (
          "weight_decay", "warmup_steps", "max_seconds")],
  ]
  for field, ok, expected in checks:
    if not ok:
      value = config
      for part in field.split("."):
        value = value[part]
      raise ValueError(f"config.{field} = {value!r} is invalid: expected {expected}")
  # Checks that read other files, once every field above is known to be well formed.
  misfit = _arms_fit(config)
  if misfit:
    target = model_config(config.target)
    raise ValueError(f"arm {misfit!r} cannot draft for config.target = {config.target!r} "
                     f"({target.num_layers} layers, vocabulary {target.vocab_size}): "
                     f"layer_skip:<k> needs k < {target.num_layers}, draft_model:<shape> a known "
                     f"shape with the target's vocabulary")
  try:
    sharding.sharded_config(model_config(config.target), sharding.parse_mesh(config.mesh))
  except ValueError as error:
    raise ValueError(f"config.mesh = {config.mesh!r} is invalid: {error}") from None
  num_layers = model_config(config.target).num_layers
  if not (_parses(feature_layers, config)
          and valid_feature_layers(feature_layers(config), num_layers)):
    raise ValueError(f"config.train.feature_layers = {config.train.feature_layers!r} is invalid: "
                     f"expected distinct comma-separated layers of {config.target} in "
                     f"[0, {num_layers}] ({num_layers}: its final-normed state), or empty")
  vocab_size = model_config(config.target).vocab_size
  if not 0 <= config.train.draft_vocabulary <= vocab_size:
    raise ValueError(f"config.train.draft_vocabulary = {config.train.draft_vocabulary} is "
                     f"invalid: expected 0 (the whole vocabulary) to {vocab_size} tokens")
  max_positions = model_config(config.target).max_position_embeddings
  if config.sampling.max_new_tokens >= max_positions:
    raise ValueError(f"config.sampling.max_new_tokens = {config.sampling.max_new_tokens} is "
                     f"invalid: {config.target} has {max_positions} positions, prompt included")
  if config.prompts.file:
    if config.synthetic_weights:
      raise ValueError("config.prompts.file needs a tokenizer, and synthetic weights have no "
                       "tokenizer: drop one of prompts.file and synthetic_weights")
    read_prompt_file(config.prompts.file)

  def validate_point(point: ml_collections.ConfigDict) -> None:
    if not config.sweep.startswith("eagle_checkpoint="):
      point.eagle_checkpoint = ""  # checked above, for the arms of every point
    validate(point)

  for_each_sweep_point(config, validate_point)
