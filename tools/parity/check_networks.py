#!/usr/bin/env python
"""Network parity: the original Keras networks versus ours, on identical inputs.

Runs in the project's environment; calls ``keras_forward.py`` through the TensorFlow venv:

    .venv/bin/python tools/parity/check_networks.py [--parity-dir .parity] [--report FILE]

1. Builds inputs from real data: the MNI T1 rescaled as the pipeline does (v1, v2, robust), with a
   one-hot cortex mask (parc), and one-hot QC classes / label indices of a training label map (qc,
   MakeShape), each at 64^3 and 96x128x160.
2. Runs the original networks (random calibrated weights in ``<parity-dir>/models``) and ours,
   loaded from the same ``.h5`` files through ``synthseg_jax.weights``.
3. Exports our variables with ``save_keras_h5`` to a fresh models folder: every weight must equal
   the original file's, and the original run on that folder must give the same outputs.
The robust cascade makes hard (argmax) decisions between stages, so float32 noise of 1e-5 flips a
voxel wherever two classes tie that closely, and the flip propagates. Its stages are therefore
compared one by one, each fed the original's own one-hot from the previous stage; the end-to-end
cascade is reported too, with the number of voxels whose decision differs and how close to a tie
the original was there (informational).
Pass: max |difference| <= 1e-4 everywhere, identical MakeShape crops, identical parameter counts,
identical exported weights.
Prints a markdown table and exits non-zero on any failure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np

from synthseg_jax.nn.synthseg import crop_around_labels
from synthseg_jax.nn.unet import UNet
from synthseg_jax.weights.keras_h5 import read_keras_h5, save_keras_h5
from synthseg_jax.weights.models_dir import MODEL_FILES, ModelsDir

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
SHARED = os.path.join(REPO, "..", "shared", "data", "synthseg")
TOLERANCE = 1e-4
SHAPES = {"64": (64, 64, 64), "96x128x160": (96, 128, 160)}
NET_KIND = {"v1": "1.0", "v2": "2.0", "robust": "robust", "parc": "parc", "qc": "qc"}


def centre_fit(volume: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Centre crop or zero pad to ``shape``."""
    out = np.zeros(shape, volume.dtype)
    src, dst = [], []
    for n, m in zip(volume.shape, shape):
        if n >= m:
            a = (n - m) // 2
            src.append(slice(a, a + m)), dst.append(slice(0, m))
        else:
            a = (m - n) // 2
            src.append(slice(0, n)), dst.append(slice(a, a + n))
    out[tuple(dst)] = volume[tuple(src)]
    return out


def make_inputs(parity_dir: str, models: ModelsDir, nets: list[str],
                sizes: list[str]) -> dict[str, np.ndarray]:
    t1 = nib.load(os.path.join(parity_dir, "data", "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"))
    gm = nib.load(os.path.join(parity_dir, "data", "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz"))
    image = np.asarray(t1.dataobj, np.float32)
    lo, hi = np.percentile(image, [0.5, 99.5])
    image = np.clip((image - lo) / (hi - lo), 0, 1)
    cortex = (np.asarray(gm.dataobj) > 0.5).astype(np.int64)

    tables = models.labels("2.0")
    label_map = np.asarray(nib.load(os.path.join(
        SHARED, "training_label_maps", "training_seg_01.nii.gz")).dataobj).astype(np.int64)
    # generation label -> segmentation label: the 1.0 table is aligned with generation_labels.npy;
    # 2.0 differs only in keeping the CSF (24)
    generation = np.load(os.path.join(SHARED, "labels_classes_priors", "generation_labels.npy"))
    seg_v1 = np.load(os.path.join(SHARED, "labels_classes_priors", "synthseg_segmentation_labels.npy"))
    lut = np.zeros(label_map.max() + 1, np.int64)
    lut[generation] = np.where(generation == 24, 24, seg_v1)
    seg_index = np.searchsorted(tables.segmentation, lut[label_map])

    inputs = {}
    for case, shape in [(c, SHAPES[c]) for c in sizes]:
        img = centre_fit(image, shape)[None, ..., None]
        inputs[f"v1__{case}"] = img
        inputs[f"v2__{case}"] = img
        inputs[f"robust__{case}"] = img
        mask = np.eye(2, dtype=np.float32)[centre_fit(cortex, shape)]
        inputs[f"parc__{case}"] = np.concatenate([img, mask[None]], axis=-1)
        qc_classes = tables.qc_class[centre_fit(seg_index, shape)]
        inputs[f"qc__{case}"] = np.eye(tables.n_qc, dtype=np.float32)[qc_classes][None]
        cropped = centre_fit(seg_index, shape).astype(np.int32)
        inputs[f"makeshape__{case}"] = cropped
        inputs[f"makeshape_shape__{case}"] = np.array(shape, np.int32)
    inputs["makeshape__256"] = seg_index.astype(np.int32)
    inputs["makeshape_shape__256"] = np.array(seg_index.shape, np.int32)
    return {k: v for k, v in inputs.items() if k.split("__")[0].replace("_shape", "") in nets}


