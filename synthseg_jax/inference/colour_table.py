"""The segmentation's look-up table (label, name, colour) in the forms its consumers read:

* FreeSurfer's text colour table (``FreeSurferColorLUT.txt`` layout, a ``.ctab`` file beside a
  NIfTI segmentation with ``addctab``);
* FreeSurfer's binary colour table, embedded as the ``TAG_OLD_COLORTABLE`` tag after an ``.mgz``'s
  data (what FreeSurfer 8's ``--addctab`` writes through surfa; freeview shows the names);
* BIDS' ``_dseg.tsv`` (``index``, ``name``, ``color``).

Names and colours come from ``$FREESURFER_HOME/FreeSurferColorLUT.txt`` when FreeSurfer is
installed (as FreeSurfer 8 does), else from the label tables' names (spaces as hyphens) and the
FreeSurfer colours the overlay uses.
"""

from __future__ import annotations

import dataclasses
import os
import struct

from synthseg_jax.inference.overlay import freesurfer_colour
from synthseg_jax.labels import LabelTables

FREESURFER_LUT = "FreeSurferColorLUT.txt"
OLD_COLORTABLE_TAG = 1        # FreeSurfer's TAG_OLD_COLORTABLE: no length field follows it
BINARY_CTAB_VERSION = -2


@dataclasses.dataclass(frozen=True)
class Entry:
    index: int
    name: str
    rgb: tuple[int, int, int]


def segmentation_labels(tables: LabelTables, parc: bool) -> list[tuple[int, str]]:
    """(label, name) of every value the segmentation can hold: with ``parc`` the cortex labels'
    parcels too (the segmentation keeps 3/42 where the parcellation finds no parcel)."""
    labels = [(int(v), str(n)) for v, n in zip(tables.segmentation, tables.names)]
    if parc:
        labels += [(int(v), str(n)) for v, n in zip(tables.parcellation[1:],
                                                     tables.parcellation_names[1:])]
    return labels


def _freesurfer_lut() -> dict[int, tuple[str, tuple[int, int, int]]]:
    home = os.environ.get("FREESURFER_HOME")
    path = os.path.join(home, FREESURFER_LUT) if home else ""
    entries: dict[int, tuple[str, tuple[int, int, int]]] = {}
    if not path or not os.path.isfile(path):
        return entries
    with open(path, errors="replace") as handle:
        for line in handle:
            fields = line.split()
            if len(fields) >= 5 and fields[0].isdigit():
                entries[int(fields[0])] = (fields[1], tuple(int(c) for c in fields[2:5]))
    return entries


def colour_table(tables: LabelTables, parc: bool) -> list[Entry]:
    known = _freesurfer_lut()
    entries = []
    for label, name in segmentation_labels(tables, parc):
        fs_name, rgb = known.get(label, ("-".join(name.split()), freesurfer_colour(label)))
        entries.append(Entry(label, fs_name, tuple(int(c) for c in rgb)))
    return entries


def ctab_text(entries: list[Entry]) -> str:
    """FreeSurfer's text colour table: ``index name R G B A`` (A is transparency, 0 opaque)."""
    return "".join(f"{e.index:<5d} {e.name:<40s} {e.rgb[0]:3d} {e.rgb[1]:3d} {e.rgb[2]:3d}   0\n"
                   for e in entries)


def dseg_tsv(entries: list[Entry]) -> str:
    """BIDS' look-up table for a ``_dseg`` image."""
    rows = ["index\tname\tcolor"]
    rows += [f"{e.index}\t{e.name}\t#{e.rgb[0]:02x}{e.rgb[1]:02x}{e.rgb[2]:02x}" for e in entries]
    return "\n".join(rows) + "\n"


def mgh_colour_table_tag(entries: list[Entry]) -> bytes:
    """The tag FreeSurfer reads after an MGH file's data (big-endian): the tag id, then the binary
    table: version -2, largest index + 1, an empty file name, the number of entries, and per entry
    its index, name (NUL-terminated, with its length), R, G, B and transparency."""
    out = [struct.pack(">i", OLD_COLORTABLE_TAG),
           struct.pack(">iiii", BINARY_CTAB_VERSION, max(e.index for e in entries) + 1, 0,
                       len(entries))]
    for e in entries:
        name = e.name.encode("utf8") + b"\0"
        out.append(struct.pack(">ii", e.index, len(name)) + name
                   + struct.pack(">iiii", *e.rgb, 0))
    return b"".join(out)


def read_mgh_colour_table(tags: bytes) -> list[Entry]:
    """The inverse of ``mgh_colour_table_tag`` (for checks): the entries of the first tag."""
    tag, version, _, name_len = struct.unpack_from(">iiii", tags)
    if tag != OLD_COLORTABLE_TAG or version != BINARY_CTAB_VERSION:
        raise ValueError(f"not an embedded colour table (tag {tag}, version {version})")
    offset = 16 + name_len
    (count,) = struct.unpack_from(">i", tags, offset)
    offset += 4
    entries = []
    for _ in range(count):
        index, size = struct.unpack_from(">ii", tags, offset)
        name = tags[offset + 8: offset + 8 + size].rstrip(b"\0").decode("utf8")
        offset += 8 + size
        r, g, b, _ = struct.unpack_from(">iiii", tags, offset)
        offset += 16
        entries.append(Entry(index, name, (r, g, b)))
    return entries
