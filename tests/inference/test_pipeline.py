"""End to end through predict's pipeline with tiny random-weight models (small padded shapes)."""

import csv
import io
import logging
import os

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from reference_postprocess import postprocess
from synthseg_jax.inference.csv_files import qc_columns, volume_columns
from synthseg_jax.inference.options import PredictOptions, UsageError
from synthseg_jax.inference.outputs import OUTPUT_KINDS
from synthseg_jax.inference.pipeline import Runner, run
from synthseg_jax.inference.planning import plan_outputs
from synthseg_jax.inference.preprocess import preprocess
from synthseg_jax.scans import load_scan

FAST = dict(min_pad=32, qc_crop_size=16, progress=False)


def make_scan(path, shape=(28, 32, 30), affine=None, seed=0, cls=nib.Nifti1Image):
    rng = np.random.default_rng(seed)
    data = (ndimage.gaussian_filter(rng.uniform(size=shape), 2) * 1000).astype(np.float32)
    nib.save(cls(data, np.eye(4) if affine is None else affine), str(path))
    return str(path)


def call(opts, **kw):
    out, err = io.StringIO(), io.StringIO()
    code = run(PredictOptions.create(**{**FAST, **kw, **opts}), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.reader(handle))


def test_single_scan_all_outputs(tmp_path, models_dir, labels_dir, tables, caplog):
    lia = np.array([[-1, 0, 0, 20], [0, 0, 1, -10], [0, -1, 0, 15], [0, 0, 0, 1.0]])
    src = make_scan(tmp_path / "sub-01.nii.gz", affine=lia)
    out = tmp_path / "out"
    opts = PredictOptions.create(i=src, o=str(out / "seg.nii.gz"), post=str(out / "post"), vol=str(out / "vols"),
                   qc=str(out / "qc.csv"), overlay=str(out), resample=str(out / "res.nii.gz"),
                   models_dir=models_dir, labels_dir=labels_dir, parc=True, **FAST)
    stdout, stderr = io.StringIO(), io.StringIO()
    runner = Runner(opts, stdout=stdout, stderr=stderr)
    with caplog.at_level(logging.INFO, logger="synthseg_jax.inference"):
        code = runner.run().exit_code
    stdout, stderr = stdout.getvalue(), stderr.getvalue()
    assert code == 0, stderr
    assert runner.mode.describe() == "SynthSeg 2.0 + parcellation + QC"
    assert sum("compiling" in r.message for r in caplog.records) == 1
    assert sorted(os.listdir(out)) == [".qc.csv.lock", ".vols.csv.lock",   # the shared tables' locks
                                       "post", "qc.csv", "seg.nii.gz", "sub-01_overlay.png", "vols.csv"]
    seg = nib.load(out / "seg.nii.gz")
    assert seg.get_data_dtype() == np.int32 and seg.shape == (28, 32, 30)
    np.testing.assert_allclose(seg.affine, lia)
    post = nib.load(out / "post" / "sub-01_posteriors.nii.gz")
    assert post.shape == (28, 32, 30, tables.n_labels) and post.get_data_dtype() == np.float32

    # the same numbers as calling the stages directly (the compiled network is reused)
    prep = preprocess(load_scan(src), min_pad=32)
    net = runner.predictor(prep.image)
    assert len(runner.predictor.compile_seconds) == 1
    pred = postprocess(net.posteriors, prep, tables, fast=False, v1=False,
                       parc_posteriors=net.parc_posteriors)
    np.testing.assert_array_equal(np.asarray(seg.dataobj), pred.seg)
    assert set(np.unique(pred.seg)) & set(range(1000, 2036))  # some parcellation labels

    vols = read_csv(out / "vols.csv")
    assert vols[0] == ["subject"] + volume_columns(tables, parc=True)
    assert vols[1][0] == "sub-01" and len(vols) == 2
    np.testing.assert_allclose([float(v) for v in vols[1][1:]], pred.volumes, rtol=1e-4, atol=2e-3)
    qc = read_csv(out / "qc.csv")
    assert qc[0] == ["subject"] + qc_columns(tables)
    assert all(0 <= float(v) <= 1 and len(v.split(".")[1]) == 4 for v in qc[1][1:])
    assert "already at 1 mm" in stdout  # resample requested, nothing to resample


