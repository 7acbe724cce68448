"""Checkpoint loaders and tokenizers: the real SmolLM2 GGUF, written GGUFs, broken checkpoints."""

import importlib.metadata
import json
import os
import pathlib
import re
import subprocess
import sys

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import CASES, save_tiny_llama, write_tiny_llama

from flashspec_jax import config as config_lib
from flashspec_jax import pipeline
from flashspec_jax.generate import Decoder, run_generate
from flashspec_jax.loading import check_checkpoint, load_model
from flashspec_jax.loading.gguf import (config_from_gguf, load_gguf_checkpoint, read_gguf,
                                        smollm2_path)
from flashspec_jax.loading.hf import load_hf_checkpoint
from flashspec_jax.loading.params import CheckpointError
from flashspec_jax.loading.tokenizer import encode_chat, load_tokenizer
from flashspec_jax.models.llama import KVCache, Llama
from flashspec_jax.sampling import Greedy

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

REPO = pathlib.Path(__file__).resolve().parents[1]
REAL_PROMPTS = [
    "Tell me a short story about a robot who learns to paint.",
    "Write a Python function that checks whether a number is prime.",
    "Explain in two sentences why the sky is blue.",
]


@pytest.fixture(scope="module")
def hf_smollm2():
  path = smollm2_path()
  return transformers.AutoModelForCausalLM.from_pretrained(
      path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def test_real_gguf_logits_match_transformers(smollm2, hf_smollm2):
  config, params, tokenizer = smollm2
  model = Llama(config, param_dtype=jnp.float32)
  for ids in encode_chat(tokenizer, REAL_PROMPTS):
    logits, _ = model.apply(params, jnp.asarray([ids]), KVCache.init(config, 1, len(ids),
                                                                      jnp.float32))
    with torch.no_grad():
      expected = hf_smollm2(torch.tensor([ids])).logits.numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-3, rtol=0)


def test_real_gguf_greedy_continuation_matches_transformers(smollm2, hf_smollm2):
  config, params, tokenizer = smollm2
  prompts = encode_chat(tokenizer, REAL_PROMPTS)
  decoder = Decoder(Llama(config, param_dtype=jnp.float32), 32, eos_ids=())
  out = run_generate(params, decoder, prompts, jax.random.key(0), Greedy())
  for row, ids in enumerate(prompts):
    with torch.no_grad():
      expected = hf_smollm2.generate(torch.tensor([ids]), max_new_tokens=32,
                                     do_sample=False)[0, len(ids):]
    assert len(expected) == 32, "pick prompts whose answers outlast 32 tokens"
    assert out.tokens[row].tolist() == expected.tolist()


def test_gguf_tokenizer_matches_transformers_and_llama_cpp(smollm2):
  _, _, tokenizer = smollm2
  path = smollm2_path()
  reference = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
  text = (REPO / "flashspec_jax" / "generate.py").read_text()
  without_digits = "".join(ch for ch in text if not ch.isdigit())
  assert tokenizer.encode(without_digits) == reference.encode(without_digits)
  # llama.cpp's 'smollm' pre-tokenizer splits digits one by one; transformers' GGUF
  # conversion drops that rule, so on digits we follow llama.cpp (and SmolLM's own tokenizer).
  assert [tokenizer.decode([t]) for t in tokenizer.encode("2024")] == ["2", "0", "2", "4"]
  chat = encode_chat(tokenizer, ["Hi"])[0]
  assert tokenizer.decode(chat).endswith("<|im_start|>assistant\n")
  assert tokenizer.eos_token == "<|im_end|>"


