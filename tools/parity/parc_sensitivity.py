"""How many parcel decisions of the random-weight parc U-Net change when a few voxels of its cortex
mask input flip (the voxels our own segmentation has closest to a cortex / non-cortex tie).

Explains whole-run parcellation differences against the original (BENCHMARKS.md, "Whole-run
parity"): float32 ties flip a few mask voxels, and random weights spread each flip widely.

    .venv/bin/python tools/parity/parc_sensitivity.py     (after run_pipeline_parity.py made its inputs)

Runs on a 160^3 centre crop of the padded MNI input, with the models in .parity/models.
"""
import jax, jax.numpy as jnp, numpy as np
from synthseg_jax.scans import load_scan
from synthseg_jax.inference.preprocess import preprocess
from synthseg_jax.inference.network import Mode, Predictor, load_networks
from synthseg_jax.nn.synthseg import CORTEX_LABELS, with_cortex_mask

nets = load_networks(".parity/models", Mode(parc=True))
prep = preprocess(load_scan(".parity/pipeline/inputs/mni.nii.gz"))
img = prep.image
c = [s // 2 for s in img.shape]
crop = np.asarray(img[c[0]-80:c[0]+80, c[1]-80:c[1]+80, c[2]-80:c[2]+80], np.float32)
x = jnp.asarray(crop[None, ..., None])
labels = np.asarray(nets.tables.segmentation)

@jax.jit
def parc_argmax(x, in_cortex):
    return jnp.argmax(nets.parc.apply(nets.variables["parc"], with_cortex_mask(x, in_cortex[None]))[0], -1)

# the pipeline's own flip-averaged, blurred segmentation posteriors (default mode)
post = Predictor(nets, Mode())(crop).posteriors
is_ctx_label = np.isin(labels, CORTEX_LABELS)
cortex = is_ctx_label[post.argmax(-1)]
gap = np.abs(post[..., is_ctx_label].max(-1) - post[..., ~is_ctx_label].max(-1))
base = np.asarray(parc_argmax(x, jnp.asarray(cortex)))
print(f"cortex voxels {cortex.sum()}; voxels with cortex/non-cortex gap < 1e-5: {(gap < 1e-5).sum()}, < 1e-4: {(gap < 1e-4).sum()}")
for k in (1, 10, 100):
    order = np.argsort(gap, axis=None)[:k]
    flipped = cortex.copy().reshape(-1)
    flipped[order] = ~flipped[order]
    new = np.asarray(parc_argmax(x, jnp.asarray(flipped.reshape(cortex.shape))))
    changed = (new != base) & cortex
    print(f"flip {k} mask voxels (gaps <= {np.sort(gap, axis=None)[k-1]:.1e}): parcel argmax changes in "
          f"{changed.sum()} of {cortex.sum()} cortex voxels ({changed.sum() / cortex.sum():.2%})", flush=True)
