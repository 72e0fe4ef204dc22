"""Per-sample statistics of a synthetic (image, target) pair, and their two-sample comparison.

Used by both sides of the generator parity harness (the original's under TensorFlow 2.15 with
numpy 1.23, ours in the project's environment), so it needs only numpy and scipy. Each statistic
is one number per sample, chosen so that a wrong generator step moves its distribution:

* ``median/<label>``, ``spread/<label>``: median and inter-quartile range of the image inside
  each target label but 0 (GMM priors, clipping, normalisation, gamma);
* ``pooled/median``, ``pooled/spread``: the mean of those medians and IQRs over the labels the
  sample holds, one number each: a shift common to all structures (normalisation, gamma, noise
  level) that each label's own test is too weak to see adds up here;
* ``median/background``, ``spread/background``: the same inside generation label 0 only (the
  true background), from the crop's generation labels that both sides save (``generation``).
  Target label 0 is not used: the output tables map 15 other generation labels (extra-cerebral
  tissue 5xx, vessels 30/62, 72, 85) to 0 as well, so a median over target 0 followed the one
  background-class draw diluted by those classes and was redundant with ``quantile/50``
  (per-sample correlation 0.95 in the issue-16 runs);
* ``contrast/wm_ctx``, ``contrast/ctx_csf``: difference of medians between neighbouring
  structures (white matter - cortex, cortex - CSF);
* ``quantile/<q>``: quantiles of the whole image (the pooled histogram, sample by sample);
* ``hf/axis<k>``: mean squared finite difference along axis k over twice the image variance
  (1 for white noise, small for smooth images: blur and slice spacing), and
  ``hf/min_over_max`` across axes (the anisotropy of the simulated acquisition);
* ``bias/wm_cv``: coefficient of variation of the heavily smoothed image inside the eroded
  white matter (the low-frequency bias field; the GMM noise averages out);
* ``volratio/<structure>``, ``centroid/<structure>``: target volume over the source map's
  (scaling, shearing, non-linear field, crop) and distance of the structure's centroid from the
  crop centre (rotation, crop position). One geometric draw per sample moves all of them, so
  they are correlated across structures (``GEOMETRY_NOTE``): their tests are not independent;
* ``labels/n``: number of distinct target labels; ``flip/swapped``: 1 when the left/right
  asymmetries of small structures in the target are those of the source mirrored.
"""
from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage, stats

# FreeSurfer label values of the structures used by the statistics (segmentation labels 1.0/2.0)
WM = (2, 41)
CORTEX = (3, 42)
CSF = (24,)
BILATERAL = {                     # name: (left, right)
    'cerebral_wm': (2, 41), 'cortex': (3, 42), 'lateral_ventricle': (4, 43),
    'cerebellum_wm': (7, 46), 'cerebellum_ctx': (8, 47), 'thalamus': (10, 49), 'caudate': (11, 50),
    'putamen': (12, 51), 'pallidum': (13, 52), 'hippocampus': (17, 53), 'amygdala': (18, 54),
}
MIDLINE = {'brainstem': (16,)}
# small, rarely cropped structures whose left/right volume asymmetries identify a flip
ASYMMETRY = ('lateral_ventricle', 'thalamus', 'caudate', 'putamen', 'pallidum', 'hippocampus', 'amygdala')
QUANTILES = (5, 25, 50, 75, 95)
BIAS_SIGMA = 6.0          # voxels: far above the blur and noise scale, below the bias field's ~40
MIN_VOXELS = 20           # fewer voxels of a label in a sample: its statistics are NaN
BACKGROUND = 0            # generation label of the true background
GEOMETRY_PREFIXES = ('volratio/', 'centroid/')
GEOMETRY_NOTE = ('volratio/* and centroid/* come from one geometric draw per sample (deformation, '
                 'crop): they are correlated across structures, not independent tests.')


def _masked(image: np.ndarray, target: np.ndarray, values: Sequence[int]) -> np.ndarray:
    return image[np.isin(target, values)]


def target_from_generation(generation: np.ndarray, generation_labels: Sequence[int],
                           output_labels: Sequence[int]) -> np.ndarray:
    """The target of generation labels: ``generation_labels[i]`` becomes ``output_labels[i]``
    (what the original's ``ConvertLabels`` does with the table)."""
    gl, ol = np.asarray(generation_labels, np.int64), np.asarray(output_labels, np.int64)
    if gl.shape != ol.shape or gl.ndim != 1:
        raise ValueError(f"generation labels {gl.shape} and output labels {ol.shape} must be 1-D, same length")
    generation = np.asarray(generation).astype(np.int64)
    lut = np.full(max(int(gl.max()), int(generation.max(initial=0))) + 1, -1, np.int64)
    lut[gl] = ol
    out = lut[generation]
    if generation.min(initial=0) < 0 or (out < 0).any():
        bad = np.unique(generation[(generation < 0) | (out < 0)])
        raise ValueError(f"label values {bad[:10].tolist()} are not generation labels")
    return out


