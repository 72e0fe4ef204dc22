#!/usr/bin/env python
"""Whole-run parity: the original ``mri_synthseg`` (TensorFlow) versus our ``predict.py``.

Runs in the project's environment (``.venv``); the original runs through ``.parity/venv`` in a
subprocess, on the same random-weight models folder (``make_keras_models.py``):

    .venv/bin/python tools/parity/run_pipeline_parity.py [--inputs mni,mni_1x1x3_pil]
        [--modes default,fast,v1,robust,parc,qc] [--work-dir .parity/pipeline] [--reuse]
        [--reuse-ours] [--compare-only] [--json OUT.json] [--diagnose-robust]

Inputs (made in ``WORK/inputs``): ``mni``, the nilearn MNI T1 (1 mm, RAS, 197x233x189), and
``mni_1x1x3_pil``, derived from it: slices averaged to 1x1x3 mm (3 mm along S) and stored in
P-I-L voxel order (axes permuted and all flipped), run with ``crop 160``.

Modes and what each run writes (same flags on both sides):

    default  --vol --post          fast   --fast --vol --post     v1  --v1 --vol --post
    robust   --robust --vol --post parc   --parc --vol --post     qc  --qc --vol
    parc+qc  --parc --qc --vol     (not in the default list; used for the speed table)

Each run goes under ``/usr/bin/time -v`` (wall seconds, peak RSS) into
``WORK/runs/<input>/<mode>/{original,ours}/``. The original runs with ``--cpu --threads 2``, or
``--threads 1`` in robust and QC modes (``--low-mem-threads``), where 2 threads died with
std::bad_alloc on this machine (REFERENCE.md); ours with ``threads=2 device=cpu``.
Heavy runs take the lock file ``WORK/heavy.lock`` (flock), so that they never overlap another
heavy run that takes it too. ``--reuse`` keeps the original's outputs of a finished run
(``rc`` 0); ``--reuse-ours`` keeps ours too (then nothing runs: only the comparison).

Compared, per run: the fraction of voxels with the same label (pass >= 99.9 %); the
posteriors' max |difference| (reported); each volume of the volumes CSV (pass: within 0.5 % or
1 mm^3); QC scores (pass: within 1e-3); the CSV header lines (pass: byte-equal); the output
segmentation's shape, affine and on-disk dtype (pass: equal). Prints a markdown table and
``pipeline parity: N passed, M failed``; exits 1 if any failed.

``--diagnose-robust``: for a failing robust case, shows where the cascade's decisions differ.
The robust cascade takes an argmax between its stages, so float32 rounding noise flips the
decision wherever the original's top-2 posteriors are within ~1e-5, and the flip travels through
the next stages (BENCHMARKS.md, "Network parity"). The diagnosis runs the original's cascade on
the padded network input through ``keras_forward.py --extras`` (its stage outputs), runs ours
stage by stage, counts the voxels where the first- and second-stage decisions differ and the
original's top-2 gap there, then runs our post-processing on our cascade fed the original's own
stage decisions, and compares that segmentation with the original's whole run.
"""

from __future__ import annotations

import argparse
import csv
import fcntl
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
PARITY = os.path.join(REPO, ".parity")
MNI = os.path.join(PARITY, "data", "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")

SAME_LABEL_MIN = 0.999
VOLUME_REL = 0.005
VOLUME_ABS = 1.0
QC_TOL = 1e-3

INPUTS = {
    "mni": {"crop": None, "about": "MNI T1, 1 mm, RAS, 197x233x189"},
    "mni_1x1x3_pil": {"crop": 160, "about": "MNI T1 at 1x1x3 mm, P-I-L voxel order, crop 160"},
}
# flags per mode: the original's command-line flags; "post"/"qc" say which extra outputs to write
MODES = {
    "default": {"flags": [], "post": True, "qc": False},
    "fast": {"flags": ["fast"], "post": True, "qc": False},
    "v1": {"flags": ["v1"], "post": True, "qc": False},
    "robust": {"flags": ["robust"], "post": True, "qc": False, "low_mem": True},
    "parc": {"flags": ["parc"], "post": True, "qc": False},
    "qc": {"flags": [], "post": False, "qc": True, "low_mem": True},
    "parc+qc": {"flags": ["parc"], "post": False, "qc": True, "low_mem": True},
}
DEFAULT_MODES = "default,fast,v1,robust,parc,qc"


