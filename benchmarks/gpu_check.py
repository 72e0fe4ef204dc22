"""Prediction in every mode and the published 2.0's training step on a GPU, checked against the CPU.

Two halves, because the GPU machine has no network, a newer jax (without the oneDNN convolutions
that make the CPU side fast) and none of ``../shared``:

    python benchmarks/gpu_check.py prepare DIR [--size 256] [--tiny]   # here, on the CPU
    python benchmarks/gpu_check.py check DIR                           # there (gpu_check.sh)

``prepare`` writes into DIR a models folder of seeded random weights (the published sizes, or
tiny ones with ``--tiny``), the label tables, a test scan (the MNI T1 centred in a SIZE^3 1 mm
grid), two training label maps with their generator tables, and the CPU's outputs of every mode
(segmentation, volumes, QC) with their times. ``check`` runs the same commands on the default
device, compares with the CPU's outputs (voxel agreement of the segmentations, largest relative
volume difference, largest QC difference), times a training step of the published 2.0 at 160^3
(``--train-size``), and prints one markdown table for BENCHMARKS.md.

Random weights: Glorot kernels, BatchNorm statistics calibrated by one training-mode pass on the
scan, and logits scaled to be peaky, so that a wrong kernel changes the argmax rather than hiding
in near-uniform posteriors.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(REPO, "..", "shared", "data", "synthseg")
MODES = {  # mode -> mri_synthseg_jax flags (the drop-in command line is the stable interface)
    "default": [],
    "fast": ["--fast"],
    "v1": ["--v1"],
    "robust": ["--robust"],
    "parc": ["--parc"],
    "qc": ["--qc", "{qc}"],
    "parc+qc": ["--parc", "--qc", "{qc}"],
}
TRAIN_MAPS = ("training_seg_01.nii.gz", "training_seg_02.nii.gz")


# --------------------------------------------------------------------------- prepare (CPU)

def random_variables(module, in_channels: int, image: np.ndarray, seed: int) -> dict:
    """Seeded Glorot weights, BatchNorm statistics of one training-mode pass on ``image``, final
    layers scaled so the logits have a standard deviation of about 3."""
    import jax
    import jax.numpy as jnp

    x = jnp.asarray(np.repeat(image[None, ..., None], in_channels, -1))
    variables = jax.jit(module.init)(jax.random.key(seed), x)
    rng = np.random.default_rng(seed)

    def bias(path, leaf):
        name = getattr(path[-1], "key", "")
        return rng.uniform(-0.05, 0.05, leaf.shape).astype(np.float32) if name == "bias" else leaf

    variables = {**variables, "params": jax.tree_util.tree_map_with_path(bias, variables["params"])}
    _, stats = jax.jit(lambda v: module.apply(v, x, train=True, mutable=["batch_stats"]))(variables)
    variables = {**variables, **stats}
    out = np.asarray(jax.jit(module.apply)(variables, x))
    scale = 3.0 / max(float(out.std()), 1e-6)

    def sharpen(path, leaf):
        names = [getattr(p, "key", "") for p in path]
        final = any(n.endswith("likelihood") or n.startswith("qc_final") for n in names)
        return leaf * scale if final and names[-1] == "kernel" else leaf

    variables["params"] = jax.tree_util.tree_map_with_path(sharpen, variables["params"])
    return jax.tree_util.tree_map(np.asarray, variables)


def make_models(out: str, image: np.ndarray, tiny: bool) -> None:
    from synthseg_jax.labels import LabelTables
    from synthseg_jax.nn.synthseg import QCRegressor, RobustCascade, Segmenter
    from synthseg_jax.nn.unet import EncoderConfig, UNetConfig
    from synthseg_jax.weights.keras_h5 import save_keras_h5
    from synthseg_jax.weights.models_dir import MODEL_FILES, build_network, label_version

    labels_dir = os.path.join(SHARED, "labels_classes_priors")
    os.makedirs(out, exist_ok=True)
    for table in os.listdir(labels_dir):
        if table.startswith("synthseg_") and table.endswith(".npy"):
            shutil.copy(os.path.join(labels_dir, table), out)
    small = dict(nb_features=4, nb_levels=3)
    for seed, kind in enumerate(MODEL_FILES):
        tables = LabelTables.load(out, label_version(kind))
        module, channels = build_network(kind, tables)
        if tiny:
            module = {
                "1.0": lambda: Segmenter(UNetConfig("unet", tables.n_labels, **small)),
                "2.0": lambda: Segmenter(UNetConfig("unet", tables.n_labels, **small)),
                "parc": lambda: Segmenter(UNetConfig("unet_parc", len(tables.parcellation), **small)),
                "robust": lambda: RobustCascade(
                    n_groups=tables.n_groups, n_labels=tables.n_labels,
                    first=UNetConfig("unet", tables.n_groups, **small),
                    denoiser=UNetConfig("l2l", tables.n_groups, conv_size=5, skip_n_concatenations=2,
                                        **small),
                    second=UNetConfig("unet2", tables.n_labels, **small)),
                "qc": lambda: QCRegressor(n_qc_labels=tables.n_qc, encoder=EncoderConfig(
                    "qc", nb_features=2, nb_levels=2, conv_size=3)),
            }[kind]()
        calib = image if kind != "qc" else np.clip(image, 0, 1)
        side = 224 if kind == "qc" and not tiny else (32 if tiny else 96)
        crop = centre_crop(calib, side)
        save_keras_h5(random_variables(module, channels, crop, seed), os.path.join(out, MODEL_FILES[kind]),
                      voxel_size=1.0)


def centre_crop(image: np.ndarray, side: int) -> np.ndarray:
    starts = [max((s - side) // 2, 0) for s in image.shape]
    crop = image[tuple(slice(a, a + side) for a in starts)]
    return np.pad(crop, [(0, side - s) for s in crop.shape])


def make_scan(path: str, size: int | tuple[int, int, int]) -> np.ndarray:
    """The MNI T1 (nilearn's copy) centred in a ``size``^3 (or ``size``) 1 mm grid, cropped where
    larger."""
    import nibabel as nib
    import nilearn

    src = os.path.join(os.path.dirname(nilearn.__file__), "datasets", "data",
                       "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
    img = nib.load(src)
    data = np.asarray(img.dataobj, np.float32)
    shape = (size,) * 3 if isinstance(size, int) else tuple(size)
    starts = [max((s - n) // 2, 0) for s, n in zip(data.shape, shape)]
    data = data[tuple(slice(a, a + n) for a, n in zip(starts, shape))]
    grid = np.pad(data, [((n - s) // 2, n - s - (n - s) // 2) for s, n in zip(data.shape, shape)])
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = -np.array(shape) / 2
    nib.save(nib.Nifti1Image(grid, affine), path)
    return grid / max(float(grid.max()), 1e-6)


def prepare(args: argparse.Namespace) -> None:
    out = os.path.abspath(args.dir)
    os.makedirs(out, exist_ok=True)
    image = make_scan(os.path.join(out, "scan.nii.gz"), args.size)
    make_models(os.path.join(out, "models"), image, args.tiny)
    data = os.path.join(out, "train_data")
    os.makedirs(os.path.join(data, "label_maps"), exist_ok=True)
    for name in TRAIN_MAPS:
        shutil.copy(os.path.join(SHARED, "training_label_maps", name), os.path.join(data, "label_maps"))
    shutil.copytree(os.path.join(SHARED, "labels_classes_priors"), os.path.join(data, "priors"),
                    dirs_exist_ok=True)
    times = {mode: run_mode(out, "cpu", mode, args.threads, "cpu") for mode in args.modes}
    with open(os.path.join(out, "cpu_times.json"), "w") as fh:
        json.dump({"size": args.size, "tiny": args.tiny, "threads": args.threads, "seconds": times}, fh)
    print(f"prepared {out}: CPU times {times}")


# --------------------------------------------------------------------------- both sides

def run_mode(folder: str, side: str, mode: str, threads: int | None = None,
             device: str = "cpu") -> float:
    """One ``mri_synthseg_jax`` run of ``mode`` on ``device`` (outputs in ``folder/side/``); its
    wall seconds, start-up and compilation included, as a user sees them."""
    dest = os.path.join(folder, side)
    os.makedirs(dest, exist_ok=True)
    stem = os.path.join(dest, mode)
    flags = [f.format(qc=f"{stem}_qc.csv") for f in MODES[mode]]
    cmd = [sys.executable, "-m", "synthseg_jax.cli", "--i", os.path.join(folder, "scan.nii.gz"),
           "--o", f"{stem}_seg.nii.gz", "--vol", f"{stem}_vol.csv", "--models_dir",
           os.path.join(folder, "models"), "--no-progress", *flags]
    cmd += ["--device", device, "--threads", str(threads or os.cpu_count())]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    seconds = time.perf_counter() - t0
    if done.returncode:
        raise RuntimeError(f"{side} {mode} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return round(seconds, 1)


def read_numbers(path: str) -> np.ndarray:
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    return np.array([float(v) for v in rows[1][1:]]) if len(rows) > 1 else np.zeros(0)


def compare(folder: str, mode: str) -> dict:
    import nibabel as nib

    out = {}
    seg = {side: np.asarray(nib.load(os.path.join(folder, side, f"{mode}_seg.nii.gz")).dataobj)
           for side in ("cpu", "device")}
    labelled = (seg["cpu"] > 0) | (seg["device"] > 0)
    out["agreement_%"] = round(100.0 * float(np.mean(seg["cpu"][labelled] == seg["device"][labelled])), 4)
    vols = {side: read_numbers(os.path.join(folder, side, f"{mode}_vol.csv")) for side in seg}
    denom = np.maximum(np.abs(vols["cpu"]), 1e-6)
    out["max_volume_diff_%"] = round(100.0 * float(np.max(np.abs(vols["device"] - vols["cpu"]) / denom)), 4)
    if "qc" in mode:
        qc = {side: read_numbers(os.path.join(folder, side, f"{mode}_qc.csv")) for side in seg}
        out["max_qc_diff"] = round(float(np.max(np.abs(qc["device"] - qc["cpu"]))), 5)
    return out


def train_step(folder: str, model: str, size: int) -> dict:
    data = os.path.join(folder, "train_data")
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "bench_train_step.py"), "--model",
           model, "--sizes", str(size), "--iters", "3", "--maps", str(len(TRAIN_MAPS)),
           f"train.label_dir={data}/label_maps", f"generator.label_dir={data}/label_maps",
           f"generator.priors_dir={data}/priors"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not rows:
        raise RuntimeError(f"training step failed:\n{done.stderr[-3000:]}")
    return rows[-1]


def check(args: argparse.Namespace) -> None:
    import jax

    folder = os.path.abspath(args.dir)
    with open(os.path.join(folder, "cpu_times.json")) as fh:
        cpu = json.load(fh)
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({device.platform}), jax {jax.__version__}; scan "
          f"{cpu['size']}^3, {'tiny' if cpu['tiny'] else 'published-size'} random-weight models; "
          f"CPU side: {cpu['threads']} threads of the machine that prepared it", flush=True)
    lines = [f"| mode | {args.device} s | CPU s | labels equal (%) | max volume diff (%) | max QC diff |",
             "|---|---|---|---|---|---|"]
    failures = 0
    for mode in cpu["seconds"]:
        seconds = run_mode(folder, "device", mode, device=args.device)
        c = compare(folder, mode)
        failures += c["agreement_%"] < 99.9
        lines.append(f"| {mode} | {seconds} | {cpu['seconds'][mode]} | {c['agreement_%']} | "
                     f"{c['max_volume_diff_%']} | {c.get('max_qc_diff', '')} |")
        print(lines[-1], flush=True)
    step = train_step(folder, args.train_model, args.train_size) if args.train_size else None
    print("\n".join(lines))
    if step:
        print(f"\ntraining step, {args.train_model} at {args.train_size}^3: {step['seconds_per_step']} s "
              f"(network {step['network_step_s']} s, generator {step['generator_s']} s), compile "
              f"{step['compile_s']} s, host memory {step['peak_rss_gb']} GB")
    sys.exit(1 if failures else 0)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("dir")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--tiny", action="store_true", help="tiny networks (to keep the script working)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES),
                   help="modes to run (default: all)")
    c = sub.add_parser("check")
    c.add_argument("dir")
    c.add_argument("--train-size", type=int, default=160, help="0: no training step")
    c.add_argument("--train-model", default="synthseg_2.0", help="configs/model/ name")
    c.add_argument("--device", default="gpu", help="the side checked against the CPU's "
                   "(cpu: to keep this script working where there is no GPU)")
    args = parser.parse_args(argv)
    prepare(args) if args.command == "prepare" else check(args)


if __name__ == "__main__":
    main()
