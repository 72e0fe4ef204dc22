import json

import jax.numpy as jnp
import numpy as np
import pytest

from synthseg_jax.inference.network import at_voxel_size
from synthseg_jax.weights.keras_h5 import WeightFileError
from synthseg_jax.weights.models_dir import ModelsDir


def test_coarse_model_sees_pooled_image_and_returns_full_grid():
    # a linear ramp: pooling then linear upsampling gives it back exactly away from the borders
    i, j, k = np.meshgrid(np.arange(8), np.arange(16), np.arange(8), indexing="ij")
    x = jnp.asarray((0.5 * i - 0.25 * j + 2.0 * k)[None, ..., None], jnp.float32)
    seen = {}

    def network(z):
        seen["shape"] = z.shape
        return z

    out = at_voxel_size(network, x, 2.0)
    assert seen["shape"] == (1, 4, 8, 4, 1)
    assert out.shape == x.shape
    inner = (slice(None), slice(1, -1), slice(1, -1), slice(1, -1))
    np.testing.assert_allclose(np.asarray(out)[inner], np.asarray(x)[inner], atol=1e-4)


def test_one_mm_model_is_untouched():
    x = jnp.ones((1, 4, 4, 4, 1))
    assert at_voxel_size(lambda z: z * 3, x, 1.0).shape == x.shape


def test_voxel_size_read_from_architecture_file(tmp_path):
    assert ModelsDir(str(tmp_path)).voxel_size("2.0") == 1.0
    (tmp_path / "architecture.json").write_text(json.dumps({"2.0": {"unet": {"voxel_size": 2.0}}}))
    assert ModelsDir(str(tmp_path)).voxel_size("2.0") == 2.0
    (tmp_path / "architecture.json").write_text("{not json")
    with pytest.raises(WeightFileError, match="architecture.json: unreadable"):
        ModelsDir(str(tmp_path)).voxel_size("2.0")
