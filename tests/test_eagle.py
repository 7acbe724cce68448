"""The feature drafter (eagle): target features, drafting and catching up, training
rollouts, its weights file, its training data, and the shipped eagle:smollm2."""

import dataclasses
import hashlib
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from conftest import spread_params, tiny_config
from flax import traverse_util
from helpers import loops_per_step

from flashspec_jax import config as config_lib
from flashspec_jax import distill, engine, prompts
from flashspec_jax.bench import teacher_forced
from flashspec_jax.bandit import UCB1, AcceptanceKLUCB
from flashspec_jax.drafters import FeatureDrafter, NgramDrafter
from flashspec_jax.generate import Decoder, run_generate
from flashspec_jax.loading import CheckpointError
from flashspec_jax.loading.eagle import feature_layers, load_drafter, save_drafter, shipped_path
from flashspec_jax.loading.tokenizer import encode_chat
from flashspec_jax.models import eagle
from flashspec_jax.models.config import model_config
from flashspec_jax.models.llama import KVCache, Llama, RMSNorm
from flashspec_jax.prompts import load_prompts, split_size
from flashspec_jax.sampling import Greedy, Samplers, Temperature

CONFIG = tiny_config(num_layers=4, name="tiny_eagle_target")
TARGET = Llama(CONFIG, param_dtype=jnp.float32)
# The longest prompt (12 tokens) lacks 12 pairs at the first proposal: wide chunks of 6
# and 5, then the last pair.
DRAFTER = FeatureDrafter(TARGET, "eagle", chunk=4, wide_chunk=6, unroll=False)
# EAGLE-3's fused features, without the final-normed state that scoring a prompt reads,
# and with it first.
FUSED = FeatureDrafter(TARGET, "fused", chunk=4, wide_chunk=6, unroll=False, feature_layers=(0, 2))
FUSED_FINAL_FIRST = FeatureDrafter(TARGET, "fused_final_first", chunk=4, wide_chunk=6,
                                   unroll=False, feature_layers=(CONFIG.num_layers, 1))
VOCABULARY = np.arange(0, CONFIG.vocab_size, 3)  # a restricted drafter's tokens
PROMPTS = [[5, 6, 7], list(range(8, 20)), [1], [3, 3, 3, 3], [9, 2], list(range(30, 39)),
           [4] * 6, [60, 61, 62, 63, 0]]  # batch 8, lengths 1 to 12


@pytest.fixture(scope="module")
def params():
  return {"target": spread_params(CONFIG, seed=0),
          "drafters": {"eagle": eagle.init_params(CONFIG, jax.random.key(3), jnp.float32),
                       "fused": eagle.init_params(CONFIG, jax.random.key(4), jnp.float32,
                                                  len(FUSED.feature_layers)),
                       "fused_final_first": eagle.init_params(
                           CONFIG, jax.random.key(5), jnp.float32,
                           len(FUSED_FINAL_FIRST.feature_layers))}}


def greedy_ar(params, max_new_tokens=16):
  return run_generate(params["target"], Decoder(TARGET, max_new_tokens), PROMPTS,
                      jax.random.key(0), Greedy())


def test_features_are_what_the_head_reads_and_change_no_logit(params):
  tokens = jnp.asarray([[5, 9, 3, 17, 2, 8]])
  cache = KVCache.init(CONFIG, 1, 8, jnp.float32)
  logits, _ = TARGET.apply(params["target"], tokens, cache)
  with_features, _, features = TARGET.apply(params["target"], tokens, cache, return_features=True)
  np.testing.assert_array_equal(with_features, logits)
  np.testing.assert_allclose(DRAFTER.head(params, features), logits, rtol=1e-5, atol=1e-5)
  scored, _, _ = TARGET.apply(params["target"], tokens, cache, logits_index=jnp.array([3]),
                              return_features=True)
  np.testing.assert_allclose(scored, logits[:, 3], rtol=1e-5, atol=1e-5)


