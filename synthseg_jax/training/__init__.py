"""Training of the SynthSeg networks: losses, the jitted data-parallel step, orbax checkpoints
with exact resume and Keras/models-folder export, and the loop ``train.py`` runs.

Modules: :mod:`.config` (the typed configuration), :mod:`.losses` (weighted L2, soft Dice, QC
regression), :mod:`.tasks` (what each model kind trains on), :mod:`.step` (train state,
optimiser and learning-rate schedules, sharded step), :mod:`.checkpoint`, :mod:`.validation`
(held-out synthetic images, MNI T1 through prediction's geometry), :mod:`.loop`.
"""


def run(cfg):
    """Train as configured by ``configs/train.yaml`` (see :func:`synthseg_jax.training.loop.run`)."""
    from synthseg_jax.training.loop import run as _run
    return _run(cfg)
