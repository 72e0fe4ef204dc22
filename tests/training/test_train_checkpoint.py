"""orbax checkpoints: an interrupted and resumed run equals an uninterrupted one; export to Keras
.h5 and to a models folder."""

import csv
import os
import shutil
import signal

import jax
import numpy as np
import pytest
from conftest import TINY, compose, needs_maps

from synthseg_jax.labels import LabelTables
from synthseg_jax.training import checkpoint as ckpt
from synthseg_jax.training.loop import Run, run
from synthseg_jax.training.step import Trainer
from synthseg_jax.weights.keras_h5 import load_keras_h5

pytestmark = needs_maps


def losses(run_dir):
    with open(os.path.join(run_dir, "metrics.csv")) as fh:
        return [(int(r["step"]), r["phase"], r["loss"]) for r in csv.DictReader(fh)]


def tiny(out, *extra):
    return compose(TINY + [f"train.out_dir={out}", "validation.every=0"] + list(extra))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    run(tiny(out, "train.steps=4"))
    return str(out)


def test_resume_equals_uninterrupted(uninterrupted, tmp_path):
    out = tmp_path / "resumed"
    run(tiny(out, "train.steps=3"))                   # checkpoints at steps 2 and 3
    shutil.rmtree(out / "checkpoints" / "3")         # "killed" after step 3, before its checkpoint
    assert len(losses(out)) == 3
    summary = run(tiny(out, "train.steps=4"))        # resumes from step 2 (warm-up over: Dice)
    assert summary["steps"] == 4
    assert losses(out) == losses(uninterrupted)      # same steps, phases and losses (9 digits)
    a, _ = ckpt.load_model(uninterrupted)
    b, _ = ckpt.load_model(str(out))
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
def test_a_signal_during_a_step_saves_that_step_and_resumes(uninterrupted, tmp_path, monkeypatch,
                                                            capsys, sig):
    """SIGINT or a scheduler's SIGTERM arriving during step 3 lets that step finish, then exits
    with 130 and a message (no traceback), with a checkpoint of step 3 although the cadence had
    none due; resuming gives the uninterrupted run's losses. (test_train_signals.py sends the
    signals to a real train.py process.)"""
    out = tmp_path / sig.name
    real_step = Trainer.step
    calls = []

    def signalled_during_third(self, *args):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), sig)
        return real_step(self, *args)

    monkeypatch.setattr(Trainer, "step", signalled_during_third)
    with pytest.raises(SystemExit) as stop:
        run(tiny(out, "train.steps=4", "train.checkpoint_every=100"))
    assert stop.value.code == 130
    assert "interrupted: checkpoint at step 3" in capsys.readouterr().out
    assert sorted(os.listdir(out / "checkpoints")) == ["3"]
    assert len(losses(out)) == 3
    monkeypatch.setattr(Trainer, "step", real_step)
    run(tiny(out, "train.steps=4", "train.checkpoint_every=100"))
    assert losses(out) == losses(uninterrupted)


