"""Config checks that run before any weights load, prompt selection and prompt files."""

import dataclasses
import json
import pathlib
import types

import pytest
from helpers import with_fields

from flashspec_jax import config as config_lib
from flashspec_jax import pipeline, runner
from flashspec_jax.engine import MAX_GAMMA
from flashspec_jax.loading import CheckpointError
from flashspec_jax.sequences import required_capacity
from flashspec_jax.prompts import read_prompt_file


def make_config(tmp_path, **overrides):
  config = config_lib.base_config()
  config.results_dir = str(tmp_path / "results")
  return with_fields(config, **overrides)


@pytest.fixture
def no_loading(monkeypatch):
  """Fails the test if the runner gets as far as loading weights."""
  def load_model(*args, **kwargs):
    raise AssertionError("weights were loaded before the config was checked")
  monkeypatch.setattr(pipeline, "load_model", load_model)


@pytest.mark.parametrize("overrides, message", [
    (dict(**{"sampling.top_k": 5, "sampling.top_p": 0.9}), "choose top_k or top_p, not both"),
    (dict(**{"sampling.gamma": MAX_GAMMA + 1}), f"config.sampling.gamma = {MAX_GAMMA + 1} is "
                                                f"invalid: expected in \\[1, {MAX_GAMMA}\\]"),
    (dict(methods=f"ngram:3@{MAX_GAMMA + 1}"), "config.methods = .* is invalid"),
    (dict(target="llama9"), "config.target = 'llama9' is invalid"),
    (dict(methods="layer_skip:30"), "arm 'layer_skip:30' cannot draft for config.target = "
                                    "'smollm2_135m' \\(30 layers"),
    (dict(methods="draft_model:llama3.2_1b"), "arm 'draft_model:llama3.2_1b' cannot draft"),
    (dict(methods="bandit:ucb1", arms="ngram:3,layer_skip:31"), "arm 'layer_skip:31' cannot"),
    (dict(**{"sampling.max_new_tokens": 8192}), "smollm2_135m has 8192 positions"),
    (dict(**{"prompts.file": "/nonexistent.jsonl"}), "cannot read the prompt file"),
    (dict(batch_size=8, **{"prompts.order": "interleaved"}), "config.prompts.order = "
                                                              "'interleaved' is invalid"),
    (dict(**{"bandit.initial_state": "/nonexistent.json"}), "config.bandit.initial_state"),
    (dict(**{"bandit.initial_state": __file__}), "config.bandit.initial_state = .* is invalid: "
                                                  "expected empty or the results file"),
    (dict(mesh="dp:2"), "config.mesh = 'dp:2' is invalid: expected '' \\(one device\\) or "
                        "'tp:<n>'"),
    (dict(target="llama3_8b", mesh="tp:3"), "config.mesh = 'tp:3' is invalid: llama3_8b: "
                                            "num_kv_heads=8 does not split over 3"),
    *[(dict(**{"train.feature_layers": bad}), f"config.train.feature_layers = '{bad}' is "
                                              f"invalid: expected distinct comma-separated "
                                              f"layers of smollm2_135m in \\[0, 30\\]")
      for bad in ("2,31", "-1", "2,2", "two")],
    (dict(sweep=f"sampling.gamma=1,{MAX_GAMMA + 1}"), f"config.sweep's point sampling.gamma="
                                                      f"{MAX_GAMMA + 1}: config.sampling.gamma"),
    (dict(sweep="methods=ar,ngarm:3"), "config.sweep's point methods=ngarm:3: config.methods"),
    (dict(sweep="deterministic=yes,no"), "config.sweep = 'deterministic=yes,no' is invalid: "
                                         "expected .* \\(true or false for a flag\\)"),
    (dict(**{"prompts.num_per_set": 100_000, "prompts.sets": "code"}),
     "config.prompts.num_per_set = 100000 is invalid: the tune split holds \\d+ code"),
    (dict(sweep="prompts.num_per_set=1,100000"), "config.sweep's point prompts.num_per_set="
                                                 "100000: config.prompts.num_per_set"),
    (dict(methods="ar,eagle:smollm2", sweep="methods=ar,eagle:smollm2,eagle:fused",
          eagle_checkpoint="fused=f.safetensors"), "no weights for the feature drafter "
                                                   "eagle:fused at f.safetensors"),
    (dict(**{"train.grad_clip": 0.0}), "config.train.grad_clip = 0.0 is invalid: expected > 0"),
    (dict(draft_steps="rolled"), "config.draft_steps = 'rolled' is invalid: expected one of "
                                 "\\('auto', 'unrolled', 'loop'\\)"),
    *[(dict(**{f"train.{name}": bad}), f"config.train.{name} = {bad} is invalid: expected >= 0")
      for name, bad in (("max_seconds", -1.0), ("weight_decay", -0.5), ("warmup_steps", -3))],
    (dict(methods="ar,ngram:3", draft_checkpoint_dir="/no/such/dir"),
     "config.draft_checkpoint_dir = '/no/such/dir' is invalid: expected empty unless a "
     "draft_model:<shape> arm runs"),
    (dict(methods="ar,ngram:3", eagle_checkpoint="fused.safetensors"),
     "config.eagle_checkpoint = 'fused.safetensors' is invalid: expected empty, a .safetensors "
     "file for the eagle arms the run builds"),
    *[(dict(methods="ar,eagle:smollm2,eagle:fused", eagle_checkpoint=bad),
       "config.eagle_checkpoint = .* is invalid: expected empty, a .safetensors file for the "
       "eagle arms the run builds, or <name>=<file>.safetensors pairs")
      for bad in ("fused.bin", "fused=", "=fused.safetensors", "fused=a.bin",
                  "fuse=a.safetensors")],
])
def test_bad_values_are_refused_before_weights_load(tmp_path, no_loading, overrides, message):
  with pytest.raises(ValueError, match=message):
    runner.run(make_config(tmp_path, **overrides))


