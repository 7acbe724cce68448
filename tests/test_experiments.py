"""Every experiment documents itself and runs in its :tiny form; every notebook executes;
every run.py command the docs give parses and passes the config's checks."""

import ast
import importlib.util
import json
import pathlib
import re
import shlex
import sys

from absl import flags
from ml_collections import config_flags
import nbformat
import pytest
import safetensors.numpy
from nbclient import NotebookClient

from flashspec_jax import config as config_lib
from flashspec_jax import runner
from flashspec_jax.loading import eagle
from flashspec_jax.models.config import model_config

REPO = pathlib.Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p.stem for p in (REPO / "experiments").glob("*.py"))
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def get_config(name, arg=None):
  spec = importlib.util.spec_from_file_location(name, REPO / "experiments" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_docstring_gives_command_runtime_and_result(name):
  doc = ast.get_docstring(ast.parse((REPO / "experiments" / f"{name}.py").read_text()))
  command = "python run.py" if name == "default" else f"python run.py --config=experiments/{name}.py"
  assert command in doc and f"experiments/{name}.py:tiny" in doc and "Expected" in doc


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_tiny_variant_runs_and_writes_results(name, tmp_path):
  config = get_config(name, "tiny")
  config.results_dir = str(tmp_path)
  out = runner.run(config)
  saved = json.loads(pathlib.Path(out["path"]).read_text())
  assert saved["environment"]["git_sha"] and saved["config"]["experiment"] == config.experiment
  if config.kind == "train_drafter":  # a few steps, and the loss falls
    losses = [point["loss"] for point in saved["curve"]]
    assert saved["steps"] == config.train.steps and max(losses[-3:]) < losses[0], losses
    for split in ("train", "validation"):
      assert sum(saved["sources"][split].values()) == saved["sequences"][split] > 0
    ids = safetensors.numpy.load_file(out["output"]).get("vocabulary.ids")
    assert (0 if ids is None else len(ids)) == config.train.draft_vocabulary
    assert (eagle.feature_layers(out["output"], model_config(config.target))
            == config_lib.feature_layers(config))


def documented_commands() -> list[tuple[str, str]]:
  """(source, command) for each `python run.py ...` in the README (its generated results
  section aside: those are the commands that made each file, as they were), the docs,
  the model card and the experiments' docstrings; templates with <placeholders> aside."""
  readme = (REPO / "README.md").read_text()
  begin, end = readme.index("<!-- results:begin -->"), readme.index("<!-- results:end -->")
  texts = {"README.md": readme[:begin] + readme[end:]}
  for path in [*(REPO / "docs").glob("*.md"),
               REPO / "flashspec_jax" / "weights" / "eagle_smollm2" / "MODEL_CARD.md"]:
    texts[str(path.relative_to(REPO))] = path.read_text()
  for name in EXPERIMENTS:
    path = REPO / "experiments" / f"{name}.py"
    texts[f"experiments/{name}.py"] = ast.get_docstring(ast.parse(path.read_text()))
  found = []
  for source, text in texts.items():
    text = text.replace("\\\n", " ")  # a shell line continuation
    # In backticks, perhaps wrapped over lines; or a line of its own, perhaps continued.
    inline = [m.group(1) for m in re.finditer(r"`(python run\.py[^`]*)`", text)]
    lines = re.findall(r"^\s*(python run\.py[^`\n]*(?:\n\s+--[^`\n]*)*)", text, re.M)
    for command in inline + [line.split(" #")[0] for line in lines]:
      if "<" not in command:
        found.append((source, " ".join(command.split())))
  return found


def test_the_docs_give_commands_from_every_kind_of_source():
  sources = {source.partition("/")[0] for source, _ in documented_commands()}
  assert {"README.md", "experiments", "flashspec_jax"} <= sources
  assert len(documented_commands()) >= 50


@pytest.mark.parametrize("source,command", documented_commands())
def test_documented_command_parses_and_validates(source, command, monkeypatch):
  args = shlex.split(command)[2:]
  if not any(arg.startswith("--config=") for arg in args):
    args.insert(0, "--config=experiments/default.py")
  # ml_collections reads a config's --config.<field> overrides from sys.argv.
  monkeypatch.setattr(sys, "argv", ["run.py", *args])
  monkeypatch.chdir(REPO)
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=flag_values, lock_config=True)
  assert flag_values(sys.argv) == ["run.py"]  # every argument was a flag it knows
  config_lib.validate(flag_values.config)


def test_unknown_config_argument_is_refused():
  with pytest.raises(ValueError, match="unknown config argument 'huge'"):
    get_config("default", "huge")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path):
  notebook = nbformat.read(path, as_version=4)
  NotebookClient(notebook, timeout=900, kernel_name="python3",
                 resources={"metadata": {"path": str(path.parent)}}).execute()
