"""The box path of a coarse segmenter (coarse.py) against the whole-grid path: same results."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from synthseg_jax.inference import coarse
from synthseg_jax.inference.network import Mode, Networks, Predictor


class IntensityNet(nn.Module):
    """Sure of the background where the image is dark, of one midline structure (its own flip
    partner, so that the flipped pass agrees) where it is bright, a random 3^3 convolution
    elsewhere: a stand-in for a trained 2 mm segmenter, certain of the background far from the
    head and of the large structures inside it."""

    n_labels: int
    midline: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        logits = 6.0 * nn.Conv(self.n_labels, (3, 3, 3))(x)
        logits = logits.at[..., self.midline].add(80.0 * (x[..., 0] - 0.6))
        return logits.at[..., 0].add(40.0 * (0.2 - x[..., 0]))


def head_with_islands(shape=(96, 112, 96)) -> tuple[np.ndarray, np.ndarray]:
    """A textured ellipsoid with a bright core off the grid's centre, two small bright islands far from it (their
    own components, which post-processing removes), dark elsewhere; and the scan's region."""
    rng = np.random.default_rng(0)
    grid = np.indices(shape, dtype=np.float32)
    centre = np.array([40.0, 50.0, 44.0])[:, None, None, None]
    radius = np.sqrt(np.sum(((grid - centre) / np.array([20.0, 26.0, 22.0])[:, None, None, None])
                            ** 2, 0))
    texture = ndimage.gaussian_filter(rng.uniform(size=shape), 2.0)
    texture = (texture - texture.min()) / (texture.max() - texture.min())
    image = np.where(radius < 1, 0.4 + 0.6 * texture, 0.0)
    image[radius < 0.7] = 0.95   # a bright core: the white matter
    image[86:88, 98:100, 86:88] = 0.9
    image[4:6, 102:104, 8:10] = 0.8
    return image.astype(np.float32), np.array([2, 2, 2, 94, 110, 94], np.int32)


@pytest.fixture(scope="module")
def coarse_networks(tables, tiny_nets):
    midline = next(c for c in range(1, tables.n_labels) if tables.flip[c] == c)
    module = IntensityNet(tables.n_labels, midline)
    variables = module.init(jax.random.key(1), jnp.zeros((1, 8, 8, 8, 1)))
    return Networks(tables=tables, segmenter=module,
                    variables={"seg": variables, "qc": tiny_nets["qc"][2]}, qc=tiny_nets["qc"][0],
                    seg_voxel_size=2.0, qc_voxel_size=1.0, qc_crop_size=32)


@pytest.mark.parametrize("mode", [Mode(qc=True), Mode(fast=True), Mode(fast=True, qc=True)],
                         ids=["default+qc", "fast", "fast+qc"])
def test_box_path_equals_the_whole_grid(coarse_networks, mode):
    image, region = head_with_islands()
    box = Predictor(coarse_networks, mode)
    whole = Predictor(coarse_networks, mode, box=False)
    assert box.box and not whole.box
    got = box.predict(image, region, posteriors=True)
    expected = whole.predict(image, region, posteriors=True)
    # the box is smaller than the grid and leaves the islands out
    first = box._compiled_coarse[image.shape](box._variables, image)
    plan = coarse.plan_box(np.asarray(first["share"]), np.asarray(first["sure"]), region, 2)
    assert np.prod(plan.voxel_size) < 0.5 * image.size
    inside = np.zeros(image.shape, bool)
    inside[plan.window()] = True
    assert not inside[86:88, 98:100, 86:88].any() and not inside[4:6, 102:104, 8:10].any()
    # ... which are in the clean-up's brain mask before its largest component is taken, and
    # removed by it: the outcome the box relies on
    assert 1 - np.asarray(whole(image).posteriors)[86, 98, 86, 0] > 0.25
    assert (expected.seg[~inside] == 0).all()
    assert len(np.unique(expected.seg)) > 5
    np.testing.assert_array_equal(got.seg, expected.seg)
    np.testing.assert_allclose(got.posteriors, expected.posteriors, atol=2e-6)
    np.testing.assert_allclose(got.sums, expected.sums, rtol=1e-6)
    if mode.qc:
        np.testing.assert_allclose(got.qc_scores, expected.qc_scores, rtol=1e-5, atol=1e-6)


def test_box_of_nothing_is_one_bucket():
    share = np.zeros((40, 48, 40), np.float32)
    plan = coarse.plan_box(share, share > 1, np.array([0, 0, 0, 80, 96, 80]), 2)
    assert plan.size == (coarse.BUCKET_CELLS,) * 3


def test_box_grows_by_the_reach_and_rounds_to_buckets():
    share = np.zeros((40, 48, 40), np.float32)
    share[10:13, 20:21, 0:3] = 0.9
    plan = coarse.plan_box(share, share > 0.5, np.array([0, 0, 0, 80, 96, 80]), 2)
    reach = coarse.REACH_CELLS
    for axis, (lo, hi) in enumerate([(10, 13), (20, 21), (0, 3)]):
        start, size = plan.start[axis], plan.size[axis]
        assert start <= max(lo - reach, 0) and start + size >= hi + reach
        assert size % coarse.BUCKET_CELLS == 0