def test_fused_features_are_the_layers_streams_side_by_side(params):
  """Layer i's entry is the residual stream after it: normed by the final norm, the one
  after layer 1 is what a 2-layer model's head reads; the layer count's entry is the
  final-normed state."""
  tokens = jnp.asarray([[5, 9, 3, 17, 2, 8]])
  cache = KVCache.init(CONFIG, 1, 8, jnp.float32)
  logits, _, final = TARGET.apply(params["target"], tokens, cache, return_features=True)
  fused_logits, _, fused = TARGET.apply(params["target"], tokens, cache, return_features=True,
                                        feature_layers=(1, CONFIG.num_layers))
  width = CONFIG.hidden_size
  assert fused.shape == (1, 6, 2 * width)
  np.testing.assert_array_equal(fused_logits, logits)
  np.testing.assert_array_equal(fused[..., width:], final)
  _, _, two_layers = Llama(CONFIG, num_layers=2, param_dtype=jnp.float32).apply(
      params["target"], tokens, KVCache.init(CONFIG, 1, 8, jnp.float32, num_layers=2),
      return_features=True)
  final_norm = RMSNorm(CONFIG.rms_norm_eps, jnp.float32).apply(
      {"params": params["target"]["params"]["final_norm"]}, fused[..., :width])
  np.testing.assert_allclose(final_norm, two_layers, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match=r"feature layers \(5,\) outside \[0, 4\]"):
    TARGET.apply(params["target"], tokens, cache, return_features=True, feature_layers=(5,))


@pytest.mark.parametrize("drafter", [DRAFTER, FUSED], ids=["final", "fused"])
@pytest.mark.parametrize("gamma", [1, 4])
def test_greedy_speculation_equals_greedy_ar_on_a_ragged_batch(params, gamma, drafter):
  decoder = engine.SpeculativeDecoder(TARGET, (engine.Arm(drafter, gamma),), 16)
  out = engine.run_speculative(params, decoder, PROMPTS, jax.random.key(0),
                               Samplers.same(Greedy()))
  np.testing.assert_array_equal(out.tokens, greedy_ar(params).tokens)


@pytest.mark.parametrize("gamma, loops", [(3, 0), (4, 1)])
def test_a_running_feature_drafter_steps_without_a_loop_of_its_own(params, gamma, loops):
  """Settled once before the step loop, the feature drafter's steps hold no loop of
  their own (on a GPU each is a wait for the host) when a step leaves at most `chunk`
  pairs missing (gamma + 1 <= 4); past that the loop stays in each step."""
  decoder = engine.SpeculativeDecoder(TARGET, (engine.Arm(DRAFTER, gamma),), 16)
  assert loops_per_step(decoder, params, PROMPTS, CONFIG.vocab_size,
                        Samplers.same(Greedy())) == loops


def test_an_idle_feature_drafter_catches_up_in_a_bandit(params):
  """The feature drafter reads the features of steps other arms took (UCB1 tries each
  arm in turn), and its drafts stay exact."""
  arms = (engine.Arm(DRAFTER, 3), engine.Arm(NgramDrafter(CONFIG.vocab_size, 2), 3), engine.Arm())
  decoder = engine.SpeculativeDecoder(TARGET, arms, 16, strategy=UCB1())
  out = engine.run_speculative(params, decoder, PROMPTS, jax.random.key(0),
                               Samplers.same(Greedy()))
  np.testing.assert_array_equal(out.tokens, greedy_ar(params).tokens)
  chosen = np.asarray(out.history.arm[:int(out.steps)]).tolist()
  assert chosen[:3] == [0, 1, 2] and chosen.count(0) >= 2


@pytest.mark.parametrize("fused", [FUSED, FUSED_FINAL_FIRST], ids=lambda d: d.params_key)
def test_a_fused_drafter_beside_a_chooser_that_scores_the_prompt(params, fused):
  """The prefill returns the fused features and, unless they hold it, the final-normed
  state that scoring the prompt reads: the chooser's prompt prior (here at temperature
  1, where every probability counts) is the one it gets beside a final-feature
  drafter, and greedy speculation is greedy AR."""
  ngram = engine.Arm(NgramDrafter(CONFIG.vocab_size, 2), 3)
  outs = []
  for drafter in (DRAFTER, fused):
    decoder = engine.SpeculativeDecoder(TARGET, (engine.Arm(drafter, 3), ngram, engine.Arm()), 16,
                                        strategy=AcceptanceKLUCB())
    outs.append(engine.run_speculative(params, decoder, PROMPTS, jax.random.key(0),
                                       Samplers.same(Greedy())))
    np.testing.assert_array_equal(outs[-1].tokens, greedy_ar(params).tokens)
    state = decoder.init(params, *decoder.ar_decoder.prepare(PROMPTS), jax.random.key(0),
                         Temperature(1.0))
    if drafter is DRAFTER:
      prior = state.bandit
  jax.tree.map(np.testing.assert_array_equal, state.bandit, prior)


