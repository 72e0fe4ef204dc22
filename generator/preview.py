"""Preview the generator: a PNG grid of synthetic samples, three orthogonal slices each, with the
segmentation target overlaid.

    python -m generator.preview [label_dir=DIR] [n=4] [out=generator_preview.png] [seed=0]
                                [config=default] [max_maps=N] [alpha=0.12]
                                [any generator parameter override, e.g.
                                 output_shape=[96,96,96] randomise_res=false]

Labels are drawn as coloured boundaries over a light tint (``alpha``) of each structure.

Run it on your own label maps before training: if the images do not look like brain MRI of
random contrast, or the labels do not sit on the anatomy, something is wrong.
"""
from __future__ import annotations

import sys
import time

import numpy as np

PREVIEW_KEYS = ('n', 'out', 'seed', 'config', 'max_maps', 'alpha')


def _parse(argv):
    opts = dict(n='4', out='generator_preview.png', seed='0', config='default', max_maps='0', alpha='0.12')
    overrides = []
    for a in argv:
        if a in ('-h', '--help'):
            print(__doc__)
            sys.exit(0)
        if '=' not in a:
            raise SystemExit(f"argument {a!r} is not of the form key=value (see --help)")
        k, v = a.split('=', 1)
        if k.lstrip('+') in PREVIEW_KEYS:
            opts[k.lstrip('+')] = v
        else:
            overrides.append(a)
    return opts, overrides


def label_colours(n: int, seed: int = 3) -> np.ndarray:
    """Distinct-ish RGB colours for ``n`` segmentation channels (background transparent)."""
    rng = np.random.default_rng(seed)
    cols = rng.uniform(0.15, 1.0, size=(n, 3))
    cols[0] = 0
    return cols


def render(images, targets, seg_labels, out_path, titles=None, alpha=0.12, targets_are_indices=False):
    """Write a grid: one row per sample, three columns (sagittal, coronal, axial mid-slices) of
    the first image channel with the target (label values, or softmax indices) in colour on top."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    seg_labels = np.asarray(seg_labels)
    cols = label_colours(len(seg_labels))
    n = len(images)
    fig, axes = plt.subplots(n, 3, figsize=(9, 3 * n), squeeze=False)
    for r in range(n):
        im = np.asarray(images[r])[..., 0]
        tg = np.asarray(targets[r])
        tg = tg if targets_are_indices else np.searchsorted(seg_labels, tg)
        c = [s // 2 for s in im.shape]
        slices = [(im[c[0]], tg[c[0]]), (im[:, c[1]], tg[:, c[1]]), (im[:, :, c[2]], tg[:, :, c[2]])]
        for j, (sl_im, sl_tg) in enumerate(slices):
            ax = axes[r, j]
            # RAS voxel axes: show with the second axis vertical, superior/anterior up
            ax.imshow(np.rot90(sl_im), cmap='gray', vmin=0, vmax=1, interpolation='nearest')
            # label boundaries in colour (opaque), label interiors lightly tinted
            edge = np.zeros(sl_tg.shape, bool)
            edge[1:] |= sl_tg[1:] != sl_tg[:-1]
            edge[:, 1:] |= sl_tg[:, 1:] != sl_tg[:, :-1]
            rgba = np.zeros(sl_tg.shape + (4,))
            rgba[..., :3] = cols[sl_tg]
            rgba[..., 3] = np.where(sl_tg > 0, np.where(edge, 0.9, alpha), 0.0)
            ax.imshow(np.rot90(rgba), interpolation='nearest')
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(('sagittal', 'coronal', 'axial')[j], fontsize=9)
        if titles:
            axes[r, 0].set_ylabel(titles[r], fontsize=7)
    fig.tight_layout()
    fig.savefig(out_path, dpi=80)
    plt.close(fig)


def main(argv=None):
    import jax

    from .sampler import build_params, load_config, load_label_maps, sample_with_info

    opts, overrides = _parse(sys.argv[1:] if argv is None else argv)
    cfg = load_config(opts['config'], overrides)
    params = build_params(cfg)
    t0 = time.perf_counter()
    bank = load_label_maps(cfg.label_dir, params.generation_labels, max_maps=int(opts['max_maps']) or None)
    print(f"loaded {len(bank)} label maps {tuple(bank.maps.shape[1:])} from {cfg.label_dir} "
          f"in {time.perf_counter() - t0:.1f} s")
    key = jax.random.key(int(opts['seed']))
    images, targets, titles = [], [], []
    for i in range(int(opts['n'])):
        k_pick, k_s = jax.random.split(jax.random.fold_in(key, i))
        idx = int(jax.random.randint(k_pick, (), 0, len(bank)))
        t = time.perf_counter()
        im, tg, info = sample_with_info(k_s, bank.maps[idx], params)
        im = np.asarray(im)
        dt = time.perf_counter() - t
        ch = info['channels'][0]
        res = np.asarray(ch['resolution']) if 'resolution' in ch else None
        res_txt = None if res is None else 'x'.join(f'{v:.1f}' for v in res)
        titles.append(f"map {idx}" + (f", {res_txt} mm" if res is not None else "")
                      + (", flipped" if bool(info.get('flipped', False)) else ""))
        print(f"sample {i}: {titles[-1]} ({dt:.1f} s)")
        images.append(im), targets.append(np.asarray(tg))
    render(images, targets, params.segmentation_labels, opts['out'], titles, float(opts['alpha']),
           targets_are_indices=cfg.target == 'indices')
    print(f"wrote {opts['out']}")


if __name__ == '__main__':
    main()
