"""The run's HTML report (``report=report.html``): one self-contained file, the overlays embedded
as base64 PNG, so that it can be mailed or archived alone. It shows, in this order: the scans to
look at (flagged, with the reason), the scans that failed (their one-line errors), then every
segmented scan's three orthogonal slices, QC scores and volumes.

A scan is flagged when (``flag_scans``):

* any of its QC scores is below ``QC_THRESHOLD`` (0.65, the original's threshold for a QC score;
  SynthSeg+, Billot et al., PNAS 2023); or
* with at least ``MIN_SCANS_FOR_VOLUMES`` segmented scans in the run, any structure's volume lies
  outside the cohort's median +- ``MAD_FENCE`` scaled median absolute deviations (MAD x 1.4826,
  the standard deviation's robust stand-in; Leys et al. 2013); a structure whose MAD is 0 has no
  spread to judge by and flags nothing.

The rule is a pointer for a person, not a verdict: the fences come from the run's own scans, so a
cohort of one population flags the scans unlike the others, whatever the cause.

NiPreps' ``nireports`` (the reportlet convention of fMRIPrep and MRIQC) is not used, having been
tried (26.0.0): it installs 65 distributions (nipype, pybids, templateflow, pandas, seaborn,
scikit-learn, nilearn, ...; 667 MB in a fresh environment), importing it lays a TemplateFlow cache
in the home folder, its assembler indexes a BIDS derivatives folder of reportlet files that the
page links to (``<img src="./...">``, not one self-contained file) and loads Bootstrap and jQuery
from CDNs (unstyled offline), and its segmentation reportlets are contours, not
FreeSurfer-coloured labels. A jinja2 template (``report.html.j2``) makes the one page this needs.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import importlib.resources
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np

from synthseg_jax.inference.outputs import ScanResult
from synthseg_jax.scans import AtomicWriter

QC_THRESHOLD = 0.65
MAD_FENCE = 3.0
MAD_TO_SD = 1.4826          # MAD x this estimates the standard deviation of a normal sample
MIN_SCANS_FOR_VOLUMES = 5
REPORT_DPI = 80             # the overlay figure is 12 inches wide: 960 pixels in the report
TEMPLATE = "report.html.j2"


@dataclasses.dataclass(frozen=True)
class ScanRecord:
    """What the report shows of one segmented scan; kept until the run ends, so the overlay as PNG
    bytes, not the images."""

    image: str
    subject: str
    overlay_png: bytes
    volumes: dict[str, float]             # structure name -> mm^3
    qc: dict[str, float] | None           # QC class name -> score (QC mode only)


@dataclasses.dataclass(frozen=True)
class Flag:
    """One reason to look at a scan: a QC score below the threshold or a volume outside the
    cohort's range (``text`` says which and by how much)."""

    kind: Literal["qc", "volume"]
    what: str                             # the QC class or the structure
    text: str


def scan_record(image: str, result: ScanResult, volume_columns: Sequence[str],
                qc_columns: Sequence[str]) -> ScanRecord:
    """The report's record of one segmented scan (renders its overlay at the report's size)."""
    from synthseg_jax.inference.overlay import overlay_png

    png = overlay_png(result.image, result.seg, result.affine, title=result.subject, dpi=REPORT_DPI)
    qc = (dict(zip(qc_columns, map(float, result.qc_scores)))
          if result.qc_scores is not None else None)
    return ScanRecord(image=image, subject=result.subject, overlay_png=png,
                      volumes=dict(zip(volume_columns, map(float, result.volumes))), qc=qc)


def volume_fences(records: Sequence[ScanRecord]) -> dict[str, tuple[float, float]]:
    """Per structure, the (low, high) range median +- MAD_FENCE scaled MADs over the scans (low at
    least 0); empty with fewer than MIN_SCANS_FOR_VOLUMES scans; structures without spread left
    out."""
    if len(records) < MIN_SCANS_FOR_VOLUMES:
        return {}
    fences = {}
    for name in records[0].volumes:
        values = np.array([r.volumes[name] for r in records])
        median = float(np.median(values))
        spread = MAD_FENCE * MAD_TO_SD * float(np.median(np.abs(values - median)))
        if spread > 0:
            fences[name] = (max(median - spread, 0.0), median + spread)
    return fences


def flag_scans(records: Sequence[ScanRecord]) -> list[list[Flag]]:
    """Each scan's reasons to be looked at (the module's rule), in the order of ``records``."""
    fences = volume_fences(records)
    flags = []
    for record in records:
        found = [Flag("qc", name, f"{name} {score:.4f}")
                 for name, score in (record.qc or {}).items() if score < QC_THRESHOLD]
        for name, (low, high) in fences.items():
            value = record.volumes[name]
            if not low <= value <= high:
                found.append(Flag("volume", name, f"{name} {value:.1f} mm³ (range {low:.1f} to "
                                                  f"{high:.1f})"))
        flags.append(found)
    return flags


def render_report(records: Sequence[ScanRecord], failures: Sequence[tuple[str, str]],
                  about: Mapping[str, str]) -> str:
    """The page: ``failures`` are (image, one-line error); ``about`` the run's facts shown at the
    top (input, mode, version, ...)."""
    import jinja2

    source = importlib.resources.files(__package__).joinpath(TEMPLATE).read_text(encoding="utf-8")
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    flags = flag_scans(records)
    scans = [dict(index=n, record=r, flags=f, png=base64.b64encode(r.overlay_png).decode("ascii"),
                  qc_flags=[flag.text for flag in f if flag.kind == "qc"],
                  volume_flags=[flag.text for flag in f if flag.kind == "volume"],
                  out_volumes={flag.what for flag in f if flag.kind == "volume"})
             for n, (r, f) in enumerate(zip(records, flags))]
    return env.from_string(source).render(
        scans=scans, flagged=[s for s in scans if s["flags"]], failures=failures,
        fences=volume_fences(records), about=about, qc_threshold=QC_THRESHOLD,
        mad_fence=MAD_FENCE, min_scans=MIN_SCANS_FOR_VOLUMES,
        written=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))


def write_report(path: str, records: Sequence[ScanRecord], failures: Sequence[tuple[str, str]],
                 about: Mapping[str, str]) -> None:
    """Write the page atomically (a reader never sees half of it)."""
    html = render_report(records, failures, about)
    with AtomicWriter() as writer:
        writer.text(html, path)
        writer.commit()
