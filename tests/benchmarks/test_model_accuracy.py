"""The paired comparison of two accuracy runs (benchmarks/bench_model_accuracy.py --against)."""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
from bench_model_accuracy import paired_difference  # noqa: E402


def _case(name: str, resolution: str, dice: list[float]) -> dict:
    return {"name": name, "resolution": resolution, "dice": {str(i): d for i, d in enumerate(dice)}}


def test_paired_difference_per_resolution_and_overall():
    base = [_case("a_1x1x1_c0", "1x1x1", [0.5, 0.7]), _case("b_1x1x1_c0", "1x1x1", [0.6, 0.6]),
            _case("a_3x3x3_c0", "3x3x3", [0.4, 0.4])]
    own = [_case("a_1x1x1_c0", "1x1x1", [0.6, 0.8]), _case("b_1x1x1_c0", "1x1x1", [0.6, 0.8]),
           _case("a_3x3x3_c0", "3x3x3", [0.3, 0.3])]
    out = paired_difference(own, base)
    assert out["1x1x1"]["mean"] == pytest.approx(0.1)
    assert out["1x1x1"]["se"] == pytest.approx(0.0, abs=1e-12)
    assert (out["1x1x1"]["ahead"], out["1x1x1"]["n"]) == (2, 2)
    assert out["3x3x3"]["mean"] == pytest.approx(-0.1) and out["3x3x3"]["ahead"] == 0
    assert np.isnan(out["3x3x3"]["se"])
    diffs = np.array([0.1, 0.1, -0.1])
    assert out["all"]["mean"] == pytest.approx(diffs.mean())
    assert out["all"]["se"] == pytest.approx(diffs.std(ddof=1) / np.sqrt(3))


def test_paired_difference_refuses_other_images():
    with pytest.raises(ValueError, match="no image b_1x1x1_c0"):
        paired_difference([_case("b_1x1x1_c0", "1x1x1", [0.5])], [_case("a_1x1x1_c0", "1x1x1", [0.5])])
