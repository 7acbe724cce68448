"""Every experiment documents itself and runs in its :tiny form; every notebook executes."""

import ast
import importlib.util
import json
import pathlib

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


def test_unknown_config_argument_is_refused():
  with pytest.raises(ValueError, match="unknown config argument 'huge'"):
    get_config("default", "huge")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path):
  notebook = nbformat.read(path, as_version=4)
  NotebookClient(notebook, timeout=900, kernel_name="python3",
                 resources={"metadata": {"path": str(path.parent)}}).execute()
