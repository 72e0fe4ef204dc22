"""Shared helpers and fixtures of the generator tests (imported by the other test_gen_* modules;
no tests of its own)."""
import os

import numpy as np
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.environ.get('SYNTHSEG_SHARED_DATA', os.path.join(REPO_ROOT, '..', 'shared', 'data', 'synthseg'))
PRIORS = os.path.join(DATA, 'labels_classes_priors')
MAPS = os.path.join(DATA, 'training_label_maps')


def have_data():
    return os.path.isdir(PRIORS) and os.path.isdir(MAPS)


needs_data = pytest.mark.skipif(not have_data(), reason='SynthSeg training data not found')


@pytest.fixture(scope='session')
def priors_dir():
    if not os.path.isdir(PRIORS):
        pytest.skip('SynthSeg label tables not found')
    return PRIORS


@pytest.fixture(scope='session')
def small_label_map():
    """A real label map (training_seg_01, RAS) subsampled by 4: 64^3 of generation-label
    indices, plus the generation labels."""
    if not have_data():
        pytest.skip('SynthSeg training data not found')
    from generator import labels as lab
    from generator.sampler import _read_label_map
    gl = np.load(os.path.join(PRIORS, 'generation_labels.npy'))
    data, _ = _read_label_map(os.path.join(MAPS, 'training_seg_01.nii.gz'))
    return lab.encode_label_map(data[::4, ::4, ::4], gl), gl