@pytest.mark.parametrize("fused", [FUSED, FUSED_FINAL_FIRST], ids=lambda d: d.params_key)
def test_a_fused_drafter_observes_the_target_streams_of_its_layers(params, fused):
  """After the prefill (beside a chooser that scores the prompt, whose final-normed state
  the prefill may append) and after a step, the drafter holds the target's streams of
  its layers at every committed position but the last."""
  arms = (engine.Arm(fused, 3), engine.Arm(NgramDrafter(CONFIG.vocab_size, 2), 3), engine.Arm())
  decoder = engine.SpeculativeDecoder(TARGET, arms, 16, strategy=AcceptanceKLUCB())
  state = decoder.init(params, *decoder.ar_decoder.prepare(PROMPTS), jax.random.key(0), Greedy())
  stepped, _ = decoder.arm_step(params, state, 0, Samplers.same(Greedy()))
  for state in (state, stepped):
    tokens, lengths = state.seqs.tokens, np.asarray(state.seqs.seq_lens) - 1
    _, _, expected = TARGET.apply(
        params["target"], tokens, KVCache.init(CONFIG, *tokens.shape, jnp.float32),
        return_features=True, feature_layers=fused.feature_layers)
    for row, length in enumerate(lengths):
      np.testing.assert_allclose(state.drafter_states[0].features[row, :length],
                                 expected[row, :length], rtol=1e-5, atol=1e-5)


def test_a_drafter_refuses_params_fusing_other_layers(params):
  with pytest.raises(ValueError, match=r"eagle_fused reads target layers \(0, 2\), but its "
                                       r"params fuse none"):
    FUSED.net_params({"drafters": {"fused": params["drafters"]["eagle"]}})
  with pytest.raises(ValueError, match=r"eagle_eagle reads target layers \(\), but its "
                                       r"params fuse 2"):
    DRAFTER.net_params({"drafters": {"eagle": params["drafters"]["fused"]}})
  three = FeatureDrafter(TARGET, "fused", feature_layers=[0, 1, 2])
  assert three.feature_layers == (0, 1, 2)
  with pytest.raises(ValueError, match=r"eagle_fused reads target layers \(0, 1, 2\), but its "
                                       r"params fuse 2"):
    three.net_params(params)


def test_feature_drafters_of_different_layers_are_refused_together():
  with pytest.raises(ValueError, match=r"eagle_eagle:g3: \(\), eagle_fused:g3: \(0, 2\)"):
    engine.SpeculativeDecoder(TARGET, (engine.Arm(DRAFTER, 3), engine.Arm(FUSED, 3)), 16)


