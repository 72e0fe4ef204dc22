"""Scans on disk: reading NIfTI/MGZ/NPZ into a ``Scan`` (one-line ``ScanError`` for every bad
file), and writing outputs atomically.

Semantics follow what ``mri_synthseg`` does to an input (see REFERENCE.md):

* a scan is squeezed; 3-D is the normal case; 4-D with up to 10 channels is reduced to the mean of
  its channels (FreeSurfer 8) or its first channel (7.3.2, ``channels="first"``), with a warning;
  fewer than 3 or more than 4 dimensions is an error;
* ``.npz`` (FreeSurfer 8): the array ``vol_data``, on an identity affine with 1 mm voxels and a
  blank NIfTI header, as FreeSurfer 8 reads it; an ``.npz`` output holds ``vol_data`` likewise;
* NaN or infinite voxels (outside the brain of masked or SPM-normalised images) become background,
  the lowest finite value (with a warning giving their number); an image with no finite value is
  an error;
* every file is written to a temporary name in the destination folder and renamed into place, so a
  failed run never leaves a half-written output.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import tempfile

import nibabel as nib
import numpy as np

IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".mgz", ".npz")
IMAGE_DESCRIPTION = ".nii, .nii.gz, .mgz or .npz"
MAX_CHANNELS = 10  # a trailing axis this short is read as channels, as the original does
NPZ_ARRAY = "vol_data"  # the array FreeSurfer 8 reads from, and writes to, an .npz file


class ScanError(ValueError):
    """A problem with one input or output file. ``str(err)`` is one line naming the file."""


def image_extension(path: str) -> str | None:
    """The image extension of ``path`` (``.nii.gz``, ``.nii``, ``.mgz`` or ``.npz``), or None."""
    lower = path.lower()
    for ext in IMAGE_EXTENSIONS:
        if lower.endswith(ext):
            return ext
    return None


def strip_image_extension(name: str) -> str:
    ext = image_extension(name)
    return name[: -len(ext)] if ext else name


@dataclasses.dataclass
class Scan:
    """A scan as read from disk, reduced to one 3-D channel (``n_channels`` were on disk)."""

    path: str
    data: np.ndarray          # (X, Y, Z) float64, as nibabel's get_fdata gives it
    affine: np.ndarray        # voxel -> world (RAS mm), 4x4
    header: nib.spatialimages.SpatialHeader
    zooms: np.ndarray         # voxel sizes from the header (what decides resampling)
    n_channels: int = 1
    non_finite: int = 0       # NaN/inf voxels (masked, SPM-normalised images) set to background


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _read_npz(path: str) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Header, np.ndarray]:
    """(data, affine, header, zooms) of FreeSurfer 8's ``.npz`` layout."""
    try:
        with np.load(path, allow_pickle=False) as arrays:
            if NPZ_ARRAY not in arrays.files:
                raise ScanError(f"{path}: no '{NPZ_ARRAY}' array in this .npz (it holds "
                                f"{', '.join(arrays.files) or 'nothing'})")
            data = np.asarray(arrays[NPZ_ARRAY])
    except ScanError:
        raise
    except Exception as err:  # not a zip, a pickled object array, a truncated file
        raise ScanError(f"{path}: cannot read image ({_one_line(err)})") from None
    if not (np.issubdtype(data.dtype, np.number) or data.dtype == bool):
        raise ScanError(f"{path}: '{NPZ_ARRAY}' holds {data.dtype} values, not numbers")
    return data.astype(np.float64), np.eye(4), nib.Nifti1Header(), np.ones(3)


def load_scan(path: str, check_values: bool = True, channels: str = "mean") -> Scan:
    """Read a NIfTI/MGZ/NPZ scan; every problem is a ``ScanError`` naming the file. A 4-D scan's
    channels become their mean (``channels="mean"``) or the first one (``"first"``)."""
    if image_extension(path) is None:
        raise ScanError(f"{path}: unsupported file type; use {IMAGE_DESCRIPTION}")
    if not os.path.exists(path):
        raise ScanError(f"{path}: file not found")
    if not os.path.isfile(path):
        raise ScanError(f"{path}: not a file")
    if not os.access(path, os.R_OK):
        raise ScanError(f"{path}: file not readable (permission denied)")
    if image_extension(path) == ".npz":
        data, affine, header, zooms = _read_npz(path)
    else:
        try:
            img = nib.load(path)
            data = np.asarray(img.get_fdata(dtype=np.float64))
        except Exception as err:  # nibabel raises many types for corrupt/truncated files
            raise ScanError(f"{path}: cannot read image ({_one_line(err)})") from None
        affine, header = np.asarray(img.affine, dtype=np.float64), img.header
        zooms = np.asarray(img.header.get_zooms()[:3], dtype=np.float64)
    shape = tuple(data.shape)
    data = np.squeeze(data)
    n_channels = 1
    if data.ndim < 3:
        raise ScanError(f"{path}: image has {data.ndim} dimension(s) of size >1 (shape "
                        f"{shape}); a 3-D scan is needed")
    if data.ndim == 4 and data.shape[-1] <= MAX_CHANNELS:
        n_channels = data.shape[-1]
        data = data.mean(axis=-1) if channels == "mean" else data[..., 0]
    elif data.ndim > 3:
        raise ScanError(f"{path}: image has {data.ndim} dimensions (shape {shape}); "
                        f"a 3-D scan (or 4-D with one frame) is needed")
    non_finite = 0
    if check_values:
        finite = np.isfinite(data)
        if not finite.all():
            if not finite.any():
                raise ScanError(f"{path}: image contains only NaN or infinite values; nothing to segment")
            non_finite = int(finite.size - np.count_nonzero(finite))
            data = np.where(finite, data, data[finite].min())
        if data.size == 0 or float(data.max()) == float(data.min()):
            value = float(data.flat[0]) if data.size else 0.0
            what = "all zero" if value == 0 else f"constant ({value:g})"
            raise ScanError(f"{path}: image is {what}; nothing to segment")
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ScanError(f"{path}: the image's affine (voxel-to-world matrix) is singular or invalid")
    return Scan(path=path, data=data, affine=affine, header=header, zooms=zooms,
                n_channels=n_channels, non_finite=non_finite)


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------