def llama_cpp_permute(weight, num_heads):
  rows = weight.shape[0]
  return (weight.reshape(num_heads, 2, rows // num_heads // 2, *weight.shape[1:])
          .swapaxes(1, 2).reshape(weight.shape))


def write_gguf(path, hf_model, arch="llama", quant_override=None):
  """Writes an HF Llama as an F32 GGUF the way llama.cpp's converter lays it out."""
  c = hf_model.config
  writer = gguf.GGUFWriter(path, arch)
  writer.add_block_count(c.num_hidden_layers)
  writer.add_embedding_length(c.hidden_size)
  writer.add_feed_forward_length(c.intermediate_size)
  writer.add_head_count(c.num_attention_heads)
  writer.add_head_count_kv(c.num_key_value_heads)
  writer.add_key_length(c.head_dim)
  writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
  writer.add_layer_norm_rms_eps(c.rms_norm_eps)
  writer.add_context_length(c.max_position_embeddings)
  writer.add_vocab_size(c.vocab_size)
  names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
           "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
           "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
           "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
  for name, tensor in hf_model.state_dict().items():
    w = tensor.numpy()
    if name == "model.embed_tokens.weight":
      writer.add_tensor("token_embd.weight", w)
    elif name == "model.norm.weight":
      writer.add_tensor("output_norm.weight", w)
    elif name == "lm_head.weight" and not c.tie_word_embeddings:
      writer.add_tensor("output.weight", w)
    elif name.startswith("model.layers."):
      _, _, layer, rest = name.split(".", 3)
      kind = names[rest.rsplit(".", 1)[0]]
      if kind == "attn_q":
        w = llama_cpp_permute(w, c.num_attention_heads)
      elif kind == "attn_k":
        w = llama_cpp_permute(w, c.num_key_value_heads)
      gguf_name = f"blk.{layer}.{kind}.weight"
      if quant_override and gguf_name == quant_override[0]:
        writer.add_tensor(gguf_name, np.zeros((w.shape[0], w.shape[1] // 32 * 18), np.uint8),
                          raw_dtype=quant_override[1])
      else:
        writer.add_tensor(gguf_name, w)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


def test_written_gguf_matches_its_hf_source(tmp_path):
  hf_model = save_tiny_llama(tmp_path / "hf", **CASES["gqa_untied"])
  write_gguf(tmp_path / "tiny.gguf", hf_model)
  config, params = load_gguf_checkpoint(tmp_path / "tiny.gguf", dtype=jnp.float32)
  _, hf_params = load_hf_checkpoint(tmp_path / "hf", dtype=jnp.float32)
  jax.tree.map(np.testing.assert_array_equal, params, hf_params)
  assert config.num_kv_heads == 2 and not config.tie_word_embeddings


def test_gguf_of_another_architecture_is_rejected(tmp_path):
  hf_model = save_tiny_llama(tmp_path / "hf", **CASES["gqa_untied"])
  write_gguf(tmp_path / "gpt2.gguf", hf_model, arch="gpt2")
  with pytest.raises(CheckpointError, match="unsupported GGUF architecture 'gpt2'"):
    load_gguf_checkpoint(tmp_path / "gpt2.gguf")


def test_gguf_with_unsupported_quantisation_is_rejected(tmp_path):
  hf_model = save_tiny_llama(tmp_path / "hf", **CASES["gqa_untied"])
  write_gguf(tmp_path / "iq4.gguf", hf_model,
             quant_override=("blk.1.ffn_up.weight", gguf.GGMLQuantizationType.IQ4_NL))
  with pytest.raises(CheckpointError, match="blk.1.ffn_up.weight is quantised as IQ4_NL"):
    load_gguf_checkpoint(tmp_path / "iq4.gguf")


@pytest.fixture
def hf_dir(tmp_path):
  save_tiny_llama(tmp_path / "ckpt", **CASES["gqa_untied"])
  return tmp_path / "ckpt"


def test_missing_config_is_named(hf_dir):
  (hf_dir / "config.json").unlink()
  with pytest.raises(CheckpointError, match="no config.json in"):
    load_hf_checkpoint(hf_dir)


def test_missing_weights_file_is_named(hf_dir):
  (hf_dir / "model.safetensors").unlink()
  with pytest.raises(CheckpointError, match="no \\*.safetensors files"):
    load_hf_checkpoint(hf_dir)


def test_missing_directory_is_named(tmp_path):
  with pytest.raises(CheckpointError, match="does not exist"):
    load_hf_checkpoint(tmp_path / "nowhere")


def test_missing_shard_is_named(tmp_path):
  model = save_tiny_llama(tmp_path / "unused", **CASES["gqa_untied"])
  model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
  shard = sorted((tmp_path / "sharded").glob("*.safetensors"))[1]
  shard.unlink()
  with pytest.raises(CheckpointError, match=f"names shards that are not in .*{shard.name}"):
    load_hf_checkpoint(tmp_path / "sharded")


def test_missing_tensor_is_named(hf_dir):
  from safetensors.numpy import load_file, save_file
  tensors = load_file(hf_dir / "model.safetensors")
  del tensors["model.layers.2.mlp.up_proj.weight"]
  save_file(tensors, hf_dir / "model.safetensors")
  with pytest.raises(CheckpointError, match="lacks 1 tensors: \\['model.layers.2.mlp.up_proj"):
    load_hf_checkpoint(hf_dir)


def test_mismatched_shape_is_named(hf_dir):
  config = json.loads((hf_dir / "config.json").read_text())
  config["intermediate_size"] = 96
  (hf_dir / "config.json").write_text(json.dumps(config))
  with pytest.raises(CheckpointError, match="gate_proj.weight has shape \\(80, 48\\), config "
                                            "expects \\(96, 48\\)"):
    load_hf_checkpoint(hf_dir)


def test_unsupported_model_type_is_named(hf_dir):
  config = json.loads((hf_dir / "config.json").read_text())
  config["model_type"] = "mistral"
  (hf_dir / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match="unsupported model_type 'mistral'"):
    load_hf_checkpoint(hf_dir)


def test_truncated_safetensors_is_named(hf_dir):
  weights = hf_dir / "model.safetensors"
  weights.write_bytes(weights.read_bytes()[:-100])
  with pytest.raises(CheckpointError, match=f"{re.escape(str(weights))} is truncated or corrupt: "
                                            ".*incomplete metadata"):
    load_hf_checkpoint(hf_dir)


def test_config_missing_a_field_is_named(hf_dir):
  config = json.loads((hf_dir / "config.json").read_text())
  del config["num_attention_heads"]
  (hf_dir / "config.json").write_text(json.dumps(config))
  with pytest.raises(CheckpointError, match=f"{re.escape(str(hf_dir / 'config.json'))}: lacks "
                                            "required fields: num_attention_heads"):
    load_hf_checkpoint(hf_dir)


@pytest.mark.parametrize("file", ["config.json", "model.safetensors.index.json"])
def test_invalid_json_is_named(hf_dir, file):
  (hf_dir / file).write_text('{"weight_map": {')
  with pytest.raises(CheckpointError, match=f"{re.escape(str(hf_dir / file))} is not valid JSON"):
    load_hf_checkpoint(hf_dir)


def test_unreadable_tokenizer_is_named(hf_dir):
  (hf_dir / "tokenizer.json").write_text('{"version": ')
  with pytest.raises(CheckpointError, match=f"cannot load the tokenizer in "
                                            f"{re.escape(str(hf_dir))} .*JSONDecodeError"):
    load_tokenizer(hf_dir)


def write_gguf_header(path, block_count=2, vocab=4, without=()):
  """A llama GGUF of metadata and no tensors: enough for the shape check and the tokenizer.
  `without` leaves out tokenizer fields (model, tokens, token_type, merges)."""
  writer = gguf.GGUFWriter(path, "llama")
  writer.add_block_count(block_count)
  writer.add_embedding_length(64)
  writer.add_feed_forward_length(128)
  writer.add_head_count(4)
  writer.add_head_count_kv(2)
  tokens = ["a", "b", "ab", *(f"t{i}" for i in range(vocab - 3))]
  tokenizer = {"model": lambda: writer.add_tokenizer_model("gpt2"),
               "tokens": lambda: writer.add_token_list(tokens),
               "token_type": lambda: writer.add_token_types([1] * len(tokens)),
               "merges": lambda: writer.add_token_merges(["a b"])}
  for field, add in tokenizer.items():
    if field not in without:
      add()
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


def test_gguf_header_is_parsed_once_per_version_of_the_file(tmp_path):
  path = tmp_path / "header.gguf"
  write_gguf_header(path, vocab=4)
  reader = read_gguf(path)
  assert read_gguf(path) is reader
  write_gguf_header(path, vocab=5)
  assert read_gguf(path) is not reader and config_from_gguf(path).vocab_size == 5


def test_gguf_header_reads_as_the_gguf_package_reads_it(tmp_path):
  """Every field and tensor, of the real SmolLM2 file (Q4_1, 49,152 tokens) and of a
  written F32 one with a second tensor type in it."""
  written = tmp_path / "tiny.gguf"
  write_gguf(written, save_tiny_llama(tmp_path / "hf", **CASES["gqa_untied"]),
             quant_override=("blk.1.ffn_up.weight", gguf.GGMLQuantizationType.Q4_0))
  for path in (smollm2_path(), written):
    ours, reference = read_gguf(path), gguf.GGUFReader(path)
    expected = {key: field.contents() for key, field in reference.fields.items()
                if not key.startswith("GGUF.")}  # the reader's own entries for the header
    assert ours.fields.keys() == expected.keys()
    for key, value in expected.items():
      np.testing.assert_array_equal(ours.fields[key], value, err_msg=key)
    assert [t.name for t in ours.tensors] == [t.name for t in reference.tensors]
    for mine, theirs in zip(ours.tensors, reference.tensors):
      assert mine.tensor_type == theirs.tensor_type and mine.data.dtype == theirs.data.dtype
      np.testing.assert_array_equal(mine.data, theirs.data, err_msg=mine.name)


def test_truncated_gguf_header_is_named(tmp_path):
  path = tmp_path / "smollm2.gguf"
  with smollm2_path().open("rb") as real:
    path.write_bytes(real.read(4096))
  with pytest.raises(CheckpointError, match=f"GGUF file .*{path.name} is truncated or corrupt"):
    load_model("smollm2_135m", str(path))


def test_gguf_truncated_in_its_tensors_is_named(tmp_path):
  write_gguf(tmp_path / "tiny.gguf", save_tiny_llama(tmp_path / "hf", **CASES["gqa_untied"]))
  data = (tmp_path / "tiny.gguf").read_bytes()
  (tmp_path / "tiny.gguf").write_bytes(data[:-100])
  with pytest.raises(CheckpointError, match="GGUF file .*tiny.gguf is truncated or corrupt: "
                                            "ValueError: the file ends at byte"):
    load_gguf_checkpoint(tmp_path / "tiny.gguf")


@pytest.mark.parametrize("field", ["model", "tokens", "token_type", "merges"])
def test_gguf_missing_a_tokenizer_field_is_named(tmp_path, field):
  path = tmp_path / "header.gguf"
  write_gguf_header(path, without=(field,))
  with pytest.raises(CheckpointError, match=f"GGUF file {re.escape(str(path))} lacks the field "
                                            f"tokenizer.ggml.{field}$"):
    load_tokenizer(path)


def test_gguf_of_another_shape_is_refused(tmp_path):
  path = tmp_path / "header.gguf"
  write_gguf_header(path, block_count=2)
  with pytest.raises(CheckpointError, match=f"checkpoint {re.escape(str(path))} does not match "
                                            "the shape smollm2_135m: num_layers 2 != 30, "
                                            "hidden_size 64 != 576, intermediate_size 128 != 1536, "
                                            "num_heads 4 != 9, num_kv_heads 2 != 3, head_dim 16 != "
                                            "64, vocab_size 4 != 49152 "):
    load_model("smollm2_135m", str(path))


def test_hf_checkpoint_of_another_shape_is_refused(hf_dir):
  config_file = re.escape(str(hf_dir / "config.json"))
  with pytest.raises(CheckpointError, match=f"checkpoint {config_file} does not match the shape "
                                            "tiny_llama: num_layers 3 != 4, hidden_size 48 != 64"):
    check_checkpoint("tiny_llama", str(hf_dir))


def test_missing_draft_checkpoint_names_the_draft_flag_before_the_target_loads(tmp_path):
  config = config_lib.base_config()
  config.target, config.synthetic_weights = "tiny_llama", False
  config.checkpoint_dir = str(tmp_path / "target")
  config.methods, config.draft_checkpoint_dir = "draft_model:tiny_llama_draft", str(
      tmp_path / "nowhere")
  write_tiny_llama(tmp_path / "target", hidden_size=64, intermediate_size=128,
                  num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, vocab_size=1024, max_position_embeddings=4096,
                  tie_word_embeddings=False)
  with pytest.raises(CheckpointError, match="--config.draft_checkpoint_dir=/path/to/it") as error:
    pipeline.load_target(config, jnp.float32)
  assert "--config.checkpoint_dir" not in str(error.value)


def test_a_draft_model_needs_no_tokenizer(tmp_path):
  """A draft model reads the target's token ids: its checkpoint may lack a tokenizer."""
  write_tiny_llama(tmp_path, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                   num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=1024,
                   max_position_embeddings=4096, tie_word_embeddings=True)
  assert load_model("tiny_llama_draft", str(tmp_path), dtype=jnp.float32,
                    with_tokenizer=False).tokenizer is None
  with pytest.raises(CheckpointError, match="no tokenizer.json"):
    load_model("tiny_llama_draft", str(tmp_path), dtype=jnp.float32)


def test_kernels_folder_does_not_pose_as_the_hub_package():
  """transformers imports the HF hub package `kernels` where it is installed (and requires
  it since 5.25); ours must not answer, even from the repository root where the folder is
  first on sys.path: there `kernels` is the hub package if installed, else no package that
  transformers takes for it."""
  probe = ("import sys; sys.path.insert(0, '.');"
           "import transformers.activations, kernels, flashspec_jax.kernels.verify as verify;"
           "from transformers.utils.import_utils import is_kernels_available;"
           "print(is_kernels_available(), kernels.__spec__.origin, verify.__file__)")
  result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True,
                          text=True, env=os.environ | {"TRANSFORMERS_VERBOSITY": "error"})
  assert result.returncode == 0, result.stderr[-2000:]
  available, origin, verify = result.stdout.split()
  try:
    hub = importlib.metadata.distribution("kernels")
  except importlib.metadata.PackageNotFoundError:
    hub = None
  if hub is None:
    assert (available, origin) == ("False", "None")  # our namespace portion, ignored
  else:
    assert available == "True"
    assert pathlib.Path(origin) == pathlib.Path(hub.locate_file("kernels/__init__.py"))
  assert pathlib.Path(verify).resolve() == REPO / "kernels" / "verify.py"
