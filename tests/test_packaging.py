"""What `pip install .` ships works outside the repository; test modules stand alone."""

import ast
import pathlib
import shutil
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
# What the build reads. Building from a copy keeps build/ out of the repository, and a
# stale build/ from an earlier build out of the wheel.
BUILD_INPUTS = ("pyproject.toml", "setup.py", "README.md", "requirements.txt", "flashspec_jax",
                "kernels", "configs")

# Run as `python -I -S` outside the repository: without the site module the editable
# install's .pth finder never loads, so flashspec_jax can only come from the target.
IMPORT_EVERYTHING = """
import importlib, pathlib, pkgutil, sys
target, *dependencies = sys.argv[1:]
sys.path[:0] = [target, *dependencies]
from absl import flags
import flashspec_jax
assert pathlib.Path(flashspec_jax.__file__).is_relative_to(target), flashspec_jax.__file__
# The bench scripts define absl flags on import, some of the same name as separate
# programs may, so each one's flags are forgotten before the next is imported.
predefined = set(flags.FLAGS)
# walk_packages passes over namespace packages (no __init__.py), such as the kernels.
import flashspec_jax.kernels
assert all(pathlib.Path(p).is_relative_to(target) for p in flashspec_jax.kernels.__path__)
for package in (flashspec_jax, flashspec_jax.kernels):
  for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
    importlib.import_module(module.name)
    print(module.name)
    for name in set(flags.FLAGS) - predefined:
      delattr(flags.FLAGS, name)
from flashspec_jax.models.config import model_config
assert model_config("tiny_llama").num_layers >= 1
from flashspec_jax.loading.eagle import shipped_path
weights = shipped_path("smollm2")  # the shipped feature drafter is package data
assert weights.is_file() and weights.is_relative_to(target), weights
"""


def source_modules() -> set[str]:
  """Dotted names of the modules in the source tree, kernels/ under flashspec_jax.kernels."""
  names = set()
  for root, package in ((REPO / "flashspec_jax", "flashspec_jax"),
                        (REPO / "kernels", "flashspec_jax.kernels")):
    for path in root.rglob("*.py"):
      parts = (package, *path.relative_to(root).with_suffix("").parts)
      names.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
  return names - {"flashspec_jax"}


def test_installed_package_imports_every_module_outside_the_repo(tmp_path):
  source, target = tmp_path / "source", tmp_path / "target"
  source.mkdir()
  for name in BUILD_INPUTS:
    if (REPO / name).is_dir():
      shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    else:
      shutil.copy(REPO / name, source)
  build = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                          "--no-build-isolation", "--target", str(target), str(source)],
                         capture_output=True, text=True)
  assert build.returncode == 0, build.stderr
  installed = {p.name for p in target.iterdir() if not p.name.endswith(".dist-info")}
  assert installed == {"flashspec_jax"}, "only flashspec_jax may be installed at the top level"

  # Dependencies come from this process's path, less the folders that hold the sources.
  dependencies = [path for path in sys.path
                  if path and pathlib.Path(path).resolve() not in (REPO, REPO / "tests")]
  result = subprocess.run([sys.executable, "-I", "-S", "-c", IMPORT_EVERYTHING, str(target),
                           *dependencies], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stderr
  assert set(result.stdout.split()) == source_modules()


def test_no_test_module_imports_another():
  """A test module's skip (e.g. importorskip("torch")) would skip its importers too."""
  test_modules = {path.stem for path in REPO.glob("tests/test_*.py")}
  offenders = []
  for path in sorted(REPO.glob("tests/test_*.py")):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom) and not node.level:
        names = [node.module]
      else:
        continue
      offenders += [f"{path.name}: {name}" for name in names
                    if name.split(".")[0] in test_modules]
  assert not offenders, f"move shared helpers to tests/helpers.py or conftest.py: {offenders}"
