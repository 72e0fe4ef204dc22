#!/usr/bin/env python
"""Run the ORIGINAL SynthSeg Keras networks (FreeSurfer 7.3.2 ``mri_synthseg``) on given arrays.

Runs in the TensorFlow venv made by ``setup_tf_env.sh`` (never in the project's JAX environment):

    .parity/venv/bin/python tools/parity/keras_forward.py \
        --script .parity/mri_synthseg --models .parity/models --inputs IN.npz --out OUT.npz

Every key of IN.npz is ``<net>__<case>``:

* ``v1`` / ``v2``: float32 (1, X, Y, Z, 1) image -> (1, X, Y, Z, 32 / 33) posteriors of the bare
  U-Net (``unet_prediction``; no Gaussian blur, no left-right flip averaging).
* ``robust``: float32 (1, X, Y, Z, 1) image -> (1, X, Y, Z, 33) ``unet2_prediction`` of the
  unet -> argmax/one-hot -> l2l -> argmax/one-hot + image -> unet2 cascade.
* ``parc``: float32 (1, X, Y, Z, 3) [image, one-hot cortex mask] -> (1, X, Y, Z, 69) posteriors of
  ``unet_parc`` alone.
* ``qc``: float32 (1, X, Y, Z, 9) one-hot QC labels (X, Y, Z divisible by 16) -> (1, 9) QC output
  (the raw spatial mean, before the clip to [0, 1] the script applies when writing the CSV).
* ``makeshape``: int32 (X, Y, Z) label-index volume, plus a key ``makeshape_shape__<case>`` with
  3 ints -> the script's ``MakeShape(224)`` of it, int32 (1, 224, 224, 224).

Each output is stored in OUT.npz under its input key. With ``--extras`` intermediate layers are
stored too, as ``<key>__<layer name>`` (e.g. ``v2__a__unet_likelihood``; for robust the two earlier
stages' ``unet_prediction`` and ``l2l_prediction``).

v1, v2 and robust are built by the script's own ``build_model`` (which itself calls
``load_weights(path, by_name=True)``), then cut at the prediction layer. The parcellation and QC
networks cannot be fed directly inside ``build_model``'s graph, so they are built with the script's
``unet`` / ``conv_enc`` using the arguments ``build_model`` passes (``make_keras_models.py``
checks that these builds have exactly the layers and weight shapes of ``build_model``'s). After
loading, every layer with weights must have been found in the .h5 file, or this exits with an error.

The original script is imported as a module from the path given (it is not part of this repo).
This module also holds the builders that ``make_keras_models.py`` uses.
"""
import argparse
import contextlib
import gc
import importlib.machinery
import importlib.util
import os
import sys
import time

import numpy as np

NETS = ('v1', 'v2', 'robust', 'parc', 'qc')
MODEL_FILES = {
    'v1': 'synthseg_1.0.h5',
    'v2': 'synthseg_2.0.h5',
    'robust': 'synthseg_robust_2.0.h5',
    'parc': 'synthseg_parc_2.0.h5',
    'qc': 'synthseg_qc_2.0.h5',
}
# final layer of each network, and (with --extras) the intermediate layers also returned
OUTPUT_LAYER = {'v1': 'unet_prediction', 'v2': 'unet_prediction', 'robust': 'unet2_prediction',
                'parc': 'unet_parc_prediction', 'qc': 'qc_final_pred'}
EXTRA_LAYERS = {'v1': ['unet_likelihood'], 'v2': ['unet_likelihood'],
                'robust': ['unet_prediction', 'l2l_prediction', 'unet2_likelihood'],
                'parc': ['unet_parc_likelihood'], 'qc': ['qc_final_conv_1']}
LIKELIHOOD_LAYERS = {'v1': ['unet_likelihood'], 'v2': ['unet_likelihood'],
                     'robust': ['unet_likelihood', 'l2l_likelihood', 'unet2_likelihood'],
                     'parc': ['unet_parc_likelihood'], 'qc': []}