def test_folder_batch_goes_on_after_a_bad_scan(tmp_path, models_dir, labels_dir, caplog):
    src = tmp_path / "in"
    src.mkdir()
    make_scan(src / "a.nii.gz", seed=1)
    make_scan(src / "b.mgz", seed=2, cls=nib.MGHImage)
    bad = np.full((28, 32, 30), np.nan, np.float32)   # a few NaN would be background (a warning)
    nib.save(nib.Nifti1Image(bad, np.eye(4)), str(src / "c_nan.nii"))
    (src / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="synthseg_jax.inference"):
        code, stdout, stderr = call(dict(i=str(src), o=str(out), vol=str(tmp_path / "v.csv"),
                                         models_dir=models_dir, labels_dir=labels_dir, fast=True))
    assert code == 1
    assert sorted(os.listdir(out)) == ["a_synthseg.nii.gz", "b_synthseg.mgz"]
    assert isinstance(nib.load(out / "b_synthseg.mgz"), nib.MGHImage)
    rows = read_csv(tmp_path / "v.csv")
    assert [r[0] for r in rows] == ["subject", "a", "b.mgz"]
    errors = [l for l in stderr.splitlines() if "c_nan.nii" in l]
    assert errors[0].startswith("ERROR ") and "only NaN or infinite values" in errors[0]
    assert "1 of 3 scan(s) failed" in stderr and "Traceback" not in stderr + stdout
    assert "2 of 3 scan(s) segmented" in stdout
    # one compilation for the two scans of the same padded shape
    assert sum("compiling" in r.message for r in caplog.records) == 1


def test_txt_lists_with_per_scan_csv(tmp_path, models_dir, labels_dir, tables_v1):
    a = make_scan(tmp_path / "a.nii.gz", seed=3)
    b = make_scan(tmp_path / "b.nii.gz", seed=4)
    (tmp_path / "in.txt").write_text(f"{a}\n\n{b}\n")
    (tmp_path / "out.txt").write_text(f"{tmp_path}/o/a_seg.nii.gz\n{tmp_path}/o/b_seg.nii\n")
    (tmp_path / "vol.txt").write_text(f"{tmp_path}/o/a.csv\n{tmp_path}/o/b.csv\n")
    code, stdout, stderr = call(dict(i=str(tmp_path / "in.txt"), o=str(tmp_path / "out.txt"),
                                     vol=str(tmp_path / "vol.txt"), v1=True,
                                     models_dir=models_dir, labels_dir=labels_dir))
    assert code == 0, stderr
    assert sorted(os.listdir(tmp_path / "o")) == ["a.csv", "a_seg.nii.gz", "b.csv", "b_seg.nii"]
    rows = read_csv(tmp_path / "o" / "b.csv")
    assert rows[0] == [""] + volume_columns(tables_v1, parc=False) and rows[1][0] == "b"
    assert "total intracranial" not in rows[0]


def test_txt_list_with_one_cohort_csv(tmp_path, models_dir, labels_dir, tables):
    """predict.yaml promised one volumes CSV for a .txt list; it was refused (issue 19, item 9)."""
    a = make_scan(tmp_path / "a.nii.gz", seed=3)
    b = make_scan(tmp_path / "b.nii.gz", seed=4)
    (tmp_path / "in.txt").write_text(f"{a}\n{b}\n")
    (tmp_path / "out.txt").write_text(f"{tmp_path}/o/a_seg.nii.gz\n{tmp_path}/o/b_seg.nii.gz\n")
    code, stdout, stderr = call(dict(i=str(tmp_path / "in.txt"), o=str(tmp_path / "out.txt"),
                                     vol=str(tmp_path / "cohort"), models_dir=models_dir,
                                     labels_dir=labels_dir))
    assert code == 0, stderr
    rows = read_csv(tmp_path / "cohort.csv")
    assert rows[0][1:] == volume_columns(tables, parc=False)
    assert [row[0] for row in rows[1:]] == ["a", "b"]
    assert f"volumes in {tmp_path}/cohort.csv" in stdout


