import csv
import io

import numpy as np

from synthseg_jax.inference.csv_files import (
    format_qc,
    format_volumes,
    qc_columns,
    single_scan_csv,
    subject_name,
    volume_columns,
)
from synthseg_jax.inference.overlay import colourise, overlay_png
from synthseg_jax.inference.shared_table import SharedTable

# Structures in increasing label order, as labels_table.txt lists them (0 left out; the .npy
# names file spells CSF in lower case).
STRUCTURES_2 = [
    "left cerebral white matter", "left cerebral cortex", "left lateral ventricle",
    "left inferior lateral ventricle", "left cerebellum white matter", "left cerebellum cortex",
    "left thalamus", "left caudate", "left putamen", "left pallidum", "3rd ventricle",
    "4th ventricle", "brain-stem", "left hippocampus", "left amygdala", "csf",
    "left accumbens area", "left ventral DC", "right cerebral white matter",
    "right cerebral cortex", "right lateral ventricle", "right inferior lateral ventricle",
    "right cerebellum white matter", "right cerebellum cortex", "right thalamus",
    "right caudate", "right putamen", "right pallidum", "right hippocampus", "right amygdala",
    "right accumbens area", "right ventral DC",
]


def test_volume_columns_2_0(tables):
    assert volume_columns(tables, parc=False) == ["total intracranial"] + STRUCTURES_2


def test_volume_columns_1_0(tables_v1):
    assert volume_columns(tables_v1, parc=False) == [s for s in STRUCTURES_2 if s != "csf"]


def test_volume_columns_with_parcellation(tables):
    cols = volume_columns(tables, parc=True)
    assert cols[:33] == ["total intracranial"] + STRUCTURES_2
    assert cols[33] == "ctx-lh-bankssts" and len(cols) == 33 + 68
    assert cols[-1] == "ctx-rh-insula"


def test_qc_columns(tables, tables_v1):
    expected = ["general white matter", "general grey matter", "general csf", "cerebellum",
                "brainstem", "thalamus", "putamen+pallidum", "hippocampus+amygdala"]
    assert qc_columns(tables) == expected
    assert qc_columns(tables_v1) == expected


def test_row_formats():
    assert subject_name("/a/b/sub-01_T1w.nii.gz") == "sub-01_T1w"
    assert subject_name("/a/b/scan.mgz") == "scan.mgz"  # the original only strips .nii.gz
    assert format_volumes(np.array([1234.5678, 2.0, 0.0004])) == ["1234.568", "2.0", "0.0"]
    # float32 volumes (the original sums float32 posteriors): numpy 1.23's str, always
    # positional (values from the original's CSV for the MNI T1)
    assert format_volumes(np.array([6826766.0, 1100294.8, 0.0, 4359.813, 144813.31], np.float32)) == [
        "6826766.0", "1100294.8", "0.0", "4359.813", "144813.31"]
    assert format_qc(np.array([0.9, 1.2, -0.1, 0.123456])) == ["1.0000", "0.0000", "0.1235"]


def test_csv_text_layout(tmp_path):
    table = SharedTable(str(tmp_path / "vols.csv"), ["a", "b"], ["s1", "s2"])
    table.add(["s1", "1.0", "2.5"])
    assert (tmp_path / "vols.csv").read_bytes() == b"subject,a,b\r\ns1,1.0,2.5\r\n"
    table.add(["s2", "3", "4"])
    assert (tmp_path / "vols.csv").read_bytes() == b"subject,a,b\r\ns1,1.0,2.5\r\ns2,3,4\r\n"
    text = single_scan_csv(["a", "b"], ["s1", "1.0", "2.5"])
    assert list(csv.reader(io.StringIO(text))) == [["", "a", "b"], ["s1", "1.0", "2.5"]]


def test_colours_and_overlay_png():
    assert colourise(np.array([[2, 3]])).tolist() == [[[245, 245, 245], [205, 62, 78]]]
    assert colourise(np.array([1001, 2035])).tolist() == [[25, 100, 40], [255, 192, 32]]
    rng = np.random.default_rng(0)
    image = rng.uniform(size=(20, 24, 16))
    seg = np.zeros((20, 24, 16), np.int32)
    seg[5:15, 6:18, 4:12] = 17
    lia = np.array([[-1, 0, 0, 0], [0, 0, 1, 0], [0, -1, 0, 0], [0, 0, 0, 1.0]])
    png = overlay_png(image, seg, lia, title="scan")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
