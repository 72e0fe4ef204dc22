"""XLA's memory plan of predict's compiled programs, per mode, at one padded input shape.

    python benchmarks/bench_forward_memory.py [--models DIR] [--shape 224x256x192]
                                              [--modes default,fast,v1,robust,qc,parc,parc+qc]

Compiles (does not run) the network forward and the finishing step of ``Predictor`` for each
mode and prints the sizes of XLA's buffer plan: temporaries (the one preallocated scratch buffer,
i.e. the peak of everything else that is live at once), outputs and arguments (the image and the
weights); where the parcellation runs in slabs after the clean-up, its two programs' temporaries
and outputs (the encoder's skips stay while each slab is decoded); in robust mode, the program
of the cascade's first two stages, which runs before the forward. A scan's peak memory is about the forward's total plus the Python process (~1 GB) and
the host's copies of the results. 224x256x192 is the padded network input of the MNI T1
(197x233x189 at 1 mm). Compiling one mode at that shape takes 10-30 s here.
"""

from __future__ import annotations

import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = {
    "default": {},
    "fast": {"fast": True},
    "v1": {"v1": True},
    "robust": {"robust": True},
    "qc": {"qc": True},
    "parc": {"parc": True},
    "parc+qc": {"parc": True, "qc": True},
}


def plan(models: str, mode_name: str, shape: tuple[int, ...]) -> dict[str, float]:
    """Gigabytes of XLA's plan for the forward and the finishing step of one mode."""
    from synthseg_jax.inference.network import Mode, Predictor, load_networks

    mode = Mode(**MODES[mode_name])
    predictor = Predictor(load_networks(models, mode), mode)
    forward = predictor.compiled(shape).memory_analysis()
    finish = predictor.compiled_finish(shape).memory_analysis()
    gb = 1e9
    parc = predictor._compiled_parc.get(shape)   # the parcellation in slabs, after the clean-up
    parc_gb = 0.0
    if parc is not None:
        encode, slab = (p.memory_analysis() for p in parc)
        parc_gb = (encode.temp_size_in_bytes + encode.output_size_in_bytes
                   + slab.temp_size_in_bytes + slab.output_size_in_bytes) / gb
    groups = predictor._compiled_groups.get(shape)   # robust: the cascade's first two stages
    groups_gb = 0.0
    if groups is not None:
        m = groups.memory_analysis()
        groups_gb = (m.temp_size_in_bytes + m.output_size_in_bytes + m.argument_size_in_bytes) / gb
    return {"parc_slabs": parc_gb, "groups": groups_gb, "temp": forward.temp_size_in_bytes / gb, "out": forward.output_size_in_bytes / gb,
            "args": forward.argument_size_in_bytes / gb,
            "finish_temp": finish.temp_size_in_bytes / gb,
            "finish_extra_out": (finish.output_size_in_bytes - finish.alias_size_in_bytes) / gb,
            "compile_s": predictor.compile_seconds[shape]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=os.path.join(REPO, ".parity", "models"))
    parser.add_argument("--shape", default="224x256x192")
    parser.add_argument("--modes", default=",".join(MODES))
    args = parser.parse_args()
    shape = tuple(int(s) for s in args.shape.split("x"))
    print(f"XLA buffer plan at padded shape {args.shape} (GB; models {args.models})", file=sys.stderr)
    print("| mode | forward temporaries | forward outputs | arguments | forward total | "
          "finish temporaries | finish new outputs | parcellation in slabs | "
          "robust first stages (total) | compile s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.modes.split(","):
        p = plan(args.models, name, shape)
        total = p["temp"] + p["out"] + p["args"]
        print(f"| {name} | {p['temp']:.2f} | {p['out']:.2f} | {p['args']:.2f} | {total:.2f} | "
              f"{p['finish_temp']:.2f} | {p['finish_extra_out']:.2f} | {p['parc_slabs']:.2f} | "
              f"{p['groups']:.2f} | {p['compile_s']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