def say(*args) -> None:
    print("[pipeline_parity]", *args, file=sys.stderr, flush=True)


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------

def make_anisotropic_pil(src: str, dst: str) -> None:
    """The MNI T1 at 1x1x3 mm (means of 3 slices along S) stored in P-I-L voxel order."""
    import nibabel as nib

    img = nib.load(src)
    data = np.asarray(img.get_fdata(), dtype=np.float32)
    affine = img.affine.copy()
    n = data.shape[2] // 3
    data = data[:, :, :3 * n].reshape(data.shape[0], data.shape[1], n, 3).mean(axis=3)
    affine[:3, 2] *= 3
    affine[:3, 3] += affine[:3, 2] / 3      # first thick slice centred on the middle thin one
    perm = (1, 2, 0)                        # voxel axes (A, S, R) ...
    data = np.transpose(data, perm)
    affine = affine[:, list(perm) + [3]]
    for axis in range(3):                   # ... all flipped: (P, I, L)
        data = np.flip(data, axis=axis)
        affine[:3, 3] += affine[:3, axis] * (data.shape[axis] - 1)
        affine[:3, axis] = -affine[:3, axis]
    out = nib.Nifti1Image(np.ascontiguousarray(data), affine)
    out.set_data_dtype(np.float32)
    tmp = dst + ".part.nii.gz"
    nib.save(out, tmp)
    os.replace(tmp, dst)


def prepare_inputs(work: str, names: list[str], models: str) -> dict[str, str]:
    inputs = os.path.join(work, "inputs")
    os.makedirs(inputs, exist_ok=True)
    paths = {}
    for name in names:
        path = os.path.join(inputs, f"{name}.nii.gz")
        if not os.path.exists(path):
            if name == "mni":
                os.symlink(os.path.relpath(MNI, inputs), path)
            elif name == "mni_1x1x3_pil":
                make_anisotropic_pil(MNI, path)
            else:
                raise SystemExit(f"unknown input {name}")
        paths[name] = path
    home = os.path.join(work, "fshome")
    os.makedirs(home, exist_ok=True)
    link = os.path.join(home, "models")
    if not os.path.exists(link):
        os.symlink(os.path.abspath(models), link)
    return paths


# ------------------------------------------------------------------------------------------------
# Running
# ------------------------------------------------------------------------------------------------

class HeavyLock:
    """flock on WORK/heavy.lock: one heavy run at a time across processes."""

    def __init__(self, work: str) -> None:
        self.path = os.path.join(work, "heavy.lock")

    def __enter__(self):
        self.handle = open(self.path, "a")
        start = time.time()
        fcntl.flock(self.handle, fcntl.LOCK_EX)
        if time.time() - start > 1:
            say(f"waited {time.time() - start:.0f} s for the heavy-run lock")
        return self

    def __exit__(self, *exc) -> None:
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()


def finished(run_dir: str) -> bool:
    rc = os.path.join(run_dir, "rc")
    return (os.path.isfile(rc) and open(rc).read().strip() == "0"
            and os.path.isfile(os.path.join(run_dir, "seg.nii.gz")))


def original_command(args, in_path: str, run_dir: str, mode: str, crop) -> list[str]:
    spec = MODES[mode]
    threads = args.low_mem_threads if spec.get("low_mem") else args.original_threads
    cmd = [os.path.join(args.parity_dir, "venv", "bin", "python"),
           os.path.join(args.parity_dir, "mri_synthseg"), "--i", in_path,
           "--o", os.path.join(run_dir, "seg.nii.gz"), "--cpu", "--threads", str(threads)]
    cmd += [f"--{f}" for f in spec["flags"]]
    cmd += ["--vol", os.path.join(run_dir, "vol.csv")]
    if spec["post"]:
        cmd += ["--post", os.path.join(run_dir, "post.nii")]
    if spec["qc"]:
        cmd += ["--qc", os.path.join(run_dir, "qc.csv")]
    if crop:
        cmd += ["--crop", str(crop)]
    return cmd


