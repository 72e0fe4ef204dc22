"""Draw samples from the ORIGINAL SynthSeg BrainGenerator and write their statistics.

Runs in the TensorFlow 2.15 environment of ``setup_tf_env.sh`` (``.parity/venv/bin/python``)
with a SynthSeg checkout given by ``--synthseg`` (its code is never copied into this repository):

    .parity/venv/bin/python tools/parity/original_generator.py --synthseg .parity/SynthSeg \
        --priors ../shared/data/synthseg/labels_classes_priors --output-labels OUT_LABELS.npy \
        --setting 2.0 --shape 96 --n-per-map 5 --seed 0 --out DIR MAP1 MAP2 ...

For each label map, ``--n-per-map`` samples of ``BrainGenerator.generate_brain()``; one generator
(one Keras model: all maps have the same shape) whose input generator is rebuilt per map, so
that the map is fixed instead of drawn at random (the only run-time shim; see the README).
Outputs are brought back from the map's own orientation to RAS (as the generator works inside),
with the original's ``align_volume_to_ref``, and written to ``DIR/sample_<map>_<k>.npz``
(``image`` float32, ``target`` int16, ``generation`` int16: the generation labels of the crop;
the statistics are computed from these files, the same way for both sides, by
``run_generator_parity.py``), then ``DIR/done.json`` (seconds per sample, settings, seeds).

The generation labels: ``BrainGenerator`` is built without ``output_labels`` (so its final
``ConvertLabels`` maps the generation labels to themselves: it returns the deformed, cropped,
flipped generation labels), and ``target`` is their lookup in ``--output-labels``
(``generator_stats.target_from_generation``), which is what that ``ConvertLabels`` does with
the table (``labels[labels == generation_labels[i]] = output_labels[i]``; nothing else of the
model depends on ``output_labels``, and it draws nothing).

Seeds: ``--seed`` is the base seed; numpy and TensorFlow are seeded with
``generator_settings.stream_seed(setting, seed)``, as our side is (distinct streams per setting).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def shim_sample_resolution() -> None:
    """TF 2.15 shim: ``SampleResolution.call`` replaces ``self.min_res_tens`` by its batch-tiled
    version; Keras 2.15 traces the call twice (model construction, then predict), so the second
    trace tiles a tiled tensor (rank 3, ValueError). Reset it to the built value before each call,
    which is what the single trace of older TensorFlow saw."""
    import tensorflow as tf
    from ext.lab2im import layers
    call = layers.SampleResolution.call

    def fresh_call(self, inputs, **kwargs):
        self.min_res_tens = tf.convert_to_tensor(self.min_res, dtype='float32')
        return call(self, inputs, **kwargs)

    layers.SampleResolution.call = fresh_call


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('maps', nargs='+')
    ap.add_argument('--synthseg', required=True, help='SynthSeg checkout (has SynthSeg/ and ext/)')
    ap.add_argument('--priors', required=True, help='labels_classes_priors folder')
    ap.add_argument('--output-labels', required=True, help='.npy: output label per generation label')
    ap.add_argument('--setting', required=True)
    ap.add_argument('--shape', type=int, default=160)
    ap.add_argument('--n-per-map', type=int, default=5)
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--out', required=True, help='folder for the samples')
    a = ap.parse_args(argv)

    for d in ('SynthSeg', 'ext'):
        if not os.path.isdir(os.path.join(a.synthseg, d)):
            print(f"{a.synthseg}: not a SynthSeg checkout (no {d}/ folder)", file=sys.stderr)
            return 2
    sys.path[:0] = [os.path.abspath(a.synthseg), HERE]
    import numpy as np
    import tensorflow as tf
    import generator_settings
    import generator_stats
    tf.config.threading.set_intra_op_parallelism_threads(a.threads)
    tf.config.threading.set_inter_op_parallelism_threads(a.threads)
    stream_seed = generator_settings.stream_seed(a.setting, a.seed)
    np.random.seed(stream_seed)
    tf.random.set_seed(stream_seed)
    from SynthSeg.brain_generator import BrainGenerator
    from ext.lab2im import edit_volumes, utils
    shim_sample_resolution()

    kw = generator_settings.original_kwargs(a.setting)
    for k in generator_settings.FILE_ARGS:
        if isinstance(kw.get(k), str):
            kw[k] = os.path.join(a.priors, kw[k])
    out_labels = np.load(a.output_labels)
    # no output_labels: the model returns generation labels; target = their lookup (docstring)
    gen = BrainGenerator(labels_dir=a.maps[0], output_shape=a.shape, **kw)
    os.makedirs(a.out, exist_ok=True)
    seconds = []
    for i, path in enumerate(a.maps):
        # shim: fix the label map (BrainGenerator draws one of labels_dir's maps at random)
        gen.labels_paths = [path]
        gen.model_inputs_generator = gen._build_model_inputs_generator(False)
        gen.brain_generator = gen._build_brain_generator()
        aff = utils.get_volume_info(path, aff_ref=np.eye(4))[1]
        for k in range(a.n_per_map):
            t0 = time.time()
            image, generation = gen.generate_brain()
            image = edit_volumes.align_volume_to_ref(image, aff, aff_ref=np.eye(4), n_dims=3)
            generation = edit_volumes.align_volume_to_ref(generation, aff, aff_ref=np.eye(4), n_dims=3)
            target = generator_stats.target_from_generation(generation, gen.generation_labels, out_labels)
            seconds.append(time.time() - t0)
            np.savez_compressed(os.path.join(a.out, f'sample_{i}_{k}.npz'), image=image.astype(np.float32),
                                target=target.astype(np.int16), generation=generation.astype(np.int16))
            print(f"[original {a.setting}] map {i} sample {k}: {seconds[-1]:.1f} s", flush=True)
    with open(os.path.join(a.out, 'done.json'), 'w') as f:
        json.dump(dict(seconds=seconds, setting=a.setting, shape=a.shape, n_per_map=a.n_per_map,
                       maps=a.maps, seed=a.seed, stream_seed=stream_seed,
                       format=generator_settings.SAMPLE_FORMAT), f)
    return 0


if __name__ == '__main__':
    sys.exit(main())
