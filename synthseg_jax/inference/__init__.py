"""Prediction: ``mri_synthseg``'s pipeline in JAX (options -> planning -> preprocess -> network ->
postprocess -> outputs, run as a batch by ``pipeline``)."""
