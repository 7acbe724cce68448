"""Trains a feature drafter (eagle:<name>) by self-distillation from its target.

`run.py --config=experiments/train_eagle_smollm2.py` runs it end to end:

1. Data: the target answers tune-split prompts (never a held-out one) with
   this engine, in large batches; prompt + answer are the training sequences.
2. Each training step runs the frozen target over a batch for its features
   and next-token distributions p, then the drafter's rollout over
   `train.rollout_steps` draft steps (EAGLE-3's training-time test), and
   minimises the soft cross-entropy -sum p log q at every step, so that
   errors compound in training as they do when drafting. AdamW with warm-up
   and cosine decay (optax).
3. A validation split of the generated sequences, whole conversations that
   training never sees, gives per draft position the greedy acceptance of a
   chain (all earlier drafts of the chain accepted).

With `train.workdir` set it keeps the generated sequences there, and a
checkpoint every `train.checkpoint_every` steps and when `train.max_seconds`
stops it; a run started again with the same settings resumes from the
checkpoint on the same sequences, in the same data order, without answering
the prompts again (other settings start afresh). A finished run removes its
checkpoint. Writes the
drafter (bf16 safetensors) to `train.output`, and a results file with the loss
curve and per-position acceptance (JSON and PNG).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.serialization
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm

from flashspec_jax import config as config_lib
from flashspec_jax import plots, results
from flashspec_jax.drafters import FeatureDrafter
from flashspec_jax.loading import LoadedModel, load_model
from flashspec_jax.loading.eagle import save_drafter
from flashspec_jax.models.eagle import init_params, restrict_vocabulary
from flashspec_jax.models.llama import KVCache, Llama
from flashspec_jax.pipeline import (Method, Request, compile_and_run, make_setup, param_dtype,
                                    requests_of)
from flashspec_jax.prompts import (conversation_of, held_out_conversations, is_later_turn,
                                   load_later_chat_turns, load_prompts, split_of, split_size)

DRAFTER_KEY = "training"


@dataclasses.dataclass(frozen=True)
class TrainingData:
  """Training sequences, right-padded.

  Attributes:
    tokens: [N, T] int32, prompt then the target's answer.
    lengths: [N] int32.
    prompt_lens: [N] int32.
    ids: the prompt id of each row.
    kinds: the prompt set of each row (chat, code, edit).
  """

  tokens: np.ndarray
  lengths: np.ndarray
  prompt_lens: np.ndarray
  ids: tuple[str, ...]
  kinds: tuple[str, ...]

  @classmethod
  def from_answers(cls, rows: Sequence[tuple[Request, Sequence[int]]]) -> TrainingData:
    """Each request's prompt followed by its answer, right-padded to the longest."""
    width = max(len(request.token_ids) + len(answer) for request, answer in rows)
    tokens = np.zeros((len(rows), width), np.int32)
    for i, (request, answer) in enumerate(rows):
      tokens[i, :len(request.token_ids) + len(answer)] = [*request.token_ids, *answer]
    return cls(tokens, np.array([len(r.token_ids) + len(a) for r, a in rows], np.int32),
               np.array([len(r.token_ids) for r, _ in rows], np.int32),
               tuple(r.id for r, _ in rows), tuple(r.kind for r, _ in rows))

  def take(self, rows) -> TrainingData:
    return TrainingData(self.tokens[rows], self.lengths[rows], self.prompt_lens[rows],
                        tuple(self.ids[i] for i in rows), tuple(self.kinds[i] for i in rows))

  def batch(self) -> dict[str, np.ndarray]:
    return dict(tokens=self.tokens, lengths=self.lengths, prompt_lens=self.prompt_lens)

  def save(self, path: pathlib.Path, made_from: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with results.open_atomic(path, "wb") as file:
      np.savez(file, **self.batch(), ids=np.array(self.ids), kinds=np.array(self.kinds),
               made_from=np.array(made_from))

  @classmethod
  def load(cls, path: pathlib.Path) -> tuple[TrainingData, str]:
    """The sequences in `path` and the settings they were generated from."""
    with np.load(path) as saved:
      return cls(saved["tokens"], saved["lengths"], saved["prompt_lens"],
                 tuple(saved["ids"].tolist()), tuple(saved["kinds"].tolist())), str(
                     saved["made_from"])


def kept_sequences(path: pathlib.Path | None, made_from: str,
                   generate: Callable[[], TrainingData]) -> tuple[TrainingData, bool]:
  """(the sequences kept at `path` if they were generated from `made_from`, True), else
  (`generate()`'s, kept there for a resumed run, False)."""
  if path and path.exists():
    data, stored = TrainingData.load(path)
    if stored == made_from:
      print(f"training on the {len(data.ids)} sequences kept in {path}")
      return data, True
    print(f"{path} holds sequences generated from other settings; answering again")
  data = generate()
  if path:
    data.save(path, made_from)
  return data, False


def training_requests(config: ml_collections.ConfigDict, tokenizer) -> list[Request]:
  """Tune-split prompts of config.prompts.sets, at most train.prompts_per_set each (plus
  up to train.later_chat_turns later turns of the chats), no longer than
  train.max_prompt_tokens, each text once, none a held-out prompt's and none from a
  held-out conversation (`prompts.held_out_conversations`); sorted by length so
  batches pad little."""
  t = config.train
  # ShareGPT repeats some prompts word for word under other ids, held out or not.
  seen = {p.text for kind in config_lib.prompt_sets(config)
          for p in load_prompts(kind, split_size(kind, "heldout"), "heldout")}
  held_out = held_out_conversations()
  requests = []
  for kind in config_lib.prompt_sets(config):
    prompts = load_prompts(kind, min(t.prompts_per_set, split_size(kind, "tune")), "tune",
                           config.prompts.seed)
    if kind == "chat" and t.later_chat_turns:
      prompts += load_later_chat_turns(t.later_chat_turns, config.prompts.seed)
    unseen = []
    for prompt in prompts:
      if prompt.text not in seen and conversation_of(prompt.id) not in held_out:
        seen.add(prompt.text)
        unseen.append(prompt)
    requests += [r for r in requests_of(unseen, tokenizer)
                 if len(r.token_ids) <= t.max_prompt_tokens]
  leaked = [r.id for r in requests
            if split_of(r.id) != "tune" or conversation_of(r.id) in held_out]
  if leaked:  # load_prompts draws from the tune split; this guards the guarantee
    raise ValueError(f"held-out prompts reached training: {leaked[:5]}")
  return sorted(requests, key=lambda r: len(r.token_ids))


def generate_sequences(config: ml_collections.ConfigDict, model: LoadedModel) -> TrainingData:
  """The target's answers to the training prompts, from this engine's AR decoder: one
  at train.answer_temperature, then train.sampled_answers more at temperature 1, which
  show the drafter more of the target's ways to go on from the same prompts (all with
  config.sampling's top_k and top_p, off by default)."""
  t = config.train
  dtype = param_dtype(config)
  gen_config = config.copy_and_resolve_references()
  gen_config.sampling.max_new_tokens = t.answer_tokens
  requests = training_requests(config, model.tokenizer)
  rows, rng = [], jax.random.key(config.seed)
  for temperature in [t.answer_temperature] + [1.0] * t.sampled_answers:
    gen_config.sampling.temperature = temperature
    setup = make_setup(gen_config, model, {"target": model.params}, dtype)
    for start in tqdm.trange(0, len(requests), t.generate_batch, unit="batch",
                             desc=f"target answers at temperature {temperature:g}"):
      batch = requests[start:start + t.generate_batch]
      rng, key = jax.random.split(rng)
      answers = compile_and_run(Method("ar"), setup, batch, key).output.token_lists()
      rows += list(zip(batch, answers))
  return TrainingData.from_answers(rows)


def split_validation(data: TrainingData, fraction: float, seed: int) -> tuple[TrainingData,
                                                                         TrainingData]:
  """(train, validation). Validation takes whole conversations (`conversation_of`), by a
  seeded permutation, until it holds `fraction` of the rows: drawn row by row, a chat's
  other turns trained the drafter, and the last-layer drafter's chat validation gave
  tau 3.14 where the held-out chats gave 2.16 (bench/teacher_forced.py, MODEL_CARD.md)."""
  rows_of = collections.defaultdict(list)
  for row, prompt_id in enumerate(data.ids):
    rows_of[conversation_of(prompt_id)].append(row)
  conversations = sorted(rows_of)
  wanted, validation = max(1, int(round(len(data.ids) * fraction))), []
  for i in np.random.default_rng(seed).permutation(len(conversations)):
    if len(validation) >= wanted:
      break
    validation += rows_of[conversations[i]]
  validation = np.sort(validation)
  return data.take(np.setdiff1d(np.arange(len(data.ids)), validation)), data.take(validation)


def prompt_sources(data: TrainingData) -> dict[str, int]:
  """Sequences per prompt set, a chat's later turns ("<record>#<turn>", each alone as a
  prompt) apart from its records' first turns (the only kind of chat prompt the
  experiments hold out)."""
  return dict(sorted(collections.Counter(
      f"{kind} later turns" if is_later_turn(prompt_id) else kind
      for prompt_id, kind in zip(data.ids, data.kinds)).items()))


def target_outputs(target: Llama, params, tokens, lengths, feature_layers: tuple[int, ...]
                   ) -> tuple[jax.Array, jax.Array]:
  """The target's features [B, T, D or F] (Llama's, for feature_layers) and log p [B, T, V]
  over whole sequences."""
  cache = KVCache.init(target.config, tokens.shape[0], tokens.shape[1], target.param_dtype)
  logits, _, features = target.apply(params["target"], tokens, cache, num_valid=lengths,
                                     return_features=True, feature_layers=feature_layers)
  return jax.lax.stop_gradient(features), jax.nn.log_softmax(jax.lax.stop_gradient(logits))


def prediction_mask(lengths, prompt_lens, width: int, step: int) -> jax.Array:
  """[B, T] where draft step `step` at position j is a draft the engine would make: its
  chain starts from the pair of a committed answer token (j - step >= P - 1; the
  first answer token is the target's own, sampled at the prefill) and it predicts a
  token of the sequence (j + 2 < length)."""
  j = jnp.arange(width)[None, :]
  return (j - step >= prompt_lens[:, None] - 1) & (j + 2 < lengths[:, None])


def greedy_chains(draft_tops: jax.Array, target_top: jax.Array, tokens: jax.Array
                  ) -> jax.Array:
  """[steps, B, T] whether draft step k at j ends a chain of greedy matches that started
  at j - k, given each step's draft argmax [steps, B, T], the target's argmax for the
  token it predicts, t_{j+2} ([B, T]), and the sequences [B, T]. A later step reads the
  sequence's token where a greedy engine reads the target's argmax (tokens[j + 1] is
  what target_top[j - 1] predicts); in a sampled answer they can differ, and a chain
  through such a token is one a greedy run never reaches."""
  on_greedy_path = jnp.pad(tokens[:, 2:] == target_top[:, :-2], ((0, 0), (1, 1)))
  chains, chain = [], None
  for draft_top in draft_tops:
    matches = draft_top == target_top
    chain = matches if chain is None else (
        jnp.pad(chain[:, :-1], ((0, 0), (1, 0))) & on_greedy_path & matches)
    chains.append(chain)
  return jnp.stack(chains)


def rollout_loss(drafter: FeatureDrafter, params, batch: dict[str, jax.Array], steps: int,
                 keep_chains: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean soft cross-entropy of the target's p against the drafter's q over all draft
  steps, and per step the loss and the greedy chain acceptance; with keep_chains, also
  `step_chains` [steps, B, T]: whether step k at j ends a chain of greedy matches
  (`greedy_chains`) at a draft the engine would make."""
  tokens, lengths, prompt_lens = batch["tokens"], batch["lengths"], batch["prompt_lens"]
  features, target_logp = target_outputs(drafter.target, params, tokens, lengths,
                                         drafter.feature_layers)
  # Step k at j predicts t_{j+2}, which the target's distribution at j + 1 gives.
  target_logp = jnp.pad(target_logp[:, 1:], ((0, 0), (0, 1), (0, 0)))
  normed = drafter.rollout(params, features, tokens, steps)
  losses, draft_tops = [], []
  masks = jnp.stack([prediction_mask(lengths, prompt_lens, tokens.shape[1], step)
                     for step in range(steps)])
  for step in range(steps):
    logq = jax.nn.log_softmax(drafter.head(params, normed[step]))
    # A restricted drafter's q is 0 off its vocabulary: the loss is over its tokens, and
    # its minimum is p renormalised on them.
    cross_entropy = -jnp.sum(jnp.where(jnp.isneginf(logq), 0.0, jnp.exp(target_logp) * logq),
                             axis=-1)
    losses.append(jnp.sum(cross_entropy * masks[step]) / jnp.maximum(masks[step].sum(), 1))
    draft_tops.append(jnp.argmax(logq, axis=-1))
  chains = greedy_chains(jnp.stack(draft_tops), jnp.argmax(target_logp, axis=-1), tokens) & masks
  counts = masks.sum(axis=(1, 2))
  losses = jnp.stack(losses)
  stats = dict(step_loss=losses, step_acceptance=chains.sum(axis=(1, 2)) / jnp.maximum(counts, 1),
               step_predictions=counts)
  return losses.mean(), stats | (dict(step_chains=chains) if keep_chains else {})


# One program per drafter and shape, whichever call of `evaluate` asks for it.
_rollout_loss = jax.jit(rollout_loss, static_argnums=(0, 3, 4))


def frequent_tokens(data: TrainingData, count: int) -> np.ndarray:
  """The `count` tokens most frequent in the answers (EAGLE-3's draft vocabulary),
  sorted by id; ties go to the lower id."""
  answer = np.arange(data.tokens.shape[1]) >= data.prompt_lens[:, None]
  answer &= np.arange(data.tokens.shape[1]) < data.lengths[:, None]
  counts = np.bincount(data.tokens[answer], minlength=count)
  return np.sort(np.argsort(-counts, kind="stable")[:count]).astype(np.int32)


def optimizer(t: ml_collections.ConfigDict) -> optax.GradientTransformation:
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, t.learning_rate, t.warmup_steps, max(t.steps, t.warmup_steps + 1),
      end_value=t.learning_rate * 0.1)
  return optax.chain(optax.clip_by_global_norm(t.grad_clip),
                     optax.adamw(schedule, weight_decay=t.weight_decay))


@dataclasses.dataclass
class Checkpoint:
  """What resuming needs: the step reached, the drafter's params, the optimizer state,
  the loss curve and training seconds so far, and the settings it was trained with."""

  step: int
  params: Any
  opt_state: Any
  curve: list
  seconds: float
  trained_from: str

  def save(self, path: pathlib.Path) -> None:
    """Two files, each written whole: the JSON names the step, so a kill between the
    two leaves a pair whose steps differ, which `restore` does not take."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with results.open_atomic(path.with_suffix(".json")) as file:
      file.write(json.dumps(dict(step=self.step, curve=self.curve, seconds=self.seconds,
                                 trained_from=self.trained_from)))
    blob = flax.serialization.to_bytes(dict(step=self.step, params=self.params,
                                            opt_state=self.opt_state))
    with results.open_atomic(path, "wb") as file:
      file.write(blob)

  @classmethod
  def restore(cls, path: pathlib.Path, template: Checkpoint) -> Checkpoint | None:
    """The checkpoint at `path` if it was trained with the template's settings."""
    meta = path.with_suffix(".json")
    if not (path.exists() and meta.exists()):
      if path.exists() or meta.exists():
        print(f"{path} is half a checkpoint (a save was cut short); starting afresh")
      return None
    saved = json.loads(meta.read_text())
    if saved["trained_from"] != template.trained_from:
      print(f"{path} was trained with other settings; starting afresh")
      return None
    state = flax.serialization.from_bytes(
        dict(step=0, params=template.params, opt_state=template.opt_state), path.read_bytes())
    if int(state["step"]) != saved.get("step"):
      print(f"{path} and {meta.name} hold different steps (a save was cut short); "
            "starting afresh")
      return None
    return cls(int(state["step"]), state["params"], state["opt_state"], saved["curve"],
               saved["seconds"], saved["trained_from"])

  @staticmethod
  def remove(path: pathlib.Path) -> None:
    path.unlink(missing_ok=True)
    path.with_suffix(".json").unlink(missing_ok=True)


def batches(data: TrainingData, batch_size: int, seed: int, start_step: int):
  """Training batches from step `start_step` on: epochs of seeded permutations, so a
  resumed run sees what an uninterrupted one would."""
  per_epoch = max(len(data.ids) // batch_size, 1)
  step = start_step
  while True:
    epoch, index = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(len(data.ids))
    yield data.take(np.sort(order[index * batch_size:(index + 1) * batch_size])).batch()
    step += 1


def evaluate(drafter: FeatureDrafter, params, data: TrainingData, batch_size: int,
             steps: int, keep_chains: bool = False) -> dict[str, Any]:
  """Loss and greedy chain acceptance per draft position on `data`: means over every
  prediction, whatever batch it fell in; with keep_chains, also every row's
  `step_chains` [steps, N, T] (rollout_loss)."""
  per_batch = [jax.tree.map(np.asarray, _rollout_loss(
      drafter, params, data.take(np.arange(start, min(start + batch_size, len(data.ids))))
      .batch(), steps, keep_chains)[1]) for start in range(0, len(data.ids), batch_size)]
  count = np.maximum(sum(b["step_predictions"] for b in per_batch), 1)
  means = {name: (sum(b["step_predictions"] * b[name] for b in per_batch) / count).tolist()
           for name in ("step_loss", "step_acceptance")}
  if keep_chains:
    means["step_chains"] = np.concatenate([b["step_chains"] for b in per_batch], axis=1)
  return means


def expected_tokens_per_step(acceptance: list[float]) -> float:
  """tau implied by per-position chain acceptance: 1 + the expected drafts accepted."""
  return 1.0 + float(sum(acceptance))


def train(config: ml_collections.ConfigDict, env: dict) -> dict[str, Any]:
  """Generates the data, trains, evaluates and writes the drafter and its results."""
  t = config.train
  dtype = param_dtype(config)
  model = load_model(config.target, config.checkpoint_dir, config.synthetic_weights, dtype,
                     config.seed)
  workdir = pathlib.Path(t.workdir) if t.workdir else None
  # What fixes the answers (the batches do too: each draws its own key).
  made_from = json.dumps(dict(
      target=config.target, weights=model.source, dtype=str(dtype), seed=config.seed,
      prompt_sets=config.prompts.sets, prompt_seed=config.prompts.seed,
      held_out_filter="conversations", top_k=config.sampling.top_k,
      top_p=config.sampling.top_p,
      **{name: t[name] for name in ("prompts_per_set", "later_chat_turns", "max_prompt_tokens",
                                    "answer_tokens", "answer_temperature", "sampled_answers",
                                    "generate_batch")}),
      sort_keys=True)
  started = time.perf_counter()
  data, sequences_kept = kept_sequences(workdir / "sequences.npz" if workdir else None,
                                        made_from, lambda: generate_sequences(config, model))
  generate_seconds = time.perf_counter() - started
  width = min(data.tokens.shape[1], t.max_tokens)
  data = dataclasses.replace(data, tokens=data.tokens[:, :width],
                             lengths=np.minimum(data.lengths, width))
  train_data, validation = split_validation(data, t.validation_fraction, config.seed)
  if not len(train_data.ids):
    raise ValueError(f"the {len(data.ids)} answered sequences, split by whole conversations, "
                     "leave none to train on: lower config.train.validation_fraction or "
                     "answer more prompts")
  print(f"{len(train_data.ids)} training and {len(validation.ids)} validation sequences of "
        f"at most {width} tokens, " + ("kept from an earlier run" if sequences_kept
                                       else f"answered in {generate_seconds:.0f} s"))

  target = Llama(model.config, param_dtype=dtype)
  layers = config_lib.feature_layers(config)
  drafter = FeatureDrafter(target, DRAFTER_KEY, feature_layers=layers)
  tx = optimizer(t)
  drafter_params = init_params(model.config, jax.random.key(config.seed), jnp.float32,
                               len(layers))
  # The head rows of a restricted drafter are the frozen target's: they go beside the
  # trained params into every step, and are never trained.
  vocabulary = (restrict_vocabulary(drafter_params, model.params,
                                    frequent_tokens(train_data, t.draft_vocabulary))["vocabulary"]
                if t.draft_vocabulary else {})
  # `validation` names the split's rule: a checkpoint trained on another split's rows
  # (they were drawn one by one before) does not resume.
  trained_from = json.dumps(dict(data=made_from, validation="conversations", **{
      name: t[name] for name in (
          "max_tokens", "validation_fraction", "rollout_steps", "steps", "batch_size",
          "learning_rate", "warmup_steps", "weight_decay", "grad_clip", "draft_vocabulary",
          "feature_layers")}),
      sort_keys=True)
  state = Checkpoint(0, drafter_params, tx.init(drafter_params), [], 0.0, trained_from)
  checkpoint_path = workdir / "checkpoint.msgpack" if workdir else None
  if checkpoint_path:
    state = Checkpoint.restore(checkpoint_path, state) or state
  if state.step:
    print(f"resuming from {checkpoint_path} at step {state.step}")

  def with_vocabulary(drafter_params, vocabulary):
    return drafter_params | ({"vocabulary": vocabulary} if vocabulary else {})

  def loss_fn(drafter_params, vocabulary, target_params, batch):
    params = {"target": target_params,
              "drafters": {DRAFTER_KEY: with_vocabulary(drafter_params, vocabulary)}}
    return rollout_loss(drafter, params, batch, t.rollout_steps)

  # The target's params are an argument, not a closed-over constant XLA would fold.
  @jax.jit
  def train_step(drafter_params, opt_state, vocabulary, target_params, batch):
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        drafter_params, vocabulary, target_params, batch)
    updates, opt_state = tx.update(grads, opt_state, drafter_params)
    return optax.apply_updates(drafter_params, updates), opt_state, loss, stats

  drafter_params, opt_state, curve = state.params, state.opt_state, state.curve
  progress = tqdm.trange(state.step, t.steps, desc="training", unit="step", initial=state.step,
                         total=t.steps)
  train_started = time.perf_counter()
  seconds_so_far = lambda: state.seconds + time.perf_counter() - train_started
  stopped_early, steps_done = False, state.step
  for step, batch in zip(progress, batches(train_data, t.batch_size, config.seed, state.step)):
    if t.max_seconds and time.perf_counter() - train_started > t.max_seconds:
      print(f"stopping at step {step} of {t.steps}: train.max_seconds ({t.max_seconds}) reached")
      stopped_early = True
      if checkpoint_path:  # a later run with more time goes on from here
        Checkpoint(step, drafter_params, opt_state, curve, seconds_so_far(),
                   trained_from).save(checkpoint_path)
      break
    drafter_params, opt_state, loss, stats = train_step(drafter_params, opt_state, vocabulary,
                                                        model.params, batch)
    steps_done = step + 1
    if (step + 1) % t.log_every == 0 or step + 1 == t.steps:
      point = dict(step=step + 1, loss=float(loss),
                   step_acceptance=np.asarray(stats["step_acceptance"]).tolist())
      curve.append(point)
      progress.set_postfix(loss=f"{point['loss']:.3f}")
    if checkpoint_path and (step + 1) % t.checkpoint_every == 0 and step + 1 < t.steps:
      Checkpoint(step + 1, drafter_params, opt_state, curve, seconds_so_far(),
                 trained_from).save(checkpoint_path)
  train_seconds = seconds_so_far()
  if not steps_done:
    raise ValueError(f"config.train.max_seconds ({t.max_seconds}) ran out before the first "
                     "training step: no drafter to write")
  if checkpoint_path and not stopped_early:  # finished: the drafter file is what is left
    Checkpoint.remove(checkpoint_path)

  drafter_params = with_vocabulary(drafter_params, vocabulary)
  params = {"target": model.params, "drafters": {DRAFTER_KEY: drafter_params}}
  by_kind = {}
  for kind in sorted(set(validation.kinds)):
    rows = [i for i, k in enumerate(validation.kinds) if k == kind]
    stats = evaluate(drafter, params, validation.take(rows), t.batch_size, t.rollout_steps)
    by_kind[kind] = stats | dict(
        sequences=len(rows), greedy_tau=expected_tokens_per_step(stats["step_acceptance"]))
  # The results file names the weights; it is written first so that their default
  # place, beside it, is known.
  output = pathlib.Path(t.output) if t.output else None
  payload = dict(config=config.to_dict(), weights=model.source,
                 drafter=t.output or "beside this file, as <its name>.safetensors",
                 sequences=dict(train=len(train_data.ids), validation=len(validation.ids),
                                max_tokens=width),
                 sources=dict(train=prompt_sources(train_data),
                              validation=prompt_sources(validation)),
                 validation_split="whole conversations",
                 sequences_kept=sequences_kept, steps=steps_done, stopped_early=stopped_early,
                 seconds=dict(generate=generate_seconds, train=train_seconds),
                 curve=curve, validation=by_kind)
  path = results.write(config.experiment, payload, directory=config.results_dir, env=env)
  output = save_drafter(output or path.with_suffix(".safetensors"), drafter_params,
                        config.target, metadata=dict(
                            steps=str(steps_done), seed=str(config.seed), results=path.name,
                            git_sha=env["git_sha"], device=env["device"], command=env["command"]),
                        feature_layers=layers)
  plots.training(curve, by_kind, path.with_suffix(".png"))
  print_summary(curve, by_kind)
  print(f"drafter: {output}\nresults: {path}")
  return dict(path=str(path), output=str(output), curve=curve, validation=by_kind)


def print_summary(curve: list[dict], by_kind: dict[str, dict]) -> None:
  if curve:
    print(f"\nloss {curve[0]['loss']:.3f} at step {curve[0]['step']} -> "
          f"{curve[-1]['loss']:.3f} at step {curve[-1]['step']}")
  print(f"{'validation':<12} {'rows':>5} {'loss':>7} {'tau (greedy)':>13}  acceptance per position")
  for kind, s in by_kind.items():
    accept = " ".join(f"{a:.2f}" for a in s["step_acceptance"])
    print(f"{kind:<12} {s['sequences']:>5} {np.mean(s['step_loss']):>7.3f} "
          f"{s['greedy_tau']:>13.2f}  {accept}")
