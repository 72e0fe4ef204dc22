"""The typed training configuration (training/config.py) and the learning-rate schedules."""

import dataclasses
import glob
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import CONFIG_DIR, REPO_ROOT, compose, subprocess_env

from synthseg_jax.training import config
from synthseg_jax.training import step as st

MODELS = sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(CONFIG_DIR, "model", "*.yaml")))


@pytest.mark.parametrize("model", MODELS)
def test_every_model_config_composes_and_checks(model):
    cfg = config.load([f"model={model}"])
    assert cfg.model.name == model
    cosine = ("cpu_2.0_16", "cpu_2.0_16_restart", "pooled_batch2", "pooled_cosine",
              "qc_cpu_2.0")
    assert cfg.optim.schedule == ("warmup_cosine" if model in cosine else "constant")
    assert cfg.train.steps > 0 and isinstance(cfg.train.held_out, tuple)


def test_the_yaml_is_the_only_source_of_defaults():
    for section in (config.TrainSection, config.ValidationSection, config.OptimConfig):
        with_default = [f.name for f in dataclasses.fields(section)
                        if f.default is not dataclasses.MISSING
                        or f.default_factory is not dataclasses.MISSING]
        assert not with_default, (section.__name__, with_default)
    from omegaconf import OmegaConf
    raw = OmegaConf.to_container(compose(["model=tiny"]), resolve=True)
    del raw["validation"]["n_per_map"]
    with pytest.raises(config.ConfigError, match=r"missing key\(s\) validation.n_per_map"):
        config.TrainConfig.from_mapping(raw)


@pytest.mark.parametrize("overrides,message", [
    (["+train.stepz=3"], r"unknown key\(s\) train.stepz"),
    (["train.steps=abc"], r"train.steps must be an integer, got 'abc'"),
    (["train.steps=2.5"], r"train.steps must be an integer"),
    (["train.steps=0"], r"train.steps must be > 0"),
    (["train.quiet=maybe"], r"train.quiet must be true or false"),
    (["train.resume=sometimes"], r"train.resume must be one of auto, never, must"),
    (["optim.lr=fast"], r"optim.lr must be a number"),
    (["optim.schedule=cosine"], r"optim.schedule must be one of constant, time_decay"),
    (["optim.decay=0.1"], r"optim.decay is used by optim.schedule=time_decay only"),
    (["optim.schedule=step", "optim.boundaries=[300,200]"], r"optim.boundaries must be increasing"),
    (["train.held_out=training_seg_19"], r"train.held_out must be a list"),
    (["+model.nb_featurs=3"], r"unknown model parameter\(s\): nb_featurs"),
    (["+generator.flip=false"], r"unknown generator parameter\(s\): flip"),
], ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_bad_keys_are_one_line_errors(overrides, message):
    with pytest.raises(config.ConfigError, match=message) as err:
        config.load(["model=tiny"] + overrides)
    assert "\n" not in str(err.value)


def test_train_py_reports_a_bad_key_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "train.py"), "model=tiny",
                           "train.steps=many", f"train.out_dir={tmp_path / 'run'}"],
                          cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == \
        "train.py: train.steps must be an integer, got 'many'", proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_cpu_model_config_prints(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "train.py"), "model=cpu_2.0",
                           "--cfg", "job"], cwd=tmp_path, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "name: cpu_2.0" in proc.stdout and "schedule: constant" in proc.stdout
    assert not os.listdir(tmp_path)


def test_schedules():
    lr = st.learning_rate("time_decay", 1e-3, 100, decay=0.5)
    assert float(lr(0)) == pytest.approx(1e-3) and float(lr(2)) == pytest.approx(5e-4)
    cos = st.learning_rate("warmup_cosine", 1e-3, 110, warmup_steps=10, end_lr=1e-5)
    assert float(cos(0)) == 0.0 and float(cos(5)) == pytest.approx(5e-4)
    assert float(cos(10)) == pytest.approx(1e-3) and float(cos(110)) == pytest.approx(1e-5)
    steps = st.learning_rate("step", 1e-3, 100, boundaries=(10, 20), factor=0.1)
    assert [float(steps(t)) for t in (9, 10, 25)] == pytest.approx([1e-3, 1e-4, 1e-5])
    assert st.learning_rate("constant", 3e-4, 100)(12345) == 3e-4


def test_the_rate_follows_the_global_step_through_a_fresh_adam():
    """A fresh Adam (the Dice phase) at global step 40 takes a step of schedule(40), not
    schedule(0); a constant rate keeps optax.adam's state layout (old checkpoints restore)."""
    params = {"w": jnp.ones(3)}
    grads = {"w": jnp.array([1.0, -2.0, 0.5])}
    tx = st.make_optimizer(lambda t: 1e-3 * (t + 1), eps=1e-12)
    updates, _ = tx.update(grads, tx.init(params), params, step=jnp.int32(40))
    np.testing.assert_allclose(np.abs(updates["w"]), 41e-3, rtol=1e-5)   # Adam's first step: lr
    constant = st.make_optimizer(3e-4)
    assert jax.tree_util.tree_structure(constant.init(params)) == \
        jax.tree_util.tree_structure(optax.adam(3e-4).init(params))
    mine, _ = constant.update(grads, constant.init(params), params, step=jnp.int32(7))
    theirs, _ = optax.adam(3e-4, eps=1e-7).update(grads, optax.adam(3e-4).init(params), params)
    np.testing.assert_array_equal(mine["w"], theirs["w"])