class CharTokenizer:
  chat_template = None

  def encode(self, text):
    return [ord(c) % 1024 for c in text]


REAL_TEXT = types.SimpleNamespace(synthetic=False, tokenizer=CharTokenizer())


def prompt_ids(config):
  return [r.id for r in runner.build_requests(config, REAL_TEXT)]


def test_sampling_seed_does_not_change_the_prompts(tmp_path):
  config = make_config(tmp_path, **{"prompts.num_per_set": 3})
  reseeded = make_config(tmp_path, seed=7, **{"prompts.num_per_set": 3})
  assert prompt_ids(config) == prompt_ids(reseeded)
  assert prompt_ids(config) != prompt_ids(make_config(tmp_path, **{"prompts.num_per_set": 3,
                                                                   "prompts.seed": 7}))


def write_lines(path, *lines):
  path.write_text("\n".join(lines) + "\n")
  return str(path)


def test_prompt_file_gives_text_and_chat_requests(tmp_path):
  path = write_lines(tmp_path / "mine.jsonl",
                     json.dumps({"text": "abc", "kind": "code"}), "",
                     json.dumps({"messages": [{"role": "system", "content": "x"},
                                              {"role": "user", "content": "yz"}]}))
  requests = runner.build_requests(make_config(tmp_path, **{"prompts.file": path}), REAL_TEXT)
  assert [(r.id, r.kind, r.token_ids) for r in requests] == [
      (f"{path}:1", "code", [97, 98, 99]), (f"{path}:3", "file", [120, 10, 121, 122])]


@pytest.mark.parametrize("line, message", [
    ("{not json", "not valid JSON"),
    ('{"prompt": "hi"}', "unknown key 'prompt'"),
    ('{"kind": "chat"}', 'expected an object with either "text" or "messages"'),
    ('{"text": "hi", "messages": []}', 'expected an object with either "text" or "messages"'),
    ('{"text": ""}', '"text" must be a non-empty string'),
    ('{"messages": [{"role": "user"}]}', '"messages" must be a non-empty list'),
    ('{"text": "hi", "kind": 3}', '"kind" must be a non-empty string'),
    ('{"text": "hi", "knd": "chat"}', "unknown key 'knd'"),
    ('{"txt": "hi"}', "unknown key 'txt'"),
])
def test_a_bad_prompt_line_is_named_by_its_number(tmp_path, line, message):
  path = write_lines(tmp_path / "bad.jsonl", json.dumps({"text": "fine"}), line)
  with pytest.raises(ValueError, match=f"bad.jsonl:2: {message}"):
    read_prompt_file(path)


def test_an_empty_prompt_file_is_refused(tmp_path):
  with pytest.raises(ValueError, match="holds no prompts"):
    read_prompt_file(write_lines(tmp_path / "empty.jsonl", ""))


def test_prompt_file_with_synthetic_weights_is_refused(tmp_path, no_loading):
  path = write_lines(tmp_path / "mine.jsonl", json.dumps({"text": "abc"}))
  config = make_config(tmp_path, target="tiny_llama", synthetic_weights=True,
                       **{"prompts.file": path})
  with pytest.raises(ValueError, match="synthetic weights have no tokenizer"):
    runner.run(config)