@pytest.mark.parametrize("drafter", [DRAFTER, FUSED], ids=["final", "fused"])
def test_training_rollout_is_what_drafting_computes(params, drafter):
  """Draft step k at position j of the rollout gives the logits that drafting gives
  with L = j + 2 - k committed tokens and the true tokens as its earlier drafts."""
  sequence = jnp.asarray([[5, 9, 3, 17, 2, 8, 11, 4, 6, 1, 30, 22]])
  width, steps = sequence.shape[1], 3
  _, _, features = TARGET.apply(params["target"], sequence,
                                KVCache.init(CONFIG, 1, width, jnp.float32), return_features=True,
                                feature_layers=drafter.feature_layers)
  rollout = drafter.head(params, drafter.rollout(params, features, sequence, steps))
  padded = jnp.pad(sequence, ((0, 0), (0, steps)))
  for length in (2, 6, 9):
    state = drafter.init(params, sequence[:, :length], jnp.array([length]), width + steps)
    state = drafter.observe(state, features[:, :length - 1], jnp.zeros((1,), jnp.int32))
    logits, hidden, cache = drafter.catch_up(params, state, padded, jnp.array([length]))
    np.testing.assert_allclose(logits[0], rollout[0, 0, length - 2], rtol=1e-4, atol=1e-4)
    for step in range(1, steps):
      true_draft = sequence[:, length - 1 + step]
      hidden, normed, cache = drafter.forward(params, cache, hidden[:, None], true_draft[:, None],
                                              jnp.ones((1,), jnp.int32), from_target=False)
      hidden = hidden[:, 0]
      np.testing.assert_allclose(drafter.head(params, normed[0, 0]),
                                 rollout[step, 0, length - 2 + step], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("drafter, restricted", [(DRAFTER, False), (DRAFTER, True),
                                                 (FUSED, False)],
                         ids=["whole_vocabulary", "restricted", "fused"])
def test_the_rollout_loss_trains_the_drafter_towards_the_target(params, drafter, restricted):
  """A few steps of gradient descent on the rollout loss lower it, at every draft step,
  also for a drafter restricted to a vocabulary, whose loss is over its tokens, and for
  one of fused features."""
  batch = dict(tokens=jnp.asarray([list(range(3, 15)), [7, 1, 9, 2, 8, 3] * 2]),
               lengths=jnp.array([12, 10]), prompt_lens=jnp.array([3, 2]))
  key = drafter.params_key
  vocabulary = (eagle.restrict_vocabulary(params["drafters"][key], params["target"],
                                          VOCABULARY)["vocabulary"] if restricted else None)

  def loss(drafter_params):
    drafter_params = drafter_params | ({"vocabulary": vocabulary} if restricted else {})
    return distill.rollout_loss(drafter, params | {"drafters": {key: drafter_params}}, batch,
                                steps=3)

  grad = jax.jit(jax.grad(lambda p: loss(p)[0]))
  before = np.asarray(loss(params["drafters"][key])[1]["step_loss"])
  trained = params["drafters"][key]
  for _ in range(20):
    trained = jax.tree.map(lambda p, g: p - 0.05 * g, trained, grad(trained))
  after = np.asarray(loss(trained)[1]["step_loss"])
  assert np.isfinite(before).all() and (after < before).all(), (before, after)


def test_greedy_chains_follow_the_path_a_greedy_run_takes():
  """A chain at a later draft step goes on only where the sequence's token is the
  target's argmax: in a sampled answer, the token at 5 is not, and no chain reads it."""
  target_top = jnp.arange(10, 18)[None]  # what step k at j predicts, t_{j+2}
  tokens = jnp.concatenate([jnp.array([[1, 2]]), target_top[:, :6]], axis=1)
  tokens = tokens.at[0, 5].set(99)  # sampled, not the argmax target_top[3]
  draft_tops = jnp.stack([target_top] * 3).at[0, 0, 2].set(0)  # one miss, step 0 at 2
  chains = np.asarray(distill.greedy_chains(draft_tops, target_top, tokens))[:, 0]
  np.testing.assert_array_equal(chains.astype(int), [[1, 1, 0, 1, 1, 1, 1, 1],
                                                     [0, 1, 1, 0, 0, 1, 1, 0],
                                                     [0, 0, 1, 1, 0, 0, 1, 0]])


def test_a_restricted_drafter_drafts_only_its_vocabulary_and_stays_exact(params):
  """Its logits are the whole head's on its tokens and -inf elsewhere, and greedy
  speculation with it is greedy AR, though the target's tokens often lie outside it."""
  restricted = params | {"drafters": {"eagle": eagle.restrict_vocabulary(
      params["drafters"]["eagle"], params["target"], VOCABULARY[::-1])}}
  normed = jax.random.normal(jax.random.key(0), (2, CONFIG.hidden_size))
  whole, only = DRAFTER.head(params, normed), np.asarray(DRAFTER.head(restricted, normed))
  np.testing.assert_allclose(only[:, VOCABULARY], whole[:, VOCABULARY], rtol=1e-5, atol=1e-5)
  assert np.isneginf(np.delete(only, VOCABULARY, axis=1)).all()
  decoder = engine.SpeculativeDecoder(TARGET, (engine.Arm(DRAFTER, 3),), 16)
  out = engine.run_speculative(restricted, decoder, PROMPTS, jax.random.key(0),
                               Samplers.same(Greedy()))
  expected = greedy_ar(params).tokens
  np.testing.assert_array_equal(out.tokens, expected)
  assert not np.isin(expected, VOCABULARY).all()
  for bad in ([3, 3, 5], [], [CONFIG.vocab_size]):
    with pytest.raises(ValueError, match="needs distinct token ids in"):
      eagle.restrict_vocabulary(params["drafters"]["eagle"], params["target"], bad)


def test_the_draft_vocabulary_is_the_answers_most_frequent_tokens():
  tokens = np.array([[1, 1, 1, 5, 5, 2, 9, 9], [3, 3, 5, 2, 2, 0, 0, 0]], np.int32)
  data = distill.TrainingData(tokens, np.array([8, 5], np.int32), np.array([3, 2], np.int32),
                              ("a", "b"), ("chat", "chat"))
  # Answers: 5 5 2 9 9 and 5 2 2; the prompts' 1s and 3s and the padding's 0s do not count.
  np.testing.assert_array_equal(distill.frequent_tokens(data, 2), [2, 5])
  np.testing.assert_array_equal(distill.frequent_tokens(data, 3), [2, 5, 9])


def test_weights_round_trip_and_bad_files_are_named(params, tmp_path):
  path = save_drafter(tmp_path / "drafter.safetensors", params["drafters"]["eagle"], CONFIG.name)
  loaded = load_drafter(path, CONFIG, jnp.float32, params["target"])
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, jnp.asarray(b, jnp.bfloat16)
                                                          .astype(jnp.float32)),
               loaded, params["drafters"]["eagle"])
  with pytest.raises(CheckpointError, match="for 'tiny_eagle_target', not for the target 'other'"):
    load_drafter(path, dataclasses.replace(CONFIG, name="other"), jnp.float32, params["target"])
  with pytest.raises(CheckpointError, match="does not hold the drafter for tiny_eagle_target: block.attn.out"):
    load_drafter(path, dataclasses.replace(CONFIG, hidden_size=48), jnp.float32, params["target"])
  as_f32 = tmp_path / "f32.safetensors"
  safetensors.numpy.save_file(
      {name: np.asarray(value, np.float32) for name, value in
       traverse_util.flatten_dict(params["drafters"]["eagle"]["params"], sep=".").items()},
      as_f32, metadata={"target": CONFIG.name})
  with pytest.raises(CheckpointError, match="f32.safetensors does not hold bf16"):
    load_drafter(as_f32, CONFIG, jnp.float32, params["target"])
  broken = tmp_path / "broken.safetensors"
  broken.write_bytes(path.read_bytes()[:100])
  with pytest.raises(CheckpointError, match="broken.safetensors is not a readable safetensors"):
    load_drafter(broken, CONFIG, jnp.float32, params["target"])
  with pytest.raises(CheckpointError, match="no feature-drafter weights at .*missing"):
    load_drafter(tmp_path / "missing.safetensors", CONFIG, jnp.float32, params["target"])


