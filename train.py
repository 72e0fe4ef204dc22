"""Train a SynthSeg network: ``python train.py model=<name> [key=value ...]``.

Examples::

    python train.py model=synthseg_2.0                       # the published 2.0 set-up
    python train.py model=cpu_2.0                            # the default CPU-sized model
    python train.py model=tiny train.steps=10                # smoke run
    python train.py train.out_dir=runs/my_run                # resume (or start) in a given folder
    python train.py -m optim.lr=1e-4,3e-4                    # sweep (one run folder each)
    python train.py model=robust_denoiser / robust_second / parc / qc / robust_segmenter

Configuration: ``configs/train.yaml`` (groups ``model``, ``generator``, ``optim``), checked by
``synthseg_jax.training.config``. Everything else lives in ``synthseg_jax.training``.
"""

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

# hydra.run.dir is train.out_dir when one is given, so a run keeps everything in one folder
OmegaConf.register_new_resolver("if_null", lambda value, default: default if value is None else value,
                                replace=True)


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    from synthseg_jax.training.config import ConfigError, TrainConfig
    from synthseg_jax.training.loop import run
    try:
        summary = run(TrainConfig.from_mapping(cfg))
    except ConfigError as err:
        sys.exit(f"train.py: {err}")
    except KeyboardInterrupt:
        print("[train] interrupted outside the training steps; the checkpoints written are kept",
              flush=True)
        sys.exit(130)
    return float(summary.get("last_loss", float("nan")))


if __name__ == "__main__":
    main()
