"""Seconds per forward of each network ``predict`` runs, alone, at the MNI T1's padded size: where
a mode's network time goes, and what a change to one network gains, without the noise of a whole
scan around it.

    python benchmarks/bench_network_forwards.py [--models .parity/models] [--networks seg,parc,qc]
                                                [--precisions float32,bf16] [--repeats 3]

Each network is compiled once (as ``predict`` compiles, XLA's own fusions) and then run
``--repeats`` times on a fixed random input; the median is printed. Inputs: the 2.0 segmenter on
one image channel and the parcellation U-Net on the image and its two cortex-mask channels, both at
224x256x192 (the MNI T1 padded); the QC network on a random one-hot QC-class map of its 224^3 crop.
To compare two versions of the code, run this script from each (e.g. a ``git archive`` of the
older one on ``PYTHONPATH``) one after the other.
"""
from __future__ import annotations

import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench_lowres_path import timed  # noqa: E402
from bench_qc_model import host  # noqa: E402
from synthseg_jax.inference.network import COMPILER_OPTIONS, Mode, load_networks  # noqa: E402

PADDED_MNI = (224, 256, 192)


def network_inputs(nets, rng: np.random.Generator) -> dict[str, tuple]:
    """Per network: its module, its variables and an input of the size predict gives it."""
    image = jnp.asarray(rng.standard_normal((1,) + PADDED_MNI + (1,), dtype=np.float32))
    cortex = jax.nn.one_hot(rng.integers(0, 2, (1,) + PADDED_MNI), 2, dtype=jnp.float32)
    crop = (nets.qc_crop_size,) * 3
    qc_classes = jax.nn.one_hot(rng.integers(0, nets.tables.n_qc, (1,) + crop), nets.tables.n_qc,
                                dtype=jnp.float32)
    return {"seg": (nets.segmenter, nets.variables["seg"], image),
            "parc": (nets.parc, nets.variables["parc"], jnp.concatenate([image, cortex], axis=-1)),
            "qc": (nets.qc, nets.variables["qc"], qc_classes)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=os.path.join(REPO, ".parity", "models"))
    parser.add_argument("--networks", default="seg,parc,qc")
    parser.add_argument("--precisions", default="float32")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    rows = []
    for precision in args.precisions.split(","):
        dtype = "bfloat16" if precision == "bf16" else precision
        nets = load_networks(args.models, Mode(parc=True, qc=True), conv_dtype=dtype)
        inputs = network_inputs(nets, np.random.default_rng(0))
        for name in args.networks.split(","):
            module, variables, x = inputs[name]
            seconds, _ = timed(module.apply, variables, x, repeats=args.repeats,
                               compiler_options=COMPILER_OPTIONS)
            rows.append((name, precision, "x".join(map(str, x.shape[1:])), seconds))
            print(f"{name} {precision}: {seconds:.2f} s", file=sys.stderr, flush=True)

    print(f"host: {host()}; load {' '.join(f'{v:.1f}' for v in os.getloadavg())}; "
          f"median of {args.repeats} after a compiling call")
    print("\n| network | precision | input | seconds per forward |\n|---|---|---|---|")
    for name, precision, shape, seconds in rows:
        print(f"| {name} | {precision} | {shape} | {seconds:.2f} |")


if __name__ == "__main__":
    main()