def test_a_fused_drafter_keeps_its_layers_in_its_weights_file(params, tmp_path):
  path = save_drafter(tmp_path / "fused.safetensors", params["drafters"]["fused"], CONFIG.name,
                      feature_layers=FUSED.feature_layers)
  assert feature_layers(path, CONFIG) == FUSED.feature_layers
  loaded = load_drafter(path, CONFIG, jnp.float32, params["target"])
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, jnp.asarray(b, jnp.bfloat16)
                                                          .astype(jnp.float32)),
               loaded, params["drafters"]["fused"])
  # Read as a final-feature drafter, its tensors do not fit.
  plain = save_drafter(tmp_path / "plain.safetensors", params["drafters"]["fused"], CONFIG.name)
  with pytest.raises(CheckpointError, match="plain.safetensors does not hold the drafter .*combine"):
    load_drafter(plain, CONFIG, jnp.float32, params["target"])
  tensors = safetensors.numpy.load_file(path)
  for bad in ("[0, 5]", "[1.5]", "two", "[true]", "[1, 1]", "{}", "[[1]]"):
    safetensors.numpy.save_file(tensors, path, metadata={"target": CONFIG.name,
                                                         "dtype": "bfloat16",
                                                         "feature_layers": bad})
    with pytest.raises(CheckpointError, match=r"fused.safetensors: feature_layers must be a JSON "
                                              r"list of distinct integers in \[0, 4\]"):
      load_drafter(path, CONFIG, jnp.float32, params["target"])


def test_a_restricted_drafter_keeps_its_vocabulary_in_its_weights_file(params, tmp_path):
  restricted = eagle.restrict_vocabulary(params["drafters"]["eagle"], params["target"], [9, 4, 1])
  path = save_drafter(tmp_path / "restricted.safetensors", restricted, CONFIG.name)
  loaded = load_drafter(path, CONFIG, jnp.float32, params["target"])
  np.testing.assert_array_equal(loaded["vocabulary"]["ids"], [1, 4, 9])
  np.testing.assert_array_equal(loaded["vocabulary"]["head"], restricted["vocabulary"]["head"])
  tensors = safetensors.numpy.load_file(path)
  for bad in ([4, 4], [1, CONFIG.vocab_size]):
    tensors["vocabulary.ids"] = np.array(bad, np.int32)
    safetensors.numpy.save_file(tensors, path, metadata={"target": CONFIG.name,
                                                         "dtype": "bfloat16"})
    with pytest.raises(CheckpointError, match="restricted.safetensors: vocabulary.ids must be "
                                              "sorted distinct int32 token ids"):
      load_drafter(path, CONFIG, jnp.float32, params["target"])