def test_anisotropic_oblique_scan_with_crop_and_keepgeom(tmp_path, models_dir, labels_dir, tables):
    aff = np.array([[0, 0, -3.0, 40], [-1.0, 0, 0, 10], [0, 1.0, 0, -20], [0, 0, 0, 1]])
    src = make_scan(tmp_path / "aniso.nii.gz", shape=(30, 36, 12), affine=aff, seed=5)
    code, _, stderr = call(dict(i=src, o=str(tmp_path / "o"), resample=str(tmp_path / "r"),
                                post=str(tmp_path / "p"), crop=[32, 24, 32], robust=True,
                                models_dir=models_dir, labels_dir=labels_dir), min_pad=None)
    assert code == 0, stderr
    seg = nib.load(tmp_path / "o" / "aniso_synthseg.nii.gz")
    res = nib.load(tmp_path / "r" / "aniso_resampled.nii.gz")
    assert seg.shape == res.shape == (30, 36, 36)
    np.testing.assert_allclose(seg.affine, res.affine)
    np.testing.assert_allclose(np.linalg.norm(seg.affine[:3, :3], axis=0), 1)
    post = nib.load(tmp_path / "p" / "aniso_posteriors.nii.gz").get_fdata()
    outside = np.asarray(seg.dataobj) == 0
    assert outside.any() and np.all(post[outside].argmax(-1) == 0)

    code, _, stderr = call(dict(i=src, o=str(tmp_path / "k.nii.gz"), post=str(tmp_path / "kp.nii.gz"),
                                keepgeom=True, crop=32, robust=True,
                                models_dir=models_dir, labels_dir=labels_dir), min_pad=None)
    assert code == 0, stderr
    kept = nib.load(tmp_path / "k.nii.gz")
    assert kept.shape == (30, 36, 12)
    np.testing.assert_allclose(kept.affine, aff)
    kp = nib.load(tmp_path / "kp.nii.gz").get_fdata()
    np.testing.assert_allclose(kp.sum(-1), 1, atol=1e-5)


def test_plan_outputs_kinds(tmp_path):
    img = make_scan(tmp_path / "s.nii.gz")
    plan = plan_outputs(PredictOptions.create(i=img, o=str(tmp_path / "out"),
                                              post=str(tmp_path / "p.mgz"), vol=str(tmp_path / "v")))
    job = plan.jobs[0]
    assert job.paths["o"] == str(tmp_path / "out" / "s_synthseg.nii.gz")
    assert job.paths["post"] == str(tmp_path / "p.mgz") and plan.tables["vol"] == str(tmp_path / "v.csv")
    assert plan.notes and "csv" in plan.notes[0]
    with pytest.raises(UsageError, match="i is a folder, so o must be a folder"):
        plan_outputs(PredictOptions.create(i=str(tmp_path), o=str(tmp_path / "x.nii.gz")))
    with pytest.raises(UsageError, match="only be a .txt list when i is one"):
        plan_outputs(PredictOptions.create(i=img, o=str(tmp_path / "x.txt")))
    (tmp_path / "l.txt").write_text(img + "\n")
    with pytest.raises(UsageError, match="o must be a .txt list too"):
        plan_outputs(PredictOptions.create(i=str(tmp_path / "l.txt"), o=str(tmp_path / "x.nii.gz")))


def test_every_output_kind_is_planned_from_the_table(tmp_path):
    """Folders for every output: per-scan kinds named after each scan, tables and run files one
    file; from a .txt list, one path per scan for every kind but the run's files."""
    scans = tmp_path / "scans"
    scans.mkdir()
    images = [make_scan(scans / name) for name in ("a.nii.gz", "b.mgz")]
    given = {key: str(tmp_path / key) for key in OUTPUT_KINDS}
    plan = plan_outputs(PredictOptions.create(i=str(scans), **given))
    scan_kinds = [k for k in OUTPUT_KINDS.values() if k.scope == "scan"]
    for job, stem, ext in zip(plan.jobs, ("a", "b"), (".nii.gz", ".mgz")):
        assert job.paths == {k.key: os.path.join(given[k.key], k.folder_name.format(stem=stem, ext=ext))
                             for k in scan_kinds}
    assert plan.tables == {k.key: given[k.key] + ".csv" for k in OUTPUT_KINDS.values()
                           if k.scope == "table"}
    run_kinds = [k for k in OUTPUT_KINDS.values() if k.scope == "run"]
    assert run_kinds and plan.run_files == {k.key: given[k.key] + k.form.extensions[0]
                                            for k in run_kinds}

    (tmp_path / "in.txt").write_text("\n".join(images) + "\n")
    lists = {}
    listed = [k.key for k in OUTPUT_KINDS.values() if k.scope != "run"]
    for key in listed:
        lists[key] = [str(tmp_path / f"{key}{n}") for n in range(2)]
        (tmp_path / f"{key}.txt").write_text("\n".join(lists[key]) + "\n")
    plan = plan_outputs(PredictOptions.create(i=str(tmp_path / "in.txt"),
                                              **{key: str(tmp_path / f"{key}.txt") for key in listed},
                                              **{k.key: given[k.key] for k in run_kinds}))
    assert plan.tables == {}
    assert plan.run_files == {k.key: given[k.key] + k.form.extensions[0] for k in run_kinds}
    assert [job.paths for job in plan.jobs] == [{key: lists[key][n] for key in listed}
                                                for n in range(2)]