MAKESHAPE_TARGET = 224


def log(*a):
    print('[keras_forward]', *a, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# loading the original script
# ----------------------------------------------------------------------------------------------
def load_script(path, threads=2):
    """Import the extension-less ``mri_synthseg`` script as a module and limit TF's threads."""
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
    os.environ['CUDA_VISIBLE_DEVICES'] = '-1'
    if not os.path.isfile(path):
        raise SystemExit('no such script: %s (run tools/parity/setup_tf_env.sh)' % path)
    loader = importlib.machinery.SourceFileLoader('mri_synthseg_original', os.path.abspath(path))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    tf = mod.tf
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    return mod


def label_info(m, labels_dir):
    """Label lists and counts exactly as the script's ``predict`` / ``build_model`` derive them."""
    def p(name):
        return os.path.join(labels_dir, name)
    info = {}
    for version, suffix in (('v1', '.npy'), ('v2', '_2.0.npy')):
        seg = m.get_list_labels(label_list=p('synthseg_segmentation_labels' + suffix))[0]
        seg_u, unique_idx = np.unique(seg, return_index=True)
        qc = m.get_list_labels(label_list=p('synthseg_qc_labels' + suffix))[0][unique_idx]
        info[version] = {'labels_segmentation': seg_u, 'unique_idx': unique_idx, 'labels_qc': qc,
                         'raw_segmentation': seg}
    info['labels_denoiser'] = np.unique(m.get_list_labels(p('synthseg_denoiser_labels_2.0.npy'))[0])
    info['labels_parcellation'] = np.unique(
        m.get_list_labels(p('synthseg_parcellation_labels.npy'))[0])
    info['n'] = {
        'v1': len(info['v1']['labels_segmentation']),
        'v2': len(info['v2']['labels_segmentation']),
        'robust': len(info['v2']['labels_segmentation']),
        'groups': len(info['labels_denoiser']),
        'parc': len(info['labels_parcellation']),
        'qc': len(np.unique(info['v2']['labels_qc'])),
    }
    return info


# ----------------------------------------------------------------------------------------------
# building the networks with the script's own builders
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def no_weight_loading(m):
    """Make ``keras.Model.load_weights`` a no-op (to build before any .h5 exists)."""
    model_cls = m.keras.Model
    orig = model_cls.load_weights
    model_cls.load_weights = lambda self, *a, **k: None
    try:
        yield
    finally:
        model_cls.load_weights = orig


def build_segmentation_pipeline(m, labels, path_seg, path_parc=None, path_qc=None, robust=False,
                                v1=False, flip=False, do_parcellation=False, do_qc=False,
                                load=True):
    """The script's ``build_model`` with the arguments its ``predict`` would pass."""
    lab = labels['v1' if v1 else 'v2']
    flip_indices = None
    seg_labels = lab['labels_segmentation']
    if flip:
        seg_labels, flip_indices, _ = m.get_flip_indices(lab['raw_segmentation'], 18 if v1 else 19)
    kwargs = dict(model_file_segmentation=path_seg,
                  model_file_parcellation=path_parc,
                  model_file_qc=path_qc,
                  labels_segmentation=seg_labels,
                  labels_denoiser=labels['labels_denoiser'],
                  labels_parcellation=labels['labels_parcellation'],
                  labels_qc=lab['labels_qc'],
                  flip_indices=flip_indices,
                  robust=robust,
                  do_parcellation=do_parcellation,
                  do_qc=do_qc)
    if load:
        return m.build_model(**kwargs)
    kwargs['model_file_segmentation'] = m.__file__  # build_model only checks that it exists
    with no_weight_loading(m):
        return m.build_model(**kwargs)


def build_network(m, net, labels, path=None):
    """Bare network ``net`` (see NETS). Weights are loaded by name from ``path`` if given."""
    keras = m.keras
    load = path is not None
    if load and not os.path.isfile(path):
        raise SystemExit('no such weights file: %s (run make_keras_models.py)' % path)
    n = labels['n']
    if net in ('v1', 'v2', 'robust'):
        # build_model(robust=...) with flip_indices=None: v1/v2 get only the Gaussian blur on top,
        # which the cut at unet_prediction below drops; robust ends at unet2_prediction.
        full = build_segmentation_pipeline(m, labels, path, robust=(net == 'robust'),
                                           v1=(net == 'v1'), load=load)
        model = keras.Model(inputs=full.inputs, outputs=full.get_layer(OUTPUT_LAYER[net]).output)
    elif net == 'parc':
        # arguments as in build_model's parcellation branch, with its own 3-channel input
        model = m.unet(nb_features=24,
                       input_shape=[None, None, None, 3],
                       nb_levels=5,
                       conv_size=3,
                       nb_labels=n['parc'],
                       feat_mult=2,
                       activation='elu',
                       nb_conv_per_level=2,
                       batch_norm=-1,
                       name='unet_parc')
        if load:
            model.load_weights(path, by_name=True)
    elif net == 'qc':
        # arguments and head layers as in build_model's QC branch, with its own one-hot input
        n_qc = n['qc']
        enc = m.conv_enc(nb_features=24,
                         input_shape=[None, None, None, n_qc],
                         nb_levels=4,
                         conv_size=5,
                         name='qc',
                         feat_mult=2,
                         activation='relu',
                         use_residuals=True,
                         nb_conv_per_level=2,
                         batch_norm=-1)
        KL, tf = m.KL, m.tf
        conv_kwargs = {'padding': 'same', 'activation': 'relu', 'data_format': 'channels_last'}
        x = enc.outputs[0]
        x = KL.MaxPool3D(pool_size=(2, 2, 2), name='qc_maxpool_3', padding='same')(x)
        x = KL.Conv3D(n_qc, kernel_size=5, **conv_kwargs, name='qc_final_conv_0')(x)
        x = KL.Conv3D(n_qc, kernel_size=5, **conv_kwargs, name='qc_final_conv_1')(x)
        x = KL.Lambda(lambda t: tf.reduce_mean(t, axis=[1, 2, 3]), name='qc_final_pred')(x)
        model = keras.Model(inputs=enc.inputs, outputs=x)
        if load:
            model.load_weights(path, by_name=True)
    else:
        raise ValueError('unknown network %r (expected one of %s)' % (net, ', '.join(NETS)))
    if load:
        check_all_loaded(model, path)
    return model


def weighted_layers(model):
    return [layer.name for layer in model.layers if layer.weights]


def h5_layers_with_weights(path):
    import h5py
    with h5py.File(path, 'r') as f:
        names = [n.decode() if isinstance(n, bytes) else n for n in f.attrs['layer_names']]
        return {n for n in names if len(f[n].attrs['weight_names'])}


def check_all_loaded(model, path):
    """load_weights(by_name=True) silently skips absent layers: refuse that."""
    missing = sorted(set(weighted_layers(model)) - h5_layers_with_weights(path))
    if missing:
        raise SystemExit('%s lacks weights for %d layers: %s' % (path, len(missing), missing[:10]))


def build_makeshape(m):
    """The script's MakeShape(224) as a tiny Keras model: (label indices, shape) -> crop/pad."""
    KL = m.KL
    labels_in = KL.Input(shape=[None, None, None], dtype='int32')
    shape_in = KL.Input([3], dtype='int32')
    out = m.MakeShape(MAKESHAPE_TARGET)([labels_in, shape_in])
    return m.keras.Model(inputs=[labels_in, shape_in], outputs=out)


# ----------------------------------------------------------------------------------------------
# running
# ----------------------------------------------------------------------------------------------
def run(m, model, x, use_predict=False):
    """Inference-mode forward pass. Eager by default: on this CPU it was 1.5-2x faster than
    ``model.predict`` (graph mode) with bit-identical outputs in our tests; ``use_predict`` runs
    ``model.predict`` as the script itself does."""
    if use_predict:
        return model.predict(x, batch_size=1, verbose=0)
    out = model(m.tf.constant(x), training=False)
    return [np.asarray(o) for o in out] if isinstance(out, (list, tuple)) else np.asarray(out)


def as_batch(x, net):
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 3:
        x = x[None, ..., None]
    elif x.ndim == 4:
        x = x[None]
    if x.ndim != 5 or x.shape[0] != 1:
        raise SystemExit('%s input must be (1, X, Y, Z, C), got %s' % (net, x.shape))
    return x


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--script', required=True, help='path of the extracted mri_synthseg')
    parser.add_argument('--models', required=True, help='folder with the five .h5 and the .npy')
    parser.add_argument('--inputs', required=True, help='npz with <net>__<case> keys')
    parser.add_argument('--out', required=True, help='npz to write')
    parser.add_argument('--threads', type=int, default=2, help='TF inter/intra op threads')
    parser.add_argument('--extras', action='store_true', help='also store intermediate layers')
    parser.add_argument('--predict', action='store_true',
                        help='run model.predict (graph mode, as the script) instead of an eager '
                             'call; same numbers in our tests, slower')
    args = parser.parse_args(argv)

    t_all = time.time()
    m = load_script(args.script, args.threads)
    labels = label_info(m, args.models)
    tf = m.tf

    inputs = np.load(args.inputs)
    groups = {}
    for key in inputs.files:
        net, sep, case = key.partition('__')
        if not sep or not case:
            raise SystemExit('bad key %r: expected <net>__<case>' % key)
        if net == 'makeshape_shape':
            if 'makeshape__' + case not in inputs.files:
                raise SystemExit('%s has no matching makeshape__%s' % (key, case))
            continue
        if net not in NETS and net != 'makeshape':
            raise SystemExit('bad key %r: net must be one of %s or makeshape' % (key, NETS))
        groups.setdefault(net, []).append(key)

    results = {}
    for net in [n for n in NETS + ('makeshape',) if n in groups]:
        t0 = time.time()
        if net == 'makeshape':
            model = build_makeshape(m)
        else:
            model = build_network(m, net, labels, os.path.join(args.models, MODEL_FILES[net]))
            if args.extras:
                names = [OUTPUT_LAYER[net]] + EXTRA_LAYERS[net]
                model = m.keras.Model(inputs=model.inputs,
                                      outputs=[model.get_layer(n).output for n in names])
        log('%s: built in %.1f s' % (net, time.time() - t0))
        for key in groups[net]:
            t1 = time.time()
            if net == 'makeshape':
                case = key.partition('__')[2]
                lab = np.asarray(inputs[key]).astype(np.int32)
                if lab.ndim != 3:
                    raise SystemExit('%s must be (X, Y, Z), got %s' % (key, lab.shape))
                shape = np.asarray(inputs['makeshape_shape__' + case]).astype(np.int32).reshape(3)
                out = model([tf.constant(lab[None]), tf.constant(shape[None])], training=False)
                results[key] = np.asarray(out).astype(np.int32)
                in_shape = lab.shape
            else:
                x = as_batch(inputs[key], net)
                in_shape = x.shape
                outs = run(m, model, x, args.predict)
                if args.extras:
                    results[key] = outs[0]
                    for name, o in zip(EXTRA_LAYERS[net], outs[1:]):
                        results['%s__%s' % (key, name)] = o
                else:
                    results[key] = outs
            log('%s: %s -> %s in %.1f s' % (key, tuple(in_shape), tuple(results[key].shape),
                                            time.time() - t1))
        del model
        m.keras.backend.clear_session()
        gc.collect()

    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    np.savez(args.out, **results)
    log('wrote %d arrays to %s (total %.1f s)' % (len(results), args.out, time.time() - t_all))


if __name__ == '__main__':
    main()
