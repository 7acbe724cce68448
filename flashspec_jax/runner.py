"""What `run.py` hands off to: load, build prompts, generate, time and report."""

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
from flashspec_jax import environment
from flashspec_jax.generate import check_budget, generate, prepare_prompts, raise_on_nan
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


def _bucketed(tokens: np.ndarray) -> np.ndarray:
  width = -(-tokens.shape[1] // PROMPT_BUCKET) * PROMPT_BUCKET
  return np.pad(tokens, ((0, 0), (0, width - tokens.shape[1])))


def run(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Runs one experiment config end to end and returns its summary."""
  config_lib.validate(config)
  sampler = make_sampler(config.sampling.temperature, config.sampling.top_k, config.sampling.top_p)
  dtype = param_dtype(config)
  model = load_model(config.target, config.checkpoint_dir, config.synthetic_weights, dtype,
                     config.seed)
  label = "SYNTHETIC WEIGHTS (speed only, text is meaningless)" if model.synthetic else model.source
  print(f"target: {config.target} [{label}] on {environment.describe()['device']}, {dtype.__name__}")
  requests = build_requests(config, model)
  max_new = config.sampling.max_new_tokens
  llama = Llama(model.config, param_dtype=dtype)
  eos_ids = () if model.synthetic else model.config.eos_token_ids
  rng = jax.random.key(config.seed)

  records, batch_seconds = [], []
  batches = [requests[i:i + config.batch_size] for i in range(0, len(requests),
                                                               config.batch_size)]
  for batch in tqdm.tqdm(batches, desc="batches", unit="batch", disable=len(batches) < 2):
    tokens, lengths = prepare_prompts([r.token_ids for r in batch], model.config.vocab_size)
    tokens = _bucketed(tokens)
    capacity = check_budget(model.config, tokens.shape[1], max_new)
    rng, key = jax.random.split(rng)
    args = jax.device_put((model.params, tokens, lengths, key))
    start = time.perf_counter()
    compiled = generate.lower(*args, model=llama, sampler=sampler, max_new_tokens=max_new,
                              eos_ids=eos_ids, capacity=capacity).compile()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    seconds = time.perf_counter() - start
    batch_seconds.append(seconds)
    raise_on_nan(out.nan_rows)
    for row, request in enumerate(batch):
      ids = np.asarray(out.tokens[row, :out.num_tokens[row]]).tolist()
      records.append(dict(id=request.id, kind=request.kind, prompt_tokens=len(request.token_ids),
                          new_tokens=len(ids), seconds=seconds, compile_seconds=compile_s,
                          text=None if model.tokenizer is None else model.tokenizer.decode(ids)))

  for record in records:
    if record["text"] is not None:
      print(f"\n--- {record['id']} ({record['new_tokens']} tokens) ---\n{record['text']}")
  seconds = sum(batch_seconds)
  total_new = sum(r["new_tokens"] for r in records)
  summary = dict(prompts=len(records), new_tokens=total_new, seconds=seconds,
                 tokens_per_second=total_new / seconds, synthetic=model.synthetic)
  print(f"\n{'prompts':>8} {'new tokens':>11} {'seconds':>9} {'tok/s':>9}   weights")
  print(f"{summary['prompts']:>8} {total_new:>11} {seconds:>9.2f} "
        f"{summary['tokens_per_second']:>9.1f}   {'synthetic' if model.synthetic else 'real'}")
  return dict(summary=summary, records=records)