def test_a_resumed_training_run_sees_what_an_uninterrupted_one_would(params, tmp_path):
  """Kept sequences serve only the settings they were generated from; from a
  checkpoint's step on, mid-epoch, the batches are the uninterrupted run's; a
  checkpoint restores what it saved, and only for the settings it was trained with."""
  rows = 12
  data = distill.TrainingData(np.arange(rows * 10, dtype=np.int32).reshape(rows, 10),
                              np.arange(rows, dtype=np.int32) + 5, np.full(rows, 3, np.int32),
                              tuple(f"chat-{i}" for i in range(rows)), ("chat",) * rows)
  generated = []
  def generate():
    generated.append(True)
    return data
  kept = tmp_path / "sequences.npz"
  assert not distill.kept_sequences(kept, "settings a", generate)[1]
  again, reused = distill.kept_sequences(kept, "settings a", generate)
  assert reused and len(generated) == 1 and again.ids == data.ids and again.kinds == data.kinds
  for name in ("tokens", "lengths", "prompt_lens"):
    np.testing.assert_array_equal(getattr(again, name), getattr(data, name))
  assert not distill.kept_sequences(kept, "settings b", generate)[1] and len(generated) == 2
  assert distill.TrainingData.load(kept)[1] == "settings b"

  # 3 batches an epoch: step 4 is the second batch of the second epoch.
  whole = list(itertools.islice(distill.batches(data, 4, seed=1, start_step=0), 8))
  resumed = list(itertools.islice(distill.batches(data, 4, seed=1, start_step=4), 4))
  for a, b in zip(whole[4:], resumed, strict=True):
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
  assert not np.array_equal(whole[0]["tokens"], whole[3]["tokens"])  # epochs reshuffle

  drafter_params = params["drafters"]["eagle"]
  tx = distill.optimizer(config_lib.base_config().train)
  _, opt_state = tx.update(drafter_params, tx.init(drafter_params), drafter_params)
  path = tmp_path / "checkpoint.msgpack"
  distill.Checkpoint(5, drafter_params, opt_state, [dict(step=5, loss=2.0)], 12.5,
                     "training a").save(path)
  template = distill.Checkpoint(0, jax.tree.map(jnp.zeros_like, drafter_params),
                                tx.init(drafter_params), [], 0.0, "training a")
  restored = distill.Checkpoint.restore(path, template)
  assert restored.step == 5 and restored.curve == [dict(step=5, loss=2.0)]
  assert restored.seconds == 12.5
  jax.tree.map(np.testing.assert_array_equal, (restored.params, restored.opt_state),
               (drafter_params, opt_state))
  assert distill.Checkpoint.restore(path, dataclasses.replace(template,
                                                              trained_from="training b")) is None
  # A save cut short between its two files: the JSON of step 9 beside step 5's weights,
  # or either file alone, is no checkpoint.
  distill.Checkpoint(9, drafter_params, opt_state, [], 20.0, "training a").save(
      tmp_path / "later" / "checkpoint.msgpack")
  (tmp_path / "later" / "checkpoint.json").replace(path.with_suffix(".json"))
  assert distill.Checkpoint.restore(path, template) is None
  path.with_suffix(".json").unlink()
  assert distill.Checkpoint.restore(path, template) is None
  distill.Checkpoint.remove(path)
  assert distill.Checkpoint.restore(path, template) is None and not list(tmp_path.glob("check*"))


def test_a_missing_drafter_is_refused_before_any_weights_load(tmp_path):
  from flashspec_jax.pipeline import check_checkpoints
  config = config_lib.base_config()
  config.methods = "eagle:nonexistent"
  with pytest.raises(CheckpointError, match="eagle:nonexistent at .*eagle_checkpoint"):
    check_checkpoints(config)
  config.methods, config.target = "eagle:smollm2", "tiny_llama"
  with pytest.raises(CheckpointError, match="holds a drafter for 'smollm2_135m', not for the "
                                            "target 'tiny_llama'"):
    check_checkpoints(config)


