"""Pallas GPU kernels, each beside its pure-jnp reference.

Installed as `flashspec_jax.kernels` (see setup.py): a top-level module
named `kernels` would pose as the Hugging Face hub package that transformers
probes for.
"""
