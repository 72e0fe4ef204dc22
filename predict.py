#!/usr/bin/env python
"""SynthSeg prediction, configured with Hydra (configs/predict.yaml): ``synthseg_jax/predict.py``.

    python predict.py i=scan.nii.gz o=seg.nii.gz parc=true vol=vols.csv qc=qc.csv
"""

from synthseg_jax.interrupts import guarded_main

if __name__ == "__main__":
    guarded_main("synthseg_jax.predict")