@pytest.mark.parametrize("draft_steps, unrolled", [("auto", False), ("unrolled", True),
                                                    ("loop", False)])
def test_draft_steps_set_how_every_model_drafter_compiles(tmp_path, draft_steps, unrolled):
  """On this CPU "auto" is a loop; the API's field reaches the same arms."""
  config = make_config(tmp_path, target="tiny_llama", synthetic_weights=True,
                       methods="bandit:ucb1", arms="layer_skip:1,eagle:random,ngram:3",
                       draft_steps=draft_steps)
  model = pipeline.load_model("tiny_llama", synthetic=True, dtype="float32")
  (method,), _ = pipeline.build_methods(config, model, "float32")
  assert [arm.drafter.unroll for arm in method.arms[:2]] == [unrolled, unrolled]
  from flashspec_jax import FlashSpecConfig
  api = FlashSpecConfig(target="tiny_llama", synthetic_weights=True, draft_steps=draft_steps)
  assert config_lib.unrolled_drafts(api.to_config_dict()) is unrolled


def test_budget_counts_real_prompt_lengths_not_bucket_padding():
  """A 90-token prompt padded to 256, with 300 new tokens, fits 512 positions; the cache
  still holds the padded width."""
  config = dataclasses.replace(config_lib.model_config("tiny_llama"), max_position_embeddings=512)
  assert required_capacity(config, 90, 300, reserve=5, padded_width=256) == 256 + 300 + 5
  with pytest.raises(ValueError, match="prompt \\(213 tokens\\) \\+ max_new_tokens \\(300\\) = 513 "
                                       "exceeds the model's 512 positions"):
    required_capacity(config, 213, 300, padded_width=256)


def test_runner_pads_to_a_bucket_wider_than_the_positions_left(tmp_path):
  """tiny_llama has 4096 positions: a 90-token prompt in a 4096-wide bucket still runs."""
  config = make_config(tmp_path, target="tiny_llama", synthetic_weights=True, print_text=False,
                       **{"prompts.synthetic_length": 90, "prompts.bucket": 4096,
                          "prompts.sets": "chat", "sampling.max_new_tokens": 4})
  assert [r["new_tokens"] for r in runner.run(config)["records"]] == [4]


@pytest.mark.parametrize("width, smallest, padded", [
    (1, 64, 64), (64, 64, 64), (65, 64, 128), (300, 64, 512), (513, 256, 1024)])
def test_prompt_buckets_grow_by_powers_of_two(width, smallest, padded):
  assert pipeline.bucket_width(width, smallest) == padded


def test_missing_draft_checkpoint_names_its_flag_before_the_target_loads(tmp_path, no_loading):
  config = make_config(tmp_path, methods="draft_model:tiny_smollm2",
                       draft_checkpoint_dir=str(tmp_path / "absent"))
  with pytest.raises(ValueError, match="--config.draft_checkpoint_dir") as error:
    runner.run(config)
  assert "--config.checkpoint_dir" not in str(error.value)


def test_api_names_its_draft_checkpoint_field(tmp_path):
  from flashspec_jax import FlashSpec, FlashSpecConfig
  config = FlashSpecConfig(drafters=("draft_model:tiny_smollm2",),
                           draft_checkpoint_dir=str(tmp_path / "absent"))
  with pytest.raises(ValueError, match="FlashSpecConfig.draft_checkpoint_dir") as error:
    FlashSpec(config)
  assert "FlashSpecConfig.synthetic_weights=True" in str(error.value)
  assert "--config" not in str(error.value) and len(str(error.value).splitlines()) == 2


def test_eagle_checkpoints_name_every_arm_or_some(tmp_path):
  """One file serves every eagle arm; <name>=<file> pairs serve theirs, and the others
  read their shipped weights, so two drafters run side by side in one run."""
  shipped = pipeline.shipped_path("smollm2")
  config = make_config(tmp_path, methods="ar,eagle:smollm2,eagle:fused")
  config.eagle_checkpoint = "/w/one.safetensors"
  assert [pipeline.eagle_weights(n, config) for n in ("smollm2", "fused")] == [
      pathlib.Path("/w/one.safetensors")] * 2
  config.eagle_checkpoint = "fused=/w/fused.safetensors"
  assert pipeline.eagle_weights("smollm2", config) == shipped
  assert pipeline.eagle_weights("fused", config) == pathlib.Path("/w/fused.safetensors")
  config_lib.validate(config)
  with pytest.raises(CheckpointError, match="eagle:fused at /w/fused.safetensors"):
    pipeline.check_checkpoints(config)
