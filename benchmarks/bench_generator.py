"""Benchmark of the synthetic-data generator (generator/): samples per second at the training
crop size, for batch 1 and vmapped batches, jit compile time, and where the time goes.

    python benchmarks/bench_generator.py [--shape 160] [--batches 1,2] [--iters 5] [--maps 2]
                                         [--factor 0.5] [--no-stages] [--step-seconds S]

Wall-clock and process CPU times are both reported, with the load average: the machine may be
shared, and CPU time per sample is the figure least disturbed by other jobs.
``--step-seconds`` is the duration of one training step of SynthSeg 2.0 at this crop size (to
report the generator's share of it).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from generator import intensity as inten  # noqa: E402
from generator import labels as lab  # noqa: E402
from generator import resolution as reso  # noqa: E402
from generator import spatial  # noqa: E402
from generator.sampler import GeneratorConfig, build_params, load_label_maps, make_sampler  # noqa: E402


def load():
    return os.getloadavg()[0]


def timed(fn, *args, iters=3):
    """(first-call seconds, fastest steady wall seconds per call, steady CPU seconds per call).

    The fastest of ``iters`` calls is the figure least inflated by other jobs on a shared
    machine; CPU time is the mean."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    walls = []
    c0 = time.process_time()
    for i in range(iters):
        w0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        walls.append(time.perf_counter() - w0)
    return first, min(walls), (time.process_time() - c0) / iters


def stage_table(bank, params, shape, iters):
    """Each step jitted on its own, on realistic inputs at the crop size."""
    cfg = params.config
    key = jax.random.key(0)
    lm = bank.maps[0]
    rows = []

    def run(name, fn, *args):
        f = jax.jit(fn)
        first, wall, cpu = timed(f, *args, iters=iters)
        rows.append((name, first - wall, wall, cpu))
        return f(*args)

    run('velocity field: draw, upsample, integrate',
        lambda k: spatial.sample_displacement(k, lm.shape, cfg.nonlin_std, cfg.nonlin_scale, cfg.nonlin_int_steps,
                                              cfg.nonlin_integration_factor)[0], key)
    labels = run('deform + crop (incl. velocity field), nearest resampling',
                 lambda k, m: spatial.deform_and_crop(k, m, shape, nonlin_std=cfg.nonlin_std,
                                                      nonlin_scale=cfg.nonlin_scale,
                                                      integration_factor=cfg.nonlin_integration_factor), key, lm)
    labels = run('flip with label swap',
                 lambda l: lab.flip_lr(l, jnp.bool_(True), np.asarray(params.flip_lut, np.int32)), labels)
    cls = jnp.asarray(params.class_of_label)

    def gmm(k, l):
        m, s = inten.sample_gmm_params(k, params.n_classes)
        return inten.sample_gmm(k, l, m[cls], s[cls])
    image = run('GMM parameters + sampling', gmm, key, labels)
    run('  of which N(0,1) noise', lambda k: jax.random.normal(k, shape), key)
    image = run('bias field', lambda k, x: inten.apply_bias_field(k, x, cfg.bias_field_std, cfg.bias_scale,
                                                                  True)[0], key, image)
    image = run('clip, normalise, gamma', lambda k, x: inten.intensity_augmentation(k, x, cfg.clip, True,
                                                                                    cfg.gamma_std), key, image)
    run('resolution: blur + down/up-sampling', lambda k, x: reso.randomise_resolution(k, x, shape), key, image)
    run('label conversion', lambda l: lab.convert(l, np.asarray(params.output_values)), labels)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--shape', type=int, default=160)
    ap.add_argument('--batches', default='1,2')
    ap.add_argument('--iters', type=int, default=5)
    ap.add_argument('--maps', type=int, default=2, help='label maps loaded into the bank')
    ap.add_argument('--factor', type=float, nargs='+', default=[0.5, 0.25],
                    help='nonlin_integration_factor values to compare')
    ap.add_argument('--no-stages', action='store_true')
    ap.add_argument('--step-seconds', type=float, default=None)
    a = ap.parse_args(argv)

    shape = (a.shape,) * 3
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, {os.cpu_count()} CPUs, "
          f"load average {load():.1f} at start")
    cfg0 = GeneratorConfig(output_shape=shape)
    params0 = build_params(cfg0)
    t = time.perf_counter()
    bank = load_label_maps(cfg0.label_dir, params0.generation_labels, max_maps=a.maps)
    print(f"label bank: {len(bank)} maps {tuple(bank.maps.shape[1:])} uint8 loaded in "
          f"{time.perf_counter() - t:.1f} s ({bank.maps.nbytes / 2 ** 20:.0f} MiB on device)")

    print(f"\n| crop | integration grid | batch | compile (s) | wall s / batch (fastest) | samples/s | CPU s / sample | load |")
    print("|---|---|---|---|---|---|---|---|")
    results = {}
    for factor in a.factor:
        params = build_params(cfg0.replace(nonlin_integration_factor=factor))
        for b in [int(x) for x in a.batches.split(',')]:
            fn = make_sampler(params, None if b == 1 else b)
            key = jax.random.key(1)
            la = load()
            first, wall, cpu = timed(fn, key, bank.maps, iters=a.iters)
            results[(factor, b)] = wall / b
            grid = int(256 * factor)
            print(f"| {a.shape}^3 | {grid}^3 ({factor}) | {b} | {first - wall:.1f} | {wall:.2f} | "
                  f"{b / wall:.2f} | {cpu / b:.2f} | {la:.1f}-{load():.1f} |", flush=True)

    if a.step_seconds:
        for (factor, b), per in results.items():
            print(f"share of a {a.step_seconds:.0f} s training step (factor {factor}, batch {b}): "
                  f"{100 * per / a.step_seconds:.1f}%")

    if not a.no_stages:
        params = build_params(cfg0.replace(nonlin_integration_factor=a.factor[0]))
        print(f"\nwhere the time goes ({a.shape}^3, batch 1, integration factor {a.factor[0]}; each step "
              f"jitted alone):\n")
        print("| step | compile (s) | wall s | CPU s |")
        print("|---|---|---|---|")
        for name, comp, wall, cpu in stage_table(bank, params, shape, a.iters):
            print(f"| {name} | {comp:.1f} | {wall:.3f} | {cpu:.3f} |", flush=True)
    print(f"\nload average {load():.1f} at end")


if __name__ == '__main__':
    main()