def run_keras(parity_dir: str, models_dir: str, inputs: dict, work: str, tag: str,
              extras: bool = False) -> dict:
    path_in, path_out = os.path.join(work, f"in_{tag}.npz"), os.path.join(work, f"out_{tag}.npz")
    np.savez(path_in, **inputs)
    cmd = [os.path.join(parity_dir, "venv", "bin", "python"), os.path.join(HERE, "keras_forward.py"),
           "--script", os.path.join(parity_dir, "mri_synthseg"), "--models", models_dir,
           "--inputs", path_in, "--out", path_out] + (["--extras"] if extras else [])
    subprocess.run(cmd, check=True)
    with np.load(path_out) as out:
        return {k: out[k] for k in out.files}


def robust_stages(module, variables, image: np.ndarray, keras: dict, key: str) -> dict:
    """Each cascade stage of ours, fed the original's one-hot decision of the stage before."""
    out = {}
    inputs = {"unet": image}
    previous = {"l2l": f"{key}__unet_prediction", "unet2": f"{key}__l2l_prediction"}
    for cfg in module.stage_configs():
        if cfg.prefix in previous:
            decided = keras[previous[cfg.prefix]]
            onehot = np.eye(decided.shape[-1], dtype=np.float32)[decided.argmax(-1)]
            inputs[cfg.prefix] = onehot if cfg.prefix == "l2l" else np.concatenate([image, onehot], -1)
        stage_vars = {c: variables[c][cfg.prefix] for c in variables}
        logits = jax.jit(UNet(cfg).apply)(stage_vars, jnp.asarray(inputs[cfg.prefix]))
        name = key if cfg.prefix == "unet2" else f"{key}__{cfg.prefix}_prediction"
        out[f"stage:{name}"] = np.asarray(jax.nn.softmax(logits, axis=-1))
    return out


def decision_flips(ours_full: np.ndarray, keras: dict, key: str) -> str:
    """Where the end-to-end cascades disagree, and how close the original was to a tie there."""
    agree = float(np.mean(ours_full.argmax(-1) == keras[key].argmax(-1)))
    notes = [f"end-to-end argmax agreement {agree:.4f}"]
    for stage in ("unet_prediction", "l2l_prediction"):
        probs = np.sort(keras[f"{key}__{stage}"], -1)
        gap = probs[..., -1] - probs[..., -2]
        notes.append(f"original's {stage}: min top-2 gap {gap.min():.1e}")
    return "; ".join(notes)


def run_flax(models: ModelsDir, inputs: dict, keras: dict) -> tuple[dict, dict, list[str]]:
    outputs, variables_by_kind, notes = {}, {}, []
    for net, kind in NET_KIND.items():
        module, variables = models.load_network(kind)
        variables_by_kind[kind] = variables
        forward = jax.jit(module.apply)
        for key in [k for k in inputs if k.startswith(net + "__")]:
            out = forward(variables, jnp.asarray(inputs[key]))
            outputs[key] = np.asarray(out if kind == "qc" else jax.nn.softmax(out, axis=-1))
            if kind == "robust":
                notes.append(f"{key}: " + decision_flips(outputs.pop(key), keras, key))
                outputs.update(robust_stages(module, variables, inputs[key], keras, key))
    crop = jax.jit(crop_around_labels)
    for key in [k for k in inputs if k.startswith("makeshape__")]:
        outputs[key] = np.asarray(crop(jnp.asarray(inputs[key])))[None]
    return outputs, variables_by_kind, notes


def compare(ours: dict, theirs: dict, label: str) -> list[dict]:
    rows = []
    for key in sorted(ours):
        theirs_key = key.removeprefix("stage:")
        if theirs_key not in theirs:
            continue
        a, b = ours[key], theirs[theirs_key]
        if a.shape != b.shape:
            rows.append(dict(check=label, key=key, shape=str(b.shape), max_abs=float("inf"), ok=False))
            continue
        diff = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))
        row = dict(check=label, key=key, shape=str(b.shape), max_abs=diff,
                   ok=diff == 0 if key.startswith("makeshape") else diff <= TOLERANCE)
        if b.ndim == 5:
            row["argmax_agree"] = float(np.mean(np.argmax(a, -1) == np.argmax(b, -1)))
            row["mean_max_prob"] = float(np.mean(np.max(b, -1)))
            row["n_labels_present"] = int(len(np.unique(np.argmax(b, -1))))
        rows.append(row)
    return rows


