"""The run's HTML report: the flagging rule, the page, and the real thing: ``predict.py`` on a small
cohort (one scan unlike the others, one broken file) rendered by headless Chromium."""

import base64
import collections
import html
import html.parser
import io
import os
import re
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from synthseg_jax.inference.options import PredictOptions, UsageError
from synthseg_jax.inference.planning import plan_outputs
from synthseg_jax.inference.report import (
    MIN_SCANS_FOR_VOLUMES,
    QC_THRESHOLD,
    ScanRecord,
    flag_scans,
    render_report,
    volume_fences,
)
from test_pipeline import FAST, call, make_scan

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WIDTH, HEIGHT = 1280, 2400


def record(name, volumes, qc=None, png=b""):
    return ScanRecord(image=f"/data/{name}.nii.gz", subject=name, overlay_png=png,
                      volumes=volumes, qc=qc)


def tiny_png(rgb=(200, 30, 40)):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), rgb).save(buffer, format="PNG")
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------------
# The rule
# ------------------------------------------------------------------------------------------------

def test_a_volume_outside_median_3_mad_is_flagged_and_a_column_without_spread_is_not():
    hippocampus = [100.0, 102.0, 98.0, 101.0, 99.0, 130.0]
    records = [record(f"s{n}", {"hippocampus": v, "constant": 5.0}) for n, v in enumerate(hippocampus)]
    fences = volume_fences(records)
    assert set(fences) == {"hippocampus"}          # "constant" has MAD 0: nothing to judge by
    low, high = fences["hippocampus"]
    assert low == pytest.approx(100.5 - 3 * 1.4826 * 1.5) and high == pytest.approx(100.5 + 3 * 1.4826 * 1.5)
    flags = flag_scans(records)
    assert [len(f) for f in flags] == [0, 0, 0, 0, 0, 1]
    assert flags[5][0].kind == "volume" and flags[5][0].what == "hippocampus"
    assert flags[5][0].text == f"hippocampus 130.0 mm³ (range {low:.1f} to {high:.1f})"


def test_too_few_scans_for_the_volume_rule():
    records = [record(f"s{n}", {"hippocampus": v})
               for n, v in enumerate([100.0, 101.0, 99.0, 500.0][:MIN_SCANS_FOR_VOLUMES - 1])]
    assert volume_fences(records) == {}
    assert all(f == [] for f in flag_scans(records))


def test_a_qc_score_below_the_threshold_is_flagged():
    records = [record("s0", {"a": 1.0}, qc={"general white matter": 0.5, "thalamus": QC_THRESHOLD,
                                            "cortex": 0.9})]
    (flags,) = flag_scans(records)
    assert [(f.kind, f.what) for f in flags] == [("qc", "general white matter")]
    assert flags[0].text == "general white matter 0.5000"


# ------------------------------------------------------------------------------------------------
# The page
# ------------------------------------------------------------------------------------------------

def test_the_page_is_self_contained_and_escapes_names():
    records = [record("<script>alert(1)</script>", {"a": 1.0}, png=tiny_png())]
    page = render_report(records, [("/x/bad.nii", "/x/bad.nii: cannot read image (truncated)")],
                         {"input": "/x", "mode": "SynthSeg 2.0"})
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    sources = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert sources and all(s.startswith(("data:image/png;base64,", "#")) for s in sources)
    assert "<link" not in page
    (data,) = [s for s in sources if s.startswith("data:")]
    assert base64.b64decode(data.split(",", 1)[1]) == tiny_png()
    assert "/x/bad.nii: cannot read image (truncated)" in page
    assert "No scan flagged" in page and "too few for the volume rule" in page


def test_report_planning(tmp_path):
    scan = make_scan(tmp_path / "s.nii.gz")
    plan = plan_outputs(PredictOptions.create(i=scan, o=str(tmp_path / "o.nii.gz"),
                                              report=str(tmp_path / "run")))
    assert plan.run_files == {"report": str(tmp_path / "run.html")} and plan.jobs[0].paths.keys() == {"o"}
    assert any("run.html" in note for note in plan.notes)
    with pytest.raises(UsageError, match="report is one file for the whole run, not a .txt list"):
        plan_outputs(PredictOptions.create(i=scan, o=str(tmp_path / "o.nii.gz"),
                                           report=str(tmp_path / "r.txt")))


def test_report_is_written_when_every_scan_fails(tmp_path, models_dir, labels_dir):
    src = tmp_path / "in"
    src.mkdir()
    (src / "broken.nii.gz").write_bytes(b"not a NIfTI file")
    nib.save(nib.Nifti1Image(np.zeros((20, 20, 20), np.float32), np.eye(4)), str(src / "zero.nii"))
    report = tmp_path / "report" / "run.html"
    report.parent.mkdir()
    code, stdout, stderr = call(dict(i=str(src), o=str(tmp_path / "out"), report=str(report),
                                     models_dir=models_dir, labels_dir=labels_dir))
    assert code == 1
    assert os.listdir(report.parent) == ["run.html"]      # no temporary file left beside it
    page = report.read_text()
    for line in stderr.splitlines():
        if line.startswith("ERROR "):
            assert html.escape(line[len("ERROR "):], quote=False) in page
    assert "image is all zero" in page and "broken.nii.gz" in page
    assert f"report in {report}" in stdout