def test_the_schedule_follows_the_global_step_across_the_dice_switch_and_a_resume(tmp_path):
    """time_decay over 4 steps with the Dice phase from step 2 (a fresh Adam): the rate of step t
    is lr / (1 + decay t) throughout, resumed or not, and the resumed run's losses are the same."""
    sched = ["optim.schedule=time_decay", "optim.decay=0.5", "optim.lr=1e-3"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    run(tiny(full, "train.steps=4", *sched))
    run(tiny(cut, "train.steps=3", *sched))
    shutil.rmtree(cut / "checkpoints" / "3")
    run(tiny(cut, "train.steps=4", *sched))
    for folder in (full, cut):
        with open(folder / "metrics.csv") as fh:
            rates = [float(r["lr"]) for r in csv.DictReader(fh)]
        np.testing.assert_allclose(rates, [1e-3 / (1 + 0.5 * t) for t in range(4)], rtol=1e-6)
    assert losses(full) == losses(cut)
    assert [p for _, p, _ in losses(full)] == ["wl2", "wl2", "dice", "dice"]


def test_moving_average_is_saved_exported_and_resumed(uninterrupted, tmp_path):
    """A run keeping a moving average saves it beside the params; export and load_model take it;
    resuming restores it; resuming a run saved without one starts it at the restored params."""
    out = tmp_path / "ema"
    run(tiny(out, "train.steps=3", "train.ema_decay=0.5"))
    average, meta = ckpt.load_model(str(out))
    raw, _ = ckpt.load_model(str(out), average=False)
    kernel = lambda v: v["params"]["unet"]["unet_likelihood"]["kernel"]
    assert meta["step"] == 3 and not np.allclose(kernel(average), kernel(raw))
    exported = load_keras_h5(os.path.join(out, "export", "synthseg_2.0.h5"),
                             jax.tree_util.tree_map(np.zeros_like, average))
    np.testing.assert_array_equal(kernel(exported), kernel(average))
    r = Run(tiny(out, "train.steps=3", "train.ema_decay=0.5"))
    manager = ckpt.make_manager(os.path.join(out, "checkpoints"), keep=None, async_save=False)
    resumed = ckpt.restore_state(manager, r.initial)
    np.testing.assert_array_equal(np.asarray(kernel({"params": resumed.ema_params})), kernel(average))
    # a checkpoint without an average (the uninterrupted run) resumed with one
    plain = Run(tiny(tmp_path / "other", "train.ema_decay=0.5"))
    manager = ckpt.make_manager(os.path.join(uninterrupted, "checkpoints"), keep=None, async_save=False,
                                read_only=True)
    started = ckpt.restore_state(manager, plain.initial)
    np.testing.assert_array_equal(np.asarray(kernel({"params": started.ema_params})),
                                  np.asarray(kernel({"params": started.params})))
    np.testing.assert_array_equal(np.asarray(kernel({"params": started.params})),
                                  kernel(ckpt.load_model(uninterrupted)[0]))


def test_keep_last_checkpoints(tmp_path):
    out = tmp_path / "keep"
    run(tiny(out, "train.steps=4", "train.checkpoint_every=1", "train.keep_checkpoints=2"))
    assert sorted(int(n) for n in os.listdir(out / "checkpoints") if n.isdigit()) == [3, 4]


def test_resume_must_without_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        run(tiny(tmp_path / "none", "train.resume=must"))


def test_export_h5_and_models_dir(uninterrupted, tmp_path):
    variables, meta = ckpt.load_model(uninterrupted)
    assert meta["step"] == 4 and meta["model"]["name"] == "tiny" and meta["n_outputs"] == 33
    h5 = tmp_path / "tiny.h5"
    ckpt.export_h5(uninterrupted, str(h5))
    template = jax.tree_util.tree_map(np.zeros_like, variables)
    loaded = load_keras_h5(str(h5), template)
    for x, y in zip(jax.tree_util.tree_leaves(variables), jax.tree_util.tree_leaves(loaded)):
        np.testing.assert_array_equal(x, y)
    # the run's own export at the end is the same file content
    own = load_keras_h5(os.path.join(uninterrupted, "export", "synthseg_2.0.h5"), template)
    for x, y in zip(jax.tree_util.tree_leaves(variables), jax.tree_util.tree_leaves(own)):
        np.testing.assert_array_equal(x, y)
    models = tmp_path / "models"
    ckpt.main([uninterrupted, "--models-dir", str(models)])
    assert (models / "synthseg_2.0.h5").is_file() and (models / "architecture.json").is_file()
    tables = LabelTables.load(str(models), "2.0")
    assert tables.n_labels == 33
    arch = __import__("json").load(open(models / "architecture.json"))
    assert arch["2.0"]["unet"]["nb_features"] == 4 and arch["2.0"]["unet"]["nb_levels"] == 3
    with pytest.raises(ValueError, match="part of '2.0'"):
        ckpt.export_models_dir({"qc": uninterrupted}, str(models))


def test_finetune_from_h5(uninterrupted, tmp_path):
    """Fine-tuning starts from exported weights (and may freeze the first encoder level)."""
    h5 = os.path.join(uninterrupted, "export", "synthseg_2.0.h5")
    out = tmp_path / "ft"
    run(tiny(out, "train.steps=1", f"train.init={h5}", "train.freeze_levels=1"))
    start, _ = ckpt.load_model(uninterrupted)
    tuned, _ = ckpt.load_model(str(out))
    frozen = "unet_conv_downarm_0_0"
    np.testing.assert_array_equal(start["params"]["unet"][frozen]["kernel"],
                                  tuned["params"]["unet"][frozen]["kernel"])
    assert not np.array_equal(start["params"]["unet"]["unet_conv_downarm_1_0"]["kernel"],
                              tuned["params"]["unet"]["unet_conv_downarm_1_0"]["kernel"])