def exported_weight_rows(models: ModelsDir, exported: str, kinds) -> list[dict]:
    rows = []
    for kind in kinds:
        original = read_keras_h5(os.path.join(models.path, MODEL_FILES[kind]))
        ours = read_keras_h5(os.path.join(exported, MODEL_FILES[kind]))
        same = original.keys() == ours.keys() and all(
            original[layer].keys() == ours[layer].keys()
            and all(np.array_equal(original[layer][w], ours[layer][w]) for w in original[layer])
            for layer in original)
        rows.append(dict(check="exported weights == original", key=MODEL_FILES[kind],
                         shape=f"{len(ours)} layers", max_abs=0.0 if same else float("inf"), ok=same))
    return rows


def param_rows(models: ModelsDir, variables_by_kind: dict) -> list[dict]:
    counts_file = os.path.join(models.path, "keras_param_counts.json")
    with open(counts_file) as f:
        keras_counts = json.load(f)
    rows = []
    for kind, variables in variables_by_kind.items():
        ours = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(variables))
        entry = keras_counts[MODEL_FILES[kind]]
        theirs = entry["count_params"] if isinstance(entry, dict) else entry
        rows.append(dict(check="param count", key=MODEL_FILES[kind], shape="", max_abs=abs(ours - theirs),
                         ok=ours == theirs, ours=ours, keras=theirs))
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| check | case | output shape | max abs diff | argmax agree | mean max prob (Keras) | labels present | pass |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        extra = (f"{r['argmax_agree']:.6f} | {r['mean_max_prob']:.3f} | {r['n_labels_present']}"
                 if "argmax_agree" in r else
                 (f"ours {r['ours']} | Keras {r['keras']} |" if "ours" in r else " | |"))
        lines.append(f"| {r['check']} | {r['key']} | {r['shape']} | {r['max_abs']:.2e} | {extra} | "
                     f"{'yes' if r['ok'] else 'NO'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parity-dir", default=os.path.join(REPO, ".parity"))
    parser.add_argument("--report", default=None, help="also write the markdown table here")
    parser.add_argument("--sizes", default=",".join(SHAPES), help=f"subset of {','.join(SHAPES)}")
    parser.add_argument("--nets", default=",".join(list(NET_KIND) + ["makeshape"]),
                        help="comma-separated subset of v1,v2,robust,parc,qc,makeshape")
    args = parser.parse_args(argv)
    parity_dir = os.path.abspath(args.parity_dir)
    work = os.path.join(parity_dir, "work")
    os.makedirs(work, exist_ok=True)
    models = ModelsDir(os.path.join(parity_dir, "models"))

    t0 = time.time()
    inputs = make_inputs(parity_dir, models, args.nets.split(","), args.sizes.split(","))
    keras_out = run_keras(parity_dir, models.path, inputs, work, "original", extras=True)
    t_keras = time.time() - t0
    ours, variables_by_kind, notes = run_flax(models, inputs, keras_out)
    t_flax = time.time() - t0 - t_keras
    rows = compare(ours, keras_out, "original .h5")

    exported = os.path.join(parity_dir, "models_exported")
    shutil.rmtree(exported, ignore_errors=True)
    os.makedirs(exported)
    for name in os.listdir(models.path):
        if name.endswith(".npy"):
            shutil.copy(os.path.join(models.path, name), exported)
    for kind, variables in variables_by_kind.items():
        save_keras_h5(variables, os.path.join(exported, MODEL_FILES[kind]))
    nets_only = {k: v for k, v in inputs.items() if not k.startswith("makeshape")}
    round_trip = run_keras(parity_dir, exported, nets_only, work, "exported", extras=True)
    rows += compare(ours, round_trip, "our export -> Keras")
    rows += exported_weight_rows(models, exported, variables_by_kind)
    rows += param_rows(models, variables_by_kind)

    table = markdown(rows) + "".join(f"\n- {note}" for note in notes)
    summary = (f"\nKeras forward (incl. TF start-up and model builds): {t_keras:.0f} s; "
               f"Flax (incl. compiles): {t_flax:.0f} s; tolerance {TOLERANCE}")
    print(table + summary)
    if args.report:
        with open(args.report, "w") as f:
            f.write(table + summary + "\n")
    failed = [r for r in rows if not r["ok"]]
    print(f"parity: {len(rows) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
