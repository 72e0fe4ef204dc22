"""Prediction: ``mri_synthseg``'s pipeline (preprocess -> network -> postprocess -> outputs) in JAX."""
