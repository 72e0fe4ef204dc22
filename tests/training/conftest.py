"""Helpers of the training tests: tiny configs composed from configs/train.yaml, small label banks.

XLA's persistent compilation cache is switched on for these tests (their cost is compilation:
tiny networks on 32^3 crops run in milliseconds but compile in seconds); set
SYNTHSEG_TEST_XLA_CACHE='' to switch it off.
"""

import os

import jax
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG_DIR = os.path.join(REPO_ROOT, "configs")
DATA = os.environ.get("SYNTHSEG_SHARED_DATA", os.path.join(REPO_ROOT, "..", "shared", "data", "synthseg"))
MAPS = os.path.join(DATA, "training_label_maps")
XLA_CACHE = os.environ.get("SYNTHSEG_TEST_XLA_CACHE",
                           os.path.join(os.path.expanduser("~"), ".cache", "synthseg_jax", "xla-tests"))

if XLA_CACHE:
    jax.config.update("jax_compilation_cache_dir", XLA_CACHE)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)

needs_maps = pytest.mark.skipif(not os.path.isdir(MAPS), reason="SynthSeg training label maps not found")

# A fast run: tiny network, 32^3 crops at 4 mm, 2 training maps, 1 held-out map, no MNI.
TINY = ["model=tiny", "train.held_out=[training_seg_20]", "train.quiet=true",
        "train.async_checkpointing=false", "train.compilation_cache=null"]


def compose(overrides=()):
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return hydra_compose(config_name="train", overrides=list(overrides))


def subprocess_env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    if XLA_CACHE:
        env.setdefault("SYNTHSEG_TEST_XLA_CACHE", XLA_CACHE)
    env.update(extra)
    return env
