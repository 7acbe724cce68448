"""Which packages `pip install .` ships; the metadata is in pyproject.toml.

Subpackages are discovered, so a new one cannot be left out of a non-editable
install. Two top-level folders are installed inside the package:
  * `kernels/` (Pallas GPU kernels, each beside its jnp reference) as
    `flashspec_jax.kernels`, which in the source tree is a link to it. It has no
    `__init__.py`: from the repository root, where it is on sys.path, a regular
    package named `kernels` would shadow the Hugging Face hub package of that
    name, which transformers imports (a dependency since transformers 5.25); a
    namespace portion never does;
  * `configs/` (the shipped model shapes) as `flashspec_jax.configs`, read by
    `flashspec_jax.models.config`.
The shipped feature drafters (eagle:<name>: weights and model card) are the data of
folders under `flashspec_jax/weights/`, named as packages of their own: setuptools
warns at every install about a folder inside a package that is not one.
"""

import pathlib

import setuptools

MAPPED = {"flashspec_jax.kernels": "kernels", "flashspec_jax.configs": "configs"}
DRAFTERS = [f"flashspec_jax.weights.{folder.name}" for folder in sorted(
    (pathlib.Path(__file__).parent / "flashspec_jax" / "weights").iterdir())
            if (folder / "model.safetensors").is_file()]

setuptools.setup(
    packages=(setuptools.find_packages(include=["flashspec_jax", "flashspec_jax.*"])
              + list(MAPPED) + ["flashspec_jax.weights", *DRAFTERS]),
    package_dir=MAPPED,
    package_data={"flashspec_jax.configs": ["*.json"],
                  **{drafter: ["model.safetensors", "MODEL_CARD.md"] for drafter in DRAFTERS}},
)