def test_a_report_that_cannot_be_written_is_one_error_line(tmp_path, models_dir, labels_dir,
                                                           monkeypatch):
    from synthseg_jax.inference import pipeline

    def disk_full(path, *args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pipeline, "write_report", disk_full)
    scan = make_scan(tmp_path / "s.nii.gz")
    report = tmp_path / "r.html"
    code, stdout, stderr = call(dict(i=scan, o=str(tmp_path / "seg.nii.gz"), report=str(report),
                                     models_dir=models_dir, labels_dir=labels_dir, fast=True))
    assert code == 1 and os.path.isfile(tmp_path / "seg.nii.gz")
    assert stderr.strip().splitlines()[-1] == (f"ERROR {report}: cannot write the report "
                                               f"([Errno 28] No space left on device)")
    assert "report in" not in stdout and "Traceback" not in stderr


# ------------------------------------------------------------------------------------------------
# The real process and a real browser
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chromium():
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("headless Chromium is missing; .ci/run installs the Debian package chromium")
        pytest.skip("headless Chromium not installed (apt-get install chromium)")
    return path


def browse(chromium, tmp_path, *args):
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           "--force-device-scale-factor=1", f"--user-data-dir={tmp_path / 'profile'}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


class TextOf(html.parser.HTMLParser):
    """The page's visible text, whitespace collapsed."""

    def __init__(self):
        super().__init__()
        self.parts = []

    def handle_data(self, data):
        self.parts.append(data)

    def text(self):
        return " ".join(" ".join(self.parts).split())


@pytest.fixture(scope="module")
def cohort_run(tmp_path_factory, models_dir, labels_dir):
    """predict.py on five similar scans, one with three times their volume, and a broken file."""
    tmp = tmp_path_factory.mktemp("cohort")
    src = tmp / "scans"
    src.mkdir()
    for n in range(1, 6):
        make_scan(src / f"sub-0{n}.nii.gz", seed=n)
    make_scan(src / "sub-big.nii.gz", shape=(44, 48, 44), seed=9)
    (src / "sub-broken.nii.gz").write_bytes(b"\x1f\x8b truncated")
    report = tmp / "report.html"
    cmd = [sys.executable, os.path.join(REPO, "predict.py"), f"i={src}", f"o={tmp / 'segs'}",
           f"vol={tmp / 'vol.csv'}", f"qc={tmp / 'qc.csv'}", f"report={report}", "fast=true",
           f"models_dir={models_dir}", f"labels_dir={labels_dir}", "threads=1",
           *(f"{key}={str(value).lower()}" for key, value in FAST.items())]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp)
    return tmp, report, proc


def test_predict_writes_a_report_that_chromium_renders(cohort_run, chromium):
    tmp, report, proc = cohort_run
    assert proc.returncode == 1, proc.stderr                        # one scan failed
    (failure,) = [l for l in proc.stderr.splitlines() if l.startswith("ERROR ")]
    assert "sub-broken.nii.gz" in failure and "Traceback" not in proc.stderr
    assert f"report in {report}" in proc.stdout

    dom = browse(chromium, tmp, "--dump-dom", report.as_uri())
    parser = TextOf()
    parser.feed(dom)
    text = parser.text()
    for n in range(1, 6):
        assert f"sub-0{n}" in text
    assert failure[len("ERROR "):] in text                         # the one-line error, as said
    # the flagged box: every scan has QC scores below 0.65 (random networks), only sub-big a
    # volume outside the run's range, the broken file none (it is a failure)
    flagged = dom[dom.index('id="flagged"'):dom.index('id="failures"')]
    rows = {re.search(r'href="#scan-\d+">([^<]+)</a>', row).group(1): row
            for row in flagged.split("<tr>") if 'href="#scan-' in row}
    assert sorted(rows) == ["sub-01", "sub-02", "sub-03", "sub-04", "sub-05", "sub-big"]
    assert [name for name, row in rows.items() if "why-volume" in row] == ["sub-big"]
    assert "total intracranial" in rows["sub-big"] and "sub-broken" not in flagged
    assert dom.count('class="scan"') == 6

    shot = tmp / "shot.png"
    browse(chromium, tmp, f"--window-size={WIDTH},{HEIGHT}", f"--screenshot={shot}", report.as_uri())
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape == (HEIGHT, WIDTH, 3)
    assert pixels.std() > 20 and np.mean(np.all(pixels == 255, axis=-1)) < 0.95   # not blank
    # the first overlay's commonest label colours are on screen, drawn 1:1 from the embedded PNG
    first = re.search(r'src="data:image/png;base64,([^"]+)"', dom).group(1)
    overlay = np.asarray(Image.open(io.BytesIO(base64.b64decode(first))).convert("RGB"))
    assert overlay.shape[1] == 960
    colourful = overlay[overlay.max(-1).astype(int) - overlay.min(-1) > 40]
    common = [c for c, _ in collections.Counter(map(tuple, colourful)).most_common(5)]
    assert len(common) == 5
    on_screen = collections.Counter(map(tuple, pixels.reshape(-1, 3)))
    for colour in common:
        assert on_screen[colour] >= 10, colour
