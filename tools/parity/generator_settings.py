"""The generator settings compared by the parity harness, written twice on purpose: the
original's ``BrainGenerator`` arguments as its tutorials give them (3-training.py,
7-synthseg+.py, 5-generation_advanced.py; everything not named is BrainGenerator's default),
and our generator config with its overrides. Deriving one from the other would hide a wrong
default. Plain Python: imported by both environments.

Seeding: a run with ``--seed s`` of setting ``x`` draws from seed ``stream_seed(x, s) = s +
SEED_OFFSETS[x]`` on both sides (our jax key; the original's ``np.random.seed`` and
``tf.random.set_seed``), so that two settings never share random streams: with one seed for
all, ``robust`` and ``t1`` would repeat ``2.0``'s geometric (and partly intensity) draws and
would not be independent evidence. ``2.0``'s offset is 0 (its streams are those of before).
"""
from __future__ import annotations

from typing import Dict, List, Tuple

# arguments every setting passes to BrainGenerator (tutorial 3); table files are in priors_dir
ORIGINAL_COMMON = dict(generation_labels='generation_labels.npy', n_neutral_labels=18,
                       generation_classes='generation_classes.npy', prior_distributions='uniform')

SETTINGS: Dict[str, dict] = {
    # SynthSeg 2.0 training: BrainGenerator defaults (tutorial 3)
    '2.0': dict(original={}, ours=('default', [])),
    # robust variant (tutorial 7): wider uniform priors
    'robust': dict(original=dict(prior_means=[0, 255], prior_stds=[0, 50]),
                   ours=('default', ['prior_means=[0,255]', 'prior_stds=[0,50]'])),
    # contrast-specific T1 at 1 x 1 x 3 mm (tutorial 5)
    't1': dict(original=dict(prior_distributions='normal',
                             generation_classes='generation_classes_contrast_specific.npy',
                             prior_means='prior_means_t1.npy', prior_stds='prior_stds_t1.npy',
                             randomise_res=False, data_res=[1.0, 1.0, 3.0], thickness=[1.0, 1.0, 3.0]),
               ours=('contrast_specific_t1', [])),
}

# per-setting seed offsets (see the module docstring); distinct, SEED_STRIDE apart
SEED_STRIDE = 1_000_000
SEED_OFFSETS: Dict[str, int] = {'2.0': 0, 'robust': SEED_STRIDE, 't1': 2 * SEED_STRIDE}

# version of the per-sample files both sides write (2: ``generation`` added, stream seeds);
# ``--reuse`` refuses runs of another version
SAMPLE_FORMAT = 2

FILE_ARGS = ('generation_labels', 'generation_classes', 'prior_means', 'prior_stds')


def original_kwargs(setting: str) -> dict:
    """BrainGenerator keyword arguments of a setting (table names relative to priors_dir)."""
    kw = dict(ORIGINAL_COMMON)
    kw.update(SETTINGS[setting]['original'])
    return kw


def ours(setting: str) -> Tuple[str, List[str]]:
    """(generator config name, Hydra overrides) of a setting."""
    name, overrides = SETTINGS[setting]['ours']
    return name, list(overrides)


def stream_seed(setting: str, seed: int) -> int:
    """The seed both sides draw from for base seed ``seed`` (``--seeds``) of ``setting``:
    ``seed + SEED_OFFSETS[setting]``. Base seeds must be in [0, SEED_STRIDE), so that no two
    (setting, seed) pairs share a stream."""
    seed = int(seed)
    if not 0 <= seed < SEED_STRIDE:
        raise ValueError(f"seed {seed} must be in [0, {SEED_STRIDE})")
    return seed + SEED_OFFSETS[setting]