def our_command(args, in_path: str, run_dir: str, mode: str, crop) -> list[str]:
    spec = MODES[mode]
    cmd = [sys.executable, os.path.join(REPO, "predict.py"), f"i={in_path}",
           f"o={os.path.join(run_dir, 'seg.nii.gz')}", f"models_dir={os.path.abspath(args.models)}",
           f"threads={args.threads}", "device=cpu", "progress=false",
           f"vol={os.path.join(run_dir, 'vol.csv')}"]
    cmd += [f"{f}=true" for f in spec["flags"]]
    if spec["post"]:
        cmd.append(f"post={os.path.join(run_dir, 'post.nii')}")
    if spec["qc"]:
        cmd.append(f"qc={os.path.join(run_dir, 'qc.csv')}")
    if crop:
        cmd.append(f"crop={crop}")
    return cmd


def run_timed(cmd: list[str], run_dir: str, work: str, env: dict | None = None,
              reuse: bool = False) -> None:
    """Run under /usr/bin/time -v holding the heavy-run lock; leaves cmd.txt, stdout.txt,
    time.txt, load_before/after.txt and rc in ``run_dir``. With ``reuse``, a run that another
    process finished while this one waited for the lock is kept."""
    os.makedirs(run_dir, exist_ok=True)
    with HeavyLock(work):
        if reuse and finished(run_dir):
            say(f"reusing {run_dir} (finished meanwhile)")
            return
        for name in ("rc", "seg.nii.gz", "vol.csv", "qc.csv", "post.nii"):
            if os.path.exists(os.path.join(run_dir, name)):
                os.remove(os.path.join(run_dir, name))
        with open(os.path.join(run_dir, "cmd.txt"), "w") as handle:
            handle.write(" ".join(cmd) + "\n")
        with open(os.path.join(run_dir, "code.txt"), "w") as handle:
            # which code ran: HEAD and any uncommitted change under synthseg_jax/
            git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True, cwd=REPO).stdout
            handle.write(git("rev-parse", "HEAD") + git("status", "--short", "--", "synthseg_jax"))
        with open(os.path.join(run_dir, "load_before.txt"), "w") as handle:
            handle.write(subprocess.run(["uptime"], capture_output=True, text=True).stdout)
        say(f"running {' '.join(cmd[:2])} ... ({run_dir})")
        full = ["/usr/bin/time", "-v", "-o", os.path.join(run_dir, "time.txt")] + cmd
        with open(os.path.join(run_dir, "stdout.txt"), "w") as out:
            proc = subprocess.run(full, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        with open(os.path.join(run_dir, "load_after.txt"), "w") as handle:
            handle.write(subprocess.run(["uptime"], capture_output=True, text=True).stdout)
        with open(os.path.join(run_dir, "rc"), "w") as handle:
            handle.write(f"{proc.returncode}\n")
    say(f"done rc={proc.returncode}: {run_dir}")


def retry_with_one_thread(args, in_path: str, run_dir: str, mode: str, crop, env: dict) -> None:
    """If the original died with std::bad_alloc at more than one thread, keep that attempt in
    ``<run_dir>.failed-<n>threads`` and run it again with ``--threads 1``."""
    out = os.path.join(run_dir, "stdout.txt")
    if finished(run_dir) or not os.path.isfile(out) or "bad_alloc" not in open(out, errors="replace").read():
        return
    cmd = original_command(args, in_path, run_dir, mode, crop)
    threads = cmd[cmd.index("--threads") + 1]
    if threads == "1":
        return
    failed = f"{run_dir}.failed-{threads}threads"
    shutil.rmtree(failed, ignore_errors=True)
    os.rename(run_dir, failed)
    say(f"the original died with std::bad_alloc at {threads} threads ({failed}); again with 1")
    cmd[cmd.index("--threads") + 1] = "1"
    run_timed(cmd, run_dir, args.work_dir, env)


def time_info(run_dir: str) -> dict:
    """Wall seconds, peak RSS (GB), threads and load from a run folder."""
    info = {"wall": None, "peak_gb": None}
    path = os.path.join(run_dir, "time.txt")
    if os.path.isfile(path):
        text = open(path).read()
        m = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", text)
        if m:
            h, mnt, s = m.groups()
            info["wall"] = int(h or 0) * 3600 + int(mnt) * 60 + float(s)
        m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
        if m:
            info["peak_gb"] = int(m.group(1)) / 2**20
    cmd = os.path.join(run_dir, "cmd.txt")
    if os.path.isfile(cmd):
        m = re.search(r"(?:--threads |threads=)(\d+)", open(cmd).read())
        info["threads"] = int(m.group(1)) if m else None
    for name in ("load_before", "load_after"):
        p = os.path.join(run_dir, f"{name}.txt")
        if os.path.isfile(p):
            m = re.search(r"load average: (.*)$", open(p).read().strip())
            info[name] = m.group(1) if m else None
    rc = os.path.join(run_dir, "rc")
    info["rc"] = int(open(rc).read()) if os.path.isfile(rc) else None
    out = os.path.join(run_dir, "stdout.txt")
    if os.path.isfile(out):
        # our pipeline logs "<file>: compile X s, network Y s, ..., total Z s" per scan
        stages = {}
        for line in open(out, errors="replace"):
            m = re.match(r"^\S+: ((?:[a-z_]+ [\d.]+ s, )*total [\d.]+ s)$", line.strip())
            if m:
                stages = {k: float(v) for k, v in re.findall(r"([a-z_]+) ([\d.]+) s", m.group(1))}
        if stages:
            info["stages"] = stages
    return info


# ------------------------------------------------------------------------------------------------
# Comparing
# ------------------------------------------------------------------------------------------------

def read_csv(path: str) -> tuple[bytes, list[list[str]]]:
    raw = open(path, "rb").read()
    first = raw.split(b"\n", 1)[0]
    rows = list(csv.reader(io.StringIO(raw.decode())))
    return first, rows


def compare_csv(orig: str, ours: str, kind: str) -> dict:
    """Header lines byte-equal; values: volumes within 0.5 % or 1 mm^3, QC within 1e-3."""
    out = {f"{kind}_header_same": False, f"{kind}_ok": False}
    if not (os.path.isfile(orig) and os.path.isfile(ours)):
        out[f"{kind}_note"] = "missing " + ("original" if not os.path.isfile(orig) else "ours")
        return out
    first_o, rows_o = read_csv(orig)
    first_u, rows_u = read_csv(ours)
    out[f"{kind}_header_same"] = first_o == first_u
    if len(rows_o) != len(rows_u) or any(len(a) != len(b) for a, b in zip(rows_o, rows_u)):
        out[f"{kind}_note"] = f"layout differs ({len(rows_o)} vs {len(rows_u)} rows)"
        return out
    header = rows_o[0]
    worst, worst_name, worst_abs, ok, subjects_same = 0.0, "", 0.0, True, True
    for row_o, row_u in zip(rows_o[1:], rows_u[1:]):
        subjects_same &= row_o[0] == row_u[0]
        for name, a, b in zip(header[1:], row_o[1:], row_u[1:]):
            a, b = float(a), float(b)
            diff = abs(a - b)
            if kind == "vol":
                good = diff <= max(VOLUME_REL * abs(a), VOLUME_ABS)
                score = diff / max(VOLUME_REL * abs(a), VOLUME_ABS)   # > 1 fails
            else:
                good = diff <= QC_TOL
                score = diff / QC_TOL
            ok &= good
            if score > worst or not worst_name:
                worst, worst_name, worst_abs = score, name, diff
                worst_rel = diff / abs(a) if a else (0.0 if diff == 0 else np.inf)
    out[f"{kind}_ok"] = bool(ok and subjects_same)
    out[f"{kind}_subjects_same"] = subjects_same
    out[f"{kind}_worst"] = {"name": worst_name, "abs": worst_abs, "rel": worst_rel}
    out[f"{kind}_columns"] = len(header) - 1
    return out


def compare_images(orig_dir: str, ours_dir: str) -> dict:
    import nibabel as nib

    out = {}
    a, b = nib.load(os.path.join(orig_dir, "seg.nii.gz")), nib.load(os.path.join(ours_dir, "seg.nii.gz"))
    out["shape"] = [list(a.shape), list(b.shape)]
    out["dtype"] = [str(a.get_data_dtype()), str(b.get_data_dtype())]
    out["affine_maxdiff"] = float(np.max(np.abs(a.affine - b.affine)))
    out["geometry_same"] = bool(a.shape == b.shape and a.get_data_dtype() == b.get_data_dtype()
                                and out["affine_maxdiff"] < 1e-5)
    # other header fields, reported (not part of the pass criterion)
    ha, hb = a.header, b.header
    out["header_diffs"] = [k for k in ("pixdim", "qform_code", "sform_code", "xyzt_units", "scl_slope",
                                       "scl_inter", "descrip", "dim")
                           if k in ha and k in hb and not np.array_equal(np.asarray(ha[k]), np.asarray(hb[k]))
                           and not (np.asarray(ha[k]).dtype.kind == "f"
                                    and np.allclose(ha[k], hb[k], equal_nan=True))]
    if a.shape != b.shape:
        out["same_label"] = 0.0
        return out
    sa, sb = np.asarray(a.dataobj), np.asarray(b.dataobj)
    same = sa == sb
    out["same_label"] = float(same.mean())
    brain = (sa != 0) | (sb != 0)
    out["same_label_brain"] = float(same[brain].mean()) if brain.any() else 1.0
    out["n_diff"] = int((~same).sum())
    out["labels"] = [int(np.unique(sa).size), int(np.unique(sb).size)]
    pa, pb = os.path.join(orig_dir, "post.nii"), os.path.join(ours_dir, "post.nii")
    if os.path.isfile(pa) and os.path.isfile(pb):
        ia, ib = nib.load(pa), nib.load(pb)
        out["post_shape_same"] = ia.shape == ib.shape
        out["post_dtype"] = [str(ia.get_data_dtype()), str(ib.get_data_dtype())]
        if ia.shape == ib.shape:
            worst, mean = 0.0, 0.0
            for c in range(ia.shape[-1]):      # one channel at a time (contiguous on disk)
                d = np.abs(np.asarray(ia.dataobj[..., c], dtype=np.float32)
                           - np.asarray(ib.dataobj[..., c], dtype=np.float32))
                worst = max(worst, float(d.max()))
                mean += float(d.mean()) / ia.shape[-1]
            out["post_maxdiff"] = worst
            out["post_meandiff"] = mean
    return out


def compare(run: str, mode: str) -> dict:
    orig, ours = os.path.join(run, "original"), os.path.join(run, "ours")
    row: dict = {"original": time_info(orig), "ours": time_info(ours)}
    if not (finished(orig) and finished(ours)):
        row["error"] = ("original" if not finished(orig) else "ours") + " run did not finish"
        row["pass"] = False
        return row
    row.update(compare_images(orig, ours))
    row.update(compare_csv(os.path.join(orig, "vol.csv"), os.path.join(ours, "vol.csv"), "vol"))
    headers = [row["vol_header_same"]]
    checks = [row["same_label"] >= SAME_LABEL_MIN, row["vol_ok"], row["geometry_same"]]
    if MODES[mode]["qc"]:
        row.update(compare_csv(os.path.join(orig, "qc.csv"), os.path.join(ours, "qc.csv"), "qc"))
        headers.append(row["qc_header_same"])
        checks.append(row["qc_ok"])
    row["headers_same"] = all(headers)
    row["pass"] = bool(all(checks) and row["headers_same"])
    return row


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------

def _fmt_time(t: dict) -> str:
    if t.get("wall") is None:
        return "-"
    threads = f", {t['threads']} thr" if t.get("threads") else ""
    return f"{t['wall']:.0f} s, {t['peak_gb']:.1f} GB{threads}"


def markdown(results: list[dict]) -> str:
    lines = ["| input | mode | same label % (in brain %) | posteriors max abs diff | worst volume diff | "
             "QC max diff | headers identical | affine/shape/dtype | pass | original | ours |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['input']} | {r['mode']} | {r['error']} | | | | | | no | "
                         f"{_fmt_time(r['original'])} | {_fmt_time(r['ours'])} |")
            continue
        same = f"{100 * r['same_label']:.4f} ({100 * r.get('same_label_brain', 0):.3f})"
        post = f"{r['post_maxdiff']:.1e}" if "post_maxdiff" in r else "-"
        w = r.get("vol_worst")
        vol = (f"{w['abs']:.3f} mm3 ({100 * w['rel']:.3f} %, {w['name']})" if w else
               r.get("vol_note", "-"))
        qc = f"{r['qc_worst']['abs']:.1e}" if "qc_worst" in r else ("-" if "qc_ok" not in r else r.get("qc_note", "?"))
        lines.append(f"| {r['input']} | {r['mode']} | {same} | {post} | {vol} | {qc} | "
                     f"{'yes' if r['headers_same'] else 'NO'} | {'same' if r['geometry_same'] else 'DIFFERENT'} | "
                     f"{'yes' if r['pass'] else 'NO'} | {_fmt_time(r['original'])} | {_fmt_time(r['ours'])} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Robust diagnosis
# ------------------------------------------------------------------------------------------------

def diagnose_robust(args, in_path: str, run: str, crop) -> dict:
    """Stage-by-stage decisions of the robust cascade on the whole padded input (see the module
    docstring). Writes ``WORK/runs/<input>/robust/diagnosis.json``."""
    import jax
    import jax.numpy as jnp
    import nibabel as nib

    from synthseg_jax.scans import load_scan
    from reference_postprocess import postprocess
    from synthseg_jax.inference.preprocess import preprocess
    from synthseg_jax.nn.unet import UNet
    from synthseg_jax.weights.models_dir import ModelsDir

    work_dir = os.path.join(run, "diagnosis")
    os.makedirs(work_dir, exist_ok=True)
    prep = preprocess(load_scan(in_path), crop=crop)
    x = prep.image[None, ..., None].astype(np.float32)
    keras_out = os.path.join(work_dir, "keras.npz")
    if not (args.reuse and os.path.isfile(keras_out)):
        np.savez(os.path.join(work_dir, "inputs.npz"), robust__whole=x)
        cmd = [os.path.join(args.parity_dir, "venv", "bin", "python"),
               os.path.join(HERE, "keras_forward.py"), "--script",
               os.path.join(args.parity_dir, "mri_synthseg"), "--models", os.path.abspath(args.models),
               "--inputs", os.path.join(work_dir, "inputs.npz"), "--out", keras_out, "--extras",
               "--predict", "--threads", str(args.low_mem_threads)]   # model.predict, as the script
        with HeavyLock(args.work_dir):
            say("diagnosis: the original's cascade stage by stage (keras_forward.py)")
            subprocess.run(cmd, check=True)
    keras = dict(np.load(keras_out))
    k1, k2, k3 = (keras["robust__whole__unet_prediction"], keras["robust__whole__l2l_prediction"],
                  keras["robust__whole"])

    models = ModelsDir(os.path.abspath(args.models))
    module, variables = models.load_network("robust")
    out: dict = {}

    def gap(p):
        s = np.sort(p, axis=-1)
        return s[..., -1] - s[..., -2]

    with HeavyLock(args.work_dir):
        inputs = {"unet": x}
        ours = {}
        for cfg in module.stage_configs():
            stage_vars = {c: variables[c][cfg.prefix] for c in variables}
            logits = jax.jit(UNet(cfg).apply)(stage_vars, jnp.asarray(inputs[cfg.prefix]))
            ours[cfg.prefix] = np.asarray(jax.nn.softmax(logits, axis=-1))
            # the next stage is fed the ORIGINAL's decision of this stage
            if cfg.prefix == "unet":
                inputs["l2l"] = np.eye(k1.shape[-1], dtype=np.float32)[k1.argmax(-1)]
            elif cfg.prefix == "l2l":
                onehot = np.eye(k2.shape[-1], dtype=np.float32)[k2.argmax(-1)]
                inputs["unet2"] = np.concatenate([x, onehot], axis=-1)
        # our own cascade end to end (ours decides at every stage)
        ours_e2e = np.asarray(jax.jit(module.apply)(variables, jnp.asarray(x)))
    for name, theirs, mine in (("unet", k1, ours["unet"]), ("l2l", k2, ours["l2l"])):
        differ = theirs.argmax(-1) != mine.argmax(-1)
        g = gap(theirs)
        out[name] = {"decisions_differ": int(differ.sum()), "voxels": int(differ.size),
                     "max_gap_where_differ": float(g[differ].max()) if differ.any() else None,
                     "voxels_with_gap_below_1e-4": int((g < 1e-4).sum()),
                     "max_abs_diff_fed_original": float(np.abs(theirs - mine).max())}
    out["unet2_max_abs_diff_fed_original"] = float(np.abs(k3 - ours["unet2"]).max())
    out["end_to_end_argmax_agreement"] = float((k3.argmax(-1) == ours_e2e.argmax(-1)).mean())

    # our post-processing on the posteriors of our stages fed the original's decisions
    tables = models.labels("2.0")
    pred = postprocess(ours["unet2"][0], prep, tables, fast=True, v1=False)
    orig_seg = np.asarray(nib.load(os.path.join(run, "original", "seg.nii.gz")).dataobj)
    out["same_label_with_original_decisions"] = float((pred.seg == orig_seg).mean())
    ours_seg = np.asarray(nib.load(os.path.join(run, "ours", "seg.nii.gz")).dataobj)
    out["same_label_ours_vs_original"] = float((ours_seg == orig_seg).mean())
    with open(os.path.join(run, "diagnosis.json"), "w") as handle:
        json.dump(out, handle, indent=1)
    return out


# ------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", default=",".join(INPUTS))
    parser.add_argument("--modes", default=DEFAULT_MODES, help=f"from {','.join(MODES)}")
    parser.add_argument("--work-dir", default=os.path.join(PARITY, "pipeline"))
    parser.add_argument("--parity-dir", default=PARITY)
    parser.add_argument("--models", default=os.path.join(PARITY, "models"))
    parser.add_argument("--reuse", action="store_true", help="keep the original's finished runs")
    parser.add_argument("--reuse-ours", action="store_true", help="keep our finished runs too")
    parser.add_argument("--compare-only", action="store_true", help="run nothing, compare what is there")
    parser.add_argument("--threads", type=int, default=2, help="ours")
    parser.add_argument("--original-threads", type=int, default=2)
    parser.add_argument("--low-mem-threads", type=int, default=1,
                        help="the original's threads in robust and QC modes (if more than 1 "
                             "dies with std::bad_alloc, the run is repeated with 1)")
    parser.add_argument("--diagnose-robust", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    args.work_dir = os.path.abspath(args.work_dir)
    inputs = [s for s in args.inputs.split(",") if s]
    modes = [s for s in args.modes.split(",") if s]
    for m in modes:
        if m not in MODES:
            parser.error(f"unknown mode {m}")
    if not os.path.isfile(os.path.join(args.parity_dir, "mri_synthseg")):
        parser.error(f"{args.parity_dir}: run tools/parity/setup_tf_env.sh first")
    if not os.path.isfile(os.path.join(args.models, "synthseg_2.0.h5")):
        parser.error(f"{args.models}: make the models with make_keras_models.py first")
    paths = prepare_inputs(args.work_dir, inputs, args.models)
    env = dict(os.environ, FREESURFER_HOME=os.path.join(args.work_dir, "fshome"))

    results = []
    for mode in modes:
        for name in inputs:
            crop = INPUTS[name]["crop"]
            run = os.path.join(args.work_dir, "runs", name, mode)
            orig, ours = os.path.join(run, "original"), os.path.join(run, "ours")
            if args.compare_only and not os.path.isdir(run):
                continue    # a combination this work folder never ran
            if not args.compare_only:
                reuse = args.reuse or args.reuse_ours
                if not (reuse and finished(orig)):
                    run_timed(original_command(args, paths[name], orig, mode, crop), orig,
                              args.work_dir, env, reuse=reuse)
                    retry_with_one_thread(args, paths[name], orig, mode, crop, env)
                if not (args.reuse_ours and finished(ours)):
                    run_timed(our_command(args, paths[name], ours, mode, crop), ours, args.work_dir,
                              reuse=args.reuse_ours)
            row = compare(run, mode)
            row.update(input=name, mode=mode)
            if args.diagnose_robust and mode == "robust" and not row["pass"] and "error" not in row:
                row["diagnosis"] = diagnose_robust(args, paths[name], run, crop)
            results.append(row)
            say(f"{name} {mode}: {'pass' if row['pass'] else 'FAIL'} "
                f"same label {row.get('same_label', float('nan')):.5f}")
            with open(os.path.join(run, "comparison.json"), "w") as handle:
                json.dump(row, handle, indent=1, default=str)

    print(f"\n{time.strftime('%Y-%m-%d %H:%M')}, load {load()}\n")
    print(markdown(results))
    for r in results:
        if "diagnosis" in r:
            print(f"\n{r['input']} robust diagnosis: {json.dumps(r['diagnosis'])}")
    n_pass = sum(r["pass"] for r in results)
    print(f"\npipeline parity: {n_pass} passed, {len(results) - n_pass} failed")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1, default=str)
    return 0 if n_pass == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
