"""The losses against direct NumPy transcriptions of the original's formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from synthseg_jax.training import losses


def random_case(seed=0, shape=(2, 5, 4, 3), n=4):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n, shape)
    onehot = np.eye(n, dtype=np.float32)[labels]
    logits = rng.normal(0, 3, shape + (n,)).astype(np.float32)
    return labels, onehot, logits


def test_weighted_l2_matches_formula():
    _, gt, logits = random_case()
    w = 1 - gt[..., :1] + 1e-8
    expected = np.sum(w * (logits - 5 * (2 * gt - 1)) ** 2) / (np.sum(w) * gt.shape[-1])
    np.testing.assert_allclose(losses.weighted_l2(jnp.asarray(logits), jnp.asarray(gt)), expected, rtol=1e-5)


def test_weighted_l2_ignores_background_voxels():
    labels, gt, logits = random_case(1)
    changed = logits.copy()
    changed[labels == 0] += 100.0
    a = losses.weighted_l2(jnp.asarray(logits), jnp.asarray(gt))
    b = losses.weighted_l2(jnp.asarray(changed), jnp.asarray(gt))
    assert abs(float(a) - float(b)) < 1e-3 * float(a)
    perfect = 5 * (2 * gt - 1)
    assert float(losses.weighted_l2(jnp.asarray(perfect), jnp.asarray(gt))) < 1e-10


def test_soft_dice_matches_formula():
    _, gt, logits = random_case(2)
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    g = np.clip(gt / (gt.sum(-1, keepdims=True) + 1e-7), 0, 1)
    q = np.clip(p / (p.sum(-1, keepdims=True) + 1e-7), 0, 1)
    top = np.sum(2 * g * q, axis=(1, 2, 3))
    bottom = np.sum(g ** 2 + q ** 2, axis=(1, 2, 3))
    expected = np.mean(1 - (top + 1e-7) / (bottom + 1e-7))
    got = losses.soft_dice_loss(jax.nn.softmax(jnp.asarray(logits)), jnp.asarray(gt))
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    labels = np.argmax(gt, -1)
    np.testing.assert_allclose(losses.segmentation_loss("dice", jnp.asarray(logits), jnp.asarray(labels)),
                               expected, rtol=1e-5)


def test_soft_dice_perfect_and_absent_labels():
    _, gt, _ = random_case(3)
    assert float(losses.soft_dice_loss(jnp.asarray(gt), jnp.asarray(gt))) < 1e-6
    # a label absent from both prediction and target scores Dice 1 (eps / eps), as in the original
    gt5 = np.concatenate([gt, np.zeros(gt.shape[:-1] + (1,), np.float32)], -1)
    assert float(losses.soft_dice_loss(jnp.asarray(gt5), jnp.asarray(gt5))) < 1e-6


def test_qc_loss_matches_formula():
    rng = np.random.default_rng(4)
    pred, target = rng.uniform(size=(3, 9)), rng.uniform(size=(3, 9))
    expected = np.sum(np.mean((target - pred) ** 2, axis=0))
    np.testing.assert_allclose(losses.qc_regression_loss(jnp.asarray(pred), jnp.asarray(target)), expected,
                               rtol=1e-6)


def test_hard_dice():
    pred = jnp.array([0, 1, 1, 2, 2, 2])
    target = jnp.array([0, 1, 2, 2, 2, 0])
    dice, present = losses.hard_dice(pred, target, 4)
    np.testing.assert_allclose(dice, [2 * 1 / 3, 2 * 1 / 3, 2 * 2 / 6, 1.0], rtol=1e-6)
    np.testing.assert_array_equal(present, [True, True, True, False])


def test_unknown_loss():
    with pytest.raises(ValueError, match="unknown segmentation loss"):
        losses.segmentation_loss("ce", jnp.zeros((1, 2, 2, 2, 3)), jnp.zeros((1, 2, 2, 2), jnp.int32))