def test_bf16_precision_segments_like_float32(tmp_path, models_dir, labels_dir, monkeypatch):
    """precision=bf16 runs every network with bfloat16 products (the log says so) and agrees with
    float32 on most labelled voxels (tiny random networks have many near-ties; a wrong layout
    would agree on a few percent; the shipped model agrees on 99.8 %, BENCHMARKS.md)."""
    from synthseg_jax.nn import conv

    if not conv.cpu_has_native_bf16():
        # oneDNN's bf16 convolution dies with an illegal instruction on such CPUs (an AVX2-only
        # AMD EPYC); XLA's emulated bf16 runs the same path of ours
        monkeypatch.setenv(conv.ENV_VAR, "xla")
    monkeypatch.setattr(conv, "cpu_has_native_bf16", lambda: True)
    conv.effective_conv_dtype.cache_clear()
    scan = make_scan(tmp_path / "scan.nii.gz")
    segs = {}
    for precision in ("float32", "bf16"):
        out = tmp_path / f"{precision}.nii.gz"
        code, stdout, _ = call(dict(i=scan, o=str(out), models_dir=models_dir, labels_dir=labels_dir,
                                    precision=precision))
        assert code == 0
        assert ("bfloat16 convolution products" in stdout) == (precision == "bf16")
        segs[precision] = np.asarray(nib.load(str(out)).dataobj)
    labelled = (segs["float32"] > 0) | (segs["bf16"] > 0)
    assert labelled.sum() > 100
    assert np.mean(segs["float32"][labelled] == segs["bf16"][labelled]) > 0.9
    conv.effective_conv_dtype.cache_clear()


def test_bf16_is_refused_unless_float32_or_bf16():
    with pytest.raises(UsageError, match="precision"):
        PredictOptions.create(precision="fp16")


@pytest.mark.parametrize("parc", [False, True])
def test_keepgeom_is_independent_of_storage_order_and_agrees_with_posteriors(
        tmp_path, models_dir, labels_dir, tables, parc):
    """A 2 mm scan stored RAS and the same scan stored LPS (x and y reversed on disk): keepgeom's
    segmentations are the same voxels, and each label is the argmax of the posteriors written
    beside it (nearest-neighbour resampling of the 1 mm labels broke ties at the even factor by
    storage order: 11 % of labelled voxels differed)."""
    shape = (14, 16, 15)
    ras = np.diag([2.0, 2.0, 2.0, 1.0])
    ras[:3, 3] = [-13, -15, -14]
    lps = ras.copy()
    lps[:3, :2] *= -1
    lps[:3, 3] += ras[:3, :2] @ (np.array(shape[:2]) - 1)
    src_ras = make_scan(tmp_path / "ras.nii.gz", shape=shape, affine=ras, seed=3)
    data = nib.load(src_ras).get_fdata(dtype=np.float32)
    nib.save(nib.Nifti1Image(data[::-1, ::-1], lps), str(tmp_path / "lps.nii.gz"))
    segs, posts = {}, {}
    for name in ("ras", "lps"):
        code, _, stderr = call(dict(i=str(tmp_path / f"{name}.nii.gz"), o=str(tmp_path / f"{name}_seg.nii.gz"),
                                    post=str(tmp_path / f"{name}_post.nii.gz"), keepgeom=True, parc=parc,
                                    models_dir=models_dir, labels_dir=labels_dir))
        assert code == 0, stderr
        seg = nib.load(tmp_path / f"{name}_seg.nii.gz")
        assert seg.shape == shape
        segs[name] = np.asarray(seg.dataobj)
        posts[name] = nib.load(tmp_path / f"{name}_post.nii.gz").get_fdata(dtype=np.float32)
    np.testing.assert_array_equal(segs["lps"][::-1, ::-1], segs["ras"])
    np.testing.assert_allclose(posts["lps"][::-1, ::-1], posts["ras"], atol=1e-6)
    seg, post = segs["ras"], posts["ras"]
    assert len(np.unique(seg)) > 3
    from_posteriors = np.asarray(tables.segmentation)[post.argmax(-1)]
    top2 = np.sort(post, axis=-1)[..., -2:]
    clear = top2[..., 1] - top2[..., 0] > 1e-5
    cortex = np.isin(from_posteriors, [3, 42])
    agree = (seg == from_posteriors) | (cortex & parc)
    assert np.all(agree[clear])
    if parc:
        assert np.all(seg[cortex & clear] >= 1000)
