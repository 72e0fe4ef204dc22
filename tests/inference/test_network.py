import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from synthseg_jax.inference.network import (
    ModelError,
    Mode,
    Networks,
    Predictor,
    gaussian_blur,
    gaussian_weights,
    load_networks,
    qc_one_hot,
    softmax_blurred,
)
from synthseg_jax.nn.synthseg import crop_around_labels

SHAPE = (32, 24, 28)


def test_blur_kernel_and_zero_padding():
    w = gaussian_weights(0.5)
    g = np.exp(-np.array([1.0, 0, 1]) ** 2 / 0.5)
    np.testing.assert_allclose(w, g / g.sum(), rtol=1e-6)
    x = np.random.default_rng(0).uniform(size=(2, 6, 7, 5, 3)).astype(np.float32)
    kernel = np.einsum("i,j,k->ijk", w, w, w)
    expected = np.stack([np.stack([ndimage.correlate(x[b, ..., c], kernel, mode="constant")
                                   for c in range(3)], -1) for b in range(2)])
    np.testing.assert_allclose(np.asarray(gaussian_blur(jnp.asarray(x))), expected, atol=1e-6)


def test_softmax_blurred_is_the_blur_of_the_softmax(tiny_nets):
    module, _, variables = tiny_nets["parc"]
    x = jnp.asarray(np.random.default_rng(1).uniform(size=(1, 16, 24, 32, 3)), jnp.float32)
    net = lambda z, **kw: module.apply(variables, z, **kw)
    expected = gaussian_blur(jax.nn.softmax(net(x), axis=-1))
    np.testing.assert_allclose(np.asarray(jax.jit(lambda z: softmax_blurred(net, z))(x)),
                               np.asarray(expected), atol=1e-5)


def image(seed=0, shape=SHAPE):
    rng = np.random.default_rng(seed)
    return ndimage.gaussian_filter(rng.uniform(size=shape), 1.5).astype(np.float32)


def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def blur(p):
    return np.asarray(gaussian_blur(jnp.asarray(p)))


def networks(tiny_nets, tables, kinds=("2.0",)):
    seg_kind = kinds[0]
    module, _, variables = tiny_nets[seg_kind]
    nets = Networks(tables=tables, segmenter=module, variables={"seg": variables})
    if "parc" in kinds:
        nets.parc = tiny_nets["parc"][0]
        nets.variables["parc"] = tiny_nets["parc"][2]
    if "qc" in kinds:
        nets.qc = tiny_nets["qc"][0]
        nets.variables["qc"] = tiny_nets["qc"][2]
    return nets


def apply(tiny_nets, kind, x):
    module, _, variables = tiny_nets[kind]
    return np.asarray(module.apply(variables, jnp.asarray(x)))  # eager: cheaper than compiling here


def test_flip_averaging_and_compile_cache(tiny_nets, tables, caplog):
    predictor = Predictor(networks(tiny_nets, tables), Mode())
    x = image()
    with caplog.at_level(logging.INFO, logger="synthseg_jax.inference"):
        out = predictor(x)
        out2 = predictor(image(1))
    assert sum("compiling" in r.message for r in caplog.records) == 1
    assert out.parc_posteriors is None and out.qc_scores is None
    direct = blur(softmax(apply(tiny_nets, "2.0", x[None, ..., None])))
    flipped = blur(softmax(apply(tiny_nets, "2.0", x[None, ::-1, ..., None])))
    back = flipped[:, ::-1][..., tables.flip]
    expected = 0.5 * (direct + back)[0]
    np.testing.assert_allclose(out.posteriors, expected, atol=2e-5)
    assert out.posteriors.shape == SHAPE + (tables.n_labels,)
    assert not np.allclose(out.posteriors, out2.posteriors)
    # the posteriors are far from uniform (the tiny weights are peaky)
    assert out.posteriors.max(-1).mean() > 0.2  # uniform would be 1/33


@pytest.mark.parametrize("parc,qc", [(False, False), (True, False), (False, True)])
def test_fast_mode_returns_what_the_original_returns(tiny_nets, tables, parc, qc):
    kinds = ("2.0",) + (("parc",) if parc else ()) + (("qc",) if qc else ())
    predictor = Predictor(networks(tiny_nets, tables, kinds), Mode(fast=True, parc=parc, qc=qc),
                          qc_crop_size=16)
    x = image(2)
    out = predictor(x)
    raw = softmax(apply(tiny_nets, "2.0", x[None, ..., None]))
    expected = raw if (parc or qc) else blur(raw)
    np.testing.assert_allclose(out.posteriors, expected[0], atol=2e-5)
    if parc:
        seg_index = np.argmax(blur(raw), -1)   # the parcellation sees the blurred posteriors
        cortex = np.isin(tables.segmentation, [3, 42])[seg_index]
        parc_x = np.concatenate([x[None, ..., None], np.eye(2, dtype=np.float32)[cortex.astype(int)]], -1)
        expected_parc = blur(softmax(apply(tiny_nets, "parc", parc_x)))[0]
        np.testing.assert_allclose(out.parc_posteriors, expected_parc, atol=2e-5)
    if qc:
        seg_index = np.argmax(blur(raw), -1)   # without parc, QC sees the blurred posteriors
        cropped = np.asarray(crop_around_labels(jnp.asarray(seg_index[0]), 16))
        onehot = np.eye(tables.n_qc, dtype=np.float32)[tables.qc_class[cropped]][None]
        expected_qc = apply(tiny_nets, "qc", onehot)[0]
        np.testing.assert_allclose(out.qc_scores, expected_qc, rtol=1e-4, atol=1e-6)
        assert out.qc_scores.shape == (tables.n_qc,)