def test_training_prompts_are_never_held_out(smollm2):
  """No training prompt is held out, repeats a held-out prompt word for word, or comes
  from a conversation any part of which is held out, as a first or a later turn."""
  _, _, tokenizer = smollm2
  config = config_lib.base_config()
  config.train.prompts_per_set = 300  # enough chat prompts to meet ShareGPT's repeats
  config.train.later_chat_turns = 40
  requests = distill.training_requests(config, tokenizer)
  held_out = [p for kind in ("chat", "code", "edit")
              for p in load_prompts(kind, split_size(kind, "heldout"), "heldout")]
  held_out_tokens = {tuple(row) for row in encode_chat(tokenizer,
                                                       [p.conversation for p in held_out])}
  assert not {tuple(r.token_ids) for r in requests} & held_out_tokens
  assert not {r.id for r in requests} & {p.id for p in held_out}
  # ShareGPT records are parts "<conversation>_<n>"; the split hashes the record id.
  conversation = lambda record: record.rpartition("_")[0]
  held_out_conversations = {
      conversation(record) for record in prompts._sharegpt()[2]
      if hashlib.sha256(f"sharegpt/{record}".encode()).digest()[0] % 5 == 0}
  records = [r.id.removeprefix("sharegpt/").partition("#")[0] for r in requests
             if r.kind == "chat"]
  assert sum("#" in r.id for r in requests) > 20  # later turns among them
  assert not {conversation(r) for r in records} & held_out_conversations
  assert len(requests) > 100 and {r.kind for r in requests} == {"chat", "code", "edit"}


def test_later_chat_turns_come_from_held_out_conversations_only_when_asked():
  """Training's later turns come from no held-out conversation; with held_out
  (teacher_forced's --chat_turns=later), from held-out conversations alone."""
  held_out = prompts.held_out_conversations()
  for inside in (False, True):
    turns = prompts.load_later_chat_turns(200, held_out=inside)
    assert len(turns) == 200 and all("#" in p.id and p.kind == "chat" for p in turns)
    assert all((prompts.conversation_of(p.id) in held_out) == inside for p in turns)


def test_the_held_out_prompts_the_experiments_run_have_no_twin_in_the_tune_split():
  """Apart from training's own filter: the held-out prompts the experiments run (up to 8
  per set, seed 0) repeat no tune-split prompt word for word, so the held-out figures
  of drafters trained before that filter (results/ at 17facda and earlier) stand too."""
  for kind in ("chat", "code", "edit"):
    tune = {p.text for p in load_prompts(kind, split_size(kind, "tune"), "tune")}
    assert not {p.text for p in load_prompts(kind, 8, "heldout")} & tune


@pytest.mark.skipif(not shipped_path("smollm2").exists(), reason="eagle:smollm2 is not trained yet")
def test_shipped_drafter_speculates_exactly_on_smollm2(smollm2, smollm2_heldout):
  """Greedy speculation with eagle:smollm2 in f32 is greedy AR, token for token, on five
  real prompts of 128 new tokens, and each number of accepted drafts, 0 to gamma, occurs."""
  config, target_params, _ = smollm2
  ids, ar_tokens = smollm2_heldout
  target = Llama(config, param_dtype=jnp.float32)
  params = {"target": target_params,
            "drafters": {"smollm2": load_drafter(shipped_path("smollm2"), config, jnp.float32,
                                                 target_params)}}
  gamma = 4
  drafter = FeatureDrafter(target, "smollm2", unroll=False,
                           feature_layers=feature_layers(shipped_path("smollm2"), config))
  decoder = engine.SpeculativeDecoder(target, (engine.Arm(drafter, gamma),), 128, eos_ids=())
  out = engine.run_speculative(params, decoder, ids, jax.random.key(0), Samplers.same(Greedy()))
  np.testing.assert_array_equal(out.tokens, ar_tokens)
  assert all(np.asarray(out.metrics.accept_hist).sum(axis=0) > 0), out.metrics.accept_hist


def test_replayed_steps_accept_each_chain_and_stop_at_the_answers_end():
  """bench/teacher_forced.py on a prompt of 3 tokens: chains [gamma=3, T]; the first step
  drafts from position 2."""
  chains = np.zeros((3, 14), bool)
  chains[0, 2] = chains[1, 3] = True  # the step starting at 2 accepts 2 drafts, emits 3
  chains[0, 5] = chains[1, 6] = chains[2, 7] = True  # the one at 5 accepts all 3, emits 4
  chains[0, 9] = True  # the one at 9 accepts 1
  # In 12 tokens that draft is the answer's last token: no bonus follows it.
  assert teacher_forced.replay(chains, prompt_len=3, length=12) == [3, 4, 1]
  assert teacher_forced.replay(chains, prompt_len=3, length=14) == [3, 4, 2, 1]
  assert teacher_forced.replay(chains, prompt_len=3, length=9) == [3, 2]  # 2 tokens were left