def _median_spread(v: np.ndarray) -> Tuple[float, float]:
    if v.size < MIN_VOXELS:
        return math.nan, math.nan
    q25, q50, q75 = np.percentile(v, [25, 50, 75])
    return float(q50), float(q75 - q25)


def intensity_stats(image: np.ndarray, target: np.ndarray, labels: Sequence[int],
                    generation: Optional[np.ndarray] = None) -> Dict[str, float]:
    """Per-label median and IQR (target labels but 0; the background from ``generation``, the
    crop's generation labels, when given), neighbour contrasts, whole-image quantiles."""
    out: Dict[str, float] = {}
    for lab in labels:
        if lab != 0:
            out[f'median/{lab}'], out[f'spread/{lab}'] = _median_spread(image[target == lab])
    for kind in ('median', 'spread'):
        values = [v for k, v in out.items() if k.startswith(f'{kind}/') and not math.isnan(v)]
        out[f'pooled/{kind}'] = float(np.mean(values)) if values else math.nan
    if generation is not None:
        out['median/background'], out['spread/background'] = _median_spread(image[generation == BACKGROUND])

    def med(values):
        v = _masked(image, target, values)
        return float(np.median(v)) if v.size >= MIN_VOXELS else math.nan

    out['contrast/wm_ctx'] = med(WM) - med(CORTEX)
    out['contrast/ctx_csf'] = med(CORTEX) - med(CSF)
    for q, v in zip(QUANTILES, np.percentile(image, QUANTILES)):
        out[f'quantile/{q}'] = float(v)
    return out


def high_frequency_stats(image: np.ndarray) -> Dict[str, float]:
    """Per-axis high-frequency energy fraction: mean squared finite difference / (2 var)."""
    var = float(np.var(image))
    out: Dict[str, float] = {}
    fr = []
    for ax in range(image.ndim):
        d = np.diff(image, axis=ax)
        f = float(np.mean(d * d)) / (2 * var) if var > 0 else math.nan
        out[f'hf/axis{ax}'] = f
        fr.append(f)
    out['hf/min_over_max'] = min(fr) / max(fr) if max(fr) > 0 else math.nan
    return out


def bias_stats(image: np.ndarray, target: np.ndarray, sigma: float = BIAS_SIGMA) -> Dict[str, float]:
    """Coefficient of variation of the normalised-convolution smoothed image in eroded WM."""
    mask = np.isin(target, WM)
    core = ndimage.binary_erosion(mask, iterations=2)
    if core.sum() < 1000:
        return {'bias/wm_cv': math.nan}
    m = mask.astype(np.float32)
    num = ndimage.gaussian_filter(image.astype(np.float32) * m, sigma, mode='constant')
    den = ndimage.gaussian_filter(m, sigma, mode='constant')
    smooth = num[core] / np.maximum(den[core], 1e-6)
    mean = float(smooth.mean())
    return {'bias/wm_cv': float(smooth.std()) / mean if mean > 0 else math.nan}


def _volumes(labels: np.ndarray) -> np.ndarray:
    return np.bincount(labels.reshape(-1).astype(np.int64), minlength=256)


def geometry_stats(target: np.ndarray, source_volumes: np.ndarray) -> Dict[str, float]:
    """Per structure: target/source volume ratio and centroid distance (voxels) from the crop
    centre; left and right summed (ratio) or averaged (distance), so a flip does not change them."""
    vt = _volumes(target)
    centre = (np.asarray(target.shape, np.float64) - 1) / 2
    out: Dict[str, float] = {}
    structures = {**BILATERAL, **MIDLINE}
    present = [v for vals in structures.values() for v in vals if vt[v] >= MIN_VOXELS]
    com_of = dict(zip(present, ndimage.center_of_mass(np.ones(target.shape, np.float32), target, present)))
    for name, vals in structures.items():
        src = float(sum(source_volumes[v] for v in vals))
        out[f'volratio/{name}'] = float(sum(vt[v] for v in vals)) / src if src > 0 else math.nan
        dists = [float(np.linalg.norm(np.asarray(com_of[v]) - centre)) for v in vals if vt[v] >= MIN_VOXELS]
        out[f'centroid/{name}'] = float(np.mean(dists)) if dists else math.nan
    return out


def flip_score(target_volumes: np.ndarray, source_volumes: np.ndarray) -> float:
    """Agreement of the target's left/right log-volume asymmetries with the source's:
    positive = same side, negative = mirrored (NaN if no structure is seen on both sides)."""
    s, n = 0.0, 0
    for name in ASYMMETRY:
        left, right = BILATERAL[name]
        if min(target_volumes[left], target_volumes[right], source_volumes[left], source_volumes[right]) < MIN_VOXELS:
            continue
        s += (math.log(target_volumes[left] / target_volumes[right])
              * math.log(source_volumes[left] / source_volumes[right]))
        n += 1
    return s if n else math.nan


