"""Hydra configs, installed as the package ``synthseg_jax.configs`` (``pyproject.toml`` maps it), so
that an installed wheel finds them: ``synthseg_jax.package_data.config_dir``.
"""
