"""The cohort's shared CSV: each scan's row exactly once, in plan order, whichever process wrote
it and in whatever order, with concurrent writers (real processes) never losing a row."""

import csv
import multiprocessing
import os

from synthseg_jax.inference.shared_table import SharedTable, lock_path

SUBJECTS = [f"s{n:02d}" for n in range(24)]


def rows_of(path):
    with open(path, newline="") as handle:
        return list(csv.reader(handle))


def test_rows_in_plan_order_replaced_not_repeated(tmp_path):
    path = str(tmp_path / "vols.csv")
    table = SharedTable(path, ["a"], ["x", "y", "z"])
    assert table.read() == {}
    table.add(["z", "3"])
    table.add(["x", "1"])
    table.add(["z", "30"])      # a scan segmented again replaces its row
    assert rows_of(path) == [["subject", "a"], ["x", "1"], ["z", "30"]]
    assert set(table.read()) == {"x", "z"}
    assert os.path.isfile(lock_path(path)) and os.path.basename(lock_path(path)) == ".vols.csv.lock"


def test_other_columns_or_other_scans_are_dropped(tmp_path):
    """As mri_synthseg writes a new file per run: rows of scans outside this run, or a table of
    other columns (another mode), do not survive."""
    path = tmp_path / "vols.csv"
    path.write_text("subject,a\r\nold,9\r\ny,2\r\n")
    table = SharedTable(str(path), ["a"], ["x", "y"])
    assert table.read() == {"y": ["y", "2"]}
    table.add(["x", "1"])
    assert rows_of(path) == [["subject", "a"], ["x", "1"], ["y", "2"]]
    other = SharedTable(str(path), ["a", "b"], ["x", "y"])
    assert other.read() is None
    other.add(["y", "5", "6"])
    assert rows_of(path) == [["subject", "a", "b"], ["y", "5", "6"]]
    path.write_bytes(b"\xff\xfe\x00 not a csv")
    assert SharedTable(str(path), ["a"], ["x"]).read() is None


def _writer(path, subjects):
    table = SharedTable(path, ["value"], SUBJECTS)
    for subject in subjects:
        table.add([subject, subject.upper()])


def test_concurrent_processes_lose_no_row(tmp_path):
    """Four processes add interleaved rows at once; without the lock, read-merge-rewrites race
    and rows go missing (removing the lock makes this test fail)."""
    path = str(tmp_path / "vols.csv")
    parts = [SUBJECTS[k::4] for k in range(4)]
    context = multiprocessing.get_context("spawn")
    procs = [context.Process(target=_writer, args=(path, part)) for part in parts]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(120)
        assert proc.exitcode == 0
    assert rows_of(path) == [["subject", "value"]] + [[s, s.upper()] for s in SUBJECTS]