def test_robust_cascade_softmax_without_blur(tiny_nets, tables):
    predictor = Predictor(networks(tiny_nets, tables, ("robust",)), Mode(robust=True))
    x = image(3)
    out = predictor(x)
    expected = softmax(apply(tiny_nets, "robust", x[None, ..., None]))[0]
    np.testing.assert_allclose(out.posteriors, expected, atol=2e-5)


def test_qc_one_hot_crop_size():
    seg = jnp.zeros((1, 20, 20, 20), jnp.int32).at[0, 5:9, 5:9, 5:9].set(3)
    onehot = qc_one_hot(seg, jnp.array([0, 1, 2, 3]), 4, 8)
    assert onehot.shape == (1, 8, 8, 8, 4)
    assert float(onehot[..., 3].sum()) == 64


def test_qc_one_hot_at_a_coarser_voxel_size_takes_each_blocks_majority():
    """A 2 mm QC model sees the hard 2 mm segmentation: each 2^3 block's majority class."""
    rng = np.random.default_rng(3)
    seg = rng.integers(1, 4, (1, 16, 16, 16)).astype(np.int32)
    seg[0, :2, :2, :2] = [[[1, 2], [2, 2]], [[2, 3], [3, 2]]]        # 5 of 8 are class 2
    onehot = np.asarray(qc_one_hot(jnp.asarray(seg), jnp.array([0, 1, 2, 3]), 4, 16, factor=2))
    assert onehot.shape == (1, 8, 8, 8, 4) and np.all(onehot.sum(-1) == 1)
    assert onehot[0, 0, 0, 0].tolist() == [0, 0, 1, 0]
    blocks = np.eye(4)[seg[0]].reshape(8, 2, 8, 2, 8, 2, 4).sum((1, 3, 5))
    clear = blocks.max(-1) >= 5                                       # no tie for the majority
    np.testing.assert_array_equal(np.argmax(onehot[0], -1)[clear], np.argmax(blocks, -1)[clear])


def test_load_networks_errors(models_dir, labels_dir, tmp_path):
    with pytest.raises(ModelError, match="models folder not found"):
        load_networks(str(tmp_path / "nope"), Mode(), labels_dir)
    # the tiny models folder has no label files of its own
    with pytest.raises(ModelError, match="synthseg_segmentation_labels_2.0.npy"):
        load_networks(models_dir, Mode())
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match=r"synthseg_parc_2.0.h5: weight file missing"):
        import shutil
        shutil.copy(f"{models_dir}/synthseg_2.0.h5", empty)
        load_networks(str(empty), Mode(parc=True), labels_dir)
    nets = load_networks(models_dir, Mode(parc=True, qc=True), labels_dir)
    assert set(nets.variables) == {"seg", "parc", "qc"}
    with pytest.raises(ValueError, match="robust cannot be combined with v1"):
        Mode(robust=True, v1=True)


@pytest.mark.parametrize("fast", [False, True])
def test_predict_matches_the_numpy_postprocess(tiny_nets, tables, fast):
    """The pipeline's split post-processing (JAX + host components) against the plain numpy one."""
    from synthseg_jax.scans import Scan
    from reference_postprocess import postprocess
    from synthseg_jax.inference.postprocess import assemble_volumes, to_scan_grid
    from synthseg_jax.inference.preprocess import preprocess

    lia = np.array([[-1, 0, 0, 0], [0, 0, 1, 0], [0, -1, 0, 0], [0, 0, 0, 1.0]])
    data = image(4, (26, 30, 22)).astype(np.float64)
    prep = preprocess(Scan("s.nii.gz", data, lia, None, np.ones(3)), crop=[32, 24, 32])
    mode = Mode(fast=fast, parc=True)
    predictor = Predictor(networks(tiny_nets, tables, ("2.0", "parc")), mode)
    res = predictor.predict(prep.image, prep.pad_idx, posteriors=True, volume_dtype=np.float64,
                            alignment=prep.alignment)
    raw = predictor(prep.image)
    ref = postprocess(raw.posteriors, prep, tables, fast=fast, v1=False,
                      parc_posteriors=raw.parc_posteriors)
    np.testing.assert_array_equal(to_scan_grid(res.seg, prep), ref.seg)
    np.testing.assert_allclose(to_scan_grid(res.posteriors, prep, fill_background=True),
                               ref.posteriors, atol=1e-6)
    volumes = assemble_volumes(res.sums, tables.segmentation, prep.voxel_size, False, res.parc_sums)
    np.testing.assert_allclose(volumes, ref.volumes, rtol=1e-5, atol=2e-3)
    assert len(predictor.compile_seconds) == 1 and set(res.seconds) >= {"network", "components"}
