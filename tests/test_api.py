"""The FlashSpec Python API, on synthetic tiny_llama weights."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flashspec_jax import BanditConfig, FlashSpec, FlashSpecConfig, SamplingConfig, api, sharding
from flashspec_jax.loading import load_model

GREEDY = SamplingConfig(gamma=3, temperature=0.0)
PROMPTS = [[5, 9, 2, 7, 5, 9, 2], [11, 3]]


def tiny_engine(drafters, model=None):
  config = FlashSpecConfig(target="tiny_llama", drafters=drafters, sampling=GREEDY,
                           max_new_tokens=6, synthetic_weights=True, device="cpu")
  return FlashSpec(config, model=model)


def test_engines_can_share_one_loaded_model():
  ar = tiny_engine(())
  speculative = tiny_engine(("ngram:2",), model=ar.model)
  assert speculative.model is ar.model
  assert speculative.generate(PROMPTS).token_ids == ar.generate(PROMPTS).token_ids


@pytest.mark.parametrize("name, dtype, tp, message", [
    ("tiny_llama_draft", jnp.float32, 1, "is tiny_llama_draft in float32 over 1 device\\(s\\), "
                                         "but this config runs tiny_llama in float32 over 1"),
    ("tiny_llama", jnp.bfloat16, 1, "is tiny_llama in bfloat16 over 1 device\\(s\\), but this "
                                    "config runs tiny_llama in float32 over 1"),
    ("tiny_llama", jnp.float32, 2, "is tiny_llama in float32 over 2 device\\(s\\), but this "
                                   "config runs tiny_llama in float32 over 1"),
])
def test_a_model_of_another_shape_dtype_or_mesh_is_refused(name, dtype, tp, message):
  mesh = sharding.make_mesh(tp, jax.devices("cpu")) if tp > 1 else None
  model = load_model(name, synthetic=True, dtype=dtype, mesh=mesh)
  with pytest.raises(ValueError, match=message):
    tiny_engine(("ngram:2",), model=model)


class CharTokenizer:
  """Stands in for a real tokenizer on the synthetic model: one id per character."""

  chat_template = None

  def encode(self, text):
    return [ord(c) % 1024 for c in text]

  def decode(self, ids):
    return "".join(map(chr, ids))


def test_a_string_is_one_prompt():
  engine = tiny_engine(())
  engine.model.tokenizer = CharTokenizer()
  result = engine.generate("Hi there", chat=False)
  assert len(result.token_ids) == 1
  assert result.token_ids == engine.generate(["Hi there"], chat=False).token_ids


def test_numpy_integer_ids_are_prompts():
  engine = tiny_engine(())
  expected = engine.generate(PROMPTS).token_ids
  assert engine.generate(np.array(PROMPTS[0], np.int32)).token_ids == expected[:1]
  assert engine.generate([np.array(p, np.int64) for p in PROMPTS]).token_ids == expected
  assert engine.generate([jnp.array(p) for p in PROMPTS]).token_ids == expected
  assert engine.generate([[np.array(i) for i in PROMPTS[0]]]).token_ids == expected[:1]
  square = [PROMPTS[0][:2], PROMPTS[1]]
  assert (engine.generate(np.array(square, np.uint16)).token_ids
          == engine.generate(square).token_ids)


@pytest.mark.parametrize("prompts", [
    [[1.5, 2]], [[1, 2.0]], np.array([1.0, 2.0]), [[True, False]], [["a", "b"]],
    [1.5, 2.0], [1, 2.0], [True, 5]])  # the last three: a flat list is one prompt
def test_non_integer_ids_are_refused(prompts):
  with pytest.raises(ValueError, match="prompt 0: token ids must be integers"):
    tiny_engine(()).generate(prompts)


def test_a_list_of_ids_is_one_prompt_and_a_string_of_drafters_is_split():
  engine = tiny_engine(())
  assert engine.generate(PROMPTS[0]).token_ids == engine.generate([PROMPTS[0]]).token_ids
  config = FlashSpecConfig(target="tiny_llama", drafters="ngram:2, ar")
  assert config.drafters == ("ngram:2", "ar") and config.to_config_dict().arms == "ngram:2,ar"


@pytest.mark.parametrize("message", [{"role": "user"}, {"role": "user", "content": 3}])
def test_a_message_without_role_and_content_strings_is_refused(message):
  engine = tiny_engine(())
  engine.model.tokenizer = CharTokenizer()
  with pytest.raises(ValueError, match="prompt 0: each message needs 'role' and 'content'"):
    engine.generate([[message]])


def test_the_bandit_config_reaches_the_run_config_and_is_checked():
  drafters = ("ngram:2", "ar")
  bandit = BanditConfig(strategy="kl_ucb", acceptance_discount=0.95, request_carry=0.25,
                        wait_cost=1e-4)
  config = FlashSpecConfig(target="tiny_llama", drafters=drafters, bandit=bandit).to_config_dict()
  assert config.methods == "bandit:kl_ucb"
  assert (config.bandit.acceptance_discount, config.bandit.request_carry,
          config.bandit.wait_cost) == (0.95, 0.25, 1e-4)
  for field, value in [("request_carry", 0.0), ("wait_cost", -1.0)]:
    with pytest.raises(ValueError, match=f"^BanditConfig.{field} = "):
      FlashSpecConfig(target="tiny_llama", drafters=drafters,
                      bandit=BanditConfig(**{field: value})).to_config_dict()


@pytest.mark.parametrize("config, message", [
    (FlashSpecConfig(sampling=SamplingConfig(top_k=5, top_p=0.9)),
     "^SamplingConfig.top_k = 5 is invalid: expected 0 while SamplingConfig.top_p < 1"),
    (FlashSpecConfig(sampling=SamplingConfig(gamma=0)), "^SamplingConfig.gamma = 0 is invalid"),
    (FlashSpecConfig(max_new_tokens=0), "^FlashSpecConfig.max_new_tokens = 0 is invalid"),
    (FlashSpecConfig(drafters=("ngram:x",)), "^FlashSpecConfig.drafters = 'ngram:x' is invalid"),
    (FlashSpecConfig(drafters=("ngram:3", "x")), "^FlashSpecConfig.drafters = 'ngram:3,x'"),
    (FlashSpecConfig(target="nonexistent"), "^FlashSpecConfig.target = 'nonexistent'"),
    # With one drafter no chooser runs, but a misspelt one is still refused.
    (FlashSpecConfig(bandit=BanditConfig(strategy="ucb")), "^BanditConfig.strategy = 'ucb'"),
])
def test_bad_values_are_named_by_the_apis_own_fields(config, message):
  with pytest.raises(ValueError, match=message):
    config.to_config_dict()


def test_the_defaults_are_the_drafter_and_chooser_that_paid():
  """One drafter by default is prompt lookup (any target can run it; SmolLM2's layer-skip
  drafter ran at 0.4x AR on the H200), and several are chosen among by contextual
  Thompson, the chooser that met the stream goals most often."""
  assert FlashSpecConfig(target="tiny_llama").to_config_dict().methods == "ngram:3"
  config = FlashSpecConfig(target="tiny_llama", drafters=("ngram:2", "ar")).to_config_dict()
  assert config.methods == "bandit:contextual_thompson"


def test_a_contextual_choosers_state_carries_from_call_to_call():
  """Its evidence is per context ([K, C]): the state a call returns is what the next
  call's program was compiled for (a state shaped by the unbound chooser, [K, 1], made
  the second call fail)."""
  config = FlashSpecConfig(target="tiny_llama", drafters=("ngram:2", "ar"), sampling=GREEDY,
                           max_new_tokens=6, synthetic_weights=True, device="cpu",
                           bandit=BanditConfig(strategy="contextual_kl_ucb", costs=(1.0, 1.0)))
  engine = FlashSpec(config)
  first = engine.generate(PROMPTS)
  assert engine.bandit.tested.shape == (2, 3)
  tested = float(engine.bandit.tested.sum())
  assert engine.generate(PROMPTS).token_ids == first.token_ids
  assert float(engine.bandit.tested.sum()) > tested


def test_a_call_that_finds_nan_logits_leaves_the_engine_usable():
  """The program takes the bandit's state donated: after a call that ran and raised, the
  next call starts afresh instead of handing over the deleted arrays; a call refused
  before it ran keeps the state."""
  config = FlashSpecConfig(target="tiny_llama", drafters=("ngram:2", "ar"), sampling=GREEDY,
                           max_new_tokens=6, synthetic_weights=True, device="cpu",
                           bandit=BanditConfig(strategy="kl_ucb", costs=(1.0, 1.0)))
  engine = FlashSpec(config)
  expected = engine.generate(PROMPTS).token_ids
  donated = engine.bandit
  engine.generate(PROMPTS)
  assert all(leaf.is_deleted() for leaf in jax.tree.leaves(donated))
  kept = engine.bandit
  with pytest.raises(ValueError, match="exceeds"):
    engine.generate([[5] * 5000])
  assert engine.bandit is kept and not any(leaf.is_deleted() for leaf in jax.tree.leaves(kept))
  params = engine.setup.params
  engine.setup.params = {**params, "target": jax.tree.map(lambda x: x * jnp.nan, params["target"])}
  with pytest.raises(FloatingPointError, match="the target model produced NaN logits"):
    engine.generate(PROMPTS)
  engine.setup.params = params
  assert engine.bandit is None
  assert engine.generate(PROMPTS).token_ids == expected


def test_bandit_costs_are_timed_once_then_read_from_the_user_cache(tmp_path, monkeypatch):
  monkeypatch.setenv("FLASHSPEC_CACHE_DIR", str(tmp_path))
  first = tiny_engine(("ngram:2", "layer_skip:2", "ar"))
  first.generate(PROMPTS)
  costs = {arm.name: arm.cost for arm in first.method.arms}
  assert len(set(costs.values())) == 3, costs  # timed, not the old 1 per arm
  (entry,) = json.loads((tmp_path / "arm_costs.json").read_text()).values()
  assert entry == costs

  def no_timing(*args, **kwargs):
    raise AssertionError("costs in the cache were timed again")
  monkeypatch.setattr(api, "calibrate_costs", no_timing)
  second = tiny_engine(("ngram:2", "layer_skip:2", "ar"), model=first.model)
  second.generate(PROMPTS)
  assert {arm.name: arm.cost for arm in second.method.arms} == costs


CACHE_PROBE = """
import jax
from jax import monitoring
from flashspec_jax import FlashSpec, FlashSpecConfig, SamplingConfig
events = []
monitoring.register_event_listener(lambda event, **kwargs: events.append(event))
config = FlashSpecConfig(target="tiny_llama", drafters=("ngram:2",), max_new_tokens=4,
                         sampling=SamplingConfig(gamma=2, temperature=0.0),
                         synthetic_weights=True, device="cpu")
FlashSpec(config).generate([[5, 9, 2, 7]])
print(events.count("/jax/compilation_cache/cache_misses"),
      events.count("/jax/compilation_cache/cache_hits"),
      events.count("/flashspec/executables/hits"))
"""


def test_a_second_process_compiles_nothing_the_first_compiled(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  env |= {"FLASHSPEC_CACHE_DIR": str(tmp_path), "JAX_PLATFORMS": "cpu"}
  counts = []
  for _ in range(2):
    run = subprocess.run([sys.executable, "-c", CACHE_PROBE], env=env, capture_output=True,
                         text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    counts.append(tuple(map(int, run.stdout.split())))
  (first_misses, first_hits, first_loads), (second_misses, second_hits, second_loads) = counts
  assert first_misses > 0 and first_loads == 0 and (tmp_path / "xla").is_dir()
  # The generation program loads whole from the program store, untraced; the small
  # programs around it come from JAX's cache.
  assert second_misses == 0 and second_loads == 1
  assert second_hits + second_loads == first_misses + first_hits
