"""run.py and the experiment runner: defaults, errors before work, results files."""

import json
import pathlib
import subprocess
import sys

import pytest
from test_model_parity import save_tiny_llama

from flashspec_jax import config as config_lib
from flashspec_jax import runner
from flashspec_jax.loading.gguf import smollm2_path
from flashspec_jax.loading.tokenizer import load_tokenizer

REPO = pathlib.Path(__file__).resolve().parents[1]


def run_cli(*flags):
  return subprocess.run([sys.executable, "run.py", *flags], cwd=REPO, capture_output=True,
                        text=True, timeout=300)


def small_config(tmp_path, **overrides):
  config = config_lib.base_config()
  config.experiment = "test_run"
  config.results_dir = str(tmp_path / "results")
  config.prompts.sets = "chat"
  config.sampling.max_new_tokens = 4
  config.print_text = False
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


def test_unknown_config_field_fails_naming_it():
  result = run_cli("--config.sampling.temprature=1")
  assert result.returncode != 0
  assert "temprature" in result.stderr and 'Did you mean "temperature"' in result.stderr


def test_missing_weights_say_where_they_were_looked_for():
  result = run_cli("--config=experiments/llama3_8b.py")
  assert result.returncode == 1
  assert f"looked in {REPO / 'checkpoints' / 'llama3_8b'}" in result.stderr
  assert "--config.checkpoint_dir" in result.stderr and "synthetic_weights" in result.stderr


@pytest.mark.parametrize("field, value, message", [
    ("sampling.top_p", 1.5, "config.sampling.top_p = 1.5 is invalid"),
    ("methods", "ar,warp_drive", "config.methods = 'ar,warp_drive' is invalid"),
    ("prompts.sets", "chat,poetry", "config.prompts.sets = 'chat,poetry' is invalid"),
    ("verify_impl", "cuda", "config.verify_impl = 'cuda' is invalid"),
    ("sampling.gamma", 0, "config.sampling.gamma = 0 is invalid"),
])
def test_invalid_values_name_the_field(tmp_path, field, value, message):
  with pytest.raises(ValueError, match=message.replace("(", "\\(").replace(")", "\\)")):
    runner.run(small_config(tmp_path, **{field: value}))


def test_unwritable_results_directory_fails_before_any_work(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  with pytest.raises(ValueError, match="cannot create the results directory"):
    runner.run(small_config(tmp_path, results_dir=str(blocker / "results")))


def test_synthetic_run_is_labelled_and_writes_results(tmp_path, capsys):
  out = runner.run(small_config(tmp_path, target="tiny_llama", synthetic_weights=True,
                                methods="ar,layer_skip:2"))
  assert "SYNTHETIC WEIGHTS" in capsys.readouterr().out
  saved = json.loads(pathlib.Path(out["path"]).read_text())
  assert saved["synthetic_weights"] is True
  assert set(saved["summaries"]) == {"ar", "layer_skip:2"}
  assert {"command", "git_sha", "git_dirty", "device", "jax", "date"} <= set(saved["environment"])
  assert [r["new_tokens"] for r in saved["records"]] == [4, 4]
  assert pathlib.Path(out["path"]).with_suffix(".csv").exists()


def test_checkpoint_dir_is_loaded(tmp_path):
  """An HF directory (a tiny random Llama with SmolLM2's tokenizer) runs end to end."""
  directory = tmp_path / "ckpt"
  save_tiny_llama(directory, vocab_size=49152, tie_word_embeddings=True, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=8192)
  load_tokenizer(smollm2_path()).save_pretrained(directory)
  out = runner.run(small_config(tmp_path, target="llama3_8b", checkpoint_dir=str(directory)))
  assert out["records"][0]["new_tokens"] >= 1
  assert isinstance(out["records"][0]["text"], str)


def test_readme_results_section_is_generated_from_results():
  from flashspec_jax import report
  assert report.main(["--check"]) == 0, "run python -m flashspec_jax.report"
