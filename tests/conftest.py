"""Shared fixtures: the published label tables live in ../shared, beside the project."""

import os

import pytest

from synthseg_jax.labels import LabelTables

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.environ.get(
    "SYNTHSEG_SHARED_DATA", os.path.join(REPO_ROOT, "..", "shared", "data", "synthseg"))
LABELS_DIR = os.path.join(SHARED_DATA, "labels_classes_priors")


@pytest.fixture(scope="session")
def tables() -> LabelTables:
    return LabelTables.load(LABELS_DIR, "2.0")


@pytest.fixture(scope="session")
def tables_v1() -> LabelTables:
    return LabelTables.load(LABELS_DIR, "1.0")


@pytest.fixture(scope="session")
def labels_dir() -> str:
    return LABELS_DIR