@pytest.mark.skipif(not shipped_path("smollm2").exists(), reason="eagle:smollm2 is not trained yet")
def test_the_engine_drafts_as_training_scores_held_out_answers(tmp_path):
  """Each greedy step eagle:smollm2 takes on real prompts (f32) emits what the training
  rollout's chains, replayed over the same answer, say it should; the chat prompt is a
  later turn of a held-out conversation (--chat_turns=later)."""
  with pytest.raises(ValueError, match="chat_turns='later' asks for chat prompts, which "
                                       "sets='code' leaves out"):
    teacher_forced.bench("eagle:smollm2", 1, 16, 4, 4, sets="code", chat_turns="later")
  result = teacher_forced.bench("eagle:smollm2", num_per_set=1, max_new_tokens=16, gamma=4,
                                batch_size=4, dtype="float32", chat_turns="later")
  chat_id = next(i for i in result["ids"] if i.startswith("sharegpt/"))
  assert "#" in chat_id and prompts.conversation_of(chat_id) in prompts.held_out_conversations()
  assert set(result["by_set"]) == {"chat", "code", "edit"}
  for kind, row in result["by_set"].items():
    assert row["engine_steps"] == row["replayed_steps"], kind
    assert row["same_steps"] == row["sequences"] == 1


def test_prompt_sources_count_a_chats_later_turns_apart():
  ids = ("sharegpt/a_0", "sharegpt/a_0#1", "sharegpt/a_0#2", "sharegpt/b_3",
         "humaneval/HumanEval/1")
  kinds = ("chat", "chat", "chat", "chat", "code")
  data = distill.TrainingData(np.zeros((5, 4), np.int32), np.full(5, 4, np.int32),
                              np.ones(5, np.int32), ids, kinds)
  assert distill.prompt_sources(data) == {"chat": 2, "chat later turns": 2, "code": 1}


def test_validation_takes_whole_conversations():
  """A chat's first turn, its later turns and ShareGPT's other parts of it fall on one
  side of the split; other prompts are each their own conversation."""
  ids = [f"sharegpt/c{c}_{part}" + (f"#{turn}" if turn else "")
         for c in range(8) for part in range(2) for turn in range(3)]
  ids += [f"human_eval/HumanEval/{i}" for i in range(12)]
  data = distill.TrainingData(np.zeros((len(ids), 4), np.int32), np.full(len(ids), 4, np.int32),
                              np.ones(len(ids), np.int32), tuple(ids), ("chat",) * len(ids))
  conversation = lambda i: i.partition("_")[0] if i.startswith("sharegpt/") else i
  for seed in range(4):
    train, validation = distill.split_validation(data, 0.25, seed)
    assert sorted(train.ids + validation.ids) == sorted(ids)
    assert not {conversation(i) for i in train.ids} & {conversation(i) for i in validation.ids}
    assert 15 <= len(validation.ids) < 15 + 6  # a quarter of 60, plus at most a conversation


def test_sampled_answers_follow_the_greedy_ones(monkeypatch):
  """train.sampled_answers = 2: each prompt is answered greedily, as without them, then
  twice more at temperature 1."""
  from flashspec_jax.loading import LoadedModel
  from flashspec_jax.pipeline import Request
  requests = [Request(f"sharegpt/c{i}_0", "chat", list(range(3 + i, 9 + 2 * i))) for i in range(3)]
  monkeypatch.setattr(distill, "training_requests", lambda config, tokenizer: requests)
  config = config_lib.base_config()
  config.target, config.synthetic_weights = "tiny_smollm2", True
  config.train.answer_tokens, config.train.generate_batch = 6, 2
  shape = model_config(config.target)
  # Small weights give a near-flat next-token distribution, whose samples are not greedy's.
  model = LoadedModel(shape, spread_params(shape, 0, scale=0.05), None, True, "random")
  greedy = distill.generate_sequences(config, model)
  config.train.sampled_answers = 2
  data = distill.generate_sequences(config, model)
  assert data.ids == greedy.ids * 3 and data.kinds == ("chat",) * 9
  np.testing.assert_array_equal(data.tokens[:3, :greedy.tokens.shape[1]], greedy.tokens)
  answers = [tuple(row[p:n]) for row, p, n in zip(data.tokens, data.prompt_lens, data.lengths)]
  assert len(set(answers)) > 3  # sampled answers are not all the greedy ones
