"""training/validation.py: the MNI T1 goes through prediction's reading, RAS alignment,
rescaling and padding; the tissue masks land on the same voxels whatever the storage order."""

import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest

from synthseg_jax.inference.preprocess import preprocess
from synthseg_jax.scans import load_scan
from synthseg_jax.training import validation as val


def write_fake_mni(folder, flip_x: bool):
    """A 1 mm 'template' (36x40x30) whose bright region is the white matter and mid-grey region
    the grey matter; stored RAS or with the first axis reversed (LPS-like)."""
    rng = np.random.default_rng(0)
    wm = np.zeros((36, 40, 30), np.float32)
    wm[6:20, 10:30, 8:22] = 1.0                   # off-centre: a wrong flip would show
    gm = np.zeros_like(wm)
    gm[20:28, 10:30, 8:22] = 1.0
    t1 = 100 * wm + 50 * gm + rng.uniform(0, 5, wm.shape).astype(np.float32)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    if flip_x:
        affine = np.diag([-1.0, 1.0, 1.0, 1.0])
        affine[0, 3] = 35.0
        t1, wm, gm = (v[::-1].copy() for v in (t1, wm, gm))
    for key, data in (("t1", t1), ("wm", wm * 255), ("gm", gm * 255)):
        nib.save(nib.Nifti1Image(data, affine), str(folder / val.MNI_FILES[key]))


@pytest.mark.parametrize("flip_x", [False, True], ids=["ras", "flipped"])
def test_masks_follow_the_image_through_preprocessing(tmp_path, flip_x):
    write_fake_mni(tmp_path, flip_x)
    mni = val.load_mni(voxel_size=2.0, multiple=16, directory=str(tmp_path))
    expected = preprocess(load_scan(str(tmp_path / val.MNI_FILES["t1"])), n_levels=5).image
    np.testing.assert_array_equal(mni.image[0, ..., 0], expected)
    assert mni.image.shape == (1, 128, 128, 128, 1)          # prediction's minimum pad, 32-multiple
    assert mni.wm.shape == mni.gm.shape == (36, 40, 30)
    image = mni.image[0, ..., 0]
    # a "network" that reads the tissues off the image scores 1 only if the masks share its voxels
    labels = np.where(image > 0.8, 2, np.where(image > 0.3, 3, 0))
    assert val.mni_scores(labels, mni, [2], [3]) == {"mni_wm": 1.0, "mni_gm": 1.0}
    flipped = labels[::-1]
    assert val.mni_scores(flipped, mni, [2], [3])["mni_wm"] < 0.9


def test_coarse_networks_run_as_prediction_runs_them(tmp_path):
    """A 2 mm network sees the average-pooled image and gives 1 mm logits (at_voxel_size)."""
    write_fake_mni(tmp_path, flip_x=False)
    mni = val.load_mni(voxel_size=2.0, multiple=16, directory=str(tmp_path))
    seen = []

    def apply(variables, x):
        seen.append(x.shape)
        return jnp.concatenate([x, -x], -1)

    logits = val.mni_forward(apply, 2.0)(None, jnp.asarray(mni.image))
    assert seen == [(1, 64, 64, 64, 1)] and logits.shape == (1, 128, 128, 128, 2)
    coarse = np.asarray(mni.image[0, ..., 0]).reshape(64, 2, 64, 2, 64, 2).mean((1, 3, 5))
    np.testing.assert_allclose(np.asarray(logits[0, 40:42, 50:52, 40:42, 0]).mean(),
                               coarse[20, 25, 20], atol=0.05)


def test_refuses_voxel_sizes_prediction_does_not_run(tmp_path):
    write_fake_mni(tmp_path, flip_x=False)
    with pytest.raises(ValueError, match="not 3 mm; set validation.mni=false"):
        val.load_mni(voxel_size=3.0, directory=str(tmp_path))
    (tmp_path / val.MNI_FILES["gm"]).unlink()
    with pytest.raises(FileNotFoundError, match="MNI template file missing"):
        val.load_mni(voxel_size=1.0, directory=str(tmp_path))


def test_mask_dice():
    a = np.zeros((4, 4), bool)
    a[:2] = True
    b = np.zeros((4, 4), bool)
    b[1:3] = True
    assert val.mask_dice(a, b) == 0.5 and val.mask_dice(a, a) == 1.0
    assert val.mask_dice(np.zeros(3, bool), np.zeros(3, bool)) == 1.0