def _make_array(data: np.ndarray, dtype) -> np.ndarray:
    data = np.asarray(data)
    if np.issubdtype(np.dtype(dtype), np.integer) and not np.issubdtype(data.dtype, np.integer):
        data = np.round(data)
    return data.astype(dtype, copy=False)


def _make_image(data: np.ndarray, affine: np.ndarray, header, path: str, dtype) -> nib.spatialimages.SpatialImage:
    data = _make_array(data, dtype)
    if image_extension(path) == ".mgz":
        img = nib.MGHImage(data, affine, header if isinstance(header, nib.freesurfer.mghformat.MGHHeader) else None)
    else:
        hdr = header if isinstance(header, nib.Nifti1Header) else None
        img = nib.Nifti1Image(data, affine, hdr)
        img.header.set_slope_inter(1, 0)
    img.set_data_dtype(dtype)
    return img


def _append_mgh_tags(path: str, tags: bytes) -> None:
    """nibabel writes an MGH file's header, data and five-float footer; FreeSurfer reads tags
    after that footer, inside the same gzip stream."""
    with gzip.open(path, "rb") as handle:
        content = handle.read()
    with gzip.open(path, "wb") as handle:
        handle.write(content + tags)


def temporary_path(path: str) -> str:
    """A fresh, hidden file name beside ``path`` with the same extension (nibabel needs it)."""
    directory = os.path.dirname(os.path.abspath(path))
    ext = image_extension(path) or os.path.splitext(path)[1]
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=f".tmp{ext}", dir=directory)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; give it a normal file's mode
    return tmp


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def ensure_directory(path: str) -> None:
    """Create the folder that will hold ``path``; a clear ``ScanError`` if that is impossible."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as err:
        raise ScanError(f"{path}: cannot create output folder {directory} ({err.strerror or err})") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ScanError(f"{path}: output folder {directory} is not writable")


def check_writable(path: str) -> None:
    """Fail early (``ScanError``) if ``path`` could not be written, leaving nothing behind: the
    nearest existing folder above it must be a folder we can write in, and ``path`` not a folder."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        raise ScanError(f"{path}: is a folder, a file name is needed")
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ScanError(f"{path}: cannot write, {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ScanError(f"{path}: cannot write, folder {parent} is not writable")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise ScanError(f"{path}: cannot write, the file exists and is read-only")
    _probe(parent, path, folder=parent != os.path.dirname(path))


def _probe(parent: str, path: str, folder: bool) -> None:
    """Create and remove a file (or, when folders are still to be made, a folder) in ``parent``:
    permission bits do not tell everything (root, read-only mounts, /proc)."""
    try:
        if folder:
            os.rmdir(tempfile.mkdtemp(prefix=".synthseg-probe.", dir=parent))
        else:
            fd, tmp = tempfile.mkstemp(prefix=".synthseg-probe.", dir=parent)
            os.close(fd)
            os.unlink(tmp)
    except OSError as err:
        raise ScanError(f"{path}: cannot write in {parent} ({err.strerror or err})") from None


class AtomicWriter:
    """Collect several outputs under temporary names, then move them all into place at once.

    ``commit`` renames every file; if anything fails before that, ``discard`` (also called on an
    exception inside a ``with`` block) deletes the temporaries, so no partial output remains.
    """

    def __init__(self) -> None:
        self._pending: list[tuple[str, str]] = []

    def __enter__(self) -> "AtomicWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.discard()

    def _reserve(self, path: str) -> str:
        ensure_directory(path)
        try:
            tmp = temporary_path(path)
        except OSError as err:
            raise ScanError(f"{path}: cannot write ({err.strerror or err})") from None
        self._pending.append((tmp, path))
        return tmp

    def image(self, data: np.ndarray, affine: np.ndarray, header, path: str, dtype,
              mgh_tags: bytes = b"") -> None:
        """``mgh_tags``: FreeSurfer tags appended after an ``.mgz``'s footer (ignored otherwise)."""
        tmp = self._reserve(path)
        try:
            if image_extension(path) == ".npz":   # FreeSurfer 8's layout: the voxels alone
                np.savez_compressed(tmp, **{NPZ_ARRAY: _make_array(data, dtype)})
            else:
                nib.save(_make_image(data, affine, header, path, dtype), tmp)
                if mgh_tags and image_extension(path) == ".mgz":
                    _append_mgh_tags(tmp, mgh_tags)
        except OSError as err:
            raise ScanError(f"{path}: cannot write ({err.strerror or err})") from None

    def bytes(self, content: bytes, path: str) -> None:
        tmp = self._reserve(path)
        try:
            with open(tmp, "wb") as handle:
                handle.write(content)
        except OSError as err:
            raise ScanError(f"{path}: cannot write ({err.strerror or err})") from None

    def text(self, content: str, path: str) -> None:
        self.bytes(content.encode("utf8"), path)

    def commit(self) -> None:
        try:
            for tmp, path in self._pending:
                os.replace(tmp, path)
        except OSError as err:
            self.discard()
            raise ScanError(f"{path}: cannot write ({err.strerror or err})") from None
        self._pending = []

    def discard(self) -> None:
        for tmp, _ in self._pending:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        self._pending = []
