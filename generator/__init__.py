"""SynthSeg's domain-randomisation generator in JAX.

Typical use::

    from generator import load_config, build_params, load_label_maps, make_sampler
    cfg = load_config('default', ['output_shape=[96,96,96]'])
    bank = load_label_maps(cfg.label_dir, build_params(cfg).generation_labels)
    params = build_params(cfg)
    draw = make_sampler(params)                    # or make_sampler(params, batch_size=2)
    image, target = draw(jax.random.key(0), bank.maps)
"""
from .sampler import (GeneratorConfig, LabelBank, LabelMapError, SamplerParams, build_params, load_config,
                      load_label_maps, make_sampler, output_values, sample, sample_from_bank, sample_labels,
                      sample_with_info)

__all__ = ['GeneratorConfig', 'LabelBank', 'LabelMapError', 'SamplerParams', 'build_params', 'load_config',
           'load_label_maps', 'make_sampler', 'output_values', 'sample', 'sample_from_bank', 'sample_labels',
           'sample_with_info']
