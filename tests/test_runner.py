"""run.py and the experiment runner: defaults, errors before work, results files."""

import dataclasses
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import with_fields, write_tiny_llama

from flashspec_jax import config as config_lib
from flashspec_jax import cli, engine, executables, pipeline, runner
from flashspec_jax.loading import CheckpointError, load_model
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
  return with_fields(config, **overrides)


def message_lines(stderr: str) -> list[str]:
  """stderr without absl's log lines ("I1130 14:16:49.382413 ...") and blank lines."""
  return [line for line in stderr.splitlines()
          if line.strip() and not re.match(r"[IWEF]\d{4} \d\d:\d\d:\d\d", line)]


def test_a_batch_holds_one_prompt_set():
  requests = [pipeline.Request(f"{kind}/{i}", kind, [1]) for kind, count in
              (("chat", 3), ("code", 1), ("edit", 2)) for i in range(count)]
  assert [[r.id for r in batch] for batch in runner.batched(requests, 2)] == [
      ["chat/0", "chat/1"], ["chat/2"], ["code/0"], ["edit/0", "edit/1"]]


def test_unknown_config_field_fails_naming_it():
  result = run_cli("--config.sampling.temprature=1")
  assert result.returncode != 0
  [line] = message_lines(result.stderr)
  assert line == ('error: --config.sampling.temprature: no such config field '
                  '(did you mean "temperature"?)')


@pytest.mark.parametrize("flag, names", [
    ("--config.nonexistent=1", "--config.nonexistent: no such config field"),
    ("--config.prompt.num_per_set=1",
     "--config.prompt.num_per_set: no config group 'prompt' (did you mean \"prompts\"?)"),
    ("--config.sampling.gamma=abc", "--config.sampling.gamma=abc"),
    ("--config=experiments/no_such_experiment.py", "experiments/no_such_experiment.py"),
    ("--config=experiments/default.py:small", "unknown config argument 'small'"),
    ("stray_argument", "unexpected arguments ['stray_argument']"),
])
def test_bad_flags_fail_in_two_lines_at_most(flag, names):
  result = run_cli(flag)
  assert result.returncode != 0 and names in result.stderr
  assert "Traceback" not in result.stderr and len(message_lines(result.stderr)) <= 2


def test_a_bugs_missing_config_key_stays_a_bug(monkeypatch):
  """A KeyError that ml_collections raises for code's own lookup, with no --config flag
  running through that group, is not blamed on the user's flags."""
  with pytest.raises(KeyError) as error:
    config_lib.base_config()["trian"]
  monkeypatch.setattr(sys, "argv", ["run.py", "--config.sampling.gamma=3"])
  message = cli.describe(error.value)
  assert message.startswith("KeyError: ") and "--verbose" in message
  monkeypatch.setattr(sys, "argv", ["run.py", "--config.trian.steps=3"])
  assert cli.describe(error.value).startswith("--config.trian.steps: no config group 'trian'")


@pytest.mark.parametrize("assignment, flags, names", [
    ("config.sampling.temprature = 0.5", (), "'temprature' (did you mean \"temperature\"?)"),
    # A valid flag whose last part is the file's missing field does not take the blame.
    ("config.train.seed = 1", ("--config.prompts.seed=3",), "'seed'"),
])
def test_a_misspelt_field_in_an_experiment_file_is_refused(tmp_path, assignment, flags, names):
  experiment = tmp_path / "typo.py"
  experiment.write_text("from flashspec_jax.config import base_config\n\n\n"
                        "def get_config():\n  config = base_config()\n"
                        f"  {assignment}\n  return config\n")
  result = run_cli(f"--config={experiment}", *flags)
  assert result.returncode == 1 and "Traceback" not in result.stderr
  [line] = message_lines(result.stderr)
  assert line == f"error: {experiment}:6: no config field {names}"


