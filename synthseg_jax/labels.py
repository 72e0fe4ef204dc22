"""Label tables of a FreeSurfer-style ``models/`` folder, in the order the networks use them.

The ``.npy`` files list one entry per generation label (with repeats); the networks' channels are
the sorted unique segmentation labels, and every other table (names, topology classes, QC classes)
is re-indexed by the first occurrence of each label, as ``mri_synthseg`` does.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

N_NEUTRAL_LABELS = {"1.0": 18, "2.0": 19}


class LabelTableError(ValueError):
    """A label file that is missing or inconsistent; the message names the file."""


def _load(models_dir: str, name: str) -> np.ndarray:
    path = os.path.join(models_dir, name)
    if not os.path.isfile(path):
        raise LabelTableError(f"{path}: label file missing from the models folder")
    try:
        return np.load(path)
    except (OSError, ValueError) as err:
        raise LabelTableError(f"{path}: not a readable .npy file ({err})") from None


def flip_indices(raw_labels: np.ndarray, n_neutral: int) -> np.ndarray:
    """For each sorted unique label, the index of its left/right counterpart (itself if neutral).

    ``raw_labels`` lists neutral labels first, then left labels, then the matching right labels.
    """
    neutral = set(raw_labels[:n_neutral].tolist())
    n_sided = (len(raw_labels) - n_neutral) // 2
    left = raw_labels[n_neutral:n_neutral + n_sided]
    right = raw_labels[n_neutral + n_sided:]
    counterpart = {}
    for lab_left, lab_right in zip(left.tolist(), right.tolist()):
        counterpart[lab_left] = lab_right
        counterpart[lab_right] = lab_left
    labels = np.unique(raw_labels)
    index = {lab: i for i, lab in enumerate(labels.tolist())}
    return np.array([i if lab in neutral else index[counterpart[lab]]
                     for i, lab in enumerate(labels.tolist())])


@dataclasses.dataclass(frozen=True)
class LabelTables:
    """Everything label-related that prediction needs, for one model version (1.0 or 2.0)."""

    version: str
    segmentation: np.ndarray        # sorted unique labels = posterior channel order
    names: np.ndarray               # one per channel
    topology_classes: np.ndarray    # one per channel
    flip: np.ndarray                # channel of the left/right counterpart
    n_groups: int                   # robust cascade's denoiser groups
    parcellation: np.ndarray        # sorted unique parcellation labels
    parcellation_names: np.ndarray  # one per parcellation channel
    qc_class: np.ndarray            # QC class of each segmentation channel
    qc_names: np.ndarray            # name of each segmentation channel's QC class

    @property
    def n_labels(self) -> int:
        return len(self.segmentation)

    @property
    def n_qc(self) -> int:
        return len(np.unique(self.qc_class))

    @classmethod
    def load(cls, models_dir: str, version: str = "2.0") -> "LabelTables":
        if version not in N_NEUTRAL_LABELS:
            raise ValueError(f"unknown SynthSeg version {version!r}; expected 1.0 or 2.0")
        suffix = "_2.0.npy" if version == "2.0" else ".npy"
        raw = _load(models_dir, f"synthseg_segmentation_labels{suffix}")
        labels, first = np.unique(raw, return_index=True)
        per_channel = {}
        for key, name in [("names", f"synthseg_segmentation_names{suffix}"),
                          ("topology_classes", f"synthseg_topological_classes{suffix}"),
                          ("qc_class", f"synthseg_qc_labels{suffix}"),
                          ("qc_names", f"synthseg_qc_names{suffix}")]:
            table = _load(models_dir, name)
            if len(table) != len(raw):
                raise LabelTableError(f"{os.path.join(models_dir, name)}: {len(table)} entries, "
                                      f"the segmentation labels have {len(raw)}")
            per_channel[key] = table[first]
        parc_raw = _load(models_dir, "synthseg_parcellation_labels.npy")
        parc_labels, parc_first = np.unique(parc_raw, return_index=True)
        parc_names = _load(models_dir, "synthseg_parcellation_names.npy")[parc_first]
        denoiser = _load(models_dir, "synthseg_denoiser_labels_2.0.npy")
        return cls(version=version, segmentation=labels,
                   flip=flip_indices(raw, N_NEUTRAL_LABELS[version]),
                   n_groups=len(np.unique(denoiser)), parcellation=parc_labels,
                   parcellation_names=parc_names, **per_channel)
