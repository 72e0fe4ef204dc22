"""This folder, installed as the package ``synthseg_jax.default_model`` (``pyproject.toml`` maps it),
so that a wheel carries the shipped default model: ``synthseg_jax.package_data`` finds it there.
"""
