#!/usr/bin/env python
"""SynthSeg prediction, configured with Hydra (configs/predict.yaml).

    python predict.py i=scan.nii.gz o=seg.nii.gz parc=true vol=vols.csv qc=qc.csv

The same pipeline is installed as ``mri_synthseg_jax``, which takes mri_synthseg's own flags.
"""

import sys

import hydra
from omegaconf import DictConfig, OmegaConf


@hydra.main(version_base=None, config_path="configs", config_name="predict")
def main(cfg: DictConfig) -> None:
    # jax is imported only after the device and thread settings are in place
    from synthseg_jax.inference.pipeline import UsageError, configure_runtime, run, setup_logging

    values = OmegaConf.to_container(cfg, resolve=True)
    setup_logging()
    try:
        for note in configure_runtime(values.pop("threads", None), values.pop("device", "auto")):
            print(note)
    except UsageError as err:
        print(f"ERROR {err}", file=sys.stderr)
        sys.exit(1)
    sys.exit(run(values))


if __name__ == "__main__":
    main()
