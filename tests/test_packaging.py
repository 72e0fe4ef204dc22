"""The package as installed: its package list, the data it carries, the wheel's contents.

tools/check_wheel.sh (run by .ci/run) goes further: it installs the wheel into a fresh virtual
environment and segments a scan from outside the checkout."""

import glob
import os
import subprocess
import sys
import tomllib
import zipfile

import numpy as np
import pytest

from synthseg_jax.labels import LabelTables
from synthseg_jax.package_data import config_dir, default_models_dir, label_tables_dir

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# folders of the repository installed under another name (pyproject.toml: package-dir)
MAPPED = {"synthseg_jax.configs": "configs", "synthseg_jax.default_model": "checkpoints"}


def pyproject():
    with open(os.path.join(REPO_ROOT, "pyproject.toml"), "rb") as handle:
        return tomllib.load(handle)["tool"]["setuptools"]


def folders_with_files(root, package):
    """Every folder under ``root`` holding a file, as a package name (caches left out)."""
    found = set()
    for folder, dirs, files in os.walk(os.path.join(REPO_ROOT, root)):
        dirs[:] = [d for d in dirs if d != "__pycache__" and not d.startswith(".")]
        if files:
            rel = os.path.relpath(folder, os.path.join(REPO_ROOT, root))
            found.add(package if rel == "." else package + "." + rel.replace(os.sep, "."))
    return found


def test_package_list_covers_the_source_tree():
    listed = set(pyproject()["packages"])
    assert pyproject()["package-dir"] == MAPPED
    on_disk = folders_with_files("synthseg_jax", "synthseg_jax") | folders_with_files("generator", "generator")
    on_disk |= folders_with_files("configs", "synthseg_jax.configs")
    on_disk.add("synthseg_jax.default_model")   # only the model's files (package-data), not the runs
    assert listed == on_disk


def test_package_data_is_found_through_the_package():
    assert os.path.isfile(os.path.join(config_dir(), "predict.yaml"))
    assert os.path.isfile(os.path.join(config_dir(), "generator", "default.yaml"))
    for name in ("synthseg_2.0.h5", "architecture.json"):
        assert os.path.isfile(os.path.join(default_models_dir(), name))
    assert os.path.isfile(os.path.join(label_tables_dir(), "LICENSE.txt"))


@pytest.mark.parametrize("version", ["1.0", "2.0"])
def test_shipped_label_tables_are_the_published_ones(version, labels_dir):
    ours, published = LabelTables.load(label_tables_dir(), version), LabelTables.load(labels_dir, version)
    for field in ("segmentation", "names", "topology_classes", "flip", "parcellation",
                  "parcellation_names", "qc_class", "qc_names"):
        np.testing.assert_array_equal(getattr(ours, field), getattr(published, field))
    assert ours.n_groups == published.n_groups


def test_wheel_carries_configs_model_and_label_tables(tmp_path):
    proc = subprocess.run(["bash", os.path.join(REPO_ROOT, "tools", "build_wheel.sh"), str(tmp_path),
                           sys.executable], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    (wheel,) = glob.glob(str(tmp_path / "synthseg_jax-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {"synthseg_jax/configs/predict.yaml", "synthseg_jax/configs/train.yaml",
                "synthseg_jax/configs/generator/default.yaml", "synthseg_jax/configs/model/tiny.yaml",
                "synthseg_jax/default_model/synthseg_2.0.h5",
                "synthseg_jax/default_model/synthseg_qc_2.0.h5",
                "synthseg_jax/default_model/architecture.json",
                "synthseg_jax/label_tables/LICENSE.txt",
                "synthseg_jax/label_tables/synthseg_segmentation_labels_2.0.npy",
                "synthseg_jax/inference/pipeline.py", "generator/sampler.py"}
    assert expected <= names, sorted(expected - names)
    assert not [n for n in names if "_run/" in n]   # the training runs stay in the repo
