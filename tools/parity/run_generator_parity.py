"""Generator parity: the original SynthSeg BrainGenerator against our ``generator/``, as
distributions of per-sample statistics (``generator_stats.py``) from the same label maps with
the same settings (``generator_settings.py``).

    .venv/bin/python tools/parity/run_generator_parity.py [--settings 2.0,robust,t1] \
        [--maps 1,6,11,16] [--n-per-map 5] [--shape 160] [--seeds 0] [--work-dir .parity/generator] \
        [--synthseg .parity/SynthSeg] [--tf-python .parity/venv/bin/python] [--reuse] \
        [--png benchmarks/generator_parity.png] [--json results.json]

The original side runs ``original_generator.py`` in the TensorFlow environment (a subprocess,
``nice``d); ours runs here. Both write ``WORK/<shape>/<setting>/{original,ours}/seed<s>/sample_<map>_<k>.npz``
(RAS image, target and the crop's generation labels) and ``done.json`` (seconds per sample,
seeds, file format); the statistics are computed here
from those files, the same way for both, then ``comparison.json``, and a markdown table of every
statistic with its test, effect (KS distance, or difference of proportions) and
Bonferroni-corrected p-value; then ``generator parity: N passed, M failed`` over settings x
statistics. Exit code 1 if any statistic separates at the corrected 1 %. ``--reuse`` keeps a
side's finished samples of the same shape, count, maps and seed (e.g. to re-run only ours after
a fix, or to change a statistic without sampling again). ``--seeds 0,1`` pools independent runs
(e.g. run by hand at the same time with ``--only original --seeds 1``). Base seed ``s`` of setting
``x`` draws from ``generator_settings.stream_seed(x, s)`` (``s`` plus a fixed per-setting offset)
on both sides, so settings are independent of each other; folders are named by the base seed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Dict, List

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [HERE, REPO]

import generator_settings  # noqa: E402
import generator_stats as gs  # noqa: E402


def done_matches(folder: str, setting: str, shape: int, n_per_map: int, paths: List[str], seed: int) -> bool:
    """A finished run of the same file format, shape, sample count, maps and seeds is in ``folder``."""
    try:
        with open(os.path.join(folder, 'done.json')) as f:
            d = json.load(f)
    except (OSError, ValueError):
        return False
    return (d.get('format'), d.get('shape'), d.get('n_per_map'), [os.path.abspath(p) for p in d.get('maps', [])],
            d.get('seed'), d.get('stream_seed')) \
        == (generator_settings.SAMPLE_FORMAT, shape, n_per_map, paths, seed,
            generator_settings.stream_seed(setting, seed))


def run_ours(setting: str, paths: List[str], shape: int, n_per_map: int, seed: int, folder: str) -> None:
    """Our samples, written like the original's (``sample_<map>_<k>.npz``: image, target,
    generation labels of the crop; ``done.json``), plus the drawn flip (to check the swap
    statistic against the truth). ``seed`` is the base seed (see ``stream_seed``)."""
    import jax
    from generator import build_params, load_config, load_label_maps, sample_with_info
    name, overrides = generator_settings.ours(setting)
    params = build_params(load_config(name, overrides + [f'output_shape=[{shape},{shape},{shape}]']))
    os.makedirs(folder, exist_ok=True)
    seconds = []
    stream_seed = generator_settings.stream_seed(setting, seed)
    key = jax.random.key(stream_seed)
    generation_labels = np.asarray(params.generation_labels, np.int64)
    for i, path in enumerate(paths):
        label_map = load_label_maps(path, params.generation_labels).maps[0]
        for k in range(n_per_map):
            t0 = time.time()
            image, target, info = sample_with_info(jax.random.fold_in(key, i * 100000 + k), label_map, params)
            image, target = np.asarray(image[..., 0]), np.asarray(target)
            generation = generation_labels[np.asarray(info['labels'])]     # indices -> label values
            seconds.append(time.time() - t0)
            np.savez_compressed(os.path.join(folder, f'sample_{i}_{k}.npz'), image=image.astype(np.float32),
                                target=target.astype(np.int16), generation=generation.astype(np.int16),
                                flipped=bool(info.get('flipped', False)))
            print(f"[ours {setting}] map {i} sample {k}: {seconds[-1]:.1f} s", flush=True)
    with open(os.path.join(folder, 'done.json'), 'w') as f:
        json.dump(dict(seconds=seconds, setting=setting, shape=shape, n_per_map=n_per_map, maps=paths,
                       seed=seed, stream_seed=stream_seed, format=generator_settings.SAMPLE_FORMAT), f)


def run_original(a, setting: str, paths: List[str], labels_npy: str, folder: str, seed: int) -> None:
    cmd = ['nice', '-n', str(a.nice), a.tf_python, os.path.join(HERE, 'original_generator.py'),
           '--synthseg', a.synthseg, '--priors', a.priors, '--output-labels', labels_npy,
           '--setting', setting, '--shape', str(a.shape), '--n-per-map', str(a.n_per_map),
           '--seed', str(seed), '--out', folder] + paths
    print('$ ' + ' '.join(cmd), flush=True)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', CUDA_VISIBLE_DEVICES='')
    subprocess.run(cmd, check=True, env=env)


def folder_statistics(folder: str, n_maps: int, n_per_map: int, source_volumes: List[np.ndarray],
                      labels: List[int]) -> List[Dict[str, float]]:
    out = []
    for i in range(n_maps):
        for k in range(n_per_map):
            path = os.path.join(folder, f'sample_{i}_{k}.npz')
            with np.load(path) as z:
                if 'generation' not in z.files:
                    raise ValueError(f"{path}: no generation labels (a run of an older format: draw it again)")
                out.append(gs.sample_statistics(z['image'], z['target'], source_volumes[i], labels, z['generation']))
    return out


def flip_detection(folders: List[str], n_maps: int, n_per_map: int, stats: List[Dict[str, float]]) -> dict:
    """How often ``flip/swapped`` matches our drawn flip, where the statistic is defined."""
    truth = []
    for folder in folders:
        for i in range(n_maps):
            for k in range(n_per_map):
                with np.load(os.path.join(folder, f'sample_{i}_{k}.npz')) as z:
                    truth.append(bool(z['flipped']) if 'flipped' in z.files else None)
    pairs = [(t, s['flip/swapped']) for t, s in zip(truth, stats) if t is not None and np.isfinite(s['flip/swapped'])]
    return dict(observable=len(pairs), of=len(truth), correct=sum(t == bool(e) for t, e in pairs))


def seconds_per_sample(folder: str) -> float:
    with open(os.path.join(folder, 'done.json')) as f:
        return float(np.median(json.load(f)['seconds']))


def markdown(setting: str, rows: List[dict]) -> str:
    lines = [f'### {setting}', '', '| statistic | n orig / ours | median orig | median ours | test | effect | p (Bonferroni) | |',
             '|---|---|---|---|---|---|---|---|']
    for r in rows:
        mark = 'n/a' if r['test'] == 'n/a' else ('**separates**' if r['separates'] else 'ok')
        lines.append(f"| {r['stat']} | {r['n_ref']} / {r['n_ours']} | {r['median_ref']:.4g} | {r['median_ours']:.4g} "
                     f"| {r['test']} | {r['effect']:.3f} | {r['p_bonferroni']:.3g} | {mark} |")
    if any(r['stat'].startswith(gs.GEOMETRY_PREFIXES) for r in rows):
        lines += ['', f'Note: {gs.GEOMETRY_NOTE}']
    return '\n'.join(lines)


def picture(png: str, per_setting: Dict[str, tuple], caption: str) -> None:
    """Rows: setting x map; columns: the original's three central slices, then ours; the
    comparison's outcome as the title."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    rows = []
    for setting, (folder, n_maps, seed) in per_setting.items():
        for m in range(n_maps):
            sides = []
            for side in ('original', 'ours'):
                with np.load(os.path.join(folder, side, f'seed{seed}', f'sample_{m}_0.npz')) as z:
                    sides.append([np.take(z['image'], z['image'].shape[ax] // 2, axis=ax) for ax in range(3)])
            rows.append((f'{setting}, map {m}', sides[0], sides[1]))
    fig, axes = plt.subplots(len(rows), 6, figsize=(12, 2.1 * len(rows)), squeeze=False)
    for r, (title, orig, ours) in enumerate(rows):
        for c, sl in enumerate(orig + ours):
            ax = axes[r, c]
            ax.imshow(np.rot90(sl), cmap='gray', vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(('original ' if c < 3 else 'ours ') + ('sagittal', 'coronal', 'axial')[c % 3], fontsize=9)
        axes[r, 0].set_ylabel(title, fontsize=8)
    fig.suptitle(caption, fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=60)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--settings', default='2.0,robust,t1')
    ap.add_argument('--maps', default='1,6,11,16', help='indices of training_seg_XX.nii.gz')
    ap.add_argument('--label-dir', default=os.path.join(REPO, '..', 'shared', 'data', 'synthseg', 'training_label_maps'))
    ap.add_argument('--priors', default=os.path.join(REPO, '..', 'shared', 'data', 'synthseg', 'labels_classes_priors'))
    ap.add_argument('--n-per-map', type=int, default=5)
    ap.add_argument('--shape', type=int, default=160)
    ap.add_argument('--seeds', default='0', help='comma-separated base seeds in [0, 1e6); each is one run per side, pooled; '
                    'setting x draws from generator_settings.stream_seed(x, seed)')
    ap.add_argument('--work-dir', default=os.path.join(REPO, '.parity', 'generator'))
    ap.add_argument('--synthseg', default=os.path.join(REPO, '.parity', 'SynthSeg'))
    ap.add_argument('--tf-python', default=os.path.join(REPO, '.parity', 'venv', 'bin', 'python'))
    ap.add_argument('--nice', type=int, default=5)
    ap.add_argument('--reuse', action='store_true')
    ap.add_argument('--only', choices=('original', 'ours'), default=None,
                    help='only draw this side\'s samples (no comparison), e.g. to run the two at once')
    ap.add_argument('--alpha', type=float, default=0.01)
    ap.add_argument('--png', default=None)
    ap.add_argument('--json', default=None)
    a = ap.parse_args(argv)

    paths = [os.path.abspath(os.path.join(a.label_dir, f'training_seg_{int(i):02d}.nii.gz')) for i in a.maps.split(',')]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        print(f"{missing[0]}: no such label map", file=sys.stderr)
        return 2
    try:                        # every (setting, seed) has its own stream: check before drawing
        streams = [generator_settings.stream_seed(x, int(v)) for x in a.settings.split(',') for v in a.seeds.split(',')]
    except (KeyError, ValueError) as e:
        print(f"--settings {a.settings} --seeds {a.seeds}: {e}", file=sys.stderr)
        return 2
    if len(set(streams)) != len(streams):
        print(f"--settings {a.settings} --seeds {a.seeds}: a setting or seed is given twice", file=sys.stderr)
        return 2
    a.synthseg, a.priors = os.path.abspath(a.synthseg), os.path.abspath(a.priors)
    from generator import build_params, load_config, load_label_maps
    results, folders, passed, failed = {}, {}, 0, 0
    seeds = [int(v) for v in a.seeds.split(',')]
    for setting in a.settings.split(','):
        folder = os.path.join(a.work_dir, str(a.shape), setting)
        os.makedirs(folder, exist_ok=True)
        folders[setting] = (folder, len(paths), seeds[0])
        name, overrides = generator_settings.ours(setting)
        params = build_params(load_config(name, overrides))
        values = np.asarray(params.output_values, np.int64)
        labels_npy = os.path.join(folder, 'output_labels.npy')   # the same target table for both sides
        np.save(labels_npy, values)
        timing = {}
        for side in ('original', 'ours'):
            if a.only and side != a.only:
                continue
            t0 = time.time()
            for seed in seeds:
                sub = os.path.join(folder, side, f'seed{seed}')
                if a.reuse and done_matches(sub, setting, a.shape, a.n_per_map, paths, seed):
                    print(f"[{side} {setting}] reusing {sub}")
                elif side == 'original':
                    run_original(a, setting, paths, labels_npy, sub, seed)
                else:
                    run_ours(setting, paths, a.shape, a.n_per_map, seed, sub)
            timing[side] = (time.time() - t0, float(np.median(
                [seconds_per_sample(os.path.join(folder, side, f'seed{seed}')) for seed in seeds])))
        if a.only:
            continue
        source = [gs.source_volumes_of(values[np.asarray(load_label_maps(p, params.generation_labels).maps[0])])
                  for p in paths]
        labels = sorted(int(v) for v in np.unique(values))
        subs = {side: [os.path.join(folder, side, f'seed{seed}') for seed in seeds] for side in ('original', 'ours')}
        ref, ours = [[st for sub in subs[side] for st in folder_statistics(sub, len(paths), a.n_per_map, source, labels)]
                     for side in ('original', 'ours')]
        rows = gs.compare(ref, ours, a.alpha)
        flips = flip_detection(subs['ours'], len(paths), a.n_per_map, ours)
        tested, separated, untestable = gs.summarise(rows)
        passed, failed = passed + tested - separated, failed + separated
        results[setting] = dict(rows=rows, tested=tested, separated=separated, untestable=untestable,
                                flip_detection_ours=flips, wall_s={k: v[0] for k, v in timing.items()},
                                s_per_sample={k: v[1] for k, v in timing.items()})
        with open(os.path.join(folder, 'comparison.json'), 'w') as f:
            json.dump(results[setting], f, indent=1)
        print(markdown(setting, rows))
        print(f"\n{setting}: {tested} statistics tested, {separated} separate, {untestable} not testable; "
              f"median s/sample original {timing['original'][1]:.1f}, ours {timing['ours'][1]:.1f}; "
              f"swap statistic defined in {flips['observable']}/{flips['of']} of our samples, "
              f"right about our drawn flip in {flips['correct']} of them\n", flush=True)
    if a.only:
        return 0
    if a.png:
        caption = (f"{a.shape}^3, {len(seeds) * len(paths) * a.n_per_map} samples a side; " + '; '.join(
            f"{k}: {v['separated']} of {v['tested']} statistics separate" for k, v in results.items())
            + f" (Bonferroni {a.alpha:g}); first sample of seed {seeds[0]} per map, independent draws")
        picture(a.png, folders, caption)
    if a.json:
        with open(a.json, 'w') as f:
            json.dump(results, f, indent=1)
    print(f"generator parity: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