def label_stats(target: np.ndarray, source_volumes: np.ndarray) -> Dict[str, float]:
    vt = _volumes(target)
    score = flip_score(vt, source_volumes)
    return {'labels/n': float(np.count_nonzero(vt)),
            'flip/swapped': math.nan if math.isnan(score) else float(score < 0)}


def source_volumes_of(source_target: np.ndarray) -> np.ndarray:
    """Voxel counts per label value of the source map, already converted to target labels."""
    return _volumes(source_target)


def sample_statistics(image: np.ndarray, target: np.ndarray, source_volumes: np.ndarray,
                      labels: Sequence[int], generation: Optional[np.ndarray] = None) -> Dict[str, float]:
    """All statistics of one sample. ``image`` 3-D float in [0, 1]; ``target`` 3-D label values;
    ``source_volumes`` from :func:`source_volumes_of`; ``labels``: the target labels to report;
    ``generation``: the generation labels of the crop (3-D; without it, no background statistic)."""
    image = np.asarray(image, np.float32)
    target = np.asarray(target).astype(np.int64)
    if image.shape != target.shape or image.ndim != 3:
        raise ValueError(f"image {image.shape} and target {target.shape} must be the same 3-D shape")
    if generation is not None and np.shape(generation) != target.shape:
        raise ValueError(f"generation {np.shape(generation)} and target {target.shape} must be the same 3-D shape")
    out = intensity_stats(image, target, labels, None if generation is None else np.asarray(generation))
    out.update(high_frequency_stats(image))
    out.update(bias_stats(image, target))
    out.update(geometry_stats(target, source_volumes))
    out.update(label_stats(target, source_volumes))
    return out


def central_slices(image: np.ndarray, target: np.ndarray, prefix: str) -> Dict[str, np.ndarray]:
    """The three central orthogonal slices of image and target (for the side-by-side picture)."""
    out = {}
    for ax in range(3):
        c = image.shape[ax] // 2
        out[f'{prefix}/image/{ax}'] = np.take(np.asarray(image, np.float32), c, axis=ax)
        out[f'{prefix}/target/{ax}'] = np.take(np.asarray(target).astype(np.int16), c, axis=ax)
    return out


# --------------------------------------------------------------------------- comparison

BINARY_PREFIXES = ('flip/',)


def compare(ref: Sequence[Mapping[str, float]], ours: Sequence[Mapping[str, float]],
            alpha: float = 0.01, min_n: int = 5) -> List[dict]:
    """Two-sample test per statistic: Kolmogorov-Smirnov (Fisher's exact test for the binary
    ones), Bonferroni-corrected over the statistics tested. Rows sorted by p-value."""
    names = sorted(set().union(*[s.keys() for s in ref]) & set().union(*[s.keys() for s in ours]))
    rows = []
    for name in names:
        a = np.asarray([s.get(name, math.nan) for s in ref], np.float64)
        b = np.asarray([s.get(name, math.nan) for s in ours], np.float64)
        a, b = a[np.isfinite(a)], b[np.isfinite(b)]
        row = dict(stat=name, n_ref=int(a.size), n_ours=int(b.size),
                   median_ref=float(np.median(a)) if a.size else math.nan,
                   median_ours=float(np.median(b)) if b.size else math.nan)
        if a.size < min_n or b.size < min_n:
            row.update(test='n/a', effect=math.nan, p=math.nan)
        elif name.startswith(BINARY_PREFIXES):
            table = [[int(a.sum()), int(a.size - a.sum())], [int(b.sum()), int(b.size - b.sum())]]
            row.update(test='fisher', effect=float(b.mean() - a.mean()), p=float(stats.fisher_exact(table)[1]))
        else:
            res = stats.ks_2samp(a, b)
            row.update(test='ks', effect=float(res.statistic), p=float(res.pvalue))
        rows.append(row)
    m = sum(1 for r in rows if r['test'] != 'n/a')
    for r in rows:
        r['p_bonferroni'] = min(1.0, r['p'] * m) if r['test'] != 'n/a' else math.nan
        r['separates'] = bool(r['test'] != 'n/a' and r['p'] < alpha / m)
    return sorted(rows, key=lambda r: (math.isnan(r['p']), r['p']))


def summarise(rows: Sequence[dict]) -> Tuple[int, int, int]:
    """(tested, separated, not testable)."""
    tested = [r for r in rows if r['test'] != 'n/a']
    return len(tested), sum(r['separates'] for r in tested), len(rows) - len(tested)
