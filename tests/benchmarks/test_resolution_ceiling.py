"""The resolution ceiling's oracle: each coarse cell's share of a structure is exact, the per-label
windows change nothing, and the ceiling falls with the grid and with a structure's thinness."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_resolution_ceiling.py"
spec = importlib.util.spec_from_file_location("bench_resolution_ceiling", SCRIPT)
ceiling = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ceiling)


def phantom(shape=(36, 36, 36), seed=0) -> np.ndarray:
    """Three labels: a thick ball, a one-voxel-thick sheet through it and a random speckle."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"))
    target = np.zeros(shape, dtype=np.int32)
    target[np.linalg.norm(grid - 17.5, axis=0) < 12] = 1
    target[:, 18, 6:30] = 2
    speckle = np.random.default_rng(seed).random(shape) < 0.02
    target[speckle & (target == 0)] = 3
    return target


def test_cell_share_of_a_grid_aligned_volume_is_its_coarse_one_hot():
    coarse = np.random.default_rng(1).random((9, 9, 9)) < 0.5
    fine = np.repeat(np.repeat(np.repeat(coarse, 2, 0), 2, 1), 2, 2).astype(np.float32)
    np.testing.assert_array_equal(ceiling.cell_share(fine, 2.0), coarse.astype(np.float32))


@pytest.mark.parametrize("factor", [1.5, 3.0])
def test_cell_share_equals_the_overlap_of_each_cell(factor):
    mask = (np.random.default_rng(2).random((18, 18, 18)) < 0.4).astype(np.float32)
    k = 2 if factor == 1.5 else 1
    size = int(factor * k)
    refined = np.repeat(np.repeat(np.repeat(mask, k, 0), k, 1), k, 2)
    n = refined.shape[0] // size
    brute = refined[:n * size, :n * size, :n * size].reshape(n, size, n, size, n, size).mean(axis=(1, 3, 5))
    np.testing.assert_allclose(ceiling.cell_share(mask, factor), brute, atol=1e-6)


@pytest.mark.parametrize("factor", [1.5, 2.0, 3.0])
@pytest.mark.parametrize("soft", [True, False])
def test_label_windows_give_the_whole_volume_result(monkeypatch, factor, soft):
    target = phantom()
    labels = np.unique(target)
    windowed = ceiling.oracle_labels(target, labels, factor, soft)
    monkeypatch.setattr(ceiling, "label_window", lambda mask, f: tuple(slice(0, n) for n in mask.shape))
    whole = ceiling.oracle_labels(target, labels, factor, soft)
    np.testing.assert_array_equal(windowed, whole)


def test_the_ceiling_falls_with_the_grid_and_is_lowest_on_thin_structures():
    target = phantom()
    labels = np.unique(target)
    dice = {f: ceiling.dice_per_label(ceiling.oracle_labels(target, labels, f, soft=True), target,
                                      np.array([1, 2, 3]))
            for f in (1.0, 2.0, 3.0)}
    assert all(d == 1.0 for d in dice[1.0].values())
    assert dice[1.0][1] > dice[2.0][1] > dice[3.0][1] > 0.9        # the thick ball
    for thin in (2, 3):                                            # the sheet, the speckle
        assert dice[1.0][thin] > dice[2.0][thin] >= dice[3.0][thin]
        assert dice[2.0][thin] < 0.5
