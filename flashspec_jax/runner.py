"""What `run.py` hands off to: load, build prompts, run each method, time, report, save.

Every method of a run sees the same prompts in the same batches, so their
speeds are measured side by side. Each batch is compiled ahead of time and
timed separately from its compilation.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from flashspec_jax import config as config_lib
from flashspec_jax import environment, results
from flashspec_jax.drafters import ModelDrafter
from flashspec_jax.engine import check_speculative_inputs, speculative_generate
from flashspec_jax.generate import check_budget, generate, prepare_prompts, raise_on_nan
from flashspec_jax.kernels.verify import get_verify_fn
from flashspec_jax.loading import LoadedModel, load_model
from flashspec_jax.loading.tokenizer import encode_chat
from flashspec_jax.models.llama import Llama
from flashspec_jax.prompts import load_prompts
from flashspec_jax.sampling import make_sampler

# Prompt widths are padded up to a multiple of this, so prompts of similar
# length share one compiled program.
PROMPT_BUCKET = 64


@dataclasses.dataclass
class Request:
  id: str
  kind: str
  token_ids: list[int]


@dataclasses.dataclass(frozen=True)
class Method:
  """A way to generate: plain AR (drafter None) or speculation with one drafter."""

  name: str
  drafter: ModelDrafter | None = None


def param_dtype(config: ml_collections.ConfigDict):
  if config.dtype == "auto":
    return jnp.bfloat16 if environment.on_gpu() else jnp.float32
  return jnp.dtype(config.dtype)


def build_requests(config: ml_collections.ConfigDict, model: LoadedModel) -> list[Request]:
  if model.synthetic:
    rng = np.random.default_rng(config.seed)
    count = config.batch_size * config.prompts.num_per_set
    return [Request(f"synthetic/{i}", "synthetic",
                    rng.integers(0, model.config.vocab_size, config.prompts.synthetic_length)
                    .tolist()) for i in range(count)]
  requests = []
  for kind in config_lib.prompt_sets(config):
    prompts = load_prompts(kind, config.prompts.num_per_set, config.prompts.split, config.seed)
    for prompt, ids in zip(prompts, encode_chat(model.tokenizer, [p.text for p in prompts])):
      requests.append(Request(prompt.id, kind, ids))
  return requests


def build_methods(config: ml_collections.ConfigDict, target: LoadedModel, dtype
                  ) -> tuple[list[Method], dict[str, Any]]:
  """The configured methods and the params dict the engine expects."""
  params = {"target": target.params, "drafters": {}}
  methods = []
  for name in config_lib.method_names(config):
    kind, _, arg = name.partition(":")
    if kind == "ar":
      methods.append(Method(name))
    elif kind == "layer_skip":
      layers = int(arg)
      if not 1 <= layers < target.config.num_layers:
        raise ValueError(f"config.methods: {name} needs 1 <= k < {target.config.num_layers}")
      methods.append(Method(name, ModelDrafter(Llama(target.config, num_layers=layers,
                                                     param_dtype=dtype))))
    elif kind == "draft_model":
      drafter = load_model(arg, config.draft_checkpoint_dir, config.synthetic_weights, dtype,
                           config.seed + 1)
      params["drafters"][arg] = drafter.params
      methods.append(Method(name, ModelDrafter(Llama(drafter.config, param_dtype=dtype), arg)))
  return methods, params


def _bucketed(tokens: np.ndarray) -> np.ndarray:
  width = -(-tokens.shape[1] // PROMPT_BUCKET) * PROMPT_BUCKET
  return np.pad(tokens, ((0, 0), (0, width - tokens.shape[1])))


def run_batch(method: Method, params, target: Llama, tokens, lengths, key, sampler, *,
              gamma: int, max_new_tokens: int, eos_ids: tuple[int, ...], capacity: int,
              verify_fn):
  """Compiles then times one batch; returns (output, seconds, compile seconds)."""
  args = jax.device_put((tokens, lengths, key, sampler))
  start = time.perf_counter()
  if method.drafter is None:
    compiled = generate.lower(params["target"], *args[:3], sampler=args[3], model=target,
                              max_new_tokens=max_new_tokens, eos_ids=eos_ids,
                              capacity=capacity).compile()
    call = lambda: compiled(params["target"], *args[:3], sampler=args[3])
  else:
    compiled = speculative_generate.lower(
        params, *args[:3], target_sampler=args[3], draft_sampler=args[3], target=target,
        drafter=method.drafter, gamma=gamma, max_new_tokens=max_new_tokens, eos_ids=eos_ids,
        capacity=capacity, verify_fn=verify_fn).compile()
    call = lambda: compiled(params, *args[:3], target_sampler=args[3], draft_sampler=args[3])
  compile_seconds = time.perf_counter() - start
  start = time.perf_counter()
  out = jax.block_until_ready(call())
  return out, time.perf_counter() - start, compile_seconds


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


def print_table(summaries: dict[str, dict], synthetic: bool) -> None:
  baseline = summaries.get("ar", {}).get("tokens_per_second")
  print(f"\n{'method':<18} {'tok/s':>9} {'alpha':>6} {'tau':>5} {'step p50 ms':>12} "
        f"{'step p99 ms':>12} {'vs AR':>6}")
  for name, s in summaries.items():
    speedup = f"{s['tokens_per_second'] / baseline:.2f}x" if baseline else "-"
    alpha = f"{s['alpha']:.3f}" if "alpha" in s else "-"
    tau = f"{s['tau']:.2f}" if "tau" in s else "-"
    print(f"{name:<18} {s['tokens_per_second']:>9.1f} {alpha:>6} {tau:>5} "
          f"{s['step_ms_p50']:>12.2f} {s['step_ms_p99']:>12.2f} {speedup:>6}")
  if synthetic:
    print("(synthetic weights: speeds only; acceptance of random drafters means nothing)")


def run(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Runs one experiment config end to end, writes its results and returns them."""
  config_lib.validate(config)
  results.check_writable(config.results_dir)
  env = environment.describe()
  sampler = make_sampler(config.sampling.temperature, config.sampling.top_k, config.sampling.top_p)
  dtype = param_dtype(config)
  model = load_model(config.target, config.checkpoint_dir, config.synthetic_weights, dtype,
                     config.seed)
  label = "SYNTHETIC WEIGHTS (speed only, text is meaningless)" if model.synthetic else model.source
  print(f"target: {config.target} [{label}] on {env['device']}, "
        f"{jnp.dtype(dtype).name}")
  methods, params = build_methods(config, model, dtype)
  verify_fn = get_verify_fn(config.verify_impl)
  target = Llama(model.config, param_dtype=dtype)
  gamma, max_new = config.sampling.gamma, config.sampling.max_new_tokens
  for method in methods:
    if method.drafter is not None:
      check_speculative_inputs(target, method.drafter, gamma)
  requests = build_requests(config, model)
  eos_ids = () if model.synthetic else model.config.eos_token_ids
  batches = [requests[i:i + config.batch_size]
             for i in range(0, len(requests), config.batch_size)]

  records, summaries = [], {}
  for method in tqdm.tqdm(methods, desc="methods", unit="method", disable=len(methods) < 2):
    rng = jax.random.key(config.seed)  # the same randomness for every method
    method_records, batch_seconds, step_seconds = [], [], []
    for batch in tqdm.tqdm(batches, desc=method.name, unit="batch", leave=False):
      tokens, lengths = prepare_prompts([r.token_ids for r in batch], model.config.vocab_size)
      tokens = _bucketed(tokens)
      capacity = check_budget(model.config, tokens.shape[1], max_new,
                              reserve=gamma + 1 if method.drafter else 0)
      rng, key = jax.random.split(rng)
      out, seconds, compile_seconds = run_batch(
          method, params, target, tokens, lengths, key, sampler, gamma=gamma,
          max_new_tokens=max_new, eos_ids=eos_ids, capacity=capacity, verify_fn=verify_fn)
      raise_on_nan(out.nan_rows)
      batch_seconds.append(seconds)
      step_seconds.append(seconds / max(int(out.steps), 1))
      for row, request in enumerate(batch):
        ids = np.asarray(out.tokens[row, :out.num_tokens[row]]).tolist()
        record = dict(method=method.name, id=request.id, kind=request.kind,
                      prompt_tokens=len(request.token_ids), new_tokens=len(ids),
                      batch_seconds=seconds, compile_seconds=compile_seconds,
                      loop_steps=int(out.steps),
                      text=None if model.tokenizer is None else model.tokenizer.decode(ids))
        if method.drafter is not None:
          record |= {name: int(getattr(out.metrics, name)[row])
                     for name in ("steps", "proposed", "tested", "accepted", "emitted")}
        method_records.append(record)
    summaries[method.name] = summarize_method(method_records, batch_seconds, step_seconds)
    records += method_records

  if config.print_text:
    for record in records:
      if record["text"] is not None and record["method"] == methods[0].name:
        print(f"\n--- {record['id']} ({record['new_tokens']} tokens) ---\n{record['text']}")
  print_table(summaries, model.synthetic)
  payload = dict(config=config.to_dict(), synthetic_weights=model.synthetic,
                 weights=model.source, summaries=summaries)
  path = results.write(config.experiment, payload, records, directory=config.results_dir, env=env)
  print(f"results: {path}")
  return dict(summaries=summaries, records=records, path=str(path))
