"""The overlay PNG: three orthogonal slices through the segmentation, the scan in grey under the
labels in FreeSurfer's colours (our addition; the original has no such output)."""

from __future__ import annotations

import io

import numpy as np

from synthseg_jax.geometry import RasAlignment


# FreeSurfer colours (FreeSurferColorLUT.txt) for every label SynthSeg can output
_ASEG_COLOURS = {
    0: (0, 0, 0), 2: (245, 245, 245), 3: (205, 62, 78), 4: (120, 18, 134), 5: (196, 58, 250),
    7: (220, 248, 164), 8: (230, 148, 34), 10: (0, 118, 14), 11: (122, 186, 220),
    12: (236, 13, 176), 13: (12, 48, 255), 14: (204, 182, 142), 15: (42, 204, 164),
    16: (119, 159, 176), 17: (220, 216, 20), 18: (103, 255, 255), 24: (60, 60, 60),
    26: (255, 165, 0), 28: (165, 42, 42), 41: (245, 245, 245), 42: (205, 62, 78),
    43: (120, 18, 134), 44: (196, 58, 250), 46: (220, 248, 164), 47: (230, 148, 34),
    49: (0, 118, 14), 50: (122, 186, 220), 51: (236, 13, 176), 52: (13, 48, 255),
    53: (220, 216, 20), 54: (103, 255, 255), 58: (255, 165, 0), 60: (165, 42, 42),
}
# ctx-lh-* are 1000 + i, ctx-rh-* 2000 + i, with the same colour for both hemispheres.
_CORTEX_COLOURS = [
    (25, 5, 25), (25, 100, 40), (125, 100, 160), (100, 25, 0), (120, 70, 50), (220, 20, 100),
    (220, 20, 10), (180, 220, 140), (220, 60, 220), (180, 40, 120), (140, 20, 140), (20, 30, 140),
    (35, 75, 50), (225, 140, 140), (200, 35, 75), (160, 100, 50), (20, 220, 60), (60, 220, 60),
    (220, 180, 140), (20, 100, 50), (220, 60, 20), (120, 100, 60), (220, 20, 20), (220, 180, 220),
    (60, 20, 220), (160, 140, 180), (80, 20, 140), (75, 50, 125), (20, 220, 160), (20, 180, 140),
    (140, 220, 220), (80, 160, 20), (100, 0, 100), (70, 70, 70), (150, 150, 200), (255, 192, 32),
]


def freesurfer_colour(label: int) -> tuple[int, int, int]:
    label = int(label)
    if label in _ASEG_COLOURS:
        return _ASEG_COLOURS[label]
    if 1000 <= label < 1000 + len(_CORTEX_COLOURS):
        return _CORTEX_COLOURS[label - 1000]
    if 2000 <= label < 2000 + len(_CORTEX_COLOURS):
        return _CORTEX_COLOURS[label - 2000]
    # Not in the table: a stable pseudo-random colour.
    rng = np.random.default_rng(label)
    return tuple(int(c) for c in rng.integers(40, 256, 3))


def colourise(seg: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 RGB of a label map."""
    values, inverse = np.unique(seg, return_inverse=True)
    lut = np.array([freesurfer_colour(v) for v in values], dtype=np.uint8)
    return lut[inverse.reshape(seg.shape)]


def overlay_png(image: np.ndarray, seg: np.ndarray, affine: np.ndarray, title: str = "",
                alpha: float = 0.45, dpi: int = 100) -> bytes:
    """PNG bytes: sagittal, coronal and axial slices through the segmentation's centre, the scan
    in grey under the labels in FreeSurfer colours. ``image`` and ``seg`` share ``affine``; the
    figure is 12 x 4.4 inches at ``dpi`` (the report uses fewer dots to stay small)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    alignment = RasAlignment.from_affine(affine)
    image = np.asarray(alignment.to_ras(image), dtype=np.float64)
    seg = alignment.to_ras(seg)
    zooms = np.sqrt(np.sum(alignment.ras_affine(affine, seg.shape)[:3, :3] ** 2, axis=0))
    brain = np.argwhere(seg > 0)
    centre = (brain.mean(axis=0) if len(brain) else np.array(seg.shape) / 2).astype(int)

    low, high = np.percentile(image, [0.5, 99.5])
    grey = np.clip((image - low) / (high - low if high > low else 1.0), 0, 1)
    colours = colourise(seg).astype(np.float64) / 255
    labelled = (seg > 0)[..., None]
    rgb = np.where(labelled, (1 - alpha) * grey[..., None] + alpha * colours, grey[..., None])

    views = [  # (slice, display axes (horizontal, vertical) in RAS, name)
        (np.s_[centre[0], :, :], (1, 2), "sagittal"),
        (np.s_[:, centre[1], :], (0, 2), "coronal"),
        (np.s_[:, :, centre[2]], (0, 1), "axial"),
    ]
    figure = Figure(figsize=(12, 4.4), dpi=dpi)
    FigureCanvasAgg(figure)
    for i, (index, (h_axis, v_axis), name) in enumerate(views):
        ax = figure.add_subplot(1, 3, i + 1)
        plane = np.transpose(rgb[index], (1, 0, 2))  # rows = vertical axis
        ax.imshow(plane, origin="lower", interpolation="nearest",
                  aspect=zooms[v_axis] / zooms[h_axis])
        ax.set_title(name)
        ax.axis("off")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