def test_errors_are_one_line_and_verbose_adds_the_traceback():
  result = run_cli("--config.sampling.top_p=1.5")
  assert result.returncode == 1 and "Traceback" not in result.stderr
  [line] = message_lines(result.stderr)
  assert line.startswith("error: config.sampling.top_p = 1.5 is invalid")
  verbose = run_cli("--config.sampling.top_p=1.5", "--verbose")
  assert verbose.returncode == 1 and "Traceback" in verbose.stderr
  assert "config.sampling.top_p = 1.5 is invalid" in verbose.stderr.splitlines()[-1]


def test_a_benchmark_reports_bad_input_as_run_py_does():
  bench = [sys.executable, "-m", "flashspec_jax.bench.idle_arms", "--target=no_such_shape"]
  result = subprocess.run(bench, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1 and "Traceback" not in result.stderr
  [line] = message_lines(result.stderr)
  assert line.startswith("error: unknown model config 'no_such_shape'; known: [")
  verbose = subprocess.run([*bench, "--verbose"], cwd=REPO, capture_output=True, text=True,
                           timeout=300)
  assert verbose.returncode == 1 and "Traceback" in verbose.stderr


@pytest.mark.parametrize("wait_for, delay", [
    (None, 1.0),  # during the imports
    ("target:", 0.0),  # while the program compiles
])
def test_ctrl_c_exits_130_in_one_line_leaving_no_files(tmp_path, wait_for, delay):
  results_dir = tmp_path / "results"
  # An empty compilation cache, so that the run is still compiling when the signal comes.
  env = os.environ | {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla")}
  process = subprocess.Popen(
      [sys.executable, "-u", "run.py", "--config.target=tiny_llama",
       "--config.synthetic_weights=True", "--config.prompts.sets=chat",
       "--config.sampling.max_new_tokens=4", f"--config.results_dir={results_dir}"],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  if wait_for:
    while not (line := process.stdout.readline()).startswith(wait_for):
      assert line, f"run.py ended before printing {wait_for!r}"
  time.sleep(delay)
  sent = time.monotonic()
  process.send_signal(signal.SIGINT)
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == 130, stderr
  assert stderr.endswith("interrupted\n") and "Traceback" not in stderr
  assert len(message_lines(stderr)) <= 2
  assert [path for path in results_dir.rglob("*") if path.is_file()] == []
  assert time.monotonic() - sent < 5  # not held back until an import or a compile ends


def test_ctrl_c_under_a_progress_bar_says_so_on_a_line_of_its_own():
  code = ("import os, signal, time, tqdm\n"
          "from flashspec_jax import cli\n"
          "cli.exit_on_interrupt()\n"
          "bar = tqdm.tqdm(total=3, desc='ar')\n"
          "os.kill(os.getpid(), signal.SIGINT)\n"
          "time.sleep(60)\n")
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 130
  bar, word = result.stderr.splitlines()[-2:]
  assert bar.strip().startswith("ar:   0%") and word == "interrupted"


def test_ctrl_c_during_a_write_removes_its_temporary_file(tmp_path):
  code = ("import os, signal, sys, time\n"
          "from flashspec_jax import cli, results\n"
          "cli.exit_on_interrupt()\n"
          "with results.open_atomic(sys.argv[1]) as f:\n"
          "  f.write('half of it')\n"
          "  f.flush()\n"
          "  os.kill(os.getpid(), signal.SIGINT)\n"
          "  time.sleep(60)\n")
  result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out.json")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 130 and result.stderr.endswith("interrupted\n")
  assert list(tmp_path.iterdir()) == []


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


@pytest.fixture
def tiny_smollm2_dir(tmp_path):
  """An HF directory of the shape tiny_smollm2: a tiny random Llama with SmolLM2's vocabulary."""
  directory = tmp_path / "ckpt"
  write_tiny_llama(directory, vocab_size=49152, tie_word_embeddings=True, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=8192)
  return directory


def test_checkpoint_dir_is_loaded(tmp_path, tiny_smollm2_dir):
  """An HF directory (a tiny random Llama with SmolLM2's tokenizer) runs end to end."""
  load_tokenizer(smollm2_path()).save_pretrained(tiny_smollm2_dir)
  out = runner.run(small_config(tmp_path, target="tiny_smollm2",
                                checkpoint_dir=str(tiny_smollm2_dir)))
  assert out["records"][0]["new_tokens"] >= 1
  assert isinstance(out["records"][0]["text"], str)


def test_checkpoint_of_another_shape_is_refused(tmp_path, tiny_smollm2_dir):
  with pytest.raises(CheckpointError, match="config.json does not match the shape llama3_8b: "
                                            "num_layers 3 != 32, hidden_size 48 != 4096"):
    runner.run(small_config(tmp_path, target="llama3_8b", checkpoint_dir=str(tiny_smollm2_dir)))


def test_readme_results_section_is_generated_from_results():
  from flashspec_jax import report
  assert report.main(["--check"]) == 0, "run python -m flashspec_jax.report"


def test_programs_compiled_ahead_side_by_side_run_as_compiled_alone(tmp_path, monkeypatch):
  monkeypatch.setattr(executables, "_path", lambda key: None)  # both Setups compile
  config = small_config(tmp_path, target="tiny_llama", synthetic_weights=True,
                        methods="ar,ngram:2,layer_skip:2")
  model = load_model(config.target, synthetic=True, dtype=jnp.float32, seed=config.seed)
  methods, params = pipeline.build_methods(config, model, jnp.float32)
  batch = runner.build_requests(config, model)
  ahead, alone = (pipeline.make_setup(config, model, params, jnp.float32) for _ in range(2))
  jobs = [(method, batch) for method in methods] * 2  # a program twice, warmed once
  pipeline.compile_ahead(jobs, ahead, threads=2)
  assert len(ahead.programs) == len(methods)
  runs = []
  counted = {program: (lambda *args, compiled=compiled, program=program:
                       runs.append(program) or compiled(*args))
             for program, compiled in ahead.programs.items()}
  pipeline.warm_up(jobs, dataclasses.replace(ahead, programs=counted))
  assert sorted(map(str, runs)) == sorted(map(str, ahead.programs))  # each once
  for method in methods:
    held = pipeline.compile_and_run(method, ahead, batch, jax.random.key(0))
    compiled = pipeline.compile_and_run(method, alone, batch, jax.random.key(0))
    assert held.lower_seconds == held.compile_seconds == 0 < compiled.lower_seconds
    np.testing.assert_array_equal(held.output.tokens, compiled.output.tokens)


def test_replies_equal_to_ar_are_counted_per_method():
  records = [dict(method=m, id=i, text=t) for m, i, t in [
      ("ar", "a", "x"), ("ar", "b", "y"), ("ngram:3", "a", "x"), ("ngram:3", "b", "z")]]
  assert runner.replies_equal_to_ar(records) == {"ar": 1.0, "ngram:3": 0.5}


@pytest.mark.parametrize("on_gpu", [False, True])
def test_ngram_arms_share_a_step_body_only_on_a_gpu(tmp_path, monkeypatch, on_gpu):
  """On a GPU a wider verify pass costs about what a narrow one does, so the n-gram
  arms step in one body of their widest gamma; on a CPU it costs time, and each steps
  alone."""
  monkeypatch.setattr(pipeline.environment, "on_gpu", lambda: on_gpu)
  config = small_config(tmp_path, target="tiny_llama", synthetic_weights=True,
                        methods="bandit:kl_ucb", arms="ngram:3@2,layer_skip:2,ngram:3@4,ar")
  config.bandit.costs = "1,1,1,1"
  model = load_model(config.target, synthetic=True, dtype=jnp.float32, seed=config.seed)
  (method,), _ = pipeline.build_methods(config, model, jnp.float32)
  shared = ((0, 2), (1,), (3,)) if on_gpu else ((0,), (1,), (2,), (3,))
  assert engine.step_bodies(method.arms) == shared
