"""A training run's own export (RUN/export/) is a complete models folder: predict reads it right."""

import json
import os

from conftest import TINY, compose, needs_maps

from synthseg_jax.training.loop import run
from synthseg_jax.weights.keras_h5 import read_voxel_size
from synthseg_jax.weights.models_dir import ModelsDir

pytestmark = needs_maps


def test_run_export_is_a_models_folder(tmp_path):
    """It held only the .h5, so models_dir=RUN/export ran a 4 mm network at 1 mm (issue 19, item 2)."""
    out = tmp_path / "run"
    summary = run(compose(TINY + [f"train.out_dir={out}", "validation.every=0", "train.steps=2"]))
    export = out / "export"
    assert summary["export"] == str(export / "synthseg_2.0.h5")
    assert read_voxel_size(summary["export"]) == 4.0
    arch = json.loads((export / "architecture.json").read_text())
    assert arch["2.0"]["unet"]["voxel_size"] == 4.0 and arch["2.0"]["unet"]["crop"] == [32, 32, 32]
    assert os.path.isfile(export / "synthseg_segmentation_labels_2.0.npy")
    models = ModelsDir(str(export))
    assert models.voxel_size("2.0") == 4.0 and models.training_field_mm("2.0") == 128.0
    assert models.labels("2.0").n_labels == 33
